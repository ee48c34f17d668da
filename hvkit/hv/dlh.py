"""The DLH module: a VM's queue of deferrable hypercalls, and running it.

The queue is a ring in guest memory (struct hv_dlh_ring in sdk/hvkit.h) that the
hypervisor lays out when the VM is initialised. The guest appends entries and moves
`head`, with no exit. When it notifies (a write to the DLH port), the queue is marked
pending; a vCPU of that VM runs it before entering the guest again (see vcpu.py).

Running it: the entries from the hypervisor's own `tail` up to the guest's `head` run in
order; each gets its status and result; then `tail` moves past them. The hypervisor keeps
`tail` and the completion counters itself and only writes them to guest memory, so a guest
that scribbles on them cannot make an entry run twice. A `head` that is behind `tail` or
more than the ring size ahead of it is a guest fault, not something to guess around.
"""

from __future__ import annotations

import struct
import threading

import numpy as np

from hvkit.errors import HvkitError
from hvkit.hv.hypercalls import HypercallHost
from hvkit.hv.machine import DLH_GPA, Machine

DLH_MAGIC = 0x484C44  # "DLH"
HEADER = struct.Struct("<IIQQQQQQQ")  # magic, entries, head, tail, completed, failed, full, notifications, reserved
HEAD_OFFSET, TAIL_OFFSET, COMPLETED_OFFSET, FAILED_OFFSET, FULL_OFFSET, NOTIFICATIONS_OFFSET = (
    8, 16, 24, 32, 40, 48)
ENTRY = np.dtype([("routine", "<u2"), ("arg2", "<u2"), ("status", "<i4"), ("arg0", "<u8"),
                  ("arg1", "<u8"), ("result", "<i8")])
ENTRY_HEAD = struct.Struct("<HHiQQ")
ENTRY_DONE = struct.Struct("<i")
ENTRY_RESULT = struct.Struct("<q")
SMALL_RUN = 16
assert HEADER.size == 64 and ENTRY.itemsize == 32


class GuestFault(HvkitError):
    """The guest broke the hypervisor's rules; that VM is stopped, the others go on."""



class DlhQueue:
    def __init__(self, machine: Machine, entries: int) -> None:
        self.machine = machine
        self.gpa = DLH_GPA
        self.size = entries
        self.tail = 0
        self.completed = 0
        self.failed = 0
        self.pending = False
        self.lock = threading.Lock()
        ram = machine.ram
        ram.write(self.gpa, HEADER.pack(DLH_MAGIC, entries, 0, 0, 0, 0, 0, 0, 0))
        self.ring = np.frombuffer(ram.map, dtype=ENTRY, count=entries, offset=self.gpa + HEADER.size)
        self.ring[:] = 0

    def head(self) -> int:
        return self.machine.ram.u64(self.gpa + HEAD_OFFSET)

    def guest_counter(self, offset: int) -> int:
        """A counter the guest keeps in the header (full, notifications)."""
        return self.machine.ram.u64(self.gpa + offset)

    def run(self, host: HypercallHost) -> None:
        """Run every entry queued so far, in order, exactly once."""
        with self.lock:
            self.pending = False
            head = self.head()
            count = (head - self.tail) % (1 << 64)
            if count > self.size:
                raise GuestFault(f"{self.machine.name}: its DLH queue head {head} is not within "
                                 f"{self.size} entries of the hypervisor's tail {self.tail}",
                                 "the guest overwrote the queue header; check its hv_defer use")
            if count == 0:
                return
            if count <= SMALL_RUN:
                failed = self._run_small(host, count)
            else:
                failed = self._run_vectorised(host, count)
            self.tail += count
            self.completed += count - failed
            self.failed += failed
            ram = self.machine.ram
            ram.set_u64(self.gpa + COMPLETED_OFFSET, self.completed)
            ram.set_u64(self.gpa + FAILED_OFFSET, self.failed)
            ram.set_u64(self.gpa + TAIL_OFFSET, self.tail)
            host.figures.deferred += count
            host.figures.deferred_failed += failed
            host.figures.queue_runs += 1

    def _run_small(self, host: HypercallHost, count: int) -> int:
        """A few entries: one at a time (NumPy's set-up would cost more than the work)."""
        view, failed = self.machine.ram.view, 0
        for seq in range(self.tail, self.tail + count):
            at = self.gpa + HEADER.size + (seq % self.size) * ENTRY.itemsize
            routine, arg2, _, arg0, arg1 = ENTRY_HEAD.unpack_from(view, at)
            result = host.call(routine, arg0, arg1, arg2, True)[0]
            if result < 0:
                failed += 1
                ENTRY_DONE.pack_into(view, at + 4, result)
                ENTRY_RESULT.pack_into(view, at + 24, 0)
            else:
                ENTRY_DONE.pack_into(view, at + 4, 0)
                ENTRY_RESULT.pack_into(view, at + 24, result)
        return failed

    def _run_vectorised(self, host: HypercallHost, count: int) -> int:
        """Many entries: read them at once; consecutive entries of one routine run as one
        batch (a trace appends them all at once), still in queue order."""
        slots = (self.tail + np.arange(count, dtype=np.uint64)) % np.uint64(self.size)
        batch = self.ring[slots]
        results = np.zeros(count, dtype=np.int64)
        routines = batch["routine"]
        starts = np.flatnonzero(np.r_[True, routines[1:] != routines[:-1]])
        ends = np.r_[starts[1:], count]
        for start, end in zip(starts.tolist(), ends.tolist()):
            part = batch[start:end]
            results[start:end] = host.call_batch(int(routines[start]), part["arg0"],
                                                 part["arg1"], part["arg2"])
        errors = results < 0
        self.ring["status"][slots] = np.where(errors, results, 0)
        self.ring["result"][slots] = np.where(errors, 0, results)
        return int(errors.sum())
