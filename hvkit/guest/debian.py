"""Fetches Debian packages into hvkit's cache without installing them.

The default guest is made of Debian's own binaries (the cloud kernel, busybox). They
are downloaded with `apt-get download` and unpacked with `dpkg-deb -x`, which needs no
root and leaves the host's package database alone.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from hvkit.errors import HvkitError

log = logging.getLogger(__name__)

CLOUD_KERNEL_META = "linux-image-cloud-amd64"


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    if shutil.which(cmd[0]) is None:
        raise HvkitError(f"{cmd[0]} is not installed, so {what} is impossible",
                         "hvkit fetches its guest with Debian's apt and dpkg")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise HvkitError(f"{what} failed: {detail}",
                         "run 'apt-get update' as root if the package lists are missing or old")
    return proc.stdout


def resolve_cloud_kernel() -> str:
    """The package name of the archive's current cloud kernel, e.g.
    'linux-image-6.1.0-56-cloud-amd64', from what the meta-package depends on."""
    out = _run(["apt-cache", "depends", CLOUD_KERNEL_META], f"looking up {CLOUD_KERNEL_META}")
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+-cloud-amd64)\s*$", line)
        if m:
            return m.group(1)
    raise HvkitError(f"apt knows no kernel behind {CLOUD_KERNEL_META}",
                     "run 'apt-get update' as root so apt has the package lists")


def fetch_and_unpack(packages: str | list[str], dest: Path) -> Path:
    """Unpacks `packages` together into `dest` (once: a finished `dest` is reused) and
    returns it. Packages that refer to each other by relative paths (kernel headers and
    their kbuild scripts) must share one `dest`."""
    packages = [packages] if isinstance(packages, str) else packages
    done = dest / ".unpacked"
    if done.exists():
        return dest
    log.info("downloading %s", " ".join(packages))
    with tempfile.TemporaryDirectory(prefix="hvkit-apt-") as tmp:
        Path(tmp).chmod(0o777)  # apt's download user (_apt) must be able to write here
        _run(["apt-get", "download", *packages], f"downloading {' '.join(packages)}", cwd=Path(tmp))
        debs = sorted(Path(tmp).glob("*.deb"))
        if len(debs) != len(packages):
            raise HvkitError(f"apt-get download {' '.join(packages)} produced {len(debs)} .deb files")
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(staging)], f"unpacking {deb.name}")
        (staging / ".unpacked").write_text("".join(d.name + "\n" for d in debs))
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    return dest


def package_depends(package: str) -> list[str]:
    """The packages `package` depends on directly, by apt's current lists."""
    out = _run(["apt-cache", "depends", package], f"looking up {package}")
    return [m.group(1) for m in re.finditer(r"^\s*Depends:\s*(\S+)\s*$", out, re.M)]


def archive_has(package: str) -> bool:
    """Whether apt can download `package` (it has a candidate version)."""
    if shutil.which("apt-cache") is None:
        return False
    out = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True).stdout
    m = re.search(r"Candidate:\s*(\S+)", out)
    return bool(m and m.group(1) != "(none)")
