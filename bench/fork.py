"""bench/fork: forking a running VM into N children, three ways, side by side in one run.

    .venv/bin/python bench/fork.py [--sizes 256M,1G,4G] [--children 1,8] [--settle 10]
                                   [--repeat 3] [--json docs/results/fork.json]
                                   [--image-guest | --no-image-guest] [--image-memory 1G]
                                   [--image-children 4] [--image-methods ...] [--vm-name bench]
    .venv/bin/python bench/fork.py --plot-only [--json docs/results/fork.json]

For every guest size and N, a fresh default guest (idle workload) is booted and forked:
  hvkit fork          `hvkit.fork(vm, N)`: the RAM file becomes a memory-server
                      snapshot (moved, not copied); children map it share=off through
                      FUSE. The server is started before the clock starts (once per run).
  migrate + restore   QMP `migrate` of the whole VM (RAM included) to a file, then N
                      QEMUs with their own RAM restore it with `-incoming`.
  hvkit fork, warm    the same, with N child QEMUs kept ready beforehand (`hvkit pool set
                      VM -n N`, filled before the clock starts): each child only loads
                      its device state; its RAM is a memory-server slot bound to the
                      snapshot at the fork. For both hvkit rows, N more children of the
                      same snapshot are then started (`fork --snapshot`): the child's own
                      path, without the parent's pause and seal.
  template copy       the device state saved without RAM, the RAM file copied
                      (`cp --sparse=always`) into a template, N children map the copy
                      share=off and load the device state.
The parent is paused from the request on (in every method), and each time is from the
request until a child runs; hvkit's rows are the median of --repeat runs (each on a
freshly booted guest), the baselines' a single run. After N children run, --settle seconds later, each child's
PSS (its own host memory, shared pages divided among sharers) is read; the guests are
idle, so this is what a fork costs to keep.

Debian image guest (--image-guest, on by default; issue 14): a VM booted from hvkit's
Debian 12 disk image (`start_vm(image="debian")`, --image-memory, default 1 GiB) is
forked into --image-children children (default 4), the same three ways. Its disk is
frozen at the fork the same way in every method (QMP blockdev-snapshot-sync: the
parent goes on on a new overlay) and every child gets a qcow2 overlay of its own over
the frozen layer; the baselines' children also get their own ssh port forward (and
keep the parent's MAC and VM generation id: hvkit's children get new ones). Reported
per method: time until the first / all children run (vCPUs running after the state
was loaded), until their guest agent answers, for hvkit also until `fork` returns
(agent answered, clock set, own MAC and DHCP lease: ChildStarted.ready_seconds), and each
child's PSS --settle seconds after all agents answered. The arm "hvkit fork (not settled)"
skips that settling (it only waits for each agent): the difference is what giving
each child its identity costs. Each method runs once, on a
freshly booted guest (a boot is ~40 s under TCG).

Targets (issue 4): first child within 150 ms at every size, 4 GiB no more than 1.3x
256 MiB; 8 children of an idle 1 GiB guest each at most 64 MiB of their own after 10 s;
at least 10x faster than migrate + restore at 1 GiB.

A PNG beside the JSON (fork.png; --plot-only draws it again from the JSON): time until the
first child runs against guest size, and PSS per idle child against N, one line per
method (log scales: the methods are orders of magnitude apart).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runinfo import run_info  # noqa: E402  (bench/ is on sys.path: the script's own folder)

from hvkit.cli.output import print_table  # noqa: E402
from hvkit.config import Paths  # noqa: E402
from hvkit.forking import child_names, fork, start_children  # noqa: E402
from hvkit.forking.pool import pool_status, set_pool  # noqa: E402
from hvkit.forking.reset import reset as reset_child  # noqa: E402
from hvkit.forking import settle as child_settling  # noqa: E402
from hvkit.guest import build_default_guest  # noqa: E402
from hvkit.memserver import MemServer  # noqa: E402
from hvkit.qemu import VM, find_vm, imagevm, list_vms, start_vm  # noqa: E402
from hvkit.qemu.agent import GuestAgent  # noqa: E402
from hvkit.qemu.disk import DRIVE_ID, create_overlay, virtual_size  # noqa: E402
from hvkit.qemu.network import free_local_port  # noqa: E402
from hvkit.qemu.qmp import qmp  # noqa: E402
from hvkit.qemu.listing import proportional_memory  # noqa: E402
from hvkit.units import format_size, parse_size  # noqa: E402

MiB = 1 << 20
UNSETTLED = "hvkit fork (not settled)"  # children not given their clock, MAC and lease: what that costs
WARM = "hvkit fork, warm pool"  # N QEMUs kept ready (`hvkit pool set VM -n N`) before the request


class RawChild:
    """A QEMU started from the parent's command line with another RAM backend and
    `-incoming defer`: the baselines' children, outside hvkit's own bookkeeping."""

    def __init__(self, parent: VM, folder: Path, ram_object: str, extra: list[str],
                 frozen_disk: Path | None = None) -> None:
        self.folder = folder
        folder.mkdir(parents=True)
        backend = next(a for a in parent.spec.command if a.startswith("memory-backend-file"))
        cmd = [ram_object if a == backend else a.replace(str(parent.rundir.path), str(folder))
               for a in parent.spec.command]
        if parent.spec.image:
            # a disk guest: an overlay of its own over the disk frozen at the fork, at the
            # path its command line names (the parent's folder replaced by its own), and
            # its own ssh port (the parent's QEMU holds the parent's)
            create_overlay(frozen_disk, folder / parent.rundir.disk.name)
            rule = f"hostfwd=tcp:127.0.0.1:{parent.spec.ssh_port}-"
            cmd = [a.replace(rule, f"hostfwd=tcp:127.0.0.1:{free_local_port()}-") for a in cmd]
        self.proc = subprocess.Popen(cmd + ["-S", "-incoming", "defer", *extra], stdin=subprocess.DEVNULL,
                                     stdout=(folder / "qemu.log").open("wb"), stderr=subprocess.STDOUT)
        self.sock = folder / "qmp.sock"

    def qmp(self, command: str, args: dict | None = None):
        return qmp(self.sock, command, args, timeout=30)

    def incoming(self, uri: str) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                self.qmp("query-status")
                break
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((self.folder / "qemu.log").read_text()) from None
                time.sleep(0.005)
        self.qmp("migrate-incoming", {"uri": uri})
        while self.qmp("query-status")["status"] == "inmigrate":
            time.sleep(0.005)
        self.qmp("cont")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def agent_answers(sock: Path, alive, timeout: float = 180.0) -> None:
    """Pings a guest agent until it answers (finer-grained than GuestAgent's own wait)."""
    agent, deadline = GuestAgent(sock), time.monotonic() + timeout
    while not agent.ping(timeout=0.5):
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the guest agent at {sock} did not answer")
        time.sleep(0.02)


def start_raw(parent: VM, root: Path, n: int, ram_object: str, uri: str, t0: float,
              extra: list[str] = (), frozen_disk: Path | None = None,
              agent_times: list[float] | None = None) -> tuple[list[float], list[RawChild]]:
    """Starts n raw children and restores them; the times until each runs. With
    `agent_times`, also waits for each one's guest agent (a disk guest) and records
    when it answered."""
    children = [RawChild(parent, root / f"c{i}", ram_object, list(extra), frozen_disk) for i in range(n)]

    def one(child: RawChild) -> float:
        child.incoming(uri)
        running = time.monotonic() - t0
        if agent_times is not None:
            agent_answers(child.folder / "qga.sock", lambda: child.proc.poll() is None)
            agent_times.append(time.monotonic() - t0)
        return running

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, children)), children


