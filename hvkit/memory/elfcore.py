"""A QEMU `dump-guest-memory` ELF core: its PT_LOAD segments say which guest-physical
range (p_paddr) lies where in the file (p_offset). A segment is only believed as far as
the file goes: a truncated or made-up core cannot claim memory it does not hold (and
make every per-page array of a reader that large)."""

from __future__ import annotations

from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from hvkit.errors import HvkitError
from hvkit.memory.base import GuestMemory, MemoryRange


def _load_ranges(path: Path) -> list[MemoryRange]:
    with path.open("rb") as f:
        try:
            elf = ELFFile(f)
            if elf["e_type"] != "ET_CORE":
                raise HvkitError(f"{path} is an ELF file but not a core dump")
            size = path.stat().st_size
            return [r for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"
                    if (r := _within(s["p_paddr"], s["p_filesz"], s["p_offset"], size)) is not None]
        except ELFError as e:
            raise HvkitError(f"{path} is not a readable ELF core ({e})") from None


MAX_NOTES = 1 << 20  # bytes of notes read at most: VMCOREINFO is a few KiB


def vmcoreinfo(path: str | Path) -> dict[str, str]:
    """The VMCOREINFO note of a core ({} when it has none): the kernel's own key=value
    lines (OSRELEASE, PAGESIZE, SYMBOL(...), OFFSET(...), KERNELOFFSET, ...) that drgn
    and crash read to open a core without being told where the kernel is."""
    path = Path(path)
    with path.open("rb") as f:
        try:
            elf = ELFFile(f)
            for seg in elf.iter_segments():
                if seg["p_type"] != "PT_NOTE" or seg["p_filesz"] > MAX_NOTES:
                    continue
                for note in seg.iter_notes():
                    if note["n_name"] == "VMCOREINFO":
                        desc = note["n_desc"]
                        text = desc if isinstance(desc, str) else bytes(desc).decode("ascii", "replace")
                        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        except ELFError as e:
            raise HvkitError(f"{path} is not a readable ELF core ({e})") from None
    return {}


MAX_PHYS = 1 << 52  # x86-64 physical addresses have at most 52 bits


def _within(gpa: int, size: int, offset: int, file_size: int) -> MemoryRange | None:
    """The part of a segment that the file holds; None when it holds none of it, or when
    the segment lies outside the physical address space."""
    size = min(size, file_size - offset)
    if size <= 0 or gpa + size > MAX_PHYS:
        return None
    return MemoryRange(gpa, size, offset)


class ElfCoreMemory(GuestMemory):
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        ranges = _load_ranges(path)
        if not ranges:
            raise HvkitError(f"{path} holds no guest memory (no PT_LOAD segment inside the file)",
                             "make it with QMP dump-guest-memory without paging")
        super().__init__(path, ranges)
