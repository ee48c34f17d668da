"""Host processes hvkit starts and finds again by pid (QEMU, the memory server)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def process_runs(pid: int | None, cmdline_has: bytes) -> bool:
    """Whether `pid` is a live (not zombie) process whose command line contains
    `cmdline_has`: a pid that was reused by another process does not count."""
    if not pid:
        return False
    try:
        state = _state(Path(f"/proc/{pid}/stat"))
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X") and cmdline_has in cmdline


def threads_still_exiting(pid: int | None) -> bool:
    """Whether `pid` is a zombie whose other threads have not finished exiting yet. A
    killed multi-threaded process (QEMU) shows its main thread as a zombie before the
    others are gone, and its files (a listening port) and memory (a shared mapping of a
    RAM file) are released only with the last thread: until then it is not gone."""
    if not pid:
        return False
    try:
        if _state(Path(f"/proc/{pid}/stat")) != "Z":
            return False
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (OSError, IndexError):
        return False
    for task in tasks:
        try:
            if _state(task / "stat") not in ("Z", "X"):
                return True
        except (OSError, IndexError):
            continue  # that thread is gone meanwhile
    return False


def processes_with(*cmdline_has: bytes) -> list[int]:
    """Every live (not zombie) process whose command line contains each of `cmdline_has`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and all(process_runs(int(entry.name), part) for part in cmdline_has):
            pids.append(int(entry.name))
    return pids


def kill_processes_with(*cmdline_has: bytes, timeout: float = 5.0) -> list[int]:
    """SIGKILLs every live process whose command line contains each of `cmdline_has`
    and waits (up to `timeout`) until they are gone, with their threads; their pids."""
    pids = processes_with(*cmdline_has)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(all(process_runs(p, part) for part in cmdline_has) or threads_still_exiting(p) for p in pids):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return pids


def same_process(pid: int | None, start_ticks: int | None, cmdline_has: bytes = b"") -> bool:
    """Whether `pid` is the live process that started at `start_ticks` (not a later one
    given the same pid) and whose command line contains `cmdline_has`."""
    return start_ticks is not None and process_runs(pid, cmdline_has) and process_start_ticks(pid) == start_ticks


def kill_process(pid: int | None, start_ticks: int | None, timeout: float = 5.0) -> bool:
    """SIGKILLs process `pid` if it is the one that started at `start_ticks` (not a later
    process given the same pid) and waits until it is gone, with its threads; whether it
    was killed."""
    if not same_process(pid, start_ticks):
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while (process_runs(pid, b"") or threads_still_exiting(pid)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return True


def left_by_dead_process(pid: str) -> bool:
    """Whether `pid` (digits taken from a file name a process gave its leftovers) names
    a process that is gone: what it left may be removed."""
    return pid.isdigit() and not Path(f"/proc/{pid}").exists()


def _state(stat: Path) -> str:
    return stat.read_text().rsplit(")", 1)[1].split()[0]


def process_start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot): with its pid, what tells it
    apart from a later process that got the same pid."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
