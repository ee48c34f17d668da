"""`hvkit ps` against the guest's own process list, at one paused moment, and against
memory that lies (corrupted copies of a RAM file)."""

from __future__ import annotations

import re

import json
import shutil
import struct

import pytest

from hvkit.introspect import KernelMismatch, KernelSpace, list_tasks
from hvkit.introspect.source import open_guest
from hvkit.memory import RamFileMemory
from hvkit.guest.control import ground_truth

from conftest import run_cli


def same_name(proc_name: str, ours: str) -> bool:
    """hvkit shows what /proc/<pid>/stat shows, full kernel-thread names included; only a
    workqueue worker's "-what it last did" / "+what it does" may have changed between the
    guest's look and hvkit's (rescuers, kworker/R-..., have no such suffix)."""
    if proc_name == ours:
        return True
    worker = re.compile(r"(kworker/[^R][^+-]*)([+-].*)?")
    a, b = worker.fullmatch(proc_name), worker.fullmatch(ours)
    return bool(a and b and a.group(1) == b.group(1))


def compare_with_ground_truth(vm, paths):
    truth = ground_truth(vm)
    with open_guest(vm.name, paths=paths) as guest:
        walk = list_tasks(guest.kernel, guest.layout)
    assert vm.run_state() == "running"  # resumed after reading
    assert walk.errors == []
    ours = {t.pid: t for t in walk.tasks}
    theirs = {p.pid: p for p in truth.processes}
    assert ours.keys() == theirs.keys()
    for pid, p in theirs.items():
        assert same_name(p.name, ours[pid].name), (p.name, ours[pid].name)
        assert ours[pid].ppid == p.ppid, pid
    return walk


def test_ps_matches_idle_guest(shared_vm, paths):
    walk = compare_with_ground_truth(shared_vm, paths)
    user = [t for t in walk.tasks if t.mm]
    assert {t.name for t in user} >= {"init", "hvkit-mem"}
    assert all(t.pages > 0 for t in user)


def test_ps_matches_guest_after_alloc_and_free(paths):
    from hvkit.qemu import start_vm

    with start_vm("psalloc", memory="256M", workload="alloc:96", paths=paths) as vm:
        vm.wait_for_console(r"HVKIT-ALLOC done mib=96", timeout=120)
        compare_with_ground_truth(vm, paths)


def test_ps_of_ram_file_and_elf_core(shared_vm, paths, tmp_path, guest):
    with shared_vm.paused():
        core = shared_vm.dump_core(tmp_path / "core.elf")
        live = run_cli("ps", str(shared_vm.ram_path), "--kernel", str(guest.kernel), "--json")
    dumped = run_cli("ps", str(core), "--kernel", str(guest.kernel), "--json")
    assert live.returncode == 0 and dumped.returncode == 0, live.stderr + dumped.stderr
    pids = lambda proc: [p["pid"] for p in json.loads(proc.stdout)["processes"]]  # noqa: E731
    assert pids(live) == pids(dumped) and 1 in pids(live)


def test_file_source_needs_a_kernel(shared_vm):
    proc = run_cli("ps", str(shared_vm.ram_path))
    assert proc.returncode == 1 and "needs the guest's kernel" in proc.stderr


@pytest.fixture
def ram_copy(shared_vm, tmp_path):
    """A copy of the shared guest's RAM, taken while it is paused."""
    copy = tmp_path / "ram"
    with shared_vm.paused():
        shutil.copyfile(shared_vm.ram_path, copy)
    return copy


def _symbols_layout(paths, guest):
    from hvkit.kernel.headers import debian_tree
    from hvkit.kernel.layout import build_layout
    from hvkit.kernel.symbols import load_symbols

    return (load_symbols(guest.kernel, paths.cache, guest.config),
            build_layout(debian_tree(guest.release, paths.cache), paths.cache))


