"""bench/soak: the host service (`hvkit share --all --watch`) on forked and unforked VMs
for minutes, with fork, ps, identify, vol and dump run on the same VMs beside it, two
commands at a time; then every guest's memory checker must have found 0 corrupt words.

    .venv/bin/python bench/soak.py [--seconds 300] [--vms 2] [--children 2] [--forks 1]
                                   [--memory 256M] [--watch 1] [--json docs/results/soak.json]
                                   [--vm-prefix soak]

The VMs are default guests running the memory checker (`memcheck:64`: it keeps
checksummed data, allocates and frees all the time, and reports any word that changed);
the first is forked into --children children (which run the checker on from the fork),
and during the soak --forks more forks of a child are made (the service meets a VM whose
QEMU changes under it, and a grandchild). Two worker threads run, on VMs taken in turn,
`ps`, `identify --json`, `vol VM linux.pslist`, `vm dump` and (--forks times) `fork`, as
a user would from a shell; each command must succeed. The service runs as its systemd
unit does (nice NICE) and is stopped with SIGTERM at the end.

Reported: per VM, the checker's rounds, errors and corrupt words (the target: 0 in every
VM), and what the service gave back from it; per command, how many ran, failed, and their
median seconds; the machine's load. Issue 22: "a 5-minute soak with fork, ps, identify,
vol and dump beside the service ends with 0 corrupt words in every VM". Correctness, not
speed: there is no baseline to compare with, and the exit status says whether it held.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import checker_rounds, stop_vms_and_memserver  # noqa: E402
from runinfo import run_info  # noqa: E402  (bench/ is on sys.path: the script's own folder)

from hvkit.config import Paths  # noqa: E402
from hvkit.guest import build_default_guest  # noqa: E402
from hvkit.qemu import find_vm, list_vms, start_vm  # noqa: E402
from hvkit.sharing.unit import NICE  # noqa: E402

MiB = 1 << 20
HVKIT = [sys.executable, "-m", "hvkit"]


@dataclass
class Ops:
    """What the worker threads ran: per command, seconds of each success and failures."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, op: str, seconds: float, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.seconds.setdefault(op, []).append(seconds)
            else:
                self.failures.append(f"{op}: {error}")


def run_op(op: str, vm: str, env: dict, scratch: Path) -> str | None:
    """One command on VM `vm`; None when it succeeded, else its last line of error."""
    args = {"ps": ["ps", vm], "identify": ["identify", vm, "--json"], "vol": ["vol", vm, "linux.pslist"],
            "dump": ["vm", "dump", vm, "-o", str(scratch / f"{vm}.core")], "fork": ["fork", vm, "-n", "1"]}[op]
    proc = subprocess.run([*HVKIT, *args], capture_output=True, text=True, env=env, timeout=600)
    (scratch / f"{vm}.core").unlink(missing_ok=True)
    if proc.returncode == 0:
        return None
    return (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]


def worker(deadline: float, next_turn: Callable[[], tuple[str, str]], ops: Ops, env: dict, scratch: Path,
           forks: list[int], paths: Paths) -> None:
    """Runs the commands `next_turn` gives ((op, VM), shared by the workers) until
    `deadline`; a fork only while `forks` has some left, and of a forked child."""
    while time.monotonic() < deadline:
        op, vm = next_turn()
        if op == "fork":
            children = [r.name for r in list_vms(paths) if r.parent and r.state == "running"]
            with ops.lock:
                if not forks[0] or not children:
                    continue
                forks[0] -= 1
            vm = children[0]
        t0 = time.monotonic()
        error = run_op(op, vm, env, scratch)
        ops.record(op, time.monotonic() - t0, None if error is None else f"{vm}: {error}")