def freeze_active_layer(parent: VM, frozen: Path) -> Path:
    """The paused parent's disk frozen now, without stopping its QEMU: its overlay moves
    (by name: QEMU keeps it open) to `frozen`, and QEMU goes on writing to a new, empty
    overlay at the old path on top of it (QMP blockdev-snapshot-sync onto an existing
    file). hvkit's own fork freezes a disk offline (hvkit.forking.disks); the baselines
    keep their parent's QEMU, so they freeze it live."""
    active = parent.rundir.disk
    size = virtual_size(active)
    os.rename(active, frozen)
    create_overlay(frozen, active, size)
    parent.qmp("blockdev-snapshot-sync", {"device": DRIVE_ID, "snapshot-file": str(active), "format": "qcow2",
                                          "mode": "existing"})
    return frozen


def freeze_disk_of(parent: VM, root: Path) -> Path | None:
    """A disk guest's disk frozen now (the paused parent goes on on a new overlay),
    the same way hvkit's fork does it: the layer the baselines' children start from.
    It lives under `root` (removed after the case)."""
    if not parent.spec.image:
        return None
    return freeze_active_layer(parent, root / f"{parent.name}-disk.qcow2")


def migrate_restore(parent: VM, n: int, root: Path,
                    agent_times: list[float] | None = None) -> tuple[list[float], list[int], list]:
    t0 = time.monotonic()
    parent.pause()
    frozen = freeze_disk_of(parent, root)  # before the migration inactivates the disk
    image = root / "vm.migration"
    parent.qmp("migrate", {"uri": f"exec:cat > {image}"})
    while parent.qmp("query-migrate").get("status") not in ("completed", "failed"):
        time.sleep(0.005)
    size = format_size(parent.spec.memory)
    times, children = start_raw(parent, root, n, f"memory-backend-ram,id=ram0,size={size}",
                                f"exec:cat {image}", t0, frozen_disk=frozen, agent_times=agent_times)
    return times, [c.proc.pid for c in children], children


