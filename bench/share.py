"""bench/share: giving a guest's free memory back to the host, three ways, one run.

    .venv/bin/python bench/share.py [--memory 1G] [--alloc 768] [--fragment 512]
                                    [--json docs/results/share.json] [--plot docs/results/share.png]
                                    [--page-cache | --no-page-cache] [--page-cache-memory 1G]
                                    [--page-cache-arms ...] [--vm-prefix bench-share]

Arms (same guest kernel, same workload, one guest at a time so they do not compete
for the 2 cores):
  hvkit share      default RAM file; `Sharer.share` every --period seconds (default 0.5),
                   as `hvkit share --watch 0.5` does
  KSM              RAM inside QEMU (anonymous, mem-merge on); the host's ksmd merges
                   identical pages (settings below, restored afterwards)
  page reporting   virtio-balloon with free-page-reporting=on; the guest's driver
                   reports free blocks of 2 MiB and up, QEMU discards them

Workload: the guest allocates and touches --alloc MiB (default: all its free memory but
64 MiB) and frees it (phase A), then
allocates --fragment MiB and frees every other page (phase B: free memory in 4 KiB
holes). Measured per arm: host memory of the VM over time (sampled every 0.1 s), time
to give back 80% and 90% of the guest's free memory after phase A (for hvkit this
includes waiting for its next cycle), what is given back in each
phase, the longest pause (hvkit), and host CPU seconds per GiB given back (hvkit: the
sharing thread; KSM: ksmd, counted until it has given back as much as hvkit did).
Page cache (--page-cache, on by default; issue 14): a Debian 12 image guest
(--page-cache-memory, default 1 GiB) reads its libraries and programs, then writes and
reads back a file of random bytes in /var/tmp as big as its MemFree less
--page-cache-reserve MiB (over ssh), so most of its RAM is page cache; nothing is
dropped. Then, per arm: hvkit shares once (`Sharer.share`); KSM runs for --ksm-seconds;
page reporting is given --settle seconds. Reported: the guest's MemFree and Cached
(/proc/meminfo) after the fill, host memory of the VM before and after, and what was
given back: hvkit (and page reporting) give back free pages only, so the row shows how
little is left when the page cache has taken the memory. One VM at a time.

RAM private to QEMU (--private, issue 22; its own JSON, --private-json): a default guest
forked into one child, then a guest with anonymous RAM (--private-memory each); each
allocates all its free memory but 12 MiB and frees it, then one share (an madvise
injected into QEMU over ptrace). Reported: the guest's MemFree (frozen ground truth),
QEMU's own pages of guest RAM, RSS and PSS before and after, the host's MemAvailable
gain (other jobs move it too), pages dropped, runs, and the time the share held the VM
paused for (identify + drop; the guest is paused by the ground-truth freeze meanwhile).
    .venv/bin/python bench/share.py --arms '' --no-page-cache --private

Targets (issue 6): 90% of MemFree of a 1 GiB guest back within 1 s with the guest
paused at most 100 ms; at least 2x what page reporting gives back on fragmented
memory; fewer CPU seconds per GiB than KSM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import KSM, KSM_SETTINGS, KsmOn, guest_meminfo, host_mem_available, ksmd_cpu, rss_pss  # noqa: E402
from runinfo import run_info  # noqa: E402  (bench/ is on sys.path: the script's own folder)

from hvkit.cli.pictures import timeline_picture  # noqa: E402
from hvkit.config import Paths  # noqa: E402
from hvkit.guest import build_default_guest  # noqa: E402
from hvkit.guest.control import frozen_ground_truth, ground_truth, request  # noqa: E402
from hvkit.qemu import VM, start_vm  # noqa: E402
from hvkit.sharing import Sharer  # noqa: E402

MiB = 1 << 20


@dataclass
class Samples:
    """(seconds since the arm started, host bytes of the VM, agent CPU seconds)."""

    points: list[tuple[float, int, float]] = field(default_factory=list)

    def given_back(self, since: float, until: float | None = None) -> tuple[int, int]:
        """(peak host bytes after `since`, bytes given back from that peak by `until`)."""
        window = [p for p in self.points if p[0] >= since and (until is None or p[0] <= until)]
        peak_i = max(range(len(window)), key=lambda i: window[i][1])
        peak = window[peak_i][1]
        return peak, peak - min(p[1] for p in window[peak_i:])

    def first_time(self, since: float, condition) -> tuple[float, float] | None:
        """(seconds after `since`, agent CPU seconds spent since then) when `condition`
        of the host bytes first holds."""
        start_cpu = next((p[2] for p in self.points if p[0] >= since), 0.0)
        for t, host, cpu in self.points:
            if t >= since and condition(host):
                return t - since, cpu - start_cpu
        return None


def run_workload(vm: VM, lock: threading.Lock, line: str, done: str, timeout: float = 300) -> None:
    start = len(vm.console())
    with lock:  # the guest answers only while it runs: not during a share cycle
        request(vm, line, until="HVKIT-RUNNING")
    vm.wait_for_console(done, timeout=timeout, after=start)


def settle(samples: Samples, since: float, t0: float, quiet_s: float, limit_s: float) -> None:
    """Waits until host memory has not moved by more than 1 MiB for `quiet_s`, at most
    `limit_s` after `since`."""
    while time.monotonic() - t0 < since + limit_s:
        time.sleep(0.5)
        recent = [p[1] for p in samples.points if p[0] >= time.monotonic() - t0 - quiet_s]
        if time.monotonic() - t0 > since + quiet_s and recent and max(recent) - min(recent) < MiB:
            return


def run_arm(arm: str, args, paths: Paths) -> dict:
    options = {"hvkit share": {}, "KSM": {"ram": "anonymous"}, "page reporting": {"balloon": True}}[arm]
    samples, stop, cpu, lock = Samples(), threading.Event(), [0.0], threading.Lock()
    pauses: list[float] = []
    with start_vm(f"{args.vm_prefix}-{arm.split()[0].lower()}", memory=args.memory, paths=paths, **options) as vm:
        t0 = time.monotonic()
        ksm_cpu0 = ksmd_cpu()

        def sample() -> None:
            while not stop.is_set():
                agent = ksmd_cpu() - ksm_cpu0 if arm == "KSM" else cpu[0]
                samples.points.append((time.monotonic() - t0, vm.host_memory(), agent))
                time.sleep(0.1)

        def share_loop() -> None:
            sharer = Sharer(vm, paths)
            while not stop.is_set():
                c0 = time.thread_time()
                with lock:
                    r = sharer.share()
                cpu[0] += time.thread_time() - c0
                pauses.append(r.paused_s)
                stop.wait(max(0.0, args.period - r.seconds))

        threads = [threading.Thread(target=sample, daemon=True)]
        if arm == "hvkit share":
            threads.append(threading.Thread(target=share_loop, daemon=True))
        with KsmOn() if arm == "KSM" else contextlib.nullcontext():
            try:
                for t in threads:
                    t.start()
                with lock:
                    free_mib = ground_truth(vm).meminfo["MemFree"] // MiB
                alloc = args.alloc or free_mib - 64
                if max(alloc, args.fragment) > free_mib - 32:
                    raise SystemExit(f"bench/share: a {args.memory} guest has {free_mib} MiB free; "
                                     f"--alloc/--fragment must stay below {free_mib - 32}")
                a_start = time.monotonic() - t0
                run_workload(vm, lock, f"run alloc {alloc}", f"HVKIT-ALLOC done mib={alloc}")
                a_done = time.monotonic() - t0
                with lock:
                    free_a = ground_truth(vm).meminfo["MemFree"]
                settle(samples, a_done, t0, quiet_s=5, limit_s=args.settle)
                b_start = time.monotonic() - t0
                run_workload(vm, lock, f"run fragment {args.fragment}", "HVKIT-FRAGMENT holding")
                b_done = time.monotonic() - t0
                settle(samples, b_done, t0, quiet_s=5, limit_s=args.settle)
                end = time.monotonic() - t0
            finally:
                stop.set()
                for t in threads:
                    t.join(timeout=30)
    peak_a, given_a = samples.given_back(a_start, b_start)
    peak_b, given_b = samples.given_back(b_start)
    reach80 = samples.first_time(a_done, lambda host: peak_a - host >= 0.8 * free_a)
    reach90 = samples.first_time(a_done, lambda host: peak_a - host >= 0.9 * free_a)
    return {"arm": arm, "alloc_mib": alloc, "guest_memfree_after_alloc": free_a, "peak_a": peak_a, "given_back_a": given_a,
            "given_back_a_share_of_memfree": given_a / free_a, "peak_b": peak_b, "given_back_b": given_b,
            "seconds_to_80pct": reach80[0] if reach80 else None,
            "seconds_to_90pct": reach90[0] if reach90 else None, "phase_times": [a_start, a_done, b_start, b_done, end],
            "max_pause_s": max(pauses) if pauses else None,
            "samples": samples.points, "_samples": samples}


def cpu_per_gib(row: dict, target: int) -> float | None:
    """Agent CPU seconds per GiB given back in phase A, from the start of phase A until
    the arm has given back `target` bytes (or until phase A ends, if it never does)."""
    if row["arm"] == "page reporting":
        return None  # the work happens in the guest's driver and in QEMU: not separable
    points = row["_samples"].points
    a_start, a_done, b_start = row["phase_times"][:3]
    goal = min(target, row["given_back_a"])

    def cpu_at(t: float) -> float:
        return next((p[2] for p in points if p[0] >= t), points[-1][2])

    hit = next((p for p in points if a_done <= p[0] <= b_start and row["peak_a"] - p[1] >= goal), None)
    spent = (hit[2] if hit else cpu_at(b_start)) - cpu_at(a_start)
    return spent / (goal / (1 << 30)) if goal > 0 else None


def run_page_cache_arm(arm: str, args, paths: Paths) -> dict:
    """A Debian image guest whose RAM is mostly page cache, then one arm (module comment)."""
    options = {"hvkit share": {}, "KSM": {"ram": "anonymous"}, "page reporting": {"balloon": True}}[arm]
    samples, stop = Samples(), threading.Event()
    name = f"{args.vm_prefix}-cache-{arm.split()[0].lower()}"
    t_boot = time.monotonic()
    with start_vm(name, memory=args.page_cache_memory, image="debian", disk_size=args.page_cache_disk,
                  paths=paths, **options) as vm:
        boot_s = time.monotonic() - t_boot
        t0 = time.monotonic()
        ksm_cpu0 = ksmd_cpu()

        def sample() -> None:
            while not stop.is_set():
                samples.points.append((time.monotonic() - t0, vm.host_memory(), ksmd_cpu() - ksm_cpu0))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            boot_info = guest_meminfo(vm)
            fill_mib = max(0, boot_info["MemFree"] // MiB - args.page_cache_reserve)
            script = ("cat /usr/lib/x86_64-linux-gnu/*.so* /usr/bin/* /usr/sbin/* > /dev/null 2>&1; "
                      f"dd if=/dev/urandom of=/var/tmp/fill bs=1M count={fill_mib} status=none && "
                      "sync && cat /var/tmp/fill > /dev/null")
            t_fill = time.monotonic()
            subprocess.run(vm.ssh_command("sh", "-c", script), check=True, timeout=900,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            fill_s = time.monotonic() - t_fill
            time.sleep(3.0)
            info = guest_meminfo(vm)
            host_before = vm.host_memory()
            act_start = time.monotonic() - t0
            share = None
            if arm == "hvkit share":
                share = Sharer(vm, paths).share()
                time.sleep(1.0)
                window_s = share.seconds
            elif arm == "KSM":
                with KsmOn():
                    time.sleep(args.ksm_seconds)
                    host_ksm = vm.host_memory()
                window_s = args.ksm_seconds
            else:
                time.sleep(args.settle)
                window_s = args.settle
            host_after = host_ksm if arm == "KSM" else vm.host_memory()
        finally:
            stop.set()
            sampler.join(timeout=30)
    cpu = samples.points[-1][2] - next((p[2] for p in samples.points if p[0] >= act_start), 0.0) \
        if arm == "KSM" and samples.points else None
    return {"arm": arm, "memory": args.page_cache_memory, "boot_s": boot_s, "fill_mib": fill_mib,
            "fill_s": fill_s, "guest_memtotal": info["MemTotal"], "guest_memfree": info["MemFree"],
            "guest_cached": info["Cached"], "guest_memfree_after_boot": boot_info["MemFree"],
            "host_before": host_before, "host_after": host_after, "given_back": host_before - host_after,
            "window_s": window_s, "ksmd_cpu_s": cpu,
            "share": share.to_json() if share else None, "samples": samples.points}


def print_page_cache(rows: list[dict], args) -> None:
    print(f"\npage cache: Debian 12 image guest, {args.page_cache_memory}, a file of random bytes written and "
          f"read back until MemFree is about {args.page_cache_reserve} MiB; nothing dropped")
    print(f"{'arm':>15} {'MemTotal':>8} {'MemFree':>7} {'Cached':>7} {'host before':>11} {'given back':>10} "
          f"{'host after':>10} {'% MemFree':>9} {'over s':>6}  note")
    notes = {"hvkit share": "one share: free pages only",
             "KSM": "merges identical pages only (page cache of distinct data: few)",
             "page reporting": "guest reports free blocks >= 2 MiB (also during boot and fill)"}
    for r in rows:
        if "error" in r:
            print(f"{r['arm']:>15} could not run on this guest: {r['error'][:120]}")
            continue
        note = notes[r["arm"]]
        if r["arm"] == "hvkit share" and r["share"]:
            note += f" ({r['share']['free_pages'] * 4 // 1024} MiB on free lists, paused {r['share']['paused_s'] * 1000:.0f} ms)"
        if r["arm"] == "KSM" and r["ksmd_cpu_s"] is not None:
            note += f" (ksmd {r['ksmd_cpu_s']:.1f} CPU s)"
        print(f"{r['arm']:>15} {r['guest_memtotal'] / MiB:>4.0f} MiB {r['guest_memfree'] / MiB:>3.0f} MiB "
              f"{r['guest_cached'] / MiB:>3.0f} MiB {r['host_before'] / MiB:>7.0f} MiB {r['given_back'] / MiB:>6.0f} MiB "
              f"{r['host_after'] / MiB:>6.0f} MiB {100 * r['given_back'] / max(r['guest_memfree'], 1):>8.0f}% "
              f"{r['window_s']:>6.1f}  {note}")
    print("(MemFree, Cached: the guest's /proc/meminfo after the fill; host: memory the host holds for the VM; "
          "one guest at a time on a shared 2-core TCG host: noisy)")


def touch_and_share(vm: VM, paths: Paths, kind: str) -> dict:
    """The guest allocates all but 12 MiB of its free memory and frees it; then one
    `hvkit share` under a frozen ground truth: the guest's MemFree at that moment, QEMU's
    RSS/PSS and the host's MemAvailable just before and just after, in the same pause."""
    truth, _ = frozen_ground_truth(vm, lambda: None)
    mib = truth.meminfo["MemFree"] // MiB - 12
    start = len(vm.console())
    request(vm, f"run alloc {mib}", until="HVKIT-RUNNING alloc")
    vm.wait_for_console(rf"HVKIT-ALLOC done mib={mib}", timeout=600, after=start)
    vm.reload_spec()
    sharer = Sharer(vm, paths)
    sharer.share(dry_run=True)  # symbols, layout and the ptrace probe loaded before the frozen moment
    seen: dict = {}

    def share() -> None:
        seen["before"] = (vm.host_memory(), *rss_pss(vm.pid), host_mem_available())
        t = time.monotonic()
        seen["result"] = sharer.share()
        seen["in_pause_s"] = time.monotonic() - t  # identify + drop: what hvkit's own pause holds
        time.sleep(0.5)  # let the host account for what it freed
        seen["after"] = (vm.host_memory(), *rss_pss(vm.pid), host_mem_available())

    truth, _ = frozen_ground_truth(vm, share)
    r, before, after = seen["result"], seen["before"], seen["after"]
    return {"kind": kind, "vm": vm.name, "ram": vm.spec.ram, "guest_memfree": truth.meminfo["MemFree"],
            "touched_mib": mib, "free_pages": r.free_pages, "dropped_pages": r.given_pages, "runs": r.runs,
            "pauses": r.pauses, "in_pause_s": seen["in_pause_s"], "seconds": r.seconds,
            "host_before": before[0], "host_after": after[0], "rss_before": before[1], "rss_after": after[1],
            "pss_before": before[2], "pss_after": after[2], "mem_available_gain": after[3] - before[3],
            "given_back_share_of_memfree": (before[0] - after[0]) / max(truth.meminfo["MemFree"], 1),
            "loadavg": os.getloadavg()}


