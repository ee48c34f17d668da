"""The default guest's own account of its memory, exported on request through its
second serial port (the `dump` request of files/init), parsed into plain data.

Tests compare this with what hvkit finds from outside the guest, so it is kept raw:
/proc/meminfo, buddyinfo, zoneinfo, vmstat, iomem, /proc/kpageflags (one 64-bit word
of KPF_* bits per page frame) and /proc/<pid>/stat of every process; from the default
guest also what forensics tools read: /proc/modules, the mountinfo of every mount
namespace, every process's environment and open files (absent from a guest that does
not export them).
"""

from __future__ import annotations

import base64
import gzip
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from hvkit.errors import HvkitError
from hvkit.pageclass import PageClass


@dataclass(frozen=True)
class GuestProcess:
    pid: int
    name: str
    state: str
    ppid: int


@dataclass
class GroundTruth:
    meminfo: dict[str, int]  # bytes, by /proc/meminfo key
    buddyinfo: dict[tuple[int, str], list[int]]  # (node, zone) -> free blocks per order
    kpageflags: np.ndarray  # uint64 per page frame number
    processes: list[GuestProcess]
    text: dict[str, str] = field(default_factory=dict)  # raw zoneinfo, vmstat, iomem
    modules: list[str] = field(default_factory=list)  # names, as /proc/modules lists them
    mounts: list[tuple[str, str]] = field(default_factory=list)  # (mount point, type), every namespace
    environ: dict[int, dict[str, str]] = field(default_factory=dict)  # pid -> its environment
    open_files: dict[int, dict[int, str]] = field(default_factory=dict)  # pid -> fd -> what it is

    def free_pages_by_buddyinfo(self) -> int:
        return sum(n << order for counts in self.buddyinfo.values() for order, n in enumerate(counts))

    def page_classes(self, kpf_bit: Callable[[str], int]) -> np.ndarray:
        """The class of each page frame by the guest's own /proc/kpageflags, in hvkit's
        classes (hvkit.introspect.PageClass), to hold hvkit's classification against.
        `kpf_bit("KPF_BUDDY")` gives a flag's bit number (from the compiled layout).

        kpageflags cannot tell the kernel image from other reserved pages: both are
        RESERVED here. It marks every page of a free block BUDDY (not just the first).
        Page cache is what sits on an LRU list, is mapped, or is a transparent huge
        page, and is not anonymous.

        The KPF_* bits are a stable ABI, and the kernel keeps their meaning when its own
        marks change: on 6.1 KPF_SLAB comes from PG_slab of the compound head, on 6.12
        (slab a page type, PG_slab gone) from the folio's page type, again for every page
        of the slab; KPF_BUDDY, KPF_PGTABLE and KPF_OFFLINE follow the page types either
        way. So this decoding is the same for both (tests/test_kernels.py checks it)."""
        k = self.kpageflags
        has = lambda name: (k >> np.uint64(kpf_bit(name))) & np.uint64(1) != 0  # noqa: E731
        anon = has("KPF_ANON")
        conditions = [has("KPF_NOPAGE"), has("KPF_BUDDY"), has("KPF_PGTABLE"), has("KPF_SLAB"),
                      has("KPF_RESERVED") | has("KPF_OFFLINE"), anon,
                      ~anon & (has("KPF_LRU") | has("KPF_MMAP") | has("KPF_THP"))]
        choices = [PageClass.NOT_PRESENT, PageClass.FREE, PageClass.PAGE_TABLE, PageClass.SLAB,
                   PageClass.RESERVED, PageClass.ANONYMOUS, PageClass.PAGE_CACHE]
        return np.select(conditions, [np.uint8(c) for c in choices], np.uint8(PageClass.KERNEL_OTHER)).astype(np.uint8)


def _sections(raw: str) -> dict[str, str]:
    begin = raw.find("HVKIT-GT-BEGIN")
    end = raw.find("HVKIT-GT-END", begin)
    if begin < 0 or end < 0:
        raise HvkitError("the guest's ground-truth export is incomplete",
                         "is the guest the hvkit default guest, and still running?")
    body = raw[raw.index("\n", begin) + 1 : end]
    out: dict[str, str] = {}
    for chunk in ("\n" + body).split("\n@@ ")[1:]:
        header, _, content = chunk.partition("\n")
        out[header.split()[0]] = content
    return out


def _meminfo(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"(\S+):\s+(\d+)(?:\s+kB)?", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if "kB" in line else 1)
    return out


def _buddyinfo(text: str) -> dict[tuple[int, str], list[int]]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"Node (\d+), zone\s+(\S+)\s+(.*)", line)
        if m:
            out[(int(m.group(1)), m.group(2))] = [int(x) for x in m.group(3).split()]
    return out


def _processes(text: str) -> list[GuestProcess]:
    procs = []
    for line in text.splitlines():
        # comm may hold spaces and parentheses: it runs from the first '(' to the last ')'
        m = re.match(r"(\d+) \((.*)\) (\S) (-?\d+)", line)
        if m:
            procs.append(GuestProcess(int(m.group(1)), m.group(2), m.group(3), int(m.group(4))))
    return sorted(procs, key=lambda p: p.pid)


def _mounts(text: str) -> list[tuple[str, str]]:
    """(mount point, file system type) of each mountinfo line: the 5th field, and the
    first after the ' - ' separator."""
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if sep and len(left.split()) >= 5 and right.split():
            out.append((left.split()[4], right.split()[0]))
    return out


def _environ(text: str) -> dict[int, dict[str, str]]:
    out: dict[int, dict[str, str]] = {}
    for line in text.splitlines():
        pid, _, entry = line.partition(" ")
        key, eq, value = entry.partition("=")
        if pid.isdigit() and eq:
            out.setdefault(int(pid), {})[key] = value
    return out


def _open_files(text: str) -> dict[int, dict[int, str]]:
    out: dict[int, dict[int, str]] = {}
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
            out.setdefault(int(parts[0]), {})[int(parts[1])] = parts[2]
    return out


def parse_ground_truth(raw: str) -> GroundTruth:
    s = _sections(raw)
    missing = {"meminfo", "buddyinfo", "kpageflags", "procs"} - s.keys()
    if missing:
        raise HvkitError(f"the guest's ground-truth export lacks {', '.join(sorted(missing))}")
    try:
        flags = gzip.decompress(base64.b64decode("".join(s["kpageflags"].split())))
    except (ValueError, OSError) as e:
        raise HvkitError(f"the guest's kpageflags export is damaged: {e}") from None
    return GroundTruth(
        meminfo=_meminfo(s["meminfo"]),
        buddyinfo=_buddyinfo(s["buddyinfo"]),
        kpageflags=np.frombuffer(flags, dtype="<u8").copy(),
        processes=_processes(s["procs"]),
        text={k: s[k] for k in ("zoneinfo", "vmstat", "iomem") if k in s},
        modules=[line.split()[0] for line in s.get("modules", "").splitlines() if line.split()],
        mounts=_mounts(s.get("mountinfo", "")),
        environ=_environ(s.get("environ", "")),
        open_files=_open_files(s.get("fds", "")),
    )