def template_copy(parent: VM, n: int, root: Path,
                  agent_times: list[float] | None = None) -> tuple[list[float], list[int], list]:
    t0 = time.monotonic()
    parent.pause()
    frozen = freeze_disk_of(parent, root)
    state, template = root / "state", root / "template.ram"
    parent.save_state(state)
    subprocess.run(["cp", "--sparse=always", str(parent.ram_path), str(template)], check=True)
    size = format_size(parent.spec.memory)
    times, children = start_raw(
        parent, root, n, f"memory-backend-file,id=ram0,size={size},mem-path={template},share=off",
        f"exec:cat {state}", t0, ["-global", "migration.send-configuration=off"],
        frozen_disk=frozen, agent_times=agent_times)
    return times, [c.proc.pid for c in children], children


def hvkit_fork(parent: VM, n: int, paths: Paths, extra: dict) -> tuple[list[float], list[int], list]:
    """hvkit's fork; the parent runs on (as `hvkit fork` leaves it), and how long it was
    paused, and where that time went, go into `extra`."""
    report = fork(parent.name, n, paths)
    extra.update(snapshot=report.snapshot, parent_paused_s=report.parent_paused_seconds,
                 pause_steps_ms={k: round(v * 1000, 1) for k, v in report.pause_steps.items()})
    kids = [find_vm(c.name, paths) for c in report.children]
    return [c.seconds for c in report.children], [k.pid for k in kids], kids


def wait_pool_ready(paths: Paths, n: int, timeout: float = 300.0) -> None:
    """Until the pool has `n` QEMUs ready (outside the clock: a pool is filled ahead)."""
    deadline = time.monotonic() + timeout
    while sum(s.ready for s in pool_status(paths)) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool did not fill to {n} QEMUs within {timeout:.0f} s")
        time.sleep(0.05)


def children_of_snapshot(snapshot: str, parent: str, n: int, paths: Paths) -> tuple[float, float]:
    """(first, all) seconds from the request until N more children of `snapshot` run
    (`hvkit fork --snapshot`): the child's own path, without the parent's pause and seal."""
    server = MemServer.of(paths)
    store = server.store()
    try:
        snap = store.snapshot(snapshot)
        t0 = time.monotonic()
        started = start_children(snap, child_names(f"{parent}-s", n, paths), server, server.start(), parent, paths, t0)
    finally:
        store.close()
    for c in started:
        find_vm(c.name, paths).stop()
    return min(c.seconds for c in started), max(c.seconds for c in started)


def jit_of(vm) -> tuple[float, int]:
    """(MiB of translated code, flushes of the translation buffer) of a TCG QEMU, from
    HMP `info jit`; (nan, -1) where QEMU does not say (not TCG)."""
    try:
        text = vm.qmp("human-monitor-command", {"command-line": "info jit"})
    except Exception:
        return float("nan"), -1
    size = re.search(r"gen code size\s+(\d+)/(\d+)", text)
    flushes = re.search(r"TB flush count\s+(\d+)", text)
    return (int(size.group(1)) / MiB if size else float("nan")), (int(flushes.group(1)) if flushes else -1)


