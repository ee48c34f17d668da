"""The hypercall routines: one table, used both for immediate hypercalls (a port write,
result in rax) and for deferred ones (an entry of the DLH queue, result in the entry).

Numbers, codes and the meaning of each routine are the same as in sdk/hvkit.h (a test
checks that the header and this table agree). Arguments come from the guest and are
checked here: an address outside the guest's usable memory is HV_EFAULT, never a read
of the hypervisor's own memory.
"""

from __future__ import annotations

import logging
import mmap
import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable

import numpy as np

from hvkit.hv.machine import PAGE, Machine

log = logging.getLogger(__name__)

PORT_HYPERCALL = 0x500
PORT_DLH_NOTIFY = 0x501
CONSOLE_WRITE_MAX = 64 * 1024
TRACE_MAX = 1_000_000
MADV_POPULATE_WRITE = 23  # Linux 5.14; older hosts just skip the prefetch


class Routine(IntEnum):
    EXIT = 0
    CONSOLE_WRITE = 1
    TIME = 2
    YIELD = 3
    MEM_HINT = 4
    TRACE = 5


IMMEDIATE_ONLY = frozenset({Routine.EXIT, Routine.YIELD})


class Code(IntEnum):
    OK = 0
    PENDING = 1
    EIO = -5
    EFAULT = -14
    EINVAL = -22
    ENOSYS = -38
    EFULL = -105


class HintKind(IntEnum):
    FREE = 0
    WILLNEED = 1


class Action(IntEnum):
    """What the vCPU does after an immediate hypercall."""
    RESUME = 0
    YIELD = 1
    EXIT = 2


@dataclass
class VmFigures:
    """Per-VM counters; the scheduler adds run time, the vCPUs the rest."""
    run_ns: int = 0
    exits: int = 0
    preemptions: int = 0
    immediate: int = 0
    deferred: int = 0
    deferred_failed: int = 0
    notifications: int = 0
    queue_runs: int = 0
    hinted_free_bytes: int = 0
    immediate_host_ns: int = 0  # host time handling immediate hypercalls (after the exit)
    deferred_host_ns: int = 0   # host time running DLH queues


@dataclass
class HypercallHost:
    """What the routines act on for one VM: its memory, console and trace."""
    machine: Machine
    figures: VmFigures = field(default_factory=VmFigures)
    console: bytearray = field(default_factory=bytearray)
    trace: list[tuple[int, int]] = field(default_factory=list)
    on_console: Callable[[str, bytes], None] | None = None

    def call(self, routine: int, a0: int, a1: int, a2: int, deferred: bool) -> tuple[int, Action]:
        """Run one routine; returns (result or negative code, what the vCPU does next)."""
        try:
            r = Routine(routine)
        except ValueError:
            return Code.ENOSYS, Action.RESUME
        if deferred and r in IMMEDIATE_ONLY:
            return Code.EINVAL, Action.RESUME
        try:
            if r is Routine.EXIT:
                return a0 - (1 << 64) if a0 >> 63 else a0, Action.EXIT
            if r is Routine.YIELD:
                return Code.OK, Action.YIELD
            if r is Routine.CONSOLE_WRITE:
                return self._console_write(a0, a1), Action.RESUME
            if r is Routine.TIME:
                return time.monotonic_ns(), Action.RESUME
            if r is Routine.MEM_HINT:
                return self._mem_hint(a0, a1, a2), Action.RESUME
            if r is Routine.TRACE:
                return self._trace(a0, a1), Action.RESUME
        except OSError as e:  # the host refused (madvise): the routine failed, the VM goes on
            log.warning("%s: routine %s failed: %s", self.machine.name, r.name, e)
            return Code.EIO, Action.RESUME
        return Code.ENOSYS, Action.RESUME

    def call_batch(self, routine: int, a0: np.ndarray, a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
        """Run one routine for consecutive deferred entries; their results in order.
        Routines with a vectorised form run as one step; the others entry by entry."""
        n = len(a0)
        if routine == Routine.TRACE and len(self.trace) + n <= TRACE_MAX:
            first = len(self.trace)
            self.trace.extend(zip(a0.tolist(), a1.tolist()))
            return np.arange(first, first + n, dtype=np.int64)
        if routine == Routine.TIME:
            return np.full(n, time.monotonic_ns(), dtype=np.int64)
        out = np.empty(n, dtype=np.int64)
        for i, (x, y, z) in enumerate(zip(a0.tolist(), a1.tolist(), a2.tolist())):
            value = self.call(routine, x, y, z, True)[0]
            out[i] = value if value < 2**63 else -1
        return out

    def _console_write(self, gpa: int, length: int) -> int:
        if length > CONSOLE_WRITE_MAX:
            return Code.EINVAL
        if not self.machine.ram.contains(gpa, length):
            return Code.EFAULT
        data = self.machine.ram.read(gpa, length)
        self.console += data
        if self.on_console is not None:
            self.on_console(self.machine.name, data)
        return length

    def _mem_hint(self, gpa: int, length: int, kind: int) -> int:
        m = self.machine
        if gpa % PAGE or length % PAGE or length == 0:
            return Code.EINVAL
        if not (m.heap_start <= gpa and gpa + length <= m.heap_end):
            return Code.EFAULT  # only the heap: never the page tables, queue, program or stacks
        if kind == HintKind.FREE:
            m.ram.map.madvise(mmap.MADV_DONTNEED, gpa, length)
            self.figures.hinted_free_bytes += length
        elif kind == HintKind.WILLNEED:
            try:
                m.ram.map.madvise(MADV_POPULATE_WRITE, gpa, length)
            except OSError:
                pass  # older host: the pages come in when touched, as before
        else:
            return Code.EINVAL
        return length

    def _trace(self, a: int, b: int) -> int:
        if len(self.trace) >= TRACE_MAX:
            return Code.EFULL
        self.trace.append((a, b))
        return len(self.trace) - 1
