"""A vCPU: one host thread that creates the KVM vCPU, then runs it slice by slice.

Inside a slice the thread loops on KVM_RUN and handles each exit:
- a port write to PORT_HYPERCALL is an immediate hypercall (routine number in eax,
  arguments in rdi, rsi, rcx, result written back to rax);
- a port write to PORT_DLH_NOTIFY is the VM telling the hypervisor's interrupt handler
  that deferred hypercalls wait: the VM's queue is marked pending and the scheduler told;
- before every entry into the guest, a pending DLH queue of this VM is run (dlh.py), so
  the guest finds its deferred work done when its vCPU's context is restored;
- anything else (a triple fault, an access outside its memory, an unknown port, an
  instruction KVM cannot emulate) stops the VM with a message saying which.
"""

from __future__ import annotations

import logging
import os
import signal
import struct
import threading
import time
from typing import Protocol

from hvkit.hv import kvm
from hvkit.hv.dlh import DlhQueue, GuestFault
from hvkit.hv.hypercalls import PORT_DLH_NOTIFY, PORT_HYPERCALL, Action, HypercallHost, VmFigures
from hvkit.hv.machine import Machine
from hvkit.hv.scheduler import Scheduler

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1


class VcpuOwner(Protocol):
    """What a vCPU needs of its VM (hypervisor.GuestVM): the machine and KVM facts to
    create it, the DLH queue and hypercall routines to serve, its figures, and where to
    report that it stopped."""

    name: str
    machine: Machine
    kvm_info: kvm.KvmInfo
    dlh: DlhQueue
    host: HypercallHost
    figures: VmFigures
    started: threading.Event
    stopping: bool

    def fault(self, vcpu: "Vcpu", message: str) -> GuestFault: ...

    def fail(self, vcpu: "Vcpu", error: BaseException) -> None: ...

    def vcpu_done(self, vcpu: "Vcpu") -> None: ...


