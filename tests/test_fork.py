"""Forking real VMs on the memory server: children go on from the parent's exact state,
diverge without seeing each other's writes, fork again, and die with a clear message
when their server is gone; a restarted server serves new children from the same
snapshots. The tables and the store are checked on their own first, on real files."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import numpy as np
import pytest

from hvkit.errors import VMDied
from hvkit.forking import fork
from hvkit.memserver import MemServer, Store, fuse_unavailable_reason
from hvkit.memserver.table import TableFile, TableWriter, frames_entry, levels_for, resolve
from hvkit.qemu import VM, find_vm, list_vms, start_vm
from hvkit.guest.control import request

from conftest import run_cli, last_heartbeat, stop_vms_and_memserver

PAGE = 4096
MARK_MIB = 4

needs_fuse = pytest.mark.skipif(fuse_unavailable_reason() is not None,
                                reason=f"no FUSE here: {fuse_unavailable_reason()}")


# ---- tables and store, without a VM ----------------------------------------------------

def test_tables_copy_the_top_level_and_replicate_only_under_writes(tmp_path):
    tables = TableFile(tmp_path / "tables.bin")
    pages = 3 << 18  # 3 GiB: three levels, 512-page leaves
    levels = levels_for(pages)
    span = 512 ** (levels - 1)
    top = np.zeros(512, dtype=np.uint64)
    top[: pages // span] = [frames_entry(1, i * span) for i in range(pages // span)]
    root = tables.append(top)
    model = np.uint64(frames_entry(1, 0)) + np.arange(pages, dtype=np.uint64)
    rng = np.random.default_rng(7)
    for generation in range(3):
        writer = TableWriter.fork(tables, root, levels)
        written = np.unique(rng.integers(0, pages, 300)).astype(np.uint64)
        entries = np.uint64(frames_entry(2 + generation, 0)) + np.arange(len(written), dtype=np.uint64)
        entries[::7] = 0  # some pages become zero
        writer.set_pages(written, entries)
        before = tables.count()
        new_root, count = writer.seal()
        assert tables.count() - before == count
        leaves = len(np.unique(written >> np.uint64(9)))
        assert count <= 1 + leaves + len(np.unique(written >> np.uint64(18)))  # top + touched only
        old = resolve(tables, root, levels, 0, pages)
        assert (old == model).all(), "a fork changed its parent's view"
        model = model.copy()
        model[written] = entries
        assert (resolve(tables, new_root, levels, 0, pages) == model).all()
        root = new_root
    # reads that cross leaves and large entries agree with the model too
    for first, count in [(511, 3), (span - 5, 10), (pages - 7, 7)]:
        assert (resolve(tables, root, levels, first, count) == model[first:first + count]).all()
    tables.close()


def test_store_keeps_each_frame_once_and_survives_reopening(tmp_path):
    store = Store(tmp_path / "store")
    ram = store.frozen_path("fork-1")  # where a fork moves a VM's RAM file
    size = 64 << 20
    content = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    content.tofile(ram)
    (state := store.staged_state("fork-1")).write_bytes(b"device state")
    with store.lock():
        base = store.freeze_ram_file(ram, size, "vm", state, {"name": "vm"}, "fork-1")
    assert store.frozen_ram_file(base) == ram and base.counters.tables_written == 1
    assert not state.exists() and store.state_file(base.name).read_bytes() == b"device state"
    with store.lock():  # sealing the same fork again (its recovery) finds the same snapshot
        assert store.freeze_ram_file(ram, size, "vm", state, {"name": "vm"}, "fork-1").name == base.name
    state = tmp_path / "state"
    page_a, page_b = np.full(PAGE, 0xAB, np.uint8), np.full(PAGE, 0xCD, np.uint8)
    data = np.stack([page_a, page_b, page_a, np.zeros(PAGE, np.uint8)])
    state.write_bytes(b"child state")
    with store.lock():
        child = store.fork_pages(base, np.array([10, 11, 5000, 9000]), data, "vm-1", state, {})
    c = child.counters
    assert (c.pages_written, c.pages_stored, c.pages_deduplicated, c.pages_zero) == (4, 2, 1, 1)
    assert c.metadata_copied == 4096
    state.write_bytes(b"again")
    with store.lock():
        again = store.fork_pages(child, np.array([20]), page_b[None, :], "vm-1", state, {})
    assert (again.counters.pages_stored, again.counters.pages_deduplicated) == (0, 1)
    store.close()

    reopened = Store(tmp_path / "store")  # what a restarted server sees
    assert [s.name for s in reopened.snapshots()] == [base.name, child.name, again.name]
    assert reopened.state_file(child.name).read_bytes() == b"child state"
    snap = reopened.snapshot(again.name)
    got = resolve(reopened.tables, snap.root, snap.levels, 0, size // PAGE)
    assert got[9000] == 0 and got[10] == got[5000] and got[11] == got[20]
    reopened.close()


def test_store_files_are_private_and_staged_states_of_dead_forks_go(tmp_path):
    """Every file of the store is 0600; a staged device state is removed once the fork
    that made it is gone, unless a fork journal (a dead owner's intent) still names it;
    one of a live fork stays, and so does a fresh one whose name has no pid."""
    import stat
    import subprocess

    from hvkit.leftovers import remove_staged_states, staged_state_pid

    runtime = tmp_path / "runtime"
    store = Store(runtime / "memserver" / "store")
    ram = store.frozen_path("1-1")
    np.zeros(1 << 20, np.uint8).tofile(ram)
    for fork_id in ("1-1", "2-1"):
        store.staged_state(fork_id).write_bytes(b"device state")
    with store.lock():
        base = store.freeze_ram_file(ram, 1 << 20, "vm", store.staged_state("1-1"), {"name": "vm"}, "1-1")
        store.fork_pages(base, np.array([3]), np.full((1, PAGE), 7, np.uint8), "vm-1", store.staged_state("2-1"),
                         {}, "2-1")
    store.close()
    for f in (runtime / "memserver" / "store").rglob("*"):
        if f.is_file() and f.name != "lock":
            assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f"{f} is {oct(f.stat().st_mode)}"
    dead = subprocess.Popen(["true"])
    dead.wait()
    staged = {k: store.staged_state(f"{time.time_ns()}-{pid}") for k, pid in
              (("dead", dead.pid), ("named", dead.pid), ("alive", os.getpid()))}
    staged["old format"] = store.path / "snapshots" / ".vm.abcd1234.state"
    for path in staged.values():
        path.write_bytes(b"state")
    assert staged_state_pid(staged["dead"]) == str(dead.pid) and staged_state_pid(staged["old format"]) is None
    (runtime / ".owners").mkdir(mode=0o700)
    (runtime / ".owners" / "vm.json").write_text(json.dumps({"undo": "fork", "state": str(staged["named"])}))
    assert remove_staged_states(runtime) == [staged["dead"]]
    assert all(p.exists() for k, p in staged.items() if k != "dead")
    (runtime / ".owners" / "vm.json").unlink()  # its recovery is done
    old = time.time() - 3600
    os.utime(staged["old format"], (old, old))
    assert sorted(remove_staged_states(runtime)) == sorted([staged["named"], staged["old format"]])
    assert staged["alive"].exists()


def test_fork_refuses_bad_requests_in_one_line(paths):
    for args, says in [(["fork", "no-such-vm"], "no VM named"),
                       (["fork"], "give either a VM"),
                       (["fork", "--snapshot", "9999-none", "-n", "1"], "no snapshot named")]:
        result = run_cli(*args)
        assert result.returncode == 1, result
        assert says in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert MemServer.of(paths).pid() is None, f"{args} left a memory server running"


# ---- real VMs -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def origin(paths, guest):
    if fuse_unavailable_reason():
        pytest.skip(f"no FUSE here: {fuse_unavailable_reason()}")
    before = {row.name for row in list_vms(paths)}  # session-wide VMs (shared) are not this module's
    vm = start_vm("origin", memory="256M", workload="idle", paths=paths)
    request(vm, f"mark parent1 {MARK_MIB}", "HVKIT-MARKED parent1")
    vm.wait_for_console(r"HVKIT-HEARTBEAT 2\b", timeout=60)
    yield vm
    stop_vms_and_memserver(paths, before)


def marks(vm: VM) -> list[str]:
    answer = request(vm, "marks", "HVKIT-MARKS")
    return answer.split("HVKIT-MARKS", 1)[1].split()


@needs_fuse
def test_children_go_on_from_the_parents_exact_state(origin, paths):
    origin.pause()  # so that its last heartbeat is the one the children go on from
    before = last_heartbeat(origin.console())
    report = fork("origin", 2, paths)
    assert report.froze_ram_file and report.counters["tables_written"] == 1
    # its free pages were found from its kernel and punched out of the frozen file (the
    # children keep running on it: the later tests use them)
    assert report.free_pages_note == "" and report.free_pages > 1000
    assert 0 < report.free_pages_given_back <= report.free_pages
    assert [c.name for c in report.children] == ["origin-1", "origin-2"]
    for child in report.children:
        vm = find_vm(child.name, paths)
        first = int(vm.wait_for_console(r"HVKIT-HEARTBEAT (\d+)\n", timeout=30).group(1))
        # the next beat after the parent's last one (or the one after, if the parent
        # was paused in the middle of printing a line)
        assert first in (before + 1, before + 2), (before, first)
    parent = find_vm("origin", paths)  # restarted in its own place from the snapshot
    assert parent.run_state() == "paused", "a VM paused before its fork stays paused"
    assert report.vm_state == "paused" and parent.spec.snapshot == report.snapshot
    parent.resume()
    parent.wait_for_console(rf"HVKIT-HEARTBEAT {before + 2}\n", timeout=30)


@needs_fuse
def test_children_diverge_and_grandchildren_see_only_their_lineage(origin, paths):
    c1, c2 = find_vm("origin-1", paths), find_vm("origin-2", paths)
    request(c1, f"mark childA1 {MARK_MIB}", "HVKIT-MARKED childA1")
    assert marks(c1) == ["childA1"]
    assert marks(c2) == ["parent1"] and marks(find_vm("origin", paths)) == ["parent1"]

    report = fork("origin-1", 2, paths)
    assert [c.name for c in report.children] == ["origin-1-1", "origin-1-2"]
    g1, g2 = (find_vm(c.name, paths) for c in report.children)
    assert marks(g1) == ["childA1"]  # a grandchild starts from its parent's writes
    request(g1, f"mark grandc1 {MARK_MIB}", "HVKIT-MARKED grandc1")
    request(c2, f"mark childB2 {MARK_MIB}", "HVKIT-MARKED childB2")
    assert marks(g1) == ["grandc1"]
    assert marks(g2) == ["childA1"]
    assert marks(c1) == ["childA1"]
    assert marks(c2) == ["childB2"]
    assert marks(find_vm("origin", paths)) == ["parent1"]


@needs_fuse
def test_forking_a_forked_vm_costs_the_pages_it_wrote(origin, paths):
    report = fork("origin-2", 1, paths)
    c = report.counters
    pages = origin.spec.memory // PAGE
    assert not report.froze_ram_file
    assert c["metadata_copied"] == 4096  # the top-level table, nothing else
    assert c["pages_written"] == report.pages_written
    # origin-2 overwrote MARK_MIB of pages and ran a while: far from all its memory
    assert MARK_MIB * 256 <= report.pages_written < pages // 4
    assert c["pages_stored"] + c["pages_deduplicated"] + c["pages_zero"] == report.pages_written
    # only tables above written pages were written, not one per 2 MiB of memory
    assert c["tables_written"] < pages // 512
    assert find_vm("origin-2", paths).run_state() == "running"
    assert marks(find_vm(report.children[0].name, paths)) == ["childB2"]


@needs_fuse
def test_pagemap_scan_finds_the_pages_pagemap_says_a_forked_vm_wrote(origin, paths):
    """PAGEMAP_SCAN (what a fork uses where the kernel has it) and the whole pagemap
    read name the same pages, in a paused forked VM that has written some."""
    from hvkit.forking.written import FILE_OR_SHARED, PRESENT, SWAPPED, ram_mapping, scanned_own_pages

    vm = find_vm("origin-2", paths)
    with vm.paused("test"):
        start, end = ram_mapping(vm.pid, vm.spec.ram_file)
        with open(f"/proc/{vm.pid}/pagemap", "rb", buffering=0) as f:
            scanned = scanned_own_pages(f.fileno(), start, end)
            if scanned is None:
                pytest.skip("this kernel has no PAGEMAP_SCAN (Linux 6.7+): forks read pagemap whole")
            f.seek(start // PAGE * 8)
            entries = np.frombuffer(f.read((end - start) // PAGE * 8), dtype="<u8")
    own = ((entries & np.uint64(PRESENT | SWAPPED)) != 0) & ((entries & np.uint64(FILE_OR_SHARED)) == 0)
    assert MARK_MIB * 256 <= len(scanned) and np.array_equal(scanned, np.flatnonzero(own).astype(np.uint64))


@needs_fuse
def test_vm_list_shows_pss_and_parent(origin, paths):
    rows = {r.name: r for r in list_vms(paths)}
    assert rows["origin-1-1"].parent == "origin-1" and rows["origin-1"].parent == "origin"
    for name in ("origin", "origin-1", "origin-1-1"):
        assert 0 < rows[name].pss < rows[name].memory + (256 << 20)
    result = run_cli("vm", "list")
    assert result.returncode == 0 and "PSS MiB" in result.stdout and "origin-1-1" in result.stdout


@needs_fuse
def test_child_stops_when_its_server_is_gone_and_a_restarted_server_serves_new_ones(origin, paths):
    server = MemServer.of(paths)
    store = server.store()
    snapshot = next(s for s in store.snapshots() if s.vm == "origin-1")
    store.close()
    qemu = find_vm("origin-1-2", paths).pid
    os.kill(server.pid(), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while server.pid() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(VMDied, match="memory server .* is gone"):
        find_vm("origin-1-2", paths)
    assert not _running(qemu), "the child's QEMU is still running"
    result = run_cli("vm", "list")  # every other VM of that server is reported the same way
    assert result.returncode == 0 and "origin-1-1 is dead (its memory server" in result.stdout

    assert run_cli("memserver", "start").returncode == 0
    result = run_cli("fork", "--snapshot", snapshot.name, "-n", "1", "--json")
    assert result.returncode == 0, result.stderr
    name = re.search(r'"name": "([^"]+)"', result.stdout).group(1)
    reborn = find_vm(name, paths)
    assert marks(reborn) == ["childA1"]  # the same snapshot, served again


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie, not yet reaped by this test process, does not)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# ---- the parent's pause, and slim children (issue 21) ------------------------------------

def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode().split("\0")


@needs_fuse
def test_parent_runs_before_its_children_start_and_children_carry_no_kernel(paths, guest):
    """A first fork: the VM runs again, in its next QEMU, before the first child runs
    (each child, as it runs, finds its parent running); the pause is made of the
    pause, the state and the snapshot steps. Children (and the VM's next QEMU) have no
    kernel, initrd or command line and run with THP off, yet go on beating, and fork
    again; a child's reboot ends its QEMU (-no-reboot) with the VM shown dead."""
    from hvkit.qemu.thp import thp_disabled

    with start_vm("swift", memory="256M", workload="idle", paths=paths) as vm:
        vm.wait_for_console(r"HVKIT-HEARTBEAT 1\b", timeout=60)
        old_pid = vm.pid
        seen = []

        def parent_state(child) -> None:
            parent = find_vm("swift", paths)
            seen.append((child.name, parent.pid, parent.run_state()))

        report = fork("swift", 2, paths, on_child=parent_state)
        assert report.vm_state == "running" and report.parent_paused_seconds > 0
        parent = find_vm("swift", paths)
        assert parent.pid != old_pid and parent.spec.snapshot == report.snapshot
        assert seen == [(c.name, parent.pid, "running") for c in report.children], seen
        steps = report.pause_steps
        assert list(steps) == ["state_saved", "moved", "resumed", "old_qemu_ended", "sealed"], steps
        assert steps["resumed"] == report.parent_paused_seconds  # resumed before the snapshot was sealed
        assert sorted(steps.values()) == list(steps.values())
        for pid in [parent.pid] + [c.pid for c in report.children]:
            args = _cmdline(pid)
            assert not {"-kernel", "-initrd", "-append"} & set(args), args
            assert thp_disabled(pid), f"THP is on in QEMU {pid}"
        assert not list(parent.rundir.path.glob("*-next*")), "the next QEMU's files were all renamed"
        child = find_vm(report.children[0].name, paths)
        for each in (parent, child):
            _beats_on(each)
        grandchild = find_vm(fork(child.name, 1, paths).children[0].name, paths)
        _beats_on(grandchild)
        assert not {"-kernel", "-initrd", "-append"} & set(_cmdline(grandchild.pid))
        try:
            grandchild.qmp("system_reset")  # what a reboot of the guest does
        except VMDied:
            pass  # QEMU may end before it answers
        assert grandchild.wait_gone(10), "a child's reboot leaves its QEMU running"
        rows = {r.name: r for r in list_vms(paths)}
        assert grandchild.name not in rows or rows[grandchild.name].state == "dead"
        for row in list_vms(paths):
            if row.name.startswith("swift-") and row.state != "dead":
                find_vm(row.name, paths).stop()


def _beats_on(vm: VM) -> None:
    """The guest's heartbeat goes on from now: a new beat, then the next one."""
    beat = vm.wait_for_console(r"HVKIT-HEARTBEAT (\d+)\n", timeout=30, after=len(vm.console()))
    vm.wait_for_console(rf"HVKIT-HEARTBEAT {int(beat.group(1)) + 1}\n", timeout=30, after=beat.end())


@needs_fuse
def test_reset_takes_a_child_back_to_its_snapshot(paths, guest):
    """`vm reset`: a child that wrote (a mark) is back at its snapshot: paused right
    after the reset, every byte of its RAM, read from its QEMU process, equals the
    snapshot file; resumed, the guest sees the snapshot's marks and beats on. A VM
    that is not a fork child is refused in one line."""
    from hvkit.forking.reset import reset
    from hvkit.memory.process import ram_mappings

    with start_vm("rst", memory="256M", workload="idle", paths=paths) as vm:
        vm.wait_for_console(r"HVKIT-HEARTBEAT 1\b", timeout=60)
        request(vm, "mark before1 1", "HVKIT-MARKED before1")
        report = fork("rst", 1, paths)
        child = find_vm(report.children[0].name, paths)
        request(child, f"mark aftera1 {MARK_MIB}", "HVKIT-MARKED aftera1")
        assert marks(child) == ["aftera1"]
        old_pid = child.pid
        result = run_cli("vm", "reset", child.name, "--paused", "--json")
        assert result.returncode == 0, result.stderr
        done = json.loads(result.stdout)
        assert done["vm_state"] == "paused" and done["snapshot"] == report.snapshot
        assert done["pages_dropped"] >= MARK_MIB * 256, done  # it had written at least its mark
        child = find_vm(child.name, paths)
        assert child.pid != old_pid and child.spec.snapshot == report.snapshot
        mapping = ram_mappings(child.pid, child.spec.memory, child.spec.ram_file)[0]
        snapshot_file = MemServer.of(paths).snapshot_file(report.snapshot)
        chunk, differ = 16 << 20, 0
        with open(f"/proc/{child.pid}/mem", "rb", buffering=0) as mem, open(snapshot_file, "rb") as snap:
            for offset in range(0, child.spec.memory, chunk):
                mem.seek(mapping.start + offset)
                a = np.frombuffer(mem.read(chunk), np.uint8).reshape(-1, PAGE)
                b = np.frombuffer(snap.read(chunk), np.uint8).reshape(-1, PAGE)
                differ += int((a != b).any(axis=1).sum())
        assert differ == 0, f"{differ} pages of the reset child differ from its snapshot"
        child.resume()
        assert marks(child) == ["before1"]
        _beats_on(child)
        reset(child.name, paths)  # the API, on a running child: it runs again after
        assert find_vm(child.name, paths).run_state() == "running"
        for not_a_child, says in (("rst", "is not a fork child"), ("no-such", "no VM named")):
            result = run_cli("vm", "reset", not_a_child)
            assert result.returncode == 1 and says in result.stderr, result.stderr
            assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        find_vm(child.name, paths).stop()