def test_kernel_that_does_not_match_memory_is_named(ram_copy, paths, guest, tmp_path):
    symbols, _ = _symbols_layout(paths, guest)
    # the memory now runs "another kernel": every copy of its version text says so
    needle = f"Linux version {guest.release}".encode()
    with RamFileMemory(ram_copy) as mem:
        places = mem.find(needle, limit=64)
    assert places
    with open(ram_copy, "r+b") as f:
        for gpa in places:  # below 3 GiB, guest-physical = file offset
            f.seek(gpa + len("Linux version "))
            f.write(b"9.9.9-other")
    with RamFileMemory(ram_copy) as mem:
        with pytest.raises(KernelMismatch, match="memory runs kernel 9.9.9-other"):
            KernelSpace.locate(mem, symbols)
    empty = tmp_path / "empty"
    empty.write_bytes(bytes(16 << 20))
    proc = run_cli("ps", str(empty), "--kernel", str(guest.kernel))
    assert proc.returncode == 1 and "is not the kernel in this memory" in proc.stderr
    assert "Traceback" not in proc.stderr


def _task_next_pa(ram, paths, guest, index):
    symbols, layout = _symbols_layout(paths, guest)
    with RamFileMemory(ram) as mem:
        ks = KernelSpace.locate(mem, symbols)
        task = list_tasks(ks, layout, count_pages=False).tasks[index]
        # find the task's list node: walk from init_task to the task with that pid
        off = layout.offset("task_struct", "tasks")
        node = ks.read_u64(ks.symbol_va("init_task") + off)
        for _ in range(10_000):
            pid = struct.unpack("<i", ks.read(node - off + layout.offset("task_struct", "pid"), 4))[0]
            if pid == task.pid:
                return ks.va_to_pa(node), node
            node = ks.read_u64(node)
    raise AssertionError("task not found")


@pytest.mark.parametrize("corruption", ["loop", "wild"])
def test_hostile_task_list_gives_clear_errors(ram_copy, paths, guest, corruption):
    next_pa, node_va = _task_next_pa(ram_copy, paths, guest, 5)
    value = node_va if corruption == "loop" else 0xFFFF_DEAD_BEEF_0000
    with open(ram_copy, "r+b") as f:
        f.seek(next_pa)
        f.write(struct.pack("<Q", value))
    proc = run_cli("ps", str(ram_copy), "--kernel", str(guest.kernel), "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warning = "loops back" if corruption == "loop" else "task at"
    assert warning in proc.stderr
    assert len(json.loads(proc.stdout)["processes"]) >= 5  # what was read before is kept


def test_absurd_kernel_variables_are_refused(ram_copy, paths, guest):
    symbols, _ = _symbols_layout(paths, guest)
    with RamFileMemory(ram_copy) as mem:
        ks = KernelSpace.locate(mem, symbols)
        where = ks.symbol_pa("page_offset_base")
    with open(ram_copy, "r+b") as f:
        f.seek(where)
        f.write(struct.pack("<Q", 0x1234))
    proc = run_cli("ps", str(ram_copy), "--kernel", str(guest.kernel))
    assert proc.returncode == 1
    assert "page_offset_base = 0x1234 is not a kernel region base" in proc.stderr


def test_vm_runs_again_when_its_memory_cannot_be_read(shared_vm, paths, monkeypatch):
    """Reading fails after the VM was paused (here: memory that fails validation):
    the error reaches the caller and the VM is resumed all the same."""
    from hvkit.introspect.kernelspace import GuestInconsistent

    def lying_guest(*args):
        assert shared_vm.run_state() == "paused"
        raise GuestInconsistent("page_offset_base = 0x1234 is not a kernel region base")

    monkeypatch.setattr(KernelSpace, "locate", lying_guest)
    with pytest.raises(GuestInconsistent):
        with open_guest(shared_vm.name, paths=paths):
            pass
    assert shared_vm.run_state() == "running"
