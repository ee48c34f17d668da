"""GuestMemory backends on real guest memory: a running VM's RAM file and QEMU's ELF core
of the same moment must read the same bytes at the same guest-physical addresses."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hvkit.errors import HvkitError
from hvkit.memory import ElfCoreMemory, GuestAddressError, RamFileMemory, pc_ram_ranges

GiB = 1 << 30


def test_pc_layout_puts_high_ram_above_4g():
    assert [(r.gpa, r.size, r.offset) for r in pc_ram_ranges(256 << 20)] == [(0, 256 << 20, 0)]
    # 3 GiB .. 3.5 GiB still fits below the PCI hole
    assert len(pc_ram_ranges(3 * GiB + (256 << 20))) == 1
    low, high = pc_ram_ranges(6 * GiB)
    assert (low.gpa, low.size, low.offset) == (0, 3 * GiB, 0)
    assert (high.gpa, high.size, high.offset) == (4 * GiB, 3 * GiB, 3 * GiB)


def test_reads_across_the_hole_map_to_file_offsets(tmp_path):
    """A sparse 4 GiB 'RAM file' with markers where QEMU would put low and high RAM."""
    ram = tmp_path / "ram"
    with ram.open("wb") as f:
        f.truncate(4 * GiB)
        f.seek(3 * GiB - 8)
        f.write(b"LOW-END!")
        f.write(b"HIGH-GO!")
    with RamFileMemory(ram) as mem:
        assert mem.read(3 * GiB - 8, 8) == b"LOW-END!"
        assert mem.read(4 * GiB, 8) == b"HIGH-GO!"
        assert mem.max_pfn == (5 * GiB) >> 12
        with pytest.raises(GuestAddressError):
            mem.read(3 * GiB + 4096, 8)  # in the PCI hole: no RAM
        assert mem.find(b"HIGH-GO!") == [4 * GiB]
        # holes are skipped without being read: only the written page holds data
        assert sum(size for _, size in mem.data_extents()) <= 2 * 4096
    assert os.stat(ram).st_blocks * 512 <= 2 * 4096 * 2  # reading allocated nothing


def test_numa_node_files_are_one_ram_across_the_hole(tmp_path):
    """Two sparse node files, 4 GiB and 2 GiB, as a 6 GiB NUMA guest's RAM: low RAM is
    the first 3 GiB of node 0, high RAM (from 4 GiB) the rest of node 0 then node 1; a
    read across the node boundary joins both files, and holes are punched in the file
    of the node they belong to."""
    nodes = [tmp_path / "n0", tmp_path / "n1"]
    for f, size in zip(nodes, (4 * GiB, 2 * GiB)):
        with f.open("wb") as out:
            out.truncate(size)
    with nodes[0].open("r+b") as f:
        f.seek(3 * GiB)
        f.write(b"N0-HIGH!")
        f.seek(4 * GiB - 4)
        f.write(b"N0|-")
    with nodes[1].open("r+b") as f:
        f.write(b"N1-GO!")
    with RamFileMemory(nodes) as mem:
        assert [(r.gpa, r.size, r.offset, r.file) for r in mem.ranges] == [
            (0, 3 * GiB, 0, 0), (4 * GiB, GiB, 3 * GiB, 0), (5 * GiB, 2 * GiB, 0, 1)]
        assert mem.read(4 * GiB, 8) == b"N0-HIGH!"
        assert mem.read(5 * GiB - 4, 10) == b"N0|-N1-GO!"  # across the nodes
        assert mem.max_pfn == (7 * GiB) >> 12
        assert mem.find(b"N1-GO!") == [5 * GiB]
        assert mem.discard(np.array([(5 * GiB) >> 12]), np.array([1])) == 1
        assert mem.read(5 * GiB, 6) == bytes(6)  # given back in node 1's file, not node 0's
        assert mem.read(4 * GiB, 8) == b"N0-HIGH!"


def test_not_a_ram_file(tmp_path):
    odd = tmp_path / "odd"
    odd.write_bytes(b"x" * 100)
    with pytest.raises(HvkitError, match="not a guest RAM file"):
        RamFileMemory(odd)
    with pytest.raises(HvkitError, match="is not a readable ELF core"):
        ElfCoreMemory(odd)


def test_ram_file_and_elf_core_agree(shared_vm, tmp_path):
    shared_vm.pause()
    try:
        core = shared_vm.dump_core(tmp_path / "core.elf")
        with shared_vm.memory() as ram, ElfCoreMemory(core) as dump:
            # the core also holds the BIOS ROM below 4 GiB; its RAM is the RAM file's
            assert (dump.ranges[0].gpa, dump.ranges[0].size) == (0, ram.size) == (0, 256 << 20)
            banner = ram.find(b"Linux version ", limit=1)
            assert banner and dump.find(b"Linux version ", limit=1) == banner
            rng = np.random.default_rng(1)
            for gpa in [0, banner[0], *rng.integers(0, ram.size - 4096, 32) & ~0xFFF]:
                assert ram.read(int(gpa), 4096) == dump.read(int(gpa), 4096), hex(gpa)
    finally:
        shared_vm.resume()
