"""Forking a running VM into N children that share what they only read.

    fork(vm):  hold the VM (no other hvkit command touches it meanwhile), pause it,
               save its device state (QEMU, without RAM), snapshot its memory on the
               memory server:
                 a VM with a RAM file: the file moves into the store (no copy) and
                 its QEMU ends (so nothing maps it shared any more); then one top-level
                 table of large entries over it seals the snapshot;
                 a forked VM: its parent snapshot's top-level table is copied and
                 only the pages it wrote (from its QEMU process) are added
               -> start N children from the snapshot (share=off: the host shares
                  the pages they only read; each one's writes stay its own)
               -> the VM goes on: a VM with a RAM file in a new QEMU that maps the
                  frozen file privately, straight from the store (so it needs no
                  memory server); a forked VM simply runs on. Unless told to stay paused.
               -> a frozen RAM file's free pages (found by identify) become holes:
                  they read as the zero frame, and the host holds nothing for them

A fork is a transaction: before each step it records where it is (the VM's intent
record, ownership.py), so whatever moment it dies at, the next hvkit command that
touches the VM either undoes it (the VM runs on as before: nothing was frozen yet) or
finishes it (the snapshot is sealed and the VM runs from it); see recovery.py.
Children that had not finished starting are stopped.

A VM of a disk image (hvkit.qemu.imagevm) has its disk frozen at the same moment as
its memory: a read-only layer kept in the store beside the snapshot, for as long as
the snapshot is (so `fork --snapshot` finds it); the VM goes on on a new overlay. Each
child gets an overlay of its own over the layer, its own ssh port, MAC and VM
generation id, and its clock set; children start one after the other's QEMU is up,
and settle (agent, clock, MAC, address) side by side.

Children are named <vm>-1, <vm>-2, ... (the next free numbers).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.forking import disks, pool, settle
from hvkit.forking.written import read_pages, written_pages
from hvkit.leftovers import remove_staged_states
from hvkit.memserver import MemServer, Snapshot, Store
from hvkit.memserver.store import disk_layer
from hvkit.qemu import VM, find_vm, launch_from_snapshot, receive_state
from hvkit.qemu.launch import start_successor, wait_qmp_ready
from hvkit.qemu.ownership import Ownership, fault_point
from hvkit.qemu.runtime import SuccessorDir, check_name
from hvkit.signals import deferred_signals
from hvkit.sharing.freepages import give_back_free_pages_of_file

log = logging.getLogger(__name__)

# what finishes or undoes a fork whose process died: named in its journal, so that the
# QEMU engine hands the journal over without importing the fork package
RECOVER = "hvkit.forking.recovery:finish_fork"


@dataclass(frozen=True)
class ChildStarted:
    name: str
    pid: int
    seconds: float  # from the fork request until the child runs
    ready_seconds: float  # ... until it is settled too (a disk VM: its clock, MAC and address)


@dataclass
class ForkReport:
    vm: str
    snapshot: str
    n: int
    froze_ram_file: bool  # the VM's RAM file became the snapshot (its first fork)
    pages_written: int  # pages the VM wrote since it was born (a forked VM only)
    snapshot_seconds: float  # pause -> snapshot sealed
    parent_paused_seconds: float  # how long the VM itself was not running
    vm_state: str  # the VM's run state after the fork
    counters: dict = field(default_factory=dict)
    children: list[ChildStarted] = field(default_factory=list)
    server_pid: int = 0
    free_pages: int = 0  # a frozen RAM file: pages on the guest's free lists at the fork
    free_pages_given_back: int = 0  # of those, pages punched out of it (read as the zero frame)
    free_pages_note: str = ""  # why free pages were kept, if they were
    # where the parent's pause went: seconds from the pause to the end of each step
    # (stopped, state_saved, moved, old_qemu_ended, sealed, state_loaded, resumed)
    pause_steps: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


ChildCallback = Callable[[ChildStarted], None]


def child_names(prefix: str, n: int, paths: Paths) -> list[str]:
    """The next `n` free names <prefix>-1, <prefix>-2, ..."""
    if not 1 <= n <= 64:
        raise HvkitError(f"invalid number of children {n}", "give 1 to 64")
    names, k = [], 1
    while len(names) < n:
        name = f"{prefix}-{k}"
        if not paths.vm_dir(name).exists():
            names.append(check_name(name))
        k += 1
    return names


def start_children(snapshot: Snapshot, names: list[str], server: MemServer, server_pid: int,
                   parent: str | None, paths: Paths, t0: float,
                   on_child: ChildCallback | None = None) -> list[ChildStarted]:
    """Starts one VM per name from `snapshot`, all at once; each as soon as it can.
    If one fails, the others are stopped too. Each child is held while it starts, with
    an intent to stop it: a child whose start was cut short never stays half-started."""
    state = server.state_file(snapshot.name)
    ram_file = server.snapshot_file(snapshot.name)
    started: list[VM] = []
    first_runs = threading.Event()
    claimed = pool.claim(paths, snapshot, len(names))  # QEMUs ready for them, if the pool has any
    pooled = dict(zip(names, claimed))

    def one(name: str) -> ChildStarted:
        owner = Ownership(paths.runtime, name)
        with owner.hold("fork child"):
            owner.write_intent(op="fork child", undo="stop")
            vm = _pooled_child(pooled.pop(name, None), name, snapshot, server_pid, parent, paths)
            if vm is None:  # none in the pool: a QEMU started now
                vm = launch_from_snapshot(name, snapshot.machine, snapshot.name, ram_file, server_pid,
                                          parent, paths)
            started.append(vm)
            fault_point("fork child launched")
            receive_state(vm, state)
            running = time.monotonic() - t0
            first_runs.set()
            if vm.spec.disk:
                settle.settle_child(vm)
            owner.clear_intent()
        done = ChildStarted(name, vm.pid or 0, running, time.monotonic() - t0)
        if on_child:
            on_child(done)
        return done

    try:
        # the first child alone until it runs, so that it does not wait for the CPU
        # behind the others' QEMU start-up; then all the others at once (while the
        # first one settles, if it has a disk)
        with ThreadPoolExecutor(max_workers=max(1, len(names))) as workers:
            first = workers.submit(one, names[0])
            first.add_done_callback(lambda _: first_runs.set())  # it failed, or ran and settled
            first_runs.wait()
            if first.done():
                first.result()  # its error, if it failed, before any other starts
            rest = [workers.submit(one, name) for name in names[1:]]
            return [first.result()] + [f.result() for f in rest]
    except BaseException:
        for vm in started:
            vm.stop()
        raise
    finally:
        # claimed and not taken (a batch larger than needed, or children that never started)
        pool.stop_entries_of(claimed[len(names):] + list(pooled.values()))
        pool.release_claims(paths)
        pool.ensure_keeper(paths)  # a configured pool refills (its keeper runs from here on)


def _pooled_child(entry: Path | None, name: str, snapshot: Snapshot, server_pid: int, parent: str | None,
                  paths: Paths) -> VM | None:
    """Child `name` in pooled QEMU `entry` (its slot bound to `snapshot`), or None."""
    if entry is None:
        return None
    try:
        return pool.take(entry, name, snapshot, server_pid, parent, paths)
    except (OSError, HvkitError) as e:
        log.warning("child %s: its pooled QEMU could not be used (%s); starting one", name, e)
        pool.stop_entries_of([entry])
        return None


def fork(name: str, n: int, paths: Paths | None = None, stay_paused: bool = False,
         on_child: ChildCallback | None = None, give_back_free: bool = True) -> ForkReport:
    """Forks VM `name` into `n` children; see the module comment. The VM then runs
    again if it ran before, unless `stay_paused`. With `give_back_free`, a frozen RAM
    file's free pages are then punched out of it."""
    paths = paths or Paths.from_env()
    t0 = time.monotonic()
    vm = find_vm(name, paths)
    _check_forkable(vm)
    server = MemServer.of(paths)
    server_pid = server.start()
    store = server.store()
    remove_staged_states(paths.runtime)  # forks killed before (hvkit.leftovers)
    try:
        # held from here to the end (a second fork, a share or a stop waits), and an
        # interrupt waits until the fork is done
        with vm.owned("fork"), deferred_signals():
            _check_forkable(vm)  # it may have changed while we waited for it
            names = child_names(name, n, paths)
            was_running = vm.run_state() == "running"
            fork_step = _fork_ram_file if vm.spec.ram == "file" else _fork_forked
            report = fork_step(vm, store, server, server_pid, names, paths, t0, was_running,
                               was_running and not stay_paused, on_child, give_back_free)
        report.server_pid = server_pid
        return report
    finally:
        store.close()


