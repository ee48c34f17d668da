"""x86-64 page tables, read from guest-physical memory: 4 or 5 levels, 1 GiB and 2 MiB
pages. Every table address comes from the guest, so each is checked before it is read,
and walks over a whole address space are bounded."""

from __future__ import annotations

import numpy as np

from hvkit.memory import GuestAddressError, GuestMemory

PRESENT = 1
LARGE = 1 << 7  # PS: a 1 GiB (level 3) or 2 MiB (level 2) page
ADDR_MASK = 0x000F_FFFF_FFFF_F000
MAX_TABLES = 1 << 18  # a walk reads at most this many tables (1 GiB of them)


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
        if not mem.contains(table, 4096):
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


def mapped_pages(mem: GuestMemory, top: int, levels: int = 4, user_only: bool = True) -> np.ndarray:
    """Page frame numbers of every present 4 KiB page mapped by the tables at `top`
    (large pages count as their 4 KiB frames); the user half only by default.
    Frames outside RAM are left out, and so is every table outside RAM."""
    frames: list[np.ndarray] = []
    budget = [MAX_TABLES]

    def walk(table: int, level: int, limit: int) -> None:
        if budget[0] <= 0 or not mem.contains(table, 4096):
            return
        budget[0] -= 1
        entries = mem.read_array(table, 512, "<u8")[:limit]
        present = entries[(entries & PRESENT) != 0]
        if level == 1:
            frames.append(((present & ADDR_MASK) >> 12).astype(np.int64))
            return
        large = (present & LARGE) != 0 if level in (2, 3) else np.zeros(present.size, bool)
        for entry in present[large]:
            first = (int(entry) & ADDR_MASK) >> 12
            frames.append(np.arange(first, first + (1 << (9 * (level - 1))), dtype=np.int64))
        for entry in present[~large]:
            walk(int(entry) & ADDR_MASK, level - 1, 512)

    walk(top, levels, 256 if user_only else 512)
    if not frames:
        return np.empty(0, np.int64)
    pfns = np.unique(np.concatenate(frames))
    return pfns[pfns < mem.max_pfn]
