"""The QEMU engine: runs real Linux guests in qemu-system-x86_64 with their RAM in a
host file, and controls them over QMP.

    vm.py        VM: the handle on a running QEMU (QMP, pause, stop, memory) and the
                 recovery of what a dead hvkit command left
    launch.py    start_vm: the checks, boot files, command line and process of a start;
                 launch_from_snapshot + receive_state for VMs that run from a snapshot
    listing.py   find_vm (one by name), list_vms, vm_status
    adopt.py     adopt_vm / detach_vm: a QEMU hvkit did not start (probe.py: what it is)
    ownership.py one hvkit command per VM at a time, and the intent records
    runtime.py   a VM's folder and its spec; imagevm.py, disk.py, network.py, agent.py:
                 what a VM of a disk image has beyond every VM
"""

from hvkit.qemu.adopt import adopt_vm, detach_vm
from hvkit.qemu.launch import launch_from_snapshot, qemu_binary, receive_state, start_vm
from hvkit.qemu.listing import VMStatus, find_vm, list_vms, vm_status
from hvkit.qemu.vm import VM, finish_abandoned_children

__all__ = ["VM", "VMStatus", "adopt_vm", "detach_vm", "find_vm", "finish_abandoned_children",
           "launch_from_snapshot", "list_vms", "qemu_binary", "receive_state", "start_vm", "vm_status"]
