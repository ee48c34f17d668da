"""A fetched snapshot's chunks on first read: the memory server's reader of a remote
snapshot (docs/remote.md#lazy-fetch).

`hvkit fork --snapshot s3://...` (fetch.py) fetches the manifest, the top-level table
and the device state, and seals a local snapshot over a sparse RAM file
(`frames/remote-<hash>.ram`) beside two files:

    remote-<hash>.source.json   names this reader and the store, the cache and the manifest
    remote-<hash>.present       one byte per chunk: 1 once its bytes are in the RAM file

The memory server (hvkit.memserver.server) finds the source file of a frame file and
imports the reader it names (it never imports hvkit.remote itself); before it serves
a read, `ensure` makes the chunks under it present: their leaf tables and their bytes
fetched through this host's cache (so a chunk any fork here fetched before is not
fetched again), each checked against its hash, written into the RAM file, and only
then marked present. A chunk that cannot be fetched (after the retries of
objects.py) fails the read: QEMU then stops the child; it never reads a wrong page.

A snapshot pushed with a working set (the chunks its first children read in their
first seconds on the host that made it) has it prefetched in the background as soon
as the server first serves the snapshot here.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import numpy as np

from hvkit.remote.cache import ObjectCache
from hvkit.remote.layout import DIGEST, TABLE_RAW, Manifest, chunk_key, table_entries, table_key
from hvkit.remote.objects import ObjectStore, StoreURL

log = logging.getLogger(__name__)
READER = "hvkit.remote.lazy:LazyFrames"
ZERO = bytes(DIGEST)
PREFETCHERS = 4


def source_file(frame_file: Path) -> Path:
    return frame_file.with_name(frame_file.name.split(".", 1)[0] + ".source.json")


def present_file(frame_file: Path) -> Path:
    return frame_file.with_name(frame_file.name.split(".", 1)[0] + ".present")


class LazyFrames:
    """The chunks of one fetched snapshot, made present on demand (thread-safe: the
    memory server's FUSE loop calls `ensure` from several threads)."""

    def __init__(self, frame_file: Path, config: dict) -> None:
        self.manifest = Manifest.from_bytes(config["manifest"].encode(), str(source_file(frame_file)))
        self.objects = ObjectStore(StoreURL.parse(config["store"]), config.get("endpoint"))
        self.cache = ObjectCache(Path(config["cache"]))
        self.per_chunk = self.manifest.chunk_bytes // 4096
        self._fd = os.open(frame_file, os.O_RDWR | os.O_CLOEXEC)
        self._present_fd = os.open(present_file(frame_file), os.O_RDWR | os.O_CLOEXEC)
        chunks = self.manifest.size // self.manifest.chunk_bytes
        self.present = np.frombuffer(bytearray(os.pread(self._present_fd, chunks, 0).ljust(chunks, b"\0")),
                                     dtype=np.uint8)
        self._tables: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._busy: dict[int, threading.Lock] = {}
        self.fetched = 0
        self.prefetched = 0  # chunks of the working set made present in the background
        if self.manifest.working_set is not None and not self.present.all():
            threading.Thread(target=self._prefetch, name="hvkit-prefetch", daemon=True).start()

    def _prefetch(self) -> None:
        """The snapshot's working set, PREFETCHERS chunks at a time, while the children run
        (a read that needs a chunk first fetches it itself; the two never fetch it twice)."""
        from concurrent.futures import ThreadPoolExecutor

        from hvkit.remote.layout import blob_key

        try:
            ws = self.manifest.working_set
            data = self.cache.get(self.objects, blob_key(ws.sha256), ws.sha256, max(ws.bytes, 1))[0]
            chunks = np.frombuffer(data, dtype="<u4").astype(np.int64)
            chunks = chunks[chunks < len(self.present)]

            def one(chunk: int) -> None:
                if not self.present[chunk] and self._make_present(chunk):
                    self.prefetched += 1

            with ThreadPoolExecutor(PREFETCHERS) as pool:
                list(pool.map(one, chunks.tolist()))
        except Exception as e:  # the children's own reads still fetch what they need
            log.warning("prefetch of %s stopped: %s", self.manifest.name, e)

    def ensure(self, pages: np.ndarray) -> None:
        """Makes the chunks under frame-file pages `pages` present (fetching what is not)."""
        for chunk in np.unique(pages // self.per_chunk).tolist():
            if not self.present[chunk]:
                self._make_present(int(chunk))

    def ensure_all(self) -> None:
        self.ensure(np.arange(0, self.manifest.size // 4096, self.per_chunk, dtype=np.int64))

    def _make_present(self, chunk: int) -> bool:
        """Whether this call made chunk `chunk` present (False: it was, or another did)."""
        with self._lock:
            busy = self._busy.setdefault(chunk, threading.Lock())
        with busy:  # one fetch per chunk; the others wait for it
            if self.present[chunk]:
                return False
            hexname = self._digest(chunk)
            if hexname is not None:
                data, fetched = self.cache.get(self.objects, chunk_key(hexname), hexname, self.manifest.chunk_bytes)
                if len(data) != self.manifest.chunk_bytes:
                    raise ValueError(f"chunk {hexname[:12]}... has {len(data)} bytes")
                os.pwrite(self._fd, data, chunk * self.manifest.chunk_bytes)
                self.fetched += fetched
            os.pwrite(self._present_fd, b"\1", chunk)  # after its bytes: a crash in between fetches again
            self.present[chunk] = 1
            return True

    def _digest(self, chunk: int) -> str | None:
        """The hash of chunk `chunk`, walking the tables from the top (each fetched once),
        or None for a zero chunk."""
        hexname = self.manifest.root
        for level in range(self.manifest.levels - 1, -1, -1):
            if hexname == ZERO.hex():
                return None
            raw = self._table(hexname)
            index = (chunk // 512 ** level) % 512
            hexname = table_entries(raw)[index].hex()
        return None if hexname == ZERO.hex() else hexname

    def _table(self, hexname: str) -> bytes:
        raw = self._tables.get(hexname)
        if raw is None:
            raw = self.cache.get(self.objects, table_key(hexname), hexname, TABLE_RAW)[0]
            self._tables[hexname] = raw
        return raw


def write_source(frame_file: Path, url: str, endpoint: str | None, cache: Path, manifest: bytes) -> None:
    """The source and presence files of a lazily fetched RAM file (fetch.py, before it
    seals the snapshot over it)."""
    chunks = Manifest.from_bytes(manifest, url).size // Manifest.from_bytes(manifest, url).chunk_bytes
    for path, data in ((present_file(frame_file), bytes(chunks)),
                       (source_file(frame_file), json.dumps({"reader": READER, "store": url, "endpoint": endpoint,
                                                             "cache": str(cache), "manifest": manifest.decode()}).encode())):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
