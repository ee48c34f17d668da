"""Raw guest RAM in a host file: a running VM's memory-backend-file or a copy of one."""

from __future__ import annotations

from pathlib import Path

from hvkit.errors import HvkitError
from hvkit.memory.base import GuestMemory, MemoryRange

GiB = 1 << 30


def pc_ram_ranges(ram_size: int) -> list[MemoryRange]:
    """Where QEMU's PC (i440fx) machine puts its RAM: up to 3 GiB at 0 when the guest has
    3.5 GiB or more (else up to 3.5 GiB), the rest from 4 GiB up. The RAM file holds both
    parts back to back. (QEMU 7.2, pc_piix.c, gigabyte_align machine types.)"""
    lowmem = 3 * GiB if ram_size >= 0xE0000000 else 0xE0000000
    below = min(ram_size, lowmem)
    ranges = [MemoryRange(0, below, 0)]
    if ram_size > below:
        ranges.append(MemoryRange(4 * GiB, ram_size - below, below))
    return ranges


class RamFileMemory(GuestMemory):
    def __init__(self, path: str | Path, machine: str = "pc") -> None:
        path = Path(path)
        if not path.is_file():
            raise HvkitError(f"RAM file {path} does not exist or is not a file")
        if machine != "pc":
            raise HvkitError(f"unknown machine type {machine!r} for a RAM file", "hvkit knows 'pc'")
        size = path.stat().st_size
        if size == 0 or size % 4096:
            raise HvkitError(f"{path} is not a guest RAM file (its size, {size} bytes, "
                             "is not a whole number of pages)")
        super().__init__(path, pc_ram_ranges(size))
