"""Raw guest RAM in host files: a running VM's memory-backend-file or a copy of one (a
NUMA guest: one file per node, in node order). The one backend whose pages can be
given back: `discard` punches holes in the files."""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from hvkit.errors import HvkitError
from hvkit.memory.base import PAGE_SIZE, GuestMemory, MemoryRange, RamPiece, place_on_pieces

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
DISCARD_CHUNK = 16 << 20  # bytes per hole punched: the host frees ~0.6 us per page

GiB = 1 << 30


def pc_ram_ranges(ram_size: int, machine: str = "pc") -> list[MemoryRange]:
    """Where QEMU's PC machines put their RAM: the i440fx machine (`pc`) up to 3 GiB at 0
    when the guest has 3.5 GiB or more (else up to 3.5 GiB), q35 up to 2 GiB when it
    has 2.75 GiB or more (else up to 2.75 GiB); the rest from 4 GiB up. The RAM file
    holds both parts back to back. (QEMU 7.2, pc_piix.c and pc_q35.c, gigabyte_align
    machine types.)"""
    if machine == "q35":
        lowmem = 2 * GiB if ram_size >= 0xB0000000 else 0xB0000000
    elif machine == "pc":
        lowmem = 3 * GiB if ram_size >= 0xE0000000 else 0xE0000000
    else:
        raise HvkitError(f"unknown machine type {machine!r}", "hvkit knows the PC machines 'pc' (i440fx) and 'q35'")
    below = min(ram_size, lowmem)
    ranges = [MemoryRange(0, below, 0)]
    if ram_size > below:
        ranges.append(MemoryRange(4 * GiB, ram_size - below, below))
    return ranges


@functools.cache
def _libc() -> ctypes.CDLL:
    """libc with the prototypes of the calls the os module lacks (fallocate's punch
    mode, mmap to an address, mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def _ram_file_size(path: Path) -> int:
    if not path.is_file():
        raise HvkitError(f"RAM file {path} does not exist or is not a file")
    size = path.stat().st_size
    if size == 0:
        raise HvkitError(f"{path} is empty, not a guest RAM file")
    if size % PAGE_SIZE:
        raise HvkitError(f"{path} is not a guest RAM file (its size, {size} bytes, "
                         "is not a whole number of pages)")
    return size


class RamFileMemory(GuestMemory):
    """Guest RAM in one file, or in one file per memory backend (`path` a list: a NUMA
    guest's node files in node order, the machine's RAM being them end to end)."""

    def __init__(self, path: str | Path | Sequence[str | Path], machine: str = "pc") -> None:
        files = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
        pieces = [RamPiece(_ram_file_size(f), 0, i) for i, f in enumerate(files)]
        ranges = pc_ram_ranges(sum(p.size for p in pieces), machine)
        super().__init__(files, place_on_pieces(ranges, pieces))

    def backed(self, pages: int) -> np.ndarray:
        """Per page frame below `pages`: does the host hold memory for it? One mincore(2)
        per file over a read-only shared mapping that is never touched (so nothing is
        allocated): much faster than SEEK_DATA/SEEK_HOLE over a file fragmented page by
        page. A page swapped out counts as not held."""
        held = [self._held_pages(i) for i in range(len(self.paths))]
        out = np.zeros(pages, bool)
        for r in self.ranges:
            first, end = r.gpa // PAGE_SIZE, min(r.end // PAGE_SIZE, pages)
            if end > first:
                out[first:end] = held[r.file][r.offset // PAGE_SIZE : r.offset // PAGE_SIZE + end - first] & 1
        return out

    def _held_pages(self, file: int) -> np.ndarray:
        """mincore's vector of file `file`: bit 0 set where the host holds the page."""
        libc = _libc()
        path, fd = self.paths[file], self._fds[file]
        size = path.stat().st_size
        vec = np.zeros(size // PAGE_SIZE, np.uint8)
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise HvkitError(f"cannot map {path}: {os.strerror(ctypes.get_errno())}")
        try:
            if libc.mincore(addr, size, vec.ctypes.data) != 0:
                raise HvkitError(f"mincore on {path} failed: {os.strerror(ctypes.get_errno())}")
        finally:
            libc.munmap(addr, size)
        return vec

    def discard(self, pfns: np.ndarray, counts: np.ndarray, deadline: float | None = None) -> int:
        """Gives the host memory of page runs back: [pfns[i], pfns[i] + counts[i]) for
        each i, in order. The file keeps its size; a hole reads as zeros, and the host
        allocates a page again only when the guest touches it. Holes are punched at most
        DISCARD_CHUNK at a time, and no more once time.monotonic() passes `deadline`.
        Returns the number of pages given back (all of them unless the deadline hit)."""
        fds: list[int] = []
        done = 0
        try:
            for p in self.paths:
                fds.append(os.open(p, os.O_RDWR))
            for r in self.ranges:
                first, end = r.gpa // PAGE_SIZE, r.end // PAGE_SIZE
                lo = np.maximum(pfns, first)
                hi = np.minimum(pfns + counts, end)
                keep = hi > lo
                offsets = (lo[keep] - first) * PAGE_SIZE + r.offset
                lengths = (hi[keep] - lo[keep]) * PAGE_SIZE
                for off, length in zip(offsets.tolist(), lengths.tolist()):
                    for at in range(off, off + length, DISCARD_CHUNK):
                        if deadline is not None and time.monotonic() > deadline:
                            return done
                        n = min(DISCARD_CHUNK, off + length - at)
                        self._punch(fds[r.file], at, n, self.paths[r.file])
                        done += n // PAGE_SIZE
        finally:
            for fd in fds:
                os.close(fd)
        return done

    @staticmethod
    def _punch(fd: int, offset: int, length: int, path: Path) -> None:
        punch_hole(fd, offset, length, path)


def punch_hole(fd: int, offset: int, length: int, path: Path) -> None:
    """Bytes offset .. offset+length of file `fd` (`path`) given back to the file
    system: they read as zeros and hold no memory."""
    if _libc().fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise HvkitError(f"cannot punch a hole in {path}: {os.strerror(err)}",
                         "the RAM file must be on tmpfs or a file system that supports "
                         "hole punching" if err == errno.EOPNOTSUPP else None)
