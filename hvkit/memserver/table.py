"""A snapshot's guest-physical map: a multi-level table of 512-entry levels.

Like a CPU page table, each level indexes 9 bits of the page number; the leaf level
(level 0) points at 4 KiB frames, and an entry one level up covers 512 pages (2 MiB),
the next 512 x 512 (1 GiB), and so on. An entry is one u64:

    0                       ZERO    every page under it reads as zeros (the zero frame)
    TABLE | table id        a table of the level below
    FRAMES | file | page    frames: at level 0 one frame, at level L > 0 a run of
                            512**L consecutive frames of that file (a "large" entry)

A snapshot made from a VM's RAM file is one top-level table of large entries over that
file: its size costs nothing. Forking copies the top-level table only; a lower table is
replicated (or a large entry split into a table) the first time a write needs it.

Tables live in one append-only file, 4 KiB each, and are never changed once their
snapshot is sealed; a table id is its index in that file. Several processes read it
(the server maps it), one writes at a time (the store's lock).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hvkit.errors import HvkitError

FANOUT = 512
BITS = 9
TABLE_BYTES = FANOUT * 8
KIND_SHIFT = 62
ZERO, TABLE, FRAMES = 0, 1, 2
FILE_SHIFT = 36  # page index: 36 bits (256 TiB per file); file id: 26 bits
PAGE_MASK = (1 << FILE_SHIFT) - 1
FILE_MASK = (1 << (KIND_SHIFT - FILE_SHIFT)) - 1


def table_entry(table_id: int) -> int:
    return (TABLE << KIND_SHIFT) | table_id


def frames_entry(file_id: int, page: int) -> int:
    if not 0 < file_id <= FILE_MASK or not 0 <= page <= PAGE_MASK:
        raise ValueError(f"frame ({file_id}, {page}) out of range")
    return (FRAMES << KIND_SHIFT) | (file_id << FILE_SHIFT) | page


def kind_of(entry: int) -> int:
    return entry >> KIND_SHIFT


def levels_for(pages: int) -> int:
    """Levels needed to map `pages` pages (at least 2, so the top level is a table of
    large entries and a fork never copies more than one table)."""
    levels = 2
    while FANOUT ** levels < pages:
        levels += 1
    return levels


class TableFile:
    """The append-only file of tables, read through a shared mapping that grows as
    other processes append."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch(mode=0o600, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR)
        self._map: mmap.mmap | None = None
        self._tables = np.zeros((0, FANOUT), dtype=np.uint64)
        if os.fstat(self._fd).st_size == 0:
            self.append(np.zeros(FANOUT, dtype=np.uint64))  # id 0: never used by an entry

    def close(self) -> None:
        self._tables = np.zeros((0, FANOUT), dtype=np.uint64)
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes with it
                pass
        os.close(self._fd)

    def count(self) -> int:
        return os.fstat(self._fd).st_size // TABLE_BYTES

    def _remap(self) -> None:
        n = self.count()
        if n == 0:
            return
        self._map = mmap.mmap(self._fd, n * TABLE_BYTES, prot=mmap.PROT_READ)
        self._tables = np.frombuffer(self._map, dtype=np.uint64).reshape(n, FANOUT)

    def table(self, table_id: int) -> np.ndarray:
        """Table `table_id` (read-only view)."""
        if table_id >= len(self._tables):
            self._remap()
            if table_id >= len(self._tables):
                raise HvkitError(f"the memory server's table file {self.path} has no table {table_id}",
                                 "the store is damaged: start over with 'hvkit memserver clear'")
        return self._tables[table_id]

    def append(self, table: np.ndarray) -> int:
        """Writes one table at the end; its id. Callers hold the store's lock."""
        data = np.ascontiguousarray(table, dtype=np.uint64).tobytes()
        assert len(data) == TABLE_BYTES
        end = os.lseek(self._fd, 0, os.SEEK_END)
        if end % TABLE_BYTES:
            raise HvkitError(f"the memory server's table file {self.path} is damaged (size {end})",
                             "start over with 'hvkit memserver clear'")
        os.pwrite(self._fd, data, end)
        return end // TABLE_BYTES


def resolve(tables: TableFile, root: int, levels: int, first: int, count: int) -> np.ndarray:
    """Entries (ZERO or FRAMES of one page each) of pages first .. first+count-1.

    Walks the table once per distinct table on the way (a read rarely crosses a leaf),
    and expands large entries with NumPy, so no Python loop runs per page."""
    out = np.zeros(count, dtype=np.uint64)
    _resolve_into(tables, table_entry(root), levels - 1, 0, first, count, out)
    return out


