"""Finishing or undoing a fork whose process died (SIGKILL, a crash, a power cut of
the command), from the journal it kept in the VM's intent record (forker.py).

A first fork (a VM with a RAM file) goes through these steps, each recorded before
it is taken:

    pausing   the VM is paused and its device state saved to a staged file; a VM
              with a disk: its disk frozen (hvkit.qemu.disk: the active overlay
              hard-linked as the store's layer, then QEMU switched to a new
              overlay over it; the VM's spec, then this journal, name the new one)
    moving    its RAM file moves into the store (QEMU still maps it, shared)
    stopping  its QEMU ends: from here on nothing maps the file shared
    sealing   the snapshot's table and JSON are written (sealed when the JSON is)
    sealed    children start; the VM is restarted from the frozen file
    restarted the free pages of the frozen file are given back

Up to `moving` the fork is undone: the RAM file moves back (the old QEMU never lost
its mapping) and the VM runs on as before (on its new overlay, if QEMU had switched:
its disk lost nothing either way, and the layer is kept while the overlay needs it).
From `stopping` on it is finished: the snapshot is sealed (again, if need be: sealing
is idempotent) and the VM runs from it. Either way, children that had not finished starting are then stopped (their own
intent records say so: VM.finish_abandoned_children).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.memserver import Store
from hvkit.qemu import VM
from hvkit.qemu.ownership import Ownership
from hvkit.qemu.runtime import RuntimeDir, VMSpec

log = logging.getLogger(__name__)

UNDONE_STEPS = ("pausing", "moving")


def finish_fork(owner: Ownership, journal: dict, paths: Paths) -> None:
    """Undoes or finishes the fork recorded in `journal` for the VM of `owner` (whose
    lock the caller holds, so the fork's process is gone), and stops its children that
    had not finished starting."""
    name, step, by = owner.name, journal.get("step"), f"pid {journal.get('pid', '?')}"
    rundir = RuntimeDir(paths.vm_dir(name))
    old = VM(rundir, VMSpec(**journal["machine"]))  # the VM as the fork found it: its old QEMU
    old_alive = old.qemu_alive()
    try:
        if step in UNDONE_STEPS:
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
    frozen, ram = Path(journal["frozen"]), Path(journal["ram"])
    if frozen.exists() and not ram.exists():
        os.rename(frozen, ram)  # the old QEMU still maps this very file
    Path(journal["state"]).unlink(missing_ok=True)
    spec = rundir.read_spec()
    if old_alive and spec is not None and journal.get("was_running"):
        vm = VM(rundir, spec)
        if vm.run_state() == "paused":
            vm.qmp("cont")


def _finish(rundir: RuntimeDir, journal: dict, paths: Paths) -> str:
    from hvkit.forking.forker import restart_from_frozen  # the forker's own restart

    store = Store(Path(journal["store"]))
    try:
        machine = journal["machine"]
        with store.lock():
            snap = store.freeze_ram_file(Path(journal["frozen"]), machine["memory"], rundir.name,
                                         Path(journal["state"]), machine, journal["fork_id"])
        if journal.get("step") != "restarted":
            spec = rundir.read_spec()
            if spec is not None and spec.pid != journal.get("old_pid"):
                VM(rundir, spec).kill()  # a replacement QEMU that never finished starting
            rundir.kill_qemus()  # also one spawned before its spec was written (the old one is killed)
            rundir.path.mkdir(mode=0o700, exist_ok=True)
            restart_from_frozen(rundir.name, snap, Path(journal["frozen"]), store, paths,
                                run=bool(journal.get("run_after")))
        return snap.name
    finally:
        store.close()
