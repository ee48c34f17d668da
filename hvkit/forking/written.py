"""The pages a forked VM wrote since it was born, read from its QEMU process.

A forked VM maps its snapshot file privately (share=off): a page it only reads is the
host's page-cache page of that file, a page it writes becomes an anonymous copy. The
kernel's /proc/<pid>/pagemap tells the two apart (bit 61, "file page or shared
anonymous", is clear for the copies), and /proc/<pid>/mem reads them.

Where the kernel has it (Linux 6.7+), the PAGEMAP_SCAN ioctl of that file returns just the
runs of such pages: no 8 bytes read per page of guest RAM (32 MiB of pagemap for a 16 GiB
guest, most of a forked VM's pause when it wrote little). Elsewhere pagemap is read whole.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from pathlib import Path

import numpy as np

from hvkit.errors import HvkitError
from hvkit.memory import PAGE_SIZE
from hvkit.memory.base import consecutive_runs

PAGE = PAGE_SIZE
PRESENT, SWAPPED, FILE_OR_SHARED = 1 << 63, 1 << 62, 1 << 61

# PAGEMAP_SCAN (include/uapi/linux/fs.h): categories of a page, and the ioctl
PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_SWAPPED = 1 << 2, 1 << 3, 1 << 4
SCAN_REGIONS = 4096  # runs returned per call


class _ScanArg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages", "category_inverted",
        "category_mask", "category_anyof_mask", "return_mask")]


PAGEMAP_SCAN = (3 << 30) | (ctypes.sizeof(_ScanArg) << 16) | (ord("f") << 8) | 16  # _IOWR('f', 16, ...)


def ram_mapping(pid: int, ram_file: str) -> tuple[int, int]:
    """(start, end) of the mapping of `ram_file` in process `pid`."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError as e:
        raise HvkitError(f"cannot read the mappings of QEMU process {pid} ({e.strerror})") from None
    for line in maps.splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5] == ram_file and fields[2] == "00000000":
            start, end = (int(x, 16) for x in fields[0].split("-"))
            return start, end
    raise HvkitError(f"QEMU process {pid} does not map its snapshot file {ram_file}",
                     "the VM was not started from a snapshot by this hvkit")


def written_pages(pid: int, ram_file: str, size: int) -> tuple[np.ndarray, int]:
    """(page numbers of the pages of guest RAM that QEMU process `pid` holds privately,
    where its RAM mapping starts): read them with `read_pages`, paused (a running guest
    changes them)."""
    start, end = ram_mapping(pid, ram_file)
    pages = min(size, end - start) // PAGE
    try:
        with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
            found = scanned_own_pages(f.fileno(), start, start + pages * PAGE)
            if found is not None:
                return found, start
            f.seek(start // PAGE * 8)
            raw = f.read(pages * 8)
    except OSError as e:
        raise _unreadable(pid, e) from None
    entries = np.frombuffer(raw, dtype="<u8")
    own = ((entries & np.uint64(PRESENT | SWAPPED)) != 0) & ((entries & np.uint64(FILE_OR_SHARED)) == 0)
    return np.flatnonzero(own).astype(np.uint64), start


def scanned_own_pages(fd: int, start: int, end: int) -> np.ndarray | None:
    """Page numbers (from `start`) of the present or swapped pages of [start, end) that
    are not file pages, by PAGEMAP_SCAN on pagemap file `fd`; None where the kernel has
    no PAGEMAP_SCAN."""
    regions = (ctypes.c_uint64 * (3 * SCAN_REGIONS))()
    arg = _ScanArg(size=ctypes.sizeof(_ScanArg), start=start, end=end, vec=ctypes.addressof(regions),
                   vec_len=SCAN_REGIONS, category_inverted=PAGE_IS_FILE, category_mask=PAGE_IS_FILE,
                   category_anyof_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                   return_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_FILE)
    runs = []
    while arg.start < end:
        try:
            n = fcntl.ioctl(fd, PAGEMAP_SCAN, arg)
        except OSError:
            if not runs and arg.start == start:
                return None  # ENOTTY/EINVAL: an older kernel; pagemap is read whole instead
            raise
        if n:
            runs.append(np.frombuffer(regions, dtype=np.uint64, count=3 * n).reshape(n, 3)[:, :2].copy())
        if arg.walk_end <= arg.start or arg.walk_end >= end:
            break
        arg.start = arg.walk_end  # the vector was full: go on from where the walk stopped
    if not runs:
        return np.zeros(0, dtype=np.uint64)
    spans = np.concatenate(runs)
    firsts = (spans[:, 0] - np.uint64(start)) // np.uint64(PAGE)
    counts = ((spans[:, 1] - spans[:, 0]) // np.uint64(PAGE)).astype(np.int64)
    # each run's pages, without a Python step per page: firsts repeated, plus 0, 1, ...
    within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return (np.repeat(firsts, counts).astype(np.int64) + within).astype(np.uint64)


def read_pages(pid: int, start: int, which: np.ndarray, out: np.ndarray) -> None:
    """Pages `which` of the RAM mapping at `start` of QEMU process `pid` into `out`
    ((n, 4096) bytes, e.g. their place in the memory server's store), one read per run
    of consecutive pages."""
    firsts, lasts = consecutive_runs(which)
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        try:
            flat = memoryview(out.reshape(-1))
            for a, b in zip(firsts.tolist(), lasts.tolist()):
                if b > a:
                    want = (b - a) * PAGE
                    got = os.preadv(fd, [flat[a * PAGE:b * PAGE]], start + int(which[a]) * PAGE)
                    if got != want:
                        raise OSError(0, f"short read ({got} of {want} bytes)")
        finally:
            os.close(fd)
    except OSError as e:
        raise _unreadable(pid, e) from None


def _unreadable(pid: int, e: OSError) -> HvkitError:
    return HvkitError(f"cannot read the guest memory of QEMU process {pid} ({e.strerror or e})",
                      "hvkit needs to read /proc/<pid>/mem of the VMs it forks (run it as root)")
