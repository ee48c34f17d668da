"""Fetches Debian packages into hvkit's cache without installing them.

The guests are made of Debian's own binaries (the cloud kernel, busybox). They are
downloaded with `apt-get download` and unpacked with `dpkg-deb -x`, which needs no root
and leaves the host's package database alone.

Two apt configurations are used:

- the machine's own (`Apt()`): the default guest's kernel and busybox, as always;
- hvkit's own (`Apt.private(cache)`): its own sources list naming every Debian suite a
  guest kernel may come from (bookworm, -updates, -security, -backports, trixie,
  trixie-security, sid), its own package lists and download cache, all under
  `<cache>/apt/`, and no package status (`Dir::State::status=/dev/null`). It finds any
  Debian kernel and its headers without touching the machine's sources, and its
  `apt-get update` needs no root (the lists are hvkit's files).
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from hvkit.errors import HvkitError

log = logging.getLogger(__name__)

CLOUD_KERNEL_META = "linux-image-cloud-amd64"

DEBIAN = "http://deb.debian.org/debian"
DEBIAN_SECURITY = "http://deb.debian.org/debian-security"
# (archive, suite) of every suite hvkit's own apt configuration reads: Debian 12 with
# its updates and backports, Debian 13, and unstable
SUITES = (
    (DEBIAN, "bookworm"), (DEBIAN, "bookworm-updates"), (DEBIAN_SECURITY, "bookworm-security"),
    (DEBIAN, "bookworm-backports"), (DEBIAN, "trixie"), (DEBIAN_SECURITY, "trixie-security"),
    (DEBIAN, "sid"),
)
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
LISTS_MAX_AGE = 7 * 86400  # seconds: older lists are refreshed before a name is resolved


def sources_list(suites: tuple[tuple[str, str], ...] = SUITES, keyring: Path = KEYRING) -> str:
    """hvkit's sources list (one-line format): main of every suite, amd64 only."""
    return "".join(f"deb [arch=amd64 signed-by={keyring}] {archive} {suite} main\n"
                   for archive, suite in suites)


