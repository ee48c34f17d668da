"""What a QEMU that hvkit did not start is (adopt.py takes it over: `hvkit vm attach
--qmp SOCKET`, or `--libvirt DOMAIN`: then QMP goes through libvirt's pass-through,
since libvirt holds the domain's own QMP socket).

What hvkit needs to know of such a VM it asks QEMU and the kernel, never the user:

- its process: the peer of the QMP socket (SO_PEERCRED), or the QEMU whose command line
  names the libvirt domain; checked to be a QEMU;
- its guest RAM: the machine's RAM backend (QMP `query-memdev`, `qom-get` of the
  machine's `memory-backend` and of the backend's `mem-path`/`share`): a shared file
  hvkit can read and punch holes in, or memory inside QEMU read through /proc/PID/mem.
  A NUMA machine has no `memory-backend` but one backend per node (`-numa
  node,memdev=ID`), which QEMU lays end to end in a RAM container; where each lies in
  it comes from QEMU's own memory tree (HMP `info mtree`, the container's section);
- the machine's RAM layout: i440fx (`pc`) or q35, from `qom-get /machine type`;
- the guest kernel: QEMU's `-kernel` file when it has one; else the release found in
  guest memory (the kernel's banner) and that Debian kernel package fetched; else
  the user's `--kernel`.

An attached VM is never stopped or restarted by hvkit: `vm detach` forgets it.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.qemu.qmp import QMPUnreachable, libvirt_qmp, qmp
from hvkit.qemu.runtime import RamBackend

MACHINES = {"i440fx": "pc", "q35": "q35"}


@dataclass(frozen=True)
class QemuFacts:
    pid: int
    memory: int  # bytes of guest RAM
    memdev: str  # the RAM backend's id
    ram_file: str | None  # its mem-path, for a file backend
    shared: bool  # mapped share=on (holes punched in the file reach the guest)
    machine: str  # "pc" or "q35"
    cpus: int
    accel: str
    kernel: str | None  # QEMU's -kernel, if it has one
    nodes: tuple[RamBackend, ...] = ()  # a NUMA machine's backends in node order (else empty)


def peer_pid(sock: Path) -> int:
    """The pid of the process serving unix socket `sock` (SO_PEERCRED)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5.0)
        try:
            s.connect(str(sock))
        except OSError as e:
            raise HvkitError(f"cannot connect to {sock} ({e.strerror or e})",
                             "give the QMP socket of a running QEMU (-qmp unix:PATH,server=on)") from None
        pid, _, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid


def qemu_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        raise HvkitError(f"process {pid} is gone") from None


def probe_qmp(sock: Path) -> QemuFacts:
    """What hvkit needs to know of the QEMU behind QMP socket `sock` (see the module)."""
    if not sock.exists():
        raise HvkitError(f"{sock} does not exist", "give the QMP socket of a running QEMU")
    pid = peer_pid(sock)
    cmdline = qemu_cmdline(pid)
    if not cmdline or "qemu-system" not in Path(cmdline[0]).name:
        raise HvkitError(f"{sock} is served by process {pid} ({cmdline[0] if cmdline else '?'}), not QEMU")
    status = _first_answer(sock)
    if status.get("status") in ("inmigrate", "prelaunch", "shutdown", "internal-error"):
        raise HvkitError(f"the QEMU behind {sock} is {status['status']}", "attach to a VM that runs")
    return _facts(lambda cmd, args=None: qmp(sock, cmd, args, timeout=5.0), pid, cmdline)