def _resolve_into(tables: TableFile, entry: int, level: int, base: int,
                  first: int, count: int, out: np.ndarray) -> None:
    """Fills out[] for the pages of [first, first+count) under `entry`, which maps pages
    base .. base + 512**(level+1) - 1."""
    kind = kind_of(entry)
    if kind == ZERO:
        return
    if kind == FRAMES:
        # a large entry one level up: consecutive frames from its first page
        start = entry + (first - base)
        out[:count] = np.arange(start, start + count, dtype=np.uint64)
        return
    table = tables.table(entry & ((1 << KIND_SHIFT) - 1))
    span = FANOUT ** level
    lo, hi = (first - base) // span, (first + count - 1 - base) // span
    if level == 0:
        out[:count] = table[lo:hi + 1]
        return
    for i in range(lo, hi + 1):
        sub_base = base + i * span
        a, b = max(first, sub_base), min(first + count, sub_base + span)
        _resolve_into(tables, int(table[i]), level - 1, sub_base, a, b - a, out[a - first:b - first])


@dataclass
class TableWriter:
    """Builds one new snapshot's table from its parent's: copy-on-write of tables.

    Tables this writer created are its own and change in memory until `seal`; any
    other table is shared with older snapshots and is replicated before it changes."""

    tables: TableFile
    levels: int
    root: np.ndarray  # the new snapshot's top-level table (a copy)
    own: dict[int, np.ndarray] = field(default_factory=dict)  # provisional id -> table
    tables_replicated: int = 0
    runs_split: int = 0
    _next: int = -1  # provisional ids are negative until sealed

    @classmethod
    def fork(cls, tables: TableFile, root_id: int, levels: int) -> "TableWriter":
        """A writer whose top level is a copy of table `root_id`: all a fork copies."""
        return cls(tables, levels, tables.table(root_id).copy())

    def _new(self, table: np.ndarray) -> int:
        tid = self._next
        self._next -= 1
        self.own[tid] = table
        return tid

    def _writable_child(self, parent: np.ndarray, index: int, level: int) -> np.ndarray:
        """The table under parent[index] (parent at `level`), made this writer's own."""
        entry = int(parent[index])
        kind = entry >> KIND_SHIFT
        if kind == TABLE and entry & (1 << 61):  # provisional id (negative, stored tagged)
            return self.own[-(entry & ((1 << 61) - 1))]
        span = FANOUT ** (level - 1)
        if kind == TABLE:
            table = self.tables.table(entry & ((1 << KIND_SHIFT) - 1)).copy()
            self.tables_replicated += 1
        elif kind == FRAMES:
            table = entry + np.arange(FANOUT, dtype=np.uint64) * np.uint64(span)
            self.runs_split += 1
        else:
            table = np.zeros(FANOUT, dtype=np.uint64)
        tid = self._new(table)
        parent[index] = (TABLE << KIND_SHIFT) | (1 << 61) | -tid
        return table

    def set_pages(self, pages: np.ndarray, entries: np.ndarray) -> None:
        """Points each of `pages` (sorted page numbers) at the matching entry (ZERO or
        a one-frame FRAMES entry). Python work is per leaf table, not per page."""
        if len(pages) == 0:
            return
        leaves = pages >> BITS
        bounds = np.flatnonzero(np.diff(leaves)) + 1
        starts = np.concatenate(([0], bounds))
        ends = np.concatenate((bounds, [len(pages)]))
        for s, e in zip(starts.tolist(), ends.tolist()):
            leaf_no = int(leaves[s])
            table = self.root
            for level in range(self.levels - 1, 0, -1):
                index = (leaf_no >> (BITS * (level - 1))) & (FANOUT - 1)
                table = self._writable_child(table, index, level)
            table[pages[s:e] & (FANOUT - 1)] = entries[s:e]

    def seal(self) -> tuple[int, int]:
        """Appends every table this writer owns, children first, rewriting provisional
        ids into real ones; (root table id, tables written)."""
        real: dict[int, int] = {}

        def write(table: np.ndarray, level: int) -> int:
            if level > 0:
                tagged = (table >> np.uint64(KIND_SHIFT) == TABLE) & ((table & np.uint64(1 << 61)) != 0)
                for i in np.flatnonzero(tagged).tolist():
                    tid = -(int(table[i]) & ((1 << 61) - 1))
                    if tid not in real:
                        real[tid] = write(self.own[tid], level - 1)
                    table[i] = table_entry(real[tid])
            return self.tables.append(table)

        root_id = write(self.root, self.levels - 1)
        return root_id, len(real) + 1
