"""VMs of the Debian disk image (`hvkit vm start --image debian`): one 1 GiB guest for
the module, booted by hvkit's VM engine on an overlay of its own (grown to 3 GiB), with
user networking, ssh, the guest agent and hvkit's control service. It must be ready
when `start` returns, answer ssh through `hvkit vm ssh`, be identified page by page as
its own kpageflags say (page cache, a tmpfs file, sshd and journald running), and give
its free memory back to the host with sshd still answering. Then the failures: each one
clear line, nothing left running.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hvkit.errors import HvkitError
from hvkit.image import build_debian_image
from hvkit.memserver import MemServer
from hvkit.qemu import VM, find_vm, list_vms, start_vm
from hvkit.qemu.agent import AgentSilent
from hvkit.guest.control import ground_truth, request

from conftest import assert_private_files, qemus_of, run_cli
from test_identify import assert_agrees_with_kpageflags, identify_at_one_moment
from test_share import assert_share_gives_back_free_memory

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a first image build (~3 min) counts too

NAME = "deb"
DISK_SIZE = 3 << 30
timings: dict[str, float] = {}


@pytest.fixture(scope="module")
def image(paths):
    return build_debian_image(paths)


@pytest.fixture(scope="module")
def image_vm(paths, image):
    print("VMs before:", {r.name: (r.state, r.reason) for r in list_vms(paths)})
    started = time.monotonic()
    with start_vm(NAME, memory="1G", image="debian", disk_size="3G", paths=paths) as vm:
        timings.update(start_s=round(time.monotonic() - started, 1), agent_s=vm.spec.agent_seconds,
                       ready_s=vm.spec.boot_seconds)
        yield vm
    print("timings:", json.dumps(timings))


def _ssh(vm: VM, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(vm.ssh_command(command), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def test_ready_when_start_returns(image_vm: VM, image):
    """Ready means: the agent answers, the control service answers, ssh answers at once."""
    vm = image_vm
    print(f"boot: agent after {vm.spec.agent_seconds} s, ready after {vm.spec.boot_seconds} s")
    assert vm.agent.ping(timeout=5)
    assert "HVKIT-PONG r1" in request(vm, "ping r1", until="HVKIT-PONG r1", timeout=30)
    t0 = time.monotonic()
    out = _ssh(vm, "hostname; uname -r; df -B1 --output=size / | tail -1; systemctl is-active ssh systemd-journald")
    timings["first_ssh_s"] = round(time.monotonic() - t0, 1)
    assert out.returncode == 0, out.stderr
    host, release, size, *active = out.stdout.split()
    assert (host, release) == ("hvkit-debian", image.release)
    assert int(size) > 0.9 * DISK_SIZE, "the file system was grown to the disk (--disk-size)"
    assert active == ["active", "active"]


def test_devices_and_spec(image_vm: VM, image):
    vm = image_vm
    spec = vm.spec
    assert Path(spec.disk) == vm.rundir.disk and spec.disk_size == DISK_SIZE
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", spec.disk],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["virtual-size"] == DISK_SIZE and info["backing-filename"] == str(image.image)
    assert vm.qmp("qom-get", {"path": f"/objects/{spec.memdev}", "property": "share"}), "RAM is a shared file"
    assert vm.qmp("query-vm-generation-id")["guid"]
    nics = vm.agent.call("guest-network-get-interfaces")
    assert spec.mac in {n.get("hardware-address") for n in nics}
    rows = json.loads(run_cli("vm", "list", "--json").stdout)
    row = next(r for r in rows if r["name"] == NAME)
    assert row["image"] == "debian" and row["ssh_port"] == spec.ssh_port and row["state"] == "running"


def test_cli_ssh_runs_commands_with_their_exit_status(image_vm: VM):
    out = run_cli("vm", "ssh", NAME, "cat", "/etc/hostname")
    assert out.returncode == 0 and out.stdout == "hvkit-debian\n", out.stderr
    assert run_cli("vm", "ssh", NAME, "exit 7").returncode == 7


def test_identify_agrees_with_the_guest(image_vm: VM, paths):
    """Page cache of files read over ssh, a tmpfs file, sshd and journald running: every
    class agrees with the guest's own kpageflags of the same moment (>= 99% both ways)."""
    vm = image_vm
    out = _ssh(vm, "cat /usr/bin/* > /dev/null && head -c 24M /dev/urandom > /dev/shm/blob && "
                   "journalctl -q -n 1 > /dev/null")
    assert out.returncode == 0, out.stderr
    t0 = time.monotonic()
    truth, pm, layout, walk = identify_at_one_moment(vm, paths)
    timings["identify_s"] = round(time.monotonic() - t0, 1)
    report = assert_agrees_with_kpageflags(truth, pm, layout)
    print("classes (guest, hvkit, both):", report)
    assert report["page cache"][0] > (24 << 20) // 4096, "the files read and the tmpfs file are page cache"
    names = {t.name for t in walk.tasks}
    assert {"systemd", "sshd", "systemd-journal", "qemu-ga", "hvkit-control"} <= names
    assert walk.errors == []


