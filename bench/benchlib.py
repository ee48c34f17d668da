"""Helpers more than one bench needs: the host's KSM (on with a bench's settings, restored
after), ksmd's CPU time, the host's MemAvailable, a QEMU's RSS/PSS, a disk guest's
/proc/meminfo over ssh, the memory checker's rounds on a guest's console, the end of a
bench's VMs. Moved here from bench/share.py so that bench/density.py, service.py and
soak.py use the same code (bench/ is on sys.path when a bench runs: `from benchlib
import ...`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

MEMCHECK_ROUND = re.compile(r"HVKIT-MEMCHECK round=(\d+) live_mib=\d+ errors=(\d+)")

KSM = Path("/sys/kernel/mm/ksm")
KSM_SETTINGS = {"pages_to_scan": "1000", "sleep_millisecs": "20"}


def ksm_usable() -> str | None:
    """Why the KSM arms cannot run here, or None."""
    if not (KSM / "run").exists():
        return "this kernel has no KSM (/sys/kernel/mm/ksm)"
    if os.geteuid() != 0:
        return "switching KSM on needs root"
    return None


def ksm_counter(name: str) -> int:
    """One of ksmd's counters (/sys/kernel/mm/ksm/NAME), 0 when there is none."""
    try:
        return int((KSM / name).read_text())
    except (OSError, ValueError):
        return 0


def ksmd_cpu() -> float:
    """CPU seconds the kernel thread ksmd has used (user + system), 0 when there is none."""
    ticks = os.sysconf("SC_CLK_TCK")
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            if stat.split()[1] == "(ksmd)":
                fields = stat.rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / ticks
    return 0.0


def process_cpu(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) of process `pid`; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class KsmOn:
    """KSM running with the bench's settings; on the way out (an exception or Ctrl-C
    included) everything it merged is unmerged and the host's own values are written
    back, `run` last. With `state`, the host's values are also written to that file
    first (with this process's id) and the file removed at the end: a run killed with
    -9 leaves it, and `restore_ksm_left_by(state)` in the next run puts them back."""

    def __init__(self, settings: dict[str, str] | None = None, state: Path | None = None) -> None:
        self.settings = KSM_SETTINGS if settings is None else settings
        self.state = state

    def __enter__(self) -> "KsmOn":
        self.saved = {name: (KSM / name).read_text().strip() for name in ("run", *self.settings)}
        if self.state:
            tmp = self.state.with_name(self.state.name + ".tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), "saved": self.saved}))
            tmp.replace(self.state)
        for name, value in self.settings.items():
            (KSM / name).write_text(value)
        (KSM / "run").write_text("1")
        return self

    def __exit__(self, *exc) -> None:
        _restore(self.saved)
        if self.state:
            self.state.unlink(missing_ok=True)


def _restore(saved: dict[str, str]) -> None:
    (KSM / "run").write_text("2")  # unmerge everything
    for name, value in saved.items():
        if name != "run":
            (KSM / name).write_text(value)
    (KSM / "run").write_text(saved["run"])


def restore_ksm_left_by(state: Path) -> bool:
    """Puts back the host's KSM settings a killed run left in `state` (its process gone);
    True if it did."""
    try:
        left = json.loads(state.read_text())
    except (OSError, ValueError):
        return False
    try:
        os.kill(left["pid"], 0)
        return False  # that run still goes on
    except ProcessLookupError:
        pass
    except PermissionError:
        return False
    _restore(left["saved"])
    state.unlink(missing_ok=True)
    return True


def guest_meminfo(vm, timeout: float = 120) -> dict[str, int]:
    """/proc/meminfo of a disk guest over ssh, in bytes."""
    out = subprocess.run(vm.ssh_command("cat", "/proc/meminfo"), capture_output=True, text=True,
                         timeout=timeout, check=True).stdout
    return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def host_mem_available() -> int:
    return int(next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines()
                    if l.startswith("MemAvailable:"))) * 1024


def rss_pss(pid: int) -> tuple[int, int]:
    """RSS and PSS of a whole QEMU process, in bytes (/proc/<pid>/smaps_rollup)."""
    kb = dict(line.split()[:2] for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    return int(kb["Rss:"]) * 1024, int(kb["Pss:"]) * 1024


def checker_rounds(console: str) -> list[tuple[int, int]]:
    """(round, errors) of each round the guest's memory checker reported on `console`."""
    return [(int(r), int(e)) for r, e in MEMCHECK_ROUND.findall(console)]


def memcheck_summary(console: str) -> dict:
    """The memory checker's rounds, errors counted and whether it saw a corrupt word."""
    rounds = checker_rounds(console)
    return {"rounds": len(rounds), "errors": sum(e for _, e in rounds), "corrupt": "HVKIT-MEMCHECK-CORRUPT" in console}


def stop_vms_and_memserver(paths, env: dict, hvkit: list[str]) -> None:
    """Every live VM of a bench's runtime folder (`paths`) stopped, each failure said and
    the rest stopped anyway, then its memory server (`hvkit memserver stop` with `env`;
    nothing when none runs)."""
    from hvkit.qemu import find_vm, list_vms

    for r in list_vms(paths):
        if r.state != "dead":
            try:
                find_vm(r.name, paths).stop()
            except Exception as e:  # noqa: BLE001
                print(f"stopping {r.name}: {e}", file=sys.stderr)
    subprocess.run([*hvkit, "memserver", "stop"], env=env, capture_output=True)
