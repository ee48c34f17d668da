"""`hvkit share` on real guests: it gives back what the guest has free, the guest keeps
running and keeps its data through many cycles, and it refuses what is not safe."""

from __future__ import annotations

import json
import re
import signal
import struct
import subprocess
import sys
import time

import pytest

from hvkit.introspect.source import open_guest
from hvkit.memory import PAGE_SIZE
from hvkit.qemu import start_vm
from hvkit.sharing import ShareRefused, share_once
from hvkit.sharing.freepages import check_guest
from hvkit.sharing.sharer import check_vm_ram, filesystem_of
from hvkit.guest.control import frozen_ground_truth, request

from conftest import run_cli


@pytest.fixture(scope="module")
def freed_vm(paths, guest):
    """A 256 MiB guest that allocated 180 MiB and freed it: the host holds most of its RAM."""
    with start_vm("share", memory="256M", workload="alloc:180", paths=paths) as vm:
        vm.wait_for_console(r"HVKIT-ALLOC done mib=180", timeout=120)
        yield vm


def assert_share_gives_back_free_memory(vm, paths):
    """Share of a guest that allocated and freed most of its memory: >= 90% of its own
    MemFree given back, then the guest can use all of its memory again."""
    before = vm.host_memory()
    truth, result = frozen_ground_truth(vm, lambda: share_once(vm, paths))
    mem_free = truth.meminfo["MemFree"]  # the guest's own word, at the moment of sharing
    print(f"share: {result.released_bytes >> 20} MiB given back of MemFree {mem_free >> 20} MiB "
          f"({result.released_bytes / mem_free:.1%}); free pages {result.free_pages}")
    assert abs(result.free_pages * PAGE_SIZE - mem_free) <= 0.01 * mem_free
    assert before - vm.host_memory() >= 0.9 * mem_free
    assert result.released_bytes >= 0.9 * mem_free
    assert vm.run_state() == "running"

    # the guest goes on, and can use all of its memory again (the host allocates anew)
    start = len(vm.console())
    again = mem_free // (1 << 20) - 24
    request(vm, f"run alloc {again}", until="HVKIT-RUNNING alloc")
    vm.wait_for_console(rf"HVKIT-ALLOC done mib={again}", timeout=120, after=start)
    assert vm.host_memory() > before - 0.5 * mem_free


def test_share_gives_back_the_guests_free_memory(freed_vm, paths):
    assert_share_gives_back_free_memory(freed_vm, paths)


def test_reading_memory_does_not_bring_given_back_pages_back(freed_vm, paths, guest):
    share_once(freed_vm, paths)
    with freed_vm.paused():
        held = freed_vm.host_memory()
        proc = run_cli("identify", str(freed_vm.ram_path), "--kernel", str(guest.kernel), "--json")
        assert proc.returncode == 0, proc.stderr
        with freed_vm.memory() as mem:  # every byte, holes included
            for gpa in range(0, mem.size, 16 << 20):
                mem.read(gpa, 16 << 20)
        assert freed_vm.host_memory() == held


def test_dry_run_gives_nothing_back(freed_vm):
    start = len(freed_vm.console())
    request(freed_vm, "run alloc 64", until="HVKIT-RUNNING alloc")
    freed_vm.wait_for_console(r"HVKIT-ALLOC done mib=64", timeout=120, after=start)
    proc = run_cli("share", freed_vm.name, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["dry_run"] and doc["backed_free_pages"] > 0 and doc["released_bytes"] == 0
    assert doc["host_after"] == doc["host_before"]
    table = run_cli("share", freed_vm.name)
    assert table.returncode == 0 and "gave back" in table.stdout and "paused" in table.stdout


def test_watch_stops_cleanly(freed_vm):
    proc = subprocess.Popen([sys.executable, "-m", "hvkit", "share", freed_vm.name, "--watch", "0.3", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    cycles = [json.loads(line) for line in out.splitlines()]
    assert len(cycles) >= 2 and all(c["paused_s"] < 1 for c in cycles)
    assert freed_vm.run_state() == "running"


def test_memory_checker_survives_50_share_cycles(paths, guest):
    with start_vm("sharecheck", memory="256M", workload="memcheck:96", paths=paths) as vm:
        vm.wait_for_console(r"HVKIT-MEMCHECK round=1 ", timeout=120)
        released = 0
        for _ in range(50):
            released += share_once(vm, paths).released_bytes
            time.sleep(0.15)
        # every chunk is checked once per round: two full rounds after the last cycle
        last = int(re.findall(r"HVKIT-MEMCHECK round=(\d+)", vm.console())[-1])
        vm.wait_for_console(rf"HVKIT-MEMCHECK round={last + 2} ", timeout=180)
        console = vm.console()
    assert "HVKIT-MEMCHECK-CORRUPT" not in console
    assert all(e == "0" for e in re.findall(r"HVKIT-MEMCHECK round=\d+ live_mib=\d+ errors=(\d+)", console))
    assert released > 32 << 20  # the checker frees all the time: sharing had work to do


# -- refusals ----------------------------------------------------------------------------

def test_huge_page_ram_is_refused(freed_vm, monkeypatch, tmp_path):
    assert filesystem_of(freed_vm.ram_path) == "tmpfs"
    mount = subprocess.run(["mount", "-t", "hugetlbfs", "none", str(tmp_path)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount hugetlbfs here: {mount.stderr.strip()}")
    try:
        assert filesystem_of(tmp_path / "ram") == "hugetlbfs"
    finally:
        subprocess.run(["umount", str(tmp_path)], check=True)
    monkeypatch.setattr("hvkit.sharing.sharer.filesystem_of", lambda path: "hugetlbfs")
    with pytest.raises(ShareRefused, match="is on huge pages"):
        check_vm_ram(freed_vm)


def test_guest_that_poisons_free_pages_is_refused(shared_vm, paths):
    """Debian's cloud kernel has no page poisoning; its static key is stood in for by
    kernel variables whose values are known: max_pfn (non-zero), __pgtable_l5_enabled (0)."""
    with open_guest(shared_vm.name, paths=paths) as g:
        ks = g.kernel
        ks.symbols.addresses["_page_poisoning_enabled"] = ks.symbols["__pgtable_l5_enabled"]
        check_guest(ks, g.layout)  # disabled: fine
        ks.symbols.addresses["_page_poisoning_enabled"] = ks.symbols["max_pfn"]
        with pytest.raises(ShareRefused, match="poisons its free pages"):
            check_guest(ks, g.layout)


def test_guest_whose_free_count_disagrees_is_refused(freed_vm, paths):
    """The guest's own free-page counter says 0: nothing may be given back."""
    with freed_vm.paused():
        with open_guest(freed_vm.name, paths=paths) as g:
            where = g.kernel.va_to_pa(g.kernel.symbol_va("vm_zone_stat") + 8 * g.layout.const("NR_FREE_PAGES"))
        with open(freed_vm.ram_path, "r+b") as f:
            f.seek(where)
            saved = f.read(8)
            f.seek(where)
            f.write(struct.pack("<Q", 0))
        try:
            held = freed_vm.host_memory()
            with pytest.raises(ShareRefused, match="the guest kernel counts 0; nothing was given back"):
                share_once(freed_vm, paths)
            assert freed_vm.host_memory() == held
        finally:
            with open(freed_vm.ram_path, "r+b") as f:
                f.seek(where)
                f.write(saved)
