"""bench/service: the pauses of the host service (`hvkit share --all --watch`) on several
VMs, on an idle machine and on one loaded to twice its cores, against the per-VM
watchers it replaces (one `hvkit share VM --watch` each).

    .venv/bin/python bench/service.py [--vms 6] [--memory 256M] [--seconds 60] [--watch 1]
                                      [--children 0] [--arms idle,loaded,loaded-nice0,watchers]
                                      [--json docs/results/service.json] [--vm-prefix svc-bench]

The VMs (default guests, in a runtime folder of the bench's own) run workloads that
allocate and free all the time, so every share has pages to give back: half run the
memory checker (`memcheck:96`, which also proves no page of guest data is lost: its
error count is recorded), half allocate and free in a loop (`alloc` again and again
through the guest's control port). With --children N, the first VM is forked into N
children (`hvkit fork`), which join the service's VMs (their RAM, and the forked
parent's, is private to QEMU: given back by an madvise run inside QEMU).

Arms, one after the other, each --seconds long, on the same VMs:
  idle           the service, as its systemd unit runs it (nice NICE), nothing else added
  loaded         the same, with 2 x cores busy loops (nice 0) beside it
  loaded-nice0   the service at nice 0 under the same load
  watchers       under the same load, one `hvkit share VM --watch` per VM (what the
                 service replaces; each pause punches until 90% of --max-pause)

Reported per arm: pauses, p50 / p99 / longest pause, pauses over the budget, MiB given
back, the load average over the arm; and the longest pause as a ratio of the watchers'.
Targets (issue 22): pause p99 <= 100 ms idle, longest <= 250 ms loaded to 2 x cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import memcheck_summary, stop_vms_and_memserver  # noqa: E402
from runinfo import run_info  # noqa: E402  (bench/ is on sys.path: the script's own folder)

from hvkit.config import Paths  # noqa: E402
from hvkit.guest import build_default_guest  # noqa: E402
from hvkit.guest.control import request  # noqa: E402
from hvkit.qemu import find_vm, list_vms, start_vm  # noqa: E402
from hvkit.sharing.unit import NICE  # noqa: E402

MiB = 1 << 20
HVKIT = [sys.executable, "-m", "hvkit"]


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))] if s else 0.0


class Churn(threading.Thread):
    """Keeps the 'alloc' guests allocating and freeing: `run alloc MIB` again whenever
    the last one is done."""

    def __init__(self, vms, mib: int) -> None:
        super().__init__(daemon=True)
        self.vms, self.mib, self.stopped = vms, mib, threading.Event()
        self.failed = 0

    def run(self) -> None:
        while not self.stopped.is_set():
            for vm in self.vms:
                try:
                    start = len(vm.console())
                    request(vm, f"run alloc {self.mib}", until="HVKIT-RUNNING alloc")
                    vm.wait_for_console(rf"HVKIT-ALLOC done mib={self.mib}", timeout=60, after=start)
                except Exception:  # noqa: BLE001  (paused by a share, or starved: next round)
                    self.failed += 1
            self.stopped.wait(1.0)


def busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def run_arm(arm: str, names: list[str], env: dict, seconds: float, watch: float, max_pause: float) -> dict:
    """One arm: the service (or the watchers) for `seconds`; their pauses from --json."""
    nice = {"idle": NICE, "loaded": NICE, "loaded-nice0": 0, "watchers": 0}[arm]
    load = busy_loops(2 * os.cpu_count()) if arm != "idle" else []
    if arm == "watchers":
        cmds = [[*HVKIT, "share", n, "--watch", str(watch), "--max-pause", str(max_pause), "--json"] for n in names]
    else:
        cmds = [[*HVKIT, "share", "--all", "--watch", str(watch), "--max-pause", str(max_pause), "--json"]]
    procs = [subprocess.Popen(["nice", "-n", str(nice), *c], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for c in cmds]
    lines: list[list[str]] = [[] for _ in procs]
    logs: list[list[str]] = [[] for _ in procs]
    readers = [threading.Thread(target=lambda f=f, sink=sink: sink.extend(f), daemon=True)
               for p, out, log in zip(procs, lines, logs) for f, sink in ((p.stdout, out), (p.stderr, log))]
    for t in readers:
        t.start()
    # a loaded machine starts Python slowly: the clock starts once each process works (its
    # first share, or the service's first log line: it may decide not to pause at all)
    deadline = time.monotonic() + 180
    while (not all(out or log for out, log in zip(lines, logs)) and time.monotonic() < deadline
           and all(p.poll() is None for p in procs)):
        time.sleep(0.1)
    load_start = os.getloadavg()
    time.sleep(seconds)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(timeout=120)
    for t in readers:
        t.join(timeout=30)
    errs = ["".join(log) for log in logs]
    for p in load:
        p.kill()
        p.wait()
    pauses, given, refused, shared_vms = [], 0, set(), set()
    for out, err, cmd in zip(lines, errs, cmds):
        for line in out:
            r = json.loads(line)
            pauses += [p for p, _, _ in r["pause_log"]]
            given += r["released_bytes"]
            shared_vms.add(r.get("vm", cmd[4]))
        refused |= set(re.findall(r"(\S+): not shared:", err))
        if "Traceback" in err or not out:
            print(f"{arm}: {' '.join(cmd[3:5])}: {err.strip()[-500:]}", file=sys.stderr)
    row = {"arm": arm, "nice": nice, "busy_loops": len(load), "pauses": len(pauses),
           "p50_s": percentile(pauses, 0.5), "p99_s": percentile(pauses, 0.99), "max_s": max(pauses, default=0.0),
           "over_budget": sum(p > max_pause for p in pauses), "given_mib": given / MiB,
           "vms_shared": sorted(shared_vms), "vms_refused": sorted(refused),
           "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
           "exit_codes": [p.returncode for p in procs]}
    print(f"{arm:13} nice {nice:3}  pauses {row['pauses']:5}  p50 {row['p50_s'] * 1000:5.0f} ms  p99 "
          f"{row['p99_s'] * 1000:5.0f} ms  max {row['max_s'] * 1000:5.0f} ms  over {row['over_budget']:3}  "
          f"given {row['given_mib']:7.1f} MiB  load {row['loadavg_end'][0]:.1f}", flush=True)
    return row


def targets_of(by: dict[str, dict], cores: int) -> dict:
    """The issue's two targets from the arms: None where an arm took no pause (nothing
    measured), and with the load each arm really ran at (the targets assume an idle
    machine, and one loaded to 2 x cores)."""
    def arm(name: str, key: str, limit: float) -> dict:
        r = by.get(name)
        if r is None or not r["pauses"]:
            return {"value_s": None, "met": None, "load": r and r["loadavg_end"][0]}
        return {"value_s": r[key], "met": r[key] <= limit, "load": r["loadavg_end"][0],
                "conditions_as_asked": r["loadavg_start"][0] < (1 if name == "idle" else 2 * cores + 1)}
    return {"idle_p99": arm("idle", "p99_s", 0.1), "loaded_max": arm("loaded", "max_s", 0.25), "cores": cores}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=6)
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each arm")
    ap.add_argument("--watch", type=float, default=1.0, help="the service's interval")
    ap.add_argument("--max-pause", type=float, default=0.1)
    ap.add_argument("--children", type=int, default=0, help="fork the first VM into this many children")
    ap.add_argument("--arms", default="idle,loaded,loaded-nice0,watchers")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "service.json")
    ap.add_argument("--vm-prefix", default="svc-bench")
    a = ap.parse_args()

    base = Paths.from_env()
    runtime = Path(tempfile.mkdtemp(prefix="hvkit-bench-service-", dir="/dev/shm"))
    paths = Paths(base.cache, runtime)
    env = {**os.environ, "HVKIT_RUNTIME": str(runtime)}
    build_default_guest(paths)
    rows, checks = [], {}
    try:
        vms = []
        for i in range(a.vms):
            workload = "memcheck:96" if i % 2 == 0 else "idle"
            vms.append(start_vm(f"{a.vm_prefix}-{i}", memory=a.memory, workload=workload, paths=paths))
        for vm in vms:
            vm.wait_for_console(r"HVKIT-MEMCHECK round=1 " if vm.spec.workload.startswith("memcheck") else
                                r"HVKIT-READY", timeout=300)
        if a.children:
            fork = subprocess.run([*HVKIT, "fork", vms[0].name, "-n", str(a.children)], capture_output=True,
                                  text=True, env=env)
            if fork.returncode != 0:
                print(f"fork failed: {fork.stderr.strip()}", file=sys.stderr)
        churn = Churn([v for v in vms if not v.spec.workload.startswith("memcheck")], 96)
        churn.start()
        names = [r.name for r in list_vms(paths) if r.state == "running"]
        print(f"{len(names)} VMs: {', '.join(names)}; uptime: {os.getloadavg()}", flush=True)
        for arm in [x for x in a.arms.split(",") if x]:
            rows.append(run_arm(arm, names, env, a.seconds, a.watch, a.max_pause))
        churn.stopped.set()
        churn.join(timeout=90)
        for vm in vms:
            if vm.spec.workload.startswith("memcheck"):
                checks[vm.name] = memcheck_summary(find_vm(vm.name, paths).console())
    finally:
        stop_vms_and_memserver(paths, env, HVKIT)
        subprocess.run(["rm", "-rf", str(runtime)])
    watchers = next((r for r in rows if r["arm"] == "watchers"), None)
    for r in rows:
        r["max_vs_watchers"] = r["max_s"] / watchers["max_s"] if watchers and watchers["max_s"] else None
    by = {r["arm"]: r for r in rows}
    targets = targets_of(by, os.cpu_count() or 1)
    doc = {"vms": a.vms, "memory": a.memory, "children": a.children, "seconds": a.seconds, "watch": a.watch,
           "max_pause": a.max_pause, "arms": rows, "memcheck": checks, "targets": targets, "run": run_info()}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(doc, indent=2))
    print(f"targets: {targets}; memcheck {checks}")
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
