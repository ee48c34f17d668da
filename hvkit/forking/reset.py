"""Resetting a fork child: back at its snapshot's exact state.

    reset(child):  hold it; start its next QEMU beside it (qemu.launch.start_successor:
                   it maps the child's snapshot file privately and waits for a device
                   state, while the child still runs)
                   -> the child's QEMU is killed (its own pages, the writes, go with it)
                   -> the next QEMU takes over the child's folder (runtime.SuccessorDir)
                      and loads the snapshot's device state (CPUs and devices as at the
                      fork) by fd, then runs (unless told to stay paused)

So the child is not running only from the kill to the load; its memory is the
snapshot file, untouched, and its devices are the snapshot's. (QEMU 7.2 has no way to
reload a device state into a QEMU that ran: `xen-load-devices-state` aborts it in its
yank code, so a reset cannot keep the child's QEMU.)

It is journaled in the child's intent record (recovered by `finish_reset`): killed
before the child's QEMU is, the next QEMU is stopped and the child runs on; after
that, a next QEMU that took over and loaded the state is kept (and resumed), else the
child is started again from its snapshot. Either way it ends at the snapshot's state.

Only a fork child without a disk is reset: a child of a disk image has written its
own overlay, which a memory reset would leave out of step with its memory.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.forking import pool
from hvkit.forking.written import written_pages
from hvkit.memserver import MemServer
from hvkit.memserver.store import state_file
from hvkit.qemu import VM, find_vm, launch_from_snapshot, receive_state
from hvkit.qemu.launch import start_successor, wait_qmp_ready
from hvkit.qemu.ownership import Ownership
from hvkit.qemu.runtime import RuntimeDir, SuccessorDir
from hvkit.signals import deferred_signals

log = logging.getLogger(__name__)

RECOVER = "hvkit.forking.reset:finish_reset"


@dataclass
class ResetReport:
    vm: str
    snapshot: str
    pages_dropped: int  # pages the child had written (its own copies), dropped
    seconds: float  # from the request until the child runs again (or is ready, paused, if it stays so)
    stopped_seconds: float  # from its old QEMU's kill until its new one runs (or has loaded the state)
    vm_state: str

    def to_json(self) -> dict:
        return asdict(self)


def reset(name: str, paths: Paths | None = None, stay_paused: bool = False) -> ResetReport:
    """Child `name` back at the exact state of the snapshot it started from (see the
    module comment); it runs afterwards if it ran before, unless `stay_paused`."""
    paths = paths or Paths.from_env()
    t0 = time.monotonic()
    vm = find_vm(name, paths)
    _check_resettable(vm, paths)
    with vm.owned("vm reset"), deferred_signals():
        state = _check_resettable(vm, paths)
        own = vm.ownership
        was_running = vm.run_state() == "running"
        run = was_running and not stay_paused
        own.write_intent(op="vm reset", undo="reset", recover=RECOVER, step="prestarting", state=str(state),
                         old_pid=vm.pid, was_running=was_running, run_after=run, machine=asdict(vm.spec))
        successor = _pooled_successor(vm, paths)  # ready: it answered its keeper
        if successor is None:  # no pool of its kind: a QEMU started now
            successor = start_successor(vm)
            try:
                wait_qmp_ready(successor, 30.0)
            except BaseException:
                successor.kill(signal.SIGKILL)
                SuccessorDir(vm.rundir.path).discard()
                own.clear_intent()
                raise
        pages = _pages_written(vm)
        own.update_intent(step="stopping")
        t_stop = time.monotonic()
        os.kill(vm.pid, signal.SIGKILL)  # its writes go with it
        own.update_intent(step="switching")
        rundir = successor.rundir
        assert isinstance(rundir, SuccessorDir)
        successor.rundir = rundir.take_over(successor.spec)
        own.update_intent(step="switched")
        receive_state(successor, state, run=run)
        stopped = time.monotonic() - t_stop
        seconds = time.monotonic() - t0  # the child runs: its old QEMU's exit is not its wait
        vm.wait_gone(30.0)
        own.clear_intent()
        return ResetReport(vm.name, vm.spec.snapshot or "", pages, seconds, stopped, successor.run_state())


def _pages_written(vm: VM) -> int:
    """How many pages the child holds of its own (the writes the reset drops)."""
    try:
        return len(written_pages(vm.pid, vm.spec.ram_file, vm.spec.memory)[0])
    except HvkitError:
        return 0


def _pooled_successor(vm: VM, paths: Paths) -> VM | None:
    """A pooled QEMU (forking/pool.py), its slot bound to the child's snapshot, made the
    child's next QEMU; None when the pool has none of its kind."""
    store, snap = MemServer.of(paths).open_snapshot(vm.spec.snapshot)
    store.close()
    claimed = pool.claim(paths, snap, 1)
    try:
        for entry in claimed:
            try:
                return pool.take_as_successor(entry, vm)
            except (OSError, HvkitError) as e:
                log.warning("VM %s: a pooled QEMU could not be used (%s)", vm.name, e)
        return None
    finally:
        pool.release_claims(paths)  # the rest of its batch: a bound slot serves nothing else


