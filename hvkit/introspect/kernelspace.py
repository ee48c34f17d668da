"""The guest kernel's place in guest-physical memory, and kernel virtual -> physical.

A RAM file has no CPU registers, so everything comes from memory: the kernel's banner
(known from the kernel file) is found in RAM, which gives the physical address of the
kernel image (`_text`); the image's own variables then give the rest of this boot's
KASLR: `phys_base` (image virtual -> physical), `page_offset_base` (the direct map),
`vmemmap_base` (the struct page array), and `__pgtable_l5_enabled` (4 or 5 levels).
Addresses outside the image and the direct map are translated by walking the kernel's
page tables from `init_top_pgt`.

Layers, as in Volatility: GuestMemory (physical) -> KernelSpace (kernel virtual) ->
per-process page tables (pagetables.py).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from hvkit.errors import HvkitError
from hvkit.introspect.pagetables import translate
from hvkit.kernel.symbols import KernelSymbols
from hvkit.memory import PAGE_SIZE, GuestAddressError, GuestMemory

START_KERNEL_MAP = 0xFFFFFFFF80000000
KERNEL_IMAGE_SPAN = 1 << 30  # KERNEL_IMAGE_SIZE: the image mapping is at most 1 GiB
GiB = 1 << 30
U64 = (1 << 64) - 1  # phys_base is "negative" when KASLR slid the image further virtually


class KernelMismatch(HvkitError):
    """The kernel file given is not the kernel that runs in this memory."""


class GuestInconsistent(HvkitError):
    """Guest memory says something impossible (corrupt, or a guest that lies)."""


def kernel_half_shift(levels: int) -> int:
    """Bits below the sign-extended top of a canonical address: 47 with 4-level paging,
    56 with 5-level (LA57)."""
    return 56 if levels == 5 else 47


def _canonical_kernel(va: int, levels: int) -> bool:
    shift = kernel_half_shift(levels)
    return va >> shift == (1 << (64 - shift)) - 1


def _image_mapped(phys_text: int, phys_base: int) -> bool:
    """Does phys_base put _text inside the kernel image mapping (KASLR slides it within
    those 1 GiB), as every kernel's own does?"""
    runtime_text = (phys_text - phys_base + START_KERNEL_MAP) & U64
    return START_KERNEL_MAP <= runtime_text < START_KERNEL_MAP + KERNEL_IMAGE_SPAN


def _image_pa(phys_text: int, symbols: KernelSymbols, name: str) -> int:
    """Guest-physical address of kernel-image symbol `name` when _text is at `phys_text`
    (the image is physically contiguous)."""
    return phys_text + symbols[name] - symbols["_text"]


