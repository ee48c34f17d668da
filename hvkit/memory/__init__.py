"""Guest-physical memory, whatever holds it.

Everything that reads or releases guest memory (identification, sharing, forking) goes
through `GuestMemory`, so it never cares whether the pages live in a running VM's RAM
file, a raw copy of one, or a QEMU `dump-guest-memory` ELF core.
"""

from hvkit.memory.base import PAGE_SIZE, GuestAddressError, GuestMemory, MemoryRange
from hvkit.memory.elfcore import ElfCoreMemory
from hvkit.memory.ramfile import RamFileMemory, pc_ram_ranges

__all__ = ["PAGE_SIZE", "ElfCoreMemory", "GuestAddressError", "GuestMemory", "MemoryRange", "RamFileMemory",
           "pc_ram_ranges"]
