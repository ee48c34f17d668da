"""Kernel build trees of exactly the guest's kernel version, for compiling the layout
interface against.

Debian: `linux-headers-<release>` with what it depends on (the -common headers and
linux-kbuild) unpacked together into the cache without root, fetched with hvkit's own
apt configuration (hvkit.guest.debian.Apt.private: every suite from bookworm to sid).
Its top Makefile includes an absolute /usr/src/... path, which is pointed into the
cache. A kernel this host cannot build against (its compiler missing, its kbuild
programs needing a newer C library: Debian unstable's kernels on Debian 12) is built
inside a Debian root of its own suite instead (hvkit.kernel.buildroot). Anything else: `--headers DIR` with a prepared tree (one where `make
modules_prepare` has run).
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hvkit.errors import HvkitError
from hvkit.guest import debian
from hvkit.kernel import buildroot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelTree:
    root: Path  # where `make -C root M=<dir> modules` works (as the build sees it)
    release: str
    sysroot: Path | None = None  # the Debian root the build runs in (None: this host)

    @property
    def host_root(self) -> Path:
        """`root` as seen from this host."""
        return self.sysroot / self.root.relative_to("/") if self.sysroot else self.root

    @property
    def config(self) -> Path:
        return self.host_root / ".config"

    def make(self, workdir: Path, target: str) -> subprocess.CompletedProcess:
        """`make -C <tree> M=<workdir> <target>`, here or inside the tree's sysroot
        (`workdir` as the build sees it: see buildroot.scratch_dir)."""
        argv = ["make", "-C", str(self.root), f"M={workdir}", target]
        if self.sysroot:
            return buildroot.run_inside(self.sysroot, argv)
        if shutil.which("make") is None:
            raise HvkitError("make is not installed; it runs the kernel's build system",
                             "apt-get install make")
        return subprocess.run(argv, capture_output=True, text=True)

    def config_hash(self) -> str:
        return hashlib.sha256(self.config.read_bytes()).hexdigest()[:16]

    def compiler(self) -> str | None:
        """The C compiler the kernel was built with, if the tree says (Debian does)."""
        variables = self.host_root / ".kernelvariables"
        if variables.exists():
            m = re.search(r"^CC\s*=.*?(gcc-\d+)\s*$", variables.read_text(), re.M)
            if m:
                return m.group(1)
        return None


def prepared_tree(path: str | Path, release: str | None = None) -> KernelTree:
    """A kernel tree given by the user (--headers DIR), checked for what a build needs."""
    root = Path(path)
    missing = [p for p in (".config", "Makefile", "include/generated/autoconf.h")
               if not (root / p).exists()]
    if missing:
        raise HvkitError(f"{root} is not a prepared kernel tree (it lacks {', '.join(missing)})",
                         "give the kernel's build tree after 'make modules_prepare', or its headers package")
    found = root / "include/config/kernel.release"
    tree_release = found.read_text().strip() if found.exists() else None
    if release and tree_release and tree_release != release:
        raise HvkitError(f"the headers in {root} are for kernel {tree_release}, the guest runs {release}")
    return KernelTree(root, release or tree_release or "unknown")


RECHECK_AGE = 86400  # seconds: lists older than this are updated before a release is declared missing


SUPPLY_HEADERS = ("pass --headers DIR: that kernel's build tree after 'make modules_prepare', "
                  "or its linux-headers package unpacked (dpkg-deb -x, rpm2cpio, ...)")
# what Debian's kernel releases look like: 6.1.0-56-cloud-amd64, 6.12.117+deb12-amd64
DEBIAN_RELEASE = re.compile(r"\d+\.\d+(\.\d+)?(-\d+|\+deb\d+)(-[a-z0-9]+)*-(amd64|arm64|i386|[a-z0-9]+64)")


def _fetch_headers(release: str, dest: Path, cache: Path) -> None:
    """linux-headers-<release> with the -common headers and linux-kbuild it depends on,
    fetched with hvkit's own apt configuration (any Debian suite) into `dest`."""
    package = f"linux-headers-{release}"
    if not DEBIAN_RELEASE.fullmatch(release):
        raise HvkitError(f"kernel {release} is not one of Debian's, so hvkit cannot fetch its headers",
                         SUPPLY_HEADERS)
    missing = [tool for tool in ("apt-get", "apt-cache", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise HvkitError(f"this host has no {', '.join(missing)} to fetch the headers of kernel {release} "
                         "from Debian's archive", SUPPLY_HEADERS)
    apt = debian.Apt.private(cache)
    with apt.locked():
        apt.ensure_lists()
    if not debian.archive_has(package, apt):
        with apt.locked():  # lists perhaps from before that kernel was published: once a day, ask again
            if (apt.lists_age() or 0) > RECHECK_AGE:
                apt.update()
        if not debian.archive_has(package, apt):
            raise HvkitError(f"Debian's archive has no {package} (searched: "
                             f"{', '.join(s for _, s in debian.SUITES)})",
                             SUPPLY_HEADERS + " ('hvkit guest build --refresh ...' updates hvkit's package lists)")
    deps = [d for d in debian.package_depends(package, apt)
            if d.startswith(("linux-headers-", "linux-kbuild-"))]
    debian.fetch_and_unpack([package, *deps], dest, apt)


def debian_tree(release: str, cache: Path) -> KernelTree:
    """Debian's headers of kernel `release`, fetched into the cache on first use."""
    package = f"linux-headers-{release}"
    dest = cache / "headers" / release
    if not (dest / ".unpacked").exists():
        _fetch_headers(release, dest, cache)
    root = dest / "usr" / "src" / package
    makefile = root / "Makefile"
    text = makefile.read_text()
    fixed = re.sub(r"include /usr/src/", f"include {dest}/usr/src/", text)
    if fixed != text:
        makefile.write_text(fixed)
    tree = KernelTree(root, release)
    why = buildroot.host_cannot_build(root, tree.compiler())
    if why:
        log.info("kernel %s: %s; building inside a Debian root of its own", release, why)
        return KernelTree(Path("/usr/src") / package, release, buildroot.build_root(release, cache))
    return tree
