"""A QEMU `dump-guest-memory` ELF core: its PT_LOAD segments say which guest-physical
range (p_paddr) lies where in the file (p_offset)."""

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
            return [MemoryRange(s["p_paddr"], s["p_filesz"], s["p_offset"])
                    for s in elf.iter_segments() if s["p_type"] == "PT_LOAD" and s["p_filesz"]]
        except ELFError as e:
            raise HvkitError(f"{path} is not a readable ELF core ({e})") from None


class ElfCoreMemory(GuestMemory):
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        ranges = _load_ranges(path)
        if not ranges:
            raise HvkitError(f"{path} holds no guest memory (no PT_LOAD segments)",
                             "make it with QMP dump-guest-memory without paging")
        super().__init__(path, ranges)
