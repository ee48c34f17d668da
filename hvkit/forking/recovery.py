"""Finishing or undoing a fork whose process died (SIGKILL, a crash, a power cut of
the command), from the journal it kept in the VM's intent record (forker.py).

A first fork (a VM with a RAM file) goes through these steps, each recorded before
it is taken:

    prestarting  a VM without a disk: its next QEMU starts beside the current one (its
              own sockets, log and spec: qemu.runtime.SuccessorDir), mapping the RAM
              file privately, and waits for the device state
    pausing   the VM is paused and its device state saved to a staged file (the
              journal names it, and for a VM with a disk the names its disk will be
              frozen under: old_disk, disk_layer, new_disk)
    moving    its RAM file moves into the store (QEMU still maps it, shared)
    stopping  its QEMU is killed: once it is gone nothing maps the file shared
    switching (a next QEMU) it loads the device state and takes over the folder (its
              files renamed into place, the spec naming it written last)
    switched  (recorded with switched=true, kept by the later steps) the VM runs in
              its next QEMU, from the frozen file, while the old QEMU exits
    sealing   a VM with a disk: its disk frozen (hvkit.qemu.disk.freeze_stopped_disk:
              the overlay, flushed when QEMU paused, hard-linked as the store's
              layer; a new overlay over it for the VM's next QEMU); then the
              snapshot's table and JSON are written (sealed when the JSON is)
    sealed    the old QEMU gone, the snapshot sealed; a VM that did not switch (one
              with a disk) is now restarted from the frozen file, then
    restarted children start (at `sealed`, for a VM that switched); the free pages
              of the frozen file are given back

Up to `moving` the fork is undone: a next QEMU is stopped and its files removed, the
RAM file moves back (the old QEMU never lost its mapping), the staged state is
removed and the VM runs on as before, on the very
disk chain it had (the disk is touched only after the point of no return, so no
layer is added and no disk data can be lost: before it, QEMU writes where it always
did; after it, nothing writes the old overlay any more and every step only adds a
name or a new empty file). From `stopping` on it is finished: the disk frozen and the
snapshot sealed (again, if need be: both are idempotent) and the VM runs from it (a
next QEMU that had not taken over is stopped and the VM restarted from the frozen
file: it had not run yet, so nothing of the guest is lost; once `switched`, or at
`restarted`, the VM's new QEMU is kept and only resumed).

A fork of a VM that runs from a snapshot (kind "forked": its QEMU goes on) has the
steps pausing (paused, state staged), sealing (its written pages stored, the
snapshot sealed) and sealed (its disk switched live to a new overlay over the frozen
layer, then children start). Until the snapshot is sealed it is undone (staged state
removed, the VM resumed on its unchanged disk); once it is, the disk switch is
finished (QEMU says whether it switched) before the VM runs again.

Either way, children that had not finished starting are then stopped (their own
intent records say so: VM.finish_abandoned_children).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.forking import disks
from hvkit.memserver import Store
from hvkit.qemu import VM
from hvkit.qemu.ownership import Ownership
from hvkit.qemu.runtime import RuntimeDir, SuccessorDir, VMSpec

log = logging.getLogger(__name__)

UNDONE_STEPS = ("prestarting", "pausing", "moving")


def finish_fork(owner: Ownership, journal: dict, paths: Paths) -> None:
    """Undoes or finishes the fork recorded in `journal` for the VM of `owner` (whose
    lock the caller holds, so the fork's process is gone), and stops its children that
    had not finished starting."""
    name, step, by = owner.name, journal.get("step"), f"pid {journal.get('pid', '?')}"
    rundir = RuntimeDir(paths.vm_dir(name))
    old = VM(rundir, VMSpec(**journal["machine"]))  # the VM as the fork found it: its old QEMU
    old_alive = old.qemu_alive()
    try:
        if journal.get("kind") == "forked":
            _finish_forked(old, journal, paths)
        elif step in UNDONE_STEPS:
            _undo(rundir, journal, old_alive)
            log.warning("the fork of VM %s (%s) died before its snapshot was sealed: undone, %s", name, by,
                        "the VM runs on as before" if old_alive else "but its QEMU is gone too")
        else:
            if old_alive:  # paused, its state saved; it must not map the file shared past here
                old.kill(signal.SIGKILL)
            snap = _finish(rundir, journal, paths)
            log.warning("the fork of VM %s (%s) died at step %r: finished it, snapshot %s is sealed and "
                        "%s runs from it", name, by, step, snap, name)
    except HvkitError as e:
        log.warning("the fork of VM %s (%s) died at step %r and could not be finished: %s", name, by, step, e)


def _undo(rundir: RuntimeDir, journal: dict, old_alive: bool) -> None:
    successor = SuccessorDir(rundir.path)
    successor.kill_qemu()  # the VM's next QEMU, started before the pause
    successor.discard()
    frozen, ram = Path(journal["frozen"]), Path(journal["ram"])
    if frozen.exists() and not ram.exists():
        os.rename(frozen, ram)  # the old QEMU still maps this very file
    Path(journal["state"]).unlink(missing_ok=True)
    spec = rundir.read_spec()
    if old_alive and spec is not None and journal.get("was_running"):
        vm = VM(rundir, spec)
        if vm.run_state() == "paused":
            vm.qmp("cont")


def _finish_forked(vm: VM, journal: dict, paths: Paths) -> None:
    """A fork of a VM that runs from a snapshot: undone unless its snapshot is sealed;
    if it is, the VM's disk switch is finished. The VM then runs if it ran before."""
    store = Store(Path(journal["store"]))
    try:
        snap = store.snapshot_of_fork(journal["fork_id"])
    finally:
        store.close()
    Path(journal["state"]).unlink(missing_ok=True)  # sealed (it has its own name then) or not needed
    spec = vm.rundir.read_spec()
    if spec is None or not vm.qemu_alive():
        log.warning("the fork of VM %s (pid %s) died, and so did the VM", vm.name, journal.get("pid", "?"))
        return
    vm = VM(vm.rundir, spec)
    if snap is not None and journal.get("disk_layer"):
        disks.switch_disk(vm, journal)
    if journal.get("was_running" if snap is None else "run_after") and vm.run_state() == "paused":
        vm.qmp("cont")
    log.warning("the fork of VM %s (pid %s) died at step %r: %s", vm.name, journal.get("pid", "?"),
                journal.get("step"), f"finished it, snapshot {snap.name} is sealed" if snap else
                "undone, the VM runs on as before")


def _finish(rundir: RuntimeDir, journal: dict, paths: Paths) -> str:
    from hvkit.forking.forker import name_snapshot, restart_from_frozen  # the forker's own steps

    store = Store(Path(journal["store"]))
    try:
        if journal.get("disk_layer"):
            disks.freeze_stopped_disk_of(journal)  # idempotent: done again, it does what is left
        machine = disks.machine_after_freeze(journal["machine"], journal)
        with store.lock():
            snap = store.freeze_ram_file(Path(journal["frozen"]), machine["memory"], rundir.name,
                                         Path(journal["state"]), machine, journal["fork_id"])
        Path(journal["state"]).unlink(missing_ok=True)  # a seal done before the kill keeps it otherwise
        spec = rundir.read_spec()
        switched = journal.get("switched") and spec is not None and VM(rundir, spec).run_state() in (
            "running", "paused")  # its next QEMU took over and loaded the state (else: it never ran)
        if not switched and journal.get("step") != "restarted":
            if spec is not None and spec.pid != journal.get("old_pid"):
                VM(rundir, spec).kill()  # a replacement QEMU that never finished starting
            rundir.kill_qemus()  # also one spawned before its spec was written (the old one is killed)
            rundir.path.mkdir(mode=0o700, exist_ok=True)
            restart_from_frozen(rundir.name, snap, Path(journal["frozen"]), store, paths,
                                run=bool(journal.get("run_after")))
        else:  # its new QEMU took over, and may not have been resumed yet
            vm = VM(rundir, spec) if spec is not None else None
            if vm is not None and vm.is_alive():
                name_snapshot(vm, snap.name)
                if journal.get("run_after") and vm.run_state() == "paused":
                    vm.qmp("cont")
        return snap.name
    finally:
        store.close()
