"""Forking a running VM into N children that share what they only read.

    fork(vm):  pause it -> save its device state (QEMU, without RAM)
               -> snapshot its memory on the memory server:
                    a VM with a RAM file: the file moves into the store (no copy) and
                    one top-level table of large entries maps it;
                    a forked VM: its parent snapshot's top-level table is copied and
                    only the pages it wrote (from its QEMU process) are added
               -> start N children from the snapshot (share=off: the host shares
                  the pages they only read; each one's writes stay its own)
               -> the VM goes on: a VM with a RAM file is restarted in its own place
                  from the snapshot (its RAM file is the snapshot now); a forked VM
                  simply runs on. Unless told to stay paused.
               -> a frozen RAM file's free pages (found by identify) become holes:
                  they read as the zero frame, and the host holds nothing for them

Children are named <vm>-1, <vm>-2, ... (the next free numbers).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.fork.written import written_pages
from hvkit.memserver import MemServer, Snapshot, Store
from hvkit.qemu import VM
from hvkit.qemu.runtime import check_name
from hvkit.share.sharer import give_back_free_pages_of_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChildStarted:
    name: str
    pid: int
    seconds: float  # from the fork request until the child runs


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
    If one fails, the others are stopped too."""
    state = server.state_file(snapshot.name)
    ram_file = server.snapshot_file(snapshot.name)
    started: list[VM] = []

    def one(name: str) -> ChildStarted:
        vm = VM.launch_from_snapshot(name, snapshot.machine, snapshot.name, ram_file, server_pid,
                                     parent, paths)
        started.append(vm)
        vm.receive_state(state)
        done = ChildStarted(name, vm.pid or 0, time.monotonic() - t0)
        if on_child:
            on_child(done)
        return done

    try:
        # the first child alone, so that it does not wait for the CPU behind the
        # others' QEMU start-up; then all the others at once
        first = [one(names[0])] if names else []
        with ThreadPoolExecutor(max_workers=max(1, len(names) - 1)) as pool:
            return first + list(pool.map(one, names[1:]))
    except BaseException:
        for vm in started:
            vm.stop()
        raise


def fork(name: str, n: int, paths: Paths | None = None, stay_paused: bool = False,
         on_child: ChildCallback | None = None, give_back_free: bool = True) -> ForkReport:
    """Forks VM `name` into `n` children; see the module comment. The VM then runs
    again if it ran before, unless `stay_paused`. With `give_back_free`, a frozen RAM
    file's free pages are then punched out of it."""
    paths = paths or Paths.from_env()
    t0 = time.monotonic()
    vm = VM.attach(name, paths)
    if vm.spec.ram not in ("file", "snapshot"):
        raise HvkitError(f"VM {name!r} keeps its RAM inside QEMU (ram={vm.spec.ram!r}); hvkit forks "
                         "VMs whose RAM is a file", "start it with the default RAM")
    names = child_names(name, n, paths)
    server = MemServer.of(paths)
    server_pid = server.start()
    store = server.store()
    try:
        was_running = vm.run_state() == "running"
        if was_running:
            vm.pause()
        paused_at = time.monotonic()
        if vm.spec.ram == "file":
            report = _fork_ram_file(vm, store, server, server_pid, names, paths, t0,
                                    was_running and not stay_paused, on_child, give_back_free)
        else:
            report = _fork_forked(vm, store, server, server_pid, names, paths, t0,
                                  was_running and not stay_paused, on_child)
        report.parent_paused_seconds = time.monotonic() - paused_at if report.vm_state == "running" else 0.0
        report.server_pid = server_pid
        return report
    finally:
        store.close()


def _save_state(vm: VM, store: Store) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{vm.name}.", suffix=".state", dir=store.path / "snapshots")
    os.close(fd)
    vm.save_state(Path(tmp))
    return Path(tmp)


def _fork_ram_file(vm: VM, store: Store, server: MemServer, server_pid: int, names: list[str],
                   paths: Paths, t0: float, run_after: bool,
                   on_child: ChildCallback | None, give_back_free: bool) -> ForkReport:
    t_pause = time.monotonic()
    try:
        state = _save_state(vm, store)
        with store.lock():
            snap = store.freeze_ram_file(vm.ram_path, vm.spec.memory, vm.name, state, asdict(vm.spec))
    except BaseException:
        if run_after:
            vm.resume()  # nothing was frozen: the VM goes on as it was
        raise
    snapshot_seconds = time.monotonic() - t_pause
    report = ForkReport(vm.name, snap.name, len(names), True, 0, snapshot_seconds, 0.0, "", asdict(snap.counters))
    try:
        report.children = start_children(snap, names, server, server_pid, vm.name, paths, t0, on_child)
    finally:
        # whatever happened to the children, the VM comes back, in its own place,
        # from the snapshot its RAM file became
        report.vm_state = _restart_in_place(vm, snap, server, server_pid, paths, run=run_after)
    if give_back_free:
        _give_back_free_pages(report, store, snap, Path(vm.spec.kernel), paths)
    return report


def _give_back_free_pages(report: ForkReport, store: Store, snap: Snapshot, kernel: Path, paths: Paths) -> None:
    """Free pages of the frozen RAM file become holes: they read as the zero frame and
    the host holds nothing for them. Done after the children run (it reads the page
    array of the whole guest: it grows with memory size). A free page's content does not
    matter to the guest; a guest where it does (page poisoning) is left as it is."""
    try:
        report.free_pages, report.free_pages_given_back = give_back_free_pages_of_file(
            store.frozen_ram_file(snap), kernel, paths)
    except HvkitError as e:
        report.free_pages_note = f"free pages kept: {e}"
        log.warning("%s", report.free_pages_note)


def _restart_in_place(vm: VM, snap: Snapshot, server: MemServer, server_pid: int, paths: Paths,
                      run: bool) -> str:
    with tempfile.TemporaryDirectory(dir=paths.runtime) as keep:
        console = Path(keep) / "console.log"
        if vm.rundir.console_log.exists():
            os.replace(vm.rundir.console_log, console)
        vm.stop()
        again = VM.launch_from_snapshot(vm.name, snap.machine, snap.name, server.snapshot_file(snap.name),
                                        server_pid, vm.spec.parent, paths, console_from=console)
    again.receive_state(server.state_file(snap.name), run=run)
    return again.run_state()


def _fork_forked(vm: VM, store: Store, server: MemServer, server_pid: int, names: list[str],
                 paths: Paths, t0: float, run_after: bool,
                 on_child: ChildCallback | None) -> ForkReport:
    t_pause = time.monotonic()
    try:
        state = _save_state(vm, store)
        pages, data = written_pages(vm.pid, vm.spec.ram_file, vm.spec.memory)
        with store.lock():
            parent = store.snapshot(vm.spec.snapshot)
            snap = store.fork_pages(parent, pages, data, vm.name, state, asdict(vm.spec))
        del data
        snapshot_seconds = time.monotonic() - t_pause
        report = ForkReport(vm.name, snap.name, len(names), False, len(pages), snapshot_seconds, 0.0, "",
                            asdict(snap.counters))
        report.children = start_children(snap, names, server, server_pid, vm.name, paths, t0, on_child)
    finally:
        if run_after and vm.is_alive():
            vm.resume()  # it runs on from its own memory, untouched by the fork
    report.vm_state = vm.run_state()
    return report