def test_share_gives_back_free_memory_and_ssh_answers_after(image_vm: VM, paths):
    """The guest first touches most of its free memory (so the host holds it), then
    share gives back >= 90% of MemFree; the guest and its sshd go on."""
    vm = image_vm
    mib = (ground_truth(vm).meminfo["MemFree"] >> 20) - 48
    start = len(vm.console())
    request(vm, f"run alloc {mib}", until="HVKIT-RUNNING alloc")
    vm.wait_for_console(rf"HVKIT-ALLOC done mib={mib}", timeout=300, after=start)
    t0 = time.monotonic()
    assert_share_gives_back_free_memory(vm, paths)
    timings["share_s"] = round(time.monotonic() - t0, 1)
    out = _ssh(vm, "systemctl is-active ssh && cat /proc/meminfo | head -2")
    assert out.returncode == 0 and out.stdout.startswith("active"), out.stderr


def _marks(vm_name: str, paths) -> list[str]:
    out = _ssh(find_vm(vm_name, paths), "cat /root/mark-* 2>/dev/null; true")
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def _mark(vm_name: str, paths, mark: str) -> None:
    out = _ssh(find_vm(vm_name, paths), f"echo {mark} > /root/mark-{mark} && sync")
    assert out.returncode == 0, out.stderr


def _child_of_snapshot(snapshot: str, paths) -> VM:
    proc = run_cli("fork", "--snapshot", snapshot, "-n", "1", "--json", timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return find_vm(json.loads(proc.stdout)["children"][0]["name"], paths)


def _snapshot_names(paths) -> set[str]:
    folder = MemServer.of(paths).store_path / "snapshots"
    return {p.stem for p in folder.glob("*.json")}


def _disk_chain(vm_name: str, paths) -> list[Path]:
    """The VM's disk chain, top first, as qemu-img reads it (and hvkit's reader agrees)."""
    from hvkit.qemu.disk import chain_of

    vm = find_vm(vm_name, paths)
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", vm.spec.disk],
                         capture_output=True, text=True, check=True)
    chain = [Path(i["filename"]) for i in json.loads(out.stdout)]
    assert chain == chain_of(Path(vm.spec.disk)), "hvkit's reader of the chain agrees with qemu-img"
    return chain


def assert_nothing_left_behind(vm_name: str, paths) -> None:
    """After a fork (killed or not) and the next command: no staged device state in the
    store, no disk layer that neither a snapshot nor a VM's chain needs, no overlay or
    half-made overlay in the VM's folder beside its disk, and QEMU writes the disk the
    VM's spec names."""
    from hvkit.memserver.store import snapshot_disks
    from hvkit.qemu.disk import active_layer

    store = MemServer.of(paths).store_path
    assert not list((store / "snapshots").glob(".*")), "a staged state (or temporary file) is left"
    vm = find_vm(vm_name, paths)
    assert active_layer(vm.qmp) == Path(vm.spec.disk)
    assert sorted(vm.rundir.path.glob("*.qcow2*")) == [Path(vm.spec.disk)], "one overlay in the VM's folder"
    needed = {p.resolve() for p in snapshot_disks(store)}
    for row in list_vms(paths):
        if row.state != "dead":
            spec = find_vm(row.name, paths).spec
            if spec.disk:
                needed |= {p.resolve() for p in _disk_chain(row.name, paths)}
    extra = [p for p in (store / "disks").glob("*") if p.resolve() not in needed]
    assert not extra, f"disk layers nothing needs: {extra}"


