"""Dumps that other tools open: `hvkit vm dump` writes an ELF core that carries the
guest's VMCOREINFO (hvkit's VMs have a vmcoreinfo device and load qemu_fw_cfg), and
drgn, given hvkit's types instead of a debug package, lists the guest's tasks from it."""

from __future__ import annotations

import json

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
    # the same core read by hvkit
    ps = run_cli("ps", str(core), "--kernel", str(guest.kernel), "--json")
    assert ps.returncode == 0, ps.stderr
    assert {p["name"] for p in json.loads(ps.stdout)["processes"]} >= {"init", "hvkit-mem"}


def test_vm_dump_bad_input(shared_vm, tmp_path):
    for args, message in ((["nosuchvm", "-o", str(tmp_path / "x")], "no VM named"),
                          ([shared_vm.name, "-o", str(tmp_path / "no" / "x")], "is not a folder")):
        proc = run_cli("vm", "dump", *args)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr
