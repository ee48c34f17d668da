"""The QEMU engine with real guests: ready marker, pause/resume, ground truth, several
VMs side by side, clean stops, dead VMs."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from hvkit.qemu import VM, list_vms, qemu_binary, start_vm
from hvkit.qemu.accel import best_accel, probe
from hvkit.units import MiB
from hvkit.guest.control import ground_truth

from conftest import qemus_of

BEAT = r"HVKIT-HEARTBEAT (\d+)"


def beats(vm: VM) -> list[int]:
    return [int(b) for b in re.findall(BEAT, vm.console())]


def wait_beats(vm: VM, n: int, timeout: float = 30) -> int:
    start = beats(vm)[-1] if beats(vm) else -1
    deadline = time.monotonic() + timeout
    while (beats(vm) or [-1])[-1] < start + n:
        assert time.monotonic() < deadline, "heartbeat stalled"
        time.sleep(0.1)
    return beats(vm)[-1]


def test_ready_marker_names_the_kernel(shared_vm, guest):
    m = re.search(r"HVKIT-READY kernel=(\S+) workload=(\S+)", shared_vm.console())
    assert m, shared_vm.console()[-500:]
    assert m.group(1) == guest.release
    assert m.group(2) == "idle"


def test_pause_stops_heartbeat_and_resume_restarts_it(shared_vm):
    wait_beats(shared_vm, 1)
    shared_vm.pause()
    try:
        assert shared_vm.run_state() == "paused"
        frozen = beats(shared_vm)[-1]
        time.sleep(2.5)  # the guest beats every second when running
        assert beats(shared_vm)[-1] == frozen
    finally:
        shared_vm.resume()
    assert shared_vm.run_state() == "running"
    assert wait_beats(shared_vm, 2) >= frozen + 2


def test_ground_truth_arrives_and_parses(shared_vm, tmp_path):
    saved = tmp_path / "gt.txt"
    truth = ground_truth(shared_vm, save_to=saved)
    assert saved.read_text().startswith("HVKIT-GT-BEGIN")
    assert saved.stat().st_mode & 0o077 == 0, "the guest's processes and environments: 0600"
    # MemTotal is RAM less what the kernel keeps for itself: most of 256 MiB
    assert 150 * MiB < truth.meminfo["MemTotal"] <= 256 * MiB
    assert 0 < truth.meminfo["MemFree"] < truth.meminfo["MemTotal"]
    # one flags word per page frame, covering all of RAM
    assert truth.kpageflags.size >= 256 * MiB // 4096
    buddy = truth.free_pages_by_buddyinfo() * 4096
    assert abs(buddy - truth.meminfo["MemFree"]) < 0.1 * truth.meminfo["MemFree"]
    # KPF_BUDDY (bit 10) marks the first page of each free block: some are there
    assert ((truth.kpageflags >> 10) & 1).sum() > 0
    names = {p.pid: p.name for p in truth.processes}
    assert names[1] == "init" and names[2] == "kthreadd"
    assert "hvkit-mem" in names.values()  # the heartbeat
    assert not any(p.name in ("cat", "gzip", "base64") for p in truth.processes)


def test_ground_truth_refused_while_paused(shared_vm):
    shared_vm.pause()
    try:
        with pytest.raises(Exception, match="paused"):
            ground_truth(shared_vm, timeout=5)
    finally:
        shared_vm.resume()


def test_two_vms_side_by_side_have_separate_ram(paths, shared_vm):
    with start_vm("second", memory="128M", workload="hold:32", paths=paths) as other:
        assert other.ram_path != shared_vm.ram_path
        assert other.ram_path.stat().st_ino != shared_vm.ram_path.stat().st_ino
        assert other.ram_path.stat().st_size == 128 * MiB
        assert shared_vm.ram_path.stat().st_size == 256 * MiB
        other.wait_for_console(r"HVKIT-HOLD holding mib=32", timeout=60)
        # each guest sees its own memory size, and both keep running
        assert ground_truth(other).meminfo["MemTotal"] < 128 * MiB
        assert ground_truth(shared_vm).meminfo["MemTotal"] > 128 * MiB
        states = {r.name: r.state for r in list_vms(paths)}
        assert states["shared"] == "running" and states["second"] == "running"
        # the 32 MiB the second guest holds lives in its own RAM file
        assert other.host_memory() >= 32 * MiB
        folder = other.rundir.path
    assert not folder.exists()


def test_stop_leaves_nothing_behind(paths):
    vm = start_vm("stopme", memory="128M", paths=paths)
    pid, folder = vm.pid, vm.rundir.path
    assert pid in qemus_of(folder)
    vm.stop()
    assert not folder.exists()
    assert pid not in qemus_of(folder)
    assert "stopme" not in {r.name for r in list_vms(paths)}


def test_dead_vm_is_listed_dead_then_cleaned(paths):
    vm = start_vm("victim", memory="128M", paths=paths)
    os.kill(vm.pid, signal.SIGKILL)
    vm._process.wait()
    rows = {r.name: r for r in list_vms(paths)}
    assert rows["victim"].state == "dead"
    assert not vm.rundir.path.exists()
    assert "victim" not in {r.name for r in list_vms(paths)}


def test_guest_panic_while_starting_is_reported(paths):
    with pytest.raises(Exception, match="Kernel panic"):
        start_vm("panics", memory="128M", append="rdinit=/nonexistent", paths=paths, timeout=60)
    assert not paths.vm_dir("panics").exists()


def test_accelerator_probe_runs_guest_code():
    qemu = qemu_binary()
    seconds = probe(qemu, "tcg", timeout=30)
    assert seconds is not None and seconds > 0
    assert probe(qemu, "no-such-accel", timeout=30) is None


def test_best_accel_is_cached(paths):
    first = best_accel(qemu_binary(), paths.runtime)
    assert first in ("kvm", "tcg")
    assert (paths.runtime / "accel.json").exists()
    t0 = time.monotonic()
    assert best_accel(qemu_binary(), paths.runtime) == first
    assert time.monotonic() - t0 < 0.5  # cached: no QEMU started


def test_request_sent_before_the_guest_is_ready_is_answered(paths):
    """A request that reaches the guest before it opened its control port is lost by
    the serial port; hvkit repeats it until the guest answers."""
    with start_vm("early", memory="128M", paths=paths, wait=False) as vm:
        truth = ground_truth(vm, timeout=120)
        assert truth.processes and "HVKIT-READY" in vm.console()
