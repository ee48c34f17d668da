"""Snapshots in a real S3 store (SeaweedFS, started by conftest.py on loopback) and
children on a second simulated host (its own HVKIT_RUNTIME, memory server and
HVKIT_CACHE): they see exactly the parent's memory at the fork; a cached chunk is never
fetched again; the store killed and restarted mid-fetch, a damaged chunk, a killed
push and a killed fetch never give a wrong page or a half snapshot; bad URLs and
credentials are one line."""

from __future__ import annotations

import errno
import json
import os
import re
import threading
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.forking import fork
from hvkit.memserver import MemServer, Store, fuse_unavailable_reason
from hvkit.memserver.store import read_frames
from hvkit.memserver.table import resolve
from hvkit.qemu import find_vm, list_vms, start_vm
from hvkit.remote import fork_remote, list_snapshots, push, remove_snapshot
from hvkit.remote.fetch import FetchReport, ObjectCache, chunk_list, read_manifest
from hvkit.remote.layout import chunk_key, compress
from hvkit.remote.objects import ObjectStore, StoreURL

from conftest import run_cli, last_heartbeat, stop_vms_and_memserver

pytestmark = pytest.mark.skipif(fuse_unavailable_reason() is not None,
                                reason=f"no FUSE here: {fuse_unavailable_reason()}")
STORE = "s3://hvkit/test"


