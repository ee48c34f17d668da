"""`hvkit share --all --watch`: the host service that gives back the free pages of every
VM hvkit knows in one runtime folder (started, forked, attached), for as long as it runs.

It is built on sharer.py's Sharer, one per VM, and adds what a host needs:
- VMs come and go: the list is read again every round (`list_vms`); a new VM is picked
  up, one that is gone or died is dropped with one log line, never a traceback;
- one owner per VM, as for every hvkit command: a VM another command holds is skipped
  this round (its lock is tried, never waited for);
- a refusal (RAM sharing cannot give back safely) is logged once and that QEMU is left
  alone; a new QEMU under the same name (a fork restarts its VM) is tried again;
- a pause budget that holds under load: each VM's pauses are measured (fixed cost of
  stop + identify + resume, and pages punched per second), and the next pause punches
  only as many pages as the worst recent fixed cost leaves room for in the budget (the
  budget is a limit, not a target: batches aim at BUDGET_SHARE of it). A VM with work
  left is shared again soon, after a gap a few times its pause (so it runs most of the
  time). Before pausing a VM whose RAM is a file, a preview reads it as it runs (one
  QMP round trip and an identification of the running guest, which cost what the pause
  would): when that cost alone would overrun the budget (a host loaded far past its
  cores), or there is nothing to give back, the VM is not paused this round;
- policy: the interval; only while the host's MemAvailable is below a threshold; free
  memory left to each guest;
- SIGTERM and SIGINT end it between two pauses (a pause defers them: no VM is ever
  left paused), with a summary line.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from hvkit.config import Paths
from hvkit.errors import HvkitError, VMDied, VMNotFound
from hvkit.introspect.source import KernelKnowledge, load_kernel_knowledge, open_guest
from hvkit.qemu import VM, find_vm, list_vms
from hvkit.qemu.listing import VMStatus
from hvkit.qemu.ownership import Ownership, VMBusy
from hvkit.qemu.vm import finish_abandoned
from hvkit.sharing.freepages import ShareRefused, free_pages_to_release
from hvkit.sharing.sharer import MAX_PAUSE, Sharer, ShareResult
from hvkit.units import mib

log = logging.getLogger("hvkit.share.service")

PAGE = 4096
BUDGET_SHARE = 0.6  # batches aim at this share of the pause budget: room for a slower pause
FIRST_BATCH = 2048  # pages the first pause of a VM may punch (8 MiB), before any rate is known
MIN_BATCH = 256  # pages (1 MiB): less is not worth a pause of its own
HISTORY = 8  # pauses of a VM the model remembers
GAP_FACTOR = 4.0  # a VM with work left runs at least this many times its pause between two
MIN_GAP = 0.2  # seconds, and at least this
RETRY_OVER_BUDGET = 30.0  # seconds a VM whose fixed cost overran the budget is left alone
PREVIEW_LIMIT = 0.8  # a VM is not paused when its preview predicts more than this share of the budget


@dataclass
class Policy:
    """When and how much the service gives back."""

    interval: float  # seconds between two shares of a VM with nothing left to give
    max_pause: float = MAX_PAUSE  # seconds: the longest a VM may be paused
    below: int | None = None  # bytes: share only while the host's MemAvailable is below this
    keep: int = 0  # bytes of free memory (with host memory) left to each guest
    dry_run: bool = False


class Observer(Protocol):
    """What the service tells about its work (the Prometheus metrics; tests)."""

    def shared(self, vm: str, result: ShareResult) -> None: ...
    def vm_seen(self, row: VMStatus) -> None: ...
    def vm_gone(self, vm: str) -> None: ...
    def error(self, vm: str, kind: str) -> None: ...
    def host(self, mem_available: int) -> None: ...


class PauseModel:
    """One VM's pauses, measured: how long a pause costs before any page is punched
    (stop, identify, resume) and how fast pages are punched; from them, how many pages
    the next pause may punch and stay within the budget."""

    def __init__(self) -> None:
        self.fixed: deque[float] = deque(maxlen=HISTORY)  # seconds of each pause not spent punching
        self.rates: deque[float] = deque(maxlen=HISTORY)  # pages punched per second

    def record(self, result: ShareResult) -> None:
        for paused, punched, punch_s in result.pause_log:
            self.fixed.append(max(0.0, paused - punch_s))
            if punched >= MIN_BATCH and punch_s > 0:
                self.rates.append(punched / punch_s)

    def batch(self, budget: float) -> int:
        """Pages the next pause may punch: what the slowest recent rate punches in the
        room the worst recent fixed cost leaves of BUDGET_SHARE of the budget."""
        if not self.fixed:
            return FIRST_BATCH
        room = BUDGET_SHARE * budget - max(self.fixed)
        if not self.rates:
            return FIRST_BATCH if room > 0 else MIN_BATCH
        return max(MIN_BATCH, int(room * min(self.rates)))

    def over_budget(self, budget: float) -> bool:
        """Whether even the typical fixed cost (the median of recent pauses) overruns the
        budget: a pause would, whatever it punched."""
        if len(self.fixed) < 3:
            return False
        return sorted(self.fixed)[len(self.fixed) // 2] > budget


@dataclass
class Watched:
    """A VM the service knows, and what it knows of it."""

    name: str
    sharer: Sharer | None = None
    model: PauseModel = field(default_factory=PauseModel)
    due: float = 0.0  # time.monotonic() of its next share
    refused_pid: int | None = None  # the QEMU whose RAM was refused (left alone)
    busy_said: bool = False
    over_said: bool = False
    knowledge: KernelKnowledge | None = None  # its kernel's symbols and layout, for previews
    skipped: int = 0  # rounds not paused because the preview predicted an overrun
    given: int = 0  # bytes given back since the service started
    cycles: int = 0


def mem_available() -> int:
    """The host's MemAvailable in bytes (/proc/meminfo)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


