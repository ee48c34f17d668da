"""Builds hvkit's guests once and caches them: a Debian kernel and a busybox initramfs
whose /init runs hvkit's workloads (see files/init), with that kernel's own modules.

The default guest's kernel version is never fixed here: the first build asks the
machine's apt which kernel the archive's cloud meta-package points at and records the
answer in the cache (`guest.json`); `refresh=True` asks again. build_kernel_guest()
builds a guest of any Debian kernel package instead (fetched with hvkit's own apt
configuration from any suite, noted in `kernels/<name>.json`). An initramfs is rebuilt
whenever one of its inputs (init script, helper source, busybox, modules) changes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
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
    """The files that boot one of hvkit's guests, all inside the cache."""

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
# qemu_fw_cfg is loaded at every boot where the kernel has it as a module: through it the
# kernel hands its VMCOREINFO to QEMU's vmcoreinfo device, so dumps carry it (drgn,
# crash). A kernel without it (or with it built in) gets an empty list.
GUEST_MODULES = {"virtio_balloon": ["virtio_pci", "virtio_balloon"], "qemu_fw_cfg": ["qemu_fw_cfg"]}
OPTIONAL_MODULES = {"qemu_fw_cfg"}


MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")  # Debian compresses them with xz since 6.x


def _module_name(path: Path) -> str:
    """A module's name as the kernel knows it: file name without suffix, dashes as underscores."""
    name = path.name
    for suffix in MODULE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def _module_dirs(kernel_root: Path) -> list[Path]:
    """lib/modules/<release> of the unpacked kernel (usr/lib/modules in newer packages)."""
    return [d for base in ("lib", "usr/lib") for d in (kernel_root / base / "modules").glob("*") if d.is_dir()]


def _module_files(kernel_root: Path) -> dict[str, Path]:
    """Every loadable module of the kernel package by name, compressed or not."""
    return {_module_name(p): p for d in _module_dirs(kernel_root) for p in d.glob("kernel/**/*.ko*")
            if p.name.endswith(MODULE_SUFFIXES)}


def _builtin_modules(kernel_root: Path) -> set[str]:
    """Modules built into the kernel image (its modules.builtin): nothing to load."""
    return {_module_name(Path(line.strip()))
            for d in _module_dirs(kernel_root) if (d / "modules.builtin").is_file()
            for line in (d / "modules.builtin").read_text().splitlines() if line.strip()}


def _module_bytes(path: Path) -> bytes:
    """The module as ELF: busybox's insmod reads no compressed module, so hvkit
    decompresses it here (xz and gzip from the standard library, zstd from zstandard)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def _module_depends(elf: bytes) -> list[str]:
    """A module's own list of the modules it needs (its .modinfo "depends=")."""
    from elftools.elf.elffile import ELFFile

    section = ELFFile(io.BytesIO(elf)).get_section_by_name(".modinfo")
    info = section.data().split(b"\0") if section else []
    for item in info:
        if item.startswith(b"depends="):
            return [d.replace("-", "_") for d in item[8:].decode().split(",") if d]
    return []


def _load_order(kernel_root: Path, wanted: list[str]) -> list[tuple[str, bytes]]:
    """(file name, ELF) of the modules to insmod for `wanted`, dependencies first
    (depmod's job; the package ships no modules.dep, so each module's .modinfo is
    read). Modules built into this kernel are left out."""
    files, builtin = _module_files(kernel_root), _builtin_modules(kernel_root)
    order: dict[str, bytes] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order or name in chain or (name in builtin and name not in files):
            return
        if name not in files:
            raise HvkitError(f"the guest kernel has no module {name}", "is it missing from the package?")
        elf = _module_bytes(files[name])
        for dep in _module_depends(elf):
            visit(dep, chain + (name,))
        order[name] = elf

    for name in wanted:
        visit(name, ())
    return [(_module_file_name(files[n]), elf) for n, elf in order.items()]


def _module_file_name(path: Path) -> str:
    """The module's file name in the initramfs: uncompressed, so always NAME.ko."""
    return path.name[: path.name.index(".ko")] + ".ko"


def _module_entries(kernel_root: Path) -> tuple[list, list[bytes]]:
    """initramfs entries for GUEST_MODULES: lib/modules/<module>.ko and one
    lib/modules/<name>.load per name listing the modules to load, in order."""
    entries, parts = [directory("lib"), directory("lib/modules")], []
    for name, wanted in GUEST_MODULES.items():
        try:
            modules = _load_order(kernel_root, wanted)
        except HvkitError:
            if name not in OPTIONAL_MODULES:
                raise
            modules = []
        listing = "".join(f"{file}\n" for file, _ in modules).encode()
        entries.append(regular(f"lib/modules/{name}.load", listing))
        parts.append(listing)
        for file, elf in modules:
            if not any(e.path == f"lib/modules/{file}" for e in entries):
                entries.append(regular(f"lib/modules/{file}", elf))
                parts.append(elf)
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
    """(vmlinuz, System.map, config) of the unpacked kernel package: in boot/ with the
    release in their names (Debian up to 6.12), or in usr/lib/modules/<release>/ (the
    newest kernels' linux-binary and linux-base packages)."""
    release = package.removeprefix("linux-image-")
    boot = root / "boot"
    layouts = [
        (boot / f"vmlinuz-{release}", boot / f"System.map-{release}", boot / f"config-{release}"),
        *[(d / "vmlinuz", d / "System.map", d / "config")
          for d in (root / "usr" / "lib" / "modules" / release, root / "lib" / "modules" / release)],
    ]
    for files in layouts:
        if all(p.is_file() for p in files):
            return files
    missing = [p.name for p in layouts[0] if not p.is_file()]
    raise HvkitError(f"package {package} lacks {', '.join(missing)}",
                     "delete the cache folder and run 'hvkit guest build' again")