@dataclass(frozen=True)
class Apt:
    """How hvkit runs apt: with the machine's configuration (`root` None) or with its
    own in `root` (sources.list, lists/, cache/ there; see the module docstring)."""

    root: Path | None = None

    @classmethod
    def private(cls, cache: Path) -> "Apt":
        return cls(cache / "apt")

    @property
    def sources(self) -> Path:
        assert self.root is not None
        return self.root / "sources.list"

    @property
    def lists(self) -> Path:
        assert self.root is not None
        return self.root / "lists"

    def options(self) -> list[str]:
        """apt's -o options that make it use hvkit's files only (none for the machine's)."""
        if self.root is None:
            return []
        opts = {
            "Dir::Etc::SourceList": self.sources, "Dir::Etc::SourceParts": "/dev/null",
            "Dir::Etc::Preferences": "/dev/null", "Dir::Etc::PreferencesParts": "/dev/null",
            "Dir::State::Lists": self.lists, "Dir::State::status": "/dev/null",
            "Dir::Cache": self.root / "cache",
            # a binary cache of the lists (some images switch it off): lookups in 0.05 s, not
            # 3 s; not its second copy for source packages (another 90 MB)
            "Dir::Cache::pkgcache": "pkgcache.bin", "Dir::Cache::srcpkgcache": "",
            # the archive may be a frozen mirror or snapshot whose Release files have passed
            # their Valid-Until date: still read them (their signatures are checked)
            "Acquire::Check-Valid-Until": "false",
        }
        if os.geteuid() == 0:
            # as root apt downloads as user _apt, which cannot enter a cache under /root;
            # it would fall back to root with a warning on every call: say so at once
            opts["APT::Sandbox::User"] = "root"
        return [x for k, v in opts.items() for x in ("-o", f"{k}={v}")]

    # -- hvkit's own lists ---------------------------------------------------------

    def _prepare(self) -> None:
        """Writes the sources list (again when SUITES changed) and apt's folders."""
        assert self.root is not None
        for d in (self.lists / "partial", self.root / "cache" / "archives" / "partial"):
            d.mkdir(parents=True, exist_ok=True)
        wanted = sources_list()
        if not self.sources.exists() or self.sources.read_text() != wanted:
            self.sources.write_text(wanted)
            (self.root / "updated").unlink(missing_ok=True)

    def lists_age(self) -> float | None:
        """Seconds since hvkit's lists were last updated (None: never, or not hvkit's)."""
        if self.root is None:
            return None
        stamp = self.root / "updated"
        return time.time() - stamp.stat().st_mtime if stamp.exists() else None

    def update(self) -> None:
        """`apt-get update` of hvkit's own lists (about 30 MB, 10 s)."""
        if self.root is None:
            raise HvkitError("hvkit does not update the machine's package lists",
                             "run 'apt-get update' as root")
        self._prepare()
        if not KEYRING.exists():
            raise HvkitError(f"{KEYRING} is missing, so Debian's archive cannot be verified",
                             "apt-get install debian-archive-keyring")
        log.info("updating hvkit's package lists in %s", self.lists)
        t0 = time.monotonic()
        self.run(["apt-get", "-q", "update"], "updating hvkit's package lists of Debian's archive")
        (self.root / "updated").write_text(f"{time.monotonic() - t0:.1f} s\n")

    def ensure_lists(self, max_age: float | None = None) -> None:
        """hvkit's lists exist (and are younger than `max_age` seconds when given)."""
        if self.root is None:
            return
        self._prepare()
        age = self.lists_age()
        if age is None or (max_age is not None and age > max_age):
            self.update()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One hvkit process at a time updates or downloads with hvkit's own lists
        (apt itself would fail on its lock instead of waiting)."""
        if self.root is None:
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "hvkit.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    # -- running apt -----------------------------------------------------------------

    def run(self, cmd: list[str], what: str, cwd: Path | None = None) -> str:
        """`cmd` (apt-get or apt-cache ...) with this configuration; its stdout."""
        return _run([cmd[0], *self.options(), *cmd[1:]], what, cwd,
                    "run 'apt-get update' as root if the package lists are missing or old"
                    if self.root is None else "check the network; 'hvkit guest build --refresh' updates hvkit's lists")

    def candidate(self, package: str) -> str | None:
        """The version apt would download of `package` (None: none)."""
        if shutil.which("apt-cache") is None:
            return None
        out = subprocess.run(["apt-cache", *self.options(), "policy", package],
                             capture_output=True, text=True).stdout
        m = re.search(r"Candidate:\s*(\S+)", out)
        return m.group(1) if m and m.group(1) != "(none)" else None

    def depends(self, package: str) -> list[str]:
        """The packages `package` depends on directly (first of each alternative)."""
        out = self.run(["apt-cache", "depends", package], f"looking up {package}")
        return [m.group(1) for m in re.finditer(r"^\s*(?:Pre)?Depends:\s*(\S+)\s*$", out, re.M)]


def _run(cmd: list[str], what: str, cwd: Path | None = None,
         hint: str = "run 'apt-get update' as root if the package lists are missing or old") -> str:
    if shutil.which(cmd[0]) is None:
        raise HvkitError(f"{cmd[0]} is not installed, so {what} is impossible",
                         "hvkit fetches its guest with Debian's apt and dpkg")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("W:")]
        detail = (lines or proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise HvkitError(f"{what} failed: {detail}", hint)
    return proc.stdout


def resolve_cloud_kernel() -> str:
    """The package name of the archive's current cloud kernel, e.g.
    'linux-image-6.1.0-56-cloud-amd64', from what the meta-package depends on
    (the machine's apt: the default guest is what the machine's Debian runs)."""
    out = _run(["apt-cache", "depends", CLOUD_KERNEL_META], f"looking up {CLOUD_KERNEL_META}")
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+-cloud-amd64)\s*$", line)
        if m:
            return m.group(1)
    raise HvkitError(f"apt knows no kernel behind {CLOUD_KERNEL_META}",
                     "run 'apt-get update' as root so apt has the package lists")


MAX_META_DEPTH = 4  # meta-packages followed: linux-image-cloud-amd64 -> 6.12-cloud -> concrete


def resolve_kernel_package(name: str, apt: Apt) -> str:
    """The concrete kernel image package (the one with a vmlinuz) behind `name`: `name`
    itself, or what a meta-package such as linux-image-6.12-cloud-amd64 depends on.
    `name` may name a suite, as apt does: linux-image-cloud-amd64/trixie. A meta-package
    depends on exactly one other linux-image-* package; an image depends on none."""
    if not re.fullmatch(r"linux-image-[a-z0-9.+~-]+(/[a-z-]+)?", name):
        raise HvkitError(f"{name!r} is not the name of a Debian kernel image package",
                         "give e.g. linux-image-6.12-cloud-amd64 or linux-image-6.12.117+deb12-cloud-amd64")
    current = name
    for _ in range(MAX_META_DEPTH):
        if apt.candidate(current.split("/")[0]) is None:
            raise HvkitError(f"Debian's archive has no package {current.split('/')[0]}",
                             "see 'apt-cache search linux-image' for the names; suites: "
                             + ", ".join(s for _, s in SUITES))
        images = [d for d in apt.depends(current)
                  if d.startswith("linux-image-") and not d.endswith(("-dbg", "-unsigned"))]
        if len(images) != 1:
            return current.split("/")[0]
        current = images[0]
    raise HvkitError(f"{name} leads through more than {MAX_META_DEPTH} meta-packages to no kernel")


def kernel_parts(package: str, apt: Apt) -> list[str]:
    """The packages that make up kernel image `package`: itself, and those of the same
    release it depends on (Debian's newest kernels are split: the vmlinuz in
    linux-binary-<release>, modules in linux-modules-<release>, config and System.map
    in linux-base-<release>; 6.12 and older ship everything in the image package)."""
    release = package.removeprefix("linux-image-")
    parts = [d for d in apt.depends(package)
             if d.startswith("linux-") and d.endswith(f"-{release}")
             and not d.startswith(("linux-image-", "linux-headers-"))]
    return [package, *dict.fromkeys(parts)]


def fetch_and_unpack(packages: str | list[str], dest: Path, apt: Apt | None = None) -> Path:
    """Unpacks `packages` together into `dest` (once: a finished `dest` is reused) and
    returns it. Packages that refer to each other by relative paths (kernel headers and
    their kbuild scripts) must share one `dest`. `apt`: whose configuration downloads
    (default the machine's)."""
    apt = apt or Apt()
    packages = [packages] if isinstance(packages, str) else packages
    done = dest / ".unpacked"
    if done.exists():
        return dest
    log.info("downloading %s", " ".join(packages))
    with apt.locked(), tempfile.TemporaryDirectory(prefix="hvkit-apt-") as tmp:
        Path(tmp).chmod(0o777)  # apt's download user (_apt) must be able to write here
        apt.run(["apt-get", "download", *packages], f"downloading {' '.join(packages)}", cwd=Path(tmp))
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


def package_depends(package: str, apt: Apt | None = None) -> list[str]:
    """The packages `package` depends on directly, by apt's current lists."""
    return (apt or Apt()).depends(package)


def archive_has(package: str, apt: Apt | None = None) -> bool:
    """Whether apt can download `package` (it has a candidate version)."""
    return (apt or Apt()).candidate(package) is not None
