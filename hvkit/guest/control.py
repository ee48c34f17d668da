"""Talking to the guest from the host: requests on hvkit's control port (the guest's
second serial port, a unix socket on the host) and the guest's own view of its memory
and processes (ground truth) exported through it.

The default guest's init and the Debian image's control service answer these requests;
hvkit uses them to check, from inside the guest, what it found from outside (tests,
`hvkit vm groundtruth`). This module needs of a VM only what `ControlledVM` lists, so it
does not depend on the QEMU engine.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable, ContextManager, Protocol, TypeVar

from hvkit.errors import HvkitError
from hvkit.guest.groundtruth import GroundTruth, parse_ground_truth

RESEND_AFTER = 5.0  # seconds without any answer before a control-port request is sent again
T = TypeVar("T")


class _RunDir(Protocol):
    ctl_sock: Path


class ControlledVM(Protocol):
    """What the control port needs of a VM (hvkit.qemu.VM has it)."""

    name: str
    rundir: _RunDir

    def run_state(self) -> str: ...

    def raise_if_dead(self, when: str) -> None: ...

    def owned(self, op: str) -> ContextManager: ...

    def paused(self, op: str) -> ContextManager: ...


class ControlPort:
    """One conversation with the guest's control port. Bytes that reach the guest's
    serial port before its init has opened and set it up are lost or mangled, so a
    request can vanish without any answer: `read_until` sends it again every few
    seconds until its answer starts."""

    def __init__(self, vm: ControlledVM) -> None:
        state = vm.run_state()
        if state != "running":
            raise HvkitError(f"VM {vm.name!r} is {state}; the guest answers only while it runs",
                             "resume it first" if state == "paused" else None)
        self.vm = vm
        self.buf = bytearray()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(1.0)
        self.sock.connect(str(vm.rundir.ctl_sock))

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def read_until(self, until: str, timeout: float, resend: str | None = None,
                   started: str | None = None) -> str:
        """Everything received so far up to and including the line holding `until`
        (which is consumed). While `started` (default `until`) has not arrived, `resend`
        is sent again every RESEND_AFTER seconds (safe: answers are matched by tag)."""
        marker, started_b = until.encode(), (started or until).encode()
        start = time.monotonic()
        deadline, resend_at = start + timeout, start + RESEND_AFTER
        while True:
            at = self.buf.find(marker)
            if at >= 0 and self.buf.find(b"\n", at) >= 0:
                cut = self.buf.find(b"\n", at) + 1
                text = self.buf[:cut].decode(errors="replace")
                del self.buf[:cut]
                return text
            now = time.monotonic()
            if now > deadline:
                got = f"{len(self.buf)} bytes, ending {bytes(self.buf[-60:])!r}" if self.buf else "nothing"
                raise HvkitError(f"the guest of {self.vm.name!r} did not answer with {until!r} within "
                                 f"{timeout:.0f} s (it sent {got})", "is it hvkit's default guest?")
            if resend and started_b not in self.buf and now > resend_at:
                self.sock.sendall(b"\n" + resend.encode() + b"\n")
                resend_at = now + RESEND_AFTER
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                continue
            if not chunk:
                self.vm.raise_if_dead(f"while waiting for {until!r}")
                raise HvkitError(f"the control port of {self.vm.name!r} closed mid-answer")
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "ControlPort":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def request(vm: ControlledVM, line: str, until: str, started: str | None = None, timeout: float = 60.0) -> str:
    """Sends one request line to the guest's control port and returns what the guest
    answered up to and including the line that contains `until`."""
    with ControlPort(vm) as port:
        port.send(line)
        return port.read_until(until, timeout, resend=line, started=started)


def ground_truth(vm: ControlledVM, save_to: Path | None = None, timeout: float = 120.0) -> GroundTruth:
    """The guest's own view of its memory and processes (hvkit's guests only: the
    default guest, or a disk image with hvkit's control service); the raw export is
    also written to `save_to` when given."""
    tag = _new_tag()
    raw = request(vm, f"dump {tag}", until=f"HVKIT-GT-END {tag}", started=f"HVKIT-GT-BEGIN {tag}",
                  timeout=timeout)
    return _parse_export(raw, tag, save_to)


def frozen_ground_truth(vm: ControlledVM, while_paused: Callable[[], T], timeout: float = 120.0,
                        save_to: Path | None = None) -> tuple[GroundTruth, T]:
    """The guest's own view of its memory at one moment, and what `while_paused`
    returns when run with the VM paused at that very moment (default guest only).

    The guest reads its page flags and free lists into memory and waits; the VM is
    paused there, so hvkit's view from outside and the guest's own describe the same
    pages. Then the VM runs again and the guest exports what it read."""
    tag = _new_tag()
    with vm.owned("ground truth"), ControlPort(vm) as port:
        port.send(f"freeze {tag}")
        port.read_until(f"HVKIT-FROZEN {tag}", timeout, resend=f"freeze {tag}")
        with vm.paused("ground truth"):
            result = while_paused()
        port.send("continue")
        raw = port.read_until(f"HVKIT-GT-END {tag}", timeout)
    return _parse_export(raw, tag, save_to), result


def _new_tag() -> str:
    """A tag no other request of this host carries: answers are matched by it."""
    return f"{os.getpid()}-{time.monotonic_ns()}"


def _parse_export(raw: str, tag: str, save_to: Path | None) -> GroundTruth:
    raw = raw[raw.find(f"HVKIT-GT-BEGIN {tag}"):]
    if save_to is not None:  # the guest's processes, environments, open files: its owner's alone
        with os.fdopen(os.open(save_to, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(raw)
    return parse_ground_truth(raw)
