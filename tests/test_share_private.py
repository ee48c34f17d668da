"""`hvkit share` on VMs whose RAM is private to QEMU (issue 22): a forked VM and its
children (RAM a private mapping of a memory-server snapshot) and a VM with anonymous
RAM. Their free pages are dropped by an madvise injected into QEMU over ptrace; the
tests hold it to what file sharing promises: >= 90% of the guest's MemFree given back
(the guest's own word at the frozen moment), the guest's data intact under fork, ps and
identify, a SIGKILL of hvkit at every step harmless, refusals in one line."""

from __future__ import annotations

import dataclasses

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hvkit.forking.forker import fork
from hvkit.guest.control import frozen_ground_truth, request
from hvkit.introspect.source import open_guest
from hvkit.memory import PAGE_SIZE
from hvkit.memory.process import ProcessMemory
from hvkit.memserver import fuse_unavailable_reason
from hvkit.qemu import VM, find_vm, start_vm
from hvkit.sharing import ShareRefused
from hvkit.sharing.private import KPF_THP, PFN_MASK, PRESENT, PrivateRam

from conftest import run_cli
from test_safety import assert_clean, hvkit_popen, listed, qemu_state, wait_rounds
from test_share import assert_share_gives_back_free_memory

needs_fuse = pytest.mark.skipif(fuse_unavailable_reason() is not None,
                                reason=f"no FUSE here: {fuse_unavailable_reason()}")
STEPS = ["share:seized", "share:injected", "share:entered", "share:dropped", "share:restored"]


def touch_free_memory(vm: VM) -> None:
    """Has the guest allocate all but 12 MiB of its free memory and free it again: QEMU
    then holds pages of its own (a child: copies of the snapshot's) for what is free."""
    truth, _ = frozen_ground_truth(vm, lambda: None)
    mib = truth.meminfo["MemFree"] // (1 << 20) - 12
    start = len(vm.console())
    request(vm, f"run alloc {mib}", until="HVKIT-RUNNING alloc")
    vm.wait_for_console(rf"HVKIT-ALLOC done mib={mib}", timeout=180, after=start)


def tracer_of(vm: VM) -> int:
    status = Path(f"/proc/{vm.pid}/status").read_text()
    return int(re.search(r"^TracerPid:\s+(\d+)", status, re.M).group(1))


@pytest.fixture(scope="module")
def family(paths, guest):
    """A 256 MiB guest forked into two children: three VMs whose RAM is private."""
    if fuse_unavailable_reason() is not None:
        pytest.skip(f"no FUSE here: {fuse_unavailable_reason()}")
    with start_vm("priv-fork", memory="256M", workload="idle", paths=paths) as vm:
        fork(vm.name, 2, paths)
        kids = [find_vm(f"priv-fork-{i}", paths) for i in (1, 2)]
        try:
            yield [find_vm(vm.name, paths), *kids]
        finally:
            for kid in kids:
                kid.stop()


@needs_fuse
@pytest.mark.slow
def test_share_gives_back_free_memory_of_a_forked_vm_and_each_child(family, paths):
    for vm in family:
        assert vm.spec.ram == "snapshot"
        touch_free_memory(vm)
        assert_share_gives_back_free_memory(vm, paths)
        assert tracer_of(vm) == 0


