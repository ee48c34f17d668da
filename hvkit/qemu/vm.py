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
from hvkit.guest import (GroundTruth, Workload, build_default_guest, build_kernel_guest, guest_of_kernel,
                         parse_ground_truth)
from hvkit.kernel import read_kernel_image
from hvkit.memory import GuestMemory, RamFileMemory
from hvkit.memory.process import ProcessMemory, ram_mappings
from hvkit.memserver.daemon import memserver_alive
from hvkit.procs import left_by_dead_process, process_runs, threads_still_exiting
from hvkit.qemu.accel import ACCELS, best_accel
from hvkit.qemu import imagevm
from hvkit.qemu.agent import GuestAgent
from hvkit.qemu.attach import (QemuFacts, fetch_debian_kernel, probe_libvirt, probe_qmp, process_start_ticks,
                               qemu_cmdline, release_in_memory)
from hvkit.qemu.ownership import LOCK_WAIT, Ownership, fault_point, stale_intents
from hvkit.qemu.qmp import QMPUnreachable, incoming_migration, libvirt_qmp, qmp
from hvkit.qemu.runtime import NAME_RE, RuntimeDir, VMSpec, check_name, free_space_note
from hvkit.signals import deferred_signals
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
    ram_path: str | None = None  # the file its guest RAM is mapped from (None: inside QEMU)
    origin: str = "hvkit"  # "hvkit", or where an attached VM came from ("qmp:<socket>")
    owner: str = ""  # the hvkit command that holds it now, if another one does
    image: str | None = None  # the disk image it boots, if any
    ssh_port: int | None = None  # a VM of an image: `ssh -p` this port on 127.0.0.1

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Pause:
    """One pause of VM.paused(): whether hvkit paused the VM (False: it was paused
    already, and stays so), when, and for how long (filled in when it ends)."""

    vm: "VM"
    ours: bool
    at: float  # time.monotonic()
    seconds: float = 0.0