def hvkit_fork_image(parent: VM, n: int, paths: Paths, settle: bool = True) -> tuple[
        list[float], list[float], list[float], list[int], list]:
    """hvkit's fork of a disk guest: (times until each child runs, until its agent
    answers, until it is settled: clock, MAC, lease), pids, children. The agent's time
    comes from wrapping child_settling.settle_child, which fork calls right after a child runs.
    Without `settle`, the children are only waited for (their agent answers): what the
    identity hvkit gives each child costs, in time and host memory, is the difference."""
    agent, original = {}, child_settling.settle_child

    def timed_settle(vm: VM, *a, **kw):
        agent_answers(vm.rundir.qga_sock, vm.is_alive)
        agent[vm.name] = time.monotonic()
        return original(vm, *a, **kw) if settle else None

    child_settling.settle_child = timed_settle
    try:
        t0 = time.monotonic()
        report = fork(parent.name, n, paths)  # the parent runs on, as `hvkit fork` leaves it
    finally:
        child_settling.settle_child = original
    kids = [find_vm(c.name, paths) for c in report.children]
    hvkit_fork_image.parent_paused_s = report.parent_paused_seconds
    return ([c.seconds for c in report.children], [agent[c.name] - t0 for c in report.children],
            [c.ready_seconds for c in report.children], [k.pid for k in kids], kids)


def run_image_case(memory: str, n: int, method: str, paths: Paths, settle: float, name: str) -> dict:
    """One method on a freshly booted Debian image guest (see the module comment)."""
    server = MemServer.of(paths)
    server.start()
    t_boot = time.monotonic()
    parent = start_vm(f"{name}-debian", memory=memory, image="debian", paths=paths)
    boot_s = time.monotonic() - t_boot
    root = paths.runtime / ("bench-img-" + method.replace(" ", "").replace("+", "-"))
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    children, fork_s = [], None
    try:
        time.sleep(5.0)  # the guest's own start-up jobs calm down
        if method.startswith("hvkit fork"):
            times, agent_s, fork_s, pids, children = hvkit_fork_image(parent, n, paths,
                                                                      settle=method == "hvkit fork")
        else:
            agent_s = []
            step = migrate_restore if method == "migrate + restore" else template_copy
            times, pids, children = step(parent, n, root, agent_s)
        time.sleep(settle)
        pss = [proportional_memory(pid) for pid in pids]
        jit = [jit_of(c) for c in children if isinstance(c, VM)]
        return {"guest": "debian", "size": memory, "n": n, "method": method, "boot_s": boot_s,
                "parent_paused_s": getattr(hvkit_fork_image, "parent_paused_s", None)
                if method.startswith("hvkit fork") else None,
                "jit_code_mib_mean": sum(j[0] for j in jit) / len(jit) if jit else None,
                "jit_flushes_max": max(j[1] for j in jit) if jit else None,
                "first_child_s": min(times), "all_children_s": max(times),
                "first_agent_s": min(agent_s), "all_agents_s": max(agent_s),
                "first_fork_done_s": min(fork_s) if fork_s else None,
                "all_fork_done_s": max(fork_s) if fork_s else None,
                "settle_s": settle, "pss_mib_mean": sum(pss) / len(pss) / MiB, "pss_mib_max": max(pss) / MiB,
                "pss_mib": [p / MiB for p in pss]}
    finally:
        _clean_up(children, paths, server, root)
        imagevm.collect_disks(paths)


def _clean_up(children: list, paths: Paths, server: MemServer, root: Path) -> None:
    """After one case: every VM stopped, the memory server and its store (the snapshot's
    frames too) and the case's scratch folder gone."""
    for c in children:
        c.stop()
    for row in list_vms(paths):
        if row.state != "dead":
            find_vm(row.name, paths).stop()
    server.stop(force=True)
    shutil.rmtree(server.root, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)