@needs_fuse
def test_dropped_pages_of_a_child_read_back_as_its_snapshot(family, paths):
    """What MADV_DONTNEED means for a private file mapping: a dropped page is the
    snapshot's page again, not zeros (so a guest that counts on zeroed free pages is
    refused, below). Checked on a free page the child wrote, with the VM held paused."""
    kid = family[1]
    touch_free_memory(kid)
    with open_guest(kid.name, paths=paths) as g:
        assert isinstance(g.memory, ProcessMemory)
        ram = PrivateRam.of(g.memory)
        assert not ram.anonymous and [m.path for m in ram.mappings] == [kid.spec.ram_file]
        from hvkit.sharing.freepages import free_pages_to_release

        _, release = free_pages_to_release(g, ram)
        pfn = int(np.flatnonzero(release)[len(np.flatnonzero(release)) // 2])
        with open(kid.spec.ram_file, "rb") as snap:
            snapshot_page = os.pread(snap.fileno(), PAGE_SIZE, pfn * PAGE_SIZE)  # below 3 GiB: offset = gpa
        assert g.memory.read(pfn * PAGE_SIZE, PAGE_SIZE) != snapshot_page  # the child's own copy
        assert ram.discard(np.array([pfn]), np.array([1])) == 1
        assert g.memory.read(pfn * PAGE_SIZE, PAGE_SIZE) == snapshot_page
        assert not ram.backed(pfn + 1)[pfn]
    assert kid.run_state() == "running"


@needs_fuse
def test_guest_that_zeroes_free_pages_is_refused_on_a_snapshot_not_on_anonymous_ram(family, paths):
    """init_on_free's static key is stood in for by max_pfn (non-zero), as the
    poisoning test of test_share does; a snapshot mapping refuses, anonymous would not."""
    with open_guest(family[2].name, paths=paths) as g:
        ram = PrivateRam.of(g.memory)
        ram.check_guest(g.kernel)  # Debian's kernel: init_on_free off
        g.kernel.symbols.addresses["init_on_free"] = g.kernel.symbols["max_pfn"]
        with pytest.raises(ShareRefused, match="init_on_free"):
            ram.check_guest(g.kernel)
        ram.mappings = [dataclasses.replace(m, offset=0, path="") for m in ram.mappings]
        ram.check_guest(g.kernel)  # anonymous RAM reads back zeros: fine


@needs_fuse
def test_a_qemu_already_traced_is_refused_in_one_line(family):
    kid = family[2]
    holder = subprocess.Popen([sys.executable, "-c", (
        "import ctypes, sys, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"assert libc.ptrace(0x4206, {kid.pid}, None, None) == 0\n"
        "print('seized', flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "seized"
        proc = run_cli("share", kid.name)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"process {holder.pid} already traces it" in proc.stderr
    assert kid.run_state() == "running"


@needs_fuse
@pytest.mark.slow
def test_sigkill_of_share_at_each_injection_step_leaves_qemu_running(paths, guest):
    """SIGKILL of hvkit while it holds QEMU's main thread under ptrace, at each step: the
    kernel detaches QEMU, which goes on (never a SIGTRAP left to kill it); the next
    command resumes the VM; the memory checker finds every word intact."""
    with start_vm("priv-kill", memory="256M", workload="memcheck:48", paths=paths) as vm:
        vm.wait_for_console(r"HVKIT-MEMCHECK round=1 ", timeout=120)
        fork(vm.name, 1, paths)
        kid = find_vm("priv-kill-1", paths)
        try:
            for step in STEPS:
                killed = hvkit_popen("share", kid.name, env={"HVKIT_DIE_AT": step})
                assert killed.wait(timeout=120) == -signal.SIGKILL, (step, killed.stderr.read())
                assert kid.qemu_alive() and tracer_of(kid) == 0, step
                assert qemu_state(kid) == "paused", step  # killed inside its pause
                rows, said = listed()
                assert "resumed it" in said and rows[kid.name]["state"] == "running", (step, said)
            done = run_cli("share", kid.name, "--json")
            assert done.returncode == 0, done.stderr
            wait_rounds(kid, 2)
            assert_clean(kid)
        finally:
            kid.stop()


@needs_fuse
@pytest.mark.slow
def test_memory_checker_stays_clean_while_forked_vms_are_shared_forked_and_read(paths, guest):
    """`share --watch` on a forked VM and its child while fork, ps and identify run on
    them (20 s, 40 s until December 2026: CI time; and at least one round of ps and
    identify on each after the fork): every word the checkers wrote reads back, and
    sharing gave pages back."""
    with start_vm("priv-soak", memory="256M", workload="memcheck:64", paths=paths) as vm:
        vm.wait_for_console(r"HVKIT-MEMCHECK round=1 ", timeout=120)
        fork(vm.name, 1, paths)
        names = [vm.name, "priv-soak-1"]
        watchers = [hvkit_popen("share", name, "--watch", "0.1", "--json") for name in names]
        try:
            deadline = time.monotonic() + 20
            forked, passes = False, 0
            while time.monotonic() < deadline or passes < 2:
                passes += 1
                for name in names:
                    for cmd in (["ps", name], ["identify", name, "--json"]):
                        proc = run_cli(*cmd)
                        assert proc.returncode == 0, (cmd, proc.stderr)
                if not forked:  # a fork of the child meets its watcher
                    proc = run_cli("fork", "priv-soak-1", "-n", "1")
                    assert proc.returncode == 0, proc.stderr
                    forked = True
        finally:
            outs = []
            for w in watchers:
                w.send_signal(signal.SIGTERM)
                outs.append(w.communicate(timeout=60))
        given = 0
        for (out, err), w in zip(outs, watchers):
            assert w.returncode == 0, err
            given += sum(json.loads(line)["given_pages"] for line in out.splitlines())
        vms = [find_vm(n, paths) for n in (*names, "priv-soak-1-1")]
        try:
            for each in vms:
                assert each.run_state() == "running" and tracer_of(each) == 0
                wait_rounds(each, 2)
                assert_clean(each)
        finally:
            for each in vms[1:]:
                each.stop()
    print(f"watchers gave back {given} pages")
    assert given > 0


def partly_mapped_huge_pages(vm: VM) -> int:
    """2 MiB blocks of the guest-RAM mapping of QEMU that hold part of a transparent
    huge page: memory the host would keep although RSS no longer counts it."""
    with vm.memory() as mem:
        ram = PrivateRam.of(mem)
        entries, _ = ram.page_map(mem.max_pfn)
    present = (entries & np.uint64(PRESENT)) != 0
    pfns = (entries & np.uint64(PFN_MASK)).astype(np.int64)
    huge = np.zeros(entries.size, bool)
    with open("/proc/kpageflags", "rb", buffering=0) as f:
        for i in np.flatnonzero(present).tolist():
            huge[i] = bool(int.from_bytes(os.pread(f.fileno(), 8, int(pfns[i]) * 8), "little") & KPF_THP)
    counts = huge[: entries.size // 512 * 512].reshape(-1, 512).sum(axis=1)
    return int(((counts > 0) & (counts < 512)).sum())


@pytest.mark.slow
def test_share_gives_back_free_memory_of_anonymous_ram(paths, guest):
    """`--ram anonymous` (QEMU's own memory, huge pages where the kernel gave them):
    >= 90% of MemFree given back, and no huge page left partly mapped (its memory would
    stay with the host until a later split)."""
    with start_vm("priv-anon", memory="256M", ram="anonymous", workload="alloc:180", paths=paths) as vm:
        vm.wait_for_console(r"HVKIT-ALLOC done mib=180", timeout=120)
        assert_share_gives_back_free_memory(vm, paths)
        assert partly_mapped_huge_pages(vm) == 0
        assert tracer_of(vm) == 0
