"""Host processes hvkit starts and finds again by pid (QEMU, the memory server)."""

from __future__ import annotations

from pathlib import Path


def process_runs(pid: int | None, cmdline_has: bytes) -> bool:
    """Whether `pid` is a live (not zombie) process whose command line contains
    `cmdline_has`: a pid that was reused by another process does not count."""
    if not pid:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X") and cmdline_has in cmdline