def _check_forkable(vm: VM) -> None:
    if vm.attached:
        raise HvkitError(f"VM {vm.name!r} was attached, not started by hvkit: a fork restarts its VM from "
                         "the snapshot, and hvkit never restarts a VM it did not start",
                         "start the VM with 'hvkit vm start' to fork it")
    if vm.spec.ram not in ("file", "snapshot"):
        raise HvkitError(f"VM {vm.name!r} keeps its RAM inside QEMU (ram={vm.spec.ram!r}); hvkit forks "
                         "VMs whose RAM is a file", "start it with the default RAM")


def _fork_ram_file(vm: VM, store: Store, server: MemServer, server_pid: int, names: list[str],
                   paths: Paths, t0: float, was_running: bool, run_after: bool,
                   on_child: ChildCallback | None, give_back_free: bool) -> ForkReport:
    """The first fork of a VM (see the module comment); each step is recorded first.
    The VM goes on before its children start: in its next QEMU, started before the
    pause (a VM without a disk), or restarted from the frozen file."""
    own = vm.ownership
    fork_id = new_fork_id()
    frozen, state = store.frozen_path(fork_id), store.staged_state(fork_id)
    # a disk is frozen only once the fork goes forward (its QEMU ended): an undone fork
    # leaves the VM's disk chain as it was; the names are chosen now, for the journal
    plan = disks.plan_disk_freeze(vm, disk_layer(store.path, fork_id)) if vm.spec.disk else {}
    # a VM with a disk gets its next QEMU only after the fork: that QEMU opens the new
    # overlay, which exists once the disk is frozen
    successor = None
    journal = dict(op="fork", undo="fork", recover=RECOVER, fork_id=fork_id, ram=str(vm.ram_path),
                   frozen=str(frozen), state=str(state), old_pid=vm.pid, was_running=was_running,
                   run_after=run_after, store=str(store.path), machine=asdict(vm.spec), children=names,
                   successor=not plan, **plan)
    if not plan:
        own.write_intent(step="prestarting", **journal)
        try:
            successor = start_successor(vm)
        except HvkitError as e:  # the fork goes on: the VM is restarted after it
            log.warning("VM %s: its next QEMU did not start (%s); it will be restarted after the fork", vm.name, e)
    own.write_intent(step="pausing", **journal)
    if successor is not None:
        try:
            wait_qmp_ready(successor, 30.0)
        except HvkitError as e:
            log.warning("VM %s: its next QEMU did not start (%s); it will be restarted after the fork", vm.name, e)
            successor = _drop_successor(successor)
    t_pause = time.monotonic()
    steps = {}
    vm.save_state(state, pause_first=was_running)
    steps["state_saved"] = time.monotonic() - t_pause
    own.update_intent(step="moving")
    os.rename(vm.ram_path, frozen)  # QEMU still maps it; the name moves, not the data
    steps["moved"] = time.monotonic() - t_pause
    # from here on the fork only goes forward: the old QEMU ends, and with it the
    # last shared (writable) mapping of the frozen file; only then is it sealed
    own.update_intent(step="stopping")
    os.kill(vm.pid, signal.SIGKILL)  # paused, its state saved: nothing to shut down politely
    again = None
    if successor is not None:
        # the VM goes on in its next QEMU while the old one exits (paused, it writes
        # nothing more; the new one's writes are its own): it needs no sealed snapshot
        again = _take_over(successor, state, frozen, own, run_after, steps, t_pause)
    if not vm.wait_gone(30.0):
        raise HvkitError(f"the old QEMU of VM {vm.name!r} (pid {vm.pid}) did not end within 30 s of SIGKILL",
                         "the next hvkit command on the VM finishes the fork")
    steps["old_qemu_ended"] = time.monotonic() - t_pause
    own.update_intent(step="sealing")
    if plan:
        # the disk of this moment (QEMU flushed it when it paused): the children's, under
        # the VM's new overlay; a recovery does again what is not done
        disks.freeze_stopped_disk_of(plan)
    machine = disks.machine_after_freeze(asdict(vm.spec), plan)
    with store.lock():
        snap = store.freeze_ram_file(frozen, vm.spec.memory, vm.name, state, machine, fork_id)
    own.update_intent(step="sealed", snapshot=snap.name)
    snapshot_seconds = steps["sealed"] = time.monotonic() - t_pause
    report = ForkReport(vm.name, snap.name, len(names), True, 0, snapshot_seconds, 0.0, "", asdict(snap.counters))
    if again is not None:
        name_snapshot(again, snap.name)
    else:  # the VM goes on before its children start (an image VM's settle while it runs)
        again = restart_from_frozen(vm.name, snap, frozen, store, paths, run_after, set_clock=False)
        own.update_intent(step="restarted")
        steps["resumed"] = time.monotonic() - t_pause
    report.vm_state = again.run_state()
    report.parent_paused_seconds = steps["resumed"] if report.vm_state == "running" else 0.0
    report.pause_steps = steps
    clock = _set_clock_meanwhile(again) if again.spec.disk and run_after else None
    try:
        report.children = start_children(snap, names, server, server_pid, vm.name, paths, t0, on_child)
    finally:
        if clock is not None:
            clock.join()
    if give_back_free:
        _give_back_free_pages(report, frozen, Path(vm.spec.kernel), paths)
    own.clear_intent()
    return report


