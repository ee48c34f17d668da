"""Sharing a VM's free pages: pause, identify the free pages, punch holes for them,
resume (again, when the pause budget runs out first).

Safety comes first, because a page given back by mistake is guest data lost:
- the VM stays paused from identification to the last hole punched;
- only pages inside blocks on the buddy allocator's free lists are given back (not
  per-CPU lists, not pages whose state is in flux), and only when hvkit's count of them
  agrees with the guest kernel's own free-page counter;
- a guest that poisons free pages (it would find zeros where it expects its poison) is
  refused, and so is RAM that is not a shared file or that sits on huge pages;
- guest RAM is read with pread, and its host-held pages found with mincore over a
  mapping never touched: neither brings a given-back page back.
"""

from __future__ import annotations

import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.introspect import KernelSpace, PageClass, classify
from hvkit.introspect.source import KernelKnowledge, load_kernel_knowledge, open_guest
from hvkit.kernel.layout import Layout
from hvkit.qemu import VM

FREE_COUNT_SLACK = 0.02  # hvkit's free pages may exceed the kernel's counter by this share ...
FREE_COUNT_SLACK_PAGES = 4096  # ... plus this (per-CPU counter drift), and no more


class ShareRefused(HvkitError):
    """Sharing would not be safe for this VM; the message says why."""


SHARED_FILE_HINT = ("give it RAM in a shared file: 'hvkit vm start' does; plain QEMU: -object "
                    "memory-backend-file,id=pc.ram,size=SIZE,mem-path=/dev/shm/NAME,share=on -machine "
                    "memory-backend=pc.ram; libvirt: <memoryBacking><source type='file'/>"
                    "<access mode='shared'/></memoryBacking>")
MAX_PAUSE = 0.1  # seconds: default budget of one pause
MAX_CYCLES = 20  # pauses one Sharer.share may take to give everything back


@dataclass
class ShareResult:
    free_pages: int  # pages on the guest's free lists (at the first pause)
    backed_free_pages: int  # of those, pages the host held memory for
    runs: int  # coalesced runs of such pages
    given_pages: int  # pages whose holes were punched
    released_bytes: int  # host memory the RAM file lost (measured: its allocated blocks)
    host_before: int  # bytes of guest RAM the host held before
    host_after: int
    paused_s: float  # the longest pause
    pauses: int  # how many times the VM was paused
    seconds: float  # the whole of it, symbols and layout loading included
    dry_run: bool

    def to_json(self) -> dict:
        return asdict(self)


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