def run_private(args, paths: Paths) -> list[dict]:
    """RAM private to QEMU (issue 22): a VM forked into one child (both then map their
    snapshot privately) and a VM with anonymous RAM; one share each (touch_and_share)."""
    from hvkit.forking.forker import fork
    from hvkit.qemu import find_vm

    rows = []
    with start_vm(f"{args.vm_prefix}-priv", memory=args.private_memory, workload="idle", paths=paths) as vm:
        fork(vm.name, 1, paths)
        child = find_vm(f"{vm.name}-1", paths)
        try:
            rows.append(touch_and_share(find_vm(vm.name, paths), paths, "forked VM"))
            rows.append(touch_and_share(child, paths, "fork child"))
        finally:
            child.stop()
    with start_vm(f"{args.vm_prefix}-anon", memory=args.private_memory, ram="anonymous", workload="idle",
                  paths=paths) as vm:
        rows.append(touch_and_share(vm, paths, "anonymous RAM"))
    return rows


def print_private(rows: list[dict], args) -> None:
    print(f"\nRAM private to QEMU: {args.private_memory} guests, each after allocating all its free memory "
          "but 12 MiB and freeing it; one share (madvise injected into QEMU)")
    print(f"{'VM':>14} {'MemFree':>8} {'given back':>10} {'% MemFree':>9} {'RSS before/after':>17} "
          f"{'PSS before/after':>17} {'MemAvailable +':>14} {'pages':>7} {'runs':>5} {'in pause ms':>11}")
    for r in rows:
        print(f"{r['kind']:>14} {r['guest_memfree'] / MiB:>4.0f} MiB {(r['host_before'] - r['host_after']) / MiB:>6.0f} MiB "
              f"{100 * r['given_back_share_of_memfree']:>8.0f}% {r['rss_before'] / MiB:>7.0f} / {r['rss_after'] / MiB:>3.0f} MiB "
              f"{r['pss_before'] / MiB:>7.0f} / {r['pss_after'] / MiB:>3.0f} MiB {r['mem_available_gain'] / MiB:>10.0f} MiB "
              f"{r['dropped_pages']:>7} {r['runs']:>5} {r['in_pause_s'] * 1000:>11.0f}")
    print("(given back: QEMU's own pages of guest RAM before and after; MemAvailable: the whole host's, "
          "which other jobs move too; in pause: identify + drop, the VM held paused by the frozen ground truth)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", default="1G")
    ap.add_argument("--alloc", type=int, default=0,
                    help="MiB the guest allocates and frees (phase A); default: its MemFree less 64 MiB")
    ap.add_argument("--fragment", type=int, default=512, help="MiB it allocates, then frees every other page of")
    ap.add_argument("--period", type=float, default=0.5, help="seconds between hvkit share cycles")
    ap.add_argument("--settle", type=float, default=60.0, help="at most this many seconds per phase to settle")
    ap.add_argument("--arms", default="hvkit share,KSM,page reporting",
                    help="arms on the default guest ('' for none: the page cache rows only)")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "share.json",
                    help="results (default docs/results/share.json: bench/report.py writes docs from it)")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "results" / "share.png")
    ap.add_argument("--page-cache", action=argparse.BooleanOptionalAction, default=True,
                    help="also the Debian image guest whose memory is mostly page cache (default on)")
    ap.add_argument("--page-cache-memory", default="1G")
    ap.add_argument("--page-cache-disk", default="3G", help="its disk (room for the file it reads)")
    ap.add_argument("--page-cache-reserve", type=int, default=96,
                    help="MiB of its MemFree the file it writes and reads leaves out")
    ap.add_argument("--page-cache-arms", default="hvkit share,KSM,page reporting")
    ap.add_argument("--ksm-seconds", type=float, default=30.0, help="KSM's time on the page cache guest")
    ap.add_argument("--vm-prefix", default="bench-share", help="VM names: PREFIX-hvkit, PREFIX-cache-ksm, ...")
    ap.add_argument("--private", action=argparse.BooleanOptionalAction, default=False,
                    help="also RAM private to QEMU: a forked VM, its child, anonymous RAM (issue 22)")
    ap.add_argument("--private-memory", default="512M")
    ap.add_argument("--private-json", type=Path, default=ROOT / "docs" / "results" / "share-private.json")
    args = ap.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    cache_arms = [a for a in args.page_cache_arms.split(",") if a] if args.page_cache else []
    if ("KSM" in arms + cache_arms) and (os.geteuid() != 0 or not KSM.exists()):
        sys.exit("bench/share: the KSM arm needs root and /sys/kernel/mm/ksm")
    paths = Paths.from_env()
    guest = build_default_guest(paths)
    if args.private:
        print("running RAM private to QEMU ...", file=sys.stderr, flush=True)
        private_rows = run_private(args, paths)
        print_private(private_rows, args)
        args.private_json.parent.mkdir(parents=True, exist_ok=True)
        args.private_json.write_text(json.dumps({"memory": args.private_memory, "kernel": guest.release,
                                                 "rows": private_rows, "run": run_info()}, indent=2))
        print(f"written {args.private_json}")
        if not arms and not cache_arms:
            return
    rows = []
    for arm in arms:
        print(f"running arm: {arm} ...", file=sys.stderr, flush=True)
        rows.append(run_arm(arm, args, paths))
    cache_rows = []
    for arm in cache_arms:
        print(f"running page cache arm: {arm} ...", file=sys.stderr, flush=True)
        try:
            cache_rows.append(run_page_cache_arm(arm, args, paths))
        except Exception as e:  # an arm that cannot run on this guest says so in the table
            print(f"page cache arm {arm} failed: {e}", file=sys.stderr, flush=True)
            cache_rows.append({"arm": arm, "error": f"{type(e).__name__}: {e}"})
    if cache_rows:
        print_page_cache(cache_rows, args)
    if not rows:
        for r in cache_rows:
            r.pop("samples", None)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"page_cache": cache_rows, "run": run_info()}, indent=2))
        print(f"written {args.json}")
        return
    hvkit_row = next((r for r in rows if r["arm"] == "hvkit share"), rows[0])
    reporting = next((r for r in rows if r["arm"] == "page reporting"), None)
    for r in rows:
        r["cpu_s_per_gib"] = cpu_per_gib(r, hvkit_row["given_back_a"])
        # page reporting may give back nothing at all on fragmented memory: then the
        # ratio is reported against one MiB, and says so
        r["fragmented_vs_page_reporting"] = (r["given_back_b"] / max(reporting["given_back_b"], MiB)
                                             if reporting else None)

    def fmt(v, f="{:.2f}"):
        return "-" if v is None else f.format(v)

    print(f"guest {args.memory}, kernel {guest.release}; phase A: alloc+free {rows[0]['alloc_mib']} MiB, "
          f"phase B: fragment {args.fragment} MiB (every other page freed)")
    print(f"{'arm':>15} {'MemFree MiB':>11} {'given back A':>13} {'% MemFree':>9} {'to 80% s':>8} {'to 90% s':>8} "
          f"{'max pause ms':>12} {'given back B':>13} {'B vs reporting':>14} {'CPU s/GiB':>9}")
    for r in rows:
        print(f"{r['arm']:>15} {r['guest_memfree_after_alloc'] / MiB:>11.0f} {r['given_back_a'] / MiB:>9.0f} MiB "
              f"{100 * r['given_back_a_share_of_memfree']:>8.0f}% {fmt(r['seconds_to_80pct']):>8} {fmt(r['seconds_to_90pct']):>8} "
              f"{fmt(r['max_pause_s'] and r['max_pause_s'] * 1000, '{:.0f}'):>12} {r['given_back_b'] / MiB:>9.0f} MiB "
              f"{fmt(r['fragmented_vs_page_reporting'], '{:.1f}x'):>14} {fmt(r['cpu_s_per_gib']):>9}")
    if reporting and reporting["given_back_b"] < MiB:
        print("(page reporting gave back under 1 MiB of fragmented memory; 'B vs reporting' divides by 1 MiB)")
    series = {r["arm"]: [(t, host / MiB) for t, host, _ in r["samples"]] for r in rows}
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    timeline_picture(series, args.plot, f"host memory of a {args.memory} guest: alloc+free, then fragment")
    for r in rows:
        del r["_samples"]
    for r in cache_rows:
        r.pop("samples", None)
    args.json.write_text(json.dumps({"kernel": guest.release, "memory": args.memory,
                                     "fragment_mib": args.fragment, "ksm_settings": KSM_SETTINGS,
                                     "arms": rows, "page_cache": cache_rows, "run": run_info()}, indent=2))
    print(f"written {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
