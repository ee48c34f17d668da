"""A Debian root in which a kernel's headers can build when this host cannot.

Debian's newest kernels are built with a compiler the host does not have (Debian 12 has
no gcc-16) and ship kbuild programs (fixdep, modpost, objtool) linked against a newer C
library than the host's. The layout interface must still be compiled with that kernel's
own compiler and build system, so for such a kernel hvkit makes a minimal root of the
Debian suite that publishes its headers, with `mmdebstrap --variant=apt`, including
`linux-headers-<release>` (which pulls its compiler and kbuild) and make, and runs the
build inside it: `unshare` gives a private mount namespace with its own /proc (objtool
reads it) and `chroot` enters the root. Nothing is mounted outside that namespace, so a
build killed halfway leaves no mount behind. About 420 MB and 30 s per kernel release,
once; kept under `<cache>/buildroots/<release>/`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

from hvkit.errors import HvkitError
from hvkit.guest import debian

log = logging.getLogger(__name__)

READY = ".hvkit-ready"


def host_cannot_build(root: Path, compiler: str | None) -> str | None:
    """Why this host cannot build against the headers unpacked at `root` (None: it can).
    Asks the tree itself: its compiler by name, and whether its kbuild programs run."""
    if compiler and shutil.which(compiler) is None:
        return f"it was built with {compiler}, which this host does not have"
    fixdep = root / "scripts" / "basic" / "fixdep"
    if fixdep.exists():
        proc = subprocess.run([str(fixdep)], capture_output=True, text=True)
        needs = re.search(r"version `(GLIBC_[\d.]+)' not found", proc.stderr)
        if needs:
            return f"its kbuild programs need {needs.group(1)}, newer than this host's C library"
        if proc.returncode in (126, 127):
            return f"its kbuild program fixdep does not run here: {proc.stderr.strip()[:120]}"
    return None


def _published_in(package: str, apt: debian.Apt) -> tuple[str, str]:
    """(archive URL, suite) of the newest version of `package` in hvkit's lists."""
    out = apt.run(["apt-cache", "madison", package], f"looking up {package}")
    for line in out.splitlines():  # newest first: "pkg | version | URL suite/main amd64 Packages"
        m = re.search(r"\|\s*(\S+)\s+([a-z-]+)/main\b", line)
        if m:
            return m.group(1), m.group(2)
    raise HvkitError(f"Debian's archive has no {package}",
                     "pass --headers DIR with a prepared build tree of that kernel")


def _sources_for(archive: str, suite: str) -> list[str]:
    """Sources lines for a root of `suite`: the suite and, for an update suite
    (-security, -backports, -updates), the release it updates."""
    base = re.sub(r"-(security|backports|updates)$", "", suite)
    lines = [f"deb {debian.DEBIAN} {base} main"]
    if suite != base:
        lines.append(f"deb {archive} {suite} main")
    return lines


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def build_root(release: str, cache: Path) -> Path:
    """The root for kernel `release` (made now if missing): its headers are at
    /usr/src/linux-headers-<release> inside it, ready for `run_inside`."""
    folder = cache / "buildroots"
    dest = folder / release
    if (dest / READY).exists():
        return dest
    for tool in ("mmdebstrap", "unshare", "chroot"):
        if shutil.which(tool) is None:
            raise HvkitError(f"kernel {release} needs a newer toolchain than this host's, and {tool} "
                             "is not installed to make one", "apt-get install mmdebstrap (./setup.sh does), "
                             "or pass --headers DIR with a build tree prepared where it builds")
    package = f"linux-headers-{release}"
    apt = debian.Apt.private(cache)
    with apt.locked():
        apt.ensure_lists()
    archive, suite = _published_in(package, apt)
    with _locked(folder):
        if (dest / READY).exists():
            return dest
        staging = folder / f".{release}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        log.warning("kernel %s needs its own toolchain: making a Debian %s root with %s (once, about 30 s)",
                    release, suite, package)
        cmd = ["mmdebstrap", "--variant=apt", "--quiet",
               # hvkit's archive may be a frozen snapshot whose Release files have expired;
               # their signatures are still checked
               "--aptopt=Acquire::Check-Valid-Until \"false\"",
               "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
               f"--include=make,{package}", re.sub(r"-(security|backports|updates)$", "", suite),
               str(staging), *_sources_for(archive, suite)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            errors = [x for x in proc.stderr.splitlines() if x.startswith("E:")] or proc.stderr.splitlines()
            raise HvkitError(f"making a Debian {suite} root to build kernel {release}'s interface failed: "
                             f"{(errors or ['no output'])[0]}",
                             "check the network and free space in the cache, or pass --headers DIR")
        (staging / READY).write_text(f"{suite} {package}\n")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    return dest


def run_inside(root: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """`argv` run in `root` (chroot) in a private mount and pid namespace with its own
    /proc: the mount dies with the namespace, and with hvkit (--kill-child)."""
    ns = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
          f"--mount-proc={root / 'proc'}"]
    if os.geteuid() != 0:
        ns.insert(1, "--map-root-user")  # a user namespace: chroot without being root
    return subprocess.run([*ns, "chroot", str(root), *argv], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"})


@contextlib.contextmanager
def scratch_dir(root: Path | None) -> Iterator[tuple[Path, Path]]:
    """A temporary folder for a build: (its path on the host, its path as the build
    sees it). Inside `root` when there is one, so the chrooted build reaches it."""
    base = root / "tmp" if root else None
    with tempfile.TemporaryDirectory(prefix="hvkit-build-", dir=base) as tmp:
        host = Path(tmp)
        yield host, (Path("/") / host.relative_to(root)) if root else host
