"""Finding VMs: one by name (`find_vm`), all of a runtime folder (`list_vms`), and what
each one is doing now (`VMStatus`, one row of `hvkit vm list`).

Every VM can be found again from its folder alone: `find_vm(name)` in another process
sees what `start_vm` made. Looking is also when leftovers are cleaned up: a dead VM's
folder is removed once it has been reported, and the work of an hvkit command that
died while it held a VM is finished first (vm.finish_abandoned).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from hvkit.config import Paths
from hvkit.errors import VMDied, VMNotFound
from hvkit.qemu.ownership import LOCK_WAIT, Ownership, stale_intents
from hvkit.qemu.runtime import RuntimeDir, check_name
from hvkit.qemu.vm import VM, finish_abandoned


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


def find_vm(name: str, paths: Paths | None = None, wait: float = LOCK_WAIT) -> VM:
    """The running VM called `name`. Waits (up to `wait` s) for another hvkit command
    that holds the VM to finish with it, and finishes the work of one that died
    (a pause it left, a fork halfway: see ownership.py). A VM found dead is cleaned
    up and reported."""
    paths = paths or Paths.from_env()
    rundir = RuntimeDir(paths.vm_dir(check_name(name)))
    owner = Ownership(paths.runtime, name)
    with owner.hold("attach", wait) as outermost:
        if outermost:
            finish_abandoned(owner, paths)
        spec = rundir.read_spec()
        if spec is None:
            raise VMNotFound(f"no VM named {name!r}", "see 'hvkit vm list' for the VMs there are")
        vm = VM(rundir, spec)
        if not vm.is_alive():
            reason = vm.death_reason()
            vm.cleanup()
            raise VMDied(f"VM {name!r} is dead ({reason}); its leftovers were removed")
        return vm


def list_vms(paths: Paths | None = None) -> list[VMStatus]:
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
                finish_abandoned(owner, paths)
    for d in sorted(paths.runtime.iterdir()):
        if d.name.startswith(".") or not (d / "vm.json").exists():
            continue
        owner = Ownership(paths.runtime, d.name)
        with owner.try_hold("vm list") as got:
            spec = RuntimeDir(d).read_spec()
            if spec is None:
                continue
            vm = VM(RuntimeDir(d), spec)
            row = vm_status(vm)
            if got is None:  # busy: whatever it looks like now, it is not dead
                holder = owner.holder() or {}
                busy = f"hvkit {holder.get('op', '?')} (pid {holder.get('pid', '?')})"
                row = VMStatus(**{**row.__dict__, "owner": busy,
                                  "state": row.state if row.state != "dead" else "busy", "reason": ""})
            elif row.state == "dead":
                vm.cleanup()
            rows.append(row)
    return rows


def vm_status(vm: VM) -> VMStatus:
    """What `vm` is doing now, and what it costs the host."""
    state = vm.run_state()
    started = vm.spec.started_at
    return VMStatus(
        name=vm.name, state=state, pid=vm.pid, memory=vm.spec.memory,
        cpus=vm.spec.cpus, accel=vm.spec.accel, host_memory=vm.host_memory(),
        uptime=time.time() - started if started and state != "dead" else None,
        workload=vm.spec.workload,
        reason=vm.death_reason() if state == "dead" else "",
        pss=proportional_memory(vm.pid) if state != "dead" else 0,
        parent=vm.spec.parent, snapshot=vm.spec.snapshot, ram_path=vm.ram_file(),
        origin=vm.spec.origin, image=vm.spec.image, ssh_port=vm.spec.ssh_port,
    )


def proportional_memory(pid: int | None) -> int:
    """PSS of process `pid` in bytes: its own pages plus its share of pages it shares
    (a page mapped by 8 children counts 1/8 in each), from /proc/<pid>/smaps_rollup."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (OSError, TypeError):
        return 0
    m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else 0
