"""The scheduler: M vCPUs of several VMs on K physical-CPU slots.

Each vCPU has its own host thread (KVM wants a vCPU's ioctls from the thread that made
it); a thread enters its guest only while it holds a slot. When a slot is free it goes to
a waiting vCPU chosen by:

1. a VM whose DLH queue is pending (deferred hypercalls wait for a vCPU of that VM), then
2. the VM that has had the least run time so far (fair shares between VMs, whatever
   their number of vCPUs), then
3. the vCPU that has waited longest.

Time slices are enforced from a ticker thread: a vCPU that has held its slot longer than
a slice while others wait is kicked out of the guest (vcpu.kick: KVM's immediate_exit
plus a signal to its thread), gives the slot back, and queues again.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Protocol

from hvkit.hv.dlh import DlhQueue
from hvkit.hv.hypercalls import VmFigures

DEFAULT_SLICE = 0.010


class ScheduledVM(Protocol):
    """What the scheduler reads of a VM (hypervisor.GuestVM): whether deferred
    hypercalls wait, and how much run time it has had."""

    dlh: DlhQueue
    figures: VmFigures


class Vcpu(Protocol):
    """What the scheduler needs of a vCPU (vcpu.Vcpu): its VM, whether it should stop
    waiting, and a way to kick it out of the guest."""

    vm: ScheduledVM

    def should_stop(self) -> bool: ...

    def kick(self) -> None: ...


class Scheduler:
    def __init__(self, slots: int, slice_s: float = DEFAULT_SLICE) -> None:
        if slots < 1:
            raise ValueError("at least one physical-CPU slot")
        self.slots = slots
        self.slice_s = slice_s
        self._cond = threading.Condition()
        self._free = slots
        self._waiting: dict[Vcpu, int] = {}  # vCPU -> arrival number
        self._running: dict[Vcpu, int] = {}  # vCPU -> slot start (ns)
        self._arrivals = itertools.count()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="hv-ticker", daemon=True)
        self._ticker.start()

    # -- called by vCPU threads ----------------------------------------------

    def acquire(self, vcpu: Vcpu) -> bool:
        """Block until `vcpu` is granted a slot; False when it should stop instead."""
        with self._cond:
            self._waiting[vcpu] = next(self._arrivals)
            try:
                while not vcpu.should_stop():
                    if self._free > 0 and self._choose() is vcpu:
                        self._free -= 1
                        self._running[vcpu] = time.monotonic_ns()
                        return True
                    self._cond.wait(0.1)
                return False
            finally:
                del self._waiting[vcpu]
                self._cond.notify_all()

    def release(self, vcpu: Vcpu) -> None:
        with self._cond:
            start = self._running.pop(vcpu)
            vcpu.vm.figures.run_ns += time.monotonic_ns() - start
            self._free += 1
            self._cond.notify_all()

    # -- called by anyone ------------------------------------------------------

    def wake(self) -> None:
        """Something the choice depends on changed (a VM's DLH queue became pending, a vCPU
        finished): waiting vCPUs look again, so a vCPU of a pending VM goes first."""
        with self._cond:
            self._cond.notify_all()

    def kick_all(self, vm: object) -> None:
        """Make every running vCPU of `vm` leave the guest (it is being stopped)."""
        with self._cond:
            for vcpu in self._running:
                if vcpu.vm is vm:
                    vcpu.kick()
            self._cond.notify_all()

    def close(self) -> None:
        self._stop.set()
        self._ticker.join()

    # -- policy ----------------------------------------------------------------

    def _choose(self) -> Vcpu:
        now = time.monotonic_ns()
        used: dict[int, int] = {}
        for vcpu, start in self._running.items():
            used[id(vcpu.vm)] = used.get(id(vcpu.vm), 0) + now - start

        def rank(item: tuple[Vcpu, int]) -> tuple[bool, int, int]:
            vcpu, arrival = item
            vm = vcpu.vm
            return (not vm.dlh.pending, vm.figures.run_ns + used.get(id(vm), 0), arrival)

        return min(self._waiting.items(), key=rank)[0]

    def _tick(self) -> None:
        slice_ns = int(self.slice_s * 1e9)
        while not self._stop.wait(self.slice_s / 4):
            with self._cond:
                if not self._waiting:
                    continue
                now = time.monotonic_ns()
                for vcpu, start in self._running.items():
                    if now - start >= slice_ns:
                        vcpu.kick()
