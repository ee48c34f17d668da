"""The running VM: a handle on one QEMU process and its runtime folder.

`VM` is what every operation holds while it works on a VM: its spec (runtime.py), QMP,
whether it lives and why it died, its memory, pausing it, and stopping it. Making a
VM lives elsewhere: launch.py starts one, adopt.py takes over a QEMU hvkit did not
start, listing.py finds them by name; the guest inside is talked to through
hvkit.guest.control (control port, ground truth) and imagevm.py (ssh, agent).

One hvkit command at a time works on a VM (ownership.py). What a command that died
had recorded it was doing is finished or undone by the next one (`finish_abandoned`):
a pause is resumed, a start undone, and any other record is handed to the operation
that wrote it (the record names its recovery function), so the engine never imports
the operations built on it.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import os
import re
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from hvkit.config import Paths
from hvkit.errors import HvkitError, VMDied
from hvkit.memory import GuestMemory, RamFileMemory
from hvkit.memory.base import RamPiece
from hvkit.memory.process import ProcessMemory, process_mappings, ram_mappings
from hvkit.memserver.daemon import memserver_alive
from hvkit.procs import left_by_dead_process, process_runs, process_start_ticks, same_process, threads_still_exiting
from hvkit.qemu import imagevm
from hvkit.qemu.agent import GuestAgent
from hvkit.qemu.ownership import LOCK_WAIT, Ownership, fault_point
from hvkit.qemu.qmp import QMPUnreachable, libvirt_qmp, qmp, qmp_all
from hvkit.qemu.runtime import RamBackend, RuntimeDir, VMSpec, free_space_note
from hvkit.signals import deferred_signals
from hvkit.units import format_size

log = logging.getLogger(__name__)

MAX_PLACEMENTS = 24  # ways of placing a NUMA VM's backends on QEMU's mappings tried at most (4 alike nodes)


@dataclass
class Pause:
    """One pause of VM.paused(): whether hvkit paused the VM (False: it was paused
    already, and stays so), when, and for how long (filled in when it ends)."""

    vm: "VM"
    ours: bool
    at: float  # time.monotonic()
    seconds: float = 0.0


class VM:
    """A QEMU VM, running or dead. Get one from `hvkit.qemu.start_vm`, `find_vm` or
    `adopt_vm`; used as a context manager, a VM that this process started is stopped
    on exit."""

    def __init__(self, rundir: RuntimeDir, spec: VMSpec,
                 process: subprocess.Popen | None = None) -> None:
        self.rundir = rundir
        self.spec = spec
        self._process = process  # set only in the process that started QEMU
        self._started_here = process is not None  # the with-block of start_vm stops it

    def bind_process(self, process: subprocess.Popen) -> None:
        """Records QEMU as started by this process (launch.py): its pid, its start, and
        that leaving the with-block stops it."""
        self._process, self._started_here = process, True
        self.spec.pid = process.pid
        self.spec.proc_start = process_start_ticks(process.pid)  # with the pid: which process it is
        self.spec.started_at = time.time()

    # ---- what it is -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.spec.pid

    @property
    def ram_path(self) -> Path:
        """Its RAM file (hvkit's own VMs: `ram` in its folder; an attached VM: QEMU's mem-path)."""
        return Path(self.spec.ram_file) if self.attached and self.spec.ram_file else self.rundir.ram

    @property
    def qmp_path(self) -> Path:
        return Path(self.spec.qmp_socket) if self.spec.qmp_socket else self.rundir.qmp_sock

    @property
    def attached(self) -> bool:
        """Whether hvkit adopted this VM (vm attach) rather than started it: it never
        stops or restarts it."""
        return self.spec.origin != "hvkit"

    def paths(self) -> Paths:
        """The cache and runtime folder this VM belongs to."""
        return Paths(Paths.from_env().cache, self.rundir.path.parent)

    def ram_file(self) -> str | None:
        """The host file guest RAM is mapped from: its RAM file (a NUMA VM's: its nodes'
        files, comma-separated), or the snapshot file a forked VM maps privately; None
        for RAM inside QEMU."""
        if self.spec.ram == "file":
            return ", ".join(self.ram_files())
        return self.spec.ram_file if self.spec.ram == "snapshot" else None

    def ram_files(self) -> list[str]:
        """RAM "file": the files guest RAM is, in node order (one for most VMs)."""
        return [b.path for b in self.spec.ram_nodes if b.path] or [str(self.ram_path)]

    def ram_backends(self) -> list[RamBackend]:
        """The memory backends guest RAM is made of, end to end: one per node of a NUMA
        VM, else the one backend."""
        return self.spec.ram_nodes or [RamBackend(self.spec.memdev, self.spec.memory, self.spec.ram_file)]

    # ---- one owner at a time (ownership.py) ------------------------------------------

    @property
    def ownership(self) -> Ownership:
        return Ownership(self.rundir.path.parent, self.name)

    @contextlib.contextmanager
    def owned(self, op: str, wait: float = LOCK_WAIT) -> Iterator["VM"]:
        """This VM held by this process inside the block: no other hvkit command pauses,
        resumes, forks or stops it meanwhile. Its spec is read again on entry (another
        command may have restarted it, as a fork does); VMDied if it is gone."""
        with self.ownership.hold(op, wait) as outermost:
            if outermost:
                finish_abandoned(self.ownership, self.paths())
                if not self.reload_spec():
                    raise VMDied(f"VM {self.name!r} is gone (stopped by another command)")
            yield self

    def reload_spec(self) -> bool:
        """Reads the spec again (another command may have restarted the VM in a new
        QEMU, as a fork does); False if the VM's folder is gone."""
        spec = self.rundir.read_spec()
        if spec is None:
            return False
        if spec.pid != self.spec.pid:
            if self._process is not None:
                self._process.poll()  # reaps our old QEMU if it has ended
            self._process = None  # not our child any more: find its QEMU by pid
        self.spec = spec
        return True

    # ---- alive or dead ----------------------------------------------------------------

    def qemu_alive(self) -> bool:
        """Whether this VM's QEMU process runs (not whether it is usable: is_alive)."""
        if self._process is not None:  # our own child: its pid cannot have been reused
            return self._process.poll() is None
        same = same_process(self.pid, self.spec.proc_start, b"qemu")  # pid and start time
        if self.attached:  # the same process as when attached
            return same
        # a QEMU started for this folder, or the one its spec names: a pooled QEMU
        # (forking/pool.py) was started in the pool's folder, then its folder became this one
        return same or process_runs(self.pid, str(self.rundir.path).encode())

    def is_alive(self) -> bool:
        alive = self.qemu_alive()
        if alive and self._memory_server_gone():
            # its next read of a page it has not touched yet would kill it with SIGBUS
            # at some random later time: stop it now, and say why
            log.warning("stopping %s: its memory server (pid %s) is gone", self.name, self.spec.memserver_pid)
            self.kill()
            return False
        return alive

    def _memory_server_gone(self) -> bool:
        """Whether it maps a file of a memory server that died (a VM that maps a store
        file directly, as a forked VM itself does, needs no server)."""
        return (self.spec.ram == "snapshot" and self.spec.memserver_pid is not None
                and not memserver_alive(self.spec.memserver_pid))

    def death_reason(self) -> str:
        """What the logs say about why QEMU is gone: QEMU's own error, else the console."""
        if self._memory_server_gone():
            return (f"its memory server (pid {self.spec.memserver_pid}) is gone, so its memory "
                    f"cannot be read any more; 'hvkit memserver start' serves snapshot "
                    f"{self.spec.snapshot} again to new children ('hvkit fork --snapshot {self.spec.snapshot}')")
        if self.attached:
            return f"its QEMU (pid {self.pid}, attached from {self.spec.origin}) is gone"
        qemu_said = self.rundir.tail(self.rundir.qemu_log, 3)
        if qemu_said:
            return f"QEMU said: {qemu_said}"
        full = free_space_note(self.rundir.path) if self.spec.ram == "file" else ""
        if full:
            return f"{full}; free space there (or set HVKIT_RUNTIME elsewhere) and start it again"
        console = self.rundir.tail(self.rundir.console_log, 200)
        panic = [line for line in console.splitlines() if "Kernel panic" in line]
        if panic:
            return f"guest: {panic[-1].strip()}"
        return "QEMU exited without a message"

    def raise_if_dead(self, when: str) -> None:
        """VMDied, saying why, unless the VM lives."""
        if not self.is_alive():
            raise VMDied(f"VM {self.name!r} died {when}: {self.death_reason()}")

    def run_state(self) -> str:
        """QEMU's run state ('running', 'paused', ...), or 'dead'."""
        if not self.is_alive():
            return "dead"
        try:
            return self.qmp("query-status")["status"]
        except VMDied:
            return "dead"

    # ---- its memory -------------------------------------------------------------------

    def memory(self) -> GuestMemory:
        """The guest's physical memory (close it when done): its RAM file, or for RAM
        inside QEMU (anonymous, or a forked VM's private mapping of its snapshot) the
        QEMU process's memory. Where QEMU has several mappings that could be guest RAM,
        the first; `memory_candidates` gives all of them."""
        candidates = self.memory_candidates()
        for extra in candidates[1:]:
            extra.close()
        return candidates[0]

    def memory_candidates(self) -> list[GuestMemory]:
        """Every place guest RAM may be: its RAM files, or the mappings of QEMU's process
        that could hold it (the file each backend maps, else every mapping of the
        backend's size; for several backends, each way of assigning them distinct
        mappings, at most MAX_PLACEMENTS); the caller keeps the one where it finds the
        guest kernel (and, for a NUMA guest, its nodes where the kernel says they are)."""
        if self.spec.ram == "file":
            return [RamFileMemory(self.ram_files(), self.spec.machine)]
        backends = self.ram_backends()
        mappings = process_mappings(self.pid)
        choices = [[m for m in ram_mappings(self.pid, b.size, b.path, mappings) if b.host in (None, m.start)]
                   for b in backends]
        placements = list(itertools.islice((c for c in itertools.product(*choices) if len({m.start for m in c}) == len(c)),
                                           MAX_PLACEMENTS))
        if not placements:
            missing = next((b for b, c in zip(backends, choices) if not c), backends[0])
            raise HvkitError(f"cannot find the guest RAM of VM {self.name!r} in QEMU process {self.pid} "
                             f"(no mapping of {format_size(missing.size)}"
                             + (f" of {missing.path})" if missing.path else ")"))
        return [ProcessMemory(self.pid, [RamPiece(b.size, m.start) for b, m in zip(backends, c)], self.spec.machine)
                for c in placements]

    def host_memory(self) -> int:
        """Bytes of guest RAM the host holds: allocated blocks of the RAM files; for RAM
        inside QEMU, what its RAM mappings have resident, minus the pages KSM merged
        (they are held once, elsewhere)."""
        if self.spec.ram == "file":
            try:
                return sum(Path(f).stat().st_blocks * 512 for f in self.ram_files())
            except OSError:
                return 0
        return resident_ram_of(self.pid, [b.size for b in self.ram_backends()], own_only=self.spec.ram == "snapshot")

    def dump_core(self, path: Path) -> Path:
        """Writes guest memory as a QEMU dump-guest-memory ELF core (VM paused meanwhile;
        with the guest's VMCOREINFO note where its kernel gave it to the vmcoreinfo device).
        Written beside `path` and renamed into place: a dump cut short leaves no core.
        A copy a killed dump left there (QEMU finishes writing it) is removed by the
        next dump into that folder: guest memory does not stay behind."""
        path = Path(path).resolve()
        for stale in path.parent.glob(".*.partial"):
            if left_by_dead_process(stale.name.rsplit(".", 2)[-2]):
                stale.unlink(missing_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            self.qmp("dump-guest-memory", {"paging": False, "protocol": f"file:{partial}"}, timeout=600)
            fault_point("dump written")
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        return path

    def save_state(self, path: Path, pause_first: bool = False) -> None:
        """Writes the device state of this paused VM, without its RAM, to `path` (QEMU's
        xen-save-devices-state: its name is historical; it works for any VM).
        launch.receive_state loads it into a new QEMU. With `pause_first`, the VM is
        paused first, in the same QMP session (a fork's pause is that much shorter)."""
        save = ("xen-save-devices-state", {"filename": str(path), "live": False})
        if not pause_first:
            self.qmp(*save)
            return
        deadline = time.monotonic() + 10.0
        while True:
            self.raise_if_dead("before it was paused")
            try:
                qmp_all(self.qmp_path, [("stop", None), save])
                return
            except QMPUnreachable:  # another client has the socket: as in qmp()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
            except VMDied:
                self.raise_if_dead("while it was paused and its state saved")
                raise

    # ---- QMP, pause and resume ----------------------------------------------------------

    def qmp(self, command: str, args: dict | None = None, timeout: float = 10.0):
        """The result of QMP `command`. QEMU's QMP socket serves one client at a time, so
        while QEMU runs, a session that cannot be set up is tried again (for `timeout`):
        another command (`vm list`, a user's own QMP client) may be talking to it."""
        self.raise_if_dead(f"before {command}")
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.spec.libvirt_domain:
                    return libvirt_qmp(self.spec.libvirt_uri, self.spec.libvirt_domain, command, args,
                                       max(timeout, 30.0))
                return qmp(self.qmp_path, command, args, timeout)
            except QMPUnreachable:
                self.raise_if_dead(f"during {command}")
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
            except VMDied:
                self.raise_if_dead(f"during {command}")
                raise

    def pause(self) -> None:
        """Pauses the VM for the user: it stays paused until `resume`; no hvkit operation
        resumes it (theirs are recorded as theirs, this one is not)."""
        with self.owned("vm pause"):
            if self.run_state() == "running":
                self.qmp("stop")

    def resume(self) -> None:
        """Resumes a VM paused by the user (or by QEMU itself)."""
        with self.owned("vm resume"):
            if self.run_state() != "running":
                self.qmp("cont")

    @contextlib.contextmanager
    def paused(self, op: str = "pause") -> Iterator[Pause]:
        """The VM held by this process and paused inside the block, running again after
        it whatever happens inside, if (and only if) this block paused it: a VM the user
        paused stays paused. The pause is recorded before QEMU stops, so if this process
        dies inside the block, the next hvkit command resumes the VM; Ctrl-C and SIGTERM
        wait until the VM runs again."""
        with self.owned(op), deferred_signals():
            ours = self.run_state() == "running"
            if ours:
                self.ownership.write_intent(op=op, undo="resume")
                self.qmp("stop")
                fault_point(f"paused {op}")
            pause = Pause(self, ours, time.monotonic())
            try:
                yield pause
            finally:
                if ours:
                    self._resume_own_pause()
                pause.seconds = time.monotonic() - pause.at

    def _resume_own_pause(self) -> None:
        """Resumes a pause this process made and drops its record; a VM that died has
        nothing to resume. If QEMU lives but would not resume, the record stays: the next
        hvkit command resumes it (never a pause left behind unrecorded)."""
        try:
            self.qmp("cont")
        except VMDied:
            if self.is_alive():
                log.warning("VM %s could not be resumed now; the next hvkit command will", self.name)
                return
        self.ownership.clear_intent()

    # ---- stopping ---------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """Ends QEMU (politely over QMP, then by signal) and removes the runtime folder;
        waits for another hvkit command that holds the VM to finish first."""
        if self.attached:
            raise HvkitError(f"VM {self.name!r} was attached ({self.spec.origin}), not started by hvkit; "
                             "hvkit never stops it", f"'hvkit vm detach {self.name}' forgets it")
        with self.ownership.hold("vm stop") as outermost:
            if outermost:
                finish_abandoned(self.ownership, self.paths())
                self.reload_spec()
            self.stop_qemu(timeout)
            self.cleanup()
            if outermost:
                self.ownership.forget()

    def stop_qemu(self, timeout: float = 10.0) -> None:
        """Ends this VM's QEMU (quit over QMP, then signals) and waits until it is gone,
        with its mappings; the folder stays."""
        if self.qemu_alive():
            try:
                qmp(self.qmp_path, "quit", timeout=timeout)
            except (VMDied, HvkitError):
                pass
            if not self.wait_gone(timeout):
                self.kill()

    def wait_gone(self, timeout: float) -> bool:
        """Whether QEMU is gone, its last thread too (files and mappings go with it),
        within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with _exit_watch(self.pid) as exited:
            while self.qemu_alive() or threads_still_exiting(self.pid):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                exited(min(left, 0.02))
        return True

    def kill(self, first: signal.Signals = signal.SIGTERM) -> None:
        """Ends QEMU by signal (`first`, then SIGKILL) and waits until it is gone, with
        its mappings."""
        for sig in dict.fromkeys((first, signal.SIGKILL)):
            if not self.qemu_alive():
                return
            try:
                os.kill(self.pid, sig)
            except (ProcessLookupError, TypeError):
                return
            self.wait_gone(3.0)

    def cleanup(self) -> None:
        """Removes what a dead VM left: its runtime folder, and disk layers nothing needs."""
        if self._process is not None:
            try:
                self._process.wait(timeout=5)  # reap our child: no zombie left
            except subprocess.TimeoutExpired:
                pass
        self.rundir.remove()
        if self.spec.disk:
            imagevm.collect_disks(self.paths())

    def __enter__(self) -> "VM":
        return self

    def __exit__(self, *exc) -> None:
        if self._started_here:
            self.stop()

    # ---- the guest's console; a disk image's ssh and agent (imagevm.py) ---------------

    def console(self) -> str:
        try:
            return self.rundir.console_log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_console(self, pattern: str, timeout: float = 60.0, after: int = 0) -> re.Match:
        """The first match of regex `pattern` in the console from character `after` on;
        VMDied if QEMU exits first, HvkitError on timeout."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            m = regex.search(self.console(), after)
            if m:
                return m
            self.raise_if_dead(f"while waiting for {pattern!r} on its console")
            if time.monotonic() > deadline:
                tail = self.rundir.tail(self.rundir.console_log, 3) or "(console empty)"
                raise HvkitError(f"VM {self.name!r} did not print {pattern!r} within "
                                 f"{timeout:.0f} s; its console ends: {tail}")
            time.sleep(0.05)

    def ssh_command(self, *command: str) -> list[str]:
        """The ssh command line that runs `command` (none: a login shell) in the guest
        as root; a clear error for a VM without a disk image."""
        return imagevm.ssh_command(self.spec, *command)

    @property
    def agent(self) -> GuestAgent:
        imagevm.load_image(self.spec)  # a clear error for a VM that has none
        return GuestAgent(self.rundir.qga_sock)


@contextlib.contextmanager
def _exit_watch(pid: int | None) -> Iterator:
    """A function that waits up to its argument (s) for process `pid` to end: on its
    pidfd, which becomes readable once its last thread is gone (with its mappings),
    so a killed QEMU is seen gone at once; without one (no such process), a sleep."""
    try:
        fd = os.pidfd_open(pid) if pid else None
    except OSError:
        fd = None
    try:
        if fd is None:
            yield time.sleep
        else:
            yield lambda seconds: select.select([fd], [], [], seconds)
    finally:
        if fd is not None:
            os.close(fd)


def resident_ram_of(pid: int | None, size: int | list[int], own_only: bool = False) -> int:
    """Resident bytes of the guest-RAM mapping (the one of `size` bytes; a list: one
    mapping of each size) of QEMU process `pid`, without pages KSM merged, from
    /proc/<pid>/smaps; with `own_only`, only its anonymous pages (in a private file
    mapping: the pages the guest wrote)."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except (OSError, TypeError):
        return 0
    wanted = [size] if isinstance(size, int) else list(size)
    total = 0
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        start, _, end = block.partition(" ")[0].partition("-")
        if start and end and int(end, 16) - int(start, 16) in wanted:
            wanted.remove(int(end, 16) - int(start, 16))
            kb = dict(re.findall(r"^(\w+):\s+(\d+) kB", block, re.M))
            total += (int(kb.get("Anonymous", 0)) if own_only else int(kb.get("Rss", 0)) - int(kb.get("KSM", 0))) * 1024
            if not wanted:
                break
    return total


# ---- finishing what a dead owner left (ownership.py) -----------------------------------

RECOVERY_PACKAGE = "hvkit."  # a record's recovery function must be hvkit's own


def finish_abandoned(owner: Ownership, paths: Paths) -> None:
    """Finishes or undoes what a dead owner of the VM had recorded it was doing (the
    caller holds the lock, so its owner is gone), and says so. The engine's own records
    ("resume" a pause, "stop" a start) are undone here; a record with `recover`
    ("module:function") is handed to that function of the operation that wrote it."""
    intent = owner.intent()
    if intent is None:
        return
    undo, what = intent.get("undo"), f"hvkit {intent.get('op', '?')} (pid {intent.get('pid', '?')})"
    rundir = RuntimeDir(paths.runtime / owner.name)
    spec = rundir.read_spec()
    vm = VM(rundir, spec) if spec else None
    if intent.get("recover"):
        _recovery_function(intent["recover"])(owner, intent, paths)
    elif undo == "resume":
        if vm is not None and vm.run_state() == "paused":
            vm.qmp("cont")
            log.warning("VM %s was left paused by %s, which did not finish: resumed it", owner.name, what)
    elif undo == "stop":
        if vm is not None and not vm.attached:
            vm.kill()
        if vm is None or not vm.attached:
            rundir.kill_qemus()  # a QEMU killed halfway through starting: no spec names it yet
        rundir.remove()
        log.warning("VM %s never finished starting (%s did not finish): stopped it", owner.name, what)
    elif undo != "none":
        log.warning("VM %s: unreadable record of %s left as it is", owner.name, what)
    finish_abandoned_children(intent.get("children", []), paths)
    owner.clear_intent()


def finish_abandoned_children(names: list[str], paths: Paths) -> None:
    """Children of a fork whose start was cut short are stopped (each child's own
    intent record says so; a child that finished starting has none)."""
    for child in names:
        owner = Ownership(paths.runtime, child)
        with owner.try_hold("fork recovery") as got:
            if got:
                finish_abandoned(owner, paths)


def _recovery_function(target: str):
    """The function a record names as "hvkit.module:function", imported now: the
    operation that wrote the record knows its own steps."""
    module, _, function = target.partition(":")
    if not module.startswith(RECOVERY_PACKAGE) or not function.isidentifier():
        raise HvkitError(f"a VM's intent record names an unknown recovery {target!r}",
                         "remove the record from the runtime folder's owners/ if no hvkit command runs")
    return getattr(importlib.import_module(module), function)
