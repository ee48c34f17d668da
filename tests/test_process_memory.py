"""Guest RAM read from the live QEMU process (/proc/<pid>/mem), whatever backs it:
the same bytes as a RAM file, and identify and ps on VMs whose RAM is inside QEMU
(anonymous RAM, and forked children that map their snapshot privately) agreeing with
the guest's own view as well as on RAM files."""

from __future__ import annotations

import numpy as np
import pytest

from hvkit.memory import RamFileMemory
from hvkit.memory.process import ProcessMemory, ram_mappings
from hvkit.memserver import MemServer, fuse_unavailable_reason
from hvkit.qemu import find_vm, start_vm

from conftest import run_cli
from test_identify import assert_agrees_with_kpageflags, identify_at_one_moment
from test_ps import compare_with_ground_truth


def test_process_memory_reads_what_the_ram_file_holds(shared_vm):
    with shared_vm.paused():
        (mapping,) = ram_mappings(shared_vm.pid, shared_vm.spec.memory, str(shared_vm.ram_path))
        with RamFileMemory(shared_vm.ram_path) as ram, \
                ProcessMemory.at(shared_vm.pid, mapping.start, shared_vm.spec.memory) as live:
            extents = live.data_extents()
            assert extents and sum(size for _, size in extents) <= live.size
            rng = np.random.default_rng(3)
            for gpa in [0, 0x100000, *(rng.integers(0, live.size // 4096, 64) * 4096).tolist()]:
                assert live.read(gpa, 4096) == ram.read(gpa, 4096), hex(gpa)


@pytest.fixture(scope="module")
def anonymous_vm(paths, guest):
    with start_vm("anon", memory="256M", workload="alloc:64", ram="anonymous", paths=paths) as vm:
        vm.wait_for_console(r"HVKIT-ALLOC done mib=64", timeout=120)
        yield vm


def test_identify_and_ps_on_anonymous_ram(anonymous_vm, paths):
    assert ram_mappings(anonymous_vm.pid, anonymous_vm.spec.memory), "no candidate mapping"
    compare_with_ground_truth(anonymous_vm, paths)
    truth, pm, layout, _ = identify_at_one_moment(anonymous_vm, paths)
    assert_agrees_with_kpageflags(truth, pm, layout)
    proc = run_cli("share", "anon")  # dropped inside QEMU (test_share_private.py)
    assert proc.returncode == 0 and "gave back" in proc.stdout, proc.stderr
    assert anonymous_vm.run_state() == "running"


@pytest.mark.skipif(fuse_unavailable_reason() is not None, reason=f"no FUSE: {fuse_unavailable_reason()}")
def test_identify_and_ps_on_forked_children(paths, guest):
    with start_vm("pm", memory="256M", workload="alloc:64", paths=paths) as parent:
        parent.wait_for_console(r"HVKIT-ALLOC done mib=64", timeout=120)
        proc = run_cli("fork", "pm", "-n", "1")
        assert proc.returncode == 0, proc.stderr
        try:
            for name in ("pm", "pm-1"):  # the VM itself (its frozen file) and a child (via the server)
                vm = find_vm(name, paths)
                assert vm.spec.ram == "snapshot"
                compare_with_ground_truth(vm, paths)
                truth, pm, layout, _ = identify_at_one_moment(vm, paths)
                assert_agrees_with_kpageflags(truth, pm, layout)
        finally:
            find_vm("pm-1", paths).stop()
    MemServer.of(paths).stop(force=True)
