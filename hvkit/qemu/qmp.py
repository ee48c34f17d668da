"""Blocking QMP calls on top of the `qemu.qmp` library (which is asyncio-only).

Each call connects, runs one command and disconnects: hvkit commands are short-lived
processes, and QEMU's QMP socket takes one client at a time (a second client waits, or
is turned away, until the first disconnects: QMPUnreachable, which a caller that knows
QEMU still runs retries).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient

from hvkit.errors import HvkitError, VMDied


class QMPUnreachable(VMDied):
    """No QMP session could be set up: QEMU is gone, or another client has the socket.
    The command was not sent."""


async def _execute(sock: Path, command: str, args: dict | None, timeout: float) -> Any:
    client = QMPClient("hvkit")
    try:
        await asyncio.wait_for(client.connect(str(sock)), timeout)
    except asyncio.TimeoutError as e:
        raise ConnectError("timed out", e) from None
    try:
        return await asyncio.wait_for(client.execute(command, args), timeout)
    finally:
        await client.disconnect()


def qmp(sock: Path, command: str, args: dict | None = None, timeout: float = 10.0) -> Any:
    """The result of QMP `command`; HvkitError if QEMU refuses it, VMDied if it is gone."""
    try:
        return asyncio.run(_execute(sock, command, args, timeout))
    except ExecuteError as e:
        raise HvkitError(f"QEMU refused {command}: {e}") from None
    except ConnectError as e:
        raise QMPUnreachable(f"QEMU does not answer on {sock} ({e})") from None
    except (OSError, EOFError, asyncio.TimeoutError) as e:
        raise VMDied(f"QEMU does not answer on {sock} ({type(e).__name__}: {e})") from None
