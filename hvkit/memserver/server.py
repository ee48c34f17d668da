"""The FUSE file system that serves every snapshot of the store as a file.

    <mount>/<snapshot>.ram   the snapshot's guest RAM, read-only (QEMU children map it
                             with share=off: pages they only read stay shared in the
                             host's page cache, pages they write become their own)
    <mount>/slots/<id>.ram   a slot: a file mapped before it is bound to a snapshot
                             (slots.py; the fork's warm pool), then read as that snapshot
    <mount>/stats.json       what the server did: per snapshot, pages and bytes served

Binding: mfusepy (a maintained fork of fusepy): pure Python over libfuse 3 with ctypes,
so nothing to compile, and its threaded loop lets several children fault at once.
Reads find their frames through the snapshot's table (table.py) and read them from
the frame files with one pread per run of consecutive frames.

Run it with `python -m hvkit.memserver.server STORE MOUNT` (daemon.py does).
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import stat
import sys
import threading
import time
from pathlib import Path

from hvkit.errors import HvkitError
import numpy as np

from hvkit.memserver.slots import SLOTS, Slot, read_slot
from hvkit.memserver.store import PAGE, SNAPSHOT_SUFFIX, Snapshot, Store, is_frames, read_frames
from hvkit.memserver.table import FILE_MASK, FILE_SHIFT, PAGE_MASK, resolve

log = logging.getLogger(__name__)
STATS = "stats.json"
WORKING_SET_SECONDS = 10.0  # how long after a snapshot's first read its reads are recorded


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
        self._bound: dict[str, Snapshot] = {}  # slot id -> the snapshot it was bound to (never changes)
        self._fds: dict[int, int] = {}  # frame file id -> fd
        self._sources: dict[int, object | None] = {}  # frame file id -> what fills it (Store.frame_source)
        self._recording: dict[str, np.ndarray] = {}  # snapshot -> pages read in its first seconds
        self._recorded: set[str] = set()
        self.working_set_seconds = float(os.environ.get("HVKIT_WORKING_SET_SECONDS", WORKING_SET_SECONDS))
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

    def _slot(self, path: str) -> tuple[Slot | None, Snapshot | None]:
        """The slot a path names ("/slots/<id>.ram") and its snapshot once bound."""
        folder, _, name = path.lstrip("/").partition("/")
        if folder != SLOTS or not name.endswith(SNAPSHOT_SUFFIX):
            return None, None
        slot_id = name[: -len(SNAPSHOT_SUFFIX)]
        with self._lock:
            snap = self._bound.get(slot_id)
        if snap is not None:  # bound: for good, whatever becomes of its record
            return Slot(slot_id, snap.size, snap.name), snap
        slot = read_slot(self.store.path, slot_id)
        if slot is None or slot.snapshot is None:
            return slot, None
        snap = self._snapshot("/" + slot.snapshot + SNAPSHOT_SUFFIX)
        if snap is None or snap.size != slot.size:
            return slot, None
        with self._lock:
            self._bound[slot_id] = snap
        return slot, snap

    def _fd(self, file_id: int) -> int:
        with self._lock:
            fd = self._fds.get(file_id)
            if fd is None:
                fd = self._fds[file_id] = os.open(self.store.frame_file(file_id), os.O_RDONLY)
            return fd

    def _source(self, file_id: int):
        """The reader that fills frame file `file_id` on first read, or None (most files:
        their frames are all there). Imported by the name its source file gives."""
        with self._lock:
            if file_id in self._sources:
                return self._sources[file_id]
        config = self.store.frame_source(file_id)
        source = None
        if config is not None:
            module, _, name = str(config.get("reader", "")).partition(":")
            source = getattr(importlib.import_module(module), name)(self.store.frame_file(file_id), config)
        with self._lock:
            return self._sources.setdefault(file_id, source)

    def _make_present(self, entries: np.ndarray) -> None:
        """Frames of files filled on first read are made present before they are read."""
        frames = is_frames(entries)
        if not frames.any():
            return
        used = entries[frames]
        ids = (used >> np.uint64(FILE_SHIFT)) & np.uint64(FILE_MASK)
        for file_id in np.unique(ids).tolist():
            source = self._source(int(file_id))
            if source is not None:
                source.ensure((used[ids == file_id] & np.uint64(PAGE_MASK)).astype(np.int64))

    def _record(self, snap: Snapshot, first: int, count: int) -> None:
        """The working set: the pages read from a snapshot in the first seconds after its
        first read (its first children starting), written beside the snapshot once those
        seconds are over (`hvkit snapshot push` stores it; a remote fork prefetches it).
        Only a snapshot without one yet is recorded."""
        with self._lock:
            pages = self._recording.get(snap.name)
            if pages is None:
                if snap.name in self._recorded or self.store.working_set_file(snap.name).exists():
                    return
                pages = self._recording[snap.name] = np.zeros(snap.pages, dtype=bool)
                timer = threading.Timer(self.working_set_seconds, self._save_working_set, (snap.name,))
                timer.daemon = True
                timer.start()
            pages[first:first + count] = True

    def _save_working_set(self, name: str) -> None:
        with self._lock:
            pages = self._recording.pop(name, None)
            self._recorded.add(name)
        if pages is not None:
            self.store.save_working_set(name, np.flatnonzero(pages))

    def stats(self) -> dict:
        with self._lock:
            served = {k: dict(v) for k, v in self.served.items()}
        with self._lock:
            sources = [s for s in self._sources.values() if s is not None]
        return {"pid": os.getpid(), "started": self.started, "store": str(self.store.path),
                "remote_chunks_fetched": sum(getattr(s, "fetched", 0) for s in sources),
                "remote_chunks_prefetched": sum(getattr(s, "prefetched", 0) for s in sources),
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
        if path == "/" + SLOTS:
            return dict(st_mode=stat.S_IFDIR | 0o700, st_nlink=2)
        slot, _ = self._slot(path)
        if slot is not None:
            return dict(st_mode=stat.S_IFREG | 0o600, st_nlink=1, st_size=slot.size,
                        st_mtime=self.started, st_ctime=self.started, st_atime=self.started)
        snap = self._snapshot(path)
        if snap is None:
            raise fuse.FuseOSError(errno.ENOENT)
        return dict(st_mode=stat.S_IFREG | 0o600, st_nlink=1, st_size=snap.size,
                    st_mtime=snap.created, st_ctime=snap.created, st_atime=snap.created)

    def readdir(self, path, fh):
        if path == "/" + SLOTS:
            return [".", ".."]  # slots are opened by name, never listed
        return [".", "..", STATS, SLOTS, *(n + SNAPSHOT_SUFFIX for n in self.store.snapshot_names())]

    def open(self, path, fi):
        fuse = _fuse()
        if path == "/" + STATS:
            fi.direct_io = 1  # its size is not known in advance
            return 0
        if self._slot(path)[0] is not None:
            fi.keep_cache = 1  # bound once, never rebound: its pages never change
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
        slot, snap = self._slot(path)
        if slot is not None and snap is None:
            # read before it was bound: QEMU never reads guest RAM before it loads a
            # device state, so this is not one of hvkit's; it gets no memory at all
            log.error("slot %s was read before it was bound to a snapshot: refused", slot.id)
            raise _fuse().FuseOSError(errno.EIO)
        snap = snap or self._snapshot(path)
        if snap is None:
            raise _fuse().FuseOSError(errno.ENOENT)
        size = max(0, min(size, snap.size - offset))
        if size == 0:
            return b""
        first, last = offset // PAGE, (offset + size - 1) // PAGE
        try:
            data = self._read_pages(snap, first, last - first + 1)
        except Exception as e:  # a frame that cannot be made present: the read fails, never wrong
            log.error("snapshot %s: pages %d-%d cannot be read (%s); the VMs reading them stop",
                      snap.name, first, last, e)
            raise _fuse().FuseOSError(errno.EIO) from None
        skip = offset - first * PAGE
        return data[skip:skip + size]

    def _read_pages(self, snap: Snapshot, first: int, count: int) -> bytes:
        entries = resolve(self.store.tables, snap.root, snap.levels, first, count)
        self._make_present(entries)
        self._record(snap, first, count)
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
