"""A client of the QEMU guest agent (qemu-ga) inside a guest.

This module owns the host side of the agent's channel: a virtio-serial port named
`org.qemu.guest_agent.0` whose host end is a unix socket in the VM's runtime folder
(`qga.sock`). It speaks the agent's JSON protocol on a fresh connection per request,
each one preceded by `guest-sync` with a new id: the channel is a byte stream that
outlives connections, so a late answer to an earlier request (one that timed out
while the agent was still starting) could otherwise be taken for this one's.

The agent is how hvkit knows that a disk-image guest is up (`guest-ping`), runs a
command in it without ssh (`guest-exec`), and sets the clock of a VM that was paused
or forked (`guest-set-time`).
"""

from __future__ import annotations

import base64
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hvkit.errors import HvkitError

AGENT_PORT_NAME = "org.qemu.guest_agent.0"


class AgentSilent(HvkitError):
    """The agent did not answer (not running yet, or not at all)."""


@dataclass(frozen=True)
class ExecResult:
    exitcode: int
    stdout: str
    stderr: str


def agent_args(sock: Path) -> list[str]:
    """QEMU arguments for the agent's channel: a virtio-serial port whose host end is
    the unix socket `sock` (QEMU listens; hvkit connects per request)."""
    return ["-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=qga0,path={sock},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev=qga0,name={AGENT_PORT_NAME}"]


class GuestAgent:
    """The guest agent behind socket `sock`."""

    def __init__(self, sock: Path) -> None:
        self.sock = Path(sock)

    def call(self, command: str, arguments: dict | None = None, timeout: float = 10.0):
        """The `return` value of agent command `command`; AgentSilent when the agent
        does not answer within `timeout`, HvkitError when it answers with an error."""
        sync_id = time.monotonic_ns() % 2**31
        request = {"execute": command, **({"arguments": arguments} if arguments else {})}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                s.connect(str(self.sock))
                s.sendall(json.dumps({"execute": "guest-sync", "arguments": {"id": sync_id}}).encode() + b"\n")
                lines = s.makefile("rb")
                if not self._synced(lines, sync_id):
                    raise AgentSilent(f"the guest agent at {self.sock} closed the channel")
                s.sendall(json.dumps(request).encode() + b"\n")
                answer = self._next_answer(lines)
            except (OSError, ValueError) as e:  # not there yet, refused, timed out, garbled
                raise AgentSilent(f"the guest agent did not answer {command} ({e or type(e).__name__})") from None
        if "error" in answer:
            raise HvkitError(f"the guest agent refused {command}: {answer['error'].get('desc', answer['error'])}")
        return answer.get("return")

    @staticmethod
    def _synced(lines, sync_id: int) -> bool:
        """Skips whatever earlier requests left in the channel up to our sync's answer."""
        for line in lines:
            if line.strip() and json.loads(line).get("return") == sync_id:
                return True
        return False

    @staticmethod
    def _next_answer(lines) -> dict:
        for line in lines:
            if line.strip():
                return json.loads(line)
        raise OSError("the channel closed before the answer")

    def ping(self, timeout: float = 1.0) -> bool:
        try:
            return self.call("guest-ping", timeout=timeout) == {}
        except AgentSilent:
            return False

    def wait_until_answers(self, timeout: float, check_alive: Callable[[], None], what: str) -> float:
        """Pings until the agent answers; returns the seconds it took. `check_alive`
        raises if the VM died meanwhile; AgentSilent (naming `what`) on timeout."""
        started = time.monotonic()
        deadline = started + timeout
        while not self.ping(timeout=min(2.0, max(0.2, deadline - time.monotonic()))):
            check_alive()
            if time.monotonic() > deadline:
                raise AgentSilent(f"the guest agent of {what} did not answer guest-ping within {timeout:.0f} s",
                                  "see its console with 'hvkit vm log'; a slow host may need a longer --timeout")
            time.sleep(0.5)
        return time.monotonic() - started

    def set_time(self, ns: int | None = None) -> None:
        """Sets the guest's clock to `ns` (default: the host's time now): after a pause
        or a fork the guest's clock is wherever its snapshot left it."""
        self.call("guest-set-time", {"time": time.time_ns() if ns is None else ns})

    def exec(self, path: str, *args: str, timeout: float = 60.0, input: bytes | None = None) -> ExecResult:
        """Runs `path args...` in the guest and waits for it (guest-exec); `input` is
        its standard input."""
        request = {"path": path, "arg": list(args), "capture-output": True}
        if input is not None:
            request["input-data"] = base64.b64encode(input).decode()
        pid = self.call("guest-exec", request)["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.call("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                def text(key: str) -> str:
                    return base64.b64decode(status.get(key, "")).decode(errors="replace")
                return ExecResult(status.get("exitcode", -1), text("out-data"), text("err-data"))
            if time.monotonic() > deadline:
                raise HvkitError(f"{path} did not finish in the guest within {timeout:.0f} s")
            time.sleep(0.2)