@dataclass
class KernelSpace:
    mem: GuestMemory
    symbols: KernelSymbols
    phys_text: int  # guest-physical address of _text
    phys_base: int  # the kernel's phys_base: image virtual = physical + START_KERNEL_MAP - phys_base
    page_offset_base: int  # start of the direct map of all physical memory
    vmemmap_base: int  # virtual address of struct page for pfn 0
    levels: int  # page-table levels: 4 or 5
    top_pgt: int  # guest-physical address of init_top_pgt (the kernel's page tables)
    max_pfn: int  # one past the highest page frame the kernel manages (an ELF core may hold ROM above)

    @classmethod
    def locate(cls, mem: GuestMemory, symbols: KernelSymbols,
               fixed_bases: dict[str, int] | None = None) -> "KernelSpace":
        """The kernel in `mem`. `fixed_bases`: the region bases a kernel without
        CONFIG_RANDOMIZE_MEMORY uses (Layout.fixed_bases(): the macros of its headers),
        for when page_offset_base and vmemmap_base are not symbols of it."""
        phys_text = _image_base(mem, symbols)

        def image_u64(name: str) -> int:
            return mem.read_u64(_image_pa(phys_text, symbols, name))

        l5 = "__pgtable_l5_enabled" in symbols and struct.unpack(
            "<I", mem.read(_image_pa(phys_text, symbols, "__pgtable_l5_enabled"), 4))[0] == 1
        levels = 5 if l5 else 4
        phys_base = image_u64("phys_base")
        def region_base(name: str) -> int:
            if name in symbols:  # CONFIG_RANDOMIZE_MEMORY: a variable KASLR set at boot
                return image_u64(name)
            key = f"{name}_L{levels}"
            if fixed_bases and key in fixed_bases:
                return fixed_bases[key]
            raise HvkitError(f"kernel {symbols.release} has no symbol {name} (it is built without "
                             f"CONFIG_RANDOMIZE_MEMORY) and its headers gave no fixed {name} for "
                             f"{levels}-level paging")

        page_offset_base = region_base("page_offset_base")
        vmemmap_base = region_base("vmemmap_base")
        for name, value in (("page_offset_base", page_offset_base), ("vmemmap_base", vmemmap_base)):
            if not _canonical_kernel(value, levels) or value % GiB:
                raise GuestInconsistent(f"{name} = {value:#x} is not a kernel region base")
        if (phys_base - phys_text) % (2 << 20) or not _image_mapped(phys_text, phys_base):
            raise GuestInconsistent(f"phys_base = {phys_base:#x} does not fit the image at {phys_text:#x}")
        top_pgt = _image_pa(phys_text, symbols, "init_top_pgt")
        max_pfn = image_u64("max_pfn") if "max_pfn" in symbols else mem.max_pfn
        if not 0 < max_pfn <= mem.max_pfn or not mem.contains((max_pfn - 1) * PAGE_SIZE):
            raise GuestInconsistent(f"max_pfn = {max_pfn:#x} does not fit {mem.size >> 20} MiB of memory",
                                    "is the file truncated?" if max_pfn > mem.max_pfn else None)
        return cls(mem, symbols, phys_text, phys_base, page_offset_base, vmemmap_base,
                   levels, top_pgt, max_pfn)

    # -- kernel virtual addresses --------------------------------------------------------

    @property
    def virt_slide(self) -> int:
        """Runtime minus link-time virtual address of the kernel image (KASLR)."""
        runtime_text = (self.phys_text - self.phys_base + START_KERNEL_MAP) & U64
        return runtime_text - self.symbols["_text"]

    def symbol_va(self, name: str) -> int:
        return self.symbols[name] + self.virt_slide

    def symbol_pa(self, name: str) -> int:
        return _image_pa(self.phys_text, self.symbols, name)

    def va_to_pa(self, va: int) -> int:
        """Guest-physical address of kernel virtual address `va`; GuestAddressError when
        it is not mapped to RAM."""
        if START_KERNEL_MAP <= va < START_KERNEL_MAP + KERNEL_IMAGE_SPAN:
            pa = (va - START_KERNEL_MAP + self.phys_base) & U64
        elif self.page_offset_base <= va < self.page_offset_base + (self.max_pfn << 12):
            pa = va - self.page_offset_base
        else:
            pa = translate(self.mem, self.top_pgt, va, self.levels)
        if not self.mem.contains(pa):
            raise GuestAddressError(f"kernel address {va:#x} maps to {pa:#x}, outside RAM")
        return pa

    def read(self, va: int, size: int) -> bytes:
        """Bytes at kernel virtual `va`, page by page (virtually contiguous only)."""
        out = bytearray()
        while size > 0:
            n = min(size, 4096 - (va & 0xFFF))
            out += self.mem.read(self.va_to_pa(va), n)
            va += n
            size -= n
        return bytes(out)

    def read_u64(self, va: int) -> int:
        return struct.unpack("<Q", self.read(va, 8))[0]


IMAGE_ALIGN = 2 << 20  # x86-64 loads the kernel at a multiple of 2 MiB (CONFIG_PHYSICAL_ALIGN)


