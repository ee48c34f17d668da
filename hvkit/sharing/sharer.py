"""Sharing a VM's free pages: pause, identify the free pages, punch holes for them,
resume (again, when the pause budget runs out first).

Safety comes first, because a page given back by mistake is guest data lost:
- the VM stays paused from identification to the last hole punched;
- which pages may go is decided in one place (freepages.py, which `hvkit fork` uses
  too): blocks on the buddy allocator's free lists, when hvkit's count agrees with the
  guest kernel's own, in a guest that does not poison free pages;
- RAM that sits on huge pages, or a file QEMU does not map shared, is refused;
- RAM private to QEMU (a forked VM, anonymous RAM) has no file to punch: its pages are
  dropped by an madvise run inside QEMU (private.py, inject.py), in the same pause;
- guest RAM is read with pread, and its host-held pages found with mincore over a
  mapping never touched (pagemap for RAM inside QEMU): neither brings a given-back page
  back.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hvkit.config import Paths
from hvkit.introspect.source import KernelKnowledge, load_kernel_knowledge, open_guest
from hvkit.memory.process import ProcessMemory
from hvkit.qemu import VM
from hvkit.sharing.freepages import ShareRefused, free_pages_to_release, runs_of
from hvkit.sharing.private import PrivateRam, check_may_trace, filesystem_of

SHARED_FILE_HINT = ("give it RAM in a shared file: 'hvkit vm start' does; plain QEMU: -object "
                    "memory-backend-file,id=pc.ram,size=SIZE,mem-path=/dev/shm/NAME,share=on -machine "
                    "memory-backend=pc.ram; libvirt: <memoryBacking><source type='file'/>"
                    "<access mode='shared'/></memoryBacking>")
PRIVATE_RAM = ("snapshot", "anonymous")  # RAM inside QEMU: dropped with an madvise injected into it
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
    # each pause of this share: seconds paused, pages punched, seconds of punching (the
    # rest of a pause is fixed cost: stop, identify, resume); a caller sizes batches by them
    pause_log: list[tuple[float, int, float]] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def check_vm_ram(vm: VM) -> None:
    """Refuses RAM that hvkit cannot give back safely: a shared file that QEMU does not
    map shared (QEMU is asked, not just hvkit's notes) or on huge pages; RAM inside
    QEMU (a forked VM's snapshot, anonymous memory) where this user may not ptrace it
    (private.py checks its mapping once the VM is paused)."""
    if vm.spec.ram in PRIVATE_RAM:
        check_may_trace(vm.name, vm.pid)
        return
    if vm.spec.ram != "file":
        raise ShareRefused(f"VM {vm.name!r} has RAM of a kind hvkit does not know ({vm.spec.ram!r})",
                           SHARED_FILE_HINT)
    for backend, path in zip(vm.ram_backends(), vm.ram_files()):  # (one per node of a NUMA VM)
        if not vm.qmp("qom-get", {"path": f"/objects/{backend.memdev}", "property": "share"}):
            raise ShareRefused(f"the RAM of VM {vm.name!r} is not mapped shared (share=off)",
                               "holes punched in the file would not reach the guest")
        if filesystem_of(Path(path)) == "hugetlbfs":
            raise ShareRefused(f"the RAM of VM {vm.name!r} is on huge pages ({path})",
                               "a 2 MiB page cannot be given back for one free 4 KiB page")


class Sharer:
    """Shares one VM again and again (share --watch): its RAM is checked and its
    kernel's symbols and layout are loaded once, not at every pause (neither can change
    while the VM runs)."""

    def __init__(self, vm: VM, paths: Paths | None = None) -> None:
        self.vm = vm
        self.paths = paths or Paths.from_env()
        self.knowledge: KernelKnowledge | None = None
        self.checked_pid: int | None = None  # the QEMU whose RAM check_vm_ram accepted

    def share(self, dry_run: bool = False, max_pause: float = MAX_PAUSE, batch: int | None = None,
              keep: int = 0, max_pauses: int = MAX_CYCLES) -> ShareResult:
        """Gives back the free pages of the guest, pausing it for at most about
        `max_pause` seconds at a time: when punching the holes would take longer, the VM
        runs again and the next pause identifies afresh and goes on. A VM that was
        already paused stays paused, and everything is done in that one pause.
        A caller that knows more (the host service) may also cap the pages one pause
        punches (`batch`), leave `keep` free pages with host memory to the guest (so it
        has warm memory at hand), and take fewer pauses (`max_pauses`)."""
        t0 = time.monotonic()
        if self.knowledge is None:
            check_vm_ram(self.vm)
            self.checked_pid = self.vm.pid
            self.knowledge = load_kernel_knowledge(Path(self.vm.spec.kernel), None, self.paths)
        self.vm.reload_spec()  # a fork restarts its VM in a new QEMU, its RAM then private
        before = self.vm.host_memory()
        first: dict = {}
        given, pauses, longest = 0, 0, 0.0
        log: list[tuple[float, int, float]] = []
        for _ in range(max_pauses):
            c = self._cycle(dry_run, max_pause, batch, keep)
            first = first or {"free_pages": c.free, "backed_free_pages": c.backed, "runs": c.runs}
            given += c.punched
            pauses += c.paused > 0
            longest = max(longest, c.paused)
            if c.paused > 0:
                log.append((c.paused, c.punched, c.punch_s))
            if dry_run or c.punched == c.wanted:
                break
        after = self.vm.host_memory()
        return ShareResult(**first, given_pages=given, released_bytes=max(0, before - after), host_before=before,
                           host_after=after, paused_s=longest, pauses=pauses, seconds=time.monotonic() - t0,
                           dry_run=dry_run, pause_log=log)

    def _cycle(self, dry_run: bool, max_pause: float, batch: int | None = None, keep: int = 0) -> "_Cycle":
        """One pause: identify, give back until the pause budget (or `batch`) runs out, resume."""
        with open_guest(self.vm.name, paths=self.paths, knowledge=self.knowledge, op="share") as guest:
            if guest.vm.pid != self.checked_pid:
                # another QEMU since the last check (a fork restarts its VM): check again,
                # now that the VM is held and cannot change under us
                check_vm_ram(guest.vm)
                self.checked_pid = guest.vm.pid
            ram = guest.memory
            if isinstance(guest.memory, ProcessMemory):  # RAM inside QEMU: its mapping decides
                ram = PrivateRam.of(guest.memory)
                ram.check_guest(guest.kernel)
            free, release = free_pages_to_release(guest, ram)
            if isinstance(ram, PrivateRam):
                release = ram.droppable(release)
                starts, lengths = ram.plan(release)
            else:
                starts, lengths = runs_of(release)
            backed, runs = int(release.sum()), int(starts.size)
            wanted = max(0, backed - keep)
            starts, lengths = first_pages(starts, lengths, wanted if batch is None else min(wanted, batch))
            punched, punch_s = 0, 0.0
            if not dry_run and starts.size:
                # leave a tenth of the budget for resuming
                deadline = guest.paused_at + 0.9 * max_pause if guest.paused_at is not None else None
                t_punch = time.monotonic()
                punched = ram.discard(starts, lengths, deadline)
                punch_s = time.monotonic() - t_punch
        # the pause as the guest had it: from QEMU's answer to `stop` until its answer to
        # `cont` (guest.paused_for ends before resuming, which takes QMP round trips)
        paused = time.monotonic() - guest.paused_at if guest.paused_at is not None else 0.0
        return _Cycle(int(free.sum()), backed, runs, punched, paused, wanted, punch_s)


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
    wanted: int = 0  # pages this share means to give back (`backed` less what is kept)
    punch_s: float = 0.0  # seconds of the pause spent punching


def first_pages(starts: np.ndarray, lengths: np.ndarray, pages: int) -> tuple[np.ndarray, np.ndarray]:
    """The runs (starts, lengths) cut to their first `pages` pages in all."""
    ends = np.cumsum(lengths)
    n = int(np.searchsorted(ends, pages, side="left"))  # runs wholly inside, then the one cut
    if n >= lengths.size:
        return starts, lengths
    cut_lengths = lengths[: n + 1].copy()
    cut_lengths[n] -= int(ends[n]) - pages
    keep = cut_lengths > 0
    return starts[: n + 1][keep], cut_lengths[keep]
