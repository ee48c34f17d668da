"""Running `madvise(MADV_DONTNEED)` inside a QEMU process, over ptrace (as CRIU's compel
runs its system calls): the one way to drop pages of memory that is private to another
process, since Linux's process_madvise(2) takes no MADV_DONTNEED.

The steps, and why each is safe to be cut off by SIGKILL of hvkit (a dead tracer's
tracee is detached and goes on with the registers it has at that moment):

1. PTRACE_SEIZE QEMU's main thread (never a vCPU thread: QEMU's main loop only loses
   a few milliseconds of its poll) and PTRACE_INTERRUPT it; wait for its stop.
2. Accept the stop only when the thread waits in poll/ppoll and the two bytes before
   its instruction pointer are a `syscall` (0f 05) in an executable mapping: the thread's
   own system-call instruction, read from its memory, never an assumed address. Else let
   it run a moment and interrupt it again.
3. Save its registers. For each range: set rax=SYS_madvise, rdi/rsi/rdx = the range and
   MADV_DONTNEED, orig_rax=-1 (no restart of the interrupted call meanwhile), rip = that
   `syscall`; run it to its syscall-exit stop (PTRACE_SYSCALL, never a single step: see
   `madvise`); read rax.
4. Interrupt it again (an interrupt stop is where it was seized), restore the saved
   registers exactly (orig_rax and rax included, so the kernel restarts the interrupted
   ppoll as it would have), re-send signals that arrived meanwhile, detach.

Killed after 3 set the registers, the thread runs the madvise itself and returns to the
code after its own ppoll's `syscall` with 0 (or -1 and errno) as ppoll's result: a poll
that found nothing, which QEMU's main loop simply polls again (glibc's ppoll overwrites
rdi/rsi/rdx before using them again). The VM is paused by QMP all the while, so the
range dropped is still free.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from hvkit.errors import HvkitError
from hvkit.qemu.ownership import fault_point

log = logging.getLogger(__name__)

PTRACE_GETREGS, PTRACE_SETREGS = 12, 13
PTRACE_CONT, PTRACE_SYSCALL, PTRACE_DETACH = 7, 24, 17
PTRACE_O_TRACESYSGOOD = 1
PTRACE_SEIZE, PTRACE_INTERRUPT = 0x4206, 0x4207
PTRACE_EVENT_STOP = 128
WALL = 0x40000000  # __WALL: wait for a thread that is not our child
SYS_POLL, SYS_MADVISE, SYS_TGKILL, SYS_PPOLL = 7, 28, 234, 271
WAITING_CALLS = (SYS_POLL, SYS_PPOLL)  # calls whose early return with 0 the caller takes in its stride
MADV_DONTNEED = 4
SYSCALL_INSN = b"\x0f\x05"
STOP_TRIES = 200  # interrupts tried before giving up on finding the thread in its poll
YAMA_SCOPE = Path("/proc/sys/kernel/yama/ptrace_scope")


class InjectionError(HvkitError):
    """The system call could not be run inside QEMU; the message says why."""


def probe_trace(pid: int) -> None:
    """Raises InjectionError (with what to do) unless this process may trace QEMU
    process `pid`: seizes its main thread, stops it a moment and lets it go, changing
    nothing (a kill meanwhile detaches it as it was)."""
    injector = Injector(pid)
    try:
        injector.attach()
        injector._stop()
    finally:
        injector.release()


class UserRegs(ctypes.Structure):
    """struct user_regs_struct of x86-64 (<sys/user.h>), in its order."""

    _fields_ = [(name, ctypes.c_ulonglong) for name in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
        "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")]

    def copy(self) -> "UserRegs":
        out = UserRegs()
        ctypes.pointer(out)[0] = self
        return out

    def as_tuple(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name, _ in self._fields_)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    return libc


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def ptrace_scope() -> int | None:
    """Yama's ptrace scope (0-3), None where Yama is not in the kernel."""
    try:
        return int(YAMA_SCOPE.read_text())
    except (OSError, ValueError):
        return None