def one_line_error(result: subprocess.CompletedProcess, says: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("hvkit: error: ") and "Traceback" not in result.stderr, \
        result.stderr
    assert re.search(says, lines[0]), lines[0]


# ---- no guest -------------------------------------------------------------------------

def test_bad_urls_credentials_and_stores_are_one_line(s3_store, tmp_path):
    env = {**s3_store.env(), "HVKIT_RUNTIME": str(tmp_path / "rt"), "HVKIT_S3_RETRY_SECONDS": "1"}
    one_line_error(run_cli("snapshot", "ls", "--store", "http://x/y", env=env), "not a store URL")
    one_line_error(run_cli("snapshot", "ls", "--store", "s3://Bad_Bucket/p", env=env), "not a valid S3 bucket")
    one_line_error(run_cli("fork", "--snapshot", "s3://hvkit", env=env), "not a snapshot URL")
    one_line_error(run_cli("fork", "--snapshot", "s3://hvkit/p/no-such", env=env), "has no snapshot named")
    one_line_error(run_cli("snapshot", "ls", "--store", "s3://no-such-bucket/p", env=env), "does not exist")
    one_line_error(run_cli("snapshot", "ls", "--store", STORE, env={**env, "AWS_SECRET_ACCESS_KEY": "wrong"}),
                   "refused the credentials")
    one_line_error(run_cli("snapshot", "ls", "--store", STORE, env={**env, "AWS_ACCESS_KEY_ID": "nobody"}),
                   "refused the credentials")
    closed = {**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # discard: nothing listens
    one_line_error(run_cli("snapshot", "ls", "--store", STORE, env=closed), "did not answer .* for 1 s")
    one_line_error(run_cli("snapshot", "push", "nothing", "--store", STORE, env=env), "no snapshot named")
    assert not (tmp_path / "rt" / "memserver" / "mnt").exists() or not os.listdir(tmp_path / "rt" / "memserver" / "mnt")


def test_store_serve_runs_a_store_until_stopped(tmp_path):
    """`hvkit store serve`: a SeaweedFS S3 server whose printed settings work, refused
    a second time on the same folder, gone (with its unix sockets) after SIGTERM."""
    folder = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "hvkit", "store", "serve", "--dir", str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(6)]
        env = dict(line.split(" ", 1)[1].strip().split("=", 1) for line in lines if line.startswith("export "))
        assert set(env) >= {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, lines
        listed = run_cli("snapshot", "ls", "--store", "s3://hvkit/x", env=env)
        assert listed.returncode == 0 and "no snapshots" in listed.stdout, listed.stderr
        listed = run_cli("snapshot", "ls", "--store", "s3://hvkit/x", "--json", env=env)
        assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr
        one_line_error(run_cli("store", "serve", "--dir", str(folder)), "already runs from")
        assert (folder / "hvkit-s3.json").stat().st_mode & 0o077 == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert not (folder / "weed.pid").exists()
    saved = json.loads((folder / "hvkit-s3.json").read_text())
    ports = [*saved["ports"], saved["s3_port"]]
    assert not [s for port in ports for n in (port, port + 10000) for s in Path("/tmp").glob(f"seaweedfs-*-{n}.sock")]
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _runs_weed_of(p, folder)]


def _runs_weed_of(proc: Path, folder: Path) -> bool:
    try:
        return f"-dir={folder}".encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False


# ---- two hosts ------------------------------------------------------------------------

class Host:
    """A second hvkit host on this machine: its own runtime folder (VMs, memory server)
    and its own cache (the store's chunks)."""

    def __init__(self, name: str) -> None:
        self.runtime = Path(tempfile.mkdtemp(prefix=f"hvt-{name}-", dir="/dev/shm"))
        self.cache = Path(tempfile.mkdtemp(prefix=f"hvkit-{name}-cache-"))
        self.paths = Paths(self.cache, self.runtime)

    def env(self) -> dict[str, str]:
        return {"HVKIT_RUNTIME": str(self.runtime), "HVKIT_CACHE": str(self.cache)}

    def cached_objects(self) -> int:
        folder = self.cache / "remote" / "objects"
        return len([p for p in folder.iterdir() if not p.name.startswith(".")]) if folder.is_dir() else 0

    def snapshots(self) -> list[str]:
        folder = self.runtime / "memserver" / "store" / "snapshots"
        return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []

    def close(self) -> None:
        for row in list_vms(self.paths):
            if row.state != "dead":
                find_vm(row.name, self.paths).stop()
        MemServer.of(self.paths).stop(force=True)
        shutil.rmtree(self.runtime, ignore_errors=True)
        shutil.rmtree(self.cache, ignore_errors=True)


@pytest.fixture
def host():
    made: list[Host] = []

    def make(name: str) -> Host:
        made.append(Host(name))
        return made[-1]

    yield make
    for h in made:
        h.close()


@pytest.fixture(scope="module")
def s3_env(s3_store):
    """boto3 in this process talks to the test store."""
    saved = {k: os.environ.get(k) for k in s3_store.env()}
    os.environ.update(s3_store.env())
    yield s3_store.env()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def pushed(paths, guest, s3_env):
    """A memory-checking guest forked (paused, so its last heartbeat is known) and its
    snapshot pushed: (VM, snapshot name, last heartbeat, push report)."""
    before = {row.name for row in list_vms(paths)}
    MemServer.of(paths).stop(force=True)  # started again below, recording working sets for 3 s
    os.environ["HVKIT_WORKING_SET_SECONDS"] = "3"
    vm = start_vm("s3o", memory="256M", workload="memcheck:32", paths=paths)
    vm.wait_for_console(r"HVKIT-MEMCHECK round=2 live_mib=\d+ errors=0", timeout=120)
    vm.pause()
    beat = last_heartbeat(vm.console())
    report = fork("s3o", 1, paths)
    os.environ.pop("HVKIT_WORKING_SET_SECONDS")
    # the pages its child read in its first 3 s: pushed with it, prefetched by remote forks
    store = MemServer.of(paths).store()
    deadline = time.monotonic() + 60
    while store.working_set(report.snapshot) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    store.close()
    pushed_report = push(paths, report.snapshot, STORE)
    yield vm, report.snapshot, beat, pushed_report
    stop_vms_and_memserver(paths, before)


def snapshot_bytes(paths: Paths, name: str) -> np.ndarray:
    """Every byte of snapshot `name` of `paths`'s store, as its memory server serves it."""
    store = Store(MemServer.of(paths).store_path)
    fds: dict[int, int] = {}
    try:
        snap = store.snapshot(name)
        entries = resolve(store.tables, snap.root, snap.levels, 0, snap.pages)
        data, _ = read_frames(entries, lambda f: fds.setdefault(f, os.open(store.frame_file(f), os.O_RDONLY)))
        return np.frombuffer(data, dtype=np.uint8)
    finally:
        for fd in fds.values():
            os.close(fd)
        store.close()


def served_bytes(h: Host, name: str) -> np.ndarray:
    """Every byte of snapshot `name` as `h`'s memory server serves it to children (read
    through its FUSE file: a lazily fetched snapshot fetches what is not there yet)."""
    return np.fromfile(MemServer.of(h.paths).snapshot_file(name), dtype=np.uint8)


def assert_children_go_on_clean(h: Host, names: list[str], beat: int) -> None:
    """Each child's first heartbeat follows the parent's last one, and its memory checker
    runs two more rounds over the memory it had, finding every page as it left it."""
    for name in names:
        vm = find_vm(name, h.paths)
        first = int(vm.wait_for_console(r"HVKIT-HEARTBEAT (\d+)\n", timeout=60).group(1))
        assert first in (beat + 1, beat + 2), (beat, first)
        last = int(vm.wait_for_console(r"HVKIT-MEMCHECK round=(\d+) ", timeout=60).group(1))
        errors = vm.wait_for_console(rf"HVKIT-MEMCHECK round={last + 2} live_mib=\d+ errors=(\d+)", timeout=180)
        assert errors.group(1) == "0" and "HVKIT-MEMCHECK-CORRUPT" not in vm.console(), vm.console()[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_children_on_another_host_see_the_parents_memory_and_share_its_cache(pushed, paths, host):
    vm, name, beat, report = pushed
    assert report.chunks == 256 * 1024 * 1024 // (64 * 1024)
    assert 0 < report.chunks_zero < report.chunks and report.chunks_uploaded > 0
    assert 0 < report.working_set_chunks < report.chunks - report.chunks_zero
    assert [m.name for m in list_snapshots(STORE)].count(name) == 1
    b = host("b")
    got = fork_remote(f"{STORE}/{name}", 2, b.paths)  # lazy: the top level now, the rest on first read
    assert not got.reused and got.lazy and got.chunks_fetched == 0 and got.tables_fetched == 1
    assert_children_go_on_clean(b, [c.name for c in got.children], beat)
    stats = MemServer.of(b.paths).stats()
    # the children read part of their memory: fetched, and no more than the stored chunks;
    # the working set was prefetched in the background meanwhile
    assert 0 < stats["remote_chunks_fetched"] < report.chunks - report.chunks_zero
    assert 0 < stats["remote_chunks_prefetched"] <= report.working_set_chunks
    assert np.array_equal(served_bytes(b, got.snapshot), snapshot_bytes(paths, name))
    # the same snapshot again on this host: nothing fetched, the children of both share it
    again = fork_remote(f"{STORE}/{name}", 1, b.paths)
    assert again.reused and again.snapshot == got.snapshot and b.snapshots() == [got.snapshot]
    # a third host sharing b's cache (a per-host cache; two runtimes here): no chunk
    # or table fetched again, only the manifest
    c = host("c")
    shutil.rmtree(c.cache)
    c.cache = b.cache
    c.paths = Paths(b.cache, c.runtime)
    third = fork_remote(f"{STORE}/{name}", 1, c.paths)
    assert third.chunks_fetched == 0 and third.tables_fetched == 0 and not third.reused
    assert third.bytes_fetched < 64 * 1024  # the manifest, and the blobs from the cache
    assert_children_go_on_clean(c, [ch.name for ch in third.children], beat)
    assert np.array_equal(served_bytes(c, third.snapshot), snapshot_bytes(paths, name))
    assert MemServer.of(c.paths).stats()["remote_chunks_fetched"] == 0  # all from b's fetches
    # and fetching it all at once (--fetch all) on a fourth host finds the same bytes
    d = host("d")
    whole = fork_remote(f"{STORE}/{name}", 1, d.paths, lazy=False)
    assert not whole.lazy and 0 < whole.chunks_fetched <= whole.chunks  # a chunk twice in it: fetched once
    assert np.array_equal(snapshot_bytes(d.paths, whole.snapshot), snapshot_bytes(paths, name))
    c.cache = Path(tempfile.mkdtemp())  # b removes the shared cache


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_forked_vms_push_uploads_only_the_chunks_it_changed(pushed, paths):
    vm, name, _, first = pushed
    child = f"{vm.name}-1"
    find_vm(child, paths).wait_for_console(r"HVKIT-MEMCHECK round=\d+ live_mib=\d+ errors=0", timeout=60)
    report = fork(child, 1, paths)
    second = push(paths, report.snapshot, STORE)
    # every chunk it uploads holds a page the child wrote; every other one was there
    assert 0 < second.chunks_uploaded <= report.pages_written
    assert second.chunks_uploaded < second.chunks - second.chunks_zero
    assert second.blobs_uploaded <= 2  # its device state and working set; kernel and initramfs were there
    # removed again: its manifest and what only it used (its chunks, tables, state); the
    # parent's snapshot keeps every object (later tests read all of it on other hosts)
    gone = remove_snapshot(STORE, report.snapshot)
    assert report.snapshot not in [m.name for m in list_snapshots(STORE)]
    assert gone["chunks_deleted"] <= second.chunks_uploaded and gone["blobs_deleted"] == second.blobs_uploaded
    assert gone["tables_deleted"] >= 1
    objects = ObjectStore(StoreURL.parse(STORE))
    blobs = {k for k, _ in objects.list("blobs")}
    for m in list_snapshots(STORE):  # what the others name is all still there
        assert {b.sha256 for b in (m.state, m.kernel, m.initrd, m.working_set) if b} <= blobs, m.name


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_push_and_killed_fetch_leave_no_snapshot(pushed, paths, host, s3_env):
    vm, name, _, _ = pushed
    env = {**s3_env, "HVKIT_RUNTIME": str(paths.runtime)}
    for point in ("push:chunks uploaded", "push:tables uploaded", "push:before manifest"):
        r = run_cli("snapshot", "push", name, "--store", STORE, "--as", "killed", env={**env, "HVKIT_DIE_AT": point})
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr)
        assert "killed" not in [m.name for m in list_snapshots(STORE)], point
    b = host("b")
    for point, fetch in (("fetch:chunks written", "all"), ("fetch:before seal", "all"),
                         ("fetch:before seal", "lazy")):
        r = run_cli("fork", "--snapshot", f"{STORE}/{name}", "--fetch", fetch,
                    env={**env, **b.env(), "HVKIT_DIE_AT": point})
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr)
        assert b.snapshots() == [], point
        run_cli("vm", "list", env={**env, **b.env()})  # any command sweeps what the kill left
        frames = b.runtime / "memserver" / "store" / "frames"
        assert sorted(p.name for p in frames.iterdir()) == [], point
        assert not list((b.runtime / "memserver" / "store" / "snapshots").glob(".*.state")), point
    r = run_cli("fork", "--snapshot", f"{STORE}/{name}", "--json", env={**env, **b.env()})
    assert r.returncode == 0, r.stderr
    assert np.array_equal(served_bytes(b, b.snapshots()[0]), snapshot_bytes(paths, name))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_damaged_chunk_is_never_used(pushed, paths, host, s3_env, monkeypatch, tmp_path):
    _, name, _, _ = pushed
    objects = ObjectStore(StoreURL.parse(STORE))
    manifest, _ = read_manifest(objects, name)
    index, victim = chunk_list(objects, ObjectCache(tmp_path), manifest, FetchReport("", "", False))[-1]
    good = objects.get(chunk_key(victim))
    objects.put(chunk_key(victim), compress(bytes(64 * 1024 - 1) + b"x"))  # valid zstd, wrong content
    monkeypatch.setenv("HVKIT_S3_RETRY_SECONDS", "2")
    b, c = host("b"), host("c")
    try:
        with pytest.raises(HvkitError, match="does not match its hash"):
            fork_remote(f"{STORE}/{name}", 1, b.paths, lazy=False)
        assert b.snapshots() == [] and not any((b.runtime / "memserver" / "store" / "frames").iterdir())
        # lazily, the read under it fails (a child reading it would stop), never a wrong page
        got = fork_remote(f"{STORE}/{name}", 1, c.paths)
        with open(MemServer.of(c.paths).snapshot_file(got.snapshot), "rb") as f:
            f.seek(index * 64 * 1024)
            with pytest.raises(OSError) as e:
                f.read(64 * 1024)
        assert e.value.errno == errno.EIO
        assert "does not match its hash" in MemServer.of(c.paths).log_file.read_text()
    finally:
        objects.put(chunk_key(victim), good)
    assert not (b.cache / "remote" / "objects" / victim).exists()
    assert not (c.cache / "remote" / "objects" / victim).exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_store_killed_and_restarted_mid_fetch_gives_no_wrong_page(pushed, paths, host, s3_store, s3_env):
    _, name, beat, report = pushed
    d = host("d")
    proc = subprocess.Popen([sys.executable, "-m", "hvkit", "fork", "--snapshot", f"{STORE}/{name}", "--json",
                             "--fetch", "all"],
                            env={**os.environ, **s3_env, **d.env(), "HVKIT_S3_RETRY_SECONDS": "120"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    total = report.chunks - report.chunks_zero
    deadline = time.monotonic() + 120
    while d.cached_objects() < 20 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    s3_store.kill()
    at_kill = d.cached_objects()
    try:
        assert proc.poll() is None and at_kill < total, "the fetch ended before the store was killed"
        time.sleep(2)
        assert proc.poll() is None, "the fetch gave up while the store was down: " + proc.stderr.read()
    finally:
        s3_store.start("hvkit")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert d.cached_objects() > at_kill
    assert np.array_equal(snapshot_bytes(d.paths, d.snapshots()[0]), snapshot_bytes(paths, name))
    assert_children_go_on_clean(d, [find_vm(r.name, d.paths).name for r in list_vms(d.paths)], beat)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_store_killed_and_restarted_under_lazy_children_gives_no_wrong_page(pushed, paths, host, s3_store,
                                                                            s3_env, monkeypatch):
    _, name, beat, _ = pushed
    monkeypatch.setenv("HVKIT_S3_RETRY_SECONDS", "180")  # the memory server, started here, inherits it
    e = host("e")
    got = fork_remote(f"{STORE}/{name}", 1, e.paths)
    s3_store.kill()
    read: list[np.ndarray] = []
    reader = threading.Thread(target=lambda: read.append(served_bytes(e, got.snapshot)))
    try:
        reader.start()  # every chunk not fetched yet waits for the store
        time.sleep(3)
        assert reader.is_alive(), "the whole snapshot was read while the store was down"
    finally:
        s3_store.start("hvkit")
    reader.join(300)
    assert read and np.array_equal(read[0], snapshot_bytes(paths, name))
    assert_children_go_on_clean(e, [c.name for c in got.children], beat)
