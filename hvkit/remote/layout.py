"""How a snapshot lies in an object store: content-addressed chunks, tables, a manifest.

    PREFIX/chunks/<sha256>        one chunk of guest RAM (`chunk_bytes`, 64 KiB by default:
                                  16 pages), zstd-compressed; named by the SHA-256 of its
                                  uncompressed bytes. A chunk of zero pages is never stored.
    PREFIX/tables/<sha256>        one table: 512 SHA-256 digests (16 KiB), zstd; named by the
                                  hash of its bytes. An all-zero digest is a chunk (or a whole
                                  table) of zeros.
    PREFIX/blobs/<sha256>         a file that travels with a snapshot: its device state, the
                                  guest's kernel and initramfs, its working set (the chunks its
                                  first children read first); zstd, named by the hash of the
                                  uncompressed file.
    PREFIX/snapshots/<name>.json  the manifest: what the snapshot is (size, levels, the root
                                  table's hash, the blobs' hashes, the VM's spec); written
                                  last, so a push cut short leaves no snapshot anyone sees.

The tables mirror the memory server's multi-level table (hvkit.memserver.table) one
step up: a leaf entry covers a chunk instead of a page, and an entry of level k covers
512**k chunks. Everything but the manifest is immutable and named by its content: a
snapshot of a forked VM shares every unchanged chunk and table with its parent, and its
push uploads only those the store lacks; a reader checks every object against its name.

zstd (the `zstandard` package hvkit already uses for kernels): level 3 compresses a
guest page at hundreds of MB/s and decompresses at over 1 GB/s, so it costs little
next to a round trip, and it packs the zero pages inside a chunk into a few bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import zstandard

from hvkit.memserver.table import FANOUT, levels_for

DIGEST = 32
ZERO_DIGEST = bytes(DIGEST)
TABLE_RAW = FANOUT * DIGEST
DEFAULT_CHUNK_BYTES = 64 * 1024
FORMAT = "hvkit-snapshot/1"


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def decompress_checked(body: bytes, hexname: str, limit: int) -> bytes:
    """The bytes of object `hexname` from its compressed `body`; ValueError unless they
    hash to its name (a damaged or wrong object is never used)."""
    try:
        data = zstandard.ZstdDecompressor().decompress(body, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise ValueError(f"object {hexname[:12]}... does not decompress ({e})") from None
    if digest(data).hex() != hexname:
        raise ValueError(f"object {hexname[:12]}... does not match its hash")
    return data


def chunk_key(hexname: str) -> str:
    return f"chunks/{hexname}"


def table_key(hexname: str) -> str:
    return f"tables/{hexname}"


def blob_key(hexname: str) -> str:
    return f"blobs/{hexname}"


def manifest_key(name: str) -> str:
    return f"snapshots/{name}.json"


@dataclass
class Blob:
    sha256: str
    bytes: int


@dataclass
class Manifest:
    name: str
    vm: str  # the VM the snapshot was taken of
    parent: str | None  # its parent snapshot's name where it was made (information only)
    size: int  # bytes of guest RAM
    chunk_bytes: int
    levels: int  # levels of tables over the chunks (2 or more)
    root: str  # SHA-256 of the top-level table
    state: Blob  # the device state
    kernel: Blob | None
    initrd: Blob | None
    machine: dict  # the VM's spec (hvkit.qemu.runtime.VMSpec as a dict) where it was made
    created: float
    pushed: float
    chunks: int = 0  # chunks of the guest's RAM
    chunks_nonzero: int = 0  # of those, chunks stored (the rest are all zeros)
    stored_bytes: int = 0  # compressed bytes of those chunks
    format: str = FORMAT
    working_set: Blob | None = None  # uint32 chunk indices a remote fork prefetches
    extra: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_bytes(cls, body: bytes, where: str) -> "Manifest":
        try:
            d = json.loads(body)
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r}, hvkit reads {FORMAT!r}")
            for k in ("state", "kernel", "initrd", "working_set"):
                d[k] = Blob(**d[k]) if d.get(k) else None
            m = cls(**d)
            if m.chunk_bytes <= 0 or m.chunk_bytes % 4096 or m.size <= 0 or m.size % m.chunk_bytes:
                raise ValueError("impossible sizes")
            if m.levels != levels_for(-(-m.size // m.chunk_bytes)) or len(bytes.fromhex(m.root)) != DIGEST:
                raise ValueError("its tables do not fit its size")
            return m
        except (ValueError, TypeError, AttributeError) as e:
            from hvkit.errors import HvkitError
            raise HvkitError(f"the manifest {where} is damaged or not hvkit's ({e})") from None


def build_tables(chunk_digests: np.ndarray) -> tuple[int, bytes, dict[str, bytes]]:
    """(levels, root digest, {hex digest: raw table}) over `chunk_digests` ((n, 32)
    uint8, zero rows for zero chunks). All-zero tables are not kept: an all-zero
    digest stands for them."""
    levels = levels_for(len(chunk_digests))
    tables: dict[str, bytes] = {}
    level = chunk_digests
    for _ in range(levels):
        n = -(-len(level) // FANOUT)
        padded = np.zeros((n * FANOUT, DIGEST), dtype=np.uint8)
        padded[:len(level)] = level
        above = np.zeros((n, DIGEST), dtype=np.uint8)
        for i in range(n):
            raw = padded[i * FANOUT:(i + 1) * FANOUT].tobytes()
            if raw.count(0) == len(raw):
                continue
            d = digest(raw)
            tables[d.hex()] = raw
            above[i] = np.frombuffer(d, dtype=np.uint8)
        level = above
    assert len(level) == 1
    return levels, level[0].tobytes(), tables


def table_entries(raw: bytes) -> list[bytes]:
    """The 512 digests of a raw table."""
    return [raw[i * DIGEST:(i + 1) * DIGEST] for i in range(FANOUT)]
