"""Page identification against the guest's own /proc/kpageflags, read at the very moment
the VM is paused for hvkit to read it from outside; and against memory that lies."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

from hvkit.introspect import KernelSpace, PageClass, classify, list_tasks
from hvkit.introspect.source import open_guest
from hvkit.memory import PAGE_SIZE
from hvkit.qemu import start_vm
from hvkit.guest.control import frozen_ground_truth, request

from conftest import run_cli

AGREEMENT = 0.99
COMPARED = [PageClass.FREE, PageClass.SLAB, PageClass.PAGE_TABLE, PageClass.ANONYMOUS,
            PageClass.PAGE_CACHE, PageClass.RESERVED]


def identify_at_one_moment(vm, paths):
    """(guest's ground truth, hvkit's page map, task walk) of one paused moment."""
    def look():
        with open_guest(vm.name, paths=paths) as guest:  # already paused: stays paused
            walk = list_tasks(guest.kernel, guest.layout)
            return classify(guest.kernel, guest.layout, walk), guest.layout, walk

    truth, (pm, layout, walk) = frozen_ground_truth(vm, look)
    assert vm.run_state() == "running"
    return truth, pm, layout, walk


def assert_agrees_with_kpageflags(truth, pm, layout):
    expected = truth.page_classes(layout.const)
    assert expected.size == pm.pages
    ours = pm.classes.copy()
    ours[ours == PageClass.KERNEL_IMAGE] = PageClass.RESERVED  # kpageflags cannot tell them apart
    report = {}
    for cls in COMPARED:
        e, o = expected == cls, ours == cls
        both = int((e & o).sum())
        report[cls.label] = (int(e.sum()), int(o.sum()), both)
        assert e.any(), f"the guest has no {cls.label} pages at all?"
        wrong = np.unique(ours[e & ~o], return_counts=True)
        assert both / e.sum() >= AGREEMENT, (cls.label, report[cls.label], wrong)
        assert both / o.sum() >= AGREEMENT, (cls.label, report[cls.label])
    free_bytes = pm.counts()[PageClass.FREE] * PAGE_SIZE
    assert abs(free_bytes - truth.meminfo["MemFree"]) <= 0.01 * truth.meminfo["MemFree"]
    assert pm.errors == []
    return report


@pytest.fixture(scope="module")
def busy_vm(paths, guest):
    """A 256 MiB guest that allocated and freed most of its memory at boot."""
    with start_vm("ident", memory="256M", workload="alloc:160", paths=paths) as vm:
        vm.wait_for_console(r"HVKIT-ALLOC done mib=160", timeout=120)
        yield vm


def test_classes_agree_with_kpageflags_on_idle_guest(shared_vm, paths):
    truth, pm, layout, walk = identify_at_one_moment(shared_vm, paths)
    assert_agrees_with_kpageflags(truth, pm, layout)
    assert pm.counts()[PageClass.KERNEL_IMAGE] > 0
    # free blocks per order agree with the guest's buddyinfo of the same moment
    theirs = np.sum([counts for counts in truth.buddyinfo.values()], axis=0).tolist()
    ours = pm.free_blocks_by_order()
    assert ours == theirs[: len(ours)] and not any(theirs[len(ours):])


def test_classes_agree_after_allocate_and_free(busy_vm, paths):
    truth, pm, layout, _ = identify_at_one_moment(busy_vm, paths)
    assert_agrees_with_kpageflags(truth, pm, layout)


def assert_fragmented_memory_has_its_owner(vm, paths):
    """The guest frees every other page of 64 MiB: classes still agree (free memory in
    order-0 holes), and the 32 MiB it keeps belong to the process that holds them."""
    start = len(vm.console())
    request(vm, "run fragment 64", until="HVKIT-RUNNING fragment")
    vm.wait_for_console(r"HVKIT-FRAGMENT holding mib=32", timeout=60, after=start)
    truth, pm, layout, walk = identify_at_one_moment(vm, paths)
    assert_agrees_with_kpageflags(truth, pm, layout)  # free memory in order-0 holes now
    owners = pm.anonymous_by_owner()
    holder = max(owners, key=owners.get)
    assert {t.pid: t.name for t in walk.tasks}[holder] == "hvkit-mem"
    held = owners[holder] * PAGE_SIZE
    assert 32 << 20 <= held <= 33 << 20  # it keeps every other page of 64 MiB


def test_anonymous_pages_have_their_owner(busy_vm, paths):
    assert_fragmented_memory_has_its_owner(busy_vm, paths)


def test_identify_cli_on_vm_ram_file_and_core(shared_vm, paths, guest, tmp_path):
    proc = run_cli("identify", shared_vm.name, "--json", "--map", str(tmp_path / "map.png"))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert shared_vm.run_state() == "running"
    assert sum(c["pages"] for c in doc["classes"].values()) == doc["pages"] == 65536
    runs = doc["runs"]  # consecutive, covering every page frame once
    assert runs[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(runs, runs[1:]))
    assert runs[-1][0] + runs[-1][1] == doc["pages"]
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = run_cli("identify", shared_vm.name)
    assert table.returncode == 0 and "page cache" in table.stdout and "free blocks by order" in table.stdout

    with shared_vm.paused():
        core = shared_vm.dump_core(tmp_path / "core.elf")
        live = run_cli("identify", str(shared_vm.ram_path), "--kernel", str(guest.kernel), "--json")
    dumped = run_cli("identify", str(core), "--kernel", str(guest.kernel), "--json")
    assert live.returncode == 0 and dumped.returncode == 0, live.stderr + dumped.stderr
    assert json.loads(live.stdout)["runs"] == json.loads(dumped.stdout)["runs"]


# -- memory that lies --------------------------------------------------------------------

@pytest.fixture
def ram_and_map(shared_vm, paths, guest, tmp_path):
    """A copy of the shared guest's RAM (taken paused), its page map and kernel space."""
    copy = tmp_path / "ram"
    with shared_vm.paused():
        shutil.copyfile(shared_vm.ram_path, copy)
    with open_guest(str(copy), kernel=guest.kernel, paths=paths) as g:
        pm = classify(g.kernel, g.layout)
        struct_page_pa = lambda pfn: g.kernel.va_to_pa(g.kernel.vmemmap_base + pfn * g.layout.size("page"))  # noqa: E731
        offsets = {f: g.layout.offset("page", f) for f in ("private", "compound_head")}
        yield copy, pm, struct_page_pa, offsets


