"""The QEMU engine: runs real Linux guests in qemu-system-x86_64 with their RAM in a
host file, and controls them over QMP."""

from hvkit.qemu.vm import VM, VMStatus, qemu_binary

__all__ = ["VM", "VMStatus", "qemu_binary"]
