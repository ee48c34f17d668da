"""hvkit: a Python hypervisor toolkit for the memory and hypercalls of real VMs.

The Python API mirrors the CLI:

    import hvkit
    with hvkit.VM.start(memory="256M", workload="alloc:64") as vm:
        vm.pause(); vm.resume()
        truth = vm.ground_truth()
"""

from hvkit.errors import HvkitError, VMDied, VMNotFound
from hvkit.qemu import VM, VMStatus

__version__ = "0.1.0"
__all__ = ["HvkitError", "VM", "VMDied", "VMNotFound", "VMStatus", "__version__"]
