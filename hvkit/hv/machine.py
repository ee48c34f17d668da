"""One VM of hvkit's hypervisor: its memory, its long-mode set-up, its program, its vCPUs'
first state, and its DLH queue.

Guest-physical layout (the SDK's linker script and hvkit.h agree with it):

    0x0000  unused (a null pointer reads zeros, it does not hit anything of ours)
    0x1000  GDT (null, 64-bit code, data)
    0x2000  boot info (struct hv_boot_info)
    0x3000  page tables: PML4, PDPT and 4 page directories identity-mapping 4 GiB in
            2 MiB pages, so an access past the VM's RAM reaches the hypervisor as an
            MMIO exit with its address (and stops that VM) instead of a triple fault
    0x10000 DLH queue (struct hv_dlh_ring), set up here when the VM is initialised
    1 MiB   the program (ELF PT_LOAD segments), then the heap
    top     one stack per vCPU

Memory is an anonymous private mapping of this process given to KVM as one slot, so each
VM sees only its own: another VM's RAM is not in its guest-physical space at all.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from hvkit.errors import HvkitError
from hvkit.hv import kvm
from hvkit.units import MiB, format_size

PAGE = 4096
GDT_GPA = 0x1000
BOOT_INFO_GPA = 0x2000
PML4_GPA = 0x3000
PDPT_GPA = 0x4000
PD_GPA = 0x5000
IDENTITY_GIB = 4
DLH_GPA = 0x10000
DLH_MAX_ENTRIES = 4096
IMAGE_GPA = 0x100000
STACK_SIZE = 64 * 1024
MIN_MEMORY = 2 * MiB
MAX_MEMORY = IDENTITY_GIB << 30

BOOT_MAGIC = 0x544F4F42544B5648  # "HVKTBOOT"
BOOT_INFO = struct.Struct("<QIIQQQQ4Q32s")  # struct hv_boot_info

CODE_SEGMENT = kvm.Segment(base=0, limit=0xFFFFFFFF, selector=8, type=11, present=1, dpl=0,
                           db=0, s=1, l=1, g=1)
DATA_SEGMENT = kvm.Segment(base=0, limit=0xFFFFFFFF, selector=16, type=3, present=1, dpl=0,
                           db=1, s=1, l=0, g=1)
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10


@dataclass(frozen=True)
class GuestProgram:
    """A guest ELF, checked and read once, loadable into any number of VMs."""
    path: Path
    entry: int
    segments: tuple[tuple[int, bytes, int], ...]  # (guest-physical address, file bytes, memory size)
    symbols: dict[str, int] = field(default_factory=dict)

    @property
    def end(self) -> int:
        return max(addr + size for addr, _, size in self.segments)


def load_program(path: Path) -> GuestProgram:
    """Read a guest ELF built with the SDK, or say in one line why it cannot run."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            elf = ELFFile(f)
            if elf.get_machine_arch() != "x64" or elf.elfclass != 64:
                raise HvkitError(f"{path} is a {elf.get_machine_arch()} ELF, not x86-64",
                                 "build it with 'hvkit hv build'")
            if elf["e_type"] != "ET_EXEC":
                raise HvkitError(f"{path} is not a static executable ({elf['e_type']})",
                                 "build it with 'hvkit hv build'")
            segments = []
            for seg in elf.iter_segments():
                if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
                    continue
                addr = seg["p_paddr"]
                if addr < IMAGE_GPA or addr + seg["p_memsz"] > MAX_MEMORY:
                    raise HvkitError(f"{path}: a segment at {addr:#x} is outside the guest's "
                                     f"program area (from {IMAGE_GPA:#x})",
                                     "link it with the SDK's guest.ld ('hvkit hv build')")
                segments.append((addr, seg.data(), seg["p_memsz"]))
            symtab = elf.get_section_by_name(".symtab")
            symbols = ({s.name: s["st_value"] for s in symtab.iter_symbols() if s.name}
                       if symtab is not None else {})
            entry = elf["e_entry"]
    except FileNotFoundError:
        raise HvkitError(f"{path}: no such file") from None
    except (ELFError, struct.error, ValueError) as e:
        raise HvkitError(f"{path} is not a guest program: {e}",
                         "build one with 'hvkit hv build guest.c -o guest.elf'") from None
    if not segments:
        raise HvkitError(f"{path} has nothing to load")
    return GuestProgram(path, entry, tuple(segments), symbols)


