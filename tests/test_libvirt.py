"""A real libvirt daemon (Debian's libvirt-daemon-system, started here as root like any
other service the tests need) running the default guest kernel as a domain: attached by
domain name, identify and ps agree with the guest's own view, share gives back its free
pages when the domain's RAM is a shared file and refuses in one line when it is not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from hvkit.qemu import VM, find_vm
from hvkit.sharing import share_once
from hvkit.guest.control import frozen_ground_truth

from conftest import run_cli
from test_identify import assert_agrees_with_kpageflags, identify_at_one_moment
from test_ps import compare_with_ground_truth

URI = "qemu:///system"
SHARED_FILE = "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>"


def _virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode:
        raise AssertionError(f"virsh {' '.join(args)}: {proc.stderr.strip()}")
    return proc


@pytest.fixture(scope="module")
def libvirt_daemon():
    """libvirtd (and virtlogd, which it needs) running, started here if they are not."""
    if os.geteuid() != 0:
        pytest.skip("libvirt's system daemon needs root")
    if not Path("/usr/sbin/libvirtd").exists() or not shutil.which("virsh"):
        pytest.skip("libvirt is not installed (./setup.sh installs libvirt-daemon-system)")
    for daemon in ("virtlogd", "libvirtd"):
        if subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode:
            subprocess.run([f"/usr/sbin/{daemon}", "-d"], check=True)
    deadline = time.monotonic() + 30
    while _virsh("version", check=False).returncode:
        assert time.monotonic() < deadline, "libvirtd does not answer"
        time.sleep(0.2)


class Domain:
    """A transient libvirt domain of the default guest (gone when destroyed). Its
    second serial port is the guest's control port, lent to hvkit's VM folder by the
    test so that the guest can report its own view (test instrumentation only)."""

    def __init__(self, name: str, guest, workload: str, shared_file: bool, nodes: int = 1) -> None:
        """`nodes` > 1: that many NUMA cells of equal memory, a vCPU each."""
        self.name = name
        self.folder = Path(tempfile.mkdtemp(prefix=f"hvt-{name}-"))
        self.folder.chmod(0o777)  # libvirt's QEMU runs as libvirt-qemu
        images = Path("/var/lib/libvirt/images") / f"hvkit-test-{os.getpid()}"
        images.mkdir(parents=True, exist_ok=True)
        for src, dst in ((guest.kernel, "vmlinuz"), (guest.initrd, "initrd")):
            if not (images / dst).exists():
                shutil.copyfile(src, images / dst)
        self.images = images
        wl, _, mib = workload.partition(":")
        xml = f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>{nodes}</vcpu>
  {_numa_cells(nodes, 256) if nodes > 1 else ''}
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{images / 'vmlinuz'}</kernel><initrd>{images / 'initrd'}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 hvkit.workload={wl} hvkit.mib={mib or 64}</cmdline>
  </os>
  {SHARED_FILE if shared_file else ''}
  <devices>
    <serial type='file'><source path='{self.folder / 'console.log'}'/><target port='0'/></serial>
    <serial type='unix'><source mode='bind' path='{self.folder / 'ctl.sock'}'/><target port='1'/></serial>
  </devices>
</domain>"""
        (self.folder / "domain.xml").write_text(xml)
        _virsh("create", str(self.folder / "domain.xml"))

    def wait_for(self, text: str, timeout: float = 120) -> None:
        log = self.folder / "console.log"
        deadline = time.monotonic() + timeout
        while text not in (log.read_text(errors="replace") if log.exists() else ""):
            assert time.monotonic() < deadline, f"{self.name}: no {text!r} on its console"
            time.sleep(0.1)

    def lend_ground_truth(self, vm: VM) -> None:
        os.symlink(self.folder / "ctl.sock", vm.rundir.ctl_sock)
        os.symlink(self.folder / "console.log", vm.rundir.console_log)

    def destroy(self) -> None:
        _virsh("destroy", self.name, check=False)
        shutil.rmtree(self.folder, ignore_errors=True)