def _poke(path, pa, value):
    with open(path, "r+b") as f:
        f.seek(pa)
        f.write(struct.pack("<Q", value))


def test_impossible_free_block_order_is_reported_not_trusted(ram_and_map, guest):
    copy, pm, struct_page_pa, offsets = ram_and_map
    head = int(np.flatnonzero(pm.order >= 3)[0])
    _poke(copy, struct_page_pa(head) + offsets["private"], 1 << 40)
    proc = run_cli("identify", str(copy), "--kernel", str(guest.kernel), "--json", timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert f"free blocks have impossible orders (pfn {head})" in proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["classes"]["free"]["pages"] == pm.counts()[PageClass.FREE] - (1 << int(pm.order[head]))


def test_wild_compound_head_pointers_are_reported(ram_and_map, guest):
    copy, pm, struct_page_pa, offsets = ram_and_map
    for pfn in np.flatnonzero(pm.classes == PageClass.SLAB)[:50]:
        _poke(copy, struct_page_pa(int(pfn)) + offsets["compound_head"], 0xFFFF_DEAD_BEEF_0001)
    proc = run_cli("identify", str(copy), "--kernel", str(guest.kernel), "--json", timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert "50 compound tail pages point at no struct page" in proc.stderr
    assert json.loads(proc.stdout)["pages"] == pm.pages


def test_lying_page_table_of_the_page_array_is_bounded(ram_and_map, guest, paths):
    """Every page table entry of the struct page array points outside RAM."""
    copy, pm, _, _ = ram_and_map
    with open_guest(str(copy), kernel=guest.kernel, paths=paths) as g:
        ks: KernelSpace = g.kernel
        # the level-4 entry that covers vmemmap_base
        entry_pa = ks.top_pgt + 8 * ((ks.vmemmap_base >> 39) & 0x1FF)
    _poke(copy, entry_pa, 0x7FFF_FFFF_F000 | 0x63)
    proc = run_cli("identify", str(copy), "--kernel", str(guest.kernel), "--json", timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert "struct page array:" in proc.stderr and "outside RAM" in proc.stderr
    assert json.loads(proc.stdout)["classes"]["not present"]["pages"] == pm.pages


def test_five_level_paging_guest(paths, guest):
    """QEMU's `max` CPU has LA57, so Debian's kernel runs with 5-level page tables."""
    with start_vm("la57", memory="256M", workload="hold:16", cpu_model="max", paths=paths) as vm:
        vm.wait_for_console("HVKIT-HOLD holding mib=16", timeout=60)
        truth, pm, layout, walk = identify_at_one_moment(vm, paths)
        with open_guest(vm.name, paths=paths) as g:
            assert g.kernel.levels == 5
        assert_agrees_with_kpageflags(truth, pm, layout)
        holder = max(pm.anonymous_by_owner().items(), key=lambda kv: kv[1])
        assert holder[1] * PAGE_SIZE >= 16 << 20  # found through 5-level user page tables
        assert {p.pid for p in truth.processes} <= {t.pid for t in walk.tasks}