def test_fork_killed_at_each_disk_step_loses_no_disk_data(image_vm: VM, paths):
    """SIGKILL of `hvkit fork` at steps of a first fork and of a fork of the VM that then
    runs from a snapshot: the next command finds the VM running, every file it wrote is
    there and it writes on. A fork undone (killed before its point of no return) leaves
    the VM's disk chain exactly as it was, file for file; a fork finished by the next
    command adds one layer (the frozen disk its snapshot's children start from, the very
    file the VM wrote to before), and a child of the sealed snapshot sees the disk as it
    was at the fork, not what the VM wrote after. Nothing is left behind either way."""
    cases = [("after fork:pausing", "as before"), ("before fork:stopping", "as before"),  # a first fork
             ("disk linked", "from its snapshot"),
             ("after fork:sealing", "as before"),  # forks of the VM that runs from that snapshot
             ("disk linked", "from its snapshot"), ("disk switched", "from its snapshot")]
    marks: list[str] = []
    sealed = []
    for i, (moment, expected) in enumerate(cases):
        mark = f"k{i}"
        _mark(NAME, paths, mark)
        marks.append(mark)
        before, chain = _snapshot_names(paths), _disk_chain(NAME, paths)
        top = os.stat(chain[0])
        proc = subprocess.run([sys.executable, "-m", "hvkit", "fork", NAME, "-n", "1"], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "HVKIT_DIE_AT": moment})
        assert proc.returncode == -signal.SIGKILL, (moment, proc.stderr)
        listed = run_cli("vm", "list", "--json")  # the next command: undoes or finishes the fork
        assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
        rows = {r["name"]: r for r in json.loads(listed.stdout)}
        assert rows[NAME]["state"] == "running", (moment, rows[NAME], listed.stderr)
        assert not [n for n in rows if n.startswith(NAME + "-")], (moment, "no half-started child")
        new = _snapshot_names(paths) - before
        assert bool(new) == (expected == "from its snapshot"), (moment, new)
        after = _disk_chain(NAME, paths)
        if new:
            assert len(after) == len(chain) + 1 and after[2:] == chain[1:], (moment, chain, after)
            frozen = os.stat(after[1])
            assert (frozen.st_dev, frozen.st_ino) == (top.st_dev, top.st_ino), "the layer is the VM's old overlay"
            sealed.append((new.pop(), list(marks)))
        else:
            assert after == chain, (moment, "an undone fork leaves the disk chain as it was", chain, after)
        assert_nothing_left_behind(NAME, paths)
        assert _marks(NAME, paths) == marks, (moment, "the VM's disk lost nothing")
        print(f"killed at {moment!r}: the VM runs {expected}; its disk chain is {len(after)} deep")
    _mark(NAME, paths, "after")
    for snapshot, marked in (sealed[0], sealed[-1]):
        child = _child_of_snapshot(snapshot, paths)
        try:
            assert _marks(child.name, paths) == marked, "the child has the disk of the fork's moment"
        finally:
            child.stop()
    assert_nothing_left_behind(NAME, paths)


def test_frozen_disks_live_as_long_as_their_snapshots(image_vm: VM, paths):
    """A frozen disk layer outlives the VMs that used it while its snapshot exists: a
    clean-up (as after any image VM stops), with every layer made old, removes a layer
    nothing needs and keeps the snapshots' layers and every VM's chain; `fork
    --snapshot` then starts a child from the oldest snapshot, whose disk is as it was."""
    from hvkit.memserver.store import snapshot_disks
    from hvkit.qemu.disk import chain_of
    from hvkit.qemu.imagevm import collect_disks

    store = MemServer.of(paths).store_path
    layers = store / "disks"
    orphan = layers / "orphan.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(orphan), "1M"], check=True)
    an_hour_ago = time.time() - 3600
    for layer in layers.glob("*.qcow2"):
        os.utime(layer, (an_hour_ago, an_hour_ago))
    collect_disks(paths)
    assert not orphan.exists(), "a layer nothing needs is removed"
    needed = snapshot_disks(store)
    assert needed and all(p.is_file() for p in needed), "every snapshot's layer is kept"
    assert all(p.is_file() for p in chain_of(Path(find_vm(NAME, paths).spec.disk))), "the VM's chain is kept"
    mine = [json.loads(p.read_text()) for p in (store / "snapshots").glob("*.json")]
    snap = min((s for s in mine if s["vm"] == NAME), key=lambda s: s["created"])["name"]
    child = _child_of_snapshot(snap, paths)
    try:
        assert _marks(child.name, paths) == ["k0", "k1", "k2"]
        assert _ssh(child, "echo mine > /root/mark-zz && sync").returncode == 0
    finally:
        child.stop()
    assert "zz" not in _marks(NAME, paths)


