"""bench/density: how many guest MiB a host holds per MiB of its own memory, with several
VMs that allocate and free all the time, for five arms (issue 22).

    .venv/bin/python bench/density.py [--seconds 300] [--vms 4] [--memory 256M] [--children 2]
                                      [--image | --no-image] [--image-memory 1G]
                                      [--arms nothing,hvkit,KSM,page-reporting,hvkit+KSM]
                                      [--watch 2] [--json docs/results/density.json]
                                      [--plot docs/results/density.png] [--vm-prefix dens]

Run as root (the KSM arms switch the host's KSM on; /sys/kernel/mm/ksm). The arms run one
after the other; each boots its own VMs in a runtime folder of its own under /dev/shm,
runs them for --seconds, then stops them, the memory server, the service and KSM (the
host's KSM settings written back, `run` last, also on Ctrl-C or SIGTERM), so each arm
leaves the host as it found it. A run killed with -9 leaves its VMs and KSM on: the next
run stops those VMs (their folders are named by the killed run's pid) and writes back the
KSM settings it had saved in /dev/shm/hvkit-bench-density.ksm. The VMs of an arm:

  --vms default guests of --memory: the first runs the memory checker (`memcheck`, data it
      checks, allocated and freed all the time; corrupt words are counted) and is forked
      into --children fork children, which run on with their own copies; the others take
      turns: the memory checker, or `alloc` cycles (allocate --alloc MiB, touch, free,
      idle --cycle seconds, again). `alloc` fills its pages with one byte value, which
      KSM merges into one page: the memory checker's data is the churn KSM cannot merge.
  --image: one Debian 12 image guest (--image-memory) whose page cache churns: it
      writes a file of random bytes (--image-churn MiB) in /var/tmp, reads it, deletes
      it, sleeps, again (over ssh). Left out, with the reason printed, when the image
      is not built (`hvkit image build`).

Arms (what gives guest memory back; the VMs' RAM as that arm needs it):
  nothing          RAM files, nothing given back
  hvkit            RAM files; the service `hvkit share --all --watch WATCH` (at the
                   systemd unit's nice; --max-pause for another pause budget), which
                   shares the fork family too
  KSM              RAM inside QEMU (anonymous, mem-merge) but the fork family; ksmd with
                   pages_to_scan 1000, sleep 20 ms
  page-reporting   RAM files; virtio-balloon with free page reporting (the guest's driver
                   reports free blocks of 2 MiB and up)
  hvkit+KSM        the KSM arm's VMs, with the service and KSM both running

Measured every --sample seconds: host memory held for guest RAM (a RAM file: its
allocated blocks; RAM inside QEMU or a fork's private mapping: PSS of QEMU's guest-RAM
mapping, so a page KSM merged or children share is counted once; plus the memory
server's store of fork snapshots); the guests' used memory (MemTotal - MemFree of the
guest's own /proc/meminfo: the control port's ground truth for default guests, ssh for
the image guest, each every --meminfo-every seconds); CPU seconds of the service and of
ksmd, and of all QEMUs. Reported per arm, as means over the second half of the arm (the
first half lets KSM and the service get there): host memory, guests' used memory, host /
used, guest memory per host MiB (the guests' RAM size / host memory), host memory as a
ratio of the KSM arm's, the agent's CPU per VM (% of one core), the load average.

Targets (issue 22): with the service, host memory <= 1.25 x the guests' used memory, at
least 2x less than with KSM alone, and <= 2% of a core per VM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import (KSM_SETTINGS, KsmOn, guest_meminfo, ksm_counter, ksm_usable, ksmd_cpu, memcheck_summary,
                      process_cpu, stop_vms_and_memserver,  # noqa: E402
                      restore_ksm_left_by)
from runinfo import run_info  # noqa: E402  (bench/ is on sys.path: the script's own folder)

from hvkit.cli.pictures import timeline_picture  # noqa: E402
from hvkit.config import Paths  # noqa: E402
from hvkit.guest import build_default_guest  # noqa: E402
from hvkit.guest.control import ground_truth, request  # noqa: E402
from hvkit.image.debian import cached_debian_image  # noqa: E402
from hvkit.qemu import VM, find_vm, start_vm  # noqa: E402
from hvkit.sharing.unit import NICE  # noqa: E402

MiB = 1 << 20
HVKIT = [sys.executable, "-m", "hvkit"]
SHM = Path("/dev/shm")
RUNTIME_PREFIX = "hvkit-bench-density-"  # + the bench's pid + "-": a killed run's folders are found by it
KSM_STATE = SHM / "hvkit-bench-density.ksm"  # the host's KSM settings while an arm has KSM on


@dataclass(frozen=True)
class Arm:
    name: str
    ram: str = "file"  # RAM of the VMs that are not forked
    service: bool = False
    ksm: bool = False
    balloon: bool = False


ARMS = {a.name: a for a in (
    Arm("nothing"), Arm("hvkit", service=True), Arm("KSM", ram="anonymous", ksm=True),
    Arm("page-reporting", balloon=True), Arm("hvkit+KSM", ram="anonymous", service=True, ksm=True))}


# ---------------------------------------------------------------- host memory

def ram_mapping_kb(pid: int | None, size: int) -> dict[str, int]:
    """/proc/<pid>/smaps fields (kB) of QEMU's guest-RAM mapping (the one of `size` bytes)."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except (OSError, TypeError):
        return {}
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        start, _, end = block.partition(" ")[0].partition("-")
        if start and end and int(end, 16) - int(start, 16) == size:
            return {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", block, re.M)}
    return {}


def host_parts(vm: VM) -> tuple[int, int, int]:
    """What the host holds for one VM's RAM, as (RAM file, private, snapshot page cache):
    a RAM file's allocated blocks; otherwise the PSS of QEMU's guest-RAM mapping (so a page
    KSM merged, or one that fork children read through the page cache, is split between
    those who map it and counted once in a sum), cut into the pages QEMU has of its own
    (anonymous) and those of a fork snapshot's file (the memory server's page cache)."""
    if vm.spec.ram == "file":
        try:
            return vm.ram_path.stat().st_blocks * 512, 0, 0
        except OSError:
            return 0, 0, 0
    kb = ram_mapping_kb(vm.pid, vm.spec.memory)
    pss, anon = kb.get("Pss", 0) * 1024, kb.get("Anonymous", 0) * 1024
    if vm.spec.ram != "snapshot":
        return 0, pss, 0
    return 0, min(pss, anon), max(0, pss - anon)


def tree_blocks(folder: Path) -> int:
    """Allocated bytes of the files under `folder` (the memory server's store: frozen RAM
    files and the frames children wrote, on tmpfs)."""
    total = 0
    for path in folder.rglob("*") if folder.is_dir() else ():
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_blocks * 512
    return total


# ---------------------------------------------------------------- guests

@dataclass
class Guest:
    """One VM of an arm and what drives it: `kind` is memcheck, alloc, child or image."""

    name: str
    kind: str
    memory: int  # its RAM size (bytes)
    used: list[tuple[float, int, int]] = field(default_factory=list)  # (t, MemTotal - MemFree, MemTotal)
    errors: int = 0  # meminfo reads or alloc rounds that failed (a busy guest: the next one)


class Driver(threading.Thread):
    """Keeps one guest's workload going (`alloc` cycles) and reads its meminfo every
    `every` seconds; one thread per guest, since a guest's control port serves one
    conversation at a time."""

    def __init__(self, guest: Guest, paths: Paths, t0: float, every: float, alloc_mib: int, cycle: float,
                 stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.guest, self.paths, self.t0, self.every = guest, paths, t0, every
        self.alloc_mib, self.cycle, self.stop = alloc_mib, cycle, stop

    def meminfo(self, vm: VM) -> dict[str, int]:
        if self.guest.kind == "image":
            return guest_meminfo(vm, timeout=60)
        return ground_truth(vm, timeout=60).meminfo

    def run(self) -> None:
        next_read, next_alloc, running_from = 0.0, 0.0, None
        while not self.stop.is_set():
            now = time.monotonic()
            try:
                vm = find_vm(self.guest.name, self.paths)
                if self.guest.kind == "alloc":
                    if running_from is not None and re.search(rf"HVKIT-ALLOC (done|failed) mib={self.alloc_mib}",
                                                              vm.console()[running_from:]):
                        running_from, next_alloc = None, now + self.cycle
                    if running_from is None and now >= next_alloc:
                        start = len(vm.console())
                        request(vm, f"run alloc {self.alloc_mib}", until="HVKIT-RUNNING alloc")
                        running_from = start
                if now >= next_read:
                    info = self.meminfo(vm)
                    self.guest.used.append((time.monotonic() - self.t0, info["MemTotal"] - info["MemFree"],
                                            info["MemTotal"]))
                    next_read = now + self.every
            except Exception:  # noqa: BLE001  (paused by a share, starved, or between QEMUs of a fork)
                self.guest.errors += 1
                next_read = now + self.every / 2
            self.stop.wait(1.0)


def start_guests(arm: Arm, a, paths: Paths, image: bool, notes: list[str]) -> list[Guest]:
    """Boots the arm's VMs (module comment), waits until their workloads run, forks the
    first one (what went wrong on the way is added to `notes`)."""
    prefix = f"{a.vm_prefix}-{arm.name.replace('+', '-').lower()}"
    guests, vms = [], []
    for i in range(a.vms):
        kind = "memcheck" if i % 2 == 0 else "alloc"
        ram = "file" if i == 0 and a.children else arm.ram  # hvkit forks VMs whose RAM is a file
        vms.append(start_vm(f"{prefix}-{i}", memory=a.memory, paths=paths, ram=ram, balloon=arm.balloon,
                            workload=f"memcheck:{a.memcheck}" if kind == "memcheck" else "idle"))
        guests.append(Guest(vms[-1].name, kind, vms[-1].spec.memory))
    for vm, g in zip(vms, guests):
        vm.wait_for_console(r"HVKIT-MEMCHECK round=1 " if g.kind == "memcheck" else r"HVKIT-READY", timeout=600)
    if image:
        t = time.monotonic()
        vm = start_vm(f"{prefix}-img", memory=a.image_memory, image="debian", disk_size=a.image_disk, paths=paths,
                      ram=arm.ram, balloon=arm.balloon, timeout=900)
        print(f"  {arm.name}: image guest up in {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)
        script = (f"nohup sh -c 'while :; do dd if=/dev/urandom of=/var/tmp/churn bs=1M count={a.image_churn} "
                  f"status=none; cat /var/tmp/churn > /dev/null; sleep {a.cycle:g}; rm -f /var/tmp/churn; "
                  f"sleep {a.cycle:g}; done' > /dev/null 2>&1 &")
        subprocess.run(vm.ssh_command("sh", "-c", script), check=True, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        guests.append(Guest(vm.name, "image", vm.spec.memory))
    if a.children:
        from hvkit.forking.forker import fork

        try:
            report = fork(guests[0].name, a.children, paths)
            guests += [Guest(c.name, "child", guests[0].memory) for c in report.children]
        except Exception as e:  # noqa: BLE001  (the arm runs on without children, and says so)
            notes.append(f"fork failed: {e}")
            print(f"  {arm.name}: fork failed: {e}", file=sys.stderr, flush=True)
    return guests


# ---------------------------------------------------------------- one arm

@dataclass
class Sample:
    t: float
    host: int  # bytes the host holds for all guests' RAM (+ the fork store): the sum of the next four
    files: int  # RAM files' blocks
    private: int  # QEMUs' own pages of guest RAM (anonymous RAM, a fork's written pages)
    page_cache: int  # fork snapshots' pages read through the memory server's file system
    used: int  # the guests' MemTotal - MemFree, last read of each
    store: int  # of host: the memory server's store
    ksm_sharing: int  # pages KSM saved (pages_sharing)
    agent_cpu: float  # CPU seconds of the service + ksmd since the arm started
    qemu_cpu: float  # CPU seconds of all QEMUs since the arm started


def sample_arm(guests: list[Guest], paths: Paths, t0: float, service: subprocess.Popen | None,
               cpu0: tuple[float, float], qemu_cpu: dict[int, list[float]]) -> Sample:
    parts = [0, 0, 0]
    for g in guests:
        with contextlib.suppress(Exception):  # a VM between two QEMUs (a fork): counted next time
            vm = find_vm(g.name, paths)
            parts = [x + y for x, y in zip(parts, host_parts(vm))]
            cpu = process_cpu(vm.pid)
            qemu_cpu.setdefault(vm.pid, [cpu, cpu])[1] = cpu
    store = tree_blocks(paths.runtime / "memserver" / "store")
    used = sum(g.used[-1][1] for g in guests if g.used)
    agent = (process_cpu(service.pid) if service else 0.0) - cpu0[0] + ksmd_cpu() - cpu0[1]
    return Sample(time.monotonic() - t0, sum(parts) + store, *parts, used, store, ksm_counter("pages_sharing"), agent,
                  sum(last - first for first, last in qemu_cpu.values()))


def memcheck_of(guests: list[Guest], paths: Paths) -> dict:
    out = {}
    for g in guests:
        if g.kind in ("memcheck", "child"):
            with contextlib.suppress(Exception):
                out[g.name] = memcheck_summary(find_vm(g.name, paths).console())
    return out


def stop_everything(paths: Paths, env: dict) -> None:
    """Every VM of the arm's runtime folder, then its memory server; the folder goes last."""
    with contextlib.suppress(Exception):
        stop_vms_and_memserver(paths, env, HVKIT)
    shutil.rmtree(paths.runtime, ignore_errors=True)


def run_arm(arm: Arm, a, base: Paths, image: bool) -> dict:
    runtime = Path(tempfile.mkdtemp(prefix=f"{RUNTIME_PREFIX}{os.getpid()}-", dir=SHM))
    paths = Paths(base.cache, runtime)
    env = {**os.environ, "HVKIT_RUNTIME": str(runtime)}
    stop, service, samples = threading.Event(), None, []
    service_log: list[str] = []
    notes: list[str] = []
    try:
        t_boot = time.monotonic()
        guests = start_guests(arm, a, paths, image, notes)
        boot_s = time.monotonic() - t_boot
        t0 = time.monotonic()
        drivers = [Driver(g, paths, t0, a.meminfo_every, a.alloc, a.cycle, stop) for g in guests]
        for d in drivers:
            d.start()
        with KsmOn(state=KSM_STATE) if arm.ksm else contextlib.nullcontext():
            if arm.service:
                budget = ["--max-pause", str(a.max_pause)] if a.max_pause else []
                service = subprocess.Popen(["nice", "-n", str(NICE), *HVKIT, "share", "--all", "--watch", str(a.watch),
                                            *budget],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
                threading.Thread(target=lambda: service_log.extend(service.stderr), daemon=True).start()
            cpu0 = (0.0, ksmd_cpu())
            qemu_cpu: dict[int, list[float]] = {}
            load_start = os.getloadavg()
            while time.monotonic() - t0 < a.seconds:
                samples.append(sample_arm(guests, paths, t0, service, cpu0, qemu_cpu))
                time.sleep(max(0.0, a.sample - (time.monotonic() - t0 - samples[-1].t)))
            service_rss = _rss(service.pid) if service else None
            if service:
                service.send_signal(signal.SIGTERM)
                service.wait(timeout=120)
            stop.set()
            for d in drivers:
                d.join(timeout=90)
        checks = memcheck_of(guests, paths)
    finally:
        stop.set()
        if service and service.poll() is None:
            service.kill()
            service.wait()
        stop_everything(paths, env)
    row = summarize(arm, a, guests, samples, boot_s, checks, load_start, service, service_rss, service_log)
    row["notes"] = notes
    return row


def clean_up_killed_runs(base: Paths) -> None:
    """What a run killed with -9 left: its VMs, memory server and runtime folders (their
    names carry its pid), and the host's KSM settings."""
    if restore_ksm_left_by(KSM_STATE):
        print("bench/density: put back the host's KSM settings a killed run had changed", file=sys.stderr)
    for folder in SHM.glob(f"{RUNTIME_PREFIX}*"):
        pid = folder.name[len(RUNTIME_PREFIX):].partition("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            print(f"bench/density: stopping what a killed run left in {folder}", file=sys.stderr)
            stop_everything(Paths(base.cache, folder), {**os.environ, "HVKIT_RUNTIME": str(folder)})


def _rss(pid: int) -> int | None:
    with contextlib.suppress(OSError, StopIteration):
        return int(next(l.split()[1] for l in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if l.startswith("VmRSS:"))) * 1024
    return None


def summarize(arm: Arm, a, guests: list[Guest], samples: list[Sample], boot_s: float, checks: dict,
              load_start, service, service_rss, service_log: list[str]) -> dict:
    half = [s for s in samples if s.t >= a.seconds / 2 and s.used] or samples
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    host, used = mean([s.host for s in half]), mean([s.used for s in half])
    ram = sum(g.memory for g in guests)
    span = samples[-1].t if samples else a.seconds
    agent_cpu = samples[-1].agent_cpu if samples else 0.0
    n = len(guests)
    tail = [l.strip() for l in service_log if "WARNING" in l or "ERROR" in l or "Traceback" in l][-5:]
    summary = next((l.strip() for l in reversed(service_log) if "stopped after" in l), None)
    skipped = sum("not paused while that lasts" in l for l in service_log)
    row = {"arm": arm.name, "ram": arm.ram, "service": arm.service, "ksm": arm.ksm, "balloon": arm.balloon,
           "vms": n, "kinds": {g.name: g.kind for g in guests}, "boot_s": round(boot_s, 1),
           "guest_ram": ram, "guest_memtotal": sum(g.used[-1][2] for g in guests if g.used), "host_mean": host, "used_mean": used, "host_over_used": host / used if used else None,
           "guest_mib_per_host_mib": ram / host if host else None,
           "store_mean": mean([s.store for s in half]), "ksm_sharing_mean_pages": mean([s.ksm_sharing for s in half]),
           "agent_cpu_s": agent_cpu, "agent_core_pct_per_vm": 100 * agent_cpu / span / n if n else None,
           # the same over the second half only: the service's start (imports, symbols, first shares) left out
           "agent_core_pct_per_vm_second_half": (100 * (half[-1].agent_cpu - half[0].agent_cpu)
                                                 / max(half[-1].t - half[0].t, 1e-9) / n) if n and len(half) > 1 else None,
           "used_by_guest": {g.name: mean([u for t, u, _ in g.used if t >= a.seconds / 2]) for g in guests},
           "qemu_core_pct": 100 * (samples[-1].qemu_cpu if samples else 0.0) / span,
           "service_rss": service_rss, "service_exit": service.returncode if service else None,
           "service_warnings": tail, "service_summary": summary,
           "service_overrun_warnings": skipped, "meminfo_failures": {g.name: g.errors for g in guests if g.errors},
           "memcheck": checks, "loadavg_start": [round(x, 2) for x in load_start],
           "loadavg_end": [round(x, 2) for x in os.getloadavg()],
           "parts_mean": {k: mean([getattr(s, k) for s in half]) for k in ("files", "private", "page_cache", "store")},
           "samples_columns": ["t", "host", "used", "files", "private", "page_cache", "store", "ksm_sharing"],
           "samples": [[round(s.t, 1), s.host, s.used, s.files, s.private, s.page_cache, s.store, s.ksm_sharing]
                       for s in samples]}
    print(f"  {arm.name}: host {host / MiB:.0f} MiB, used {used / MiB:.0f} MiB, guest RAM {ram / MiB:.0f} MiB, "
          f"agent {row['agent_core_pct_per_vm']:.2f}% of a core per VM, load {row['loadavg_end'][0]:.1f}",
          file=sys.stderr, flush=True)
    return row


# ---------------------------------------------------------------- report

def targets_of(by: dict[str, dict]) -> dict:
    """The issue's three targets, from the hvkit arm (and the KSM arm for the ratio)."""
    h, k = by.get("hvkit"), by.get("KSM")
    out: dict = {}
    if h and h["host_over_used"] is not None:
        out["host_over_used"] = {"value": h["host_over_used"], "limit": 1.25, "met": h["host_over_used"] <= 1.25}
        out["core_pct_per_vm"] = {"value": h["agent_core_pct_per_vm"], "limit": 2.0,
                                  "met": h["agent_core_pct_per_vm"] <= 2.0}
    if h and k and h["host_mean"]:
        x = k["host_mean"] / h["host_mean"]
        out["ksm_over_hvkit"] = {"value": x, "limit": 2.0, "met": x >= 2.0}
    return out


def print_table(rows: list[dict], targets: dict) -> None:
    ksm = next((r for r in rows if r["arm"] == "KSM"), None)
    print(f"{'arm':>15} {'VMs':>3} {'guest RAM':>9} {'used':>8} {'host':>8} {'host/used':>9} {'guest/host':>10} "
          f"{'vs KSM':>7} {'agent %core/VM (2nd half)':>25} {'QEMUs %core':>11} {'load':>5}")
    for r in rows:
        vs = f"{r['host_mean'] / ksm['host_mean']:.2f}x" if ksm and ksm["host_mean"] else "-"
        agent = ("-" if not (r["service"] or r["ksm"]) else
                 f"{r['agent_core_pct_per_vm']:.2f} ({r['agent_core_pct_per_vm_second_half'] or 0:.2f})")
        print(f"{r['arm']:>15} {r['vms']:>3} {r['guest_ram'] / MiB:>5.0f} MiB {r['used_mean'] / MiB:>4.0f} MiB "
              f"{r['host_mean'] / MiB:>4.0f} MiB {r['host_over_used'] or 0:>9.2f} {r['guest_mib_per_host_mib'] or 0:>10.2f} "
              f"{vs:>7} {agent:>25} {r['qemu_core_pct']:>11.0f} {r['loadavg_end'][0]:>5.1f}")
    print("(means over the second half of each arm; guest RAM: the sizes the guests were given; host: memory held "
          "for guest RAM; used: the guests' MemTotal - MemFree; guest/host: guest RAM MiB per host MiB; agent: the "
          "service + ksmd)")
    for r in rows:
        p = {k: v / MiB for k, v in r["parts_mean"].items()}
        print(f"{r['arm']:>15}: host = RAM files {p['files']:.0f} + QEMUs' own {p['private']:.0f} + snapshot page "
              f"cache {p['page_cache']:.0f} + fork store {p['store']:.0f} MiB"
              + (f"; KSM saves {r['ksm_sharing_mean_pages'] * 4096 / MiB:.0f} MiB" if r["ksm"] else "")
              + (f"; service RSS {r['service_rss'] / MiB:.0f} MiB" if r.get("service_rss") else "")
              + (f"; {'; '.join(r['notes'])}" if r["notes"] else ""))
        if r.get("service_summary"):
            print(f"{'':>15}  service: {r['service_summary'].split('INFO ', 1)[-1]}; "
                  f"{r.get('service_overrun_warnings', 0)} times a pause was predicted over the budget")
    for key, what in (("host_over_used", "host / used with the service <= 1.25"),
                      ("ksm_over_hvkit", "KSM alone / the service >= 2"),
                      ("core_pct_per_vm", "service CPU <= 2% of a core per VM")):
        t = targets.get(key)
        print(f"target {what}: " + ("not measured" if not t else f"{t['value']:.2f} ({'met' if t['met'] else 'not met'})"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300.0, help="length of each arm, once its VMs run (default 300)")
    ap.add_argument("--vms", type=int, default=4, help="default guests per arm (default 4)")
    ap.add_argument("--memory", default="256M", help="RAM of each default guest (default 256M)")
    ap.add_argument("--children", type=int, default=2, help="fork children of the first guest (default 2; 0: no fork)")
    ap.add_argument("--memcheck", type=int, default=96, help="MiB the memory checker keeps data in (default 96)")
    ap.add_argument("--alloc", type=int, default=128, help="MiB an alloc cycle allocates and frees (default 128)")
    ap.add_argument("--cycle", type=float, default=15.0, help="seconds an alloc guest idles between cycles")
    ap.add_argument("--image", action=argparse.BooleanOptionalAction, default=True,
                    help="one Debian 12 image guest with page-cache churn per arm (default on, if built)")
    ap.add_argument("--image-memory", default="1G")
    ap.add_argument("--image-disk", default="2G")
    ap.add_argument("--image-churn", type=int, default=384, help="MiB of the file the image guest writes, reads, deletes")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--watch", type=float, default=2.0, help="the service's interval (default 2 s)")
    ap.add_argument("--max-pause", type=float, default=None,
                    help="the service's pause budget in seconds (default: the service's own)")
    ap.add_argument("--sample", type=float, default=3.0, help="seconds between host memory samples")
    ap.add_argument("--meminfo-every", type=float, default=15.0, help="seconds between reads of a guest's meminfo")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "density.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "results" / "density.png")
    ap.add_argument("--vm-prefix", default="dens", help="VM names: PREFIX-ARM-N, PREFIX-ARM-img, children -N-1 ...")
    a = ap.parse_args()
    arms = [x for x in a.arms.split(",") if x]
    unknown = [x for x in arms if x not in ARMS]
    if unknown or not arms:
        print(f"bench/density: unknown arm {', '.join(unknown) or '(none given)'}; give some of {', '.join(ARMS)}",
              file=sys.stderr)
        return 2
    if a.vms < 1 or a.seconds <= 0:
        print("bench/density: --vms must be at least 1 and --seconds above 0", file=sys.stderr)
        return 2
    why = ksm_usable()
    if why and any(ARMS[x].ksm for x in arms):
        print(f"bench/density: {why}: run as root, or leave out the KSM arms (--arms nothing,hvkit,page-reporting)",
              file=sys.stderr)
        return 2
    base = Paths.from_env()
    image = a.image and cached_debian_image(base) is not None
    if a.image and not image:
        print("bench/density: the Debian image is not built (hvkit image build): running without the image guest",
              file=sys.stderr)
    build_default_guest(base)
    clean_up_killed_runs(base)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    rows = []
    try:
        for name in arms:
            print(f"arm {name} ({time.strftime('%H:%M:%S')}, load {os.getloadavg()[0]:.1f}) ...", file=sys.stderr,
                  flush=True)
            rows.append(run_arm(ARMS[name], a, base, image))
    except KeyboardInterrupt:
        print("bench/density: interrupted; every VM, the service and KSM were stopped (KSM's settings restored); "
              "nothing written", file=sys.stderr)
        return 130
    targets = targets_of({r["arm"]: r for r in rows})
    doc = {"vms": a.vms, "memory": a.memory, "children": a.children, "image": image, "image_memory": a.image_memory,
           "seconds": a.seconds, "watch": a.watch, "max_pause": a.max_pause, "sample": a.sample, "alloc": a.alloc,
           "memcheck": a.memcheck, "cycle": a.cycle, "image_churn": a.image_churn, "ksm_settings": KSM_SETTINGS,
           "arms": rows, "targets": targets, "run": run_info()}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(doc, indent=2))  # first: a run of half an hour is not lost to a plot
    print_table(rows, targets)
    series = {r["arm"]: [(t, host / MiB) for t, host, *_ in r["samples"]] for r in rows}
    ref = next((r for r in rows if r["arm"] == "hvkit"), rows[0])
    series[f"guests' used ({ref['arm']} arm)"] = [(t, used / MiB) for t, _, used, *_ in ref["samples"] if used]
    a.plot.parent.mkdir(parents=True, exist_ok=True)
    timeline_picture(series, a.plot, f"host memory for the guests' RAM: {rows[0]['vms']} VMs per arm",
                     ylabel="MiB")
    print(f"wrote {a.json} and {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
