"""Starting, finding and stopping the memory server process.

    <runtime>/memserver/store/   the store (store.py): it outlives the server
                        mnt/     where the server mounts its file system
                        server.pid, server.log

The server is a detached Python process (it outlives the hvkit command that started
it). A server that died leaves a mount whose every access fails with ENOTCONN: start()
lazily unmounts that before mounting again, and the new server serves the same store.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.memserver.server import STATS
from hvkit.memserver.slots import clear_slots
from hvkit.memserver.store import SNAPSHOT_SUFFIX, Snapshot, Store, state_file
from hvkit.procs import kill_process, kill_processes_with, process_runs, same_process
from hvkit.config import make_private_dir


def memserver_alive(pid: int | None) -> bool:
    """Whether `pid` is a live memory server process."""
    return process_runs(pid, b"hvkit.memserver.server")


KEEPER = b"hvkit.forking.pool"  # on the command line of the fork pool's keeper process


def keeper_of(root: Path) -> tuple[int | None, int | None]:
    """(pid, start ticks) of the pool keeper of server folder `root`, as its pid file
    (<root>/pool/keeper.pid) says; (None, None) without one."""
    try:
        pid, ticks = (int(x) for x in (root / "pool" / "keeper.pid").read_text().split())
    except (OSError, ValueError):
        return None, None
    return pid, ticks


def stop_pool_processes(root: Path, store: Path) -> None:
    """Stops the fork's warm pool of this server (hvkit.forking.pool: <root>/pool): its
    keeper, then every QEMU still in the pool's folders (those a fork took are VMs now,
    and live in their own folders), and forgets their slots; the pool's configuration
    stays, so the next fork fills it again."""
    pool = root / "pool"
    pid, ticks = keeper_of(root)
    if same_process(pid, ticks, KEEPER):
        os.kill(pid, signal.SIGTERM)  # it stops its QEMUs and exits
        deadline = time.monotonic() + 10
        while same_process(pid, ticks, KEEPER) and time.monotonic() < deadline:
            time.sleep(0.02)
        kill_process(pid, ticks)
    for batch in (pool / "starting").iterdir() if (pool / "starting").is_dir() else []:
        # QEMUs coming up (never claimed): also one spawned by a keeper killed before it
        # wrote its spec, found by its folder on its command line
        kill_processes_with(f"{batch}/".encode())
    for folder in ("starting", "ready", "claimed"):
        for spec in sorted((pool / folder).rglob("vm.json")) if (pool / folder).is_dir() else []:
            try:
                d = json.loads(spec.read_text())
            except (OSError, ValueError):
                continue
            kill_process(d.get("pid"), d.get("proc_start"))
        shutil.rmtree(pool / folder, ignore_errors=True)
    (pool / "keeper.pid").unlink(missing_ok=True)
    clear_slots(store)


def fuse_unavailable_reason() -> str | None:
    """Why this host cannot run the memory server, or None if it can."""
    if not Path("/dev/fuse").exists():
        return "/dev/fuse does not exist (load the fuse module: modprobe fuse)"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        return f"/dev/fuse cannot be opened ({e.strerror}); the server needs root or the fuse group"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        return f"the FUSE binding does not load ({e}); run ./setup.sh"
    return None


@dataclass(frozen=True)
class MemServer:
    root: Path

    @classmethod
    def of(cls, paths: Paths) -> "MemServer":
        return cls(paths.runtime / "memserver")

    store_path = property(lambda self: self.root / "store")
    mount = property(lambda self: self.root / "mnt")
    pid_file = property(lambda self: self.root / "server.pid")
    log_file = property(lambda self: self.root / "server.log")

    def pid(self) -> int | None:
        """The live server's pid, or None."""
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if memserver_alive(pid) else None

    def snapshot_file(self, name: str) -> Path:
        return self.mount / f"{name}{SNAPSHOT_SUFFIX}"

    def state_file(self, name: str) -> Path:
        """The device state saved with snapshot `name`."""
        return state_file(self.store_path, name)

    def store(self) -> Store:
        return Store(self.store_path)

    def open_snapshot(self, name: str) -> tuple[Store, Snapshot]:
        """The store (close it when done) and its snapshot `name`; one line saying what
        to do when there is no store or no such snapshot. Opens files only: no server is
        started, so a bad name leaves nothing running."""
        if not self.store_path.is_dir():
            raise HvkitError(f"no snapshot named {name!r}: there is no memory-server store in {self.root}",
                             "fork a running VM first ('hvkit fork VM')")
        store = self.store()
        try:
            return store, store.snapshot(name)
        except BaseException:
            store.close()
            raise

    def _mount_state(self) -> str:
        """'mounted', 'stale' (a dead server's mount) or 'none'."""
        try:
            os.stat(self.mount / STATS)
            return "mounted"
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                return "stale"
        mounts = Path("/proc/mounts").read_text().split("\n")
        return "stale" if any(f" {self.mount} fuse" in m for m in mounts) else "none"

    def _unmount(self, lazy: bool) -> bool:
        if self._mount_state() == "none":
            return True
        cmd = ["umount", "-l", str(self.mount)] if lazy else ["umount", str(self.mount)]
        return subprocess.run(cmd, capture_output=True).returncode == 0

    def start(self, timeout: float = 15.0) -> int:
        """The server's pid: the running one, or a new one serving the store."""
        pid = self.pid()
        if pid and self._mount_state() == "mounted":
            return pid
        reason = fuse_unavailable_reason()
        if reason:
            raise HvkitError(f"the memory server cannot run: {reason}")
        if pid:  # alive but not mounted: a server half-started or hung
            os.kill(pid, signal.SIGKILL)
        stop_pool_processes(self.root, self.store_path)  # a dead server's pool: its slots are gone
        self._unmount(lazy=True)
        make_private_dir(self.root)
        make_private_dir(self.mount)
        Store(self.store_path).close()  # creates the store's files once
        with self.log_file.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hvkit.memserver.server", str(self.store_path), str(self.mount)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                umask=0o077)
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout
        while self._mount_state() != "mounted":
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                said = self.log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["nothing"]
                raise HvkitError(f"the memory server did not start (it said: {said[0]})",
                                 f"see {self.log_file}")
            time.sleep(0.02)
        return proc.pid

    def stop(self, force: bool = False) -> None:
        """Unmounts and ends the server. Refused while VMs still map its snapshots
        unless `force` (they then stop at their next read of it)."""
        pid = self.pid()
        stop_pool_processes(self.root, self.store_path)  # they map its slots, and end with it
        # a QEMU that just exited may hold its RAM file open for a moment longer (its
        # files close after /proc stops showing its command line): try for a while
        deadline = time.monotonic() + 3.0
        while not (unmounted := self._unmount(lazy=False)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not unmounted:
            if not force:
                raise HvkitError("the memory server is in use: VMs still run from its snapshots",
                                 "stop them first ('hvkit vm stop'), or pass --force")
            self._unmount(lazy=True)
        if pid:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while memserver_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if memserver_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)

    def stats(self) -> dict | None:
        """What the running server says it served, or None without one."""
        if self._mount_state() != "mounted":
            return None
        try:
            return json.loads((self.mount / STATS).read_bytes())
        except (OSError, ValueError):
            return None
