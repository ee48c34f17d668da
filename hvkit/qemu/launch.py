"""Launching QEMU: the checks of a start request, the boot files, the command line, the
process, and waiting until the guest is ready.

A VM is a QEMU process started in the background (it outlives the hvkit command that
started it) plus its runtime folder (runtime.py). Guest RAM is a `memory-backend-file`
with share=on, so hvkit can read the guest's memory from the host file and later give
pages of it back. A VM that runs from a memory-server snapshot (a fork's child, or a
forked VM going on) maps the snapshot's file share=off instead and waits, paused, for
the device state (`launch_from_snapshot`, then `receive_state`).

Every start is a transaction: killed before the guest is ready, it is undone by the
next hvkit command that touches the name (the intent record says "stop": vm.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from hvkit.config import Paths
from hvkit.errors import HvkitError, VMDied
from hvkit.guest import Workload, build_default_guest, build_kernel_guest, guest_of_kernel
from hvkit.kernel import read_kernel_image
from hvkit.qemu import imagevm
from hvkit.qemu.accel import ACCELS, best_accel
from hvkit.qemu.agent import GuestAgent
from hvkit.qemu.disk import virtual_size
from hvkit.qemu.ownership import Ownership, fault_point
from hvkit.qemu.qmp import QMPUnreachable, incoming_migration, qmp
from hvkit.qemu.runtime import RuntimeDir, SuccessorDir, VMSpec, check_name
from hvkit.qemu.thp import thp_disabled_for_children
from hvkit.qemu.vm import VM, finish_abandoned
from hvkit.units import MiB, format_size, parse_size

log = logging.getLogger(__name__)

READY_MARKER = "HVKIT-READY"  # what hvkit's init prints on the console once the guest is up
MIN_MEMORY = 16 * MiB
RAM_KINDS = ("file", "anonymous")
DEFAULT_TIMEOUT = 120.0


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


def checked_memory(memory: str | int) -> int:
    """`memory` in bytes, or a clear error for a size QEMU or this host cannot give."""
    size = parse_size(memory)
    if size < MIN_MEMORY or size % MiB:
        raise HvkitError(f"invalid memory size {memory!r}", "give whole MiB, at least 16M")
    if size > _host_memory_bytes():
        raise HvkitError(f"memory size {format_size(size)} is more than this host has "
                         f"({format_size(_host_memory_bytes() // MiB * MiB)})")
    return size


def start_vm(
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
) -> VM:
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
    size = checked_memory(memory)
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
    timeout = timeout or (imagevm.BOOT_TIMEOUT if boot else DEFAULT_TIMEOUT)

    if kernel_package is not None:
        if kernel is not None:
            raise HvkitError("give either a kernel file or a kernel package", "leave out --kernel")
        kernel = build_kernel_guest(paths, kernel_package).kernel
    if boot is not None:
        kernel_path, initrd_path, release = boot.image.kernel, boot.image.initrd, boot.image.release
    else:
        kernel_path, initrd_path, release = boot_files(paths, kernel, initrd)
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
    name = check_name(name) if name else free_name(paths)
    spec = VMSpec(name=name, memory=size, cpus=int(cpus), kernel=str(kernel_path),
                  initrd=str(initrd_path) if initrd_path else None, append=cmdline,
                  accel=accel, workload=str(workload) if workload else None,
                  kernel_release=release, ram=ram, balloon=balloon)
    if boot is not None:
        boot.describe(spec)
    owner = Ownership(paths.runtime, name)
    with owner.hold("vm start") as outermost:
        if outermost:
            finish_abandoned(owner, paths)
        # killed before the guest is ready, this start is undone by the next command
        owner.write_intent(op="vm start", undo="stop")
        try:
            return _start_claimed(paths, spec, binary, cpu_model, wait and hvkit_init, timeout)
        finally:  # started, or failed and cleaned up by _start_claimed: nothing to undo
            owner.clear_intent()


def _start_claimed(paths: Paths, spec: VMSpec, binary: str, cpu_model: str | None,
                   wait_ready: bool, timeout: float) -> VM:
    rundir = RuntimeDir(paths.vm_dir(spec.name))
    claim_folder(rundir)
    vm = None
    try:
        if spec.accel == "auto":
            spec.accel = best_accel(binary, paths.runtime)
        if spec.image:
            imagevm.prepare_launch(rundir, spec)
        spec.command = qemu_command(binary, rundir, spec, cpu_model)
        vm = VM(rundir, spec)
        spawn(vm, timeout)
        if wait_ready and spec.image:
            wait_image_ready(vm, timeout)
        elif wait_ready:
            vm.wait_for_console(READY_MARKER, timeout=timeout)
        return vm
    except BaseException:
        # whatever went wrong (including Ctrl-C), leave nothing running or behind
        if vm is not None:
            vm.kill()
        rundir.remove()
        raise


def launch_from_snapshot(name: str, machine: dict, snapshot: str, ram_file: Path,
                         memserver_pid: int | None, parent: str | None, paths: Paths,
                         in_place: bool = False, timeout: float = 30.0) -> VM:
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
    cpu_model = cpu_model_of(machine.get("command") or [])
    rundir = RuntimeDir(paths.vm_dir(spec.name))
    if in_place:
        rundir.clear_for_restart()
    else:
        claim_folder(rundir)
    vm = None
    try:
        if spec.disk and not in_place:
            imagevm.prepare_child(rundir, spec)  # its own disk overlay, port, MAC, generation id
        spec.command = qemu_command(qemu_binary(), rundir, spec, cpu_model)
        vm = VM(rundir, spec)
        spawn(vm, timeout)
        return vm
    except BaseException:
        if vm is not None:
            vm.kill()
        if not in_place:
            rundir.remove()
        raise


def start_successor(vm: VM) -> VM:
    """Starts the next QEMU of `vm` beside its current one, without waiting for it
    (`wait_qmp_ready`): it maps the file the VM's RAM is (a VM with a RAM file) or comes
    from (a fork child: its snapshot) privately (share=off) and waits, paused, for the
    device state. A first fork moves the RAM file into the store (a rename: this QEMU
    keeps mapping the same file) and seals it once the old QEMU is gone; this QEMU has
    not touched a page of it before it loads the state (QEMU touches no guest RAM
    before an incoming migration), so it then sees the file as frozen. A reset gives
    a child a fresh QEMU of its snapshot this way. Its files are its own (SuccessorDir)
    until it takes over (`SuccessorDir.take_over`). The caller holds the VM."""
    cpu_model = cpu_model_of(vm.spec.command or [])
    child = vm.spec.ram == "snapshot"
    spec = VMSpec(**{**asdict(vm.spec), "ram": "snapshot", "ram_file": vm.spec.ram_file if child else str(vm.ram_path),
                     "snapshot": vm.spec.snapshot if child else None,
                     "memserver_pid": vm.spec.memserver_pid if child else None,
                     "pid": None, "started_at": None, "command": []})
    rundir = SuccessorDir(vm.rundir.path)
    rundir.discard()  # files of a successor that never took over
    spec.command = qemu_command(qemu_binary(), rundir, spec, cpu_model)
    successor = VM(rundir, spec)
    try:
        spawn_process(successor)
    except BaseException:
        rundir.kill_qemu()
        rundir.discard()
        raise
    return successor


def receive_state(vm: VM, state: Path, run: bool = True, timeout: float = 30.0) -> None:
    """Loads the device state saved by `VM.save_state` into `vm` (started by
    launch_from_snapshot), then lets it run unless `run` is False."""
    vm.raise_if_dead("before loading its device state")
    try:
        with open(state, "rb") as f:  # QEMU reads it from the fd it is handed (getfd, fd:)
            status, outcome = incoming_migration(vm.qmp_path, "fd:hvkit-state", run, timeout, fd=f.fileno())
    except FileNotFoundError:
        raise HvkitError(f"VM {vm.name!r}: its device state {state} is missing") from None
    except VMDied:
        vm.raise_if_dead("while loading its device state")
        raise
    if status == "inmigrate":
        raise HvkitError(f"VM {vm.name!r} did not load its device state within {timeout:.0f} s")
    if outcome != "completed":
        raise HvkitError(f"VM {vm.name!r} could not load its device state from {state} "
                         f"(migration {outcome}, run state {status}); QEMU said: "
                         f"{vm.rundir.tail(vm.rundir.qemu_log, 2) or 'nothing'}")


def boot_files(paths: Paths, kernel, initrd) -> tuple[Path, Path | None, str | None]:
    """(kernel, initrd, release) to boot: the default guest's, or the given kernel with
    hvkit's initramfs made for it (or the default's), or the given initrd."""
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


def free_name(paths: Paths, prefix: str = "vm") -> str:
    """The first of PREFIX1, PREFIX2, ... that no VM of `paths` uses."""
    n = 1
    while paths.vm_dir(f"{prefix}{n}").exists():
        n += 1
    return f"{prefix}{n}"


def claim_folder(rundir: RuntimeDir) -> None:
    """Makes the VM's runtime folder as this process's; leftovers of a dead VM or of a
    start that never finished are removed first, a running VM of that name refused."""
    try:
        rundir.claim()
        return
    except FileExistsError:
        pass
    spec = rundir.read_spec()
    if spec is not None and VM(rundir, spec).is_alive():
        raise HvkitError(f"a VM named {rundir.name!r} is already running",
                         "choose another --name, or stop it with 'hvkit vm stop'")
    rundir.remove()  # leftovers of a dead VM, or of a start that never finished
    rundir.claim()


def cpu_model_of(command: list[str]) -> str | None:
    """The `-cpu` model of a QEMU command line, or None: a VM started again (a fork's
    child, its next QEMU) gets the CPU it had."""
    return command[command.index("-cpu") + 1] if "-cpu" in command[:-1] else None


def qemu_command(binary: str, rundir: RuntimeDir, spec: VMSpec, cpu_model: str | None) -> list[str]:
    """QEMU's command line for `spec`: RAM in a file (or a snapshot's file, mapped
    privately), the console and the control port on serial ports, QMP on a socket of
    the VM's folder."""
    size = format_size(spec.memory)
    cmd = [
        binary, "-name", f"hvkit-{spec.name}",
        "-machine", "pc,memory-backend=ram0", "-accel", accel_arg(spec),
        "-m", size, "-smp", str(spec.cpus),
        "-object", ram_backend(rundir, spec),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-chardev", f"file,id=con,path={rundir.console_log}" + (",append=on" if spec.ram == "snapshot" else ""),
        "-serial", "chardev:con",
        "-chardev", f"socket,id=ctl,path={rundir.ctl_sock},server=on,wait=off",
        "-serial", "chardev:ctl",
        "-qmp", f"unix:{rundir.qmp_sock},server=on,wait=off",
        # the guest kernel writes its VMCOREINFO here (through qemu_fw_cfg), so a
        # dump-guest-memory core carries it and drgn or crash open it as it is
        "-device", "vmcoreinfo",
    ]
    if spec.ram != "snapshot":
        # a VM that goes on from a snapshot has its kernel in memory already: without
        # them its QEMU starts sooner and holds less (no option ROM, no copies of the
        # kernel and initrd in fw_cfg); a reboot ends it (-no-reboot) as it ends any VM
        cmd += ["-kernel", spec.kernel, "-append", spec.append] + (["-initrd", spec.initrd] if spec.initrd else [])
    if spec.disk:
        cmd += imagevm.device_args(rundir, spec)
    if spec.balloon:
        cmd += ["-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on"]
    if cpu_model:
        cmd += ["-cpu", cpu_model]
    if spec.ram == "snapshot":
        # paused, waiting for the device state (saved without RAM, so no
        # configuration section: see hvkit.forking)
        cmd += ["-S", "-incoming", "defer", "-global", "migration.send-configuration=off"]
    return cmd


