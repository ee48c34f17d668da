"""Ctrl-C and SIGTERM at moments when stopping halfway would hurt.

Between pausing a VM and resuming it (or between two steps of a fork), an interrupt
must wait until the step is done: `deferred_signals()` holds SIGINT and SIGTERM back
for the length of a block and delivers them after it. (SIGKILL cannot be held back:
for it, the intent records of hvkit.qemu.ownership let the next command finish the job.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs."""


def terminate_as_interrupt() -> None:
    """Makes SIGTERM raise Terminated (a KeyboardInterrupt) in the main thread."""
    def handler(signum, frame):
        raise Terminated()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block are delivered when it ends.
    Only the main thread can change signal handlers: elsewhere this does nothing
    (Python runs handlers in the main thread only, which then defers them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(pending):
            os.kill(os.getpid(), s)  # now, to the handler that was there before