def _denied_hint(pid: int) -> str:
    scope = ptrace_scope()
    if scope == 3:
        return ("Yama forbids every ptrace attach here (kernel.yama.ptrace_scope=3, kept until reboot); "
                "give the VM RAM in a shared file instead")
    tracer = _tracer_of(pid)
    if tracer:
        return f"process {tracer} already traces it (a debugger?): detach it first"
    if scope in (1, 2):
        return (f"kernel.yama.ptrace_scope={scope} allows attaching only with CAP_SYS_PTRACE: run hvkit "
                "as root")
    return "run hvkit as root (or as QEMU's user)"


def _tracer_of(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _executable(pid: int, address: int) -> bool:
    """Is `address` inside an executable mapping of `pid`?"""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        span, perms = line.split()[:2]
        start, end = (int(x, 16) for x in span.split("-"))
        if start <= address < end:
            return "x" in perms
    return False


@dataclass
class _Stop:
    """What waitpid said of the traced thread."""

    status: int

    @property
    def stopped(self) -> bool:
        return os.WIFSTOPPED(self.status)

    @property
    def signal(self) -> int:
        return os.WSTOPSIG(self.status) if self.stopped else 0

    @property
    def event(self) -> int:
        return self.status >> 16


class Injector:
    """QEMU's main thread, seized for running system calls in it (use as a context
    manager: leaving it restores the thread and detaches, whatever happened)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tid = pid  # the main thread: it runs QEMU's main loop (QMP, timers), no vCPU
        self.saved: UserRegs | None = None
        self.site = 0  # address of the thread's own `syscall` instruction
        self.pending: list[int] = []  # signals that arrived while it was ours, sent again at the end
        self.calls = 0
        self.moved = False  # whether it ran since it was seized
        self.stopped = False  # in a ptrace stop now (only then may it be detached)
        self._seized = False

    # -- ptrace ---------------------------------------------------------------------

    def _ptrace(self, request: int, addr: int = 0, data: int | ctypes.c_void_p | None = 0) -> int:
        ret = _libc().ptrace(request, self.tid, addr, data)
        if ret == -1:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        if request in (PTRACE_CONT, PTRACE_SYSCALL):
            self.stopped = False
        return ret

    def _wait(self) -> _Stop:
        _, status = os.waitpid(self.tid, WALL)
        stop = _Stop(status)
        if not stop.stopped:
            self._seized = False
            raise InjectionError(f"QEMU process {self.pid} ended while hvkit ran madvise in it")
        self.stopped = True
        return stop

    def _regs(self) -> UserRegs:
        regs = UserRegs()
        self._ptrace(PTRACE_GETREGS, 0, ctypes.addressof(regs))
        return regs

    def _set_regs(self, regs: UserRegs) -> None:
        self._ptrace(PTRACE_SETREGS, 0, ctypes.addressof(regs))

    def _read(self, address: int, size: int) -> bytes:
        with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as mem:
            return os.pread(mem.fileno(), size, address)

    # -- the steps ------------------------------------------------------------------------

    def attach(self) -> None:
        """PTRACE_SEIZE (the thread runs on until interrupted)."""
        try:
            self._ptrace(PTRACE_SEIZE, 0, PTRACE_O_TRACESYSGOOD)
        except OSError as e:
            if e.errno == 3:  # ESRCH
                raise InjectionError(f"QEMU process {self.pid} is gone") from None
            raise InjectionError(f"may not trace QEMU process {self.pid} ({e.strerror})",
                                 _denied_hint(self.pid)) from None
        self._seized = True

    def seize(self, deadline: float | None = None) -> None:
        """Steps 1 and 2: the thread stopped in its poll, its registers saved."""
        self.attach()
        for _ in range(STOP_TRIES):
            self._stop()
            regs = self._regs()
            site = regs.rip - 2
            if (_signed(regs.orig_rax) in WAITING_CALLS and self._read(site, 2) == SYSCALL_INSN
                    and _executable(self.pid, site)):
                self.saved, self.site = regs, site
                fault_point("share:seized")
                return
            self._ptrace(PTRACE_CONT)  # busy (serving QMP, a timer): let it reach its poll
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.001)
        raise InjectionError(f"QEMU process {self.pid}'s main thread was never found waiting in its poll",
                             "QEMU is busy; try again")

    def _stop(self) -> None:
        """PTRACE_INTERRUPT, then waits for that stop; a signal that reaches the thread
        first is delivered to it as usual."""
        self._ptrace(PTRACE_INTERRUPT)
        self._wait_interrupt()

    def _wait_interrupt(self) -> None:
        while True:
            stop = self._wait()
            if stop.event == PTRACE_EVENT_STOP:
                return
            self._ptrace(PTRACE_CONT, 0, stop.signal)  # a signal-delivery stop: pass the signal on

    def madvise(self, address: int, length: int, advice: int = MADV_DONTNEED) -> int:
        """Step 3: madvise(address, length, advice) run by the thread; its result
        (0, or -errno). Stepped with PTRACE_SYSCALL, never single-stepped: a tracer that
        dies in a syscall stop leaves no signal behind (TRACESYSGOOD's SIGTRAP|0x80 is
        no signal the kernel can send), while one that dies in a single-step stop leaves
        QEMU a SIGTRAP, which kills it."""
        assert self.saved is not None
        regs = self.saved.copy()
        regs.rax, regs.orig_rax, regs.rip = SYS_MADVISE, (1 << 64) - 1, self.site
        regs.rdi, regs.rsi, regs.rdx = address, length, advice
        self._set_regs(regs)
        if not self.calls:
            fault_point("share:injected")
        self._syscall_stop()
        entered = self._regs()
        if _signed(entered.orig_rax) != SYS_MADVISE:
            raise InjectionError(f"QEMU process {self.pid} did not enter the injected madvise "
                                 f"(it entered system call {_signed(entered.orig_rax)})")
        if not self.calls:
            fault_point("share:entered")
        self._syscall_stop()
        after = self._regs()
        if after.rip != self.site + 2:
            raise InjectionError(f"QEMU process {self.pid} did not run the injected madvise "
                                 f"(stopped at {after.rip:#x}, not {self.site + 2:#x})")
        self.calls += 1
        if self.calls == 1:
            fault_point("share:dropped")
        return _signed(after.rax)

    def _syscall_stop(self) -> None:
        """Runs the thread to its next system-call stop; signals that reach it first are
        kept for the end (delivered to it once it is QEMU's own again)."""
        self.moved = True
        self._ptrace(PTRACE_SYSCALL)
        while True:
            stop = self._wait()
            if stop.signal == signal.SIGTRAP | 0x80:
                return
            if stop.event == 0:
                self.pending.append(stop.signal)
            self._ptrace(PTRACE_SYSCALL)

    def release(self) -> None:
        """Step 4: the thread back in an interrupt stop (where it was seized, so the
        kernel restarts its interrupted poll as it would have), its saved registers
        restored, signals sent again, detached."""
        if not self._seized:
            return
        try:
            if not self.stopped:  # let go while busy (seize gave up): stopped first, as detaching needs
                self._stop()
            if self.saved is not None:
                if self.moved:  # it left the interrupt stop it was seized in
                    self._ptrace(PTRACE_INTERRUPT)  # taken as soon as it runs: before user mode
                    self._ptrace(PTRACE_CONT)
                    self._wait_interrupt()
                self._set_regs(self.saved)
                fault_point("share:restored")
            for sig in self.pending:  # queued now, delivered once the thread runs again
                _libc().syscall(SYS_TGKILL, self.pid, self.tid, sig)
            self._ptrace(PTRACE_DETACH)
        except OSError as e:
            if e.errno != 3:  # ESRCH: QEMU died meanwhile, nothing to give back
                raise InjectionError(f"could not release QEMU process {self.pid} ({e.strerror})") from None
        finally:
            self._seized = False

    def __enter__(self) -> "Injector":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