def _image_base(mem: GuestMemory, symbols: KernelSymbols) -> int:
    """Guest-physical address of _text. The image starts on a 2 MiB boundary, so the
    banner can only be at `linux_banner - _text` past one: those few places are read
    (2,048 for 4 GiB) instead of searching all of RAM. A candidate counts when its
    init_uts_ns also names the release (copies of the banner text elsewhere do not)."""
    text = symbols["_text"]
    banner = symbols.banner.encode()
    offset = symbols["linux_banner"] - text
    # places with the banner whose init_uts_ns is past the end of RAM / does not name the release
    cut, unnamed = None, None
    for r in mem.ranges:
        first = -(-r.gpa // IMAGE_ALIGN) * IMAGE_ALIGN
        for base in range(first, r.end - offset - len(banner), IMAGE_ALIGN):
            if not mem.contains(base + offset, len(banner)) or mem.read(base + offset, len(banner)) != banner:
                continue
            if "init_uts_ns" in symbols:
                uts = _image_pa(base, symbols, "init_uts_ns")
                if not mem.contains(uts, 512):
                    cut = base if cut is None else cut
                    continue
                if symbols.release.encode() not in mem.read(uts, 512):
                    unnamed = base if unnamed is None else unnamed
                    continue
            return base
    if cut is not None:
        raise GuestInconsistent(f"the kernel image at {cut:#x} runs past the end of this memory",
                                "is the file truncated?")
    if unnamed is not None:
        raise GuestInconsistent(f"the kernel's banner is where a kernel image starts ({unnamed:#x}), but its "
                                f"init_uts_ns does not name release {symbols.release}: the image is damaged")
    if mem.find(banner, limit=1):
        raise GuestInconsistent("the kernel's banner is in memory, but never where a kernel image could start")
    raise _not_this_kernel(mem, symbols)


BANNER_MAX = 512  # bytes of a banner read from memory (the kernel's own is ~200)
SHOWN = 24  # characters of the same text shown around where two banners differ


def _banners_in(mem: GuestMemory, limit: int = 16) -> list[str]:
    """Linux banners among the first `limit` places that start like one, each up to its
    line end; text that is not all printable (a compressed copy, say) is left out."""
    out = []
    for gpa in mem.find(b"Linux version ", limit=limit):
        raw = mem.read(gpa, min(BANNER_MAX, _bytes_left(mem, gpa)))
        line = re.split(rb"[\n\0]", raw, maxsplit=1)[0]
        if re.fullmatch(rb"Linux version [\x21-\x7e]+ \([\x20-\x7e]*", line):
            out.append(line.decode("ascii"))
    return out


def _bytes_left(mem: GuestMemory, gpa: int) -> int:
    """Bytes of RAM from `gpa` to the end of its range."""
    return next(r.end - gpa for r in mem.ranges if r.gpa <= gpa < r.end)


def _common_ends(a: str, b: str) -> tuple[int, int]:
    """Lengths of the common beginning and the common end of `a` and `b` (not overlapping)."""
    head = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    return head, tail


def _difference(a: str, b: str) -> int:
    """Characters of `a` and `b` outside their common beginning and end."""
    head, tail = _common_ends(a, b)
    return len(a) + len(b) - 2 * (head + tail)


def _differing_part(a: str, b: str) -> tuple[str, str]:
    """The parts of `a` and `b` between their common beginning and end, with SHOWN
    characters of context (so a build date or package version shows where it changed)."""
    head, tail = _common_ends(a, b)
    lo = max(0, head - SHOWN)

    def cut(s: str) -> str:
        hi = min(len(s), len(s) - tail + SHOWN, lo + 4 * SHOWN)
        return ("..." if lo else "") + s[lo:hi] + ("..." if hi < len(s) else "")

    return cut(a), cut(b)


def _not_this_kernel(mem: GuestMemory, symbols: KernelSymbols) -> HvkitError:
    """Why the kernel file's banner is not in memory, from the banners that are (the one
    closest to the file's speaks for the memory): another release, another build of the
    same release (quoted where the banners differ), or no Linux banner at all."""
    ours = symbols.banner.rstrip("\n")
    hint = "pass the guest's own kernel with --kernel"
    banners = _banners_in(mem)
    if not banners:
        return KernelMismatch(f"the kernel file ({symbols.release}) is not the kernel in this memory; "
                              "no Linux kernel banner was found in it at all", hint)
    if ours in banners:
        return GuestInconsistent("the kernel's banner is in memory only as a copy (as in the kernel log), never "
                                 "where a kernel image could start: the image is damaged")
    theirs = min(banners, key=lambda b: _difference(ours, b))
    release = theirs.split()[2]
    if release != symbols.release:
        return KernelMismatch(f"the kernel file ({symbols.release}) is not the kernel in this memory; "
                              f"the memory runs kernel {release}", hint)
    mine, other = _differing_part(ours, theirs)
    return KernelMismatch(f"the kernel file is another build of {release} than the one in this memory: "
                          f"the memory's banner has '{other}' where the file's has '{mine}'", hint)