# TCG's translation buffer for a QEMU that goes on from a snapshot (a fork child, or the
# VM itself after its fork), in MiB. QEMU's default is min(1 GiB, host RAM / 8): the
# buffer only grows until it is full, so a busy child could come to hold up to 1 GiB
# of translated code. Measured (`info jit`, bench/fork.py's jit columns): an idle
# child's code is 2-5 MiB after minutes, with no flush; 64 MiB bounds what a child can
# hold while leaving a busy one room (a full buffer is flushed and refilled, costing
# retranslation, not correctness). A fresh boot keeps the default (it translates far
# more: BIOS, kernel, init).
TB_SIZE_MIB = 64


def accel_arg(spec: VMSpec) -> str:
    """The -accel argument: TCG with a bounded translation buffer for a VM that goes on
    from a snapshot."""
    if spec.accel == "tcg" and spec.ram == "snapshot":
        return f"tcg,tb-size={TB_SIZE_MIB}"
    return spec.accel


def ram_backend(rundir: RuntimeDir, spec: VMSpec) -> str:
    size = format_size(spec.memory)
    if spec.ram == "file":
        return f"memory-backend-file,id=ram0,size={size},mem-path={rundir.ram},share=on"
    if spec.ram == "snapshot":
        return f"memory-backend-file,id=ram0,size={size},mem-path={spec.ram_file},share=off"
    return f"memory-backend-ram,id=ram0,size={size},merge=on"


