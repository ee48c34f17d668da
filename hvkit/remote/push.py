"""`hvkit snapshot push|ls|rm`: a memory-server snapshot into an S3 store and back out.

A push reads the snapshot through its table (as the memory server serves it), cuts it
into chunks, hashes each, and uploads the chunks and tables the store lacks (one LIST
tells which it has), then the blobs (device state, kernel, initramfs), then the
manifest, last: killed at any moment before that, the store holds only unnamed
objects and `ls` shows nothing new. A snapshot of a forked VM shares every chunk it
did not write with its parent's, so its push uploads only what the VM changed.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.memserver import MemServer, Snapshot, Store
from hvkit.memserver.store import PAGE, read_frames
from hvkit.memserver.table import resolve
from hvkit.qemu.ownership import fault_point
from hvkit.remote.layout import (DEFAULT_CHUNK_BYTES, DIGEST, Blob, Manifest, blob_key, build_tables,
                                 chunk_key, compress, digest, manifest_key, table_entries, table_key)
from hvkit.remote.lazy import LazyFrames
from hvkit.remote.objects import NotFound, ObjectStore, StoreURL, check_name

log = logging.getLogger(__name__)
UPLOADERS = 8


@dataclass
class PushReport:
    name: str
    store: str
    size: int
    chunks: int
    chunks_zero: int  # never stored
    chunks_uploaded: int  # the rest the store had already (from this or another snapshot)
    pages_uploaded: int  # pages in the chunks uploaded
    tables_uploaded: int
    blobs_uploaded: int
    bytes_uploaded: int  # compressed bytes of everything uploaded
    seconds: float
    working_set_chunks: int = 0  # chunks the first children read in their first seconds (0: none recorded)

    def to_json(self) -> dict:
        return asdict(self)


def push(paths: Paths, name: str, url: str, as_name: str | None = None, endpoint: str | None = None,
         chunk_bytes: int = DEFAULT_CHUNK_BYTES, working_set: bool = True) -> PushReport:
    """Pushes local snapshot `name` to the store `url` (as `as_name`, default `name`),
    with its working set if the memory server recorded one (unless not `working_set`)."""
    t0 = time.monotonic()
    target = check_name(as_name or name)
    if chunk_bytes < PAGE or chunk_bytes > 4 << 20 or chunk_bytes & (chunk_bytes - 1):
        raise HvkitError(f"invalid chunk size {chunk_bytes}", "give a power of two from 4 KiB to 4 MiB")
    objects = ObjectStore(StoreURL.parse(url), endpoint)
    store, snap = MemServer.of(paths).open_snapshot(name)
    try:
        if snap.machine.get("disk") or snap.machine.get("frozen_disk"):
            raise HvkitError(f"snapshot {name!r} is of a VM with a disk image; hvkit pushes snapshots of "
                             "default-guest VMs only so far", "push a snapshot of a VM without --image")
        if snap.size % chunk_bytes:
            raise HvkitError(f"the snapshot's {snap.size} bytes are not a multiple of the chunk size {chunk_bytes}")
        try:
            objects.get(manifest_key(target))
            raise HvkitError(f"the store {objects.url} has a snapshot named {target!r} already",
                             "remove it first ('hvkit snapshot rm') or push with --as NEW_NAME")
        except NotFound:
            pass
        report = PushReport(target, str(objects.url), snap.size, 0, 0, 0, 0, 0, 0, 0, 0.0)
        digests, stored_bytes = _push_chunks(store, snap, objects, chunk_bytes, report)
        levels, root, tables = build_tables(digests)
        have = {k for k, _ in objects.list("tables")}
        for hexname, raw in tables.items():
            if hexname not in have:
                objects.put(table_key(hexname), compress(raw))
                report.tables_uploaded += 1
        fault_point("push:tables uploaded")
        blobs = {k for k, _ in objects.list("blobs")}
        state = _push_blob(objects, store.state_file(snap.name), blobs, report)
        kernel, initrd = (_push_blob(objects, Path(snap.machine[k]), blobs, report) if snap.machine.get(k) else None
                          for k in ("kernel", "initrd"))
        working = _push_working_set(objects, store, snap, digests, blobs, report) if working_set else None
        fault_point("push:before manifest")
        manifest = Manifest(target, snap.vm, snap.parent, snap.size, chunk_bytes, levels, root.hex(), state,
                            kernel, initrd, snap.machine, snap.created, time.time(), len(digests),
                            report.chunks - report.chunks_zero, stored_bytes, working_set=working)
        objects.put(manifest_key(target), manifest.to_bytes())  # last: now the snapshot exists
        report.bytes_uploaded = objects.bytes_out
        report.seconds = time.monotonic() - t0
        return report
    finally:
        store.close()


def _push_chunks(store: Store, snap: Snapshot, objects: ObjectStore, chunk_bytes: int,
                 report: PushReport) -> tuple[np.ndarray, int]:
    """Every chunk's digest (zero rows for zero chunks); uploads those the store lacks,
    UPLOADERS at a time. Returns the digests and the stored (compressed) bytes."""
    per = chunk_bytes // PAGE
    n = snap.size // chunk_bytes
    entries = resolve(store.tables, snap.root, snap.levels, 0, snap.pages)
    have = dict(objects.list("chunks"))
    digests = np.zeros((n, DIGEST), dtype=np.uint8)
    fds: dict[int, int] = {}
    queued: set[str] = set()
    inflight: list[Future] = []  # uploads not waited for yet: at most UPLOADERS * 4 chunks in memory
    stored = 0

    def fd_of(file_id: int) -> int:
        if file_id not in fds:
            source = store.frame_source(file_id)
            if source is not None:  # a snapshot fetched lazily here: every chunk fetched first
                LazyFrames(store.frame_file(file_id), source).ensure_all()
            fds[file_id] = os.open(store.frame_file(file_id), os.O_RDONLY)
        return fds[file_id]

    def upload(hexname: str, data: bytes) -> int:
        body = compress(data)
        objects.put(chunk_key(hexname), body)
        return len(body)

    try:
        with ThreadPoolExecutor(UPLOADERS) as pool:
            for i in range(n):
                part = entries[i * per:(i + 1) * per]
                if not part.any():
                    report.chunks_zero += 1
                    continue
                data, _ = read_frames(part, fd_of)
                if not np.frombuffer(data, dtype=np.uint64).any():  # frames that hold zeros
                    report.chunks_zero += 1
                    continue
                d = digest(data)
                digests[i] = np.frombuffer(d, dtype=np.uint8)
                hexname = d.hex()
                if hexname in queued:  # the same content earlier in this snapshot
                    continue
                queued.add(hexname)
                if hexname in have:
                    stored += have[hexname]
                else:
                    inflight.append(pool.submit(upload, hexname, data))
                    report.chunks_uploaded += 1
                    report.pages_uploaded += per
                    while len(inflight) >= UPLOADERS * 4:
                        stored += inflight.pop(0).result()
            for f in inflight:
                stored += f.result()
    finally:
        for fd in fds.values():
            os.close(fd)
    report.chunks = n
    fault_point("push:chunks uploaded")
    return digests, stored


def _push_working_set(objects: ObjectStore, store: Store, snap: Snapshot, digests: np.ndarray, have: set[str],
                      report: PushReport) -> Blob | None:
    """The stored chunks the snapshot's first children read in their first seconds
    (recorded by the memory server), as sorted uint32 chunk indices: a remote fork
    prefetches them. Zero chunks are left out: nothing to fetch."""
    pages = store.working_set(snap.name)
    if pages is None:
        return None
    per = snap.size // len(digests) // PAGE
    chunks = np.unique(pages.astype(np.int64) // per)
    chunks = chunks[chunks < len(digests)]
    chunks = chunks[digests[chunks].any(axis=1)].astype("<u4")
    report.working_set_chunks = len(chunks)
    return _upload_blob(objects, chunks.tobytes(), have, report)


def _push_blob(objects: ObjectStore, path: Path, have: set[str], report: PushReport) -> Blob:
    """Uploads the file at `path` unless the store has it (`have`: blob names listed)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise HvkitError(f"{path} cannot be read ({e.strerror}); the snapshot needs it") from None
    return _upload_blob(objects, data, have, report)


