"""Slots: memory-server files whose content is chosen after a QEMU has mapped them.

    <store>/slots/<id>.json   {"size": bytes, "snapshot": null | name}
    <mount>/slots/<id>.ram    the slot as a file: `size` bytes, read as `snapshot`

QEMU 7.2 binds guest RAM to its memory backend when it starts, and cannot be given
another later; but it reads no page of guest RAM before an incoming migration. So a
QEMU started ahead of time (the fork's warm pool, hvkit.forking.pool) maps a slot that
names no snapshot yet, and once a fork has sealed its snapshot the slot is bound to it
(`bind_slot`, a record written once): from then on the server serves the snapshot's
pages as the slot's. Every QEMU that maps one slot shares its page-cache pages, as
children mapping one snapshot file do, so the pool starts QEMUs in batches of one slot.

A slot is bound once and never rebound (its page cache would hold another snapshot's
pages); a read of a slot not bound yet fails (EIO), so a QEMU that read early would
die, never see wrong memory. A new server starts with no slots: the QEMUs of the
previous one's are stopped with it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from hvkit.errors import HvkitError

SLOTS = "slots"  # the folder of slot records in the store, and of slot files in the mount
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Slot:
    id: str
    size: int
    snapshot: str | None  # None: not bound yet


def slot_dir(store: Path) -> Path:
    return store / SLOTS


def _record(store: Path, slot_id: str) -> Path:
    if not _ID.match(slot_id):
        raise HvkitError(f"invalid slot id {slot_id!r}")
    return slot_dir(store) / f"{slot_id}.json"


def _write(path: Path, slot: Slot) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump({"size": slot.size, "snapshot": slot.snapshot}, f)
    os.replace(tmp, path)


def new_slot(store: Path, slot_id: str, size: int) -> Slot:
    """A slot of `size` bytes bound to nothing yet."""
    folder = slot_dir(store)
    folder.mkdir(mode=0o700, exist_ok=True)
    slot = Slot(slot_id, size, None)
    _write(_record(store, slot_id), slot)
    return slot


def read_slot(store: Path, slot_id: str) -> Slot | None:
    """The slot's record, or None if there is no such slot."""
    try:
        d = json.loads(_record(store, slot_id).read_text())
        return Slot(slot_id, int(d["size"]), d.get("snapshot"))
    except (OSError, ValueError, KeyError, TypeError, HvkitError):
        return None


def bind_slot(store: Path, slot_id: str, snapshot: str, size: int) -> None:
    """Binds the slot to `snapshot` (whose RAM is `size` bytes). Refused if it is bound
    already, or of another size: a slot is bound once."""
    slot = read_slot(store, slot_id)
    if slot is None:
        raise HvkitError(f"slot {slot_id} of the memory server is gone")
    if slot.snapshot is not None and slot.snapshot != snapshot:
        raise HvkitError(f"slot {slot_id} is bound to snapshot {slot.snapshot} already")
    if slot.size != size:
        raise HvkitError(f"slot {slot_id} holds {slot.size} bytes, snapshot {snapshot} {size}")
    _write(_record(store, slot_id), Slot(slot_id, size, snapshot))


def remove_slot(store: Path, slot_id: str) -> None:
    _record(store, slot_id).unlink(missing_ok=True)


def clear_slots(store: Path) -> None:
    """Removes every slot record (a new server: no QEMU maps one of the old server's)."""
    shutil.rmtree(slot_dir(store), ignore_errors=True)
