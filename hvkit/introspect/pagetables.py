"""x86-64 page tables, read from guest-physical memory: 4 or 5 levels, 1 GiB and 2 MiB
pages. Every table address comes from the guest, so each is checked before it is read,
and walks over a whole address space are bounded in tables read, memory and time.

The bounds come from the memory being read, not from any guest seen before: a guest
cannot hold more page tables than it has pages, nor map frames it does not have. So the
walks of one reading share a budget of one table per page of RAM and a deadline that
grows with RAM; a large page is one run of frames, never its 262,144 frames; and what a
walk keeps is a few arrays of at most about one item per page frame, whatever the
tables repeat. Entries that point outside RAM are counted and skipped."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from hvkit.memory import PAGE_SIZE, GuestAddressError, GuestMemory

PRESENT = 1
LARGE = 1 << 7  # PS: a 1 GiB (level 3) or 2 MiB (level 2) page
ADDR_MASK = 0x000F_FFFF_FFFF_F000
ENTRIES = 512
CHUNK = 256  # tables read and decoded at once (1 MiB of entries)
TABLES_PER_PAGE = 1  # page tables all walks of one reading may read, per page of guest RAM
SECONDS = 2.0  # time all walks of one reading may take: this much ...
SECONDS_PER_GIB = 2.0  # ... plus this per GiB of guest RAM


def _index(va: int, level: int) -> int:
    return (va >> (12 + 9 * (level - 1))) & 0x1FF


def lookup(mem: GuestMemory, top: int, va: int, levels: int = 4) -> tuple[int | None, int]:
    """(guest-physical address of `va` under the page tables at `top`, or None when it is
    not mapped; bytes from `va` to the end of that page or unmapped region), so a caller
    walking a virtual range can step over a whole 2 MiB page or an absent 1 GiB at once."""
    table = top
    for level in range(levels, 0, -1):
        span = 1 << (12 + 9 * (level - 1))  # bytes one entry of this level covers
        rest = span - (va & (span - 1))
        if not mem.contains(table, PAGE_SIZE):
            raise GuestAddressError(f"page table at {table:#x} (level {level}) is outside RAM")
        entry = mem.read_u64(table + 8 * _index(va, level))
        if not entry & PRESENT:
            return None, rest
        if level == 1 or (level in (2, 3) and entry & LARGE):
            return (entry & ADDR_MASK & ~(span - 1)) | (va & (span - 1)), rest
        table = entry & ADDR_MASK
    raise AssertionError("unreachable")


def translate(mem: GuestMemory, top: int, va: int, levels: int = 4) -> int:
    """Guest-physical address of `va` under the page tables at `top`."""
    pa, _ = lookup(mem, top, va, levels)
    if pa is None:
        raise GuestAddressError(f"address {va:#x} is not mapped")
    return pa


# -- walking a whole address space ------------------------------------------------------

@dataclass
class WalkBudget:
    """What the walks of one reading (every process of a guest) may still spend. Shared,
    so a thousand processes pointing at the same hostile tables cost one budget."""

    tables: int  # page tables that may still be read
    deadline: float  # time.monotonic() after which no more are read
    granted: int = 0  # tables at the start (for messages)
    seconds: float = 0.0  # time granted at the start (for messages)

    @classmethod
    def for_memory(cls, mem: GuestMemory, seconds: float | None = None) -> "WalkBudget":
        """The budget for walks over `mem`: TABLES_PER_PAGE tables per page of RAM, and
        SECONDS plus SECONDS_PER_GIB per GiB of it."""
        tables = max(1, TABLES_PER_PAGE * mem.size // PAGE_SIZE)
        if seconds is None:
            seconds = SECONDS + SECONDS_PER_GIB * mem.size / (1 << 30)
        return cls(tables, time.monotonic() + seconds, tables, seconds)

    def why_spent(self) -> str | None:
        """Why no more tables may be read (None while they may)."""
        if self.tables <= 0:
            return (f"the budget of {self.granted} page tables for {self.granted // TABLES_PER_PAGE} "
                    "pages of RAM is spent")
        if time.monotonic() > self.deadline:
            return f"the time limit of {self.seconds:.1f} s is reached"
        return None


@dataclass
class MappedPages:
    """What a walk over one address space found."""

    frames: np.ndarray  # sorted page frame numbers (in RAM) that present entries map
    tables: int  # page tables read
    wild: int  # entries that point to a table outside RAM (not followed)
    stopped: str | None = None  # why the walk stopped before the end (a bound), None if it did not


def _in_ram(mem: GuestMemory, addrs: np.ndarray) -> np.ndarray:
    """Mask of the page-aligned addresses whose whole page is RAM."""
    ok = np.zeros(addrs.size, bool)
    for r in mem.ranges:
        ok |= (addrs >= np.uint64(r.gpa)) & (addrs + np.uint64(PAGE_SIZE) <= np.uint64(r.end))
    return ok


def _read_tables(mem: GuestMemory, tables: np.ndarray) -> np.ndarray:
    """The 512 entries of each table (all in RAM), as one (tables, 512) array."""
    out = np.empty((tables.size, ENTRIES), "<u8")
    view = memoryview(out).cast("B")
    for i, table in enumerate(tables.tolist()):
        mem.read_into(table, view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
    return out


class _Pending:
    """Arrays gathered chunk by chunk and merged (`merge`: e.g. unique) whenever they hold
    more than `limit` items, so that chunks repeating the same few values never pile
    up: memory stays proportional to what the guest has, not to what its tables repeat."""

    def __init__(self, limit: int, merge: Callable[..., tuple[np.ndarray, ...]]) -> None:
        self.limit, self.merge = limit, merge
        self.parts: list[tuple[np.ndarray, ...]] = []
        self.count = 0
        self.clean = True  # parts is one merged tuple (or empty)

    def add(self, *arrays: np.ndarray) -> None:
        if arrays[0].size:
            self.parts.append(arrays)
            self.count += arrays[0].size
            self.clean = False
            if self.count > self.limit:
                self.merged()

    def merged(self) -> tuple[np.ndarray, ...] | None:
        """Everything added, merged; None when nothing was."""
        if not self.clean:
            self.parts = [self.merge(*(np.concatenate(column) for column in zip(*self.parts)))]
            self.count, self.clean = self.parts[0][0].size, True
        return self.parts[0] if self.parts else None


def _unique(values: np.ndarray) -> tuple[np.ndarray]:
    """Sorted distinct values. By sorting: NumPy's np.unique hashes, which is several
    times slower on the 100,000s of random table addresses a hostile table level gives."""
    values = np.sort(values)
    keep = np.ones(values.size, bool)
    keep[1:] = values[1:] != values[:-1]
    return (values[keep],)


def _coalesce(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs [starts, ends) merged where they overlap or touch: sorted and disjoint, so
    they never hold more than the frames they cover."""
    if starts.size == 0:
        return starts, ends
    order = np.argsort(starts, kind="stable")
    s, reach = starts[order], np.maximum.accumulate(ends[order])
    new = np.ones(s.size, bool)
    new[1:] = s[1:] > reach[:-1]
    last = np.append(np.flatnonzero(new)[1:] - 1, s.size - 1)
    return s[new], reach[last]