def run_case(size: str, n: int, method: str, paths: Paths, settle: float, name: str = "bench") -> dict:
    server = MemServer.of(paths)
    server.start()  # before the clock: a running server is the normal case
    parent = start_vm(name, memory=size, workload="idle", paths=paths)
    root = paths.runtime / ("bench-" + method.replace(" ", "").replace("+", "-"))
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    children, extra = [], {}
    try:
        parent.wait_for_console(r"HVKIT-HEARTBEAT 2\b", timeout=120)
        if method == WARM:
            set_pool(paths, name, n)
            wait_pool_ready(paths, n)
        if method in ("hvkit fork", WARM):
            times, pids, children = hvkit_fork(parent, n, paths, extra)
        elif method == "migrate + restore":
            times, pids, children = migrate_restore(parent, n, root)
        else:
            times, pids, children = template_copy(parent, n, root)
        time.sleep(settle if n > 1 else 1.0)
        pss = [proportional_memory(pid) for pid in pids]
        row = {"size": size, "n": n, "method": method, "first_child_s": min(times),
               "all_children_s": max(times), "settle_s": settle if n > 1 else 1.0,
               "pss_mib_mean": sum(pss) / len(pss) / MiB, "pss_mib_max": max(pss) / MiB, **extra}
        if method in ("hvkit fork", WARM):
            jit = [jit_of(c) for c in children]
            row.update(jit_code_mib_mean=sum(j[0] for j in jit) / len(jit), jit_flushes_max=max(j[1] for j in jit))
            if method == WARM:
                wait_pool_ready(paths, n)
            row["snapshot_first_child_s"], row["snapshot_all_children_s"] = children_of_snapshot(
                extra["snapshot"], name, n, paths)
        if method == "hvkit fork" and n == 1:
            # fork the child in turn: its cost follows the pages it wrote, not its size
            again = fork(children[0].name, 1, paths)
            row.update(refork_pages_written=again.pages_written, refork_snapshot_s=again.snapshot_seconds,
                       refork_first_child_s=again.children[0].seconds,
                       refork_tables_written=again.counters["tables_written"],
                       refork_parent_paused_s=again.parent_paused_seconds)
            # and reset it: back at its snapshot, its writes dropped
            reset = reset_child(children[0].name, paths)
            row.update(reset_s=reset.seconds, reset_stopped_s=reset.stopped_seconds,
                       reset_pages_dropped=reset.pages_dropped)
        return row
    finally:
        _clean_up(children, paths, server, root)


