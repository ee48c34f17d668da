"""The hvkit command as a user runs it: a VM's life through the CLI, --json, and one
clear line (never a traceback) with a non-zero exit for every bad input."""

from __future__ import annotations

import json

import pytest

from conftest import qemus_of, run_cli


def assert_one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_vm_lifecycle_through_the_cli(paths, guest):
    start = run_cli("vm", "start", "--name", "cli1", "--memory", "128M", "--json")
    assert start.returncode == 0, start.stderr
    info = json.loads(start.stdout)
    assert info["name"] == "cli1" and info["state"] == "running"
    # QEMU outlived the command that started it
    assert info["pid"] in qemus_of(paths.vm_dir("cli1"))

    listed = json.loads(run_cli("vm", "list", "--json").stdout)
    assert any(r["name"] == "cli1" and r["state"] == "running" for r in listed)
    assert run_cli("vm", "pause", "cli1").returncode == 0
    assert {r["name"]: r["state"] for r in json.loads(run_cli("vm", "list", "--json").stdout)}["cli1"] == "paused"
    assert run_cli("vm", "resume", "cli1").returncode == 0
    log = run_cli("vm", "log", "cli1")
    assert "HVKIT-READY" in log.stdout
    gt = run_cli("vm", "groundtruth", "cli1", "--json")
    assert gt.returncode == 0, gt.stderr
    assert json.loads(gt.stdout)["page_frames"] >= 128 * 256

    # a name already in use
    assert_one_line_error(run_cli("vm", "start", "--name", "cli1", "--memory", "128M"),
                          "already running")
    stop = run_cli("vm", "stop", "cli1")
    assert stop.returncode == 0, stop.stderr
    assert not paths.vm_dir("cli1").exists()
    assert qemus_of(paths.vm_dir("cli1")) == []


@pytest.mark.parametrize("args,fragments", [
    (["vm", "pause", "nosuchvm"], ["no VM named 'nosuchvm'"]),
    (["vm", "stop", "nosuchvm"], ["no VM named 'nosuchvm'"]),
    (["vm", "log", "bad/name"], ["invalid VM name"]),
    (["vm", "start", "--memory", "lots"], ["invalid memory size 'lots'"]),
    (["vm", "start", "--memory", "4K"], ["invalid memory size"]),
    (["vm", "start", "--memory", "100T"], ["more than this host has"]),
    (["vm", "start", "--kernel", "/nonexistent/vmlinuz"], ["does not exist"]),
    (["vm", "start", "--kernel", "/etc/passwd"], ["is not a Linux kernel"]),
    (["vm", "start", "--workload", "dance"], ["unknown workload 'dance'"]),
    (["pool", "set", "nosuchvm", "-n", "2"], ["no VM named 'nosuchvm'"]),
    (["pool", "set", "nosuchvm", "-n", "100"], ["invalid pool size 100"]),
])
def test_bad_input_is_one_clear_line(paths, args, fragments):
    assert_one_line_error(run_cli(*args), *fragments)


def test_qemu_not_installed(paths):
    proc = run_cli("vm", "start", "--name", "noqemu", env={"HVKIT_QEMU": "/nonexistent/qemu"})
    assert_one_line_error(proc, "QEMU is not installed")
    assert not paths.vm_dir("noqemu").exists()


def test_qemu_error_while_starting_is_shown(paths):
    proc = run_cli("vm", "start", "--name", "badcpu", "--memory", "128M", "--cpu-model", "no-such-cpu")
    assert_one_line_error(proc, "died while starting", "no-such-cpu")
    assert not paths.vm_dir("badcpu").exists()


def test_every_command_has_help():
    for args in (["--help"], ["vm", "--help"], ["vm", "start", "--help"], ["vm", "list", "--help"],
                 ["vm", "log", "--help"], ["vm", "groundtruth", "--help"], ["guest", "build", "--help"],
                 ["demo", "--help"], ["fork", "--help"], ["memserver", "status", "--help"],
                 ["pool", "--help"], ["pool", "set", "--help"], ["pool", "status", "--help"]):
        proc = run_cli(*args)
        assert proc.returncode == 0 and "Usage:" in proc.stdout, (args, proc.stderr)


def test_demo_runs_on_the_default_guest(paths):
    proc = run_cli("demo", "--json")
    assert proc.returncode == 0, proc.stderr
    steps = {s["step"]: s["result"] for s in json.loads(proc.stdout)["steps"]}
    assert "ready" in steps["boot the guest"]
    assert "children running after" in steps["fork it into 2 children (memory server)"]
    assert steps["stop it and its children"] == "stopped, nothing left behind"