def _numa_cells(nodes: int, mib: int) -> str:
    cells = "".join(f"<cell id='{i}' cpus='{i}' memory='{mib // nodes}' unit='MiB'/>" for i in range(nodes))
    return f"<cpu><numa>{cells}</numa></cpu>"


@pytest.fixture(scope="module")
def shared_domain(libvirt_daemon, guest):
    d = Domain(f"hvt-lv-{os.getpid()}", guest, "alloc:180", shared_file=True)
    try:
        d.wait_for("HVKIT-ALLOC done mib=180")
        yield d
    finally:
        d.destroy()
        shutil.rmtree(d.images, ignore_errors=True)


def test_a_libvirt_domain_is_attached_read_and_shared(shared_domain, paths):
    proc = run_cli("vm", "attach", "--libvirt", shared_domain.name, "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["name"] == shared_domain.name and row["origin"] == f"libvirt:{URI}#{shared_domain.name}"
    assert row["ram_path"] and row["ram_path"].startswith("/var/lib/libvirt/qemu/ram/")
    vm = find_vm(shared_domain.name, paths)
    shared_domain.lend_ground_truth(vm)
    compare_with_ground_truth(vm, paths)
    truth, pm, layout, _ = identify_at_one_moment(vm, paths)
    assert_agrees_with_kpageflags(truth, pm, layout)

    truth, result = frozen_ground_truth(vm, lambda: share_once(vm, paths))
    free = truth.meminfo["MemFree"]
    assert result.released_bytes >= 0.9 * free, (result.released_bytes, free)
    assert _virsh("domstate", shared_domain.name).stdout.strip() == "running"
    compare_with_ground_truth(vm, paths)  # the guest goes on, its processes intact

    assert run_cli("vm", "pause", shared_domain.name).returncode == 0
    assert _virsh("domstate", shared_domain.name).stdout.strip() == "paused"
    assert run_cli("vm", "resume", shared_domain.name).returncode == 0
    assert _virsh("domstate", shared_domain.name).stdout.strip() == "running"
    proc = run_cli("vm", "stop", shared_domain.name)
    assert proc.returncode == 1 and "never stops it" in proc.stderr
    assert run_cli("vm", "detach", shared_domain.name).returncode == 0
    assert _virsh("domstate", shared_domain.name).stdout.strip() == "running"


def test_share_gives_back_a_domain_without_shared_file_memory(libvirt_daemon, guest, paths):
    """libvirt's default memory (anonymous, inside QEMU), in two NUMA cells (one backend
    each, which libvirt names and QEMU lays out; test_numa.py): read from QEMU's process,
    and its free pages dropped by an madvise hvkit runs inside QEMU (test_share_private.py)."""
    d = Domain(f"hvt-anon-{os.getpid()}", guest, "idle", shared_file=False, nodes=2)
    try:
        d.wait_for("HVKIT-READY")
        assert run_cli("vm", "attach", "--libvirt", d.name, "--name", "lvanon").returncode == 0
        vm = find_vm("lvanon", paths)
        assert vm.spec.memory == 256 << 20 and [b.size for b in vm.spec.ram_nodes] == [128 << 20] * 2
        assert len({b.host for b in vm.spec.ram_nodes} - {None}) == 2  # placed by QEMU's own records
        proc = run_cli("ps", "lvanon", "--json")  # read from QEMU's process instead
        assert proc.returncode == 0 and len(json.loads(proc.stdout)["processes"]) > 5, proc.stderr
        proc = run_cli("share", "lvanon")
        assert proc.returncode == 0 and "gave back" in proc.stdout, proc.stderr
        assert _virsh("domstate", d.name).stdout.strip() == "running"
        assert run_cli("vm", "detach", "lvanon").returncode == 0
    finally:
        d.destroy()


def test_attach_names_a_domain_that_does_not_exist(libvirt_daemon):
    proc = run_cli("vm", "attach", "--libvirt", "no-such-domain")
    assert proc.returncode == 1 and "no domain named 'no-such-domain'" in proc.stderr
    assert "Traceback" not in proc.stderr
