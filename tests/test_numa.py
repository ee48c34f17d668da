"""A guest with two NUMA nodes, as libvirt and a user's QEMU make one: one memory backend
per node (`-numa node,memdev=...`), which QEMU lays end to end as the machine's RAM.

hvkit attaches it and reads it as one guest: QEMU's memory tree says which backend is
which node; backends in shared files are read (and given back) in their files, RAM
inside QEMU (anonymous, or a file mapped share=off) through its process, where nodes
of the same size are placed by QEMU's RAM block records and checked against the
kernel's own node records. Held to the guest's own view at one paused moment: page classes
against /proc/kpageflags both ways, free blocks per order against buddyinfo (which
lists both nodes), processes against its process list; sharing loses no word of the
memory checker's data."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from hvkit.guest.control import frozen_ground_truth, request
from hvkit.introspect import classify, list_tasks
from hvkit.errors import HvkitError
from hvkit.introspect.kernelspace import KernelSpace
from hvkit.introspect.numa import kernel_nodes
from hvkit.introspect.source import load_kernel_knowledge, open_guest
from hvkit.memory.base import RamPiece
from hvkit.memory.process import ProcessMemory, ram_mappings
from hvkit.qemu import find_vm
from hvkit.qemu.probe import ram_container_backends
from hvkit.sharing import share_once

from conftest import run_cli
from test_attach import PlainQemu
from test_identify import assert_agrees_with_kpageflags
from test_ps import compare_with_ground_truth

MiB = 1 << 20
NODES = (160, 96)  # MiB per node: unequal, so a node read at the wrong offset shows


def numa_options(backends: list[str], sizes: tuple[int, ...] = NODES) -> list[str]:
    """QEMU options for one node per backend object given (`-object` bodies, id=nI, of
    `sizes` MiB)."""
    out = ["-m", f"{sum(sizes)}M", "-smp", str(len(backends))]
    for i, body in enumerate(backends):
        out += ["-object", body, "-numa", f"node,nodeid={i},cpus={i},memdev=n{i}"]
    return out


@pytest.fixture(scope="module")
def in_files(guest, tmp_path_factory):
    """Two nodes in shared files on /dev/shm (the memory checker is started later: its
    allocations between the guest's look at itself and the pause would blur the
    comparison with kpageflags)."""
    files = [Path("/dev/shm") / f"hvt-numa-{os.getpid()}-n{i}" for i in range(len(NODES))]
    q = PlainQemu(tmp_path_factory.mktemp("numa-files"), guest, "alloc:64", memory=numa_options(
        [f"memory-backend-file,id=n{i},size={mib}M,mem-path={f},share=on" for i, (mib, f) in enumerate(zip(NODES, files))]))
    try:
        q.wait_for("HVKIT-ALLOC done mib=64")
        yield q, files
    finally:
        q.stop()
        for f in files:
            f.unlink(missing_ok=True)


INSIDE = (96, 96, 64)  # MiB: two nodes alike inside QEMU, and one in a file QEMU maps privately


@pytest.fixture(scope="module")
def inside_qemu(guest, tmp_path_factory):
    """Three nodes whose RAM is QEMU's own: two of the same size in anonymous memory
    (nothing in /proc/PID/maps tells which is which node), one in a file mapped
    share=off (the file does not hold what the guest writes; QEMU's copies do)."""
    private = Path("/dev/shm") / f"hvt-numa-{os.getpid()}-private"
    q = PlainQemu(tmp_path_factory.mktemp("numa-anon"), guest, "alloc:64", memory=numa_options(
        [f"memory-backend-ram,id=n0,size={INSIDE[0]}M", f"memory-backend-ram,id=n1,size={INSIDE[1]}M",
         f"memory-backend-file,id=n2,size={INSIDE[2]}M,mem-path={private},share=off"], INSIDE))
    try:
        q.wait_for("HVKIT-ALLOC done mib=64")
        yield q, private
    finally:
        q.stop()
        private.unlink(missing_ok=True)


def attach(q: PlainQemu, name: str, paths):
    proc = run_cli("vm", "attach", "--qmp", str(q.qmp), "--name", name)
    assert proc.returncode == 0, proc.stderr
    vm = find_vm(name, paths)
    q.lend_ground_truth(vm)
    return vm


def identify_frozen(vm, paths):
    """(guest's own view, page map, layout) of one paused moment; then the processes
    against the guest's process list."""
    def look():
        with open_guest(vm.name, paths=paths) as g:  # already paused: stays paused
            return classify(g.kernel, g.layout, list_tasks(g.kernel, g.layout)), g.layout
    truth, (pm, layout) = frozen_ground_truth(vm, look)
    compare_with_ground_truth(vm, paths)
    return truth, pm, layout


def assert_matches_buddyinfo(truth, pm, nodes: int = 2):
    assert {node for node, _ in truth.buddyinfo} == set(range(nodes)), truth.buddyinfo  # the guest sees them all
    theirs = np.sum([counts for counts in truth.buddyinfo.values()], axis=0).tolist()
    assert pm.free_blocks_by_order()[: len(theirs)] == theirs


def test_nodes_in_files_are_read_shared_and_dumped_as_one_guest(in_files, paths, guest, tmp_path):
    q, files = in_files
    vm = attach(q, "numa-files", paths)
    try:
        assert vm.spec.ram == "file" and vm.spec.memory == sum(NODES) * MiB
        assert [(b.path, b.size) for b in vm.spec.ram_nodes] == [(str(f), mib * MiB) for f, mib in zip(files, NODES)]
        truth, pm, layout = identify_frozen(vm, paths)
        assert_agrees_with_kpageflags(truth, pm, layout)
        assert_matches_buddyinfo(truth, pm)

        # the same moment written by QEMU as an ELF core reads the same
        core = tmp_path / "numa.core"
        truth, _ = frozen_ground_truth(vm, lambda: vm.dump_core(core))
        with open_guest(str(core), kernel=guest.kernel, paths=paths) as g:
            pm = classify(g.kernel, g.layout, list_tasks(g.kernel, g.layout))
            assert [(n.nid, n.start_pfn) for n in kernel_nodes(g.kernel, g.layout, 2)] == \
                [(0, 1), (1, NODES[0] * MiB // 4096)]  # node 1 starts where the first backend ends
            assert_agrees_with_kpageflags(truth, pm, g.layout)
        core.unlink()

        # copies of the node files, read as one guest on the command line; in the wrong order, one line
        copies = [tmp_path / f"n{i}.ram" for i in range(len(files))]
        with vm.paused("test"):
            for f, c in zip(files, copies):
                shutil.copyfile(f, c)
        proc = run_cli("ps", ",".join(map(str, copies)), "--kernel", str(guest.kernel), "--json")
        assert proc.returncode == 0 and len(json.loads(proc.stdout)["processes"]) > 5, proc.stderr
        proc = run_cli("identify", ",".join(map(str, copies[::-1])), "--kernel", str(guest.kernel))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
        for c in copies:
            c.unlink()

        # free pages given back from both files; then again and again while the checker runs: no word lost
        truth, result = frozen_ground_truth(vm, lambda: share_once(vm, paths))
        assert result.released_bytes >= 0.9 * truth.meminfo["MemFree"], (result.released_bytes, truth.meminfo)
        assert all(f.stat().st_blocks * 512 < mib * MiB for f, mib in zip(files, NODES))  # holes in each node
        request(vm, "run memcheck 96", until="HVKIT-RUNNING memcheck")
        q.wait_for("HVKIT-MEMCHECK round=1 ")
        for _ in range(10):
            assert share_once(vm, paths).pauses >= 0
            time.sleep(0.2)
        last = int(re.findall(r"HVKIT-MEMCHECK round=(\d+)", q.console.read_text())[-1])
        q.wait_for(f"HVKIT-MEMCHECK round={last + 2} ", timeout=180)
        console = q.console.read_text()
        assert "HVKIT-MEMCHECK-CORRUPT" not in console
        assert all(e == "0" for e in re.findall(r"HVKIT-MEMCHECK round=\d+ live_mib=\d+ errors=(\d+)", console))
        identify_frozen(vm, paths)  # the guest goes on, its processes intact
    finally:
        assert run_cli("vm", "detach", "numa-files").returncode == 0


def test_nodes_inside_qemu_are_placed_by_qemus_records_and_the_guest_agrees(inside_qemu, paths):
    q, private = inside_qemu
    vm = attach(q, "numa-anon", paths)
    try:
        assert vm.spec.ram == "anonymous" and [b.size for b in vm.spec.ram_nodes] == [mib * MiB for mib in INSIDE]
        assert vm.spec.ram_nodes[2].path == str(private) and not vm.spec.ram_nodes[2].shared
        # QEMU's RAM block records placed each anonymous backend on one of its two same-sized mappings
        hosts = [b.host for b in vm.spec.ram_nodes[:2]]
        assert None not in hosts and len(set(hosts)) == 2
        assert {m.start for m in ram_mappings(vm.pid, INSIDE[0] * MiB, None)} >= set(hosts)
        file_at = ram_mappings(vm.pid, INSIDE[2] * MiB, str(private))[0].start
        # and the guest agrees: of both ways of placing them, only that one reads as its nodes
        knowledge = load_kernel_knowledge(Path(vm.spec.kernel), None, paths)
        placed = {}
        with vm.paused("test"):
            for order in (hosts, hosts[::-1]):
                pieces = [RamPiece(INSIDE[0] * MiB, order[0]), RamPiece(INSIDE[1] * MiB, order[1]),
                          RamPiece(INSIDE[2] * MiB, file_at)]
                with ProcessMemory(vm.pid, pieces) as memory:
                    try:  # a wrong placement may already hide the kernel (KASLR put it anywhere)
                        ks = KernelSpace.locate(memory, knowledge.symbols, knowledge.layout.fixed_bases())
                        placed[tuple(order)] = kernel_nodes(ks, knowledge.layout, 3)
                    except HvkitError:
                        pass
        assert list(placed) == [tuple(hosts)] and [n.nid for n in placed[tuple(hosts)]] == [0, 1, 2]

        truth, pm, layout = identify_frozen(vm, paths)
        assert_agrees_with_kpageflags(truth, pm, layout)
        assert_matches_buddyinfo(truth, pm, 3)
        before = vm.host_memory()
        result = share_once(vm, paths)  # dropped inside QEMU, from all three mappings
        assert result.given_pages > 0 and vm.host_memory() < before
        truth, pm, layout = identify_frozen(vm, paths)  # the guest goes on, its processes intact
        assert_agrees_with_kpageflags(truth, pm, layout)
    finally:
        assert run_cli("vm", "detach", "numa-anon").returncode == 0


def test_qemus_memory_tree_names_the_nodes_in_address_order():
    """The section of QEMU 7.2's `info mtree` for the RAM container, rows out of order;
    a container with a gap is not believed."""
    tree = ("    0000000000000000-000000000fffffff (prio 0, i/o): alias ram-below-4g @pc.ram "
            "0000000000000000-000000000fffffff\n"
            "memory-region: pc.ram\n"
            "  0000000000000000-000000000fffffff (prio 0, i/o): pc.ram\n"
            "    0000000006000000-000000000fffffff (prio 0, ram): n1\n"
            "    0000000000000000-0000000005ffffff (prio 0, ram): n0\n"
            "memory-region: n0\n"
            "  0000000000000000-0000000005ffffff (prio 0, ram): n0\n")
    assert ram_container_backends(tree) == ["n0", "n1"]
    assert ram_container_backends(tree.replace("0000000006000000-", "0000000007000000-")) == []
