"""Blocking QMP calls on top of the `qemu.qmp` library (which is asyncio-only).

Each call connects, runs one command and disconnects: hvkit commands are short-lived
processes, and QEMU's QMP socket takes one client at a time (a second client waits, or
is turned away, until the first disconnects: QMPUnreachable, which a caller that knows
QEMU still runs retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from pathlib import Path
from typing import Any, Coroutine

from qemu.qmp import ConnectError, ExecuteError, QMPClient

from hvkit.errors import HvkitError, VMDied


class QMPUnreachable(VMDied):
    """No QMP session could be set up: QEMU is gone, or another client has the socket.
    The command was not sent."""


async def _connected(sock: Path, timeout: float) -> QMPClient:
    client = QMPClient("hvkit")
    try:
        await asyncio.wait_for(client.connect(str(sock)), timeout)
    except asyncio.TimeoutError as e:
        raise ConnectError("timed out", e) from None
    return client


async def _execute(sock: Path, command: str, args: dict | None, timeout: float) -> Any:
    client = await _connected(sock, timeout)
    try:
        return await asyncio.wait_for(client.execute(command, args), timeout)
    finally:
        await client.disconnect()


def _session(sock: Path, what: str, session: Coroutine) -> Any:
    """Runs one QMP session; QEMU's refusal -> HvkitError, no session -> QMPUnreachable,
    a session that breaks -> VMDied."""
    try:
        return asyncio.run(session)
    except ExecuteError as e:
        raise HvkitError(f"QEMU refused {what}: {e}") from None
    except ConnectError as e:
        raise QMPUnreachable(f"QEMU does not answer on {sock} ({e})") from None
    except (OSError, EOFError, asyncio.TimeoutError) as e:
        raise VMDied(f"QEMU does not answer on {sock} ({type(e).__name__}: {e})") from None


def qmp(sock: Path, command: str, args: dict | None = None, timeout: float = 10.0) -> Any:
    """The result of QMP `command`; HvkitError if QEMU refuses it, VMDied if it is gone."""
    return _session(sock, command, _execute(sock, command, args, timeout))


async def _execute_all(sock: Path, commands: list[tuple[str, dict | None]], timeout: float) -> list:
    client = await _connected(sock, timeout)
    try:
        return [await asyncio.wait_for(client.execute(command, args), timeout) for command, args in commands]
    finally:
        await client.disconnect()


def qmp_all(sock: Path, commands: list[tuple[str, dict | None]], timeout: float = 10.0) -> list:
    """The results of `commands` run in order in one QMP session (one connection and
    greeting instead of one per command: a fork's pause is a few ms shorter); stops at
    the first that QEMU refuses (HvkitError)."""
    return _session(sock, ", ".join(c for c, _ in commands), _execute_all(sock, commands, timeout))


async def _execute_with_fd(sock: Path, fd: int, fdname: str, command: str, args: dict | None,
                           timeout: float) -> Any:
    client = await _connected(sock, timeout)
    try:
        client.send_fd_scm(fd)
        await asyncio.wait_for(client.execute("getfd", {"fdname": fdname}), timeout)
        try:
            return await asyncio.wait_for(client.execute(command, args), timeout)
        except BaseException:
            with contextlib.suppress(Exception):  # not left open in QEMU if the command failed
                await asyncio.wait_for(client.execute("closefd", {"fdname": fdname}), 5.0)
            raise
    finally:
        await client.disconnect()


def qmp_with_fd(sock: Path, fd: int, fdname: str, command: str, args: dict | None = None,
                timeout: float = 10.0) -> Any:
    """Passes file descriptor `fd` to QEMU as `fdname` (getfd) and runs `command`, which
    names it ("fd:NAME"), in the same session: a monitor's fds are its own."""
    return _session(sock, command, _execute_with_fd(sock, fd, fdname, command, args, timeout))


def libvirt_qmp(uri: str, domain: str, command: str, args: dict | None = None, timeout: float = 10.0) -> Any:
    """The result of QMP `command` sent to libvirt domain `domain` through libvirt's own
    pass-through (`virsh qemu-monitor-command`): libvirt holds the domain's QMP socket, so
    nobody else may talk to it directly. VMDied when the domain is gone or not running."""
    message = json.dumps({"execute": command, **({"arguments": args} if args else {})})
    try:
        out = subprocess.run(["virsh", "-c", uri, "qemu-monitor-command", domain, message],
                             capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise HvkitError("virsh is not installed", "apt-get install libvirt-clients (./setup.sh does)") from None
    except subprocess.TimeoutExpired:
        raise VMDied(f"libvirt did not answer {command} for domain {domain} within {timeout:.0f} s") from None
    if out.returncode != 0:
        said = " ".join(out.stderr.split()) or "no message"
        if "failed to get domain" in said or "not running" in said:
            raise VMDied(f"libvirt domain {domain!r} is gone or not running ({said})")
        raise HvkitError(f"libvirt refused to pass {command} to domain {domain!r}: {said}")
    try:
        reply = json.loads(out.stdout)
    except ValueError:
        raise HvkitError(f"libvirt answered {command} for {domain!r} with no JSON: {out.stdout[:200]!r}") from None
    if "error" in reply:
        raise HvkitError(f"QEMU refused {command}: {reply['error'].get('desc', reply['error'])}")
    return reply.get("return")


async def _incoming(sock: Path, uri: str, run: bool, timeout: float, fd: int | None = None) -> tuple[str, str]:
    client = await _connected(sock, timeout)
    try:
        if fd is not None:  # uri is "fd:NAME": the file handed over on this session
            client.send_fd_scm(fd)
            await client.execute("getfd", {"fdname": uri.partition(":")[2]})
        await client.execute("migrate-incoming", {"uri": uri})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (status := (await client.execute("query-status"))["status"]) == "inmigrate":
            if loop.time() > deadline:
                break
            await asyncio.sleep(0.001)
        outcome = (await client.execute("query-migrate")).get("status", "?")
        if run and outcome == "completed" and status == "paused":
            await client.execute("cont")
            status = "running"
        return status, outcome
    finally:
        await client.disconnect()


def incoming_migration(sock: Path, uri: str, run: bool, timeout: float = 30.0,
                       fd: int | None = None) -> tuple[str, str]:
    """Loads a VM's device state from `uri` into the QEMU behind `sock` (started with
    -incoming defer) in one QMP session, and lets it run when `run` and the load
    completed: (run state, migration status). One session instead of one per poll: a
    forked child runs tens of milliseconds sooner. With `fd` (an open file of the
    state), `uri` is "fd:NAME" and the file is handed to QEMU on the same session: no
    shell and `cat` to start, a few ms sooner again."""
    return _session(sock, "to load the device state", _incoming(sock, uri, run, timeout, fd))
