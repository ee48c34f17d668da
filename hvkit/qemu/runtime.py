"""A VM's runtime folder: everything one QEMU process owns, in one place.

    <runtime>/<name>/vm.json      what was started (VMSpec) and QEMU's pid
                     ram          guest RAM (memory-backend-file, share=on); a forked
                                  VM maps a memory-server snapshot instead
                     qmp.sock     QMP control socket
                     ctl.sock     the guest's second serial port (ground-truth requests)
                     console.log  the guest's serial console
                     qemu.log     QEMU's own stdout/stderr
                     disk.qcow2   a VM of a disk image: its overlay of the image (imagevm.py)
                     qga.sock     a VM of a disk image: the guest agent's channel (agent.py)
                     *-next.*     while a first fork runs: the sockets, log and spec of the
                                  VM's next QEMU, started before the fork pauses the VM
                                  (SuccessorDir); renamed into place when it takes over

The folder exists exactly as long as the VM: `hvkit vm stop` removes it, and a VM
found dead has its folder removed by whoever notices first.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hvkit.errors import HvkitError
from hvkit.config import make_private_dir
from hvkit.procs import kill_process, kill_processes_with

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with its NUL


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise HvkitError(f"invalid VM name {name!r}",
                         "use up to 40 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


@dataclass(frozen=True)
class RamBackend:
    """One of the memory backends a NUMA machine's RAM is made of, in node order."""

    memdev: str  # QEMU's id of the backend object
    size: int  # bytes
    path: str | None = None  # its mem-path (a file backend), else None (memory inside QEMU)
    shared: bool = False  # mapped share=on
    host: int | None = None  # inside QEMU: where QEMU maps it (ramblocks.py), when its records say


@dataclass
class VMSpec:
    """What a VM was started with: enough to describe it and to start its like again."""

    name: str
    memory: int  # bytes
    cpus: int
    kernel: str
    initrd: str | None
    append: str
    accel: str
    workload: str | None = None  # set for the default guest only
    ram: str = "file"  # "file": RAM file (share=on) hvkit reads and gives back; "anonymous": QEMU's own memory;
    #                    "snapshot": a memory-server snapshot mapped share=off (a forked VM)
    balloon: bool = False  # a virtio-balloon device with free page reporting
    kernel_release: str | None = None
    pid: int | None = None
    started_at: float | None = None
    command: list[str] = field(default_factory=list)
    snapshot: str | None = None  # ram="snapshot": the snapshot it started from
    ram_file: str | None = None  # ram="snapshot": that snapshot's file on the memory server
    memserver_pid: int | None = None  # ram="snapshot": the server that serves it
    parent: str | None = None  # the VM it was forked from
    origin: str = "hvkit"  # "hvkit": started by hvkit; "qmp:<socket>" or "libvirt:<uri>#<domain>": an
    #                        attached QEMU, which hvkit never stops
    qmp_socket: str | None = None  # an attached VM's QMP socket (hvkit's own VMs: qmp.sock in the folder)
    memdev: str = "ram0"  # the id of QEMU's guest-RAM backend object
    machine: str = "pc"  # the PC machine's RAM layout: "pc" (i440fx) or "q35"
    proc_start: int | None = None  # an attached QEMU's start time (with its pid: which process it is)
    libvirt_uri: str | None = None  # an attached libvirt domain: QMP goes through libvirt
    libvirt_domain: str | None = None
    image: str | None = None  # the disk image it boots ("debian"; see imagevm.py), else None
    image_dir: str | None = None  # that image's folder in the cache (kernel, base disk, ssh key)
    disk: str | None = None  # its own qcow2 overlay of the image's disk
    disk_size: int | None = None  # bytes of that disk, when asked for (None: the image's size)
    ssh_port: int | None = None  # 127.0.0.1:ssh_port on the host is the guest's port 22
    mac: str | None = None  # its network card's MAC address
    agent_seconds: float | None = None  # from QEMU's start until the guest agent answered
    boot_seconds: float | None = None  # from QEMU's start until the guest was ready (agent and HVKIT-READY)
    vmgenid: str | None = None  # its VM generation id (a forked child gets a new one)
    frozen_disk: str | None = None  # its disk as frozen at its last fork (a child: the one it started from)
    ram_nodes: list[RamBackend] = field(default_factory=list)  # an attached NUMA VM: its RAM is these
    #                    backends end to end (ram "file": all shared files; else read inside QEMU);
    #                    [] for RAM in one backend (memdev, ram_file)

    def __post_init__(self) -> None:
        self.ram_nodes = [b if isinstance(b, RamBackend) else RamBackend(**b) for b in self.ram_nodes]


class RuntimeDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def name(self) -> str:
        return self.path.name

    ram = property(lambda self: self.path / "ram")
    qmp_sock = property(lambda self: self.path / "qmp.sock")
    ctl_sock = property(lambda self: self.path / "ctl.sock")
    console_log = property(lambda self: self.path / "console.log")
    qemu_log = property(lambda self: self.path / "qemu.log")
    disk = property(lambda self: self.path / "disk.qcow2")
    qga_sock = property(lambda self: self.path / "qga.sock")
    spec_file = property(lambda self: self.path / "vm.json")

    def claim(self) -> None:
        """Creates the folder; FileExistsError if another VM has it."""
        if len(str(self.qmp_sock)) > _SOCKET_PATH_MAX:
            raise HvkitError(f"the runtime folder {self.path} is too deep for a socket path",
                             "set HVKIT_RUNTIME to a shorter folder")
        make_private_dir(self.path.parent)
        os.mkdir(self.path, 0o700)  # guest memory lives here: its owner's alone

    def own_files(self) -> tuple[Path, ...]:
        """The files one QEMU of this folder has to itself (the console is shared)."""
        return (self.qmp_sock, self.ctl_sock, self.qga_sock, self.qemu_log, self.spec_file)

    def clear_for_restart(self) -> None:
        """Removes what a stopped QEMU left in the folder (sockets, its log, its spec),
        and a successor's that never took over, keeping the console: the same VM goes on
        in a new QEMU."""
        for f in self.own_files() + SuccessorDir(self.path).own_files():
            f.unlink(missing_ok=True)

    def write_spec(self, spec: VMSpec) -> None:
        tmp = self.spec_file.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(json.dumps(asdict(spec), indent=2) + "\n")
        tmp.replace(self.spec_file)

    def read_spec(self) -> VMSpec | None:
        try:
            return VMSpec(**json.loads(self.spec_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def kill_qemus(self) -> list[int]:
        """SIGKILLs every QEMU hvkit started for this folder (its command line names the
        VM, `-name hvkit-NAME`, and a file here): also one spawned just before the spec
        that names its pid was written. Waits until they are gone; their pids."""
        return kill_processes_with(f"\0hvkit-{self.name}\0".encode(), f"{self.path}/".encode()) \
            + self.kill_spec_process()

    def kill_spec_process(self) -> list[int]:
        """SIGKILLs the QEMU this folder's spec names by pid and start time (a pooled QEMU
        that became this VM's: its command line names the pool's folder, not this one),
        never an attached one; [its pid] if it was killed."""
        spec = self.read_spec()
        if spec is not None and spec.origin == "hvkit" and kill_process(spec.pid, spec.proc_start):
            return [spec.pid]
        return []

    def tail(self, which: Path, lines: int = 5) -> str:
        try:
            text = which.read_text(errors="replace")
        except OSError:
            return ""
        kept = [line for line in text.splitlines() if line.strip()]
        return "\n".join(kept[-lines:]).strip()


class SuccessorDir(RuntimeDir):
    """The VM's next QEMU, beside its current one in the same folder: its own sockets,
    log and spec (`*-next.*`), the console shared (both append to it; only the one that
    runs writes). A first fork starts it before it pauses the VM, so that the VM goes on
    as soon as its snapshot is sealed; `take_over` then renames its files into place."""

    qmp_sock = property(lambda self: self.path / "qmp-next.sock")
    ctl_sock = property(lambda self: self.path / "ctl-next.sock")
    qga_sock = property(lambda self: self.path / "qga-next.sock")
    qemu_log = property(lambda self: self.path / "qemu-next.log")
    spec_file = property(lambda self: self.path / "vm-next.json")
    # a pooled QEMU (forking/pool.py) writes to a console file of its own: it replaces
    # the VM's at the takeover, the VM's lines copied into it first
    own_console = property(lambda self: self.path / "console-next.log")

    def take_over(self, spec: VMSpec) -> RuntimeDir:
        """Its files renamed to the VM's own names (the current QEMU is gone), `spec`
        written as the VM's spec last: until then the folder's spec names the old QEMU."""
        current = RuntimeDir(self.path)
        if self.own_console.exists():
            with open(self.own_console, "ab") as out, contextlib.suppress(FileNotFoundError), \
                    open(current.console_log, "rb") as before:
                shutil.copyfileobj(before, out)  # it has not run yet: the VM's lines come first
            os.replace(self.own_console, current.console_log)
        for mine, theirs in zip(self.own_files()[:-1], current.own_files()[:-1]):
            if mine.exists():
                os.replace(mine, theirs)
        self.write_spec(spec)
        os.replace(self.spec_file, current.spec_file)
        return current

    def discard(self) -> None:
        for f in self.own_files() + (self.own_console,):
            f.unlink(missing_ok=True)

    def kill_qemu(self) -> list[int]:
        """SIGKILLs the successor QEMU of this folder, if one runs (found by its QMP
        socket on its command line: also one whose spec was never written; or a pooled
        QEMU, by the pid and start time its spec names)."""
        return kill_processes_with(f"\0hvkit-{self.name}\0".encode(), str(self.qmp_sock).encode()) \
            + self.kill_spec_process()


def free_space_note(folder: Path) -> str:
    """'' or why the file system of `folder` cannot hold more guest RAM (less than 1 MiB
    free): a guest touching RAM its file cannot store kills QEMU."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return ""
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    if total and free < 1 << 20:
        return (f"the file system of {folder} is full ({free >> 20} MiB free of {total >> 20} MiB); "
                "QEMU dies when its guest touches RAM that the RAM file cannot store")
    return ""
