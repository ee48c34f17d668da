"""Guest RAM read from a live QEMU process: `/proc/<pid>/mem`, with pread, never a mapping.

Whatever backs a VM's RAM (anonymous memory, a shared or private file, huge pages, an
hvkit snapshot that a forked VM maps privately), QEMU has it mapped at some host-virtual
address, and reading `/proc/<pid>/mem` there reads guest memory as the guest sees it:
the pages a forked VM wrote itself included. Reading never allocates: a page QEMU never
touched reads through the kernel's shared zero page.

Finding the mapping is the caller's part (`ram_mappings` lists the candidates: the
mapping of a known file, or every mapping of exactly the RAM's size); a candidate is
confirmed by finding the guest kernel in it (hvkit.introspect.source does that). A NUMA
guest has one mapping per node's memory backend: the guest's RAM is those pieces end to
end, in node order.
Needs the right to trace QEMU (root, or the same user with ptrace allowed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from hvkit.errors import HvkitError
from hvkit.memory.base import PAGE_SIZE, GuestMemory, RamPiece, place_on_pieces
from hvkit.memory.ramfile import pc_ram_ranges

PRESENT, SWAPPED = 1 << 63, 1 << 62


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/<pid>/maps."""

    start: int
    end: int
    perms: str
    offset: int
    path: str  # "" for anonymous memory

    @property
    def size(self) -> int:
        return self.end - self.start


def process_mappings(pid: int) -> list[Mapping]:
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError as e:
        raise HvkitError(f"cannot read the mappings of process {pid} ({e.strerror})",
                         "is it running, and may this user trace it (root)?") from None
    out = []
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 5:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        out.append(Mapping(start, end, fields[1], int(fields[2], 16), fields[5] if len(fields) == 6 else ""))
    return out


def ram_mappings(pid: int, ram_size: int, path: str | None = None,
                 mappings: list[Mapping] | None = None) -> list[Mapping]:
    """Mappings of process `pid` (or of its `mappings`, read once by the caller) that can
    hold guest RAM of `ram_size` bytes: the one of file `path` at offset 0 when given,
    else every readable, writable mapping of exactly that size (anonymous first:
    `-m 4G` and memory-backend-ram are anonymous)."""
    found = [m for m in (mappings if mappings is not None else process_mappings(pid))
             if m.perms.startswith("rw") and m.size >= ram_size and m.offset == 0]
    if path is not None:
        return [m for m in found if m.path == path]
    exact = [m for m in found if m.size == ram_size and not m.path.startswith("/dev/")]
    return sorted(exact, key=lambda m: (m.path != "" and m.path != "[heap]", m.start))


class ProcessMemory(GuestMemory):
    """Guest-physical memory of the QEMU process `pid`, whose guest RAM (laid out as
    QEMU's PC `machine` does: below the hole under 4 GiB and above it) is `pieces`
    end to end: each a mapping in QEMU (RamPiece.offset: its host-virtual address).
    `ProcessMemory.at` is the common case of one mapping."""

    def __init__(self, pid: int, pieces: Sequence[RamPiece], machine: str = "pc") -> None:
        self.pid = pid
        self.pieces = list(pieces)
        ranges = place_on_pieces(pc_ram_ranges(sum(p.size for p in self.pieces), machine), self.pieces)
        try:
            super().__init__(Path(f"/proc/{pid}/mem"), ranges)
        except PermissionError:
            raise HvkitError(f"may not read the memory of QEMU process {pid}",
                             "run hvkit as root (or as QEMU's user with ptrace allowed)") from None
        except FileNotFoundError:
            raise HvkitError(f"QEMU process {pid} is gone") from None

    @classmethod
    def at(cls, pid: int, host_start: int, ram_size: int, machine: str = "pc") -> "ProcessMemory":
        """Guest RAM of `ram_size` bytes mapped at `host_start` in QEMU process `pid`."""
        return cls(pid, [RamPiece(ram_size, host_start)], machine)

    def read(self, gpa: int, size: int) -> bytes:
        try:
            return super().read(gpa, size)
        except OSError as e:  # the mapping went away under us: QEMU exited or remapped
            raise HvkitError(f"cannot read guest memory from QEMU process {self.pid} ({e.strerror})",
                             "did the VM stop?") from None

    def read_into(self, gpa: int, into: memoryview) -> None:
        try:
            super().read_into(gpa, into)
        except OSError as e:
            raise HvkitError(f"cannot read guest memory from QEMU process {self.pid} ({e.strerror})",
                             "did the VM stop?") from None

    def data_extents(self) -> list[tuple[int, int]]:
        """(gpa, size) of the pages QEMU holds (present or swapped, from
        /proc/<pid>/pagemap): pages never touched are zeros and are skipped."""
        out: list[tuple[int, int]] = []
        try:
            fd = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY)
        except OSError as e:
            raise HvkitError(f"cannot read the page map of QEMU process {self.pid} ({e.strerror})") from None
        try:
            for r in self.ranges:
                pages = r.size // PAGE_SIZE
                raw = os.pread(fd, pages * 8, r.offset // PAGE_SIZE * 8)
                held = (np.frombuffer(raw, dtype="<u8") & np.uint64(PRESENT | SWAPPED)) != 0
                padded = np.concatenate(([False], held, [False])).astype(np.int8)
                edges = np.flatnonzero(np.diff(padded))
                for first, end in zip(edges[0::2].tolist(), edges[1::2].tolist()):
                    out.append((r.gpa + first * PAGE_SIZE, (end - first) * PAGE_SIZE))
        finally:
            os.close(fd)
        return out

    def __repr__(self) -> str:
        at = ", ".join(f"{p.offset:#x}" for p in self.pieces)
        return f"ProcessMemory(pid {self.pid} at {at}, {self.size >> 20} MiB)"
