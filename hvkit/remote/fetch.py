"""`hvkit fork --snapshot s3://BUCKET/PREFIX/NAME`: children on this host of a snapshot
pushed from any host.

Lazy (the default): the fork fetches the manifest, the top-level table and the device
state, and seals a local snapshot over a sparse RAM file that the memory server fills
on the children's first reads (lazy.py): lower tables and chunks are fetched when a
read first falls under them. `--fetch all`: the fork fetches every table and chunk
first (8 requests at a time), and the children read nothing from the store.

Either way, what is fetched goes through this host's cache (cache.py), which every
fork and the memory server share: a cached object is never fetched again. Every
object is checked against its hash, when fetched and when read from the cache; a
damaged one is fetched again, so a child never reads a wrong page.

The sealed snapshot (`Store.freeze_ram_file`, as a VM's first fork makes one) is
served by the local memory server as any snapshot is, and stays: the next fork of the
same manifest on this host starts its children from it. Zero chunks stay holes of the
RAM file (they cost no memory).

Killed at any moment, a fetch leaves no snapshot: the RAM file is built under a name
carrying the process's tag (`frames/.import-<pid>.<start>.ram`), the device state as
a fork's staged state, and the store seals it only when whole, under its lock; the
next hvkit command removes what a killed fetch left (hvkit.leftovers).
"""

from __future__ import annotations

import logging
import os
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
from hvkit.remote.cache import ObjectCache
from hvkit.remote.lazy import write_source
from hvkit.remote.objects import NotFound, ObjectStore, StoreURL

log = logging.getLogger(__name__)
FETCHERS = 8
ZERO_HEX = "00" * DIGEST


@dataclass
class FetchReport:
    url: str
    snapshot: str  # the local snapshot it became
    reused: bool  # fetched before on this host: nothing fetched now
    lazy: bool = True  # chunks fetched on first read (by the memory server), not by the fork
    chunks: int = 0  # chunks fetched or found in the cache by the fork (lazy: none)
    chunks_fetched: int = 0  # of those, fetched from the store (the rest came from the cache)
    tables_fetched: int = 0
    bytes_fetched: int = 0  # compressed bytes from the store
    fetch_seconds: float = 0.0
    children: list[ChildStarted] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def fetch_table(objects: ObjectStore, hexname: str, cache: ObjectCache | None = None) -> bytes:
    """A table's raw bytes (through `cache` if given), checked against its hash."""
    if cache is not None:
        return cache.get(objects, table_key(hexname), hexname, TABLE_RAW)[0]
    got: list[bytes] = []
    objects.get(table_key(hexname), check=lambda b: got.append(decompress_checked(b, hexname, TABLE_RAW)))
    return got[-1]


def read_manifest(objects: ObjectStore, name: str, with_body: bool = False):
    """The manifest of `name` and its own hash (what names a fetch of it on this host),
    and with `with_body` its bytes."""
    try:
        body = objects.get(manifest_key(name))
    except NotFound:
        raise HvkitError(f"the store {objects.url} has no snapshot named {name!r}",
                         "see 'hvkit snapshot ls --store ...'") from None
    manifest = Manifest.from_bytes(body, f"{objects.url}/{manifest_key(name)}")
    return (manifest, digest(body).hex(), body) if with_body else (manifest, digest(body).hex())


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


def import_snapshot(paths: Paths, url: str, endpoint: str | None = None,
                    lazy: bool = True) -> tuple[Snapshot, FetchReport]:
    """The local snapshot of remote snapshot `url`: made now, or found from before.
    `lazy`: its chunks are fetched on first read (lazy.py); else all of them now."""
    store_url, name = StoreURL.parse_snapshot(url)
    objects = ObjectStore(store_url, endpoint)
    t0 = time.monotonic()
    manifest, manifest_hash, body = read_manifest(objects, name, with_body=True)
    fork_id = f"remote-{manifest_hash[:32]}"
    server = MemServer.of(paths)
    make_private_dir(server.root)
    store = Store(server.store_path)
    try:
        with store.lock():
            done = store.snapshot_of_fork(fork_id)
        if done is not None:
            return done, FetchReport(url, done.name, True)
        report = FetchReport(url, "", False, lazy=lazy)
        source = (str(store_url), endpoint, body) if lazy else None
        snap = _fetch_into(store, objects, manifest, fork_id, paths, report, source)
        report.snapshot = snap.name
        report.bytes_fetched = objects.bytes_in
        report.fetch_seconds = time.monotonic() - t0
        return snap, report
    finally:
        store.close()


def _fetch_into(store: Store, objects: ObjectStore, m: Manifest, fork_id: str, paths: Paths,
                report: FetchReport, source: tuple[str, str | None, bytes] | None) -> Snapshot:
    """Fetches snapshot `m` into `store` and seals it. With `source` (store URL,
    endpoint, manifest bytes), only its top-level table now, the rest on first read."""
    cache = ObjectCache.of(paths)
    remove_fetch_leftovers(paths.runtime, paths.cache)
    remove_staged_states(paths.runtime)
    if source is None:
        chunks = chunk_list(objects, cache, m, report)
    else:
        chunks = []
        if m.root != ZERO_HEX:  # the top level, fetched at the fork (lazy.py fetches the rest)
            report.tables_fetched += cache.get(objects, table_key(m.root), m.root, TABLE_RAW)[1]
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
            if source is not None:
                write_source(frozen, source[0], source[1], cache.root, source[2])
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
                on_child: ChildCallback | None = None, lazy: bool = True) -> FetchReport:
    """Starts `n` children on this host of remote snapshot `url` (`lazy`: they start
    at once, and the memory server fetches the chunks they read on first read)."""
    paths = paths or Paths.from_env()
    t0 = time.monotonic()
    snap, report = import_snapshot(paths, url, endpoint, lazy)
    names = child_names(snap.vm, n, paths)
    server = MemServer.of(paths)
    pid = server.start()
    report.children = start_children(snap, names, server, pid, snap.vm, paths, t0, on_child)
    return report