def _upload_blob(objects: ObjectStore, data: bytes, have: set[str], report: PushReport) -> Blob:
    """`data` as a blob named by its hash, uploaded unless the store has it."""
    hexname = digest(data).hex()
    if hexname not in have:
        objects.put(blob_key(hexname), compress(data))
        have.add(hexname)
        report.blobs_uploaded += 1
    return Blob(hexname, len(data))


# ---- ls and rm --------------------------------------------------------------------------

def list_snapshots(url: str, endpoint: str | None = None) -> list[Manifest]:
    objects = ObjectStore(StoreURL.parse(url), endpoint)
    out = []
    for key, _ in objects.list("snapshots"):
        if key.endswith(".json") and "/" not in key:
            out.append(Manifest.from_bytes(objects.get(f"snapshots/{key}"), f"{objects.url}/snapshots/{key}"))
    return sorted(out, key=lambda m: m.pushed)


def remove_snapshot(url: str, name: str, endpoint: str | None = None) -> dict:
    """Removes snapshot `name`: its manifest first (from then on it does not exist),
    then every chunk, table and blob no other snapshot of the store uses. Not to be run
    while a push to the same store is under way (it may count on a chunk this removes)."""
    objects = ObjectStore(StoreURL.parse(url), endpoint)
    check_name(name)
    try:
        objects.get(manifest_key(name))
    except NotFound:
        raise HvkitError(f"the store {objects.url} has no snapshot named {name!r}",
                         "see 'hvkit snapshot ls --store ...'") from None
    objects.delete([manifest_key(name)])
    keep_chunks, keep_tables, keep_blobs = set(), set(), set()
    for m in list_snapshots(url, endpoint):
        keep_blobs.update(b.sha256 for b in (m.state, m.kernel, m.initrd, m.working_set) if b)
        _reachable(objects, m, keep_tables, keep_chunks)
    gone = {"chunks": [k for k, _ in objects.list("chunks") if k not in keep_chunks],
            "tables": [k for k, _ in objects.list("tables") if k not in keep_tables],
            "blobs": [k for k, _ in objects.list("blobs") if k not in keep_blobs]}
    objects.delete([f"{sub}/{k}" for sub, keys in gone.items() for k in keys])
    return {"removed": name, **{f"{sub}_deleted": len(keys) for sub, keys in gone.items()}}


def _reachable(objects: ObjectStore, m: Manifest, tables: set[str], chunks: set[str]) -> None:
    from hvkit.remote.fetch import fetch_table

    todo = [(m.root, m.levels - 1)]
    while todo:
        hexname, level = todo.pop()
        if hexname in tables or hexname == "00" * DIGEST:
            continue
        tables.add(hexname)
        for d in table_entries(fetch_table(objects, hexname)):
            if d != bytes(DIGEST):
                (todo.append((d.hex(), level - 1)) if level > 0 else chunks.add(d.hex()))