def spawn(vm: VM, timeout: float) -> None:
    """Runs `vm.spec.command` in the background (its own session: Ctrl-C on hvkit does
    not reach QEMU) and returns once QEMU answers on QMP; VMDied with what QEMU said if
    it exits first."""
    spawn_process(vm)
    wait_qmp_ready(vm, timeout)


def spawn_process(vm: VM) -> None:
    """Starts QEMU (`vm.spec.command`) and writes the spec that names it, without
    waiting for it to answer (wait_qmp_ready): a first fork starts the VM's next QEMU
    this way and pauses the VM while it comes up. THP is off in it (thp.py)."""
    log.info("starting %s: %s", vm.name, " ".join(vm.spec.command))
    rundir = vm.rundir
    with os.fdopen(os.open(rundir.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out, \
            thp_disabled_for_children():
        process = subprocess.Popen(
            vm.spec.command, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True,  # Ctrl-C on the hvkit command does not reach QEMU
            umask=0o077,  # the RAM file and saved states it makes: its owner's alone
        )
    fault_point(f"qemu spawned {vm.name}")  # QEMU runs, and no spec names it yet
    vm.bind_process(process)
    rundir.write_spec(vm.spec)


def wait_qmp_ready(vm: VM, timeout: float) -> None:
    """Returns once the QEMU of `vm` answers on QMP; VMDied with what QEMU said if it
    exits first, HvkitError after `timeout` seconds."""
    rundir = vm.rundir
    deadline = time.monotonic() + timeout
    while not rundir.qmp_sock.exists():
        vm.raise_if_dead("while starting")
        if time.monotonic() > deadline:
            raise HvkitError(f"QEMU did not open its QMP socket within {timeout:.0f} s")
        time.sleep(0.002)
    while True:
        try:
            qmp(rundir.qmp_sock, "query-status")
            return
        except QMPUnreachable:
            # the socket file exists from bind() on, before QEMU listens; and QEMU opens
            # its sockets before it checks the rest of its command line, so a refused
            # connection means either "not yet" or "exiting": wait, or say what it said
            if vm.wait_gone(0.005) or time.monotonic() > deadline:
                vm.wait_gone(2.0)
                vm.raise_if_dead("while starting")
                raise
        except VMDied:
            vm.wait_gone(2.0)
            vm.raise_if_dead("while starting")
            raise


def wait_image_ready(vm: VM, timeout: float) -> None:
    """Waits until the guest agent answers and the control service said HVKIT-READY
    (so sshd and the control port answer too); records the boot time in the spec. On
    timeout, an error naming what did not answer (the caller stops the VM)."""
    started = vm.spec.started_at or time.time()
    deadline = time.monotonic() + timeout
    agent = GuestAgent(vm.rundir.qga_sock)
    agent.wait_until_answers(timeout, lambda: vm.raise_if_dead("while booting"), f"VM {vm.name!r}")
    vm.spec.agent_seconds = round(time.time() - started, 2)
    vm.wait_for_console(READY_MARKER, timeout=max(1.0, deadline - time.monotonic()))
    vm.spec.boot_seconds = round(time.time() - started, 2)
    grow_file_system(vm, agent)
    vm.rundir.write_spec(vm.spec)


def grow_file_system(vm: VM, agent: GuestAgent) -> None:
    """A disk made larger than the image (--disk-size) gets its ext4 grown to fill it,
    online, by the guest itself: the image's file system is only as big as the image."""
    if vm.spec.disk_size is None or vm.spec.disk_size <= virtual_size(imagevm.load_image(vm.spec).image):
        return
    result = agent.exec("/sbin/resize2fs", "/dev/vda", timeout=120)
    if result.exitcode != 0:
        said = (result.stderr or result.stdout).strip().splitlines()
        raise HvkitError(f"growing the file system of VM {vm.name!r} failed: {said[-1] if said else result.exitcode}")
