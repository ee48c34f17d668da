"""One share cycle: pause, identify the free pages, punch holes for them, resume.

Safety comes first, because a page given back by mistake is guest data lost:
- the VM stays paused from identification to the last hole punched;
- only pages inside blocks on the buddy allocator's free lists are given back (not
  per-CPU lists, not pages whose state is in flux), and only when hvkit's count of them
  agrees with the guest kernel's own free-page counter;
- a guest that poisons free pages (it would find zeros where it expects its poison) is
  refused, and so is RAM that is not a shared file or that sits on huge pages;
- guest RAM is read with pread only, so reading never brings a given-back page back.
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
from hvkit.introspect.source import open_guest
from hvkit.kernel.layout import Layout
from hvkit.memory import PAGE_SIZE, GuestMemory
from hvkit.qemu import VM

FREE_COUNT_SLACK = 0.02  # hvkit's free pages may exceed the kernel's counter by this share ...
FREE_COUNT_SLACK_PAGES = 4096  # ... plus this (per-CPU counter drift), and no more


class ShareRefused(HvkitError):
    """Sharing would not be safe for this VM; the message says why."""


@dataclass
class ShareResult:
    free_pages: int  # pages on the guest's free lists
    backed_free_pages: int  # of those, pages the host held memory for
    runs: int  # holes punched (coalesced runs of free pages)
    released_bytes: int  # host memory the RAM file lost (measured: its allocated blocks)
    host_before: int  # bytes of guest RAM the host held before
    host_after: int
    paused_s: float  # how long the VM was paused
    seconds: float  # the whole cycle, symbols and layout loading included
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
    if vm.spec.ram != "file":
        raise ShareRefused(f"VM {vm.name!r} keeps its RAM inside QEMU, not in a shared file",
                           "only VMs started with the default RAM (a share=on file) can share")
    if not vm.qmp("qom-get", {"path": "/objects/ram0", "property": "share"}):
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


def backed_mask(mem: GuestMemory, pages: int) -> np.ndarray:
    """Per page frame: does the host hold memory for it (is it data, not a hole, in
    the backing file)? Found with SEEK_DATA/SEEK_HOLE, reading nothing."""
    edges = np.zeros(pages + 1, np.int64)
    for gpa, size in mem.data_extents():
        first = min(gpa // PAGE_SIZE, pages)
        last = min(-(-(gpa + size) // PAGE_SIZE), pages)
        edges[first] += 1
        edges[last] -= 1
    return np.cumsum(edges[:pages]) > 0


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first pfn, length) of every run of True in `mask`."""
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    change = np.flatnonzero(np.diff(padded))
    starts, ends = change[0::2], change[1::2]
    return starts, ends - starts


def share_once(vm: VM, paths: Paths | None = None, dry_run: bool = False) -> ShareResult:
    """One share cycle on a running (or paused: it stays paused) hvkit VM."""
    t0 = time.monotonic()
    check_vm_ram(vm)
    before = vm.host_memory()
    with open_guest(vm.name, paths=paths) as guest:
        ks, layout = guest.kernel, guest.layout
        check_guest(ks, layout)
        pm = classify(ks, layout)
        free = pm.classes == PageClass.FREE
        counted = kernel_free_pages(ks, layout)
        if free.sum() > counted * (1 + FREE_COUNT_SLACK) + FREE_COUNT_SLACK_PAGES:
            raise ShareRefused(f"hvkit finds {int(free.sum())} free pages but the guest kernel counts "
                               f"{counted}; nothing was given back",
                               "the guest's memory is inconsistent (or lies)")
        release = free & backed_mask(guest.memory, pm.pages)
        starts, lengths = _runs(release)
        if not dry_run and starts.size:
            guest.memory.discard(starts, lengths)
    after = vm.host_memory()
    return ShareResult(free_pages=int(free.sum()), backed_free_pages=int(release.sum()), runs=int(starts.size),
                       released_bytes=max(0, before - after), host_before=before, host_after=after,
                       paused_s=guest.paused_for, seconds=time.monotonic() - t0, dry_run=dry_run)
