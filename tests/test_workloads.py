"""The default guest's memory checker really checks: it runs clean, and a page of its
data changed from outside (through the shared RAM file) is reported as corruption."""

from __future__ import annotations

import os

import numpy as np

from hvkit.introspect import list_tasks
from hvkit.introspect.pagetables import mapped_pages
from hvkit.introspect.source import open_guest
from hvkit.qemu import start_vm


def checker_data_pages(guest, pid: int) -> list[int]:
    """Frames of the checker process whose every word has bit 0 set: its checksummed
    chunks (pattern() always sets it); code, stack and heap pages never look like that."""
    task = next(t for t in list_tasks(guest.kernel, guest.layout).tasks if t.pid == pid)
    layout, ks = guest.layout, guest.kernel
    pgd = ks.read_u64(task.mm + layout.offset("mm_struct", "pgd"))
    pages = []
    for pfn in mapped_pages(guest.memory, ks.va_to_pa(pgd), ks.levels):
        words = guest.memory.read_array(int(pfn) << 12, 512, "<u8")
        if np.all(words & 1) and np.unique(words).size > 256:
            pages.append(int(pfn))
    return pages


def test_memcheck_detects_a_page_changed_behind_its_back(paths):
    with start_vm("memcheck", memory="256M", workload="memcheck:16", paths=paths) as vm:
        vm.wait_for_console(r"HVKIT-MEMCHECK round=3 live_mib=\d+ errors=0", timeout=120)
        with open_guest(vm.name, paths=paths) as guest:  # paused until the pages are changed
            checker = [t for t in list_tasks(guest.kernel, guest.layout).tasks
                       if t.name == "hvkit-mem" and t.pages > 1000]
            assert checker, "the checker process is not found"
            pages = checker_data_pages(guest, checker[0].pid)
            assert pages, "no checksummed page found"
            fd = os.open(vm.ram_path, os.O_WRONLY)  # guest-physical = file offset below 3 GiB
            try:
                # One page in each of up to 8 chunks: the checker unmaps a quarter of its
                # chunks every round, and a page caught mid-unmap (or mid-collapse by
                # khugepaged) is freed without ever being checked again.
                for pfn in pages[::max(1, len(pages) // 8)][:8]:
                    os.pwrite(fd, bytes(4096), pfn << 12)
            finally:
                os.close(fd)
        vm.wait_for_console(r"HVKIT-MEMCHECK-CORRUPT chunk=\d+ offset=\d+ expected=[0-9a-f]+ "
                            r"got=0000000000000000", timeout=120)
