"""The memory server's store: snapshots, their tables and the frames they point at.

    <store>/tables.bin            every table of every snapshot (table.py)
           files.json             frame file id -> file name under frames/
           frames/<id>.ram        a VM's RAM file, frozen (moved here, not copied)
           frames/<id>.pool       frames a child wrote, each stored once (pool.index)
           pool.index             (content hash, entry) pairs of the pool's frames, sorted
           pool.index.new         pairs added since, in the order stored (merged into
                                  pool.index once they are many)
           snapshots/<name>.json  one snapshot: size, levels, root table, counters, the
                                  machine it came from; written last, so it seals it
           snapshots/<name>.state the VM's device state (QEMU, without RAM)
           disks/<key>.qcow2      a VM's disk frozen at a fork (a read-only qcow2 layer):
                                  kept while a snapshot names it (hvkit.qemu.disk)
           lock                   writers take it (flock); readers never need it

Everything is plain files, so a restarted server finds every snapshot again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from hvkit.errors import HvkitError
from hvkit.memory import PAGE_SIZE
from hvkit.memory.base import consecutive_runs
from hvkit.memory.ramfile import punch_hole
from hvkit.config import make_private_dir
from hvkit.memserver.table import (FANOUT, FILE_MASK, FILE_SHIFT, FRAMES, KIND_SHIFT, PAGE_MASK, TableFile,
                                   TableWriter, frames_entry, levels_for, table_entry)

PAGE = PAGE_SIZE
SNAPSHOT_SUFFIX = ".ram"
# Odd multipliers of a per-page hash (a dot product of its 512 words); a match is
# always confirmed byte for byte, so this only has to spread well.
_HASH_K = (np.random.default_rng(0x68766B6974).integers(1, 2**63, 512, dtype=np.uint64) | np.uint64(1))


@dataclass
class Counters:
    """What a snapshot cost. A fork copies `metadata_copied` bytes (the top-level table)
    and nothing else; the rest is proportional to the pages the VM wrote."""

    metadata_copied: int = 0  # bytes copied at fork
    tables_written: int = 0  # tables this snapshot added to the store
    tables_replicated: int = 0  # lower tables copied because a write needed them
    runs_split: int = 0  # large entries turned into a table because a write fell under them
    pages_written: int = 0  # pages the VM wrote since its own snapshot
    pages_stored: int = 0  # of those: new frames in the pool
    pages_deduplicated: int = 0  # of those: same content as a frame stored before
    pages_zero: int = 0  # of those: all zeros, pointed at the zero frame


@dataclass
class Snapshot:
    name: str
    vm: str  # the VM it was taken of
    parent: str | None  # the snapshot that VM ran from, if any
    size: int  # bytes of guest RAM
    levels: int
    root: int  # top-level table id
    created: float
    machine: dict  # the VM's spec (hvkit.qemu.runtime.VMSpec as a dict)
    counters: Counters = field(default_factory=Counters)
    fork_id: str | None = None  # the fork that made it (a fork's recovery finds it by this)

    @property
    def pages(self) -> int:
        return self.size // PAGE

    @property
    def file_name(self) -> str:
        return self.name + SNAPSHOT_SUFFIX

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Snapshot":
        d = dict(d)
        d["counters"] = Counters(**d.get("counters", {}))
        return cls(**d)


def state_file(store: Path, name: str) -> Path:
    """Where the store at `store` keeps the device state of snapshot `name`."""
    return store / "snapshots" / f"{name}.state"


def disk_layer(store: Path, key: str) -> Path:
    """Where the store at `store` keeps a disk frozen by fork `key`."""
    return store / "disks" / f"{key}.qcow2"


def snapshot_disks(store: Path) -> list[Path]:
    """The frozen disk of every snapshot in the store at `store` that has one. Read
    without the store's lock or tables (a VM's clean-up asks it). A snapshot that
    cannot be read is an error: what it needs is unknown."""
    found = []
    for path in (store / "snapshots").glob("*.json"):
        try:
            disk = json.loads(path.read_text()).get("machine", {}).get("frozen_disk")
        except FileNotFoundError:
            continue
        except (OSError, ValueError, AttributeError) as e:
            raise HvkitError(f"snapshot {path} cannot be read ({e})") from None
        if disk:
            found.append(Path(disk))
    return found


def page_hashes(data: np.ndarray) -> np.ndarray:
    """One u64 per page of `data` ((n, 4096) bytes). A matrix-vector product (wrapping
    like the sum of products it is): no (n, 512) temporary, 30x faster than multiplying
    then summing; a fork of a VM that wrote 320 MiB hashes them inside its pause."""
    return data.view("<u8").reshape(len(data), 512) @ _HASH_K


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        make_private_dir(path)  # guest memory: its owner's alone
        for sub in ("frames", "snapshots"):
            make_private_dir(path / sub)
        self.tables = TableFile(path / "tables.bin")
        self._files: dict[int, str] = {}

    def close(self) -> None:
        self.tables.close()

    # ---- reading --------------------------------------------------------------------

    def snapshot(self, name: str) -> Snapshot:
        try:
            return Snapshot.from_json(json.loads(self._snapshot_json(name).read_text()))
        except FileNotFoundError:
            raise HvkitError(f"no snapshot named {name!r} in {self.path}",
                             "see 'hvkit memserver status' for the snapshots there are") from None
        except (ValueError, TypeError) as e:
            raise HvkitError(f"snapshot {name!r} in {self.path} is damaged ({e})",
                             "start over with 'hvkit memserver clear'") from None

    def snapshot_names(self) -> list[str]:
        """Names of the sealed snapshots, oldest first."""
        return sorted(p.stem for p in (self.path / "snapshots").glob("*.json"))

    def snapshots(self) -> list[Snapshot]:
        return [self.snapshot(n) for n in self.snapshot_names()]

    def state_file(self, name: str) -> Path:
        return state_file(self.path, name)

    def frame_file(self, file_id: int) -> Path:
        """The file holding frames of `file_id` (files.json is read again for a new id)."""
        if file_id not in self._files:
            self._files = self._read_files()
        try:
            return self.path / "frames" / self._files[file_id]
        except KeyError:
            raise HvkitError(f"the memory server's store {self.path} has no frame file {file_id}",
                             "start over with 'hvkit memserver clear'") from None

    def working_set_file(self, name: str) -> Path:
        """The pages read from snapshot `name` in the first seconds of its first children
        (the memory server records them; uint32 page numbers)."""
        return self.path / "snapshots" / f"{name}.workingset"

    def working_set(self, name: str) -> np.ndarray | None:
        try:
            return np.fromfile(self.working_set_file(name), dtype="<u4")
        except FileNotFoundError:
            return None

    def save_working_set(self, name: str, pages: np.ndarray) -> None:
        path = self.working_set_file(name)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        with _open_private(tmp, "wb") as f:
            f.write(pages.astype("<u4").tobytes())
        tmp.replace(path)

    def frame_source(self, file_id: int) -> dict | None:
        """What fills frame file `file_id` on first read, if something does: a file whose
        frames come from elsewhere (a snapshot fetched lazily from an object store) has
        `<stem>.source.json` beside it naming the reader (`module:Class`) the server
        imports for it. The memory server never imports those readers by name."""
        path = self.frame_file(file_id)
        source = path.with_name(path.name.split(".", 1)[0] + ".source.json")
        try:
            return json.loads(source.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise HvkitError(f"{source} cannot be read ({e})", "the snapshot over it cannot be served") from None

    def frozen_path(self, fork_id: str) -> Path:
        """Where a fork moves a VM's RAM file (freeze_ram_file then seals it there)."""
        return self.path / "frames" / f"{fork_id}.ram"

    def staged_state(self, fork_id: str) -> Path:
        """Where a fork saves the VM's device state before its snapshot is sealed (the
        fork's journal names it; hvkit.leftovers removes one whose fork is gone)."""
        return self.path / "snapshots" / f".{fork_id}.state"

    def snapshot_of_fork(self, fork_id: str) -> Snapshot | None:
        """The sealed snapshot that fork `fork_id` made, if it got that far."""
        for snap in self.snapshots():
            if snap.fork_id == fork_id:
                return snap
        return None

    def frozen_ram_file(self, snap: Snapshot) -> Path:
        """The frozen RAM file under a snapshot made by freeze_ram_file."""
        first = int(self.tables.table(snap.root)[0])
        if first >> KIND_SHIFT != FRAMES:
            raise HvkitError(f"snapshot {snap.name} was not made from a RAM file")
        return self.frame_file((first >> FILE_SHIFT) & FILE_MASK)

    def _snapshot_json(self, name: str) -> Path:
        return self.path / "snapshots" / f"{name}.json"

    def _read_files(self) -> dict[int, str]:
        try:
            return {int(k): v for k, v in json.loads((self.path / "files.json").read_text()).items()}
        except FileNotFoundError:
            return {}

    # ---- writing (under the lock) ---------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with open(self.path / "lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _new_file(self, suffix: str, name: str | None = None) -> tuple[int, Path]:
        """A new frame file id, for `name` (default: '<id><suffix>'); a name registered
        already keeps its id (a fork's seal may be done again by its recovery)."""
        files = self._read_files()
        for file_id, known in files.items():
            if name is not None and known == name:
                return file_id, self.path / "frames" / known
        file_id = max(files, default=0) + 1
        files[file_id] = name or f"{file_id}{suffix}"
        _replace_private(self.path / "files.json", json.dumps(files, indent=1))
        self._files = files
        return file_id, self.path / "frames" / files[file_id]

    def _new_name(self, vm: str) -> str:
        taken = self.snapshot_names()
        seq = 1 + max((int(n.split("-", 1)[0]) for n in taken if n.split("-", 1)[0].isdigit()), default=0)
        return f"{seq:04d}-{vm}"

    def _seal(self, snap: Snapshot, state: Path) -> Snapshot:
        """Writes the snapshot's JSON last: before it, the snapshot does not exist. The
        saved state is linked to its name first and unlinked from its staged name only
        after, so a seal cut short can be done again from the same files."""
        final = self.state_file(snap.name)
        final.unlink(missing_ok=True)
        os.chmod(state, 0o600)  # device state: its owner's alone, whoever wrote it (QEMU does 0600)
        os.link(state, final)
        _replace_private(self._snapshot_json(snap.name), json.dumps(snap.to_json(), indent=1))
        state.unlink(missing_ok=True)
        return snap

    def freeze_ram_file(self, frozen: Path, size: int, vm: str, state: Path, machine: dict,
                        fork_id: str) -> Snapshot:
        """A snapshot of a VM's RAM file that a fork moved to `frozen` (frozen_path) once
        no QEMU maps it shared any more: one top-level table of large entries over it,
        whatever its size. Done again for the same fork, it returns the same snapshot."""
        done = self.snapshot_of_fork(fork_id)
        if done is not None:
            return done
        if not frozen.exists():
            raise HvkitError(f"the frozen RAM file {frozen} of fork {fork_id} is missing",
                             "nothing can be sealed; the store may have been cleared")
        os.chmod(frozen, 0o600)  # guest memory: its owner's alone (QEMU made it so already)
        file_id, _ = self._new_file(".ram", name=frozen.name)
        levels = levels_for(size // PAGE)
        span = FANOUT ** (levels - 1)
        top = np.zeros(FANOUT, dtype=np.uint64)
        runs = -(-(size // PAGE) // span)
        top[:runs] = np.uint64(frames_entry(file_id, 0)) + np.arange(runs, dtype=np.uint64) * np.uint64(span)
        root = self.tables.append(top)
        snap = Snapshot(self._new_name(vm), vm, None, size, levels, root, time.time(), machine,
                        Counters(tables_written=1), fork_id)
        return self._seal(snap, state)

    def fork_pages(self, parent: Snapshot, pages: np.ndarray, data: np.ndarray | Callable[[np.ndarray], None],
                   vm: str, state: Path, machine: dict, fork_id: str | None = None) -> Snapshot:
        """A snapshot of a VM that runs from `parent` and has since written `pages`
        (sorted page numbers): the parent's top-level table copied, then tables
        replicated under the written pages only. `data`: their contents ((n, 4096)
        bytes), or a function that reads them into the (n, 4096) array it is given,
        which is their place at the end of the store's pool: each page is faulted in
        once, where it stays (a fresh page is the expensive part of copying one)."""
        writer = TableWriter.fork(self.tables, parent.root, parent.levels)
        counters = Counters(metadata_copied=FANOUT * 8, pages_written=len(pages))
        fill = data if callable(data) else (lambda out: np.copyto(out, data))
        entries = self._store_frames(len(pages), fill, counters)
        writer.set_pages(pages.astype(np.uint64), entries)
        root, written = writer.seal()
        counters.tables_written = written
        counters.tables_replicated = writer.tables_replicated
        counters.runs_split = writer.runs_split
        snap = Snapshot(self._new_name(vm), vm, parent.name, parent.size, parent.levels, root,
                        time.time(), machine, counters, fork_id)
        return self._seal(snap, state)

    def _store_frames(self, n: int, fill: Callable[[np.ndarray], None], counters: Counters) -> np.ndarray:
        """Entries for `n` pages that `fill` writes at the end of the pool: zero pages ->
        ZERO, a page already in the pool (or twice among them) -> that frame, any other
        -> the frame it was written to. The frames of the first two kinds are punched
        out of the pool again (a hole: no memory, and no frame points there)."""
        entries = np.zeros(n, dtype=np.uint64)
        if n == 0:
            return entries
        pool_id, pool = self._pool()
        index = self._pool_index()
        base = np.uint64(frames_entry(pool_id, 0))
        with open(pool, "r+b") as f:
            start = os.fstat(f.fileno()).st_size // PAGE
            os.ftruncate(f.fileno(), (start + n) * PAGE)
            with mmap.mmap(f.fileno(), n * PAGE, offset=start * PAGE) as m:
                data = np.frombuffer(m, dtype=np.uint8).reshape(n, PAGE)
                fill(data)
                hashes = page_hashes(data)  # each page hashed once
                kept, repeats, firsts = _dedupe(data, hashes, entries, index, pool, counters)
                del data
            new = np.flatnonzero(kept)
            entries[new] = base + np.uint64(start) + new.astype(np.uint64)
            entries[repeats] = entries[firsts]
            gone = np.flatnonzero(~kept)  # zero and repeated pages: no frame of their own
            for a, b in zip(*consecutive_runs(gone)):
                punch_hole(f.fileno(), (start + int(gone[a])) * PAGE, int(gone[b - 1] - gone[a] + 1) * PAGE, pool)
        counters.pages_stored += len(new)
        if len(new):
            with _open_private(self.path / "pool.index.new", "ab") as f:
                f.write(np.stack([hashes[new], entries[new]], axis=1).astype("<u8").tobytes())
        return entries

    def _pool(self) -> tuple[int, Path]:
        for file_id, name in self._read_files().items():
            if name.endswith(".pool"):
                return file_id, self.path / "frames" / name
        file_id, path = self._new_file(".pool")
        path.touch(mode=0o600)
        return file_id, path

    def _pool_index(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The pool's (hashes, entries), each part sorted by hash: the sorted index, and
        what was added since (sorted here: it is small). Once the added part is an
        eighth of the whole, both are merged into the sorted file (the caller holds the
        store's lock), so no fork sorts the whole index again. (A merge cut short leaves
        pairs in both: a frame found twice is the same frame.)"""
        def pairs(name: str) -> np.ndarray:
            try:
                return np.fromfile(self.path / name, dtype="<u8").reshape(-1, 2)
            except (FileNotFoundError, ValueError):
                return np.zeros((0, 2), dtype="<u8")

        whole, added = pairs("pool.index"), pairs("pool.index.new")
        added = added[np.argsort(added[:, 0], kind="stable")]
        unsorted = bool((whole[1:, 0] < whole[:-1, 0]).any())  # a store of before this layout
        if unsorted or len(added) > max(4096, len(whole) // 8):
            whole = np.concatenate([whole, added])
            whole = whole[np.argsort(whole[:, 0], kind="stable")]
            tmp = self.path / f".pool.index.{os.getpid()}"
            with _open_private(tmp, "wb") as f:
                f.write(whole.tobytes())
            os.replace(tmp, self.path / "pool.index")
            (self.path / "pool.index.new").unlink(missing_ok=True)
            added = added[:0]
        return [(part[:, 0], part[:, 1]) for part in (whole, added) if len(part)]


def _open_private(path: Path, mode: str):
    """`open(path, mode)`, a file it creates made 0600 (what it holds comes from guest memory)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # one an older hvkit made 0644
    return os.fdopen(fd, mode)


def _replace_private(path: Path, text: str) -> None:
    """`path` replaced by a file of `text`, 0600, atomically (old or new, never half);
    the caller holds the store's lock (one writer of the temporary name at a time)."""
    tmp = path.with_suffix(".tmp")
    with _open_private(tmp, "w") as f:
        f.write(text)
    tmp.replace(path)


def _dedupe(data: np.ndarray, hashes: np.ndarray, entries: np.ndarray,
            index: list[tuple[np.ndarray, np.ndarray]], pool: Path,
            counters: Counters) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which pages of `data` need a frame of their own (True), and the pages that repeat
    an earlier one of `data` with those earlier ones (they get its entry once it has
    one). Sets `entries` of the others: zeros stay 0 (the ZERO entry), a page whose
    content a pool frame has gets that frame (hash match, then bytes)."""
    n = len(data)
    words = data.view("<u8").reshape(n, PAGE // 8)  # compared 8 bytes at a time
    kept = words.any(axis=1)
    counters.pages_zero = int(n - kept.sum())
    for known_h, known_e in index:  # each part of the pool's index, sorted by hash
        idx = np.flatnonzero(kept)
        if not len(idx):
            break
        pos = np.searchsorted(known_h, hashes[idx])
        pos[pos == len(known_h)] = 0
        cand = known_h[pos] == hashes[idx]
        if cand.any():
            frames = (known_e[pos[cand]] & np.uint64((1 << 36) - 1)).astype(np.int64)
            with open(pool, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                stored = np.frombuffer(m, dtype="<u8").reshape(-1, PAGE // 8)
                same = _same_pages(stored, frames, words, idx[cand])
                del stored
            hit = np.flatnonzero(cand)[same]
            entries[idx[hit]] = known_e[pos[hit]]
            kept[idx[hit]] = False
            counters.pages_deduplicated += len(hit)
    todo = np.flatnonzero(kept)
    if not len(todo):
        return kept, todo, todo
    _, first, inverse = np.unique(hashes[todo], return_index=True, return_inverse=True)
    rep = todo[first[inverse]]
    maybe = np.flatnonzero(rep != todo)  # only pages whose hash an earlier one has
    dup = np.zeros(len(todo), dtype=bool)
    dup[maybe] = _same_pages(words, rep[maybe], words, todo[maybe])
    kept[todo[dup]] = False
    counters.pages_deduplicated += int(dup.sum())
    return kept, todo[dup], rep[dup]


def _same_pages(a: np.ndarray, at: np.ndarray, b: np.ndarray, bt: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Whether page a[at[i]] equals page b[bt[i]] (pages as rows of u64 words), compared
    `chunk` pages at a time: the copies fancy indexing makes stay small, and reuse the
    same memory (a fresh page costs far more to fault in than to compare)."""
    out = np.empty(len(at), dtype=bool)
    for s in range(0, len(at), chunk):
        out[s:s + chunk] = (a[at[s:s + chunk]] == b[bt[s:s + chunk]]).all(axis=1)
    return out


def is_frames(entries: np.ndarray) -> np.ndarray:
    return (entries >> np.uint64(KIND_SHIFT)) == FRAMES


def read_frames(entries: np.ndarray, fd_of: Callable[[int], int]) -> tuple[bytes, np.ndarray]:
    """(the pages `entries` point at, which of them are frames): one pread per run of
    consecutive frames of one file; ZERO entries read as zeros. `fd_of(file id)` opens
    frame files (the server keeps them open; a push opens them once)."""
    count = len(entries)
    out = bytearray(count * PAGE)  # zeros: the zero frame
    frames = is_frames(entries)
    # runs of consecutive frames of one file: a new run wherever that breaks
    breaks = np.flatnonzero((entries[1:] != entries[:-1] + np.uint64(1)) | (frames[1:] != frames[:-1])) + 1
    starts = np.concatenate(([0], breaks)).tolist()
    ends = np.concatenate((breaks, [count])).tolist()
    view = memoryview(out)
    for s, e in zip(starts, ends):
        if not frames[s]:
            continue
        entry = int(entries[s])
        file_id, page = (entry >> FILE_SHIFT) & FILE_MASK, entry & PAGE_MASK
        got = os.preadv(fd_of(file_id), [view[s * PAGE:e * PAGE]], page * PAGE)
        if got < (e - s) * PAGE:  # past the end of a frame file: zeros, as written
            view[s * PAGE + got:e * PAGE] = bytes((e - s) * PAGE - got)
    return bytes(out), frames


__all__ = ["Counters", "Snapshot", "Store", "table_entry", "is_frames", "read_frames", "PAGE"]