def _take_over(successor: VM, state: Path, frozen: Path, own: Ownership, run: bool, steps: dict,
               t_pause: float) -> VM | None:
    """The VM's next QEMU (started before the pause) takes over the VM's folder (its
    files renamed into place, the spec naming it written last), then loads the device
    state `state` and runs (if `run`), in one QMP session; None if it could not (it is
    stopped: the VM is restarted from the frozen file once that is sealed). Recorded
    as "switched" once the spec names it: from then on a recovery keeps it (resumes
    it), or, if it has not loaded the state yet, replaces it (it never ran)."""
    own.update_intent(step="switching")
    rundir = successor.rundir
    assert isinstance(rundir, SuccessorDir)
    try:
        successor.spec.ram_file = str(frozen)
        successor.rundir = rundir.take_over(successor.spec)
    except OSError as e:
        log.warning("VM %s: its next QEMU could not take over (%s); restarting it from the snapshot",
                    successor.name, e)
        return _drop_successor(successor)
    own.update_intent(step="switched", switched=True)
    try:
        receive_state(successor, state, run=run)
    except HvkitError as e:
        log.warning("VM %s: its next QEMU could not load its state (%s); restarting it from the snapshot",
                    successor.name, e)
        successor.kill(signal.SIGKILL)
        own.update_intent(step="stopping", switched=False)
        return None
    steps["resumed"] = time.monotonic() - t_pause
    return successor


