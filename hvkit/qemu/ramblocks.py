"""Where QEMU maps each memory backend of a NUMA machine in its own address space.

QMP names a machine's backends and QEMU's memory tree gives their order (probe.py), but
neither says where in QEMU's process each one lies. A backend in a file is found by its
path in /proc/PID/maps; backends inside QEMU (memory-backend-ram) are anonymous
mappings, and several of the same size cannot be told apart there.

QEMU keeps a record per RAM block in its heap (struct RAMBlock: the block's host
address, its used and maximum lengths, then its id string, the backend's id). hvkit
reads QEMU's writable private memory (never guest RAM) for each backend's id string
and takes, in the 64 bytes before it, an aligned word equal to the start of a mapping of
the backend's size, followed by a word equal to that size: a pattern nothing else is
likely to make. No field offset of QEMU's is assumed beyond "the host address and the
length come shortly before the id". What is not found this way is left to the guest's
own records (introspect/numa.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct

from hvkit.memory.process import Mapping, process_mappings
from hvkit.qemu.runtime import RamBackend

log = logging.getLogger(__name__)

WINDOW = 64  # bytes before the id string where the host address and length are looked for
_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-/[]")
MAX_SCAN = 64 << 20  # bytes of one mapping read at most (QEMU's heap is a few MiB to tens of MiB)


def place_backends(pid: int, backends: list[RamBackend]) -> list[RamBackend]:
    """`backends` with `host` set for those inside QEMU whose mapping QEMU's RAM block
    records give, one distinct mapping each; all of them unchanged where any backend
    cannot be placed so (the guest's node records decide then)."""
    inside = [b for b in backends if b.path is None]
    if len(inside) < 2:
        return backends
    mappings = process_mappings(pid)
    starts = {m.start: m for m in mappings if m.perms.startswith("rw") and m.offset == 0}
    hosts = _hosts_from_records(pid, inside, starts, mappings)
    if len(hosts) != len(inside) or len(set(hosts.values())) != len(hosts):
        log.info("QEMU process %d: its RAM block records do not place every node's backend (%s)", pid, hosts)
        return backends
    return [dataclasses.replace(b, host=hosts[b.memdev]) if b.memdev in hosts else b for b in backends]


def _hosts_from_records(pid: int, inside: list[RamBackend], starts: dict[int, Mapping],
                        mappings: list[Mapping]) -> dict[str, int]:
    ram = {start for start, m in starts.items() if any(m.size == b.size for b in inside)}
    heaps = sorted((m for m in mappings if m.perms.startswith("rw") and m.start not in ram
                    and m.path in ("", "[heap]") and m.size <= MAX_SCAN),
                   key=lambda m: m.path != "[heap]")  # RAMBlocks are allocated by the main thread
    found: dict[str, int] = {}
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except OSError:
        return found
    try:
        for heap in heaps:
            try:
                data = os.pread(fd, heap.size, heap.start)
            except OSError:
                continue
            for b in inside:
                if b.memdev not in found:
                    host = _host_before_id(data, heap.start, b, starts)
                    if host is not None:
                        found[b.memdev] = host
            if len(found) == len(inside):
                break
    finally:
        os.close(fd)
    return found


def _host_before_id(data: bytes, base: int, backend: RamBackend, starts: dict[int, Mapping]) -> int | None:
    """The host address a RAM block record in `data` (read from `base`) gives for
    `backend`: the one such record's, else None."""
    ident = backend.memdev.encode() + b"\0"
    hits: set[int] = set()
    at = data.find(ident)
    while at >= 0:
        if at > 0 and chr(data[at - 1]) in _ID_CHARS:  # the tail of a longer name
            at = data.find(ident, at + 1)
            continue
        lo = max(0, (base + at - WINDOW) // 8 * 8 - base)
        words = struct.unpack_from(f"<{(at - lo) // 8}Q", data, lo)
        for i, word in enumerate(words):
            m = starts.get(word)
            if m is not None and m.size >= backend.size and backend.size in words[i + 1:]:
                hits.add(word)
        at = data.find(ident, at + 1)
    return hits.pop() if len(hits) == 1 else None
