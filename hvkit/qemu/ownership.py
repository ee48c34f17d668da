"""Who controls a VM's run state right now: one owner at a time, released by the kernel
when the owner dies.

    <runtime>/.owners/<name>.lock    flock held by the one hvkit process that may pause,
                                     resume, fork, restart or stop the VM now; it holds
                                     that process's pid and what it does, for the others
                     <name>.json     the owner's intent: written *before* it changes the
                                     VM's run state, removed when it is done. Found while
                                     nobody holds the lock, it is the work of an owner
                                     that died, and says how to undo or finish it:
                                     "resume" (a pause of an operation), "stop" (a VM that
                                     never finished starting), "fork" (a fork's journal)

These live beside the VMs' runtime folders, not in them: a VM's folder is created and
removed with its QEMU, and a lock must outlive both. Every hvkit process that changes a
VM's run state holds its lock for as long as the change lasts, so two commands never
pause and resume over each other; a pause asked for by the user has no intent record,
so no operation ever resumes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from hvkit.config import make_private_dir
from hvkit.errors import HvkitError

log = logging.getLogger(__name__)

OWNERS_DIR = ".owners"
LOCK_WAIT = 120.0  # seconds a command waits for another one to finish with a VM
_POLL = 0.01


class VMBusy(HvkitError):
    """Another hvkit process has held the VM for longer than we would wait."""


@dataclass
class _Held:
    fd: int
    depth: int


# The VM locks this process holds (lock file -> fd, depth). A lock belongs to a process,
# so this is process state by nature: it lets an owner call code that takes the same
# lock again (a frozen ground truth that identifies the paused guest) without deadlock.
_HELD: dict[str, _Held] = {}


def owners_dir(runtime: Path) -> Path:
    """The folder of lock and intent files, made private (0700) on first use."""
    path = runtime / OWNERS_DIR
    if not path.is_dir():
        make_private_dir(runtime)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    return path


class Ownership:
    """The lock and intent record of the VM called `name` in runtime folder `runtime`."""

    def __init__(self, runtime: Path, name: str) -> None:
        self.name = name
        self.runtime = runtime

    @property
    def lock_file(self) -> Path:
        return owners_dir(self.runtime) / f"{self.name}.lock"

    @property
    def intent_file(self) -> Path:
        return owners_dir(self.runtime) / f"{self.name}.json"

    # ---- the lock -----------------------------------------------------------------

    def held_here(self) -> bool:
        """Whether this process holds the lock already."""
        return str(self.lock_file) in _HELD

    @contextlib.contextmanager
    def hold(self, op: str, wait: float = LOCK_WAIT) -> Iterator[bool]:
        """Holds the VM's lock inside the block, waiting up to `wait` seconds for another
        holder to finish (VMBusy after that). Yields True for the outermost hold of this
        process (the one that should look for a dead owner's leftovers)."""
        key = str(self.lock_file)
        held = _HELD.get(key)
        if held is not None:
            held.depth += 1
            try:
                yield False
            finally:
                held.depth -= 1
            return
        fd = self._acquire(op, wait)
        _HELD[key] = _Held(fd, 1)
        try:
            yield True
        finally:
            del _HELD[key]
            os.close(fd)  # releases the flock

    @contextlib.contextmanager
    def try_hold(self, op: str) -> Iterator[bool | None]:
        """Like hold, without waiting: yields None when another process holds it."""
        try:
            with self.hold(op, wait=0.0) as outermost:
                yield outermost
        except VMBusy:
            yield None

    def _acquire(self, op: str, wait: float) -> int:
        deadline = time.monotonic() + wait
        said = False
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                holder = self.holder()
                if time.monotonic() >= deadline:
                    who = _describe(holder)
                    raise VMBusy(f"VM {self.name!r} is busy: {who}",
                                 "try again when it is done") from None
                if not said and time.monotonic() > deadline - wait + 0.5:
                    log.info("waiting for %s to finish with VM %s", _describe(holder), self.name)
                    said = True
                time.sleep(_POLL)
                continue
            # the file may have been removed (and made anew) between open and flock
            try:
                same = os.stat(self.lock_file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "op": op, "since": time.time()}).encode(), 0)
            return fd

    def holder(self) -> dict | None:
        """Who holds the lock, as that process wrote it (pid, op, since), or None."""
        try:
            return json.loads(self.lock_file.read_text() or "null")
        except (OSError, ValueError):
            return None

    # ---- the intent record (only while holding the lock) -----------------------------

    def intent(self) -> dict | None:
        try:
            return json.loads(self.intent_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"undo": "unknown"}

    def write_intent(self, **intent) -> None:
        """Records what this owner is about to do (atomically: old or new, never half)."""
        assert self.held_here(), "an intent is written only by the lock's holder"
        label = f"{intent.get('op', '')}:{intent.get('step', intent.get('undo', ''))}"
        fault_point(f"before {label}")
        tmp = self.intent_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), **intent}, f)
        os.replace(tmp, self.intent_file)
        fault_point(f"after {label}")

    def update_intent(self, **changes) -> None:
        self.write_intent(**{**(self.intent() or {}), **changes})

    def clear_intent(self) -> None:
        fault_point(f"before done {(self.intent() or {}).get('op', '')}")
        self.intent_file.unlink(missing_ok=True)

    def forget(self) -> None:
        """Removes the lock and intent files of a VM that is gone (holding the lock)."""
        self.clear_intent()
        self.lock_file.unlink(missing_ok=True)


def fault_point(label: str) -> None:
    """Tests of crash safety set HVKIT_DIE_AT to one of these labels ("before fork:stopping",
    "after share:resume", ...): this process then dies by SIGKILL right there, at exactly
    the moment a real crash could hit. Unset, it does nothing."""
    if os.environ.get("HVKIT_DIE_AT") == label:
        os.kill(os.getpid(), signal.SIGKILL)


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another hvkit command holds it"
    since = time.time() - float(holder.get("since", time.time()))
    return f"hvkit {holder.get('op', '?')} (pid {holder.get('pid', '?')}) has held it for {since:.0f} s"


def stale_intents(runtime: Path) -> list[str]:
    """Names of VMs with an intent record (possibly a dead owner's), for `vm list`."""
    folder = runtime / OWNERS_DIR
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json"))
