"""Python bindings for the part of the KVM API that hvkit's hypervisor uses.

Each structure is defined once, as a ctypes Structure laid out like <linux/kvm.h> on
x86-64, and each ioctl number is computed from the size of the structure it carries,
the way the kernel's _IOW/_IOR macros do. `abi_sizes()` lists those sizes and numbers so
a test can compile the kernel's own header and check them (tests/test_hv_kvm.py).

ioctls go through libc's ioctl via ctypes, which releases the GIL: a vCPU thread blocked
in KVM_RUN does not stop the other vCPU threads or the scheduler.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass

from hvkit.errors import HvkitError

KVM_DEVICE = "/dev/kvm"
KVM_API_VERSION = 12

# ---------------------------------------------------------------- structures

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
             "r11", "r12", "r13", "r14", "r15", "rip", "rflags")


class Regs(ctypes.Structure):
    _fields_ = [(name, u64) for name in REG_NAMES]


class Segment(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8),
                ("avl", u8), ("unusable", u8), ("padding", u8)]


class DTable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class Sregs(ctypes.Structure):
    _fields_ = ([(name, Segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")]
                + [("gdt", DTable), ("idt", DTable)]
                + [(name, u64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer",
                                            "apic_base")]
                + [("interrupt_bitmap", u64 * 4)])


class ExitIO(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class ExitMMIO(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class ExitFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class ExitInternal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class ExitUnion(ctypes.Union):
    _fields_ = [("io", ExitIO), ("mmio", ExitMMIO), ("fail_entry", ExitFailEntry),
                ("internal", ExitInternal), ("padding", ctypes.c_char * 256)]


class SyncRegs(ctypes.Union):
    """kvm_run.s: with KVM_CAP_SYNC_REGS, the registers travel in the shared page and a
    hypercall needs no KVM_GET_REGS/KVM_SET_REGS ioctls (x86: regs come first)."""
    _fields_ = [("regs", Regs), ("padding", ctypes.c_char * 2048)]


class Run(ctypes.Structure):
    """`struct kvm_run`, the page KVM shares with user space per vCPU (x86 fields)."""
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64), ("exit", ExitUnion),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64), ("s", SyncRegs)]


# ---------------------------------------------------------------- ioctl numbers

_KVMIO = 0xAE
_NONE, _WRITE, _READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (_KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_NONE, nr, 0)


def _iow(nr: int, struct: type) -> int:
    return _ioc(_WRITE, nr, ctypes.sizeof(struct))


def _ior(nr: int, struct: type) -> int:
    return _ioc(_READ, nr, ctypes.sizeof(struct))


KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, UserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, Regs)
KVM_SET_REGS = _iow(0x82, Regs)
KVM_GET_SREGS = _ior(0x83, Sregs)
KVM_SET_SREGS = _iow(0x84, Sregs)

KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_VCPUS = 9
KVM_CAP_SYNC_REGS = 74
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_SYNC_X86_REGS = 1

EXIT_REASONS = {0: "unknown", 1: "exception", 2: "io", 3: "hypercall", 4: "debug", 5: "hlt",
                6: "mmio", 7: "irq window open", 8: "shutdown", 9: "fail entry", 10: "intr",
                17: "internal error"}
EXIT_IO, EXIT_HLT, EXIT_MMIO, EXIT_SHUTDOWN, EXIT_FAIL_ENTRY, EXIT_INTR, EXIT_INTERNAL_ERROR = (
    2, 5, 6, 8, 9, 10, 17)
IO_OUT = 1


def abi_sizes() -> dict[str, int]:
    """Sizes and ioctl numbers as hvkit computes them, named like <linux/kvm.h>."""
    return {
        "sizeof(struct kvm_userspace_memory_region)": ctypes.sizeof(UserspaceMemoryRegion),
        "sizeof(struct kvm_regs)": ctypes.sizeof(Regs),
        "sizeof(struct kvm_sregs)": ctypes.sizeof(Sregs),
        "sizeof(struct kvm_segment)": ctypes.sizeof(Segment),
        "offsetof(struct kvm_run, io)": Run.exit.offset,
        "offsetof(struct kvm_run, exit_reason)": Run.exit_reason.offset,
        "offsetof(struct kvm_run, kvm_valid_regs)": Run.kvm_valid_regs.offset,
        "offsetof(struct kvm_run, s)": Run.s.offset,
        "KVM_SET_USER_MEMORY_REGION": KVM_SET_USER_MEMORY_REGION,
        "KVM_GET_REGS": KVM_GET_REGS, "KVM_SET_REGS": KVM_SET_REGS,
        "KVM_GET_SREGS": KVM_GET_SREGS, "KVM_SET_SREGS": KVM_SET_SREGS,
        "KVM_RUN": KVM_RUN, "KVM_CREATE_VCPU": KVM_CREATE_VCPU,
    }


# ---------------------------------------------------------------- calls

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class KvmCallFailed(OSError):
    pass


def ioctl(fd: int, request: int, arg: object = None) -> int:
    """libc ioctl; `arg` is an int, a ctypes object (passed by reference) or None."""
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    ret = _libc.ioctl(fd, request, ptr)
    if ret < 0:
        err = ctypes.get_errno()
        raise KvmCallFailed(err, f"KVM ioctl {request:#x}: {os.strerror(err)}")
    return ret


@dataclass(frozen=True)
class KvmInfo:
    api_version: int
    vcpu_mmap_size: int
    recommended_vcpus: int
    immediate_exit: bool
    sync_regs: bool


def kvm_device() -> str:
    """/dev/kvm, or $HVKIT_KVM (to point hvkit at another device node)."""
    return os.environ.get("HVKIT_KVM") or KVM_DEVICE


def open_kvm(device: str | None = None) -> tuple[int, KvmInfo]:
    """Open /dev/kvm and say what it offers, or raise one clear HvkitError."""
    device = device or kvm_device()
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise HvkitError(f"{device} does not exist: this host offers no KVM",
                         "load kvm_intel or kvm_amd, or run hvkit hv on a host with "
                         "hardware virtualisation") from None
    except PermissionError:
        raise HvkitError(f"{device}: permission denied",
                         "run as root or as a member of the 'kvm' group") from None
    except OSError as e:
        raise HvkitError(f"{device}: {e.strerror}") from None
    try:
        version = ioctl(fd, KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            raise HvkitError(f"{device} speaks KVM API {version}, hvkit knows {KVM_API_VERSION}")
        info = KvmInfo(
            api_version=version,
            vcpu_mmap_size=ioctl(fd, KVM_GET_VCPU_MMAP_SIZE),
            recommended_vcpus=ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_NR_VCPUS),
            immediate_exit=bool(ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_IMMEDIATE_EXIT)),
            sync_regs=bool(ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_SYNC_REGS) & KVM_SYNC_X86_REGS),
        )
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def kvm_unavailable_reason(device: str | None = None) -> str | None:
    """None when /dev/kvm can run hvkit's guests, else the one-line reason (for test skips)."""
    try:
        fd, _ = open_kvm(device)
    except HvkitError as e:
        return str(e)
    os.close(fd)
    return None


def map_run(vcpu_fd: int, size: int) -> tuple[mmap.mmap, Run]:
    area = mmap.mmap(vcpu_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return area, Run.from_buffer(area)


def interrupted(e: OSError) -> bool:
    return e.errno in (errno.EINTR, errno.EAGAIN)
