"""`hvkit fork --snapshot s3://BUCKET/PREFIX/NAME`: children on this host of a snapshot
pushed from any host.

This is the first step of the design in docs/remote.md: the fork fetches the
manifest, then the tables from the top level down, then every chunk the snapshot
stores, before the children start (not yet on the children's first reads). What it
fetches goes through this host's cache (`$HVKIT_CACHE/remote/objects/<sha256>`,
compressed as stored), which every fork on this host shares: a cached object is never
fetched again. Every object is checked against its hash, when fetched and when read
from the cache; a damaged one is fetched again, so a child never reads a wrong page.

The chunks are written into a RAM file in the memory server's store, which then
seals it as a local snapshot (`Store.freeze_ram_file`, as a fork of a VM does): the
local memory server serves it to the children as it serves any snapshot. The
snapshot stays in the store, so the next fork of the same manifest on this host
fetches nothing. Zero chunks stay holes of that file (they cost no memory).

Killed at any moment, a fetch leaves no snapshot: the RAM file is built under a name
carrying the process's tag (`frames/.import-<pid>.<start>.ram`, removed by the next
command once its maker is gone, hvkit.leftovers) and the device state as a fork's staged state
(hvkit.leftovers), and the store seals it only when whole.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hvkit.config import Paths, make_private_dir
from hvkit.errors import HvkitError
from hvkit.forking import ChildStarted, child_names, start_children
from hvkit.forking.forker import ChildCallback, new_fork_id
from hvkit.leftovers import IMPORT_PREFIX, process_tag, remove_fetch_leftovers, remove_staged_states
from hvkit.memserver import MemServer, Snapshot, Store
from hvkit.qemu.ownership import fault_point
from hvkit.remote.layout import (DIGEST, TABLE_RAW, Blob, Manifest, blob_key, chunk_key,
                                 decompress_checked, digest, manifest_key, table_entries, table_key)
from hvkit.remote.objects import NotFound, ObjectStore, StoreURL

log = logging.getLogger(__name__)
FETCHERS = 8
ZERO_HEX = "00" * DIGEST


@dataclass
class FetchReport:
    url: str
    snapshot: str  # the local snapshot it became
    reused: bool  # fetched before on this host: nothing fetched now
    chunks: int = 0  # chunks of the snapshot that are not zero
    chunks_fetched: int = 0  # of those, fetched from the store (the rest came from the cache)
    tables_fetched: int = 0
    bytes_fetched: int = 0  # compressed bytes from the store
    fetch_seconds: float = 0.0
    children: list[ChildStarted] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class ObjectCache:
    """This host's cache of a store's objects, by hash (shared by every fork here)."""

    root: Path

    @classmethod
    def of(cls, paths: Paths) -> "ObjectCache":
        return cls(make_private_dir(paths.cache / "remote" / "objects"))

    def path(self, hexname: str) -> Path:
        return self.root / hexname

    def get(self, objects: ObjectStore, key: str, hexname: str, limit: int) -> tuple[bytes, bool]:
        """(the object's uncompressed bytes, whether it was fetched from the store)."""
        cached = self.path(hexname)
        try:
            return decompress_checked(cached.read_bytes(), hexname, limit), False
        except FileNotFoundError:
            pass
        except ValueError as e:
            log.warning("cached %s is damaged (%s): fetched again", cached, e)
            cached.unlink(missing_ok=True)
        got: list[bytes] = []
        body = objects.get(key, check=lambda b: got.append(decompress_checked(b, hexname, limit)))
        # a name of this thread's own (two threads may fetch the same chunk), ending in
        # the process's tag (hvkit.leftovers removes it once the process is gone)
        tmp = cached.with_name(f".{hexname}-{threading.get_ident()}.{process_tag()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        tmp.replace(cached)  # whole or not there
        return got[-1], True


def fetch_table(objects: ObjectStore, hexname: str, cache: ObjectCache | None = None) -> bytes:
    """A table's raw bytes (through `cache` if given), checked against its hash."""
    if cache is not None:
        return cache.get(objects, table_key(hexname), hexname, TABLE_RAW)[0]
    got: list[bytes] = []
    objects.get(table_key(hexname), check=lambda b: got.append(decompress_checked(b, hexname, TABLE_RAW)))
    return got[-1]


def read_manifest(objects: ObjectStore, name: str) -> tuple[Manifest, str]:
    """The manifest of `name` and its own hash (what names a fetch of it on this host)."""
    try:
        body = objects.get(manifest_key(name))
    except NotFound:
        raise HvkitError(f"the store {objects.url} has no snapshot named {name!r}",
                         "see 'hvkit snapshot ls --store ...'") from None
    return Manifest.from_bytes(body, f"{objects.url}/{manifest_key(name)}"), digest(body).hex()


def chunk_list(objects: ObjectStore, cache: ObjectCache, m: Manifest, report: FetchReport) -> list[tuple[int, str]]:
    """(chunk index, hash) of every stored chunk, walking the tables from the top."""
    out: list[tuple[int, str]] = []
    todo = [(m.root, m.levels - 1, 0)]
    while todo:
        hexname, level, base = todo.pop()
        if hexname == ZERO_HEX:
            continue
        raw, fetched = cache.get(objects, table_key(hexname), hexname, TABLE_RAW)
        report.tables_fetched += fetched
        span = 512 ** level
        for i, d in enumerate(table_entries(raw)):
            if d == bytes(DIGEST):
                continue
            if level == 0:
                out.append((base + i, d.hex()))
            else:
                todo.append((d.hex(), level - 1, base + i * span))
    chunks = m.size // m.chunk_bytes
    if any(i >= chunks for i, _ in out):
        raise HvkitError(f"the snapshot {m.name} in {objects.url} maps chunks past its size; it is damaged")
    return sorted(out)


def import_snapshot(paths: Paths, url: str, endpoint: str | None = None) -> tuple[Snapshot, FetchReport]:
    """The local snapshot of remote snapshot `url`: fetched now, or found from before."""
    store_url, name = StoreURL.parse_snapshot(url)
    objects = ObjectStore(store_url, endpoint)
    t0 = time.monotonic()
    manifest, manifest_hash = read_manifest(objects, name)
    fork_id = f"remote-{manifest_hash[:32]}"
    server = MemServer.of(paths)
    make_private_dir(server.root)
    store = Store(server.store_path)
    try:
        with store.lock():
            done = store.snapshot_of_fork(fork_id)
        if done is not None:
            return done, FetchReport(url, done.name, True)
        report = FetchReport(url, "", False)
        snap = _fetch_into(store, objects, manifest, fork_id, paths, report)
        report.snapshot = snap.name
        report.bytes_fetched = objects.bytes_in
        report.fetch_seconds = time.monotonic() - t0
        return snap, report
    finally:
        store.close()


def _fetch_into(store: Store, objects: ObjectStore, m: Manifest, fork_id: str, paths: Paths,
                report: FetchReport) -> Snapshot:
    cache = ObjectCache.of(paths)
    remove_fetch_leftovers(paths.runtime, paths.cache)
    remove_staged_states(paths.runtime)
    chunks = chunk_list(objects, cache, m, report)
    report.chunks = len(chunks)
    ram = store.path / "frames" / f"{IMPORT_PREFIX}{process_tag()}.ram"
    state = store.staged_state(new_fork_id())
    try:
        fd = os.open(ram, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, m.size)  # zero chunks stay holes

            def one(item: tuple[int, str]) -> bool:
                index, hexname = item
                data, fetched = cache.get(objects, chunk_key(hexname), hexname, m.chunk_bytes)
                if len(data) != m.chunk_bytes:
                    raise HvkitError(f"chunk {hexname[:12]}... of {m.name} has {len(data)} bytes, not "
                                     f"{m.chunk_bytes}; the store is damaged")
                os.pwrite(fd, data, index * m.chunk_bytes)
                return fetched

            with ThreadPoolExecutor(FETCHERS) as pool:
                report.chunks_fetched = sum(pool.map(one, chunks))
        finally:
            os.close(fd)
        fault_point("fetch:chunks written")
        _write_blob(cache, objects, m.state, state)
        machine = dict(m.machine)
        for key in ("kernel", "initrd"):
            blob: Blob | None = getattr(m, key)
            if blob is not None:
                machine[key] = str(_blob_file(cache, objects, blob, paths))
        with store.lock():
            done = store.snapshot_of_fork(fork_id)  # another fetch of it finished meanwhile
            if done is not None:
                return done
            frozen = store.frozen_path(fork_id)
            os.rename(ram, frozen)
            fault_point("fetch:before seal")
            return store.freeze_ram_file(frozen, m.size, m.vm, state, machine, fork_id)
    finally:
        ram.unlink(missing_ok=True)
        state.unlink(missing_ok=True)


def _write_blob(cache: ObjectCache, objects: ObjectStore, blob: Blob, dest: Path) -> None:
    data, _ = cache.get(objects, blob_key(blob.sha256), blob.sha256, max(blob.bytes, 1))
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _blob_file(cache: ObjectCache, objects: ObjectStore, blob: Blob, paths: Paths) -> Path:
    """A file of this host holding `blob` (a kernel, an initramfs): kept in the cache."""
    dest = make_private_dir(paths.cache / "remote" / "files") / blob.sha256
    if not dest.exists() or dest.stat().st_size != blob.bytes:
        tmp = dest.with_name(f".{blob.sha256}.{process_tag()}")
        _write_blob(cache, objects, blob, tmp)
        tmp.replace(dest)
    return dest


def fork_remote(url: str, n: int, paths: Paths | None = None, endpoint: str | None = None,
                on_child: ChildCallback | None = None) -> FetchReport:
    """Starts `n` children on this host of remote snapshot `url`."""
    paths = paths or Paths.from_env()
    t0 = time.monotonic()
    snap, report = import_snapshot(paths, url, endpoint)
    names = child_names(snap.vm, n, paths)
    server = MemServer.of(paths)
    pid = server.start()
    report.children = start_children(snap, names, server, pid, snap.vm, paths, t0, on_child)
    return report
