"""Transparent huge pages off for the QEMUs hvkit starts.

Under TCG, QEMU's translation buffer and heap are anonymous memory; with THP on
("always", or "madvise": the TCG buffer is MADV_HUGEPAGE) they grow in 2 MiB steps, and
an idle forked child holds megabytes it never uses. `prctl(PR_SET_THP_DISABLE)` is
inherited through fork and kept across execve, so it is set in hvkit's own process
right around the spawn and put back as it was afterwards: QEMU starts with THP off,
and hvkit's own memory is left as it was. Guest RAM is a tmpfs file, which this flag
does not touch (tmpfs has its own huge page setting).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from typing import Iterator

log = logging.getLogger(__name__)

PR_SET_THP_DISABLE = 41
PR_GET_THP_DISABLE = 42

_lock = threading.Lock()  # spawns from several threads (a fork's children) share the flag
_users = 0
_was = 0
_libc = None


def _prctl(option: int, arg: int = 0) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


@contextlib.contextmanager
def thp_disabled_for_children() -> Iterator[None]:
    """Inside the block, processes this process starts have THP off (the flag of this
    process, set on entry of the first user and restored when the last one leaves)."""
    global _users, _was
    with _lock:
        if _users == 0:
            _was = _prctl(PR_GET_THP_DISABLE)
            if _was < 0 or (_was == 0 and _prctl(PR_SET_THP_DISABLE, 1) != 0):
                log.info("PR_SET_THP_DISABLE is not available: QEMU keeps the host's THP setting")
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0 and _was == 0:
                _prctl(PR_SET_THP_DISABLE, 0)


def thp_disabled(pid: int) -> bool:
    """Whether process `pid` runs with THP off (its /proc status says THP_enabled: 0)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("THP_enabled:"):
                return line.split()[1] == "0"
    return False
