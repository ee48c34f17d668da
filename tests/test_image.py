"""The Debian 12 disk image (hvkit.image): built once per session (cached across
sessions), booted with plain qemu-system-x86_64 on a qcow2 overlay, then checked from
outside the way a user reaches it: the QEMU guest agent, ssh as root with hvkit's key,
and hvkit's control port on the second serial port. The base image must come out
unchanged. QEMU is killed at the end whatever happens.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner

from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.guest import parse_ground_truth
from hvkit.image import DebianImage, build_debian_image
from hvkit.image import debian as debian_module

BOOT_TIMEOUT = 600.0  # TCG on a busy 2-core machine: a boot has taken 40 to 90 s here
pytestmark = pytest.mark.timeout(1800)  # the first build (about 2 min) counts too


@pytest.fixture(scope="session")
def debian_image() -> DebianImage:
    return build_debian_image(Paths.from_env(), progress=lambda line: print(f"image build: {line}"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass
class Booted:
    """One guest of the image, in a QEMU this module started (and will kill)."""

    image: DebianImage
    folder: Path
    ssh_port: int
    process: subprocess.Popen
    started: float = field(default_factory=time.monotonic)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def qga_sock(self) -> Path:
        return self.folder / "qga.sock"

    @property
    def ctl_sock(self) -> Path:
        return self.folder / "ctl.sock"

    @property
    def console(self) -> Path:
        return self.folder / "console.log"

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except OSError:  # QEMU has not made it yet
            return ""

    def console_tail(self, n: int = 15) -> str:
        return "\n".join(self.console_text().splitlines()[-n:]) or "(console empty)"

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)  # the overlay is thrown away anyway
        self.process.wait(timeout=30)


def qemu_command(image: DebianImage, folder: Path, overlay: Path, ssh_port: int) -> list[str]:
    """The command line that boots the image (kept in one place: the report quotes it)."""
    return [
        "qemu-system-x86_64", "-name", "hvkit-image-test",
        "-machine", "pc", "-accel", "tcg", "-m", "1G", "-smp", "2",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        *image.qemu_boot_args(overlay),
        "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
        "-device", "virtio-net-pci,netdev=net0",
        "-chardev", f"file,id=con,path={folder / 'console.log'}", "-serial", "chardev:con",
        "-chardev", f"socket,id=ctl,path={folder / 'ctl.sock'},server=on,wait=off", "-serial", "chardev:ctl",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=qga,path={folder / 'qga.sock'},server=on,wait=off",
        "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
        "-qmp", f"unix:{folder / 'qmp.sock'},server=on,wait=off",
    ]


@pytest.fixture(scope="module")
def booted(debian_image: DebianImage, tmp_path_factory) -> Iterator[Booted]:
    folder = tmp_path_factory.mktemp("img")
    overlay = debian_image.overlay(folder / "overlay.qcow2")
    port = _free_port()
    cmd = qemu_command(debian_image, folder, overlay, port)
    print("QEMU:", " ".join(cmd))
    with open(folder / "qemu.log", "wb") as log:
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    vm = Booted(debian_image, folder, port, process)
    try:
        yield vm
    finally:
        vm.stop()
        print("timings:", json.dumps(vm.timings))


# ---- talking to the guest ---------------------------------------------------------------

def _qga_exchange(sock_path: Path, request: dict, timeout: float) -> dict | None:
    """One guest-agent request on a fresh connection: its answer, or None if the agent
    did not answer in time (not running yet). guest-sync first, with a fresh id, so
    that a late answer to an earlier try is never taken for this one."""
    sync_id = time.monotonic_ns() % 2**31
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        answers = (json.loads(line) for line in s.makefile("rb") if line.strip())
        try:
            s.connect(str(sock_path))  # QEMU makes the socket a moment after it starts
            s.sendall(json.dumps({"execute": "guest-sync", "arguments": {"id": sync_id}}).encode() + b"\n")
            if not any(a.get("return") == sync_id for a in answers):
                return None
            s.sendall(json.dumps(request).encode() + b"\n")
            return next(answers, None)
        except (OSError, ValueError):  # not there yet, refused, timed out, garbled
            return None


def _wait_for(vm: Booted, what: str, attempt) -> float:
    """Calls `attempt()` until it is true; seconds since QEMU started."""
    deadline = vm.started + BOOT_TIMEOUT
    while not attempt():
        assert vm.alive(), f"QEMU exited while waiting for {what}: {(vm.folder / 'qemu.log').read_text()}"
        assert time.monotonic() < deadline, f"no {what} within {BOOT_TIMEOUT:.0f} s; console:\n{vm.console_tail()}"
        time.sleep(1)
    return time.monotonic() - vm.started


def _ssh(vm: Booted, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(vm.image.ssh_command(vm.ssh_port, *command), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _control(vm: Booted, line: str, until: bytes, timeout: float = 120) -> str:
    """One request on the control port (ttyS1), as hvkit.qemu.vm.ControlPort sends it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(vm.ctl_sock))
        s.sendall(b"\n" + line.encode() + b"\n")
        buf = b""
        while until not in buf or not buf.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            assert chunk, "the control port closed"
            buf += chunk
        return buf.decode(errors="replace")


# ---- the tests ----------------------------------------------------------------------------

def test_image_is_complete(debian_image: DebianImage):
    img = debian_image
    assert img.exists()
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(img.image)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == img.virtual_size
    assert img.size < 200 << 20, "the image should stay small"
    assert img.release.endswith("-cloud-amd64")
    assert (img.image.stat().st_mode & 0o222) == 0, "the base image is read-only"
    assert (img.ssh_key.stat().st_mode & 0o077) == 0, "ssh refuses a private key others can read"
    assert img.known_hosts.read_text().split()[1] == "ssh-ed25519"
    assert img.kernel.read_bytes()[0x202:0x206] == b"HdrS", "a bzImage"