def median_row(runs: list[dict]) -> dict:
    """The run with the median first-child time, with every run's times attached."""
    row = dict(sorted(runs, key=lambda r: r["first_child_s"])[len(runs) // 2])
    row["runs"] = len(runs)
    row["first_child_samples_s"] = [r["first_child_s"] for r in runs]
    row["all_children_samples_s"] = [r["all_children_s"] for r in runs]
    return row


def picture(rows: list[dict], path: Path) -> None:
    """Time to the first child against size (N = 1), PSS per idle child against N (at the
    largest size measured), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    sizes = sorted({r["size"] for r in rows}, key=parse_size)
    largest = sizes[-1] if sizes else None
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        one = sorted((r for r in mine if r["n"] == 1), key=lambda r: parse_size(r["size"]))
        a.plot([parse_size(r["size"]) / MiB for r in one], [r["first_child_s"] * 1000 for r in one], "o-", label=method)
        by_n = sorted((r for r in mine if r["size"] == largest), key=lambda r: r["n"])
        b.plot([r["n"] for r in by_n], [r["pss_mib_mean"] for r in by_n], "o-", label=method)
    a.set(xscale="log", yscale="log", xlabel="guest memory (MiB)", ylabel="first child running (ms)",
          title="time to the first child (N = 1)")
    b.set(xscale="log", yscale="log", xlabel="children N", ylabel="PSS per idle child (MiB)",
          title=f"host memory per child ({largest})")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    a.set_xticks([parse_size(s) / MiB for s in sizes])
    b.set_xticks(sorted({r["n"] for r in rows}))
    for ax in (a, b):  # plain numbers on the log axes: the sizes and Ns measured, every y tick
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="y", which="minor", labelsize="x-small")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256M,1G,4G")
    ap.add_argument("--children", default="1,8")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds before PSS is read (N > 1)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of hvkit fork per case (median shown)")
    ap.add_argument("--json", default=str(Path(__file__).resolve().parents[1] / "docs" / "results" / "fork.json"),
                    help="results (default docs/results/fork.json: bench/report.py writes docs from it)")
    ap.add_argument("--image-guest", action=argparse.BooleanOptionalAction, default=True,
                    help="also fork a Debian image guest (default on)")
    ap.add_argument("--image-memory", default="1G", help="memory of the Debian image guest")
    ap.add_argument("--image-children", type=int, default=4, help="children of the Debian image guest")
    ap.add_argument("--image-methods", default=f"hvkit fork,{UNSETTLED},migrate + restore,template copy")
    ap.add_argument("--vm-name", default="bench", help="name of the parent VM (children: NAME-1, ...)")
    ap.add_argument("--plot-only", action="store_true", help="draw the PNG again from --json, run nothing")
    args = ap.parse_args()
    if args.plot_only:
        rows = json.loads(Path(args.json).read_text())["rows"]
        picture(rows, Path(args.json).with_suffix(".png"))
        print(f"wrote {Path(args.json).with_suffix('.png')}")
        return 0
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid>: where is it stuck?
    paths = Paths.from_env()
    build_default_guest(paths)
    methods = ["hvkit fork", WARM, "migrate + restore", "template copy"]
    sizes = [s for s in args.sizes.split(",") if s]  # --sizes '': the Debian guest only
    rows = []
    for size in sizes:
        for n in (int(x) for x in args.children.split(",")):
            for method in methods:
                # hvkit's times are tens of ms, where a busy moment of this shared host
                # shows: the median of --repeat runs (samples kept in the JSON); the
                # baselines take seconds and run once
                runs = [run_case(size, n, method, paths, args.settle, args.vm_name)
                        for _ in range(args.repeat if method in ("hvkit fork", WARM) else 1)]
                row = median_row(runs)
                rows.append(row)
                print(f"{size} N={n} {method}: first child {row['first_child_s'] * 1000:.0f} ms, "
                      f"all {row['all_children_s'] * 1000:.0f} ms, PSS {row['pss_mib_mean']:.0f} MiB/child",
                      file=sys.stderr, flush=True)
    by = {(r["size"], r["n"], r["method"]): r for r in rows}
    for r in rows:
        ours = by[(r["size"], r["n"], "hvkit fork")]
        r["first_child_vs_hvkit"] = r["first_child_s"] / ours["first_child_s"]
        r["all_children_vs_hvkit"] = r["all_children_s"] / ours["all_children_s"]
    if rows:
        print_table(["size", "N", "method", "first child ms", "all N ms", "x hvkit (first)", "x hvkit (all)",
                     "parent paused ms", "PSS MiB/child", "after s", "jit MiB / flushes"],
                    [[r["size"], r["n"], r["method"], f"{r['first_child_s'] * 1000:.0f}",
                      f"{r['all_children_s'] * 1000:.0f}", f"{r['first_child_vs_hvkit']:.1f}",
                      f"{r['all_children_vs_hvkit']:.1f}",
                      f"{r['parent_paused_s'] * 1000:.0f}" if "parent_paused_s" in r else "until the end",
                      f"{r['pss_mib_mean']:.1f}", f"{r['settle_s']:.0f}",
                      f"{r['jit_code_mib_mean']:.1f} / {r['jit_flushes_max']}" if "jit_code_mib_mean" in r else "-"]
                     for r in rows], title="fork: time until children run, host memory they hold")
        snaps = [r for r in rows if "snapshot_first_child_s" in r]
        if snaps:
            cold = {(r["size"], r["n"]): r for r in snaps if r["method"] == "hvkit fork"}
            print_table(["size", "N", "method", "first child ms", "all N ms", "x warm (first)"],
                        [[r["size"], r["n"], r["method"], f"{r['snapshot_first_child_s'] * 1000:.1f}",
                          f"{r['snapshot_all_children_s'] * 1000:.1f}",
                          f"{cold[(r['size'], r['n'])]['snapshot_first_child_s'] / r['snapshot_first_child_s']:.1f}"
                          if r["method"] == WARM and (r["size"], r["n"]) in cold else "-"] for r in snaps],
                        title="more children of the same snapshot (hvkit fork --snapshot): the child's own path")
        resets = [r for r in rows if "reset_s" in r]
        if resets:
            print_table(["size", "pages the child wrote", "reset ms", "not running ms"],
                        [[r["size"], r["reset_pages_dropped"], f"{r['reset_s'] * 1000:.0f}",
                          f"{r['reset_stopped_s'] * 1000:.0f}"] for r in resets], title="vm reset of that child")
    image_rows = []
    if args.image_guest:
        for method in [m for m in args.image_methods.split(",") if m]:
            try:
                row = run_image_case(args.image_memory, args.image_children, method, paths, args.settle,
                                     args.vm_name)
            except Exception as e:  # a baseline that cannot run on a disk guest says so in the table
                print(f"debian {method}: failed: {e}", file=sys.stderr, flush=True)
                row = {"guest": "debian", "size": args.image_memory, "n": args.image_children, "method": method,
                       "error": f"{type(e).__name__}: {e}"}
            image_rows.append(row)
            if "error" not in row:
                print(f"debian {args.image_memory} N={args.image_children} {method}: first child runs "
                      f"{row['first_child_s'] * 1000:.0f} ms, all {row['all_children_s'] * 1000:.0f} ms, "
                      f"agents {row['all_agents_s']:.1f} s, PSS {row['pss_mib_mean']:.0f} MiB/child",
                      file=sys.stderr, flush=True)
        ours = next((r for r in image_rows if r["method"] == "hvkit fork" and "error" not in r), None)
        for r in image_rows:
            if ours and "error" not in r:
                r["first_child_vs_hvkit"] = r["first_child_s"] / ours["first_child_s"]
                r["all_children_vs_hvkit"] = r["all_children_s"] / ours["all_children_s"]

        def ms(v):
            return "-" if v is None else f"{v * 1000:.0f}"

        print_table(["size", "N", "method", "first runs ms", "all run ms", "x hvkit (first)", "x hvkit (all)",
                     "first agent ms", "all agents ms", "fork done ms", "PSS MiB/child", "after s"],
                    [[r["size"], r["n"], r["method"], "failed: " + r["error"][:60], "", "", "", "", "", "", "", ""]
                     if "error" in r else
                     [r["size"], r["n"], r["method"], ms(r["first_child_s"]), ms(r["all_children_s"]),
                      f"{r['first_child_vs_hvkit']:.1f}" if "first_child_vs_hvkit" in r else "-",
                      f"{r['all_children_vs_hvkit']:.1f}" if "all_children_vs_hvkit" in r else "-",
                      ms(r["first_agent_s"]), ms(r["all_agents_s"]), ms(r["all_fork_done_s"]),
                      f"{r['pss_mib_mean']:.1f}", f"{r['settle_s']:.0f}"] for r in image_rows],
                    title="fork of a Debian 12 image guest (disk frozen at the fork, an overlay per child); "
                          "'fork done': hvkit's fork returned (agent, clock, own MAC and DHCP lease per child)")
    first = {s: by[(s, 1, "hvkit fork")]["first_child_s"] for s in sizes if (s, 1, "hvkit fork") in by}
    summary = {"first_child_max_s": max(first.values()) if first else None}
    if len(first) > 1:
        small, big = min(first, key=parse_size), max(first, key=parse_size)
        summary["largest_vs_smallest_first_child"] = first[big] / first[small]
    if ("1G", 8, "hvkit fork") in by:
        summary["pss_mib_max_1g_8"] = by[("1G", 8, "hvkit fork")]["pss_mib_max"]
    if ("1G", 1, "migrate + restore") in by:
        summary["migrate_restore_vs_hvkit_1g"] = by[("1G", 1, "migrate + restore")]["first_child_vs_hvkit"]
    refork = [r for r in rows if "refork_pages_written" in r]
    if refork:
        print_table(["size", "pages the child wrote", "tables written", "snapshot ms", "its child running ms"],
                    [[r["size"], r["refork_pages_written"], r["refork_tables_written"],
                      f"{r['refork_snapshot_s'] * 1000:.0f}", f"{r['refork_first_child_s'] * 1000:.0f}"]
                     for r in refork], title="forking a forked VM (1 s after it was born)")
    print(json.dumps(summary, indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    if image_rows:
        ours = next((r for r in image_rows if r["method"] == "hvkit fork" and "error" not in r), None)
        if ours:
            summary["debian_first_child_s"] = ours["first_child_s"]
            summary["debian_all_children_s"] = ours["all_children_s"]
            summary["debian_pss_mib_max"] = ours["pss_mib_max"]
    Path(args.json).write_text(json.dumps({"rows": rows, "image_rows": image_rows, "summary": summary,
                                           "host_cores": os.cpu_count(), "run": run_info()}, indent=1) + "\n")
    if rows:
        picture(rows, Path(args.json).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
