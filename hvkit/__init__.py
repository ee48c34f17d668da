"""hvkit: a Python hypervisor toolkit for the memory and hypercalls of real VMs.

The Python API mirrors the CLI (api.py; docs/api.md):

    import hvkit

    with hvkit.start(memory="256M", workload="alloc:64") as vm:
        print(hvkit.identify(vm).counts())
        print(hvkit.share(vm).released_bytes)
        report = hvkit.fork(vm, 2)
"""

from hvkit.api import Identification, fork, ground_truth, identify, pool, ps, reset, share, start, vm, vms
from hvkit.errors import HvkitError, VMDied, VMNotFound
from hvkit.qemu import VM, VMStatus

__version__ = "0.1.0"
__all__ = ["HvkitError", "Identification", "VM", "VMDied", "VMNotFound", "VMStatus", "__version__", "fork",
           "ground_truth", "identify", "pool", "ps", "reset", "share", "start", "vm", "vms"]