def test_cached_build_is_quick_and_cli_prints_json(debian_image: DebianImage):
    from hvkit.cli.image import image

    started = time.monotonic()
    result = CliRunner().invoke(image, ["build", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["image"] == str(debian_image.image) and data["sha256"] == debian_image.sha256
    assert time.monotonic() - started < 5, "a cached image is not built again"


@pytest.fixture(scope="module")
def running(booted: Booted) -> Booted:
    """The guest once its agent, its sshd and hvkit's control port all answer; when
    each first did (seconds since QEMU started) goes into `booted.timings`."""
    checks = {
        "agent_s": lambda: _qga_exchange(booted.qga_sock, {"execute": "guest-ping"}, timeout=1) == {"return": {}},
        "ready_s": lambda: "HVKIT-READY" in booted.console_text(),
        "ssh_s": lambda: _ssh(booted, "true", timeout=30).returncode == 0,
    }

    def all_answered() -> bool:
        for name, check in checks.items():
            if name not in booted.timings and check():
                booted.timings[name] = round(time.monotonic() - booted.started, 1)
        return checks.keys() <= booted.timings.keys()

    _wait_for(booted, "agent, ssh and control port", all_answered)
    booted.timings["qemu_rss_mib"] = booted.rss_kib() // 1024
    return booted


def test_guest_agent_answers(running: Booted):
    info = _qga_exchange(running.qga_sock, {"execute": "guest-get-osinfo"}, timeout=10)
    assert info and info["return"]["kernel-release"] == running.image.release
    assert info["return"]["version-id"] == "12"


def test_ssh_as_root_with_hvkits_key(running: Booted):
    out = _ssh(running, "uname -r; hostname; passwd -S root; sshd -T | grep -i '^passwordauthentication';"
                        " systemctl is-active ssh qemu-guest-agent hvkit-control systemd-networkd")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == running.image.release and lines[1] == "hvkit-debian"
    assert lines[2].split()[1] == "L", "root's password is locked"
    assert lines[3] == "passwordauthentication no"
    assert lines[4:] == ["active"] * 4
    boot = _ssh(running, "systemd-analyze | head -1").stdout.strip()
    running.timings["systemd_analyze"] = boot
    print(boot)


def test_control_port_answers_like_the_default_guest(running: Booted):
    assert "HVKIT-PONG t1" in _control(running, "ping t1", b"HVKIT-PONG t1")
    raw = _control(running, "dump t2", b"HVKIT-GT-END t2")
    truth = parse_ground_truth(raw[raw.index("HVKIT-GT-BEGIN t2"):])
    assert 900 << 20 < truth.meminfo["MemTotal"] <= 1 << 30
    assert len(truth.kpageflags) >= (1 << 30) // 4096 * 0.9
    names = {p.pid: p.name for p in truth.processes}
    assert names[1] == "systemd" and "sshd" in names.values()
    assert "HVKIT-MARKED abc" in _control(running, "mark abc 1", b"HVKIT-MARKED abc")
    assert "HVKIT-MARKS abc" in _control(running, "marks", b"HVKIT-MARKS")


def test_control_port_freezes_like_the_default_guest(running: Booted):
    """freeze: the guest holds still on HVKIT-FROZEN until "continue" (the host pauses
    the VM in between), then exports what it read at that moment."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(120)
        s.connect(str(running.ctl_sock))
        s.sendall(b"\nfreeze t3\n")
        buf = b""
        while b"HVKIT-FROZEN t3\n" not in buf:
            buf += s.recv(1 << 16)
        s.sendall(b"continue\n")
        while b"HVKIT-GT-END t3\n" not in buf:
            buf += s.recv(1 << 16)
    raw = buf.decode()
    assert parse_ground_truth(raw[raw.index("HVKIT-GT-BEGIN t3"):]).meminfo["MemTotal"] > 900 << 20


def test_base_image_unchanged(running: Booted):
    """Last (module order): the guest ran and wrote; all of it went to the overlay."""
    assert _ssh(running, "head -c 8M /dev/urandom > /root/proof && sync").returncode == 0
    running.stop()
    assert _sha256(running.image.image) == running.image.sha256
    assert (running.folder / "overlay.qcow2").stat().st_size > 8 << 20, "the guest's writes are in the overlay"


# ---- failures say what is wrong, in one line ------------------------------------------------

def test_missing_tool_is_one_clear_error(tmp_path, monkeypatch):
    real_which = debian_module.shutil.which
    monkeypatch.setattr(debian_module.shutil, "which", lambda t: None if t == "mmdebstrap" else real_which(t))
    with pytest.raises(HvkitError, match=r"needs mmdebstrap; .*apt-get install mmdebstrap"):
        build_debian_image(Paths(tmp_path / "cache", tmp_path / "run"))


def test_full_disk_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(debian_module, "MIN_FREE_BYTES", 1 << 60)
    with pytest.raises(HvkitError, match=r"MiB free in .*needs"):
        build_debian_image(Paths(tmp_path / "cache", tmp_path / "run"))


def test_unreachable_archive_is_one_clear_error(tmp_path):
    with pytest.raises(HvkitError, match="cannot reach the Debian archive") as e:
        build_debian_image(Paths(tmp_path / "cache", tmp_path / "run"), mirror="http://127.0.0.1:9/debian")
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "cache" / "images").glob(".debian-12.build-*")), "nothing half-made left"
