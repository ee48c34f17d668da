"""The FUSE file system that serves every snapshot of the store as a file.

    <mount>/<snapshot>.ram   the snapshot's guest RAM, read-only (QEMU children map it
                             with share=off: pages they only read stay shared in the
                             host's page cache, pages they write become their own)
    <mount>/stats.json       what the server did: per snapshot, pages and bytes served

Binding: mfusepy (a maintained fork of fusepy): pure Python over libfuse 3 with ctypes,
so nothing to compile, and its threaded loop lets several children fault at once.
Reads find their frames through the snapshot's table (table.py) and read them from
the frame files with one pread per run of consecutive frames.

Run it with `python -m hvkit.memserver.server STORE MOUNT` (daemon.py does).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import sys
import threading
import time
from pathlib import Path

from hvkit.errors import HvkitError
from hvkit.memserver.store import PAGE, SNAPSHOT_SUFFIX, Snapshot, Store, read_frames
from hvkit.memserver.table import resolve

log = logging.getLogger(__name__)
STATS = "stats.json"


def _fuse():
    """mfusepy, imported late: it loads libfuse when imported and fails without it."""
    try:
        import mfusepy
    except (ImportError, OSError, EnvironmentError) as e:
        raise HvkitError(f"FUSE is not usable here ({e})", "run ./setup.sh (it installs fuse3 and mfusepy)") from None
    return mfusepy


class SnapshotFS:
    """FUSE operations (mfusepy calls them from several threads)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._snapshots: dict[str, Snapshot] = {}
        self._fds: dict[int, int] = {}  # frame file id -> fd
        self.started = time.time()
        self.served: dict[str, dict[str, int]] = {}

    # ---- what there is --------------------------------------------------------------

    def _snapshot(self, path: str) -> Snapshot | None:
        name = path.lstrip("/")
        if not name.endswith(SNAPSHOT_SUFFIX) or "/" in name:
            return None
        name = name[: -len(SNAPSHOT_SUFFIX)]
        with self._lock:
            snap = self._snapshots.get(name)
        if snap is None:
            try:
                snap = self.store.snapshot(name)  # sealed snapshots never change
            except HvkitError:
                return None
            with self._lock:
                self._snapshots[name] = snap
        return snap

    def _fd(self, file_id: int) -> int:
        with self._lock:
            fd = self._fds.get(file_id)
            if fd is None:
                fd = self._fds[file_id] = os.open(self.store.frame_file(file_id), os.O_RDONLY)
            return fd

    def stats(self) -> dict:
        with self._lock:
            served = {k: dict(v) for k, v in self.served.items()}
        return {"pid": os.getpid(), "started": self.started, "store": str(self.store.path),
                "snapshots": served,
                "pages_served": sum(v["pages"] for v in served.values()),
                "zero_pages_served": sum(v["zero_pages"] for v in served.values())}

    # ---- FUSE operations --------------------------------------------------------------

    def getattr(self, path, fh=None):
        fuse = _fuse()
        if path == "/":
            return dict(st_mode=stat.S_IFDIR | 0o700, st_nlink=2)
        if path == "/" + STATS:
            return dict(st_mode=stat.S_IFREG | 0o400, st_nlink=1, st_size=0)
        snap = self._snapshot(path)
        if snap is None:
            raise fuse.FuseOSError(errno.ENOENT)
        return dict(st_mode=stat.S_IFREG | 0o600, st_nlink=1, st_size=snap.size,
                    st_mtime=snap.created, st_ctime=snap.created, st_atime=snap.created)

    def readdir(self, path, fh):
        return [".", "..", STATS, *(n + SNAPSHOT_SUFFIX for n in self.store.snapshot_names())]

    def open(self, path, fi):
        fuse = _fuse()
        if path == "/" + STATS:
            fi.direct_io = 1  # its size is not known in advance
            return 0
        if self._snapshot(path) is None:
            raise fuse.FuseOSError(errno.ENOENT)
        # QEMU opens its RAM file read-write even with share=off; writes never come
        # (they stay in the child's private pages), and write() refuses them anyway.
        fi.keep_cache = 1  # a snapshot never changes: keep its pages cached across opens
        return 0

    def read(self, path, size, offset, fi):
        if path == "/" + STATS:
            return json.dumps(self.stats(), indent=1).encode()[offset:offset + size]
        snap = self._snapshot(path)
        if snap is None:
            raise _fuse().FuseOSError(errno.ENOENT)
        size = max(0, min(size, snap.size - offset))
        if size == 0:
            return b""
        first, last = offset // PAGE, (offset + size - 1) // PAGE
        data = self._read_pages(snap, first, last - first + 1)
        skip = offset - first * PAGE
        return data[skip:skip + size]

    def _read_pages(self, snap: Snapshot, first: int, count: int) -> bytes:
        entries = resolve(self.store.tables, snap.root, snap.levels, first, count)
        out, frames = read_frames(entries, self._fd)
        zero = int(count - frames.sum())
        with self._lock:
            row = self.served.setdefault(snap.name, {"reads": 0, "pages": 0, "zero_pages": 0})
            row["reads"] += 1
            row["pages"] += count
            row["zero_pages"] += zero
        return out

    def write(self, path, data, offset, fi):
        raise _fuse().FuseOSError(errno.EROFS)

    def truncate(self, path, length, fh=None):
        raise _fuse().FuseOSError(errno.EROFS)


def serve(store_path: Path, mount: Path) -> None:
    """Mounts the store at `mount` and serves until unmounted or signalled."""
    fuse = _fuse()
    store = Store(store_path)
    ops = SnapshotFS(store)

    class Operations(fuse.Operations):
        pass

    for name in ("getattr", "readdir", "open", "read", "write", "truncate"):
        setattr(Operations, name, staticmethod(getattr(ops, name)))
    mount.mkdir(parents=True, exist_ok=True)
    log.info("serving %s at %s (pid %d)", store_path, mount, os.getpid())
    # no allow_other: only the user who runs the server (and the QEMUs it serves) can
    # reach the mount at all; guest memory is nobody else's to read
    fuse.FUSE(Operations(), str(mount), foreground=True, raw_fi=True,
              fsname="hvkit-memserver", default_permissions=False)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if len(argv) != 2:
        print("usage: python -m hvkit.memserver.server STORE MOUNT", file=sys.stderr)
        return 64
    try:
        serve(Path(argv[0]), Path(argv[1]))
    except HvkitError as e:
        print(f"hvkit memserver: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