def name_snapshot(vm: VM, snapshot: str) -> None:
    """Records in the spec of a VM that runs from its own frozen RAM file (a successor
    took over before the seal) the snapshot that file became."""
    if vm.spec.snapshot != snapshot:
        vm.spec.snapshot = snapshot
        vm.rundir.write_spec(vm.spec)


def _drop_successor(successor: VM) -> None:
    """Stops a next QEMU that will not take over, and removes its files."""
    successor.kill(signal.SIGKILL)
    rundir = successor.rundir
    if isinstance(rundir, SuccessorDir):
        rundir.kill_qemu()
        rundir.discard()
    return None


def _set_clock_meanwhile(vm: VM) -> threading.Thread:
    """The clock of a VM with a disk set through its agent while its children start."""
    thread = threading.Thread(target=settle.set_clock, args=(vm,), name=f"clock-{vm.name}", daemon=True)
    thread.start()
    return thread


def new_fork_id() -> str:
    """A fork's id: its staged files carry it, and with it the forking process's pid
    (hvkit.leftovers removes them once that process is gone and no journal names them)."""
    return f"{time.time_ns()}-{os.getpid()}"


def restart_from_frozen(name: str, snap: Snapshot, frozen: Path, store: Store, paths: Paths,
                        run: bool, set_clock: bool = True) -> VM:
    """The VM `name` again, in its own folder, from the snapshot its RAM file became:
    a new QEMU maps the frozen file privately, straight from the store (its writes stay
    its own; it needs no memory server, so the server's death does not take it)."""
    again = launch_from_snapshot(name, snap.machine, snap.name, frozen, None,
                                    snap.machine.get("parent"), paths, in_place=True)
    receive_state(again, store.state_file(snap.name), run=run)
    if again.spec.disk and run and set_clock:
        settle.set_clock(again)
    return again


