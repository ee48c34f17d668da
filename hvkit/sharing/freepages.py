"""The guest's free pages, found from outside it and given back to the host: the one
piece of code that decides which pages of a guest may become holes, used by `hvkit
share` (a running VM, paused meanwhile: sharer.py) and by `hvkit fork` (a frozen RAM
file that nothing maps shared any more).

Only pages inside blocks on the buddy allocator's free lists are given back (not per-CPU
lists, not pages whose state is in flux), and only when hvkit's count of them agrees
with the guest kernel's own free-page counter; a guest that poisons free pages is
refused (it would find zeros where it expects its poison).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.introspect import KernelSpace, PageClass, classify
from hvkit.introspect.source import open_guest
from hvkit.kernel.layout import Layout

FREE_COUNT_SLACK = 0.02  # hvkit's free pages may exceed the kernel's counter by this share ...
FREE_COUNT_SLACK_PAGES = 4096  # ... plus this (per-CPU counter drift), and no more


class ShareRefused(HvkitError):
    """Sharing would not be safe for this VM; the message says why."""


def check_guest(ks: KernelSpace, layout: Layout) -> None:
    """Refuses a guest that poisons free pages: it checks the poison when it allocates
    a page again, and a given-back page reads as zeros. (init_on_free zeroes free pages:
    that matches a hole, so it is fine.)"""
    if "_page_poisoning_enabled" in ks.symbols:
        enabled = struct.unpack("<i", ks.read(ks.symbol_va("_page_poisoning_enabled"), 4))[0]
        if enabled > 0:
            raise ShareRefused("the guest poisons its free pages (page_poison=1)",
                               "boot it without page_poison; a page given back would fail its poison check")


def kernel_free_pages(ks: KernelSpace, layout: Layout) -> int:
    """The guest kernel's own count of free pages (vm_zone_stat[NR_FREE_PAGES])."""
    return ks.read_u64(ks.symbol_va("vm_zone_stat") + 8 * layout.const("NR_FREE_PAGES"))


def runs_of(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first pfn, length) of every run of True in `mask`."""
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    change = np.flatnonzero(np.diff(padded))
    starts, ends = change[0::2], change[1::2]
    return starts, ends - starts


def free_pages_to_release(guest, ram=None) -> tuple[np.ndarray, np.ndarray]:
    """(free, release): per page frame of `guest` (an open_guest Guest), whether it is on
    the guest's free lists, and whether it is free and the host holds memory for it (as
    `ram.backed` says: the guest's memory, or private.PrivateRam for RAM inside QEMU).
    Refuses a guest that poisons free pages or whose free count disagrees with hvkit's."""
    ks, layout = guest.kernel, guest.layout
    check_guest(ks, layout)
    pm = classify(ks, layout)
    free = pm.classes == PageClass.FREE
    counted = kernel_free_pages(ks, layout)
    if free.sum() > counted * (1 + FREE_COUNT_SLACK) + FREE_COUNT_SLACK_PAGES:
        raise ShareRefused(f"hvkit finds {int(free.sum())} free pages but the guest kernel counts "
                           f"{counted}; nothing was given back",
                           "the guest's memory is inconsistent (or lies)")
    return free, free & (ram or guest.memory).backed(pm.pages)


def give_back_free_pages_of_file(ram: Path, kernel: Path, paths: Paths | None = None) -> tuple[int, int]:
    """Punches the free pages of a frozen guest RAM file (nothing runs from it
    directly: a memory-server snapshot) into holes; (free pages, pages given back)."""
    with open_guest(str(ram), kernel=kernel, paths=paths) as guest:
        free, release = free_pages_to_release(guest)
        starts, lengths = runs_of(release)
        given = guest.memory.discard(starts, lengths) if starts.size else 0
    return int(free.sum()), int(given)
