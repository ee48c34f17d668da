"""Raw guest RAM in a host file: a running VM's memory-backend-file or a copy of one.
The one backend whose pages can be given back: `discard` punches holes in the file."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import numpy as np

from hvkit.errors import HvkitError
from hvkit.memory.base import PAGE_SIZE, GuestMemory, MemoryRange

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

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

    def discard(self, pfns: np.ndarray, counts: np.ndarray) -> int:
        """Gives the host memory of page runs back: [pfns[i], pfns[i] + counts[i]) for
        each i. The file keeps its size; a hole reads as zeros, and the host allocates a
        page again only when the guest touches it. Returns the number of runs punched
        (runs are split where the file's layout is not contiguous)."""
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
        fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        fd = os.open(self.path, os.O_RDWR)
        punched = 0
        try:
            for r in self.ranges:
                first, end = r.gpa // PAGE_SIZE, r.end // PAGE_SIZE
                lo = np.maximum(pfns, first)
                hi = np.minimum(pfns + counts, end)
                keep = hi > lo
                offsets = (lo[keep] - first) * PAGE_SIZE + r.offset
                lengths = (hi[keep] - lo[keep]) * PAGE_SIZE
                for off, length in zip(offsets.tolist(), lengths.tolist()):
                    if fallocate(fd, mode, off, length) != 0:
                        err = ctypes.get_errno()
                        raise HvkitError(f"cannot punch a hole in {self.path}: {os.strerror(err)}",
                                         "the RAM file must be on tmpfs or a file system that supports "
                                         "hole punching" if err == errno.EOPNOTSUPP else None)
                punched += int(keep.sum())
        finally:
            os.close(fd)
        return punched