class GuestRam:
    """A VM's RAM: an anonymous mapping, addressed by guest-physical address."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.map = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self.map)
        self.host_address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))

    def contains(self, gpa: int, length: int) -> bool:
        return 0 <= gpa and length >= 0 and gpa + length <= self.size

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view[gpa : gpa + length])

    def write(self, gpa: int, data: bytes) -> None:
        self.view[gpa : gpa + len(data)] = data

    def u64(self, gpa: int) -> int:
        return int.from_bytes(self.view[gpa : gpa + 8], "little")

    def set_u64(self, gpa: int, value: int) -> None:
        self.view[gpa : gpa + 8] = (value & (2**64 - 1)).to_bytes(8, "little")

    def close(self) -> None:
        self.view.release()
        try:
            self.map.close()
        except BufferError:  # a ctypes view still points at it; the GC frees it later
            pass


@dataclass(frozen=True)
class VcpuStart:
    """Where a vCPU begins: registers and special registers ready for KVM."""
    regs: kvm.Regs
    sregs: kvm.Sregs


class Machine:
    """A KVM VM with hvkit's layout, a program loaded and a DLH queue initialised."""

    def __init__(self, kvm_fd: int, name: str, index: int, program: GuestProgram,
                 memory: int, vcpus: int, dlh_entries: int, args: tuple[int, ...] = ()) -> None:
        check_machine_shape(program, memory, vcpus, dlh_entries)
        self.name, self.index, self.program = name, index, program
        self.vcpus, self.dlh_entries = vcpus, dlh_entries
        self.fd = kvm.ioctl(kvm_fd, kvm.KVM_CREATE_VM, 0)
        try:
            self.ram = GuestRam(memory)
            region = kvm.UserspaceMemoryRegion(slot=0, flags=0, guest_phys_addr=0,
                                               memory_size=memory,
                                               userspace_addr=self.ram.host_address)
            kvm.ioctl(self.fd, kvm.KVM_SET_USER_MEMORY_REGION, region)
            self._write_page_tables()
            self._write_gdt()
            self._load(program)
            self.heap_start = (program.end + PAGE - 1) & ~(PAGE - 1)
            self.heap_end = memory - vcpus * STACK_SIZE
            self._write_boot_info(args)
        except BaseException:
            os.close(self.fd)
            raise

    # -- set-up ---------------------------------------------------------------

    def _write_page_tables(self) -> None:
        ram = self.ram
        ram.set_u64(PML4_GPA, PDPT_GPA | 3)
        for gib in range(IDENTITY_GIB):
            pd = PD_GPA + gib * PAGE
            ram.set_u64(PDPT_GPA + 8 * gib, pd | 3)
            entries = [((gib << 30) | (i << 21) | 0x83) for i in range(512)]  # present, rw, 2 MiB
            ram.write(pd, struct.pack("<512Q", *entries))

    def _write_gdt(self) -> None:
        self.ram.write(GDT_GPA, struct.pack("<QQQ", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF))

    def _load(self, program: GuestProgram) -> None:
        for addr, data, size in program.segments:
            self.ram.write(addr, data)
            self.ram.write(addr + len(data), bytes(size - len(data)))

    def _write_boot_info(self, args: tuple[int, ...]) -> None:
        padded = (list(args) + [0, 0, 0, 0])[:4]
        self.ram.write(BOOT_INFO_GPA, BOOT_INFO.pack(
            BOOT_MAGIC, self.index, self.vcpus, self.ram.size, self.heap_start, self.heap_end,
            DLH_GPA, *[a & (2**64 - 1) for a in padded], self.name.encode()[:31]))

    def vcpu_start(self, vcpu: int) -> VcpuStart:
        sregs = kvm.Sregs()
        sregs.cs = CODE_SEGMENT
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, DATA_SEGMENT)
        sregs.tr = kvm.Segment(base=0, limit=0xFFFF, selector=0, type=11, present=1, s=0)
        sregs.ldt = kvm.Segment(base=0, limit=0xFFFF, selector=0, type=2, present=1, s=0)
        sregs.gdt.base, sregs.gdt.limit = GDT_GPA, 3 * 8 - 1
        sregs.cr3 = PML4_GPA
        sregs.cr4 = CR4_PAE
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
        sregs.efer = EFER_LME | EFER_LMA
        regs = kvm.Regs(rip=self.program.entry, rflags=2,
                        rsp=self.ram.size - vcpu * STACK_SIZE,
                        rdi=BOOT_INFO_GPA, rsi=vcpu)
        return VcpuStart(regs, sregs)

    def symbol(self, name: str) -> int:
        try:
            return self.program.symbols[name]
        except KeyError:
            raise HvkitError(f"{self.program.path} has no symbol {name!r}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def check_machine_shape(program: GuestProgram, memory: int, vcpus: int, dlh_entries: int) -> None:
    """Refuse, in one line, a VM that could not hold its program, stacks and queue."""
    if not 1 <= vcpus <= 64:
        raise HvkitError(f"{vcpus} vCPUs per VM: hvkit runs 1 to 64")
    if memory % (2 * MiB) or not MIN_MEMORY <= memory <= MAX_MEMORY:
        raise HvkitError(f"guest memory {format_size(memory)}: it must be a multiple of 2 MiB "
                         f"from {format_size(MIN_MEMORY)} to {format_size(MAX_MEMORY)}")
    if dlh_entries & (dlh_entries - 1) or not 1 <= dlh_entries <= DLH_MAX_ENTRIES:
        raise HvkitError(f"DLH queue of {dlh_entries} entries: it must be a power of two "
                         f"up to {DLH_MAX_ENTRIES}")
    if program.end + PAGE > memory - vcpus * STACK_SIZE:
        raise HvkitError(f"{program.path} needs {format_size(program.end)} of program and "
                         f"{vcpus} stacks of {format_size(STACK_SIZE)}, more than "
                         f"{format_size(memory)} of guest memory", "give it more with --memory")
