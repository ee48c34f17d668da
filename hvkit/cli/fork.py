"""`hvkit fork` (children of a running VM, or of a stored snapshot), `hvkit memserver`
(the FUSE server that holds the snapshots) and `hvkit pool` (QEMUs kept ready for children)."""

from __future__ import annotations

import shutil
import time

import click

from hvkit.cli.output import console, json_option, print_json, print_table, status_console
from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.forking import ChildStarted, child_names, fork as fork_vm, start_children
from hvkit.forking.pool import PoolDir, clear_pool, pool_status, set_pool
from hvkit.memserver import MemServer
from hvkit.qemu import list_vms
from hvkit.remote import fork_remote
from hvkit.qemu.disk import layers_in_use
from hvkit.units import mib


def _print_child(child: ChildStarted) -> None:
    settled = (f", settled (clock, MAC, address) at {child.ready_seconds * 1000:.0f} ms"
               if child.ready_seconds - child.seconds > 0.001 else "")
    status_console().print(f"  {child.name} running {child.seconds * 1000:.0f} ms after the request{settled} "
                           f"(pid {child.pid})")


@click.command()
@click.argument("vm", required=False)
@click.option("-n", "--children", "n", type=int, default=1, show_default=True, help="How many children.")
@click.option("--paused", "stay_paused", is_flag=True, help="Leave VM paused after the fork.")
@click.option("--keep-free", is_flag=True,
              help="Keep the guest's free pages in the snapshot (by default, at a VM's first fork, "
                   "they are found from its kernel's structures and given back to the host).")
@click.option("--snapshot", metavar="NAME|URL",
              help="Start children from this stored snapshot instead of forking a VM "
                   "(see 'hvkit memserver status'), or from one in an S3 store: "
                   "s3://BUCKET/PREFIX/NAME (see 'hvkit snapshot --help').")
@click.option("--endpoint", metavar="URL", default=None,
              help="With an s3:// snapshot: the S3 endpoint (default: AWS_ENDPOINT_URL, else AWS S3).")
@click.option("--fetch", type=click.Choice(["lazy", "all"]), default="lazy", show_default=True,
              help="With an s3:// snapshot: fetch its chunks when the children first read them "
                   "(lazy), or all of them before the children start.")
@json_option
def fork(vm: str | None, n: int, stay_paused: bool, keep_free: bool, snapshot: str | None,
         endpoint: str | None, fetch: str, as_json: bool) -> None:
    """Fork running VM into N children named VM-1 ... VM-N.

    The VM is paused, its device state saved and its memory snapshotted on hvkit's
    memory server (started if needed) without copying it; each child maps the
    snapshot privately, so the host shares every page the children only read. The VM
    then runs on (unless --paused). Forking a forked VM costs in proportion to the
    pages it wrote since it was born, not to its memory size. Prints the time from the
    request until each child runs."""
    if (vm is None) == (snapshot is None):
        raise HvkitError("give either a VM to fork or --snapshot NAME", "see 'hvkit fork --help'")
    if snapshot and snapshot.startswith("s3://"):
        _children_of_remote(snapshot, n, endpoint, fetch == "lazy", as_json)
        return
    if snapshot:
        _children_of_snapshot(snapshot, n, as_json)
        return
    report = fork_vm(vm, n, stay_paused=stay_paused, on_child=None if as_json else _print_child,
                     give_back_free=not keep_free)
    if as_json:
        print_json(report.to_json())
        return
    c = report.counters
    how = ("its RAM file became the snapshot (moved, not copied)" if report.froze_ram_file else
           f"{report.pages_written} pages it wrote were added; {c['pages_stored']} new frames, "
           f"{c['pages_deduplicated']} already stored, {c['pages_zero']} zero")
    console().print(
        f"forked {report.vm} into {report.n} ({', '.join(ch.name for ch in report.children)}) "
        f"from snapshot [bold]{report.snapshot}[/]: {how}; {c['metadata_copied']} bytes of table "
        f"copied, {c['tables_written']} tables written ({c['tables_replicated']} replicated, "
        f"{c['runs_split']} split) in {report.snapshot_seconds * 1000:.0f} ms")
    console().print(f"first child running {min(ch.seconds for ch in report.children) * 1000:.0f} ms after "
                    f"the request, last {max(ch.seconds for ch in report.children) * 1000:.0f} ms; "
                    f"{report.vm} is {report.vm_state}"
                    + (f" (paused {report.parent_paused_seconds * 1000:.0f} ms, running again before its children)"
                       if report.vm_state == "running" else ""))
    if report.froze_ram_file and not keep_free:
        console().print(report.free_pages_note or
                        f"{report.free_pages_given_back} of the guest's {report.free_pages} free pages "
                        f"({mib(report.free_pages_given_back * 4096):.0f} MiB) given back: they read as zeros")


