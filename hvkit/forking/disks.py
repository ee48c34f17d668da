"""Freezing a VM's disk at a fork (a VM of a disk image, hvkit.qemu.imagevm): the names
are chosen and journaled first (`plan_disk_freeze`), and the disk is frozen only past the
fork's point of no return, so that an undone fork leaves the VM's disk chain as it was:

- a first fork, once the VM's old QEMU has ended: the overlay it wrote becomes the
  frozen layer (a second name in the store) and a new empty overlay goes over it
  (`freeze_stopped_disk_of`; done again by a recovery, it finishes what is not done);
- a fork of a VM that runs from a snapshot, once the snapshot is sealed and before the
  VM runs again: QEMU switches to the new overlay live (`switch_disk`).

The qcow2 work itself is hvkit.qemu.disk's.
"""

from __future__ import annotations

import time
from pathlib import Path

from hvkit.qemu import VM
from hvkit.qemu.disk import active_layer, freeze_stopped_disk, switch_running_disk


def plan_disk_freeze(vm: VM, layer: Path) -> dict:
    """The names a fork of `vm` freezes its disk under, recorded in the fork's journal
    before anything changes: `old_disk` (the overlay QEMU writes now, as QEMU itself
    says), `disk_layer` (that overlay's name as the frozen layer, in the store) and
    `new_disk` (the empty overlay over it that the VM goes on with)."""
    return {"old_disk": str(active_layer(vm.qmp)), "disk_layer": str(layer),
            "new_disk": str(vm.rundir.path / f"disk-{time.time_ns()}.qcow2")}


def machine_after_freeze(machine: dict, plan: dict) -> dict:
    """The VM's spec (as a dict) once its disk is frozen as `plan` says: what its
    snapshot records (children start from `frozen_disk`) and its next QEMU runs."""
    if not plan.get("disk_layer"):
        return machine
    return {**machine, "disk": plan["new_disk"], "frozen_disk": plan["disk_layer"]}


def freeze_stopped_disk_of(plan: dict) -> None:
    """A first fork, once the VM's QEMU ended: its disk frozen as `plan` says (disk.py);
    done again by a recovery, it finishes what was not done."""
    freeze_stopped_disk(Path(plan["old_disk"]), Path(plan["disk_layer"]), Path(plan["new_disk"]))


def switch_disk(vm: VM, plan: dict) -> None:
    """A fork of a VM that runs on in its QEMU (it runs from a snapshot), once the
    snapshot is sealed and before the VM runs again: QEMU switched to the new overlay
    over the frozen layer (disk.py), and the VM's spec records both."""
    switch_running_disk(vm.qmp, Path(plan["old_disk"]), Path(plan["disk_layer"]), Path(plan["new_disk"]))
    vm.spec.disk, vm.spec.frozen_disk = plan["new_disk"], plan["disk_layer"]
    vm.rundir.write_spec(vm.spec)
