"""Kernel symbols by name, from the kernel's own kallsyms tables (see kallsyms.py),
cached per kernel file. (Debian's System.map is a placeholder; reading a real one, for
kernels that ship it, is not done yet.)

Beside the addresses it keeps the kernel's banner (the bytes of `linux_banner`), which
is how a kernel file is matched against guest memory: the running kernel has the same
banner somewhere in RAM, or the file is not the guest's kernel; and the few members of
kernel-private structures hvkit reads, from the kernel's BTF (private.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.elffile import ELFFile

from hvkit.errors import HvkitError
from hvkit.kernel.image import read_kernel_image
from hvkit.kernel.kallsyms import read_kallsyms
from hvkit.kernel.private import private_layouts
from hvkit.kernel.vmlinux import extract_vmlinux


@dataclass
class KernelSymbols:
    release: str
    addresses: dict[str, int]
    banner: str  # the text at linux_banner, e.g. "Linux version 6.1.0-56-cloud-amd64 (...) ...\n"
    private: dict[str, dict[str, int]] = field(default_factory=dict)  # private.WANTED, from BTF
    # the kallsyms tables themselves (not listed in kallsyms): name -> (C type of an element,
    # elements or None for a scalar); their addresses are in `addresses`
    tables: dict[str, tuple[str, int | None]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> int:
        try:
            return self.addresses[name]
        except KeyError:
            raise HvkitError(f"kernel {self.release} has no symbol {name}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.addresses


def _elf_bytes_at(elf: ELFFile, vaddr: int, size: int) -> bytes:
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_filesz"]:
            start = vaddr - seg["p_vaddr"]
            return seg.data()[start : start + size]
    raise HvkitError(f"address {vaddr:#x} is not in the kernel file")


def _from_vmlinux(data: bytes, release: str, absolute_percpu: bool) -> KernelSymbols:
    elf = ELFFile(io.BytesIO(data))
    rodata = elf.get_section_by_name(".rodata")
    if rodata is None:
        raise HvkitError("the kernel ELF has no .rodata section")
    sections = {name: (s["sh_addr"], s["sh_addr"] + s["sh_size"])
                for name in (".text", ".data") if (s := elf.get_section_by_name(name)) is not None}
    addresses: dict[str, int] = {}
    kallsyms = read_kallsyms(rodata.data(), absolute_percpu, rodata["sh_addr"], sections)
    for sym in kallsyms.symbols:
        addresses.setdefault(sym.name, sym.address)
    tables = {}
    for name, (address, ctype, count) in kallsyms.tables.symbols(rodata["sh_addr"]).items():
        if addresses.setdefault(name, address) == address:  # a kernel that lists them agrees
            tables[name] = (ctype, count)
    banner = _elf_bytes_at(elf, addresses["linux_banner"], 512).split(b"\0", 1)[0]
    if not banner.startswith(b"Linux version "):
        raise HvkitError("kallsyms gave a linux_banner that is not the banner; the tables are misread")
    return KernelSymbols(release, addresses, banner.decode("ascii", "replace"), private_layouts(data), tables)


def _absolute_percpu(config: Path | None) -> bool:
    """CONFIG_KALLSYMS_ABSOLUTE_PERCPU (x86-64 SMP kernels have it; assumed without a config)."""
    if config is None or not config.exists():
        return True
    return re.search(r"^CONFIG_KALLSYMS_ABSOLUTE_PERCPU=y", config.read_text(), re.M) is not None


SYMBOLS_FORMAT = 3  # what a cached file holds (2: private structures too, 3: the kallsyms tables); part of its name


def load_symbols(kernel: str | Path, cache: Path, config: Path | None = None) -> KernelSymbols:
    """The symbols of the kernel file `kernel` (bzImage or vmlinux), cached by its hash."""
    kernel = Path(kernel)
    image = read_kernel_image(kernel)
    digest = hashlib.sha256(kernel.read_bytes()).hexdigest()[:20]
    cached = cache / "symbols" / f"{image.release}-{digest}-{SYMBOLS_FORMAT}.json"
    if cached.exists():
        data = json.loads(cached.read_text())
        return KernelSymbols(data["release"], data["addresses"], data["banner"], data["private"],
                             {name: tuple(t) for name, t in data["tables"].items()})
    elf = extract_vmlinux(kernel) if image.format == "bzImage" else kernel.read_bytes()
    symbols = _from_vmlinux(elf, image.release, _absolute_percpu(config))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps({"release": symbols.release, "banner": symbols.banner,
                               "addresses": symbols.addresses, "private": symbols.private,
                               "tables": symbols.tables}))
    tmp.replace(cached)
    return symbols