def _children_of_snapshot(name: str, n: int, as_json: bool) -> None:
    paths = Paths.from_env()
    t0 = time.monotonic()
    server = MemServer.of(paths)
    store, snap = server.open_snapshot(name)  # before the server starts: a bad name leaves nothing running
    store.close()
    names = child_names(snap.vm, n, paths)
    pid = server.start()
    children = start_children(snap, names, server, pid, snap.vm, paths, t0,
                              None if as_json else _print_child)
    if as_json:
        print_json({"snapshot": name, "children": [c.__dict__ for c in children]})
        return
    console().print(f"started {', '.join(c.name for c in children)} from snapshot {name}")


def _children_of_remote(url: str, n: int, endpoint: str | None, lazy: bool, as_json: bool) -> None:
    report = fork_remote(url, n, Paths.from_env(), endpoint, None if as_json else _print_child, lazy)
    if as_json:
        print_json(report.to_json())
        return
    if report.reused:
        got = "on this host's memory server already: nothing fetched"
    elif report.lazy:
        got = (f"manifest and top-level table fetched in {report.fetch_seconds * 1000:.0f} ms; the memory "
               "server fetches the rest on first read")
    else:
        got = (f"{report.chunks_fetched} of its {report.chunks} stored chunks and {report.tables_fetched} tables "
               f"fetched ({mib(report.bytes_fetched):.1f} MiB), the rest from this host's cache, in "
               f"{report.fetch_seconds * 1000:.0f} ms")
    console().print(f"started {', '.join(c.name for c in report.children)} from {url} "
                    f"(local snapshot {report.snapshot}; {got})")


@click.group()
def memserver() -> None:
    """The memory server: a FUSE file system that serves each snapshot of guest memory
    as a file. 'hvkit fork' starts it when needed; its store outlives it."""


@memserver.command()
def start() -> None:
    """Start the server (or find the running one) and mount it."""
    server = MemServer.of(Paths.from_env())
    pid = server.start()
    console().print(f"memory server running (pid {pid}), snapshots at {server.mount}")


@memserver.command()
@click.option("--force", is_flag=True, help="Stop it even while VMs run from it (they stop too).")
def stop(force: bool) -> None:
    """Unmount and stop the server; its snapshots stay in the store."""
    MemServer.of(Paths.from_env()).stop(force=force)
    console().print("memory server stopped")


@memserver.command()
@click.option("--force", is_flag=True, help="Also while VMs run from its snapshots (they stop).")
def clear(force: bool) -> None:
    """Stop the server and delete every snapshot it holds."""
    paths = Paths.from_env()
    server = MemServer.of(paths)
    users = [row.name for row in list_vms(paths) if row.snapshot and row.state != "dead"]
    if users and not force:
        raise HvkitError(f"VMs run from the memory server's snapshots ({', '.join(users)}); clearing "
                         "would leave them unable to fork again", "stop them first, or pass --force")
    disks = layers_in_use(server.store_path / "disks")
    if disks and not force:
        raise HvkitError(f"running VMs read their disks through {len(disks)} frozen disk layers of the store "
                         f"({disks[0].name}, ...); clearing would leave those disks unusable after a restart",
                         "stop the VMs forked from a disk image first, or pass --force")
    server.stop(force=force)
    shutil.rmtree(server.root, ignore_errors=True)
    console().print(f"memory server stopped and {server.root} deleted")