def _expand(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Every frame of disjoint sorted runs, in order."""
    lengths = ends - starts
    if lengths.size == 0:
        return np.empty(0, np.int64)
    before = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    return np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - before, lengths)


def _decode(entries: np.ndarray, level: int, n: int, runs: _Pending) -> np.ndarray:
    """Adds the frames the present entries of tables at `level` map (below `n`) to `runs`,
    as runs: a 1 GiB page costs one run, never 262,144 frames. Returns the addresses of
    the tables they point to one level down."""
    entries = entries[(entries & np.uint64(PRESENT)) != 0]
    span = 1 << (9 * (level - 1))  # frames one entry covers
    if level == 1:
        leaf, down = entries & np.uint64(ADDR_MASK), np.empty(0, np.uint64)
    elif level in (2, 3):
        large = (entries & np.uint64(LARGE)) != 0
        leaf = entries[large] & np.uint64(ADDR_MASK & ~(span * PAGE_SIZE - 1))  # bit 12 is PAT here
        down = entries[~large] & np.uint64(ADDR_MASK)
    else:
        leaf, down = np.empty(0, np.uint64), entries & np.uint64(ADDR_MASK)
    first = leaf >> np.uint64(12)
    first = first[first < np.uint64(n)].astype(np.int64)  # frames outside RAM: left out
    if first.size:
        runs.add(first, np.minimum(first + span, n))
    return down


def walk_pages(mem: GuestMemory, top: int, levels: int = 4, user_only: bool = True,
               budget: WalkBudget | None = None, max_pfn: int | None = None) -> MappedPages:
    """Every present 4 KiB page frame below `max_pfn` (default: the end of RAM) that the
    tables at `top` map, large pages as their 4 KiB frames; the user half only by default.
    The walk goes level by level; a table reached twice in one level is read once. Tables
    outside RAM are counted, not followed. When `budget` is spent the walk stops and says
    why, keeping what it found. Memory: a few arrays of at most one item per page frame."""
    if top % PAGE_SIZE:
        raise GuestAddressError(f"page table at {top:#x} is not page aligned")
    if not mem.contains(top, PAGE_SIZE):
        raise GuestAddressError(f"page table at {top:#x} is outside RAM")
    budget = budget or WalkBudget.for_memory(mem)
    n = mem.max_pfn if max_pfn is None else min(max_pfn, mem.max_pfn)
    limit = max(mem.size // PAGE_SIZE, CHUNK * ENTRIES)
    runs = _Pending(limit, _coalesce)
    tables, read, wild, stopped = np.array([top], np.uint64), 0, 0, None
    for level in range(levels, 0, -1):
        below = _Pending(limit, _unique)
        for start in range(0, tables.size, CHUNK):
            stopped = budget.why_spent()
            if stopped:
                break
            chunk = tables[start : start + min(CHUNK, budget.tables)]
            budget.tables -= chunk.size
            read += chunk.size
            entries = _read_tables(mem, chunk)
            if level == levels and user_only:
                entries = entries[:, : ENTRIES // 2]
            down = _decode(entries.ravel(), level, n, runs)
            ok = _in_ram(mem, down)
            wild += int(down.size - np.count_nonzero(ok))
            below.add(*_unique(down[ok]))
        merged = below.merged()
        if stopped or merged is None:
            break
        tables = merged[0]
    found = runs.merged()
    return MappedPages(_expand(*found) if found else np.empty(0, np.int64), read, wild, stopped)


def mapped_pages(mem: GuestMemory, top: int, levels: int = 4, user_only: bool = True) -> np.ndarray:
    """Page frame numbers of every present 4 KiB page mapped by the tables at `top`
    (large pages count as their 4 KiB frames); the user half only by default.
    Frames outside RAM are left out, and so is every table outside RAM; a walk that
    reaches the bounds of this memory returns what it found until then."""
    return walk_pages(mem, top, levels, user_only).frames
