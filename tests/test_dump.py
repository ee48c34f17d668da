"""Dumps that other tools open: `hvkit vm dump` writes an ELF core that carries the
guest's VMCOREINFO (hvkit's VMs have a vmcoreinfo device and load qemu_fw_cfg), and
drgn, given hvkit's types instead of a debug package, lists the guest's tasks from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hvkit.memory.elfcore import vmcoreinfo

from conftest import run_cli


def test_vm_dump_carries_vmcoreinfo(shared_vm, guest, tmp_path):
    core = tmp_path / "guest.core"
    proc = run_cli("vm", "dump", shared_vm.name, "-o", str(core), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["vmcoreinfo"] and doc["release"] == guest.release
    assert shared_vm.run_state() == "running"  # paused only while dumping
    info = vmcoreinfo(core)
    assert info["OSRELEASE"] == guest.release and "SYMBOL(kallsyms_names)" in info
    assert not list(tmp_path.glob(".*partial"))
    assert core.stat().st_mode & 0o077 == 0, "guest memory: its owner's alone (0600)"
    # the same core read by hvkit
    ps = run_cli("ps", str(core), "--kernel", str(guest.kernel), "--json")
    assert ps.returncode == 0, ps.stderr
    assert {p["name"] for p in json.loads(ps.stdout)["processes"]} >= {"init", "hvkit-mem"}


DRGN_SCRIPT = """
import json
from drgn.helpers.linux.pid import for_each_task
tasks = [(t.pid.value_(), t.comm.string_().decode()) for t in for_each_task(prog) if t.pid == t.tgid]
print(json.dumps({"tasks": tasks, "release": prog["init_uts_ns"].name.release.string_().decode()}))
"""


def test_drgn_lists_the_tasks_hvkit_ps_lists(shared_vm, guest, tmp_path):
    """drgn opens the core as it is (VMCOREINFO: KASLR, kallsyms) and, with hvkit's
    compiled types instead of a -dbg package, walks the task list."""
    pytest.importorskip("drgn")
    core = tmp_path / "guest.core"
    assert run_cli("vm", "dump", shared_vm.name, "-o", str(core)).returncode == 0
    script = tmp_path / "tasks.py"
    script.write_text(DRGN_SCRIPT)
    proc = run_cli("drgn", str(core), str(script))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["release"] == guest.release
    ps = json.loads(run_cli("ps", str(core), "--json").stdout)  # the kernel from the core's VMCOREINFO
    ours = {p["pid"] for p in ps["processes"]}
    assert {pid for pid, _ in doc["tasks"]} == ours and len(ours) > 10
    names = dict(doc["tasks"])
    assert names[1] == "init"


def test_vm_dump_bad_input(shared_vm, tmp_path):
    for args, message in ((["nosuchvm", "-o", str(tmp_path / "x")], "no VM named"),
                          ([shared_vm.name, "-o", str(tmp_path / "no" / "x")], "is not a folder")):
        proc = run_cli("vm", "dump", *args)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("moment", ["paused dump", "dump written"])
def test_vm_dump_killed_leaves_the_vm_running_and_no_core(shared_vm, tmp_path, moment):
    """SIGKILL right after pausing, and after QEMU wrote the core but before it has a
    name: the next command resumes the VM; no core stands at the asked path, and no
    copy of guest memory anywhere in its folder (the core had no name yet)."""
    core = tmp_path / "killed.core"
    proc = run_cli("vm", "dump", shared_vm.name, "-o", str(core), env={"HVKIT_DIE_AT": moment})
    assert proc.returncode == -signal.SIGKILL
    listed = run_cli("vm", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert shared_vm.run_state() == "running"
    assert not core.exists()
    assert list(tmp_path.iterdir()) == [], "nothing of the killed dump"
    again = run_cli("vm", "dump", shared_vm.name, "-o", str(tmp_path / "next.core"))
    assert again.returncode == 0, again.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["next.core"]
    assert (tmp_path / "next.core").stat().st_mode & 0o077 == 0


def _vol_leftovers(pid: int, paths) -> list[Path]:
    """Files and folders of `hvkit vol` run `pid` (in /tmp: Volatility's symbols and
    cache), and any copy of guest memory with a name in hvkit's cache."""
    return [*Path(tempfile.gettempdir()).glob(f"hvkit-vol-{pid}.*"), *paths.cache.glob("hvkit-vol-*")]


@pytest.mark.parametrize("moment", ["paused vol", "vol copied"])
def test_vol_killed_leaves_no_copy_of_its_memory(shared_vm, paths, moment):
    """SIGKILL of `hvkit vol VM` once it paused the VM, and once the copy of its memory
    is made: the VM runs again after the next command, the copy never had a name (it
    went with the killed process), and the next command of any kind removes the killed
    run's folder. A folder an older hvkit left (named after a dead process, with a copy
    in it, or empty) goes too, whole."""
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is gone
    old = [paths.cache / f"hvkit-vol-{dead.pid}-old", Path(tempfile.gettempdir()) / f"hvkit-vol-{dead.pid}.1-old"]
    old[0].mkdir(mode=0o700)
    (old[0] / "guest.core").write_bytes(b"guest memory")
    old[1].mkdir(mode=0o700)
    proc = subprocess.Popen([sys.executable, "-m", "hvkit", "vol", shared_vm.name, "linux.pslist"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HVKIT_DIE_AT": moment})
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, err
    made = list(Path(tempfile.gettempdir()).glob(f"hvkit-vol-{proc.pid}.*"))
    assert made, "the killed run's folder (the test would prove nothing without it)"
    assert [p for p in paths.cache.glob("hvkit-vol-*") if p not in old] == [], "the copy had no name"
    assert run_cli("vm", "list").returncode == 0 and shared_vm.run_state() == "running"
    assert _vol_leftovers(proc.pid, paths) == [] and not any(p.exists() for p in [*made, *old])


def test_vol_reads_a_vm_through_a_copy_without_a_name(shared_vm, paths):
    """`hvkit vol VM` works end to end: QEMU writes the copy into a file with no name
    that Volatility reads; nothing stays behind."""
    proc = subprocess.Popen([sys.executable, "-m", "hvkit", "vol", shared_vm.name, "linux.pslist", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "init" in {row.get("COMM") for row in json.loads(out)}
    assert _vol_leftovers(proc.pid, paths) == []


def test_two_dumps_of_one_vm_at_once(shared_vm, tmp_path):
    """Two `vm dump` on one VM: one waits for the other; both cores whole, VM running."""
    cores = [tmp_path / f"{i}.core" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "hvkit", "vm", "dump", shared_vm.name, "-o", str(c)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cores]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    assert all(vmcoreinfo(c).get("OSRELEASE") for c in cores)
    assert shared_vm.run_state() == "running"
