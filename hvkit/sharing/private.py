"""Guest RAM private to QEMU (a forked VM's private mapping of its memory-server snapshot,
anonymous RAM): which of its pages QEMU holds, and dropping them with an madvise run
inside QEMU (inject.py). No hole can be punched for them: no file holds them.

What a dropped page reads as depends on the mapping, and decides which guests may share:
- anonymous memory: zeros, as a hole of a RAM file;
- a private mapping of a file (the snapshot): *the file's page* again, not zeros. A guest
  kernel that counts on free pages being zero (init_on_free: it then skips zeroing
  __GFP_ZERO allocations) would get the snapshot's old data: such a guest is refused.
Only the pages QEMU holds privately are counted and dropped (present or swapped, not a
page of the file itself: those are the page cache's, shared with every other child).
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hvkit.introspect import KernelSpace
from hvkit.memory import PAGE_SIZE
from hvkit.memory.process import Mapping, ProcessMemory, process_mappings
from hvkit.sharing.freepages import ShareRefused, runs_of
from hvkit.sharing.inject import Injector, InjectionError, probe_trace, ptrace_scope

PRESENT, SWAPPED, FILE_OR_SHARED = 1 << 63, 1 << 62, 1 << 61  # bits of a /proc/<pid>/pagemap entry
PFN_MASK = (1 << 55) - 1
KPF_THP = 1 << 22  # /proc/kpageflags: part of a transparent huge page
HUGE_PAGES = 512  # 4 KiB pages per 2 MiB huge page
MADVISE_CHUNK = 64 << 20  # bytes per injected madvise at most: the deadline is checked between calls


def filesystem_of(path: Path) -> str:
    """The type of the file system holding `path` (from /proc/self/mountinfo)."""
    path = Path(path).resolve()
    best, fstype = -1, "unknown"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mount_point = left.split()[4].replace("\\040", " ")
        if (path == Path(mount_point) or Path(mount_point) in path.parents) and len(mount_point) > best:
            best, fstype = len(mount_point), right.split()[0]
    return fstype


def _own(entries: np.ndarray) -> np.ndarray:
    """Pagemap entries of pages the process holds itself: present or swapped, and not a
    page of the file it maps (the page cache's, shared with others)."""
    held = (entries & np.uint64(PRESENT | SWAPPED)) != 0
    return held & ((entries & np.uint64(FILE_OR_SHARED)) == 0)


def _is_huge(kpageflags: int, pfn: int) -> bool:
    """Is host page frame `pfn` part of a transparent huge page (/proc/kpageflags, root)?
    Unknown (no frame number: not root) counts as huge: then only whole blocks go."""
    if pfn == 0:
        return True
    raw = os.pread(kpageflags, 8, pfn * 8)
    return len(raw) < 8 or bool(struct.unpack("<Q", raw)[0] & KPF_THP)


def check_may_trace(name: str, pid: int | None) -> None:
    """Refuses at once, with what to do, where hvkit may not ptrace QEMU: Yama's scope
    read first, then an attach tried (and let go at once)."""
    scope = ptrace_scope()
    if scope == 3:
        raise ShareRefused(f"VM {name!r} keeps its RAM inside QEMU, and dropping it needs ptrace, which this "
                           "kernel forbids (kernel.yama.ptrace_scope=3, kept until reboot)",
                           "give it RAM in a shared file ('hvkit vm start' does)")
    if scope in (1, 2) and os.geteuid() != 0:
        raise ShareRefused(f"VM {name!r} keeps its RAM inside QEMU, and dropping it needs ptrace, which "
                           f"kernel.yama.ptrace_scope={scope} allows only to root", "run hvkit as root")
    if pid is not None:
        try:
            probe_trace(pid)
        except InjectionError as e:
            raise ShareRefused(f"VM {name!r} keeps its RAM inside QEMU, and dropping it needs ptrace: {e.message}",
                               e.hint) from None


def init_on_free(ks: KernelSpace) -> bool:
    """Does the guest kernel zero pages when it frees them (init_on_free=1)? The static
    key's count (an atomic_t, first in the struct) says so."""
    if "init_on_free" not in ks.symbols:
        return False
    return struct.unpack("<i", ks.read(ks.symbol_va("init_on_free"), 4))[0] > 0


@dataclass
class PrivateRam:
    """The mappings of guest RAM inside QEMU process `memory.pid` (one, or one per NUMA
    node's memory backend), for sharing."""

    memory: ProcessMemory
    mappings: list[Mapping]
    _entries: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # pagemap of the last `backed`
    _vpn: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    _release_sum: np.ndarray | None = None  # running count of the last `plan`'s release

    @classmethod
    def of(cls, memory: ProcessMemory) -> "PrivateRam":
        now = process_mappings(memory.pid)
        mappings = []
        for piece in memory.pieces:
            found = [m for m in now if m.start <= piece.offset and piece.offset + piece.size <= m.end]
            if not found:
                raise ShareRefused(f"QEMU process {memory.pid} no longer maps guest RAM at {piece.offset:#x}")
            mappings.append(found[0])
        ram = cls(memory, mappings)
        if (huge := ram.on_hugetlbfs()) is not None:
            raise ShareRefused(f"the RAM of QEMU process {memory.pid} is on huge pages ({huge})",
                               "a huge page cannot be given back for one free 4 KiB page")
        return ram

    @property
    def anonymous(self) -> bool:
        """Anonymous memory (a dropped page reads as zeros), not a private file mapping."""
        return all(m.path == "" for m in self.mappings)

    def on_hugetlbfs(self) -> str | None:
        """The first mapping that is hugetlbfs memory: anonymous (shown as
        /anon_hugepage) or a file on hugetlbfs (not /proc/<pid>/smaps: reading all of
        QEMU's would cost tens of ms of pause); None when there is none."""
        for m in self.mappings:
            if m.path.startswith("/anon_hugepage") or (m.path.startswith("/") and filesystem_of(m.path) == "hugetlbfs"):
                return m.path
        return None

    def check_guest(self, ks: KernelSpace) -> None:
        """Refuses a guest that would read a dropped page wrongly (see the module)."""
        files = [m.path for m in self.mappings if m.path]
        if files and init_on_free(ks):
            raise ShareRefused("the guest zeroes its free pages (init_on_free=1) and its RAM is a private "
                               f"mapping of {files[0]}: a dropped page would read as that file's "
                               "old page, not zeros", "boot it without init_on_free")

    def page_map(self, pages: int) -> tuple[np.ndarray, np.ndarray]:
        """Per page frame below `pages`: its /proc/<pid>/pagemap entry (0 where no RAM
        is) and its host-virtual page number in QEMU (-1 where no RAM is)."""
        entries = np.zeros(pages, np.uint64)
        vpn = np.full(pages, -1, np.int64)
        fd = os.open(f"/proc/{self.memory.pid}/pagemap", os.O_RDONLY)
        try:
            for r in self.memory.ranges:
                first, end = r.gpa // PAGE_SIZE, min(r.end // PAGE_SIZE, pages)
                if end <= first:
                    continue
                raw = os.pread(fd, (end - first) * 8, r.offset // PAGE_SIZE * 8)
                entry = np.frombuffer(raw, dtype="<u8")
                entries[first : first + entry.size] = entry
                vpn[first : first + entry.size] = r.offset // PAGE_SIZE + np.arange(entry.size)
        finally:
            os.close(fd)
        return entries, vpn

    def backed(self, pages: int) -> np.ndarray:
        """Per page frame below `pages`: does QEMU hold a page of its own for it (present
        or swapped, and not the file's page)? Pages of a transparent huge page count
        only where all of its pages QEMU holds can go (see `whole_huge_pages`)."""
        self._entries, self._vpn = self.page_map(pages)
        return _own(self._entries)

    def droppable(self, release: np.ndarray) -> np.ndarray:
        """`release` without the pages of transparent huge pages that would only be
        split, not freed: dropping part of a huge page unmaps it, but the kernel frees
        its memory only when it splits the page later, under memory pressure (so the
        host would gain nothing now). A 2 MiB block QEMU holds as a huge page goes as a
        whole, when every page of it that QEMU holds is free, or not at all."""
        if not self.anonymous:
            return release  # a private file mapping: the pages QEMU writes are small ones
        entries, vpn = self._entries[: release.size], self._vpn[: release.size]
        held = _own(entries)
        release = release & held
        block = np.where(vpn >= 0, vpn // HUGE_PAGES, -1)
        partial = np.unique(block[release])
        partial = partial[partial >= 0]
        out = release.copy()
        with open("/proc/kpageflags", "rb", buffering=0) as flags:
            for b in partial.tolist():
                pages = np.flatnonzero(block == b)
                if (release[pages] == held[pages]).all():
                    continue  # all of it goes: a huge page there is freed whole
                present = pages[(entries[pages] & np.uint64(PRESENT)) != 0]
                if present.size and _is_huge(flags.fileno(), int(entries[present[0]]) & PFN_MASK):
                    out[pages] = False
        return out

    def plan(self, release: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The runs to drop for the pages of `release` (after `backed`): runs of free pages
        joined across pages QEMU holds nothing of its own for (none: nothing to drop; a
        page of the file: unmapped, it reads as the same file page again), so one call
        covers what would take many: each call costs QEMU's thread two ptrace stops. A
        run starts and ends on a page of `release`; `discard` then counts only those."""
        pages = np.flatnonzero(release)
        self._release_sum = np.concatenate(([0], np.cumsum(release, dtype=np.int64)))
        if not pages.size:
            return pages, pages
        starts, lengths = runs_of(release | ~_own(self._entries[: release.size]))
        firsts = pages[np.minimum(np.searchsorted(pages, starts), pages.size - 1)]
        lasts = pages[np.maximum(np.searchsorted(pages, starts + lengths) - 1, 0)]
        keep = (firsts >= starts) & (firsts < starts + lengths)
        return firsts[keep], (lasts - firsts + 1)[keep]

    def host_ranges(self, pfns: np.ndarray, counts: np.ndarray) -> list[tuple[int, int]]:
        """(host address, bytes) in QEMU of the page runs [pfns[i], pfns[i] + counts[i]),
        split where guest RAM is split, in pieces of at most MADVISE_CHUNK."""
        out = []
        for r in self.memory.ranges:
            first, end = r.gpa // PAGE_SIZE, r.end // PAGE_SIZE
            lo, hi = np.maximum(pfns, first), np.minimum(pfns + counts, end)
            keep = hi > lo
            addresses = (lo[keep] - first) * PAGE_SIZE + r.offset
            for address, length in zip(addresses.tolist(), ((hi[keep] - lo[keep]) * PAGE_SIZE).tolist()):
                out += [(at, min(MADVISE_CHUNK, address + length - at))
                        for at in range(address, address + length, MADVISE_CHUNK)]
        return out

    def discard(self, pfns: np.ndarray, counts: np.ndarray, deadline: float | None = None) -> int:
        """Drops QEMU's pages of the runs (as RamFileMemory.discard punches holes): one
        madvise per run injected into QEMU's main thread, none once time.monotonic()
        passes `deadline`. Returns the pages dropped."""
        ranges = self.host_ranges(pfns, counts)
        if not ranges:
            return 0
        done = 0
        with Injector(self.memory.pid) as injector:
            injector.seize(deadline)
            for address, length in ranges:
                if deadline is not None and time.monotonic() > deadline:
                    break
                result = injector.madvise(address, length)
                if result != 0:
                    raise InjectionError(f"madvise inside QEMU process {self.memory.pid} failed: "
                                         f"{os.strerror(-result)}")
                done += self._counted(address, length)
        return done

    def _counted(self, address: int, length: int) -> int:
        """Pages of the last `plan`'s release among those of a host range dropped (all of
        them when there was no plan)."""
        if self._release_sum is None:
            return length // PAGE_SIZE
        for r in self.memory.ranges:
            if r.offset <= address < r.offset + r.size:
                first = r.gpa // PAGE_SIZE + (address - r.offset) // PAGE_SIZE
                end = min(first + length // PAGE_SIZE, self._release_sum.size - 1)
                return int(self._release_sum[end] - self._release_sum[first])
        return 0