def _check_resettable(vm: VM, paths: Paths) -> Path:
    """The device state file of the snapshot `vm` started from, or a one-line refusal."""
    if vm.spec.ram != "snapshot" or not vm.spec.snapshot or not vm.spec.parent:
        raise HvkitError(f"VM {vm.name!r} is not a fork child: a reset takes a child back to the snapshot it "
                         "started from", "reset a child made by 'hvkit fork' (see the parent column of 'hvkit vm list')")
    if vm.spec.disk:
        raise HvkitError(f"VM {vm.name!r} has a disk of its own: a reset of its memory would leave its disk "
                         "out of step", "fork the parent again for a fresh child ('hvkit fork --snapshot "
                         f"{vm.spec.snapshot}')")
    state = state_file(MemServer.of(paths).store_path, vm.spec.snapshot)
    if not state.is_file():
        raise HvkitError(f"the device state of snapshot {vm.spec.snapshot!r} is gone from the store",
                         "the memory server's store was cleared; fork the parent again")
    return state


def finish_reset(owner: Ownership, journal: dict, paths: Paths) -> None:
    """A reset whose process died (see the module comment)."""
    rundir = RuntimeDir(paths.vm_dir(owner.name))
    step, by = journal.get("step"), f"pid {journal.get('pid', '?')}"
    successor = SuccessorDir(rundir.path)
    if step == "prestarting":
        successor.kill_qemu()
        successor.discard()
        log.warning("the reset of VM %s (%s) died before it stopped the VM: undone, the VM runs on", owner.name, by)
        return
    spec = rundir.read_spec()
    vm = VM(rundir, spec) if spec is not None else None
    if step == "switched" and vm is not None and vm.pid != journal.get("old_pid") \
            and vm.run_state() in ("running", "paused"):
        if journal.get("run_after") and vm.run_state() == "paused":
            vm.qmp("cont")
        log.warning("the reset of VM %s (%s) died once it was done: the VM runs from its snapshot", owner.name, by)
        return
    rundir.kill_qemus()  # the child's old QEMU, and a next one that did not load the state ...
    successor.kill_qemu()  # ... also a pooled one, known by the pid its own spec names
    successor.discard()
    machine = journal["machine"]
    again = launch_from_snapshot(owner.name, machine, machine["snapshot"], Path(machine["ram_file"]),
                                 machine.get("memserver_pid"), machine.get("parent"), paths, in_place=True)
    receive_state(again, Path(journal["state"]), run=bool(journal.get("run_after")))
    log.warning("the reset of VM %s (%s) died at step %r: finished it, the VM runs from its snapshot",
                owner.name, by, step)
