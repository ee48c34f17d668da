"""The fork's warm pool (issue 21): child QEMUs started ahead of time, each mapping a
memory-server slot that a fork binds to its snapshot.

Real guests, real QEMUs, the real memory server; each guest runs the memory checker,
which reports any word of its memory that differs from what it wrote: a child that
runs in a pooled QEMU must see its snapshot's memory exactly.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from hvkit.forking.pool import PoolDir, entries, entry_vm
from hvkit.memserver import MemServer
from hvkit.qemu import find_vm, start_vm

from conftest import qemus_of, run_cli
from test_safety import assert_clean, hvkit_popen, listed, needs_fuse, wait_rounds


def _ready_pids(paths) -> set[int]:
    pool = PoolDir.of(paths)
    pids = set()
    for folder in (pool.ready.iterdir() if pool.ready.is_dir() else []):
        for batch in folder.iterdir():
            for entry in entries(batch):
                vm = entry_vm(entry)
                if vm is not None and vm.qemu_alive():
                    pids.add(vm.pid)
    return pids


def _wait_ready(paths, n: int, without: set[int] = frozenset(), timeout: float = 90) -> set[int]:
    """The pids of `n` ready pooled QEMUs, none of them in `without`, once there are."""
    deadline = time.monotonic() + timeout
    while True:
        pids = _ready_pids(paths)
        if len(pids) == n and not pids & without:
            return pids
        assert time.monotonic() < deadline, f"the pool has {len(pids)} ready QEMUs, not {n}: {pids}"
        time.sleep(0.1)


def _qemus(paths, started_in: bytes = b"") -> list[int]:
    """QEMUs of the runtime folder (the memory server and the pool's keeper left out);
    with `started_in`, those whose command line also names that (b"/memserver/pool/":
    started by the pool, in it or VMs now)."""
    found = []
    for pid in qemus_of(paths.runtime):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and started_in in cmdline:
            found.append(pid)
    return found


def _pooled_qemus(paths) -> list[int]:
    return _qemus(paths, b"/memserver/pool/")


def _fork(*args: str) -> list[str]:
    proc = run_cli("fork", *args, "--json")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return [c["name"] for c in json.loads(proc.stdout)["children"]]


def _pool_clear() -> None:
    proc = run_cli("pool", "clear")
    assert proc.returncode == 0, proc.stderr


@needs_fuse
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_children_run_in_pooled_qemus_and_the_pool_refills(paths, guest):
    """`pool set`: QEMUs wait ready; a fork's children run in them (their RAM a slot
    bound to the snapshot) with their memory intact, so do a pooled child's own child
    and a reset of one; the keeper refills the pool with new QEMUs and replaces one
    that died; `memserver stop` ends the pool with it, a later fork brings it back, and
    `pool clear` leaves no QEMU of it."""
    try:
        with start_vm("pool", memory="256M", workload="memcheck:24", paths=paths) as vm:
            vm.wait_for_console(r"HVKIT-MEMCHECK round=1 ", timeout=120)
            proc = run_cli("pool", "set", "pool", "-n", "2", "--json")
            assert proc.returncode == 0, proc.stderr
            assert json.loads(proc.stdout)["size"] == 2
            pooled = _wait_ready(paths, 2)

            children = _fork("pool", "-n", "2")
            for name in children:
                child = find_vm(name, paths)
                assert child.pid in pooled and "/slots/" in child.spec.ram_file, (name, child.spec.ram_file)
            refilled = _wait_ready(paths, 2, without=pooled)  # new QEMUs, not the ones taken
            os.kill(sorted(refilled)[0], signal.SIGKILL)  # a pooled QEMU dies: it is replaced
            _wait_ready(paths, 2, without=pooled | {sorted(refilled)[0]})

            grandchild, = _fork(children[0], "-n", "1")  # a pooled child forked in turn
            assert "/slots/" in find_vm(grandchild, paths).spec.ram_file
            before = find_vm(children[1], paths)
            lines = before.console()
            proc = run_cli("vm", "reset", children[1], "--json")  # in a pooled QEMU of the pool's kind
            assert proc.returncode == 0, proc.stderr
            after = find_vm(children[1], paths)
            assert after.pid != before.pid and after.spec.ram_file != before.spec.ram_file
            assert "/slots/" in after.spec.ram_file and after.console().startswith(lines)  # its console goes on
            for name in children + [grandchild]:
                wait_rounds(find_vm(name, paths), 2)
                assert_clean(find_vm(name, paths))
            status = json.loads(run_cli("pool", "status", "--json").stdout)
            assert status["keeper_pid"] and status["pools"][0]["ready"] == 2 and status["pools"][0]["rss"] > 0

            # the pool belongs to the memory server: stopped with it (the server itself
            # stays while children run from it), back with the next fork
            proc = run_cli("memserver", "stop")
            assert proc.returncode != 0 and "VMs still run" in proc.stderr
            assert PoolDir.of(paths).keeper_pid() is None and not _ready_pids(paths)
            for name in children + [grandchild]:
                find_vm(name, paths).stop()
            proc = run_cli("memserver", "stop")
            assert proc.returncode == 0, proc.stderr
            assert not _pooled_qemus(paths)  # (the session's shared VM may run beside)
            later, = _fork("pool", "-n", "1")
            _wait_ready(paths, 2)
            find_vm(later, paths).stop()
    finally:
        _pool_clear()
    assert PoolDir.of(paths).keeper_pid() is None
    assert not _pooled_qemus(paths)


POOL_STEPS = ["pool claimed", "pool bound", "pool taken", "before done fork child"]
RESET_STEPS = ["pool claimed", "after vm reset:stopping", "after vm reset:switching", "after vm reset:switched"]


def _wait_claims_gone(pool: PoolDir, moment: str, timeout: float = 30) -> None:
    """Until the keeper has stopped what a dead command had claimed."""
    deadline = time.monotonic() + timeout
    while pool.claimed.is_dir() and any(pool.claimed.iterdir()):
        assert time.monotonic() < deadline, (moment, list(pool.claimed.iterdir()))
        time.sleep(0.1)


def _starting_pids(pool: PoolDir) -> set[int]:
    return {vm.pid for b in (pool.starting.iterdir() if pool.starting.is_dir() else [])
            for e in entries(b) if (vm := entry_vm(e)) is not None}


def _unknown_qemus(paths, rows: dict) -> set[int]:
    """QEMUs that are neither a listed VM nor in the pool (read twice, half a second
    apart: the keeper may be spawning one whose spec it has not written yet)."""
    unknown = None
    for _ in range(2):
        qemus = set(_qemus(paths))  # then the pool's folders: a batch moves from starting to ready
        found = qemus - {r["pid"] for r in rows.values()} - _starting_pids(PoolDir.of(paths)) - _ready_pids(paths)
        unknown = found if unknown is None else unknown & found
        time.sleep(0.5)
    return unknown


@needs_fuse
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_of_a_pooled_fork_at_each_step_loses_nothing(paths, guest):
    """SIGKILL of `hvkit fork` at each step of taking pooled QEMUs: the next command
    finds the VM running, every child either running (its memory intact) or gone; the
    keeper stops the QEMUs the dead fork had claimed and refills the pool; no QEMU is
    left that is neither a VM nor in the pool."""
    try:
        with start_vm("kpool", memory="256M", workload="memcheck:24", paths=paths) as vm:
            vm.wait_for_console(r"HVKIT-MEMCHECK round=1 ", timeout=120)
            assert run_cli("pool", "set", "kpool", "-n", "2").returncode == 0
            pool = PoolDir.of(paths)
            for moment in POOL_STEPS:
                _wait_ready(paths, 2)
                forker = hvkit_popen("fork", "kpool", "-n", "2", env={"HVKIT_DIE_AT": moment})
                assert forker.wait(timeout=120) == -signal.SIGKILL, (moment, forker.stderr.read())
                rows, said = listed()
                assert "Traceback" not in said
                mine = {n: r for n, r in rows.items() if n == "kpool" or n.startswith("kpool-")}
                assert all(r["state"] == "running" for r in mine.values()), (moment, mine, said)
                _wait_claims_gone(pool, moment)
                assert not _unknown_qemus(paths, rows), moment
                for name in mine:
                    wait_rounds(find_vm(name, paths), 1)
                    assert_clean(find_vm(name, paths))
                for name in mine:
                    if name != "kpool":
                        find_vm(name, paths).stop()
            child, = _fork("kpool", "-n", "1")
            for moment in RESET_STEPS:  # a reset that takes a pooled QEMU, killed at each step
                _wait_ready(paths, 2)
                resetter = hvkit_popen("vm", "reset", child, env={"HVKIT_DIE_AT": moment})
                assert resetter.wait(timeout=120) == -signal.SIGKILL, (moment, resetter.stderr.read())
                rows, said = listed()
                assert "Traceback" not in said and rows[child]["state"] == "running", (moment, rows.get(child), said)
                _wait_claims_gone(pool, moment)
                assert not _unknown_qemus(paths, rows), moment
                assert not list(find_vm(child, paths).rundir.path.glob("*-next*")), moment
                wait_rounds(find_vm(child, paths), 1)
                assert_clean(find_vm(child, paths))
    finally:
        _pool_clear()
    assert not _pooled_qemus(paths)
    MemServer.of(paths).stop(force=True)
