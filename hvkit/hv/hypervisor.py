"""hvkit's hypervisor: several VMs of guest programs, their vCPU threads, one scheduler.

    with Hypervisor(slots=2) as hv:
        hv.add_vm(load_program("guest.elf"), vcpus=1)
        report = hv.run(timeout=30)

Each VM is initialised with its own memory, page tables, boot info and DLH queue
(machine.py, dlh.py); `run` starts one thread per vCPU, lets the scheduler hand out the
physical-CPU slots, and returns when every VM has finished, failed, or the time is up.
A VM that breaks the rules (a triple fault, an access outside its memory, a corrupt
queue) is stopped with a message; the others go on.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

from hvkit.errors import HvkitError
from hvkit.hv import kvm
from hvkit.hv.dlh import FULL_OFFSET, DlhQueue, GuestFault
from hvkit.hv.hypercalls import HypercallHost, VmFigures
from hvkit.hv.machine import GuestProgram, Machine
from hvkit.hv.scheduler import DEFAULT_SLICE, Scheduler
from hvkit.hv.vcpu import KICK_SIGNAL, Vcpu
from hvkit.units import MiB

log = logging.getLogger(__name__)

DEFAULT_MEMORY = 4 * MiB
DEFAULT_DLH_ENTRIES = 1024


@dataclass
class VmReport:
    name: str
    vcpus: int
    exit_codes: list[int | None]
    error: str | None
    run_s: float
    share: float  # of all VMs' run time
    exits: int
    preemptions: int
    immediate: int
    deferred: int
    deferred_failed: int
    notifications: int
    queue_runs: int
    queue_full: int  # hv_defer calls the guest saw refused (the guest's own count)
    hinted_free_bytes: int
    immediate_host_s: float
    deferred_host_s: float
    console: str

    @property
    def ok(self) -> bool:
        return self.error is None and all(c == 0 for c in self.exit_codes)


@dataclass
class RunReport:
    seconds: float
    slots: int
    vms: list[VmReport]

    @property
    def ok(self) -> bool:
        return all(vm.ok for vm in self.vms)

    def to_json(self) -> dict:
        return {"seconds": self.seconds, "slots": self.slots, "ok": self.ok,
                "vms": [asdict(vm) for vm in self.vms]}


class GuestVM:
    """A VM while it runs: machine, DLH queue, routines' host side, vCPUs, state."""

    def __init__(self, kvm_fd: int, kvm_info: kvm.KvmInfo, scheduler: Scheduler, name: str,
                 index: int, program: GuestProgram, memory: int, vcpus: int, dlh_entries: int,
                 args: tuple[int, ...], on_console: Callable[[str, bytes], None] | None) -> None:
        self.name = name
        self.kvm_info = kvm_info
        self.scheduler = scheduler
        self.machine = Machine(kvm_fd, name, index, program, memory, vcpus, dlh_entries, args)
        self.dlh = DlhQueue(self.machine, dlh_entries)
        self.figures = VmFigures()
        self.host = HypercallHost(self.machine, self.figures, on_console=on_console)
        self.vcpus = [Vcpu(self, i, scheduler) for i in range(vcpus)]
        self.stopping = False
        self.error: str | None = None
        self.started = threading.Event()
        self.finished = threading.Event()
        self._lock = threading.Lock()
        self._running_vcpus = vcpus

    def fault(self, vcpu: Vcpu, message: str) -> GuestFault:
        return GuestFault(f"{vcpu.name} {message}")

    def fail(self, vcpu: Vcpu, error: BaseException) -> None:
        if isinstance(error, HvkitError):
            message = str(error)
        else:
            log.exception("%s: hypervisor error", vcpu.name, exc_info=error)
            message = f"{vcpu.name}: hypervisor error: {error!r}"
        self.stop(message)

    def stop(self, error: str | None = None) -> None:
        with self._lock:
            if error and self.error is None:
                self.error = error
            self.stopping = True
        self.scheduler.kick_all(self)

    def vcpu_done(self, vcpu: Vcpu) -> None:
        with self._lock:
            self._running_vcpus -= 1
            if self._running_vcpus == 0:
                self.finished.set()
        self.scheduler.wake()

    def report(self, total_run_ns: int) -> VmReport:
        f = self.figures
        return VmReport(
            name=self.name, vcpus=len(self.vcpus),
            exit_codes=[v.exit_code for v in self.vcpus], error=self.error,
            run_s=f.run_ns / 1e9, share=f.run_ns / total_run_ns if total_run_ns else 0.0,
            exits=f.exits, preemptions=f.preemptions, immediate=f.immediate,
            deferred=f.deferred, deferred_failed=f.deferred_failed,
            notifications=f.notifications, queue_runs=f.queue_runs,
            queue_full=self.dlh.guest_counter(FULL_OFFSET),
            hinted_free_bytes=f.hinted_free_bytes,
            immediate_host_s=f.immediate_host_ns / 1e9, deferred_host_s=f.deferred_host_ns / 1e9,
            console=self.host.console.decode(errors="replace"))

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.dlh.ring = None
        self.machine.ram.close()
        self.machine.close()