class Vcpu:
    def __init__(self, vm: VcpuOwner, index: int, scheduler: Scheduler) -> None:
        self.vm = vm
        self.index = index
        self.scheduler = scheduler
        self.name = f"{vm.name}/vcpu{index}"
        self.exit_code: int | None = None
        self.preempt = False
        self._run: kvm.Run | None = None
        self._ident: int | None = None
        self._created = threading.Event()
        self._create_error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=self.name, daemon=True)

    # -- control from other threads ---------------------------------------------

    def start(self) -> None:
        self.thread.start()
        self._created.wait()
        if self._create_error is not None:
            raise self._create_error

    def should_stop(self) -> bool:
        return self.exit_code is not None or self.vm.stopping

    def kick(self) -> None:
        """Make the vCPU leave the guest soon (its slice is over, or its VM stops)."""
        if self.preempt or self._run is None or self._ident is None:
            return
        self.preempt = True
        self._run.immediate_exit = 1  # covers a kick that lands just before KVM_RUN
        try:
            signal.pthread_kill(self._ident, KICK_SIGNAL)
        except ProcessLookupError:
            pass

    # -- the thread ------------------------------------------------------------

    def _main(self) -> None:
        try:
            self.fd = kvm.ioctl(self.vm.machine.fd, kvm.KVM_CREATE_VCPU, self.index)
            self._area, self._run = kvm.map_run(self.fd, self.vm.kvm_info.vcpu_mmap_size)
            start = self.vm.machine.vcpu_start(self.index)
            kvm.ioctl(self.fd, kvm.KVM_SET_SREGS, start.sregs)
            kvm.ioctl(self.fd, kvm.KVM_SET_REGS, start.regs)
            if self.vm.kvm_info.sync_regs:
                self._run.kvm_valid_regs = kvm.KVM_SYNC_X86_REGS
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [KICK_SIGNAL])
            self._ident = threading.get_ident()
        except BaseException as e:  # reported by start() in the creating thread
            self._create_error = e
            self._created.set()
            return
        self._created.set()
        self.vm.started.wait()
        try:
            while self.scheduler.acquire(self):
                try:
                    self._run_slice()
                finally:
                    self.scheduler.release(self)
                if self.exit_code is not None:
                    break
        except BaseException as e:
            self.vm.fail(self, e)
        finally:
            self.vm.vcpu_done(self)

    def _run_slice(self) -> None:
        run, vm = self._run, self.vm
        regs = kvm.Regs()
        self.preempt = False
        figures = vm.figures
        while True:
            if vm.dlh.pending:  # deferred hypercalls run before the vCPU re-enters
                t0 = time.perf_counter_ns()
                vm.dlh.run(vm.host)
                figures.deferred_host_ns += time.perf_counter_ns() - t0
            if self.preempt or vm.stopping:
                return
            try:
                kvm.ioctl(self.fd, kvm.KVM_RUN)
            except kvm.KvmCallFailed as e:
                if not kvm.interrupted(e):
                    raise
                run.immediate_exit = 0
                figures.exits += 1
                figures.preemptions += 1
                continue
            figures.exits += 1
            reason = run.exit_reason
            if reason == kvm.EXIT_IO and run.exit.io.direction == kvm.IO_OUT:
                port = run.exit.io.port
                if port == PORT_HYPERCALL:
                    t0 = time.perf_counter_ns()
                    action = self._immediate(regs)
                    figures.immediate_host_ns += time.perf_counter_ns() - t0
                    if action is not Action.RESUME:
                        return
                    continue
                if port == PORT_DLH_NOTIFY:
                    figures.notifications += 1
                    vm.dlh.pending = True
                    self.scheduler.wake()
                    continue
                raise vm.fault(self, f"wrote to I/O port {port:#x}, which hvkit does not serve "
                                     f"(hypercalls use {PORT_HYPERCALL:#x} and {PORT_DLH_NOTIFY:#x})")
            if reason == kvm.EXIT_HLT:
                self.exit_code = 0
                return
            raise vm.fault(self, self._describe_exit(reason, regs))

    def _immediate(self, regs: kvm.Regs) -> Action:
        """Routine number from the port write, arguments from rdi, rsi, rcx, result to rax.
        With KVM_CAP_SYNC_REGS the registers are in the shared kvm_run page (no ioctl)."""
        run = self._run
        io = run.exit.io
        routine = struct.unpack_from("<I", self._area, io.data_offset)[0] if io.size == 4 else -1
        sync = self.vm.kvm_info.sync_regs
        if sync:
            regs = run.s.regs
        else:
            kvm.ioctl(self.fd, kvm.KVM_GET_REGS, regs)
        self.vm.figures.immediate += 1
        result, action = self.vm.host.call(routine, regs.rdi, regs.rsi, regs.rcx, False)
        if action is Action.EXIT:
            self.exit_code = result
            return action
        regs.rax = result & (2**64 - 1)
        if sync:
            run.kvm_dirty_regs = kvm.KVM_SYNC_X86_REGS
        else:
            kvm.ioctl(self.fd, kvm.KVM_SET_REGS, regs)
        return action

    def _describe_exit(self, reason: int, regs: kvm.Regs) -> str:
        kvm.ioctl(self.fd, kvm.KVM_GET_REGS, regs)
        at = f"at rip {regs.rip:#x}"
        run = self._run
        if reason == kvm.EXIT_MMIO:
            verb = "wrote" if run.exit.mmio.is_write else "read"
            return (f"{verb} guest-physical {run.exit.mmio.phys_addr:#x} {at}, outside its "
                    f"{self.vm.machine.ram.size >> 20} MiB of memory")
        if reason == kvm.EXIT_SHUTDOWN:
            return (f"triple-faulted {at} (an exception with no handler: a bad pointer, "
                    f"a stack overflow, or an instruction the CPU refused)")
        if reason == kvm.EXIT_INTERNAL_ERROR:
            return (f"ran an instruction KVM could not emulate {at} (internal error "
                    f"{run.exit.internal.suberror}; guests must be integer-only: build with "
                    f"'hvkit hv build')")
        if reason == kvm.EXIT_FAIL_ENTRY:
            return f"could not be entered (hardware reason {run.exit.fail_entry.hardware_entry_failure_reason:#x})"
        if reason == kvm.EXIT_IO:
            return f"read from I/O port {run.exit.io.port:#x} {at}, which hvkit does not serve"
        return f"stopped with KVM exit '{kvm.EXIT_REASONS.get(reason, reason)}' {at}"

    def close(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            self._run = None  # the ctypes view must go before its mapping closes
            try:
                self._area.close()
            except BufferError:
                pass
            os.close(self.fd)
            self.fd = -1