def check_vm_ram(vm: VM) -> None:
    """Refuses RAM that hvkit cannot give back safely: not a file, not shared with
    QEMU's mapping (QEMU is asked, not just hvkit's notes), or on huge pages."""
    if vm.spec.ram == "snapshot":
        raise ShareRefused(f"VM {vm.name!r} runs from memory-server snapshot {vm.spec.snapshot}: its RAM "
                           "is private to QEMU, not a shared file", "hvkit shares VMs started with 'hvkit vm start'")
    if vm.spec.ram != "file":
        # Linux lets no process drop another one's pages: process_madvise(2) takes only
        # MADV_COLD and MADV_PAGEOUT, which move pages to swap, not give them back
        raise ShareRefused(f"VM {vm.name!r} keeps its RAM inside QEMU (anonymous memory), which no other "
                           "process can give back", SHARED_FILE_HINT)
    if not vm.qmp("qom-get", {"path": f"/objects/{vm.spec.memdev}", "property": "share"}):
        raise ShareRefused(f"the RAM of VM {vm.name!r} is not mapped shared (share=off)",
                           "holes punched in the file would not reach the guest")
    fs = filesystem_of(vm.ram_path)
    if fs == "hugetlbfs":
        raise ShareRefused(f"the RAM of VM {vm.name!r} is on huge pages ({vm.ram_path})",
                           "a 2 MiB page cannot be given back for one free 4 KiB page")


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


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first pfn, length) of every run of True in `mask`."""
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    change = np.flatnonzero(np.diff(padded))
    starts, ends = change[0::2], change[1::2]
    return starts, ends - starts


class Sharer:
    """Shares one VM again and again (share --watch): its RAM is checked and its
    kernel's symbols and layout are loaded once, not at every pause (neither can change
    while the VM runs)."""

    def __init__(self, vm: VM, paths: Paths | None = None) -> None:
        self.vm = vm
        self.paths = paths or Paths.from_env()
        self.knowledge: KernelKnowledge | None = None
        self.checked_pid: int | None = None  # the QEMU whose RAM check_vm_ram accepted

    def share(self, dry_run: bool = False, max_pause: float = MAX_PAUSE) -> ShareResult:
        """Gives back the free pages of the guest, pausing it for at most about
        `max_pause` seconds at a time: when punching the holes would take longer, the VM
        runs again and the next pause identifies afresh and goes on. A VM that was
        already paused stays paused, and everything is done in that one pause."""
        t0 = time.monotonic()
        if self.knowledge is None:
            check_vm_ram(self.vm)
            self.checked_pid = self.vm.pid
            self.knowledge = load_kernel_knowledge(Path(self.vm.spec.kernel), None, self.paths)
        before = self.vm.host_memory()
        first: dict = {}
        given, pauses, longest = 0, 0, 0.0
        for _ in range(MAX_CYCLES):
            c = self._cycle(dry_run, max_pause)
            first = first or {"free_pages": c.free, "backed_free_pages": c.backed, "runs": c.runs}
            given += c.punched
            pauses += c.paused > 0
            longest = max(longest, c.paused)
            if dry_run or c.punched == c.backed:
                break
        after = self.vm.host_memory()
        return ShareResult(**first, given_pages=given, released_bytes=max(0, before - after), host_before=before,
                           host_after=after, paused_s=longest, pauses=pauses, seconds=time.monotonic() - t0,
                           dry_run=dry_run)

    def _cycle(self, dry_run: bool, max_pause: float) -> "_Cycle":
        """One pause: identify, give back until the pause budget runs out, resume."""
        with open_guest(self.vm.name, paths=self.paths, knowledge=self.knowledge, op="share") as guest:
            if guest.vm.pid != self.checked_pid:
                # another QEMU since the last check (a fork restarts its VM): check again,
                # now that the VM is held and cannot change under us
                check_vm_ram(guest.vm)
                self.checked_pid = guest.vm.pid
            free, release = free_pages_to_release(guest)
            starts, lengths = _runs(release)
            punched = 0
            if not dry_run and starts.size:
                # leave a tenth of the budget for resuming
                deadline = guest.paused_at + 0.9 * max_pause if guest.paused_at is not None else None
                punched = guest.memory.discard(starts, lengths, deadline)
        return _Cycle(int(free.sum()), int(release.sum()), int(starts.size), punched, guest.paused_for)


def free_pages_to_release(guest) -> tuple[np.ndarray, np.ndarray]:
    """(free, release): per page frame of `guest` (an open_guest Guest), whether it is on
    the guest's free lists, and whether it is free and the host holds memory for it.
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
    return free, free & guest.memory.backed(pm.pages)


def give_back_free_pages_of_file(ram: Path, kernel: Path, paths: Paths | None = None) -> tuple[int, int]:
    """Punches the free pages of a frozen guest RAM file (nothing runs from it
    directly: a memory-server snapshot) into holes; (free pages, pages given back)."""
    with open_guest(str(ram), kernel=kernel, paths=paths) as guest:
        free, release = free_pages_to_release(guest)
        starts, lengths = _runs(release)
        given = guest.memory.discard(starts, lengths) if starts.size else 0
    return int(free.sum()), int(given)


def share_once(vm: VM, paths: Paths | None = None, dry_run: bool = False,
               max_pause: float = MAX_PAUSE) -> ShareResult:
    """One `hvkit share` of a running hvkit VM (see Sharer.share)."""
    return Sharer(vm, paths).share(dry_run, max_pause)


@dataclass
class _Cycle:
    """What one pause found and did."""

    free: int  # pages on the free lists
    backed: int  # of those, pages the host held
    runs: int  # coalesced runs of those
    punched: int  # pages given back (fewer than `backed` when the pause budget ran out)
    paused: float  # seconds