def wait_for_rounds(names: list[str], paths: Paths, rounds: int, timeout: float) -> None:
    """Until every VM's checker has finished `rounds` more rounds (each checks every chunk
    once), so that data written before the end of the soak has been checked again."""
    start = {n: (checker_rounds(find_vm(n, paths).console()) or [(0, 0)])[-1][0] for n in names}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((checker_rounds(find_vm(n, paths).console()) or [(0, 0)])[-1][0] >= start[n] + rounds for n in names):
            return
        time.sleep(1.0)
    print(f"not every checker finished {rounds} more rounds in {timeout:.0f} s", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300.0, help="length of the soak")
    ap.add_argument("--vms", type=int, default=2, help="VMs started (each runs the memory checker)")
    ap.add_argument("--children", type=int, default=2, help="children the first VM is forked into first")
    ap.add_argument("--forks", type=int, default=1, help="forks of a child made during the soak")
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--watch", type=float, default=1.0, help="the service's interval")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "soak.json")
    ap.add_argument("--vm-prefix", default="soak")
    a = ap.parse_args()

    base = Paths.from_env()
    runtime = Path(tempfile.mkdtemp(prefix="hvkit-bench-soak-", dir="/dev/shm"))
    scratch = Path(tempfile.mkdtemp(prefix="hvkit-soak-cores-", dir="/dev/shm"))
    paths = Paths(base.cache, runtime)
    env = {**os.environ, "HVKIT_RUNTIME": str(runtime)}
    build_default_guest(paths)
    ops, checks, given, service_exit, service_errors = Ops(), {}, {}, None, ""
    load = {"start": None, "end": None}
    try:
        vms = [start_vm(f"{a.vm_prefix}-{i}", memory=a.memory, workload="memcheck:64", paths=paths)
               for i in range(a.vms)]
        for vm in vms:
            vm.wait_for_console(r"HVKIT-MEMCHECK round=1 ", timeout=300)
        if a.children:
            fork = subprocess.run([*HVKIT, "fork", vms[0].name, "-n", str(a.children)], capture_output=True,
                                  text=True, env=env)
            if fork.returncode != 0:
                raise SystemExit(f"fork failed: {fork.stderr.strip()}")
        names = [r.name for r in list_vms(paths) if r.state == "running"]
        print(f"{len(names)} VMs: {', '.join(names)}; load {os.getloadavg()[0]:.1f}", flush=True)

        service = subprocess.Popen(["nice", "-n", str(NICE), *HVKIT, "share", "--all", "--watch", str(a.watch),
                                    "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        out: list[str] = []
        err: list[str] = []
        readers = [threading.Thread(target=lambda f=f, sink=sink: sink.extend(f), daemon=True)
                   for f, sink in ((service.stdout, out), (service.stderr, err))]
        for t in readers:
            t.start()
        load["start"] = [round(x, 2) for x in os.getloadavg()]
        deadline = time.monotonic() + a.seconds
        turns = itertools.cycle([(op, n) for n in names for op in ("ps", "identify", "vol", "dump", "fork")])
        turn_lock = threading.Lock()

        def next_turn() -> tuple[str, str]:
            with turn_lock:
                return next(turns)

        forks = [a.forks]
        workers = [threading.Thread(target=worker, args=(deadline, next_turn, ops, env, scratch, forks, paths))
                   for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        load["end"] = [round(x, 2) for x in os.getloadavg()]
        service.send_signal(signal.SIGTERM)
        service_exit = service.wait(timeout=120)
        for t in readers:
            t.join(timeout=30)
        service_errors = "".join(err)
        for line in out:
            r = json.loads(line)
            given[r["vm"]] = given.get(r["vm"], 0) + r["released_bytes"]

        names = [r.name for r in list_vms(paths) if r.state == "running"]
        wait_for_rounds(names, paths, 2, timeout=300)
        for n in names:
            console = find_vm(n, paths).console()
            rounds = checker_rounds(console)
            checks[n] = {"rounds": len(rounds), "errors": sum(e for _, e in rounds),
                         "corrupt_words": console.count("HVKIT-MEMCHECK-CORRUPT"), "given_mib": given.get(n, 0) / MiB}
    finally:
        stop_vms_and_memserver(paths, env, HVKIT)
        subprocess.run(["rm", "-rf", str(runtime), str(scratch)])

    held = bool(checks) and all(c["errors"] == 0 and c["corrupt_words"] == 0 and c["rounds"] > 0
                                for c in checks.values()) and not ops.failures and service_exit == 0
    print(f"\n{'VM':24} {'checker rounds':>14} {'errors':>7} {'corrupt':>8} {'given back MiB':>15}")
    for n, c in checks.items():
        print(f"{n:24} {c['rounds']:14} {c['errors']:7} {c['corrupt_words']:8} {c['given_mib']:15.1f}")
    print(f"\n{'command':10} {'ran':>5} {'median s':>9}")
    for op, secs in sorted(ops.seconds.items()):
        print(f"{op:10} {len(secs):5} {statistics.median(secs):9.2f}")
    for f in ops.failures:
        print(f"FAILED {f}")
    if service_exit != 0 or "Traceback" in service_errors:
        print(f"service exit {service_exit}: {service_errors.strip()[-800:]}")
    print(f"\nload {load['start']} -> {load['end']}; {'HELD' if held else 'NOT HELD'}: "
          "0 corrupt words in every VM, every command succeeded")
    result = {"run": run_info(), "seconds": a.seconds, "watch": a.watch, "vms": checks,
              "commands": {op: {"ran": len(s), "median_s": statistics.median(s)} for op, s in ops.seconds.items()},
              "failures": ops.failures, "service_exit": service_exit, "load": load, "held": held}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.json}")
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
