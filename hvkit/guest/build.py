"""Builds the default guest once and caches it: Debian's cloud kernel and a busybox
initramfs whose /init runs hvkit's workloads (see files/init).

The kernel version is never fixed here: the first build asks apt which kernel the
archive's cloud meta-package points at and records the answer in the cache
(`guest.json`); `refresh=True` asks again. The initramfs is rebuilt whenever one of
its inputs (init script, helper source, busybox) changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.guest import debian
from hvkit.guest.initramfs import char_device, directory, from_host_file, regular, write_initramfs
from hvkit.kernel import read_kernel_image

log = logging.getLogger(__name__)

BUSYBOX_PACKAGE = "busybox-static"


@dataclass(frozen=True)
class GuestArtifacts:
    """The files that boot the default guest, all inside the cache."""

    kernel: Path
    initrd: Path
    system_map: Path
    config: Path
    release: str  # `uname -r` of the guest kernel
    kernel_package: str

    def to_json(self) -> dict:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> "GuestArtifacts":
        paths = {k: Path(data[k]) for k in ("kernel", "initrd", "system_map", "config")}
        return cls(**paths, release=data["release"], kernel_package=data["kernel_package"])

    def exists(self) -> bool:
        return all(p.is_file() for p in (self.kernel, self.initrd, self.system_map, self.config))


def _guest_file(name: str) -> bytes:
    return resources.files("hvkit.guest").joinpath("files", name).read_bytes()


def _compile_helper(out: Path) -> None:
    """Builds files/hvkit-mem.c as a static binary (the guest has no libc)."""
    if shutil.which("gcc") is None:
        raise HvkitError("gcc is not installed, so the guest's memory helper cannot be built",
                         "run ./setup.sh (it installs gcc and libc6-dev)")
    src = out.with_suffix(".c")
    src.write_bytes(_guest_file("hvkit-mem.c"))
    proc = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", str(out), str(src)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise HvkitError(f"building the guest helper failed: {proc.stderr.strip()[-400:]}",
                         "static linking needs libc6-dev (./setup.sh installs it)")


# Kernel modules hvkit's init can load (kernel command line hvkit.modules=NAME): each
# name loads these modules, in this order, each after the modules it depends on.
GUEST_MODULES = {"virtio_balloon": ["virtio_pci", "virtio_balloon"]}


def _module_files(kernel_root: Path) -> dict[str, Path]:
    """Every module of the kernel package by name (dashes as underscores)."""
    return {p.name.removesuffix(".ko").replace("-", "_"): p
            for p in (kernel_root / "lib" / "modules").glob("*/kernel/**/*.ko")}


def _module_depends(path: Path) -> list[str]:
    """A module's own list of the modules it needs (its .modinfo "depends=")."""
    from elftools.elf.elffile import ELFFile

    with path.open("rb") as f:
        section = ELFFile(f).get_section_by_name(".modinfo")
        info = section.data().split(b"\0") if section else []
    for item in info:
        if item.startswith(b"depends="):
            return [d.replace("-", "_") for d in item[8:].decode().split(",") if d]
    return []


def _load_order(kernel_root: Path, wanted: list[str]) -> list[Path]:
    """The module files to insmod for `wanted`, dependencies first (depmod's job; the
    package ships no modules.dep, so each module's .modinfo is read)."""
    files = _module_files(kernel_root)
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order or name in chain:
            return
        if name not in files:
            raise HvkitError(f"the guest kernel has no module {name}", "is it built in, or missing from the package?")
        for dep in _module_depends(files[name]):
            visit(dep, chain + (name,))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return [files[n] for n in order]


def _module_entries(kernel_root: Path) -> tuple[list, list[bytes]]:
    """initramfs entries for GUEST_MODULES: lib/modules/<module>.ko and one
    lib/modules/<name>.load per name listing the modules to load, in order."""
    entries, parts = [directory("lib"), directory("lib/modules")], []
    for name, wanted in GUEST_MODULES.items():
        modules = _load_order(kernel_root, wanted)
        listing = "".join(f"{m.name}\n" for m in modules).encode()
        entries.append(regular(f"lib/modules/{name}.load", listing))
        parts.append(listing)
        for m in modules:
            if not any(e.path == f"lib/modules/{m.name}" for e in entries):
                entries.append(from_host_file(f"lib/modules/{m.name}", m))
                parts.append(m.read_bytes())
    return entries, parts


def _build_initrd(cache: Path, busybox: Path, kernel_root: Path) -> Path:
    modules, module_parts = _module_entries(kernel_root)
    inputs = hashlib.sha256()
    for part in (_guest_file("init"), _guest_file("hvkit-mem.c"), busybox.read_bytes(), *module_parts):
        inputs.update(hashlib.sha256(part).digest())
    initrd = cache / f"initrd-{inputs.hexdigest()[:16]}.img"
    if initrd.exists():
        return initrd
    log.info("building the initramfs %s", initrd.name)
    helper = cache / "hvkit-mem"
    _compile_helper(helper)
    entries = [directory(d) for d in ("bin", "dev", "proc", "sys", "tmp")]
    entries += [
        char_device("dev/console", 5, 1),
        regular("init", _guest_file("init"), executable=True),
        from_host_file("bin/busybox", busybox),
        from_host_file("bin/hvkit-mem", helper),
        *modules,
    ]
    write_initramfs(initrd, entries)
    return initrd


def _kernel_files(root: Path, package: str) -> tuple[Path, Path, Path]:
    release = package.removeprefix("linux-image-")
    boot = root / "boot"
    files = boot / f"vmlinuz-{release}", boot / f"System.map-{release}", boot / f"config-{release}"
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise HvkitError(f"package {package} lacks {', '.join(missing)}",
                         "delete the cache folder and run 'hvkit guest build' again")
    return files


def build_default_guest(paths: Paths, refresh: bool = False) -> GuestArtifacts:
    """The default guest's files, building what is missing. Idempotent and cheap when
    everything is cached (no apt call at all)."""
    cache = paths.cache / "guest"
    cache.mkdir(parents=True, exist_ok=True)
    record = cache / "guest.json"
    if record.exists() and not refresh:
        known = GuestArtifacts.from_json(json.loads(record.read_text()))
        package = known.kernel_package
    else:
        package = debian.resolve_cloud_kernel()
    kernel_root = debian.fetch_and_unpack(package, cache / package)
    busybox_root = debian.fetch_and_unpack(BUSYBOX_PACKAGE, cache / BUSYBOX_PACKAGE)
    busybox = busybox_root / "bin" / "busybox"
    if not busybox.is_file():
        raise HvkitError(f"{BUSYBOX_PACKAGE} has no bin/busybox", "delete the cache and rebuild")
    kernel, system_map, config = _kernel_files(kernel_root, package)
    image = read_kernel_image(kernel)
    artifacts = GuestArtifacts(kernel, _build_initrd(cache, busybox, kernel_root), system_map, config,
                               image.release, package)
    record.write_text(json.dumps(artifacts.to_json(), indent=2) + "\n")
    return artifacts

