"""bench/remote: snapshots in an S3 store and children on another host, against a local fork.

    .venv/bin/python bench/remote.py [--sizes 256M] [--settle 5] [--json docs/results/remote.json]
                                     [--vm-name rb]

Starts a real SeaweedFS S3 server on loopback (as the tests do), and for every size
boots a fresh idle default guest and forks it once (its snapshot S; the clock is not
running for that). Then, each from the request until the child runs:

  local child            `hvkit fork --snapshot S` on this host: the baseline
  push S                 seconds, compressed bytes sent, chunks and pages uploaded
  push of a fork's fork  S's child, --settle seconds old, forked (snapshot S2) and pushed:
                         pages uploaded (whole chunks) against the pages the child wrote
  remote, cold, lazy     a second simulated host (its own HVKIT_RUNTIME and HVKIT_CACHE):
                         `fork --snapshot s3://...` fetches the manifest and top level only
  remote, warm, lazy     a third host sharing the second's cache
  remote, cold, all      a fourth host, `--fetch all`: every chunk before the child starts

Each host's memory server is started before its clock starts (as the local one
is). After each remote child has run --settle seconds, the chunks its memory server fetched
and the pages it served (the child's reads through FUSE, with the kernel's
readahead) are read from the server's stats. Every child is stopped before the next
arm. Not measured here (see docs/remote.md): added round trips (netem), 4 GiB guests
holding 1 GiB, prefetch of a recorded working set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runinfo import run_info  # noqa: E402  (bench/ is on sys.path: the script's own folder)

from hvkit.config import Paths  # noqa: E402
from hvkit.forking import child_names, fork, start_children  # noqa: E402
from hvkit.memserver import MemServer  # noqa: E402
from hvkit.qemu import find_vm, list_vms, start_vm  # noqa: E402
from hvkit.remote import fork_remote, push  # noqa: E402
from hvkit.remote.seaweed import SeaweedServer  # noqa: E402
from hvkit.units import parse_size  # noqa: E402

STORE = "s3://hvkit/bench"


def stop_all(paths: Paths) -> None:
    for row in list_vms(paths):
        if row.state != "dead":
            find_vm(row.name, paths).stop()


def host(cache: Path | None = None) -> Paths:
    """A simulated host: a runtime folder of its own, and a cache of its own unless given."""
    runtime = Path(tempfile.mkdtemp(prefix="hvkit-bench-host-", dir="/dev/shm"))
    return Paths(cache or Path(tempfile.mkdtemp(prefix="hvkit-bench-cache-")), runtime)


def remote_arm(label: str, url: str, paths: Paths, settle: float, lazy: bool) -> dict:
    MemServer.of(paths).start()  # running before the clock starts, as for the local child
    report = fork_remote(url, 1, paths, lazy=lazy)
    time.sleep(settle)
    stats = MemServer.of(paths).stats() or {}
    row = {"arm": label, "first_child_s": report.children[0].seconds, "fork_fetch_s": report.fetch_seconds,
           "fork_bytes_fetched": report.bytes_fetched, "chunks_fetched_by_fork": report.chunks_fetched,
           "chunks_fetched_on_read": stats.get("remote_chunks_fetched", 0),
           "pages_served": stats.get("pages_served", 0), "zero_pages_served": stats.get("zero_pages_served", 0),
           "chunks_prefetched": stats.get("remote_chunks_prefetched", 0)}
    stop_all(paths)
    MemServer.of(paths).stop(force=True)
    return row


def one_size(size: str, settle: float, name: str, paths: Paths) -> list[dict]:
    rows: list[dict] = []
    vm = start_vm(name, memory=size, workload="idle", paths=paths)
    vm.wait_for_console(r"HVKIT-HEARTBEAT 2\b", timeout=120)
    snap = fork(name, 1, paths).snapshot
    child = f"{name}-1"
    server = MemServer.of(paths)
    # local baseline: a child of the stored snapshot on this host
    store = server.store()
    local = store.snapshot(snap)
    store.close()
    t0 = time.monotonic()
    pid = server.start()
    started = start_children(local, child_names(name, 1, paths), server, pid, name, paths, t0)
    rows.append({"arm": "local child", "first_child_s": started[0].seconds})
    find_vm(started[0].name, paths).stop()
    ws_store = server.store()  # the pages its children read in their first 10 s (the server records them)
    deadline = time.monotonic() + 120
    while ws_store.working_set(snap) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    ws_store.close()
    p0 = push(paths, snap, STORE, as_name=f"{name}-{size}-nows", working_set=False)
    p1 = push(paths, snap, STORE, as_name=f"{name}-{size}")
    rows.append({"arm": "push", "seconds": p0.seconds, "bytes": p0.bytes_uploaded, "chunks": p0.chunks,
                 "chunks_zero": p0.chunks_zero, "chunks_uploaded": p0.chunks_uploaded,
                 "pages_uploaded": p0.pages_uploaded, "working_set_chunks": p1.working_set_chunks})
    time.sleep(settle)
    ff = fork(child, 1, paths)
    p2 = push(paths, ff.snapshot, STORE, as_name=f"{name}-{size}-ff")
    rows.append({"arm": "push of a fork's fork", "seconds": p2.seconds, "bytes": p2.bytes_uploaded,
                 "chunks_uploaded": p2.chunks_uploaded, "pages_uploaded": p2.pages_uploaded,
                 "pages_written": ff.pages_written})
    stop_all(paths)
    server.stop(force=True)
    url = f"{STORE}/{name}-{size}"
    b = host()
    c = host(cache=b.cache)
    d, e = host(), host()
    try:
        rows.append(remote_arm("remote, cold cache, lazy", url + "-nows", b, settle, True))
        rows.append(remote_arm("remote, warm cache, lazy", url + "-nows", c, settle, True))
        rows.append(remote_arm("remote, cold cache, lazy + working set", url, e, settle, True))
        rows.append(remote_arm("remote, cold cache, fetch all", url, d, settle, False))
    finally:
        for h in (b, c, d, e):
            stop_all(h)
            MemServer.of(h).stop(force=True)
            shutil.rmtree(h.runtime, ignore_errors=True)
            shutil.rmtree(h.cache, ignore_errors=True)
    for r in rows:
        r["size"] = size
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256M")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds a child runs before its fetches are read")
    ap.add_argument("--json", default=str(Path(__file__).resolve().parents[1] / "docs" / "results" / "remote.json"))
    ap.add_argument("--vm-name", default="rb", help="name of the parent VM")
    args = ap.parse_args()
    runtime = Path(tempfile.mkdtemp(prefix="hvkit-bench-remote-", dir="/dev/shm"))
    os.environ["HVKIT_RUNTIME"] = str(runtime)
    paths = Paths.from_env()  # the user's cache (the default guest), a runtime of its own
    folder = Path(tempfile.mkdtemp(prefix="hvkit-bench-s3-"))
    store = SeaweedServer(folder)
    store.start("hvkit")
    os.environ.update(store.env())
    rows: list[dict] = []
    try:
        for size in args.sizes.split(","):
            parse_size(size)
            rows += one_size(size, args.settle, args.vm_name, paths)
    finally:
        stop_all(paths)
        MemServer.of(paths).stop(force=True)
        store.stop()
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)
    for r in rows:
        print(json.dumps(r))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "chunk_bytes": 64 * 1024, "run": run_info()}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
