"""The QEMU engine: real Linux guests in qemu-system-x86_64, controlled over QMP.

A VM is a QEMU process started in the background (it outlives the hvkit command that
started it) plus its runtime folder (see runtime.py). Guest RAM is a
`memory-backend-file` with share=on, so hvkit can read the guest's memory from the host
file and later give pages of it back. Everything about a VM can be found again from its
folder alone: `VM.attach(name)` in another process sees what `VM.start` made.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from hvkit.config import Paths
from hvkit.errors import HvkitError, VMDied, VMNotFound
from hvkit.guest import GroundTruth, Workload, build_default_guest, parse_ground_truth
from hvkit.kernel import read_kernel_image
from hvkit.memory import RamFileMemory
from hvkit.memserver.daemon import memserver_alive
from hvkit.procs import process_runs
from hvkit.qemu.accel import ACCELS, best_accel
from hvkit.qemu.qmp import qmp
from hvkit.qemu.runtime import RuntimeDir, VMSpec, check_name
from hvkit.units import MiB, format_size, parse_size

log = logging.getLogger(__name__)

READY_MARKER = "HVKIT-READY"
RESEND_AFTER = 5.0  # seconds without any answer before a control-port request is sent again
MIN_MEMORY = 16 * MiB
RAM_KINDS = ("file", "anonymous")
T = TypeVar("T")


def qemu_binary() -> str:
    """Path of qemu-system-x86_64 ($HVKIT_QEMU overrides), or a clear error."""
    wanted = os.environ.get("HVKIT_QEMU", "qemu-system-x86_64")
    found = shutil.which(wanted)
    if not found:
        raise HvkitError(f"QEMU is not installed ({wanted} not found)",
                         "run ./setup.sh, or apt-get install qemu-system-x86")
    return found


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _resident_ram_of(pid: int | None, size: int, own_only: bool = False) -> int:
    """Resident bytes of the guest-RAM mapping (the one of `size` bytes) of QEMU
    process `pid`, without pages KSM merged, from /proc/<pid>/smaps; with `own_only`,
    only its anonymous pages (in a private file mapping: the pages the guest wrote)."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except (OSError, TypeError):
        return 0
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        start, _, end = block.partition(" ")[0].partition("-")
        if start and end and int(end, 16) - int(start, 16) == size:
            kb = dict(re.findall(r"^(\w+):\s+(\d+) kB", block, re.M))
            if own_only:
                return int(kb.get("Anonymous", 0)) * 1024
            return (int(kb.get("Rss", 0)) - int(kb.get("KSM", 0))) * 1024
    return 0


def proportional_memory(pid: int | None) -> int:
    """PSS of process `pid` in bytes: its own pages plus its share of pages it shares
    (a page mapped by 8 children counts 1/8 in each), from /proc/<pid>/smaps_rollup."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (OSError, TypeError):
        return 0
    m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else 0


def _check_memory(memory: str | int) -> int:
    size = parse_size(memory)
    if size < MIN_MEMORY or size % MiB:
        raise HvkitError(f"invalid memory size {memory!r}", "give whole MiB, at least 16M")
    if size > _host_memory_bytes():
        raise HvkitError(f"memory size {format_size(size)} is more than this host has "
                         f"({format_size(_host_memory_bytes() // MiB * MiB)})")
    return size


@dataclass(frozen=True)
class VMStatus:
    """One row of `hvkit vm list`."""

    name: str
    state: str  # running, paused, dead, or another QEMU run state
    pid: int | None
    memory: int
    cpus: int
    accel: str
    host_memory: int  # bytes of the RAM file that the host has allocated
    uptime: float | None
    workload: str | None
    reason: str = ""  # why a dead VM died, as far as its logs say
    pss: int = 0  # bytes of host memory the QEMU process holds, shared pages divided among sharers
    parent: str | None = None  # the VM it was forked from
    snapshot: str | None = None  # the memory-server snapshot it runs from

    def to_json(self) -> dict:
        return dict(self.__dict__)


class VM:
    """A QEMU VM. Start one with VM.start(), find a running one with VM.attach(name);
    used as a context manager, a VM that this object started is stopped on exit."""

    def __init__(self, rundir: RuntimeDir, spec: VMSpec,
                 process: subprocess.Popen | None = None) -> None:
        self.rundir = rundir
        self.spec = spec
        self._process = process  # set only in the process that started QEMU

    # ---- finding VMs ----------------------------------------------------------------

    @classmethod
    def attach(cls, name: str, paths: Paths | None = None) -> "VM":
        """The running VM called `name`. A VM found dead is cleaned up and reported."""
        paths = paths or Paths.from_env()
        rundir = RuntimeDir(paths.vm_dir(check_name(name)))
        spec = rundir.read_spec()
        if spec is None:
            raise VMNotFound(f"no VM named {name!r}", "see 'hvkit vm list' for the VMs there are")
        vm = cls(rundir, spec)
        if not vm.is_alive():
            reason = vm._death_reason()
            vm._cleanup()
            raise VMDied(f"VM {name!r} is dead ({reason}); its leftovers were removed")
        return vm

    @classmethod
    def list(cls, paths: Paths | None = None) -> list[VMStatus]:
        """Every VM of the runtime folder; dead ones are listed once, then cleaned up."""
        paths = paths or Paths.from_env()
        if not paths.runtime.is_dir():
            return []
        rows = []
        for d in sorted(paths.runtime.iterdir()):
            rundir = RuntimeDir(d)
            spec = rundir.read_spec()
            if spec is None:
                continue
            vm = cls(rundir, spec)
            rows.append(vm.status())
            if rows[-1].state == "dead":
                vm._cleanup()
        return rows

    # ---- starting -------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        name: str | None = None,
        *,
        memory: str | int = "256M",
        cpus: int = 1,
        kernel: str | Path | None = None,
        initrd: str | Path | None = None,
        append: str = "",
        workload: str | Workload | None = None,
        accel: str = "auto",
        cpu_model: str | None = None,
        ram: str = "file",
        balloon: bool = False,
        paths: Paths | None = None,
        wait: bool = True,
        timeout: float = 120.0,
    ) -> "VM":
        """Starts a VM in the background and returns once QEMU answers on QMP (and, for
        hvkit's own init, once the guest printed its ready marker).

        Without `kernel`, the default guest (built on first use). Without `initrd`,
        hvkit's initramfs, whose init runs `workload`; with your own initrd, the guest
        is yours and hvkit does not wait for a ready marker.

        `ram="file"` (default) puts guest RAM in a shared file hvkit can read and give
        back; `ram="anonymous"` keeps it in QEMU's own memory with KSM merging allowed
        (for comparisons: nothing outside QEMU can read it). `balloon` adds a
        virtio-balloon with free page reporting (hvkit's init loads its driver)."""
        paths = paths or Paths.from_env()
        size = _check_memory(memory)
        if not 1 <= int(cpus) <= 64:
            raise HvkitError(f"invalid CPU count {cpus}", "give 1 to 64")
        if accel not in ACCELS:
            raise HvkitError(f"unknown accelerator {accel!r}", f"choose one of {', '.join(ACCELS)}")
        if ram not in RAM_KINDS:
            raise HvkitError(f"unknown RAM kind {ram!r}", f"choose one of {', '.join(RAM_KINDS)}")
        binary = qemu_binary()
        if workload is not None and initrd is not None:
            raise HvkitError("a workload needs hvkit's own initramfs", "leave out --initrd")
        workload = Workload.parse(workload) if isinstance(workload, str) else workload

        kernel_path, initrd_path, release = cls._boot_files(paths, kernel, initrd)
        hvkit_init = initrd is None
        if hvkit_init:
            workload = workload or Workload()
        cmdline = " ".join(filter(None, [
            "" if "console=" in append else "console=ttyS0",
            "panic=-1 quiet" if hvkit_init else "",
            workload.kernel_args() if workload else "",
            "hvkit.modules=virtio_balloon" if balloon and hvkit_init else "",
            append,
        ]))
        name = check_name(name) if name else cls._free_name(paths)
        rundir = RuntimeDir(paths.vm_dir(name))
        cls._claim(rundir)
        vm = None
        try:
            chosen = best_accel(binary, paths.runtime) if accel == "auto" else accel
            spec = VMSpec(name=name, memory=size, cpus=int(cpus), kernel=str(kernel_path),
                          initrd=str(initrd_path) if initrd_path else None, append=cmdline,
                          accel=chosen, workload=str(workload) if workload else None,
                          kernel_release=release, ram=ram, balloon=balloon)
            spec.command = cls._command(binary, rundir, spec, cpu_model)
            vm = cls(rundir, spec)
            vm._launch(timeout)
            if wait and hvkit_init:
                vm.wait_for_console(READY_MARKER, timeout=timeout)
            return vm
        except BaseException:
            # whatever went wrong (including Ctrl-C), leave nothing running or behind
            if vm is not None:
                vm._kill()
            rundir.remove()
            raise

    @classmethod
    def launch_from_snapshot(cls, name: str, machine: dict, snapshot: str, ram_file: Path,
                             memserver_pid: int, parent: str | None, paths: Paths,
                             console_from: Path | None = None, timeout: float = 30.0) -> "VM":
        """Starts QEMU for a VM that runs from memory-server snapshot `snapshot` (the file
        `ram_file`, mapped share=off), as the VM `machine` (a VMSpec as a dict) was.
        QEMU waits paused for the device state: `receive_state` finishes the start.
        `console_from` is a console log to go on from (a VM that replaces itself)."""
        spec = VMSpec(**{**machine, "name": check_name(name), "ram": "snapshot", "snapshot": snapshot,
                         "ram_file": str(ram_file), "memserver_pid": memserver_pid, "parent": parent,
                         "pid": None, "started_at": None, "command": []})
        old = machine.get("command") or []
        cpu_model = old[old.index("-cpu") + 1] if "-cpu" in old[:-1] else None
        rundir = RuntimeDir(paths.vm_dir(spec.name))
        cls._claim(rundir)
        vm = None
        try:
            if console_from is not None and console_from.exists():
                shutil.copyfile(console_from, rundir.console_log)
            spec.command = cls._command(qemu_binary(), rundir, spec, cpu_model)
            vm = cls(rundir, spec)
            vm._launch(timeout)
            return vm
        except BaseException:
            if vm is not None:
                vm._kill()
            rundir.remove()
            raise

    def receive_state(self, state: Path, run: bool = True, timeout: float = 30.0) -> None:
        """Loads the device state saved by `save_state` into this VM (started by
        launch_from_snapshot), then lets it run unless `run` is False."""
        self.qmp("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(state))}"})
        deadline = time.monotonic() + timeout
        while (status := self.run_state()) == "inmigrate":
            if time.monotonic() > deadline:
                raise HvkitError(f"VM {self.name!r} did not load its device state within {timeout:.0f} s")
            time.sleep(0.002)
        outcome = self.qmp("query-migrate").get("status")
        if outcome != "completed":
            raise HvkitError(f"VM {self.name!r} could not load its device state from {state} "
                             f"(migration {outcome}, run state {status}); QEMU said: "
                             f"{self.rundir.tail(self.rundir.qemu_log, 2) or 'nothing'}")
        if run:
            self.resume()

    def save_state(self, path: Path) -> None:
        """Writes the device state of this paused VM, without its RAM, to `path` (QEMU's
        xen-save-devices-state: its name is historical; it works for any VM)."""
        self.qmp("xen-save-devices-state", {"filename": str(path), "live": False})

    @staticmethod
    def _boot_files(paths: Paths, kernel, initrd) -> tuple[Path, Path | None, str | None]:
        if kernel is None:
            guest = build_default_guest(paths)
            return guest.kernel, Path(initrd) if initrd else guest.initrd, guest.release
        image = read_kernel_image(kernel)
        if not image.bootable:
            raise HvkitError(f"{kernel} is a vmlinux; QEMU boots a bzImage",
                             "pass the vmlinuz of the same kernel")
        if initrd is None:
            initrd_path = build_default_guest(paths).initrd
        else:
            initrd_path = Path(initrd)
            if not initrd_path.is_file():
                raise HvkitError(f"initrd file {initrd} does not exist", "check --initrd")
        return image.path.resolve(), initrd_path.resolve(), image.release

    @staticmethod
    def _free_name(paths: Paths) -> str:
        n = 1
        while paths.vm_dir(f"vm{n}").exists():
            n += 1
        return f"vm{n}"

    @classmethod
    def _claim(cls, rundir: RuntimeDir) -> None:
        try:
            rundir.claim()
            return
        except FileExistsError:
            pass
        spec = rundir.read_spec()
        if spec is not None and cls(rundir, spec).is_alive():
            raise HvkitError(f"a VM named {rundir.name!r} is already running",
                             "choose another --name, or stop it with 'hvkit vm stop'")
        rundir.remove()  # leftovers of a dead VM, or of a start that never finished
        rundir.claim()

    @staticmethod
    def _command(binary: str, rundir: RuntimeDir, spec: VMSpec, cpu_model: str | None) -> list[str]:
        size = format_size(spec.memory)
        cmd = [
            binary, "-name", f"hvkit-{spec.name}",
            "-machine", "pc,memory-backend=ram0", "-accel", spec.accel,
            "-m", size, "-smp", str(spec.cpus),
            "-object", VM._ram_backend(rundir, spec),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", spec.kernel, "-append", spec.append,
            "-chardev", f"file,id=con,path={rundir.console_log}" + (",append=on" if spec.ram == "snapshot" else ""),
            "-serial", "chardev:con",
            "-chardev", f"socket,id=ctl,path={rundir.ctl_sock},server=on,wait=off",
            "-serial", "chardev:ctl",
            "-qmp", f"unix:{rundir.qmp_sock},server=on,wait=off",
        ]
        if spec.initrd:
            cmd += ["-initrd", spec.initrd]
        if spec.balloon:
            cmd += ["-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on"]
        if cpu_model:
            cmd += ["-cpu", cpu_model]
        if spec.ram == "snapshot":
            # paused, waiting for the device state (saved without RAM, so no
            # configuration section: see hvkit.fork)
            cmd += ["-S", "-incoming", "defer", "-global", "migration.send-configuration=off"]
        return cmd

    @staticmethod
    def _ram_backend(rundir: RuntimeDir, spec: VMSpec) -> str:
        size = format_size(spec.memory)
        if spec.ram == "file":
            return f"memory-backend-file,id=ram0,size={size},mem-path={rundir.ram},share=on"
        if spec.ram == "snapshot":
            return f"memory-backend-file,id=ram0,size={size},mem-path={spec.ram_file},share=off"
        return f"memory-backend-ram,id=ram0,size={size},merge=on"

    def _launch(self, timeout: float) -> None:
        log.info("starting %s: %s", self.name, " ".join(self.spec.command))
        with self.rundir.qemu_log.open("wb") as out:
            self._process = subprocess.Popen(
                self.spec.command, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True,  # Ctrl-C on the hvkit command does not reach QEMU
            )
        self.spec.pid = self._process.pid
        self.spec.started_at = time.time()
        self.rundir.write_spec(self.spec)
        deadline = time.monotonic() + timeout
        while not self.rundir.qmp_sock.exists():
            self._raise_if_dead("while starting")
            if time.monotonic() > deadline:
                raise HvkitError(f"QEMU did not open its QMP socket within {timeout:.0f} s")
            time.sleep(0.02)
        try:
            qmp(self.rundir.qmp_sock, "query-status")
        except VMDied:
            # QEMU opens its sockets before it checks the rest of its command line, so a
            # refused connection usually means it is exiting: report what it said.
            self._wait_gone(2.0)
            self._raise_if_dead("while starting")
            raise

    # ---- state ----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.spec.pid

    @property
    def ram_path(self) -> Path:
        return self.rundir.ram

    def _qemu_alive(self) -> bool:
        if self._process is not None:  # our own child: its pid cannot have been reused
            return self._process.poll() is None
        return process_runs(self.pid, str(self.rundir.path).encode())  # a QEMU of this folder

    def is_alive(self) -> bool:
        alive = self._qemu_alive()
        if alive and self._memory_server_gone():
            # its next read of a page it has not touched yet would kill it with SIGBUS
            # at some random later time: stop it now, and say why
            log.warning("stopping %s: its memory server (pid %s) is gone", self.name, self.spec.memserver_pid)
            self._kill()
            return False
        return alive

    def _memory_server_gone(self) -> bool:
        return self.spec.ram == "snapshot" and not memserver_alive(self.spec.memserver_pid)

    def _death_reason(self) -> str:
        """What the logs say about why QEMU is gone: QEMU's own error, else the console."""
        if self._memory_server_gone():
            return (f"its memory server (pid {self.spec.memserver_pid}) is gone, so its memory "
                    f"cannot be read any more; 'hvkit memserver start' serves snapshot "
                    f"{self.spec.snapshot} again to new children ('hvkit fork --snapshot {self.spec.snapshot}')")
        qemu_said = self.rundir.tail(self.rundir.qemu_log, 3)
        if qemu_said:
            return f"QEMU said: {qemu_said}"
        console = self.rundir.tail(self.rundir.console_log, 200)
        panic = [line for line in console.splitlines() if "Kernel panic" in line]
        if panic:
            return f"guest: {panic[-1].strip()}"
        return "QEMU exited without a message"

    def _raise_if_dead(self, when: str) -> None:
        if not self.is_alive():
            raise VMDied(f"VM {self.name!r} died {when}: {self._death_reason()}")

    def run_state(self) -> str:
        """QEMU's run state ('running', 'paused', ...), or 'dead'."""
        if not self.is_alive():
            return "dead"
        try:
            return qmp(self.rundir.qmp_sock, "query-status")["status"]
        except VMDied:
            return "dead"

    def memory(self) -> "RamFileMemory":
        """The guest's physical memory, read from its RAM file (close it when done)."""
        if self.spec.ram == "snapshot":
            raise HvkitError(f"VM {self.name!r} runs from memory-server snapshot {self.spec.snapshot} "
                             "(its RAM is private to QEMU); hvkit reads and gives back only a RAM file",
                             f"read the snapshot file {self.spec.ram_file}, or a VM started with 'hvkit vm start'")
        if self.spec.ram != "file":
            raise HvkitError(f"VM {self.name!r} keeps its RAM inside QEMU (started with ram={self.spec.ram!r}); "
                             "hvkit reads and gives back only a RAM file", "start it with the default RAM")
        return RamFileMemory(self.rundir.ram)

    def dump_core(self, path: Path) -> Path:
        """Writes guest memory as a QEMU dump-guest-memory ELF core (VM paused meanwhile)."""
        self.qmp("dump-guest-memory", {"paging": False, "protocol": f"file:{Path(path).resolve()}"},
                 timeout=600)
        return Path(path)

    def host_memory(self) -> int:
        """Bytes of guest RAM the host holds: allocated blocks of the RAM file; for
        anonymous RAM, what the RAM mapping of QEMU has resident, minus the pages KSM
        merged (they are held once, elsewhere)."""
        if self.spec.ram == "file":
            try:
                return self.rundir.ram.stat().st_blocks * 512
            except OSError:
                return 0
        return _resident_ram_of(self.pid, self.spec.memory, own_only=self.spec.ram == "snapshot")

    def status(self) -> VMStatus:
        state = self.run_state()
        started = self.spec.started_at
        return VMStatus(
            name=self.name, state=state, pid=self.pid, memory=self.spec.memory,
            cpus=self.spec.cpus, accel=self.spec.accel, host_memory=self.host_memory(),
            uptime=time.time() - started if started and state != "dead" else None,
            workload=self.spec.workload,
            reason=self._death_reason() if state == "dead" else "",
            pss=proportional_memory(self.pid) if state != "dead" else 0,
            parent=self.spec.parent, snapshot=self.spec.snapshot,
        )

    # ---- control --------------------------------------------------------------------

    def qmp(self, command: str, args: dict | None = None, timeout: float = 10.0):
        self._raise_if_dead(f"before {command}")
        try:
            return qmp(self.rundir.qmp_sock, command, args, timeout)
        except VMDied:
            self._raise_if_dead(f"during {command}")
            raise

    def pause(self) -> None:
        self.qmp("stop")

    def resume(self) -> None:
        self.qmp("cont")

    @contextlib.contextmanager
    def paused(self) -> Iterator["VM"]:
        """The VM paused inside the block and running again after it, whatever happens
        inside; a VM that was paused already stays paused."""
        running = self.run_state() == "running"
        if running:
            self.pause()
        try:
            yield self
        finally:
            if running:
                self.resume()

    def stop(self, timeout: float = 10.0) -> None:
        """Ends QEMU (politely over QMP, then by signal) and removes the runtime folder."""
        if self.is_alive():
            try:
                qmp(self.rundir.qmp_sock, "quit", timeout=timeout)
            except (VMDied, HvkitError):
                pass
            if not self._wait_gone(timeout):
                self._kill()
        self._cleanup()

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._qemu_alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _kill(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self._qemu_alive():
                return
            try:
                os.kill(self.pid, sig)
            except (ProcessLookupError, TypeError):
                return
            self._wait_gone(3.0)

    def _cleanup(self) -> None:
        if self._process is not None:
            try:
                self._process.wait(timeout=5)  # reap our child: no zombie left
            except subprocess.TimeoutExpired:
                pass
        self.rundir.remove()

    def __enter__(self) -> "VM":
        return self

    def __exit__(self, *exc) -> None:
        if self._process is not None:
            self.stop()

    # ---- the guest's console and control port ----------------------------------------

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
            self._raise_if_dead(f"while waiting for {pattern!r} on its console")
            if time.monotonic() > deadline:
                tail = self.rundir.tail(self.rundir.console_log, 3) or "(console empty)"
                raise HvkitError(f"VM {self.name!r} did not print {pattern!r} within "
                                 f"{timeout:.0f} s; its console ends: {tail}")
            time.sleep(0.05)

    def request(self, line: str, until: str, started: str | None = None, timeout: float = 60.0) -> str:
        """Sends one request line to the guest's control port (ttyS1) and returns what
        the guest answered up to and including the line that contains `until`."""
        with ControlPort(self) as port:
            port.send(line)
            return port.read_until(until, timeout, resend=line, started=started)

    def ground_truth(self, save_to: Path | None = None, timeout: float = 120.0) -> GroundTruth:
        """The guest's own view of its memory and processes (default guest only),
        exported through its second serial port; the raw export is also written to
        `save_to` when given."""
        tag = f"{os.getpid()}-{time.monotonic_ns()}"
        raw = self.request(f"dump {tag}", until=f"HVKIT-GT-END {tag}",
                           started=f"HVKIT-GT-BEGIN {tag}", timeout=timeout)
        return self._parse_export(raw, tag, save_to)

    def frozen_ground_truth(self, while_paused: Callable[[], T], timeout: float = 120.0,
                            save_to: Path | None = None) -> tuple[GroundTruth, T]:
        """The guest's own view of its memory at one moment, and what `while_paused`
        returns when run with the VM paused at that very moment (default guest only).

        The guest reads its page flags and free lists into memory and waits; the VM is
        paused there, so hvkit's view from outside and the guest's own describe the same
        pages. Then the VM runs again and the guest exports what it read."""
        tag = f"{os.getpid()}-{time.monotonic_ns()}"
        with ControlPort(self) as port:
            port.send(f"freeze {tag}")
            port.read_until(f"HVKIT-FROZEN {tag}", timeout, resend=f"freeze {tag}")
            self.pause()
            try:
                result = while_paused()
            finally:
                self.resume()
                port.send("continue")
            raw = port.read_until(f"HVKIT-GT-END {tag}", timeout)
        return self._parse_export(raw, tag, save_to), result

    @staticmethod
    def _parse_export(raw: str, tag: str, save_to: Path | None) -> GroundTruth:
        raw = raw[raw.find(f"HVKIT-GT-BEGIN {tag}") :]
        if save_to is not None:
            Path(save_to).write_text(raw)
        return parse_ground_truth(raw)


class ControlPort:
    """One conversation with the default guest's control port (its ttyS1, a unix socket
    on the host). Bytes that reach the guest's serial port before its init has opened
    and set it up are lost or mangled, so a request can vanish without any answer:
    `read_until` sends it again every few seconds until its answer starts."""

    def __init__(self, vm: VM) -> None:
        state = vm.run_state()
        if state != "running":
            raise HvkitError(f"VM {vm.name!r} is {state}; the guest answers only while it runs",
                             "resume it first" if state == "paused" else None)
        self.vm = vm
        self.buf = bytearray()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(1.0)
        self.sock.connect(str(vm.rundir.ctl_sock))

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def read_until(self, until: str, timeout: float, resend: str | None = None,
                   started: str | None = None) -> str:
        """Everything received so far up to and including the line holding `until`
        (which is consumed). While `started` (default `until`) has not arrived, `resend`
        is sent again every RESEND_AFTER seconds (safe: answers are matched by tag)."""
        marker, started_b = until.encode(), (started or until).encode()
        start = time.monotonic()
        deadline, resend_at = start + timeout, start + RESEND_AFTER
        while True:
            at = self.buf.find(marker)
            if at >= 0 and self.buf.find(b"\n", at) >= 0:
                cut = self.buf.find(b"\n", at) + 1
                text = self.buf[:cut].decode(errors="replace")
                del self.buf[:cut]
                return text
            now = time.monotonic()
            if now > deadline:
                got = f"{len(self.buf)} bytes, ending {bytes(self.buf[-60:])!r}" if self.buf else "nothing"
                raise HvkitError(f"the guest of {self.vm.name!r} did not answer with {until!r} within "
                                 f"{timeout:.0f} s (it sent {got})", "is it hvkit's default guest?")
            if resend and started_b not in self.buf and now > resend_at:
                self.sock.sendall(b"\n" + resend.encode() + b"\n")
                resend_at = now + RESEND_AFTER
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                continue
            if not chunk:
                self.vm._raise_if_dead(f"while waiting for {until!r}")
                raise HvkitError(f"the control port of {self.vm.name!r} closed mid-answer")
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "ControlPort":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
