"""The GuestMemory interface: guest-physical ranges backed by offsets of host files.

A guest-physical address (GPA) is not a file offset: QEMU's PC machine puts RAM above
3 GiB at 4 GiB and up, an ELF core stores its segments wherever it likes, and a NUMA
guest has one memory backend per node, laid end to end in the machine's RAM. Each
backend describes its layout as MemoryRange rows (which file, where in it); reading is
then the same for all.
Reads use pread(2), never a mapping: on tmpfs a read through a mapping allocates pages
for holes, which would undo what sharing gave back.
"""

from __future__ import annotations

import bisect
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from hvkit.errors import HvkitError

PAGE_SIZE = 4096


class GuestAddressError(HvkitError):
    """A guest-physical address that no RAM backs (often: a wild pointer in the guest)."""


@dataclass(frozen=True)
class MemoryRange:
    gpa: int  # first guest-physical address
    size: int  # bytes
    offset: int  # where the range starts in the backing file
    file: int = 0  # which of the memory's files backs it

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass(frozen=True)
class RamPiece:
    """One memory backend of a machine's RAM: `size` bytes at `offset` of file `file`.
    A machine's RAM is its pieces end to end, in the order QEMU lays them out (one
    piece, or one per NUMA node in node order)."""

    size: int
    offset: int = 0
    file: int = 0


def consecutive_runs(sorted_numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, end) positions in `sorted_numbers` of each run of consecutive numbers
    (end exclusive): one read, write or hole per run of pages instead of one per page."""
    breaks = np.flatnonzero(np.diff(sorted_numbers.astype(np.int64)) != 1) + 1
    if len(sorted_numbers) == 0:
        return breaks, breaks
    return np.concatenate(([0], breaks)), np.concatenate((breaks, [len(sorted_numbers)]))


def place_on_pieces(ranges: list[MemoryRange], pieces: Sequence[RamPiece]) -> list[MemoryRange]:
    """`ranges` (whose offsets are offsets into the machine's whole RAM) split where one
    piece ends and the next begins, each with the file and offset of its piece."""
    starts, at = [], 0
    for piece in pieces:
        starts.append(at)
        at += piece.size
    out = []
    for r in ranges:
        gpa, ram, left = r.gpa, r.offset, r.size
        while left > 0:
            i = bisect.bisect_right(starts, ram) - 1
            if i < 0 or ram >= starts[i] + pieces[i].size:
                raise HvkitError(f"guest RAM at {gpa:#x} lies beyond the memory backends ({at >> 20} MiB)")
            n = min(left, starts[i] + pieces[i].size - ram)
            out.append(MemoryRange(gpa, n, pieces[i].offset + ram - starts[i], pieces[i].file))
            gpa, ram, left = gpa + n, ram + n, left - n
    return out


class GuestMemory:
    """Guest-physical memory backed by host files (one, or one per memory backend of a
    NUMA guest; see the backends). `path` is the first of them."""

    def __init__(self, paths: Path | Sequence[Path], ranges: list[MemoryRange]) -> None:
        self.paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
        self.path = self.paths[0]
        self.ranges = sorted(ranges, key=lambda r: r.gpa)
        self._starts = [r.gpa for r in self.ranges]
        self._fds: list[int] = []
        try:
            for p in self.paths:
                self._fds.append(os.open(p, os.O_RDONLY))
        except BaseException:
            self.close()
            raise

    # -- layout ----------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes of RAM (not counting holes between ranges)."""
        return sum(r.size for r in self.ranges)

    @property
    def max_pfn(self) -> int:
        """One past the highest page frame number backed by RAM."""
        return self.ranges[-1].end // PAGE_SIZE if self.ranges else 0

    def _range_of(self, gpa: int) -> MemoryRange:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0 or gpa >= self.ranges[i].end:
            raise GuestAddressError(f"guest-physical address {gpa:#x} is not in RAM")
        return self.ranges[i]

    def contains(self, gpa: int, size: int = 1) -> bool:
        try:
            r = self._range_of(gpa)
        except GuestAddressError:
            return False
        return gpa + size <= r.end

    # -- reading ---------------------------------------------------------------------

    def read(self, gpa: int, size: int) -> bytes:
        """`size` bytes at `gpa`; the span may cross ranges but not a hole in RAM."""
        out = bytearray()
        while size > 0:
            r = self._range_of(gpa)
            n = min(size, r.end - gpa)
            chunk = os.pread(self._fds[r.file], n, r.offset + gpa - r.gpa)
            if len(chunk) < n:  # a file shorter than its layout (it shrank since it was opened)
                chunk += bytes(n - len(chunk))
            out += chunk
            gpa += n
            size -= n
        return bytes(out)

    def read_into(self, gpa: int, into: memoryview) -> None:
        """Fills `into` from `gpa` (a large read without an intermediate copy)."""
        done = 0
        while done < len(into):
            r = self._range_of(gpa + done)
            n = min(len(into) - done, r.end - gpa - done)
            got = os.preadv(self._fds[r.file], [into[done : done + n]], r.offset + gpa + done - r.gpa)
            if got < n:  # a file shorter than its layout (it shrank since it was opened)
                into[done + got : done + n] = bytes(n - got)
            done += n

    def read_u64(self, gpa: int) -> int:
        return struct.unpack("<Q", self.read(gpa, 8))[0]

    def read_array(self, gpa: int, count: int, dtype: str) -> np.ndarray:
        dt = np.dtype(dtype)
        return np.frombuffer(self.read(gpa, count * dt.itemsize), dtype=dt)

    def data_extents(self) -> list[tuple[int, int]]:
        """(gpa, size) of the parts that hold data; file holes (pages never written or
        given back) are skipped, found with SEEK_DATA/SEEK_HOLE without reading them."""
        out = []
        for r in self.ranges:
            pos, end = r.offset, r.offset + r.size
            while pos < end:
                try:
                    start = os.lseek(self._fds[r.file], pos, os.SEEK_DATA)
                except OSError:  # no data after pos
                    break
                if start >= end:
                    break
                stop = min(os.lseek(self._fds[r.file], start, os.SEEK_HOLE), end)
                out.append((r.gpa + start - r.offset, stop - start))
                pos = stop
        return out

    def find(self, needle: bytes, limit: int = 16, chunk: int = 16 << 20) -> list[int]:
        """Guest-physical addresses of up to `limit` occurrences of `needle`."""
        hits: list[int] = []
        for gpa, size in self.data_extents():
            pos = gpa
            while pos < gpa + size and len(hits) < limit:
                n = min(chunk + len(needle), gpa + size - pos)
                data = self.read(pos, n)
                i = data.find(needle)
                while i >= 0 and len(hits) < limit:
                    hits.append(pos + i)
                    i = data.find(needle, i + 1)
                pos += chunk
        return sorted(set(hits))

    # -- lifetime --------------------------------------------------------------------

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        files = self.path if len(self.paths) == 1 else ", ".join(map(str, self.paths))
        return f"{type(self).__name__}({files}, {self.size >> 20} MiB in {len(self.ranges)} ranges)"