def _busybox(cache: Path) -> Path:
    """busybox from Debian's busybox-static (the machine's apt), the same for every guest."""
    busybox = debian.fetch_and_unpack(BUSYBOX_PACKAGE, cache / BUSYBOX_PACKAGE) / "bin" / "busybox"
    if not busybox.is_file():
        raise HvkitError(f"{BUSYBOX_PACKAGE} has no bin/busybox", "delete the cache and rebuild")
    return busybox


def _assemble(cache: Path, package: str, kernel_root: Path) -> GuestArtifacts:
    """The guest of the unpacked kernel package `package`: its files, and hvkit's
    initramfs with that kernel's own modules (built when its inputs changed)."""
    kernel, system_map, config = _kernel_files(kernel_root, package)
    image = read_kernel_image(kernel)
    initrd = _build_initrd(cache, _busybox(cache), kernel_root)
    return GuestArtifacts(kernel, initrd, system_map, config, image.release, package)


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
    artifacts = _assemble(cache, package, kernel_root)
    record.write_text(json.dumps(artifacts.to_json(), indent=2) + "\n")
    return artifacts


# -- guests of any Debian kernel -------------------------------------------------------

def _record_of(cache: Path, name: str) -> Path:
    """Where the guest built for kernel package `name` (as the user named it) is noted."""
    return cache / "kernels" / (name.replace("/", "@") + ".json")


def _fetch_kernel(paths: Paths, name: str, refresh: bool) -> tuple[str, Path]:
    """(concrete package, its unpacked folder) for the kernel package `name`, fetched
    with hvkit's own apt configuration. Lists older than a week (or `refresh`) are
    updated first; a download that fails on older lists is tried once more after an
    update (the security archive drops superseded kernels)."""
    apt = debian.Apt.private(paths.cache)
    cache = paths.cache / "guest"
    with apt.locked():
        apt.ensure_lists(0 if refresh else debian.LISTS_MAX_AGE)
    package = debian.resolve_kernel_package(name, apt)
    try:
        return package, debian.fetch_and_unpack(debian.kernel_parts(package, apt), cache / package, apt)
    except HvkitError:
        if refresh:
            raise
        with apt.locked():
            apt.update()
        package = debian.resolve_kernel_package(name, apt)
        return package, debian.fetch_and_unpack(debian.kernel_parts(package, apt), cache / package, apt)


def build_kernel_guest(paths: Paths, kernel_package: str, refresh: bool = False) -> GuestArtifacts:
    """A guest of Debian's kernel package `kernel_package` (e.g.
    linux-image-6.12-cloud-amd64, a concrete linux-image-<release>, or NAME/SUITE) with
    hvkit's initramfs and that kernel's own modules, built into the cache next to the
    default guest. The first call fetches with hvkit's own apt configuration
    (debian.Apt.private: any suite from bookworm to sid); later calls make no apt call
    unless `refresh` asks which kernel the name means now. Boot it with
    start_vm(kernel=g.kernel, initrd=g.initrd, ...)."""
    cache = paths.cache / "guest"
    cache.mkdir(parents=True, exist_ok=True)
    record = _record_of(cache, kernel_package)
    known = None
    if record.exists() and not refresh:
        known = GuestArtifacts.from_json(json.loads(record.read_text()))
    if known is not None and (cache / known.kernel_package / ".unpacked").exists():
        package, kernel_root = known.kernel_package, cache / known.kernel_package
    else:
        package, kernel_root = _fetch_kernel(paths, kernel_package, refresh)
    artifacts = _assemble(cache, package, kernel_root)
    record.parent.mkdir(exist_ok=True)
    record.write_text(json.dumps(artifacts.to_json(), indent=2) + "\n")
    return artifacts


def fetch_kernel_file(paths: Paths, kernel_package: str) -> Path:
    """The kernel file (vmlinuz) of Debian's `kernel_package`, from the cache or fetched
    with hvkit's own apt configuration (any suite); no initramfs is built."""
    cache = paths.cache / "guest"
    if (cache / kernel_package / ".unpacked").exists():
        package, root = kernel_package, cache / kernel_package
    else:
        package, root = _fetch_kernel(paths, kernel_package, refresh=False)
    return _kernel_files(root, package)[0]


def guest_of_kernel(paths: Paths, kernel: str | Path) -> GuestArtifacts | None:
    """The guest hvkit built whose kernel is the file `kernel` (the default guest or
    one of build_kernel_guest), so that a VM started with that kernel alone gets the
    initramfs with that kernel's modules; None when hvkit built none for it."""
    cache = paths.cache / "guest"
    target = Path(kernel).resolve()
    records = [cache / "guest.json", *(cache / "kernels").glob("*.json")]
    # the newest record first: several names (a meta package, a concrete one) may have
    # built a guest of the same kernel, and only the latest build has the current initramfs
    for record in sorted((r for r in records if r.exists()), key=lambda r: r.stat().st_mtime, reverse=True):
        try:
            g = GuestArtifacts.from_json(json.loads(record.read_text()))
        except (OSError, ValueError, KeyError):
            continue
        if g.kernel.resolve() == target and g.exists():
            return g
    return None
