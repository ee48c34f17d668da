"""Adopting a QEMU that hvkit did not start (`hvkit vm attach`), and forgetting it
(`hvkit vm detach`).

What the QEMU is comes from QEMU itself (probe.py); nothing in the VM changes, and
hvkit never stops or restarts it. An adoption killed halfway leaves no half-made
record: its intent says "stop", which for an adopted VM removes the record only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.kernel import read_kernel_image
from hvkit.procs import process_start_ticks
from hvkit.qemu.launch import claim_folder, free_name
from hvkit.qemu.listing import list_vms
from hvkit.qemu.ownership import Ownership
from hvkit.qemu.ramblocks import place_backends
from hvkit.qemu.probe import (QemuFacts, fetch_debian_kernel, probe_libvirt, probe_qmp, qemu_cmdline,
                              release_in_memory)
from hvkit.qemu.runtime import NAME_RE, RuntimeDir, VMSpec, check_name
from hvkit.qemu.vm import VM, finish_abandoned

log = logging.getLogger(__name__)


def adopt_vm(qmp_socket: str | Path | None = None, name: str | None = None,
             kernel: str | Path | None = None, paths: Paths | None = None,
             libvirt: str | None = None, connect: str = "qemu:///system") -> VM:
    """Adopts a running QEMU that hvkit did not start: the one behind `qmp_socket`, or
    libvirt domain `libvirt` (at URI `connect`), as VM `name` (default: the domain's
    name, else attached1, ...)."""
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
    taken = [r for r in list_vms(paths) if r.origin == origin]
    if taken:
        raise HvkitError(f"that QEMU is attached already, as VM {taken[0].name!r}", "use that name")
    name = check_name(name) if name else free_name(paths, "attached")
    return _adopt_as(name, facts, origin, transport, kernel, paths)


def _adopt_as(name: str, facts: QemuFacts, origin: str, transport: dict,
              kernel: str | Path | None, paths: Paths) -> VM:
    # RAM hvkit reads from its files only where they are all mapped shared: a file mapped
    # share=off does not hold what the guest wrote (QEMU's own copies of those pages do)
    in_files = facts.shared and all(b.path for b in facts.nodes) and facts.ram_file is not None
    spec = VMSpec(name=name, memory=facts.memory, cpus=facts.cpus, kernel=facts.kernel or "", initrd=None,
                  append="", accel=facts.accel, ram="file" if in_files else "anonymous",
                  ram_nodes=place_backends(facts.pid, list(facts.nodes)) if facts.nodes else [],
                  ram_file=facts.ram_file, origin=origin, memdev=facts.memdev, machine=facts.machine,
                  pid=facts.pid, proc_start=process_start_ticks(facts.pid), started_at=time.time(),
                  command=qemu_cmdline(facts.pid), **transport)
    owner = Ownership(paths.runtime, name)
    with owner.hold("vm attach") as outermost:
        if outermost:
            finish_abandoned(owner, paths)
        # killed halfway, the next command removes the half-made record (never the QEMU:
        # a VM with an attached spec is not killed by that undo)
        owner.write_intent(op="vm attach", undo="stop")
        rundir = RuntimeDir(paths.vm_dir(name))
        claim_folder(rundir)
        vm = VM(rundir, spec)
        try:
            if kernel or not spec.kernel or not Path(spec.kernel).is_file():
                spec.kernel = str(Path(kernel).resolve()) if kernel else str(kernel_from_memory(vm, paths))
            spec.kernel_release = read_kernel_image(spec.kernel).release
            rundir.write_spec(spec)
        except BaseException:
            rundir.remove()
            raise
        finally:
            owner.clear_intent()
    return vm


def kernel_from_memory(vm: VM, paths: Paths) -> Path:
    """The guest's kernel file when QEMU was not given one: the release its memory
    runs, fetched from Debian's archive."""
    candidates = vm.memory_candidates()
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
    log.info("the guest of %s runs kernel %s; fetching it from Debian's archive", vm.name, release)
    return fetch_debian_kernel(release, paths)


def detach_vm(vm: VM) -> None:
    """Forgets an attached VM (its QEMU runs on, untouched)."""
    if not vm.attached:
        raise HvkitError(f"VM {vm.name!r} was started by hvkit", "stop it with 'hvkit vm stop'")
    with vm.owned("vm detach"):
        vm.rundir.remove()
    vm.ownership.forget()