def test_fork_gives_the_child_its_own_disk_port_mac_generation_and_clock(image_vm: VM, paths):
    """A child of the image VM starts from the parent's disk and memory of one moment,
    then each writes to its own disk; the child has its own ssh port, MAC (in the guest
    too), VM generation id and a clock set to the host's."""
    from hvkit.forking import fork

    parent = find_vm(NAME, paths)  # its QEMU was restarted by the forks before
    assert _ssh(parent, "echo before > /root/fork-mark && sync").returncode == 0
    generation = parent.qmp("query-vm-generation-id")["guid"]
    t0 = time.monotonic()
    report = fork(NAME, 1, paths)
    timings["fork_s"] = round(time.monotonic() - t0, 1)
    child = find_vm(report.children[0].name, paths)
    try:
        assert parent.reload_spec() and parent.run_state() == "running"
        assert child.spec.ssh_port != parent.spec.ssh_port and child.spec.mac != parent.spec.mac
        assert child.spec.disk != parent.spec.disk and Path(child.spec.frozen_disk).is_file()
        assert child.qmp("query-vm-generation-id")["guid"] not in (generation, parent.spec.vmgenid)
        assert parent.qmp("query-vm-generation-id")["guid"] == generation, "the parent keeps its generation"
        out = _ssh(child, "cat /root/fork-mark && echo child > /root/who && sync && date +%s.%N")
        assert out.returncode == 0, out.stderr
        mark, clock = out.stdout.split()
        assert mark == "before" and abs(float(clock) - time.time()) < 10, "the child's clock was set"
        macs = {n.get("hardware-address") for n in child.agent.call("guest-network-get-interfaces")}
        assert child.spec.mac in macs and parent.spec.mac not in macs
        assert _ssh(parent, "test ! -e /root/who && echo parent > /root/who").returncode == 0
        assert _ssh(child, "cat /root/who").stdout == "child\n", "each writes to its own disk"
    finally:
        child.stop()
    assert parent.run_state() == "running"


def _memory_marks(vm: VM) -> list[str]:
    """The words in the guest's mark file (a tmpfs file: guest memory, not disk)."""
    return request(vm, "marks", "HVKIT-MARKS").split("HVKIT-MARKS", 1)[1].split()


def _own_file(vm: VM) -> str:
    out = _ssh(vm, "cat /root/own")
    assert out.returncode == 0, (vm.name, out.stderr)
    return out.stdout.strip()


def _write_own(vm: VM, word: str) -> None:
    request(vm, f"mark {word} 4", f"HVKIT-MARKED {word}")
    assert _ssh(vm, f"echo {word} > /root/own && sync").returncode == 0