def _give_back_free_pages(report: ForkReport, frozen: Path, kernel: Path, paths: Paths) -> None:
    """Free pages of the frozen RAM file become holes: they read as the zero frame and
    the host holds nothing for them. Done after the children run (it reads the page
    array of the whole guest: it grows with memory size). A free page's content does not
    matter to the guest; a guest where it does (page poisoning) is left as it is."""
    try:
        report.free_pages, report.free_pages_given_back = give_back_free_pages_of_file(frozen, kernel, paths)
    except HvkitError as e:
        report.free_pages_note = f"free pages kept: {e}"
        log.warning("%s", report.free_pages_note)


def _fork_forked(vm: VM, store: Store, server: MemServer, server_pid: int, names: list[str],
                 paths: Paths, t0: float, was_running: bool, run_after: bool,
                 on_child: ChildCallback | None, give_back_free: bool) -> ForkReport:
    """A forked VM: its pages are read while it is paused; it runs on from its own memory.
    Journaled too (recovery.py): until the snapshot is sealed the fork is undone (its
    staged state removed, the VM resumed, its disk untouched); once sealed, the VM's
    disk is switched to a new overlay over the frozen layer before it runs again."""
    own = vm.ownership
    fork_id = new_fork_id()
    state = store.staged_state(fork_id)
    plan = disks.plan_disk_freeze(vm, disk_layer(store.path, fork_id)) if vm.spec.disk else {}
    own.write_intent(op="fork", undo="fork", recover=RECOVER, kind="forked", step="pausing", fork_id=fork_id, state=str(state),
                     was_running=was_running, run_after=run_after, store=str(store.path),
                     machine=asdict(vm.spec), children=names, **plan)
    t_pause = time.monotonic()
    steps = {}
    try:
        vm.save_state(state, pause_first=was_running)
        steps["state_saved"] = time.monotonic() - t_pause
        own.update_intent(step="sealing")
        pages, start = written_pages(vm.pid, vm.spec.ram_file, vm.spec.memory)
        steps["pages_found"] = time.monotonic() - t_pause
        with store.lock():  # the pages read straight into their place in the store
            parent = store.snapshot(vm.spec.snapshot)
            snap = store.fork_pages(parent, pages, lambda out: read_pages(vm.pid, start, pages, out), vm.name,
                                    state, disks.machine_after_freeze(asdict(vm.spec), plan), fork_id)
        own.update_intent(step="sealed", snapshot=snap.name)
        if plan:
            disks.switch_disk(vm, plan)  # before anything runs on the frozen layer
        snapshot_seconds = steps["sealed"] = time.monotonic() - t_pause
        report = ForkReport(vm.name, snap.name, len(names), False, len(pages), snapshot_seconds, 0.0, "",
                            asdict(snap.counters))
    except BaseException:
        state.unlink(missing_ok=True)
        if run_after and vm.is_alive():
            vm.qmp("cont")
        own.clear_intent()
        raise
    state.unlink(missing_ok=True)  # sealed: the snapshot has its own name of it
    if run_after:
        vm.qmp("cont")  # it runs on from its own memory, untouched by the fork, before its children start
    steps["resumed"] = time.monotonic() - t_pause
    report.vm_state = vm.run_state()
    report.parent_paused_seconds = steps["resumed"] if report.vm_state == "running" else 0.0
    report.pause_steps = steps
    try:
        report.children = start_children(snap, names, server, server_pid, vm.name, paths, t0, on_child)
    finally:
        own.clear_intent()
    return report
