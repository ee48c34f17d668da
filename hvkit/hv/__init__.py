"""hvkit's own hypervisor over /dev/kvm, with deferrable low-overhead hypercalls.

Where things are:
- kvm.py: the KVM ioctls and structures (ctypes), /dev/kvm probing
- machine.py: one VM's memory, long-mode set-up, guest-physical layout, ELF loading
- hypercalls.py: the routine table (console, time, yield, memory hints, trace)
- dlh.py: the per-VM deferred-hypercall (DLH) queue and running it
- vcpu.py: one host thread per vCPU, its exits, kicks
- scheduler.py: M vCPUs on K physical-CPU slots, slices, fair shares
- hypervisor.py: VMs together, run, per-VM figures
- build.py + sdk/: the guest SDK (hvkit.h, entry.S, runtime.c, guest.ld) and its build
"""

from hvkit.hv.hypervisor import Hypervisor, RunReport, VmReport
from hvkit.hv.kvm import kvm_unavailable_reason
from hvkit.hv.machine import load_program

__all__ = ["Hypervisor", "RunReport", "VmReport", "kvm_unavailable_reason", "load_program"]
