"""The Python API (hvkit.api, exported from hvkit): the same answers as the CLI, on a
real guest, scripted the way docs/api.md shows."""

from __future__ import annotations

import json

import pytest

import hvkit
from hvkit.memserver import MemServer, fuse_unavailable_reason

from conftest import run_cli
from test_ps import same_name


def test_identify_and_ps_answer_as_the_cli_does(shared_vm, paths):
    found = hvkit.identify(shared_vm)
    assert found.kernel == shared_vm.spec.kernel_release
    assert sum(found.counts().values()) == found.pages.pages
    assert found.counts()["free"] > 0 and found.paused_seconds > 0
    assert shared_vm.run_state() == "running"  # resumed after reading
    cli = json.loads(run_cli("identify", shared_vm.name, "--json").stdout)
    assert cli["pages"] == found.pages.pages and cli["kernel"] == found.kernel
    # the guest runs between the two looks: the kernel image and page tables stay put
    for label in ("kernel image", "not present"):
        assert cli["classes"][label]["pages"] == found.counts()[label]

    by_name = hvkit.ps(shared_vm.name, paths=paths)  # a VM by name, as another process sees it
    truth = hvkit.ground_truth(shared_vm)
    theirs = {p.pid: p.name for p in truth.processes}
    ours = {t.pid: t.name for t in by_name.tasks}
    assert by_name.errors == [] and ours.keys() == theirs.keys()
    assert all(same_name(theirs[pid], ours[pid]) for pid in theirs)
    assert hvkit.vm(shared_vm.name, paths).pid == shared_vm.pid
    assert shared_vm.name in {row.name for row in hvkit.vms(paths)}


def test_a_script_starts_shares_forks_and_stops(paths):
    if fuse_unavailable_reason():
        pytest.skip(f"no FUSE here: {fuse_unavailable_reason()}")
    server_ran = MemServer.of(paths).pid() is not None
    try:
        _start_share_fork_stop(paths)
    finally:
        if not server_ran:  # the fork started it: later tests expect none
            MemServer.of(paths).stop()
    assert "apivm" not in {row.name for row in hvkit.vms(paths)}
    with pytest.raises(hvkit.HvkitError, match="no VM named"):
        hvkit.vm("apivm", paths)


def _start_share_fork_stop(paths) -> None:
    with hvkit.start("apivm", memory="128M", workload="alloc:32", paths=paths) as vm:
        vm.wait_for_console(r"HVKIT-ALLOC done mib=32", timeout=120)
        shared = hvkit.share(vm)
        assert shared.given_pages > 0 and shared.released_bytes > 0
        report = hvkit.fork(vm, 1, paths=paths)
        assert [c.name for c in report.children] == ["apivm-1"]
        child = hvkit.vm("apivm-1", paths)
        try:
            assert child.run_state() == "running" and child.spec.parent == "apivm"
            assert vm.reload_spec() and vm.run_state() == "running"
        finally:
            child.stop()