def probe_libvirt(domain: str, uri: str) -> QemuFacts:
    """What hvkit needs to know of libvirt domain `domain`, asked through libvirt."""
    try:
        out = subprocess.run(["virsh", "-c", uri, "domstate", domain], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise HvkitError("virsh is not installed", "apt-get install libvirt-clients (./setup.sh does)") from None
    if out.returncode != 0:
        said = " ".join(out.stderr.split())
        if "failed to get domain" in said:
            raise HvkitError(f"libvirt at {uri} has no domain named {domain!r}", "see 'virsh -c URI list --all'")
        raise HvkitError(f"libvirt at {uri} did not answer for domain {domain!r}: {said}",
                         "is libvirtd running, and is this the right --connect URI?")
    state = out.stdout.strip()
    if state not in ("running", "paused"):
        raise HvkitError(f"libvirt domain {domain!r} is {state}", "start it first ('virsh start')")
    pid = _libvirt_qemu_pid(domain)
    call = lambda cmd, args=None: libvirt_qmp(uri, domain, cmd, args, timeout=30.0)  # noqa: E731
    return _facts(call, pid, qemu_cmdline(pid))


def _libvirt_qemu_pid(domain: str) -> int:
    """The QEMU process libvirt runs for `domain` (its command line has -name guest=NAME)."""
    wanted = f"guest={domain},".encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline.split(b"\0", 1)[0] and any(
                    arg.startswith(wanted) or arg == wanted[:-1] for arg in cmdline.split(b"\0")):
                return int(proc.name)
    raise HvkitError(f"no QEMU process of libvirt domain {domain!r} on this host",
                     "hvkit reads a domain's memory on the host that runs it")


def _first_answer(sock: Path) -> dict:
    """query-status; QEMU serves one QMP client at a time and may not have seen our
    SO_PEERCRED connection close yet, so a refused session is tried again briefly."""
    deadline = time.monotonic() + 3.0
    while True:
        try:
            return qmp(sock, "query-status", timeout=5.0)
        except QMPUnreachable as e:
            if time.monotonic() > deadline:
                raise HvkitError(f"{sock} does not speak QMP ({e})",
                                 "give QEMU's -qmp socket (not a console or monitor socket)") from None
            time.sleep(0.05)
        except HvkitError as e:
            raise HvkitError(f"{sock} does not speak QMP ({e})", "give QEMU's -qmp socket") from None


def _facts(call: Callable[..., Any], pid: int, cmdline: list[str]) -> QemuFacts:
    machine_type = call("qom-get", {"path": "/machine", "property": "type"})
    machine = next((short for key, short in MACHINES.items() if key in machine_type), None)
    if machine is None:
        raise HvkitError(f"the VM's machine is {machine_type}; hvkit knows the RAM layout of the PC "
                         "machines (i440fx and q35) only")
    memdevs = call("query-memdev")
    backends = machine_ram_backends(call, memdevs, pid)
    kernel = cmdline[cmdline.index("-kernel") + 1] if "-kernel" in cmdline[:-1] else None
    accel = "kvm" if any("kvm" in a for a in cmdline) else "tcg"
    first = backends[0]
    return QemuFacts(pid=pid, memory=sum(b.size for b in backends), memdev=first.memdev, ram_file=first.path,
                     shared=all(b.shared for b in backends), machine=machine,
                     cpus=len(call("query-cpus-fast")), accel=accel, kernel=kernel,
                     nodes=tuple(backends) if len(backends) > 1 else ())


def machine_ram_backends(call: Callable[..., Any], memdevs: list[dict], pid: int) -> list[RamBackend]:
    """The memory backends the machine's RAM is made of, in the order QEMU lays them out:
    the machine's `memory-backend`, or a NUMA machine's node backends (from its memory
    tree), checked against the RAM size QEMU reports."""
    try:
        main = call("qom-get", {"path": "/machine", "property": "memory-backend"})
    except HvkitError:
        main = None
    main = main.rsplit("/", 1)[-1] if main else None
    by_id = {m.get("id"): m for m in memdevs}
    if main in by_id:
        chosen = [by_id[main]]
    else:
        try:
            ids = ram_container_backends(call("human-monitor-command", {"command-line": "info mtree"}))
        except HvkitError:
            ids = []
        chosen = [by_id[i] for i in ids] if ids and all(i in by_id for i in ids) else []
        if not chosen and memdevs:  # an older QEMU: the largest backend
            chosen = [max(memdevs, key=lambda m: m.get("size", 0))]
    if not chosen:
        raise HvkitError(f"QEMU process {pid} reports no RAM backend (query-memdev is empty)",
                         "is this a QEMU older than 5.0?")
    backends = [_backend(call, m) for m in chosen]
    try:
        base = int(call("query-memory-size-summary")["base-memory"])
    except (HvkitError, KeyError, TypeError, ValueError):
        base = None
    if base is not None and sum(b.size for b in backends) != base:
        raise HvkitError(f"QEMU process {pid} has {base >> 20} MiB of RAM, but its backends "
                         f"{', '.join(b.memdev for b in backends)} hold {sum(b.size for b in backends) >> 20} MiB",
                         "hvkit reads RAM made of memory backends only (no pc-dimm or virtio-mem hotplug yet)")
    return backends


def _backend(call: Callable[..., Any], memdev: dict) -> RamBackend:
    ident = memdev.get("id") or "pc.ram"
    try:
        path = call("qom-get", {"path": f"/objects/{ident}", "property": "mem-path"})
    except HvkitError:
        path = None  # memory-backend-ram (or memfd): inside QEMU
    return RamBackend(memdev=ident, size=int(memdev["size"]), path=path or None, shared=bool(memdev.get("share")))


_SECTION = re.compile(r"^memory-region: (\S+)$")
_RAM_ALIAS = re.compile(r"\): alias ram-below-4g @(\S+) ")
_SUBREGION = re.compile(r"^\s+([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ram\): (\S+)$")


def ram_container_backends(mtree: str) -> list[str]:
    """From QEMU's `info mtree`: the ids of the backends in the container the PC
    machine's low RAM aliases (`ram-below-4g @CONTAINER`), in address order, when they
    fill it from 0 without a gap; [] when the text shows no such container."""
    alias = _RAM_ALIAS.search(mtree)
    if alias is None:
        return []
    section, rows = None, []
    for line in mtree.splitlines():
        head = _SECTION.match(line)
        if head:
            section = head.group(1)
            continue
        row = _SUBREGION.match(line) if section == alias.group(1) else None
        if row:
            rows.append((int(row.group(1), 16), int(row.group(2), 16) + 1, row.group(3)))
    rows.sort()
    at = 0
    for start, end, _ in rows:
        if start != at:
            return []
        at = end
    return [name for _, _, name in rows]


BANNER = re.compile(rb"Linux version (\S+) \(")


def release_in_memory(memory) -> str:
    """The kernel release the guest memory runs, from the banner the kernel keeps in its
    image (`Linux version <release> (...`)."""
    for gpa in memory.find(b"Linux version ", limit=64):
        m = BANNER.match(memory.read(gpa, 200))
        if m:
            return m.group(1).decode(errors="replace")
    raise HvkitError("no Linux kernel banner in the guest's memory (is it a Linux guest, and booted?)",
                     "pass --kernel FILE")


def fetch_debian_kernel(release: str, paths: Paths) -> Path:
    """The vmlinuz of Debian's `linux-image-<release>`, from any suite, fetched into the
    cache with hvkit's own apt configuration (the default guest's kernel is found there
    and never fetched twice)."""
    from hvkit.guest.build import fetch_kernel_file

    try:
        return fetch_kernel_file(paths, f"linux-image-{release}")
    except HvkitError as e:
        raise HvkitError(f"the guest runs kernel {release}, which hvkit cannot fetch from Debian's archive ({e})",
                         "pass --kernel FILE (the guest's vmlinuz)") from None