def _ignore_kick(signum: int, frame: object) -> None:
    """The kick signal only has to interrupt KVM_RUN; nothing to do when it lands."""


class Hypervisor:
    def __init__(self, slots: int | None = None, slice_s: float = DEFAULT_SLICE,
                 on_console: Callable[[str, bytes], None] | None = None,
                 sync_regs: bool = True) -> None:
        """`sync_regs=False` makes immediate hypercalls use KVM_GET/SET_REGS even where
        KVM offers the registers in the shared page (to compare the two)."""
        self.kvm_fd, self.kvm_info = kvm.open_kvm()
        if not sync_regs:
            self.kvm_info = replace(self.kvm_info, sync_regs=False)
        self._old_handler = self._install_kick_handler()
        self.scheduler = Scheduler(slots or os.cpu_count() or 1, slice_s)
        self.on_console = on_console
        self.vms: list[GuestVM] = []

    def _install_kick_handler(self) -> object:
        if threading.current_thread() is threading.main_thread():
            return signal.signal(KICK_SIGNAL, _ignore_kick)
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
            os.close(self.kvm_fd)
            raise HvkitError("hvkit's hypervisor must be started from the main thread",
                             f"it installs a {KICK_SIGNAL.name} handler to kick vCPUs out of "
                             "their guests")
        return None

    def add_vm(self, program: GuestProgram, *, name: str | None = None,
               memory: int = DEFAULT_MEMORY, vcpus: int = 1,
               dlh_entries: int = DEFAULT_DLH_ENTRIES, args: tuple[int, ...] = ()) -> GuestVM:
        index = len(self.vms)
        vm = GuestVM(self.kvm_fd, self.kvm_info, self.scheduler, name or f"vm{index}", index,
                     program, memory, vcpus, dlh_entries, args, self.on_console)
        self.vms.append(vm)
        return vm

    def run(self, timeout: float | None = None) -> RunReport:
        """Run every VM until all have finished or failed, or `timeout` seconds passed."""
        if not self.vms:
            raise HvkitError("no VMs to run")
        t0 = time.monotonic()
        try:
            for vm in self.vms:
                for vcpu in vm.vcpus:
                    vcpu.start()
            for vm in self.vms:
                vm.started.set()
            deadline = None if timeout is None else t0 + timeout
            for vm in self.vms:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not vm.finished.wait(left):
                    break
            for vm in self.vms:
                if not vm.finished.is_set():
                    vm.stop(f"{vm.name} was still running after the time limit of {timeout:g} s")
        except BaseException:  # Ctrl-C, or a vCPU that could not be created: stop everything
            for vm in self.vms:
                vm.stop("stopped: the hypervisor was interrupted")
                vm.started.set()
            raise
        finally:
            for vm in self.vms:
                for vcpu in vm.vcpus:
                    if vcpu.thread.is_alive():
                        vcpu.thread.join()
        seconds = time.monotonic() - t0
        total = sum(vm.figures.run_ns for vm in self.vms)
        return RunReport(seconds, self.scheduler.slots, [vm.report(total) for vm in self.vms])

    def close(self) -> None:
        self.scheduler.close()
        for vm in self.vms:
            vm.close()
        os.close(self.kvm_fd)
        if self._old_handler is not None:
            signal.signal(KICK_SIGNAL, self._old_handler)

    def __enter__(self) -> "Hypervisor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