def test_two_children_and_a_grandchild_each_keep_their_own_disk_memory_and_randomness(image_vm: VM, paths):
    """Fork into 2 children, then fork a child: every VM writes its own file on disk and
    its own mark in memory and sees nobody else's; the siblings' random numbers differ
    after the fork (hvkit reseeds each child's CRNG, and gives it a new VM generation
    id; /dev/urandom is the CRNG getrandom() reads); ssh answers in every VM."""
    from hvkit.forking import fork

    parent = find_vm(NAME, paths)
    _write_own(parent, "P")
    kids = [find_vm(c.name, paths) for c in fork(NAME, 2, paths).children]
    try:
        assert [_memory_marks(k) for k in kids] == [["P"], ["P"]] and [_own_file(k) for k in kids] == ["P", "P"]
        randoms = [_ssh(k, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'").stdout for k in kids]
        assert len(randoms[0]) == 64 and randoms[0] != randoms[1], randoms
        for kid, word in zip(kids, ("A", "B")):
            _write_own(kid, word)
        grandchild = find_vm(fork(kids[0].name, 1, paths).children[0].name, paths)
        kids.append(grandchild)
        assert _memory_marks(grandchild) == ["A"] and _own_file(grandchild) == "A", "it starts from its parent"
        _write_own(grandchild, "G")
        parent = find_vm(NAME, paths)  # a first fork restarts the parent's QEMU
        for vm, word in ((parent, "P"), (kids[0], "A"), (kids[1], "B"), (grandchild, "G")):
            assert (_memory_marks(vm), _own_file(vm)) == ([word], word), vm.name
        # every RAM file, overlay, frozen layer, staged or sealed state and snapshot table
        # of these forks is its owner's alone (0600 or stricter)
        checked = assert_private_files(paths.runtime)
        assert {p.suffix for p in checked} >= {".qcow2", ".ram", ".state", ".json"}, checked
        assert all(p.stat().st_mode & 0o777 == 0o400 for p in (MemServer.of(paths).store_path / "disks").iterdir())
        assert_nothing_left_behind(kids[0].name, paths)
    finally:
        for kid in kids:
            kid.stop()


def test_base_image_unchanged(image_vm: VM, image):
    """Last of the VM's tests (module order): the guest wrote; all of it went to its overlay."""
    assert _ssh(image_vm, "head -c 8M /dev/urandom > /root/proof && sync").returncode == 0
    assert _sha256(image.image) == image.sha256
    assert Path(find_vm(NAME, image_vm.paths()).spec.disk).stat().st_size > 8 << 20


# ---- failures: one clear line each, nothing left running --------------------------------------

def test_unknown_image_and_bad_disk_sizes(paths):
    with pytest.raises(HvkitError, match=r"unknown image 'ubuntu'; the images hvkit has: debian"):
        start_vm("img-bad", image="ubuntu", paths=paths)
    with pytest.raises(HvkitError, match="a disk size needs a disk image"):
        start_vm("img-bad", disk_size="4G", paths=paths)
    with pytest.raises(HvkitError, match=r"disk size 1G is smaller than the image \(2G\)"):
        start_vm("img-bad", image="debian", disk_size="1G", paths=paths)
    with pytest.raises(HvkitError, match="boots its own kernel"):
        start_vm("img-bad", image="debian", kernel_package="linux-image-cloud-amd64", paths=paths)
    assert not paths.vm_dir("img-bad").exists()
    out = run_cli("vm", "start", "--image", "ubuntu")
    assert out.returncode != 0 and "ubuntu" in out.stderr


def test_agent_that_does_not_answer_in_time_stops_the_vm(paths, image):
    with pytest.raises(AgentSilent, match="did not answer guest-ping within 8 s") as e:
        start_vm("img-slow", memory="1G", image="debian", timeout=8, paths=paths)
    assert "\n" not in str(e.value)
    assert not paths.vm_dir("img-slow").exists(), "its folder (overlay included) is removed"
    assert not [p for p in qemus_of(paths.runtime) if b"img-slow" in Path(f"/proc/{p}/cmdline").read_bytes()]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root")
def test_full_disk_is_one_clear_error(tmp_path, image):
    """A runtime folder on a file system with no room for the overlay."""
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], check=True)
    try:
        out = run_cli("vm", "start", "--name", "img-full", "--image", "debian", env={"HVKIT_RUNTIME": str(full)})
        assert out.returncode == 1
        assert "cannot create the disk overlay" in out.stderr and "the disk is full" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
        assert not (full / "img-full").exists()
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_ssh_to_a_vm_without_an_image_is_refused(paths, guest):
    with start_vm("img-plain", memory="128M", paths=paths) as plain:
        with pytest.raises(HvkitError, match="has no disk image"):
            plain.ssh_command("true")
        out = run_cli("vm", "ssh", plain.name, "true")
    assert out.returncode == 1 and "has no disk image" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