class Service:
    """The loop of `hvkit share --all --watch`. `stop()` (a signal handler calls it)
    ends it between two pauses."""

    def __init__(self, policy: Policy, paths: Paths | None = None, observer: Observer | None = None,
                 on_result: Callable[[str, ShareResult], None] | None = None) -> None:
        self.policy = policy
        self.paths = paths or Paths.from_env()
        self.observer = observer
        self.on_result = on_result
        self.vms: dict[str, Watched] = {}
        self.asked: list[int] = []
        self.idle_said: bool | None = None
        self.started = time.monotonic()
        self.pauses: list[float] = []  # every pause taken, seconds (for the summary)
        self.given = 0  # bytes given back in all, VMs gone since included
        self.seen = 0  # VMs watched in all

    def stop(self, signum: int = signal.SIGTERM) -> None:
        self.asked.append(signum)

    def install_signal_handlers(self) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda signum, frame: self.stop(signum))

    # ---- the loop ---------------------------------------------------------------------

    def run(self, rounds: int | None = None) -> None:
        """Shares until stopped (or for `rounds` rounds over the VM list)."""
        log.info("watching every VM of %s: every %.1f s, pauses <= %.0f ms%s%s%s", self.paths.runtime,
                 self.policy.interval, self.policy.max_pause * 1000,
                 f", only while MemAvailable < {mib(self.policy.below):.0f} MiB" if self.policy.below else "",
                 f", {mib(self.policy.keep):.0f} MiB left free in each guest" if self.policy.keep else "",
                 ", dry run" if self.policy.dry_run else "")
        done = 0
        next_list = 0.0
        while not self.asked and (rounds is None or done < rounds):
            now = time.monotonic()
            if now >= next_list:
                self.refresh()
                # new VMs are found within a second or the interval, and listing (a QMP
                # session per VM) is not repeated more often than that
                next_list = now + min(max(self.policy.interval, 1.0), 5.0)
                done += 1
            if self.sharing_wanted():
                for w in sorted(self.vms.values(), key=lambda w: w.due):
                    if self.asked:
                        break
                    if w.due <= time.monotonic():
                        self.share_one(w)
            self.sleep_until(min([next_list, *(w.due for w in self.vms.values())]))
        self.summary()

    def sleep_until(self, when: float) -> None:
        while not self.asked and time.monotonic() < when:
            time.sleep(min(0.05, max(0.0, when - time.monotonic())))

    def refresh(self) -> None:
        """Reads the VM list again: new VMs are picked up, gone ones dropped."""
        try:
            rows = {r.name: r for r in list_vms(self.paths)}
        except HvkitError as e:
            log.warning("cannot list the VMs of %s: %s", self.paths.runtime, e)
            return
        for name, row in rows.items():
            if row.state in ("dead", "busy") and name not in self.vms:
                continue
            if name not in self.vms:
                self.vms[name] = Watched(name, due=time.monotonic())
                self.seen += 1
                log.info("%s: watching (%.0f MiB guest, %s, host holds %.1f MiB)", name, mib(row.memory),
                         f"RAM file {row.ram_path}" if row.ram_path else "RAM inside QEMU", mib(row.host_memory))
            if self.observer:
                self.observer.vm_seen(row)
        for name in [n for n, r in list(self.vms.items()) if n not in rows or rows[n].state == "dead"]:
            self.drop(name, rows[name].reason if name in rows else "no longer listed")

    def drop(self, name: str, why: str) -> None:
        w = self.vms.pop(name, None)
        if w is None:
            return
        log.info("%s: gone (%s); gave back %.1f MiB in %d cycles", name, why or "stopped", mib(w.given), w.cycles)
        if self.observer:
            self.observer.vm_gone(name)

    def sharing_wanted(self) -> bool:
        """Whether the host wants memory now (the --mem-available-below policy)."""
        if self.observer or self.policy.below:
            available = mem_available()
            if self.observer:
                self.observer.host(available)
        if not self.policy.below:
            return True
        idle = available >= self.policy.below
        if idle != self.idle_said:
            log.info("host MemAvailable %.0f MiB is %s the threshold of %.0f MiB: %s", mib(available),
                     "above" if idle else "below", mib(self.policy.below), "idle" if idle else "sharing")
            self.idle_said = idle
        return not idle

    # ---- one VM -----------------------------------------------------------------------

    def share_one(self, w: Watched) -> None:
        """One share of VM `w` if nobody else holds it; whatever happens is one log line."""
        w.due = time.monotonic() + self.policy.interval
        budget = self.policy.max_pause
        owner = Ownership(self.paths.runtime, w.name)
        try:
            with owner.try_hold("share --all") as got:
                if got is None:
                    if not w.busy_said:
                        log.info("%s: busy with %s; skipped while it is", w.name, _describe(owner.holder()))
                        w.busy_said = True
                    return
                w.busy_said = False
                finish_abandoned(owner, self.paths)  # a dead owner's pause resumed, first
                self._share_held(w, budget)
        except ShareRefused as e:
            log.warning("%s: not shared: %s", w.name, e)
            self._error(w.name, "refused")
        except (VMDied, VMNotFound) as e:
            self._error(w.name, "gone")
            self.drop(w.name, str(e))
        except VMBusy:
            pass
        except HvkitError as e:
            log.warning("%s: share failed: %s", w.name, e)
            self._error(w.name, "error")

    def _share_held(self, w: Watched, budget: float) -> None:
        vm = find_vm(w.name, self.paths, wait=0.0)
        if w.refused_pid is not None:
            if vm.pid == w.refused_pid:
                return
            w.refused_pid, w.sharer = None, None  # another QEMU now: try it afresh
        if w.sharer is None or w.sharer.vm.pid != vm.pid:
            w.sharer = Sharer(vm, self.paths)
        preview = self.preview(w, vm)
        if preview is not None:
            fixed, to_give, free = preview
            if fixed > PREVIEW_LIMIT * budget:
                w.skipped += 1
                if not w.over_said:
                    log.warning("%s: a pause would cost %.0f ms before any page is given back, over %.0f%% of the "
                                "budget of %.0f ms: not paused while that lasts", w.name, fixed * 1000,
                                PREVIEW_LIMIT * 100, budget * 1000)
                    w.over_said = True
                return
            if w.over_said:
                log.info("%s: a pause costs %.0f ms again: sharing (%d rounds skipped)", w.name, fixed * 1000, w.skipped)
                w.over_said = False
            if to_give <= self.policy.keep // PAGE:
                self._account(w, _nothing(vm, free, to_give), budget)
                return
        batch = w.model.batch(budget)
        try:
            r = w.sharer.share(dry_run=self.policy.dry_run, max_pause=budget, batch=batch,
                               keep=self.policy.keep // PAGE, max_pauses=1)
        except ShareRefused:
            w.refused_pid = vm.pid  # this QEMU is left alone from now on
            raise
        self._account(w, r, budget)

    def preview(self, w: Watched, vm: VM) -> tuple[float, int, int] | None:
        """(seconds a pause would cost before punching, free pages with host memory, free
        pages), from the RAM file of the running VM, not paused: one QMP session (the
        pause takes one for stop and one for cont) and an identification (the pause
        identifies the same way). None when the RAM is not a file of its own or the read,
        racing with the guest, does not add up (the pause then decides, as always).
        Reading never changes guest memory: pread and mincore only."""
        if vm.spec.ram != "file" or vm.spec.ram_nodes:  # (a NUMA VM's RAM is several files: no preview)
            return None
        try:
            if w.knowledge is None:
                w.knowledge = load_kernel_knowledge(Path(vm.spec.kernel), None, self.paths)
            t0 = time.monotonic()
            vm.run_state()
            qmp_s = time.monotonic() - t0
            with open_guest(str(vm.ram_path), kernel=vm.spec.kernel, knowledge=w.knowledge, paths=self.paths) as g:
                free, release = free_pages_to_release(g)
            return 2 * qmp_s + (time.monotonic() - t0 - qmp_s), int(release.sum()), int(free.sum())
        except (HvkitError, OSError, ValueError):
            return None

    def _account(self, w: Watched, r: ShareResult, budget: float) -> None:
        w.model.record(r)
        w.cycles += 1
        w.given += r.released_bytes
        self.given += r.released_bytes
        self.pauses += [p for p, _, _ in r.pause_log]
        left = max(0, r.backed_free_pages - self.policy.keep // PAGE - r.given_pages)
        if w.knowledge is None and w.model.over_budget(budget):  # no preview: measured pauses decide
            if not w.over_said:
                log.warning("%s: a pause costs %.0f ms before any page is given back, over the budget of "
                            "%.0f ms: left alone for %.0f s", w.name, sorted(w.model.fixed)[len(w.model.fixed) // 2]
                            * 1000, budget * 1000, RETRY_OVER_BUDGET)
                w.over_said = True
            w.due = time.monotonic() + RETRY_OVER_BUDGET
        else:
            w.over_said = False
            if left and not self.policy.dry_run:
                w.due = time.monotonic() + max(MIN_GAP, GAP_FACTOR * r.paused_s)
        if r.given_pages:
            log.info("%s: gave back %.1f MiB in a pause of %.0f ms (batch %d pages%s); host holds %.1f MiB",
                     w.name, mib(r.released_bytes), r.paused_s * 1000, r.given_pages,
                     f", {mib(left * PAGE):.1f} MiB left for the next pause" if left else "", mib(r.host_after))
        else:
            log.debug("%s: nothing to give back (%d free pages; paused %.0f ms)", w.name, r.free_pages,
                      r.paused_s * 1000)
        if self.observer:
            self.observer.shared(w.name, r)
        if self.on_result:
            self.on_result(w.name, r)

    def _error(self, vm: str, kind: str) -> None:
        if self.observer:
            self.observer.error(vm, kind)

    def summary(self) -> None:
        p = sorted(self.pauses)
        worst = f"longest pause {p[-1] * 1000:.0f} ms, p99 {p[int(0.99 * (len(p) - 1))] * 1000:.0f} ms" if p else "no pause"
        log.info("stopped after %.0f s: %d VMs watched, %d pauses (%s); gave back %.1f MiB",
                 time.monotonic() - self.started, self.seen, len(p), worst, mib(self.given))


def _nothing(vm: VM, free: int, backed: int) -> ShareResult:
    """The result of a round that found nothing to give back and took no pause."""
    held = vm.host_memory()
    return ShareResult(free_pages=free, backed_free_pages=backed, runs=0, given_pages=0, released_bytes=0,
                       host_before=held, host_after=held, paused_s=0.0, pauses=0, seconds=0.0, dry_run=False)


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another hvkit command"
    return f"hvkit {holder.get('op', '?')} (pid {holder.get('pid', '?')})"
