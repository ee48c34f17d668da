"""VMs hvkit did not start: a plain QEMU (`-m 256M`, anonymous RAM, a QMP socket, no
hvkit options) adopted by its socket, read as it is (identify and ps against the guest's
own view), paused and resumed, never stopped, forked or shared where that would be
unsafe; and a plain QEMU with its RAM in a shared file, whose free pages hvkit gives back."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from hvkit.qemu import VM, find_vm, qemu_binary
from hvkit.qemu.adopt import kernel_from_memory
from hvkit.qemu.probe import fetch_debian_kernel
from hvkit.sharing import share_once
from hvkit.guest.control import frozen_ground_truth

from conftest import run_cli
from test_identify import assert_agrees_with_kpageflags, identify_at_one_moment
from test_ps import compare_with_ground_truth


class PlainQemu:
    """A QEMU started the way a user would start one, outside hvkit. It has hvkit's
    initramfs and a second serial port only so that the tests can ask the guest for its
    own view of its memory (ground truth); hvkit is not told about either."""

    def __init__(self, folder: Path, guest, workload: str, ram_file: Path | None = None,
                 memory: list[str] | None = None) -> None:
        """`memory`: QEMU's options for guest RAM (default `-m 256M`, or in `ram_file`)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.qmp = folder / "qmp.sock"
        self.console = folder / "console.log"
        ram = memory or ["-m", "256M"]
        if ram_file is not None:
            ram += ["-object", f"memory-backend-file,id=pc.ram,size=256M,mem-path={ram_file},share=on",
                    "-machine", "memory-backend=pc.ram"]
        name, _, mib = workload.partition(":")
        self.proc = subprocess.Popen(
            [qemu_binary(), *ram, "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
             "-append", f"console=ttyS0 quiet panic=-1 hvkit.workload={name} hvkit.mib={mib or 64}",
             "-display", "none", "-serial", f"file:{self.console}",
             "-chardev", f"socket,id=ctl,path={folder / 'ctl.sock'},server=on,wait=off", "-serial", "chardev:ctl",
             "-qmp", f"unix:{self.qmp},server=on,wait=off"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in (self.console.read_text(errors="replace") if self.console.exists() else ""):
            assert self.proc.poll() is None, "the plain QEMU died"
            assert time.monotonic() < deadline, f"no {text!r} on the console"
            time.sleep(0.1)

    def lend_ground_truth(self, vm: VM) -> None:
        """Points the attached VM's folder at the guest's console and control port: test
        instrumentation, so that ground_truth(VM) reaches this guest's own view."""
        os.symlink(self.folder / "ctl.sock", vm.rundir.ctl_sock)
        os.symlink(self.console, vm.rundir.console_log)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def plain(guest, tmp_path_factory):
    q = PlainQemu(tmp_path_factory.mktemp("plain"), guest, "alloc:64")
    try:
        q.wait_for("HVKIT-ALLOC done mib=64")
        yield q
    finally:
        q.stop()


def test_a_plain_qemu_is_attached_and_read_as_it_is(plain, paths, guest):
    proc = run_cli("vm", "attach", "--qmp", str(plain.qmp), "--name", "plain", "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["pid"] == plain.proc.pid and row["memory"] == 256 << 20 and row["origin"].startswith("qmp:")
    assert row["ram_path"] is None  # RAM inside QEMU
    vm = find_vm("plain", paths)
    assert Path(vm.spec.kernel) == Path(guest.kernel).resolve()  # QEMU's own -kernel
    plain.lend_ground_truth(vm)
    compare_with_ground_truth(vm, paths)
    truth, pm, layout, _ = identify_at_one_moment(vm, paths)
    assert_agrees_with_kpageflags(truth, pm, layout)

    assert run_cli("vm", "pause", "plain").returncode == 0
    assert vm.run_state() == "paused"
    proc = run_cli("ps", "plain", "--json")  # read paused: it stays paused (the user's pause)
    assert proc.returncode == 0 and vm.run_state() == "paused"
    assert run_cli("vm", "resume", "plain").returncode == 0 and vm.run_state() == "running"

    proc = run_cli("share", "plain")  # anonymous RAM: dropped inside QEMU (test_share_private.py)
    assert proc.returncode == 0 and "gave back" in proc.stdout, proc.stderr
    for args, says in [(["fork", "plain"], "never restarts a VM it did not start"),
                       (["vm", "stop", "plain"], "vm detach plain"),
                       (["vm", "attach", "--qmp", str(plain.qmp)], "attached already")]:
        proc = run_cli(*args)
        assert proc.returncode == 1 and says in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1
    assert vm.run_state() == "running"
    rows = {r["name"]: r for r in json.loads(run_cli("vm", "list", "--json").stdout)}
    assert rows["plain"]["state"] == "running" and rows["plain"]["origin"] == f"qmp:{plain.qmp.resolve()}"

    # the kernel from guest memory alone (QEMU without -kernel): its release, then Debian's package
    assert fetch_debian_kernel(guest.release, paths) == Path(guest.kernel)
    assert kernel_from_memory(vm, paths).resolve() == Path(guest.kernel).resolve()

    assert run_cli("vm", "detach", "plain").returncode == 0
    assert plain.proc.poll() is None, "detaching stopped the QEMU"
    assert "plain" not in run_cli("vm", "list").stdout


def test_attach_refuses_what_is_not_a_running_qemu(plain, paths, tmp_path):
    for target, says in [(plain.folder / "ctl.sock", "does not speak QMP"),
                         (tmp_path / "none.sock", "does not exist")]:
        proc = run_cli("vm", "attach", "--qmp", str(target), timeout=60)
        assert proc.returncode == 1 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_vm_that_stops_while_attached_is_reported(guest, paths, tmp_path):
    q = PlainQemu(tmp_path / "gone", guest, "idle")
    try:
        q.wait_for("HVKIT-READY")
        assert run_cli("vm", "attach", "--qmp", str(q.qmp), "--name", "gone").returncode == 0
    finally:
        q.stop()
    proc = run_cli("ps", "gone")
    assert proc.returncode == 1 and "is gone" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "gone" not in run_cli("vm", "list").stdout


def test_share_gives_back_a_plain_qemus_free_pages_in_a_shared_file(guest, paths, tmp_path):
    ram = Path("/dev/shm") / f"hvt-plain-{os.getpid()}.ram"
    q = PlainQemu(tmp_path / "fileram", guest, "alloc:180", ram_file=ram)
    try:
        q.wait_for("HVKIT-ALLOC done mib=180")
        assert run_cli("vm", "attach", "--qmp", str(q.qmp), "--name", "fileram").returncode == 0
        vm = find_vm("fileram", paths)
        assert vm.spec.ram == "file" and vm.ram_path == ram
        q.lend_ground_truth(vm)
        truth, result = frozen_ground_truth(vm, lambda: share_once(vm, paths))
        free = truth.meminfo["MemFree"]  # the guest's own word, at the moment of sharing
        assert result.released_bytes >= 0.9 * free, (result.released_bytes, free)
        q.wait_for("HVKIT-HEARTBEAT")
        compare_with_ground_truth(vm, paths)  # the guest runs on, its processes intact
        assert run_cli("vm", "detach", "fileram").returncode == 0
    finally:
        q.stop()
        ram.unlink(missing_ok=True)


def test_ram_that_cannot_be_found_or_verified_gives_one_line(plain, paths):
    """The attach record says the RAM is where it is not (as if QEMU had lied or the
    guest were another): ps fails in one line, and the VM is not left paused."""
    import json as _json

    assert run_cli("vm", "attach", "--qmp", str(plain.qmp), "--name", "liar").returncode == 0
    vm = find_vm("liar", paths)
    spec_file = vm.rundir.spec_file
    try:
        for change, says in [({"memory": 512 << 20}, "cannot find the guest RAM"),
                             ({"kernel": str(plain.folder / "console.log")}, "")]:
            spec = _json.loads(spec_file.read_text())
            spec_file.write_text(_json.dumps({**spec, **change}))
            proc = run_cli("ps", "liar")
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1 and says in proc.stderr, proc.stderr
            assert vm.run_state() == "running"
            spec_file.write_text(_json.dumps(spec))
    finally:
        run_cli("vm", "detach", "liar")


def test_attach_killed_halfway_leaves_nothing_and_the_qemu_runs(plain, paths):
    """SIGKILL of `vm attach` before its record exists and just before it is done: the
    next command removes what it left; the QEMU it was adopting runs on untouched."""
    import signal
    import sys

    for moment in ("after vm attach:stop", "before done vm attach"):
        proc = subprocess.run([sys.executable, "-m", "hvkit", "vm", "attach", "--qmp", str(plain.qmp),
                               "--name", "halfatt"], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HVKIT_DIE_AT": moment})
        assert proc.returncode == -signal.SIGKILL, (moment, proc.stderr)
        listed = run_cli("vm", "list", "--json")
        assert listed.returncode == 0 and "Traceback" not in listed.stderr
        assert "halfatt" not in {r["name"] for r in json.loads(listed.stdout)}, moment
        assert not (paths.runtime / "halfatt").exists(), moment
        assert plain.proc.poll() is None, f"killing attach at {moment!r} took the QEMU down"