class VM:
    """A QEMU VM. Start one with VM.start(), find a running one with VM.attach(name);
    used as a context manager, a VM that this object started is stopped on exit."""

    def __init__(self, rundir: RuntimeDir, spec: VMSpec,
                 process: subprocess.Popen | None = None) -> None:
        self.rundir = rundir
        self.spec = spec
        self._process = process  # set only in the process that started QEMU
        self._started_here = process is not None  # the with-block of VM.start stops it

    # ---- finding VMs ----------------------------------------------------------------

    @classmethod
    def attach(cls, name: str, paths: Paths | None = None, wait: float = LOCK_WAIT) -> "VM":
        """The running VM called `name`. Waits (up to `wait` s) for another hvkit command
        that holds the VM to finish with it, and finishes the work of one that died
        (a pause it left, a fork halfway: see ownership.py). A VM found dead is cleaned
        up and reported."""
        paths = paths or Paths.from_env()
        rundir = RuntimeDir(paths.vm_dir(check_name(name)))
        owner = Ownership(paths.runtime, name)
        with owner.hold("attach", wait) as outermost:
            if outermost:
                cls._finish_abandoned(owner, paths)
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
        """Every VM of the runtime folder; dead ones are listed once, then cleaned up.
        A VM another hvkit command holds is shown as it is, never cleaned up; one whose
        owner died has that owner's work finished first (a pause resumed, ...)."""
        paths = paths or Paths.from_env()
        if not paths.runtime.is_dir():
            return []
        rows = []
        for name in stale_intents(paths.runtime):  # work of owners that died, first
            owner = Ownership(paths.runtime, name)
            with owner.try_hold("vm list") as got:
                if got:
                    cls._finish_abandoned(owner, paths)
        for d in sorted(paths.runtime.iterdir()):
            if d.name.startswith(".") or not (d / "vm.json").exists():
                continue
            owner = Ownership(paths.runtime, d.name)
            with owner.try_hold("vm list") as got:
                spec = RuntimeDir(d).read_spec()
                if spec is None:
                    continue
                vm = cls(RuntimeDir(d), spec)
                row = vm.status()
                if got is None:  # busy: whatever it looks like now, it is not dead
                    holder = owner.holder() or {}
                    busy = f"hvkit {holder.get('op', '?')} (pid {holder.get('pid', '?')})"
                    row = VMStatus(**{**row.__dict__, "owner": busy,
                                      "state": row.state if row.state != "dead" else "busy", "reason": ""})
                elif row.state == "dead":
                    vm._cleanup()
                rows.append(row)
        return rows

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
                self._finish_abandoned(self.ownership, self._paths())
                if not self._reload_spec():
                    raise VMDied(f"VM {self.name!r} is gone (stopped by another command)")
            yield self

    def _reload_spec(self) -> bool:
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

    def _paths(self) -> Paths:
        return Paths(Paths.from_env().cache, self.rundir.path.parent)

    @classmethod
    def _finish_abandoned(cls, owner: Ownership, paths: Paths) -> None:
        """Finishes or undoes what a dead owner of the VM had recorded it was doing
        (the caller holds the lock, so its owner is gone), and says so."""
        intent = owner.intent()
        if intent is None:
            return
        undo, what = intent.get("undo"), f"hvkit {intent.get('op', '?')} (pid {intent.get('pid', '?')})"
        rundir = RuntimeDir(paths.runtime / owner.name)
        spec = rundir.read_spec()
        vm = cls(rundir, spec) if spec else None
        if undo == "resume":
            if vm is not None and vm.run_state() == "paused":
                vm._qmp_cont()
                log.warning("VM %s was left paused by %s, which did not finish: resumed it", owner.name, what)
        elif undo == "stop":
            if vm is not None and not vm.attached:
                vm._kill()
            rundir.remove()
            log.warning("VM %s never finished starting (%s did not finish): stopped it", owner.name, what)
        elif undo == "fork":
            from hvkit.fork.recovery import finish_fork  # the fork package knows its own steps

            finish_fork(owner, intent, paths)
        elif undo != "none":
            log.warning("VM %s: unreadable record of %s left as it is", owner.name, what)
        cls.finish_abandoned_children(intent.get("children", []), paths)
        owner.clear_intent()

    @classmethod
    def finish_abandoned_children(cls, names: list[str], paths: Paths) -> None:
        """Children of a fork whose start was cut short are stopped (each child's own
        intent record says so; a child that finished starting has none)."""
        for child in names:
            owner = Ownership(paths.runtime, child)
            with owner.try_hold("fork recovery") as got:
                if got:
                    cls._finish_abandoned(owner, paths)

    # ---- adopting a QEMU hvkit did not start (attach.py) ------------------------------

    @classmethod
    def adopt(cls, qmp_socket: str | Path | None = None, name: str | None = None,
              kernel: str | Path | None = None, paths: Paths | None = None,
              libvirt: str | None = None, connect: str = "qemu:///system") -> "VM":
        """Adopts a running QEMU that hvkit did not start: the one behind `qmp_socket`, or
        libvirt domain `libvirt` (at URI `connect`), as VM `name` (default: the domain's
        name, else attached1, ...). What it is comes from QEMU itself (attach.py); nothing
        in the VM changes, and hvkit never stops or restarts it."""
        paths = paths or Paths.from_env()
        if (qmp_socket is None) == (libvirt is None):
            raise HvkitError("give either a QMP socket or a libvirt domain to attach")
        if libvirt is not None:
            facts, origin = probe_libvirt(libvirt, connect), f"libvirt:{connect}#{libvirt}"
            transport = {"libvirt_uri": connect, "libvirt_domain": libvirt}
            if name is None and NAME_RE.match(libvirt):
                name = libvirt
        else:
            sock = Path(qmp_socket).resolve()
            facts, origin, transport = probe_qmp(sock), f"qmp:{sock}", {"qmp_socket": str(sock)}
        taken = [r for r in cls.list(paths) if r.origin == origin]
        if taken:
            raise HvkitError(f"that QEMU is attached already, as VM {taken[0].name!r}", "use that name")
        name = check_name(name) if name else cls._free_name(paths, "attached")
        return cls._adopt_as(name, facts, origin, transport, kernel, paths)

    @classmethod
    def _adopt_as(cls, name: str, facts: QemuFacts, origin: str, transport: dict,
                  kernel: str | Path | None, paths: Paths) -> "VM":
        spec = VMSpec(name=name, memory=facts.memory, cpus=facts.cpus, kernel=facts.kernel or "", initrd=None,
                      append="", accel=facts.accel, ram="file" if facts.ram_file else "anonymous",
                      ram_file=facts.ram_file, origin=origin, memdev=facts.memdev, machine=facts.machine,
                      pid=facts.pid, proc_start=process_start_ticks(facts.pid), started_at=time.time(),
                      command=qemu_cmdline(facts.pid), **transport)
        owner = Ownership(paths.runtime, name)
        with owner.hold("vm attach") as outermost:
            if outermost:
                cls._finish_abandoned(owner, paths)
            # killed halfway, the next command removes the half-made record (never the QEMU:
            # a VM with an attached spec is not killed by that undo)
            owner.write_intent(op="vm attach", undo="stop")
            rundir = RuntimeDir(paths.vm_dir(name))
            cls._claim(rundir)
            vm = cls(rundir, spec)
            try:
                if kernel or not spec.kernel or not Path(spec.kernel).is_file():
                    spec.kernel = str(Path(kernel).resolve()) if kernel else str(vm._kernel_from_memory(paths))
                spec.kernel_release = read_kernel_image(spec.kernel).release
                rundir.write_spec(spec)
            except BaseException:
                rundir.remove()
                raise
            finally:
                owner.clear_intent()
        return vm

    def _kernel_from_memory(self, paths: Paths) -> Path:
        """The guest's kernel file when QEMU was not given one: the release its memory
        runs, fetched from Debian's archive."""
        candidates = self.memory_candidates()
        try:
            release, failure = None, None
            for memory in candidates:
                try:
                    release = release_in_memory(memory)
                    break
                except HvkitError as e:
                    failure = e
            if release is None:
                raise failure or HvkitError("no guest memory found")
        finally:
            for memory in candidates:
                memory.close()
        log.info("the guest of %s runs kernel %s; fetching it from Debian's archive", self.name, release)
        return fetch_debian_kernel(release, paths)

    def detach(self) -> None:
        """Forgets an attached VM (its QEMU runs on, untouched)."""
        if not self.attached:
            raise HvkitError(f"VM {self.name!r} was started by hvkit", "stop it with 'hvkit vm stop'")
        with self.owned("vm detach"):
            self.rundir.remove()
        self.ownership.forget()

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
        kernel_package: str | None = None,
        append: str = "",
        workload: str | Workload | None = None,
        accel: str = "auto",
        cpu_model: str | None = None,
        ram: str = "file",
        balloon: bool = False,
        image: str | None = None,
        disk_size: str | int | None = None,
        paths: Paths | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> "VM":
        """Starts a VM in the background and returns once QEMU answers on QMP (and, for
        hvkit's own init, once the guest printed its ready marker).

        Without `kernel`, the default guest (built on first use); `kernel_package` (a
        Debian `linux-image-*` package or meta package, NAME/SUITE for another suite)
        boots that kernel with hvkit's initramfs made for it. Without `initrd`, hvkit's
        initramfs, whose init runs `workload`; with your own initrd, the guest is yours
        and hvkit does not wait for a ready marker.

        `ram="file"` (default) puts guest RAM in a shared file hvkit can read and give
        back; `ram="anonymous"` keeps it in QEMU's own memory with KSM merging allowed
        (for comparisons: nothing outside QEMU can read it). `balloon` adds a
        virtio-balloon with free page reporting (hvkit's init loads its driver).

        `image` ("debian") boots that disk image (hvkit.image, built on first use) on
        an overlay of its own (`disk_size` bytes, default the image's), with user
        networking and ssh forwarded to a free local port, and the guest agent; ready
        then means the agent answers and hvkit's control service runs (imagevm.py).
        `timeout` (s) defaults to 120, 300 for an image."""
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
        if image is None and disk_size is not None:
            raise HvkitError("a disk size needs a disk image", "add --image debian, or leave out --disk-size")
        if image is not None and (kernel or initrd or kernel_package):
            raise HvkitError("a disk image boots its own kernel", "leave out --kernel, --initrd and --kernel-package")
        boot = imagevm.ImageBoot.named(image, paths, disk_size) if image is not None else None
        timeout = timeout or (imagevm.BOOT_TIMEOUT if boot else 120.0)

        if kernel_package is not None:
            if kernel is not None:
                raise HvkitError("give either a kernel file or a kernel package", "leave out --kernel")
            kernel = build_kernel_guest(paths, kernel_package).kernel
        if boot is not None:
            kernel_path, initrd_path, release = boot.image.kernel, boot.image.initrd, boot.image.release
        else:
            kernel_path, initrd_path, release = cls._boot_files(paths, kernel, initrd)
        hvkit_init = initrd is None  # hvkit's init, or the image's control service
        if hvkit_init:
            workload = workload or Workload()
        cmdline = boot.kernel_args(workload, append) if boot else " ".join(filter(None, [
            "" if "console=" in append else "console=ttyS0",
            "panic=-1 quiet" if hvkit_init else "",
            workload.kernel_args() if workload else "",
            "hvkit.modules=virtio_balloon" if balloon and hvkit_init else "",
            append,
        ]))
        name = check_name(name) if name else cls._free_name(paths)
        spec = VMSpec(name=name, memory=size, cpus=int(cpus), kernel=str(kernel_path),
                      initrd=str(initrd_path) if initrd_path else None, append=cmdline,
                      accel=accel, workload=str(workload) if workload else None,
                      kernel_release=release, ram=ram, balloon=balloon)
        if boot is not None:
            boot.describe(spec)
        owner = Ownership(paths.runtime, name)
        with owner.hold("vm start") as outermost:
            if outermost:
                cls._finish_abandoned(owner, paths)
            # killed before the guest is ready, this start is undone by the next command
            owner.write_intent(op="vm start", undo="stop")
            try:
                return cls._start_claimed(paths, spec, binary, cpu_model, wait and hvkit_init, timeout)
            finally:  # started, or failed and cleaned up by _start_claimed: nothing to undo
                owner.clear_intent()

    @classmethod
    def _start_claimed(cls, paths: Paths, spec: VMSpec, binary: str, cpu_model: str | None,
                       wait_ready: bool, timeout: float) -> "VM":
        rundir = RuntimeDir(paths.vm_dir(spec.name))
        cls._claim(rundir)
        vm = None
        try:
            if spec.accel == "auto":
                spec.accel = best_accel(binary, paths.runtime)
            if spec.image:
                imagevm.prepare_launch(rundir, spec)
            spec.command = cls._command(binary, rundir, spec, cpu_model)
            vm = cls(rundir, spec)
            vm._launch(timeout)
            if wait_ready and spec.image:
                imagevm.wait_ready(vm, timeout)
            elif wait_ready:
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
                             memserver_pid: int | None, parent: str | None, paths: Paths,
                             in_place: bool = False, timeout: float = 30.0) -> "VM":
        """Starts QEMU for a VM that runs from memory-server snapshot `snapshot` (the file
        `ram_file`, mapped share=off), as the VM `machine` (a VMSpec as a dict) was.
        QEMU waits paused for the device state: `receive_state` finishes the start.
        `memserver_pid`: the server whose file it maps (None: a file of the store, read
        directly). `in_place`: the VM replaces the stopped QEMU of the same name in its
        folder (a VM going on from its own snapshot) and goes on with its console.
        The caller holds the VM (ownership.py)."""
        spec = VMSpec(**{**machine, "name": check_name(name), "ram": "snapshot", "snapshot": snapshot,
                         "ram_file": str(ram_file), "memserver_pid": memserver_pid, "parent": parent,
                         "pid": None, "started_at": None, "command": []})
        old = machine.get("command") or []
        cpu_model = old[old.index("-cpu") + 1] if "-cpu" in old[:-1] else None
        rundir = RuntimeDir(paths.vm_dir(spec.name))
        if in_place:
            rundir.clear_for_restart()
        else:
            cls._claim(rundir)
        vm = None
        try:
            if spec.disk and not in_place:
                imagevm.prepare_child(rundir, spec)  # its own disk overlay, port, MAC, generation id
            spec.command = cls._command(qemu_binary(), rundir, spec, cpu_model)
            vm = cls(rundir, spec)
            vm._launch(timeout)
            return vm
        except BaseException:
            if vm is not None:
                vm._kill()
            if not in_place:
                rundir.remove()
            raise

    def receive_state(self, state: Path, run: bool = True, timeout: float = 30.0) -> None:
        """Loads the device state saved by `save_state` into this VM (started by
        launch_from_snapshot), then lets it run unless `run` is False."""
        self._raise_if_dead("before loading its device state")
        try:
            status, outcome = incoming_migration(self.qmp_path, f"exec:cat {shlex.quote(str(state))}", run, timeout)
        except VMDied:
            self._raise_if_dead("while loading its device state")
            raise
        if status == "inmigrate":
            raise HvkitError(f"VM {self.name!r} did not load its device state within {timeout:.0f} s")
        if outcome != "completed":
            raise HvkitError(f"VM {self.name!r} could not load its device state from {state} "
                             f"(migration {outcome}, run state {status}); QEMU said: "
                             f"{self.rundir.tail(self.rundir.qemu_log, 2) or 'nothing'}")

    def save_state(self, path: Path) -> None:
        """Writes the device state of this paused VM, without its RAM, to `path` (QEMU's
        xen-save-devices-state: its name is historical; it works for any VM)."""
        self.qmp("xen-save-devices-state", {"filename": str(path), "live": False})

    @staticmethod
    def _boot_files(paths: Paths, kernel, initrd) -> tuple[Path, Path | None, str | None]:
        if initrd is not None:
            initrd_path = Path(initrd)
            if not initrd_path.exists():
                raise HvkitError(f"initrd file {initrd} does not exist", "check --initrd")
            if not initrd_path.is_file():
                raise HvkitError(f"initrd {initrd} is not a regular file (a directory or a device)",
                                 "give an initramfs image (a cpio archive, possibly compressed)")
            initrd_path = initrd_path.resolve()
        if kernel is None:
            guest = build_default_guest(paths)
            return guest.kernel, initrd_path if initrd else guest.initrd, guest.release
        image = read_kernel_image(kernel)
        if not image.bootable:
            raise HvkitError(f"{kernel} is a vmlinux; QEMU boots a bzImage",
                             "pass the vmlinuz of the same kernel")
        if initrd is None:  # hvkit's initramfs made for this kernel (its modules), else the default's
            own = guest_of_kernel(paths, image.path)
            initrd_path = (own or build_default_guest(paths)).initrd.resolve()
        return image.path.resolve(), initrd_path, image.release

    @staticmethod
    def _free_name(paths: Paths, prefix: str = "vm") -> str:
        n = 1
        while paths.vm_dir(f"{prefix}{n}").exists():
            n += 1
        return f"{prefix}{n}"

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
            # the guest kernel writes its VMCOREINFO here (through qemu_fw_cfg), so a
            # dump-guest-memory core carries it and drgn or crash open it as it is
            "-device", "vmcoreinfo",
        ]
        if spec.initrd:
            cmd += ["-initrd", spec.initrd]
        if spec.disk:
            cmd += imagevm.device_args(rundir, spec)
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
        self._started_here = True
        with os.fdopen(os.open(self.rundir.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            self._process = subprocess.Popen(
                self.spec.command, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True,  # Ctrl-C on the hvkit command does not reach QEMU
                umask=0o077,  # the RAM file and saved states it makes: its owner's alone
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
        while True:
            try:
                qmp(self.rundir.qmp_sock, "query-status")
                return
            except QMPUnreachable:
                # the socket file exists from bind() on, before QEMU listens; and QEMU opens
                # its sockets before it checks the rest of its command line, so a refused
                # connection means either "not yet" or "exiting": wait, or say what it said
                if self._wait_gone(0.005) or time.monotonic() > deadline:
                    self._wait_gone(2.0)
                    self._raise_if_dead("while starting")
                    raise
            except VMDied:
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

    def _qemu_alive(self) -> bool:
        if self._process is not None:  # our own child: its pid cannot have been reused
            return self._process.poll() is None
        if self.attached:  # the same process as when attached: pid and start time
            return process_runs(self.pid, b"qemu") and process_start_ticks(self.pid) == self.spec.proc_start
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
        """Whether it maps a file of a memory server that died (a VM that maps a store
        file directly, as a forked VM itself does, needs no server)."""
        return (self.spec.ram == "snapshot" and self.spec.memserver_pid is not None
                and not memserver_alive(self.spec.memserver_pid))

    def _death_reason(self) -> str:
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

    def _raise_if_dead(self, when: str) -> None:
        if not self.is_alive():
            raise VMDied(f"VM {self.name!r} died {when}: {self._death_reason()}")

    def run_state(self) -> str:
        """QEMU's run state ('running', 'paused', ...), or 'dead'."""
        if not self.is_alive():
            return "dead"
        try:
            return self.qmp("query-status")["status"]
        except VMDied:
            return "dead"

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
        """Every place guest RAM may be: one RAM file, or the mappings of QEMU's process
        that could hold it (the snapshot file it maps, else every mapping of the RAM's
        size); the caller keeps the one where it finds the guest kernel."""
        if self.spec.ram == "file":
            return [RamFileMemory(self.ram_path, self.spec.machine)]
        path = self.spec.ram_file if self.spec.ram == "snapshot" else None
        found = ram_mappings(self.pid, self.spec.memory, path)
        if not found:
            raise HvkitError(f"cannot find the guest RAM of VM {self.name!r} in QEMU process {self.pid} "
                             f"(no mapping of {format_size(self.spec.memory)}"
                             + (f" of {path})" if path else ")"))
        return [ProcessMemory(self.pid, m.start, self.spec.memory, self.spec.machine) for m in found]

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

    def host_memory(self) -> int:
        """Bytes of guest RAM the host holds: allocated blocks of the RAM file; for
        anonymous RAM, what the RAM mapping of QEMU has resident, minus the pages KSM
        merged (they are held once, elsewhere)."""
        if self.spec.ram == "file":
            try:
                return self.ram_path.stat().st_blocks * 512
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
            parent=self.spec.parent, snapshot=self.spec.snapshot, ram_path=self.ram_file(),
            origin=self.spec.origin, image=self.spec.image, ssh_port=self.spec.ssh_port,
        )

    def ram_file(self) -> str | None:
        """The host file guest RAM is mapped from: its RAM file, or the snapshot file a
        forked VM maps privately; None for RAM inside QEMU."""
        if self.spec.ram == "file":
            return str(self.ram_path)
        return self.spec.ram_file if self.spec.ram == "snapshot" else None

    # ---- control --------------------------------------------------------------------

    def qmp(self, command: str, args: dict | None = None, timeout: float = 10.0):
        """The result of QMP `command`. QEMU's QMP socket serves one client at a time, so
        while QEMU runs, a session that cannot be set up is tried again (for `timeout`):
        another command (`vm list`, a user's own QMP client) may be talking to it."""
        self._raise_if_dead(f"before {command}")
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.spec.libvirt_domain:
                    return libvirt_qmp(self.spec.libvirt_uri, self.spec.libvirt_domain, command, args,
                                       max(timeout, 30.0))
                return qmp(self.qmp_path, command, args, timeout)
            except QMPUnreachable:
                self._raise_if_dead(f"during {command}")
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
            except VMDied:
                self._raise_if_dead(f"during {command}")
                raise

    def _qmp_stop(self) -> None:
        self.qmp("stop")

    def _qmp_cont(self) -> None:
        self.qmp("cont")

    def pause(self) -> None:
        """Pauses the VM for the user: it stays paused until `resume`; no hvkit operation
        resumes it (theirs are recorded as theirs, this one is not)."""
        with self.owned("vm pause"):
            if self.run_state() == "running":
                self._qmp_stop()

    def resume(self) -> None:
        """Resumes a VM paused by the user (or by QEMU itself)."""
        with self.owned("vm resume"):
            if self.run_state() != "running":
                self._qmp_cont()

    @contextlib.contextmanager
    def paused(self, op: str = "pause") -> Iterator["Pause"]:
        """The VM held by this process and paused inside the block, running again after
        it whatever happens inside, if (and only if) this block paused it: a VM the user
        paused stays paused. The pause is recorded before QEMU stops, so if this process
        dies inside the block, the next hvkit command resumes the VM; Ctrl-C and SIGTERM
        wait until the VM runs again."""
        with self.owned(op), deferred_signals():
            ours = self.run_state() == "running"
            if ours:
                self.ownership.write_intent(op=op, undo="resume")
                self._qmp_stop()
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
            self._qmp_cont()
        except VMDied:
            if self.is_alive():
                log.warning("VM %s could not be resumed now; the next hvkit command will", self.name)
                return
        self.ownership.clear_intent()

    def stop(self, timeout: float = 10.0) -> None:
        """Ends QEMU (politely over QMP, then by signal) and removes the runtime folder;
        waits for another hvkit command that holds the VM to finish first."""
        if self.attached:
            raise HvkitError(f"VM {self.name!r} was attached ({self.spec.origin}), not started by hvkit; "
                             "hvkit never stops it", f"'hvkit vm detach {self.name}' forgets it")
        with self.ownership.hold("vm stop") as outermost:
            if outermost:
                self._finish_abandoned(self.ownership, self._paths())
                self._reload_spec()
            self._stop_qemu(timeout)
            self._cleanup()
            if outermost:
                self.ownership.forget()

    def _stop_qemu(self, timeout: float = 10.0) -> None:
        """Ends this VM's QEMU (quit over QMP, then signals) and waits until it is gone,
        with its mappings; the folder stays."""
        if self._qemu_alive():
            try:
                qmp(self.qmp_path, "quit", timeout=timeout)
            except (VMDied, HvkitError):
                pass
            if not self._wait_gone(timeout):
                self._kill()

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._qemu_alive() or threads_still_exiting(self.pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _kill(self, first: signal.Signals = signal.SIGTERM) -> None:
        """Ends QEMU by signal (`first`, then SIGKILL) and waits until it is gone, with
        its mappings."""
        for sig in dict.fromkeys((first, signal.SIGKILL)):
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
        if self.spec.disk:
            imagevm.collect_disks(self._paths())

    def __enter__(self) -> "VM":
        return self

    def __exit__(self, *exc) -> None:
        if self._started_here:
            self.stop()

    # ---- a VM of a disk image: ssh and the guest agent (imagevm.py) -------------------

    def ssh_command(self, *command: str) -> list[str]:
        """The ssh command line that runs `command` (none: a login shell) in the guest
        as root; a clear error for a VM without a disk image."""
        return imagevm.ssh_command(self.spec, *command)

    @property
    def agent(self) -> GuestAgent:
        imagevm.load_image(self.spec)  # a clear error for a VM that has none
        return GuestAgent(self.rundir.qga_sock)

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
        """The guest's own view of its memory and processes (hvkit's guests only: the
        default guest, or a disk image with hvkit's control service),
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
        with self.owned("ground truth"), ControlPort(self) as port:
            port.send(f"freeze {tag}")
            port.read_until(f"HVKIT-FROZEN {tag}", timeout, resend=f"freeze {tag}")
            with self.paused("ground truth"):
                result = while_paused()
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