@memserver.command()
@json_option
def status(as_json: bool) -> None:
    """The server, its snapshots, what each cost and how many pages it served."""
    server = MemServer.of(Paths.from_env())
    stats = server.stats() or {}
    served = stats.get("snapshots", {})
    snaps = []
    if server.store_path.is_dir():
        store = server.store()
        try:
            snaps = store.snapshots()
        finally:
            store.close()
    if as_json:
        print_json({"pid": server.pid(), "mount": str(server.mount), "store": str(server.store_path),
                    "pages_served": stats.get("pages_served", 0),
                    "snapshots": [{**s.to_json(), "served": served.get(s.name, {})} for s in snaps]})
        return
    pid = server.pid()
    console().print(f"memory server: {'running, pid ' + str(pid) if pid else 'not running'}; "
                    f"store {server.store_path}")
    if snaps:
        print_table(
            ["snapshot", "of VM", "parent", "memory MiB", "copied at fork B", "tables written",
             "replicated", "split", "pages written", "stored", "dedup", "zero", "pages served"],
            [[s.name, s.vm, s.parent or "", f"{mib(s.size):.0f}", s.counters.metadata_copied,
              s.counters.tables_written, s.counters.tables_replicated, s.counters.runs_split,
              s.counters.pages_written, s.counters.pages_stored, s.counters.pages_deduplicated,
              s.counters.pages_zero, served.get(s.name, {}).get("pages", 0)] for s in snaps])


@click.group()
def pool() -> None:
    """The warm pool: child QEMUs started ahead of time, so that a fork's children only
    load their device state (no QEMU start on the fork's path). Each pooled QEMU maps a
    memory-server slot that the fork binds to its snapshot; a keeper process refills the
    pool in the background and replaces a QEMU that died. Pooled QEMUs belong to the
    memory server: 'hvkit memserver stop' stops them."""


@pool.command("set")
@click.argument("vm")
@click.option("-n", "size", type=int, required=True, help="QEMUs to keep ready (0: none for this kind).")
@json_option
def pool_set(vm: str, size: int, as_json: bool) -> None:
    """Keep SIZE QEMUs ready for children of VM's kind of machine (its memory size,
    CPUs and devices): any VM of that kind forks from them."""
    row = set_pool(Paths.from_env(), vm, size)
    if as_json:
        print_json(row.to_json())
        return
    console().print(f"pool for VMs like {vm} ({mib(row.memory):.0f} MiB, {row.cpus} CPU): {size} QEMUs kept "
                    f"ready ({row.ready} ready now, {row.starting} starting); 'hvkit pool status' shows them")


@pool.command("status")
@json_option
def pool_status_command(as_json: bool) -> None:
    """What the pool keeps, what is ready, and what it costs (resident memory)."""
    paths = Paths.from_env()
    rows = pool_status(paths)
    keeper = PoolDir.of(paths).keeper_pid()
    if as_json:
        print_json({"keeper_pid": keeper, "pools": [r.to_json() for r in rows]})
        return
    console().print(f"pool keeper: {'running, pid ' + str(keeper) if keeper else 'not running'}")
    if rows:
        print_table(["like VM", "memory MiB", "CPUs", "kept", "ready", "starting", "resident MiB"],
                    [[r.like, f"{mib(r.memory):.0f}", r.cpus, r.size, r.ready, r.starting, f"{mib(r.rss):.1f}"]
                     for r in rows])
    else:
        console().print("no pool: 'hvkit pool set VM -n K' keeps K QEMUs ready for VM's children")


@pool.command("clear")
def pool_clear() -> None:
    """Keep no pooled QEMUs: the keeper and every pooled QEMU are stopped."""
    clear_pool(Paths.from_env())
    console().print("pool cleared: no QEMU kept ready")
