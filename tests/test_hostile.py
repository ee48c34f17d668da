"""Guest memory is hostile input: `hvkit ps` and `hvkit identify` on corrupted copies of a
real 256 MiB guest's RAM each answer, or fail with one `hvkit: error:` line, within 10 s
and 512 MiB, whatever the memory holds (issue 11).

Each corrupted copy is made in /dev/shm, one at a time, from a copy of the shared guest's
RAM taken while it was paused; corruptions are seeded, so a failure names a copy that can
be made again. The commands run through the real CLI (hvkit.cli.main) in a child forked
from this already-imported process: no Python start-up per command, and wait4 gives the
child's exit status, peak memory and time. Run with -s for a summary per kind.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from hvkit.introspect.kernelspace import KernelMismatch, KernelSpace
from hvkit.introspect.pages import frame_count
from hvkit.introspect.pagetables import ADDR_MASK, LARGE, PRESENT, WalkBudget, lookup, walk_pages
from hvkit.introspect.source import load_kernel_knowledge
from hvkit.introspect.tasks import list_tasks
from hvkit.memory import PAGE_SIZE, ElfCoreMemory, RamFileMemory

SECONDS = 10.0  # per command, wall time
MIB = 512  # per command, peak resident memory
BLOCK = 2 << 20
SEED = 11  # the number: the corruptions of a kind come from default_rng([SEED, index of the kind])


# -- running the CLI in a forked child ----------------------------------------------------

@dataclass
class Outcome:
    command: str
    status: int  # exit status; -N: killed by signal N
    seconds: float
    mib: float  # the child's peak resident memory (includes what it shares with this process)
    stdout: str
    stderr: str


def _child(argv: list[str], out: Path, err: Path) -> None:
    """In the forked child: run `hvkit ARGV` with stdout and stderr in files; never returns."""
    status = 70
    try:
        for fd, path in ((1, out), (2, err)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(f, fd)
            os.close(f)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        sys.argv = ["hvkit", *argv]
        from hvkit.cli import main

        main()
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - a traceback is what the test looks for
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def run_forked(argv: list[str], scratch: Path) -> Outcome:
    """`hvkit ARGV` in a child of this process; killed after SECONDS (status -9), or as
    soon as it holds 4 x MIB (so a blow-up cannot take the machine down)."""
    out, err = scratch / "stdout", scratch / "stderr"
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(argv, out, err)
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - t0 > SECONDS or _rss_mib(pid) > 4 * MIB:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            break
        time.sleep(0.005)
    seconds = time.monotonic() - t0
    code = os.waitstatus_to_exitcode(status)
    return Outcome(" ".join(argv[:1]), code, seconds, usage.ru_maxrss / 1024,
                   out.read_text(errors="replace"), err.read_text(errors="replace"))


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def problems(o: Outcome) -> list[str]:
    """What is wrong with one command's outcome (empty: it is fine)."""
    found = []
    if o.status < 0 or o.seconds > SECONDS:
        found.append(f"{o.command}: took {o.seconds:.1f} s (killed: status {o.status})")
    if o.mib > MIB:
        found.append(f"{o.command}: peak memory {o.mib:.0f} MiB")
    if "Traceback" in o.stderr:
        found.append(f"{o.command}: traceback:\n{o.stderr[-3000:]}")
    lines = o.stderr.splitlines()
    if o.status == 0:
        if not o.stdout.strip() or any(not ln.startswith("hvkit: warning: ") for ln in lines):
            found.append(f"{o.command}: answered, but not with output and warnings only:\n{o.stderr[-2000:]}")
    elif o.status == 1:
        if len(lines) != 1 or not lines[0].startswith("hvkit: error: "):
            found.append(f"{o.command}: failed without one 'hvkit: error:' line:\n{o.stderr[-2000:]}")
    elif o.status >= 0:
        found.append(f"{o.command}: exit status {o.status}")
    return found


# -- the clean copy and where things are in it ---------------------------------------------

@dataclass
class Landmarks:
    """Where the kernel keeps what a corruption should hit, in the clean copy."""

    image: tuple[int, int]  # guest-physical [start, end) of the kernel image
    memmap: list[tuple[int, int]]  # guest-physical (start, bytes) of the struct page array
    tables: dict[int, list[int]] = field(default_factory=dict)  # level -> user page tables (gpa)


@dataclass
class Corpus:
    clean: Path  # the clean copy of the guest's RAM
    kernel: Path
    scratch: Path  # /dev/shm folder for corrupted copies and the children's output
    marks: Landmarks
    size: int


def _user_tables(mem: RamFileMemory, top: int, levels: int) -> dict[int, list[int]]:
    """The page tables of one process (user half), per level: a plain walk of clean tables."""
    out: dict[int, list[int]] = {level: [] for level in range(1, levels + 1)}
    todo = [(top, levels)]
    while todo:
        table, level = todo.pop()
        out[level].append(table)
        if level == 1:
            continue
        entries = mem.read_array(table, 512, "<u8")[: 256 if level == levels else 512]
        for e in entries[(entries & PRESENT) != 0].tolist():
            if not (level in (2, 3) and e & LARGE) and mem.contains(e & ADDR_MASK, PAGE_SIZE):
                todo.append((e & ADDR_MASK, level - 1))
    return out


def _landmarks(ram: Path, knowledge) -> Landmarks:
    with RamFileMemory(ram) as mem:
        ks = KernelSpace.locate(mem, knowledge.symbols)
        layout = knowledge.layout
        memmap, va = [], ks.vmemmap_base
        end = va + frame_count(ks, layout) * layout.size("page")
        while va < end:
            pa, span = lookup(mem, ks.top_pgt, va, ks.levels)
            span = min(span, end - va)
            if pa is not None:
                memmap.append((pa, span))
            va += span
        marks = Landmarks((ks.phys_text, ks.symbol_pa("_end")), memmap, {})
        for task in list_tasks(ks, layout, count_pages=False).tasks:
            if task.mm:
                pgd = ks.va_to_pa(ks.read_u64(task.mm + layout.offset("mm_struct", "pgd")))
                for level, tables in _user_tables(mem, pgd, ks.levels).items():
                    marks.tables.setdefault(level, []).extend(tables)
    return marks


@pytest.fixture(scope="module")
def corpus(shared_vm, guest, paths) -> Corpus:
    """The clean copy, its landmarks, and a cache primed so the children only read it."""
    scratch = Path(tempfile.mkdtemp(prefix="hvt-hostile-", dir="/dev/shm"))
    clean = scratch / "clean.ram"
    with shared_vm.paused():
        shutil.copyfile(shared_vm.ram_path, clean)
    knowledge = load_kernel_knowledge(guest.kernel, None, paths)  # layout and symbols cached
    importlib.import_module("hvkit.cli")  # imported once here, not by every child

    c = Corpus(clean, guest.kernel, scratch, _landmarks(clean, knowledge), clean.stat().st_size)
    assert c.marks.tables.get(3) and c.marks.memmap, "no user page tables or struct page array found"
    for command in ("ps", "identify"):  # the clean copy answers without a warning
        o = run_forked([command, str(clean), "--kernel", str(guest.kernel)], scratch)
        assert o.status == 0 and o.stderr == "", o.stderr
    yield c
    shutil.rmtree(scratch, ignore_errors=True)


# -- corruptions ---------------------------------------------------------------------------
# Each maker gets the corpus, a seeded generator and the copy (a file of the clean bytes)
# and changes the copy; each kind lists its makers (one per corrupted copy).

Maker = Callable[[Corpus, np.random.Generator, Path], None]


def _flip_bits(path: Path, rng: np.random.Generator, spans: list[tuple[int, int]], flips: int) -> None:
    """Flips `flips` random bits inside the (start, bytes) spans of the file."""
    sizes = np.array([n for _, n in spans])
    which = rng.choice(len(spans), flips, p=sizes / sizes.sum())
    with open(path, "r+b") as f:
        for i in which.tolist():
            start, n = spans[i]
            at = start + int(rng.integers(n))
            f.seek(at)
            byte = f.read(1)[0] ^ (1 << int(rng.integers(8)))
            f.seek(at)
            f.write(bytes([byte]))


def _write(path: Path, at: int, data: bytes) -> None:
    with open(path, "r+b") as f:  # below 3 GiB, guest-physical = file offset
        f.seek(at)
        f.write(data)


def image_flips(flips: int) -> Maker:
    return lambda c, rng, p: _flip_bits(p, rng, [(c.marks.image[0], c.marks.image[1] - c.marks.image[0])], flips)


def memmap_flips(flips: int) -> Maker:
    return lambda c, rng, p: _flip_bits(p, rng, c.marks.memmap, flips)


def random_block(where: str) -> Maker:
    """2 MiB of random bytes over a random 2 MiB block of RAM ("anywhere"), or over a
    window that holds a user page table of level 3 or 2, with the top-level tables in
    it kept (so the walk reaches the random bytes: what made the old walk blow up)."""
    def make(c: Corpus, rng: np.random.Generator, p: Path) -> None:
        if where == "anywhere":
            _write(p, int(rng.integers(c.size // BLOCK)) * BLOCK, rng.bytes(BLOCK))
            return
        tables = c.marks.tables[int(where[-1])]
        table = tables[int(rng.integers(len(tables)))]
        at = min(max(0, table - int(rng.integers(BLOCK // PAGE_SIZE)) * PAGE_SIZE), c.size - BLOCK)
        block = bytearray(rng.bytes(BLOCK))
        with open(c.clean, "rb") as clean:
            for top in c.marks.tables[max(c.marks.tables)]:
                if at <= top < at + BLOCK:
                    clean.seek(top)
                    block[top - at : top - at + PAGE_SIZE] = clean.read(PAGE_SIZE)
        _write(p, at, bytes(block))
    return make


def page_table(level: int, fill: str) -> Maker:
    """One user page table of `level` zeroed, or filled with random bytes."""
    def make(c: Corpus, rng: np.random.Generator, p: Path) -> None:
        tables = c.marks.tables[level]
        at = tables[int(rng.integers(len(tables)))]
        _write(p, at, bytes(PAGE_SIZE) if fill == "zero" else rng.bytes(PAGE_SIZE))
    return make


def truncated(size: int) -> Maker:
    return lambda c, rng, p: os.truncate(p, size)


def random_file(size: int) -> Maker:
    def make(c: Corpus, rng: np.random.Generator, p: Path) -> None:
        with open(p, "wb") as f:
            for _ in range(0, size, 16 << 20):
                f.write(rng.bytes(min(16 << 20, size - f.tell())))
    return make


MiB = 1 << 20
KINDS: dict[str, list[Maker]] = {
    "kernel image bit flips": [image_flips(n) for n in (1, 8, 64, 512, 4096) for _ in range(3)],
    "struct page bit flips": [memmap_flips(n) for n in (16, 256, 4096, 65536) for _ in range(4)],
    "random 2 MiB block": [random_block("anywhere") for _ in range(24)],
    "random 2 MiB block on page tables": [random_block(w) for w in ("level3", "level2") for _ in range(4)],
    "page table zeroed": [page_table(level, "zero") for level in (4, 3, 2, 1) for _ in range(3)],
    "page table of random bytes": [page_table(level, "random") for level in (4, 3, 2, 1) for _ in range(3)],
    "truncated": [truncated(n) for n in (4096, 1000, MiB, 16 * MiB + 4096, 32 * MiB, 64 * MiB, 100 * MiB + 123,
                                         128 * MiB, 200 * MiB, 255 * MiB, 256 * MiB - 4096)],
    "empty file": [truncated(0)],
    "file of random bytes": [random_file(256 * MiB), random_file(16 * MiB)],
}


def _fresh_copy(c: Corpus, name: str) -> Path:
    copy = c.scratch / name
    shutil.copyfile(c.clean, copy)
    return copy


@pytest.mark.parametrize("kind", list(KINDS))
def test_hostile_memory_is_answered_in_bounds(corpus, kind):
    makers = KINDS[kind]
    rng = np.random.default_rng([SEED, list(KINDS).index(kind)])
    outcomes, failures = [], []
    for i, make in enumerate(makers):
        copy = _fresh_copy(corpus, f"{i}.ram")
        try:
            make(corpus, rng, copy)
            for command in ("ps", "identify"):
                o = run_forked([command, str(copy), "--kernel", str(corpus.kernel)], corpus.scratch)
                outcomes.append(o)
                failures += [f"copy {i} of {kind!r}: {p}" for p in problems(o)]
        finally:
            copy.unlink(missing_ok=True)
    answered = sum(o.status == 0 for o in outcomes)
    print(f"\n{kind}: {len(makers)} copies, {len(outcomes)} commands: {answered} answered, "
          f"{len(outcomes) - answered} errors; max {max(o.seconds for o in outcomes):.2f} s, "
          f"max {max(o.mib for o in outcomes):.0f} MiB")
    assert not failures, "\n".join(failures[:5])


# -- the bounds themselves, on made-up page tables ------------------------------------------

def test_page_table_walk_is_bounded_on_tables_of_random_and_looping_entries(tmp_path):
    """8 MiB of 'RAM' whose every page is a page table: each entry present, half of them
    large, all pointing back into RAM (a fan-out of 512 at every level). The walk reads
    each table at most once per level, stops at its table budget, and never lists a frame
    twice or one past the end of RAM."""
    pages = 2048
    rng = np.random.default_rng(SEED)
    entries = (rng.integers(0, pages, (pages, 512), dtype=np.uint64) << np.uint64(12)) | np.uint64(PRESENT)
    entries[:, ::2] |= np.uint64(LARGE)
    ram = tmp_path / "ram"
    ram.write_bytes(entries.tobytes())
    with RamFileMemory(ram) as mem:
        t0 = time.monotonic()
        plenty = WalkBudget.for_memory(mem)
        plenty.tables = 10 * pages
        whole = walk_pages(mem, 0, 4, user_only=False, budget=plenty)
        assert time.monotonic() - t0 < 5
        assert whole.stopped is None and whole.wild == 0
        assert whole.tables <= 1 + 3 * pages  # each table at most once per level below the top
        assert walk_pages(mem, 0, 4, user_only=False).stopped  # this memory's own budget: 1 table a page
        assert np.array_equal(whole.frames, np.arange(pages))  # every frame, once
        small = WalkBudget.for_memory(mem)
        small.tables = 300
        part = walk_pages(mem, 0, 4, user_only=False, budget=small)
        assert part.tables == 300 and "budget" in part.stopped and small.why_spent()
        late = walk_pages(mem, 0, 4, budget=WalkBudget.for_memory(mem, seconds=-1))
        assert late.tables == 0 and "time limit" in late.stopped


def test_large_pages_outside_ram_are_skipped_without_materialising_them(tmp_path):
    """A level-3 table of 1 GiB pages, all but one far outside RAM: nothing of those
    is listed and nothing of their size is allocated; the one inside lists RAM's frames."""
    pgd = np.zeros(512, np.uint64)
    pgd[0] = np.uint64(PAGE_SIZE | PRESENT)
    pud = (np.arange(512, dtype=np.uint64) << np.uint64(30)) | np.uint64(PRESENT | LARGE)
    pud += np.uint64(1 << 40)  # 1 TiB up
    pud[7] = np.uint64(PRESENT | LARGE)  # a 1 GiB page at 0: RAM is its first 1 MiB
    ram = tmp_path / "ram"
    ram.write_bytes(pgd.tobytes() + pud.tobytes() + bytes((1 << 20) - 2 * PAGE_SIZE))
    with RamFileMemory(ram) as mem:
        tracemalloc.start()
        try:
            found = walk_pages(mem, 0, 4)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16 << 20  # 511 pages of 1 GiB as frames would be 1 GiB
        assert np.array_equal(found.frames, np.arange(256)) and found.stopped is None


def test_a_spent_budget_is_a_warning_per_process_and_keeps_the_rest(corpus, paths, guest):
    """Page tables of all processes share one budget: when it runs out mid-walk, that
    process gets a warning and keeps what was found, the rest are named in one line, and
    every process is still listed."""
    knowledge = load_kernel_knowledge(guest.kernel, None, paths)
    with RamFileMemory(corpus.clean) as mem:
        ks = KernelSpace.locate(mem, knowledge.symbols)
        full = list_tasks(ks, knowledge.layout)
        budget = WalkBudget.for_memory(mem)
        budget.tables = 2  # the first process's top two levels, no more
        cut = list_tasks(ks, knowledge.layout, budget=budget)
    assert full.errors == []
    assert [t.pid for t in cut.tasks] == [t.pid for t in full.tasks]
    users = [t for t in full.tasks if t.mm]
    assert len(users) >= 2
    assert sum("page tables read in part (2 tables): the budget of" in e for e in cut.errors) == 1
    assert cut.errors[-1].startswith(f"page tables of {len(users) - 1} more processes not read")
    assert sum(t.pages for t in cut.tasks) < sum(t.pages for t in full.tasks)


def test_elf_core_segments_are_believed_only_as_far_as_the_file_goes(tmp_path):
    """A core whose PT_LOAD claims 1 PiB (or lies past the file) gets the memory the file
    holds: per-page arrays of a reader are sized by max_pfn, so it must not be 2^38."""
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", 4, 62, 1, 0, 64, 0, 0, 64, 56, 2, 64, 0, 0)
    load = lambda offset, paddr, size: struct.pack("<IIQQQQQQ", 1, 0, offset, 0, paddr, size, size, 0)  # noqa: E731
    headers = header + load(PAGE_SIZE, 0, 1 << 50) + load(1 << 40, 1 << 32, PAGE_SIZE)
    core = tmp_path / "core.elf"
    core.write_bytes(headers.ljust(PAGE_SIZE, b"\0") + bytes(2 * PAGE_SIZE))
    with ElfCoreMemory(core) as mem:
        assert mem.size == 2 * PAGE_SIZE and mem.max_pfn == 2


# -- saying what differs when the kernel file is another build ------------------------------

def test_another_build_of_the_same_release_is_named_so(corpus, guest, paths, tmp_path):
    """The memory runs another build of the kernel file's release (another package
    version, same ABI name): the error says so and quotes what differs."""
    knowledge = load_kernel_knowledge(guest.kernel, None, paths)
    ours = knowledge.symbols.banner.rstrip("\n").encode()
    assert b"Debian " in ours, ours
    version = ours[ours.rindex(b"Debian ") : ours.rindex(b" (")]  # e.g. "Debian 6.1.192-2"
    other = version.translate(bytes.maketrans(b"0123456789", b"1234567890"))
    copy = tmp_path / "ram"
    shutil.copyfile(corpus.clean, copy)
    with RamFileMemory(copy) as mem:
        places = mem.find(version, limit=64)
    assert places
    for gpa in places:  # every copy: the image's banners, the kernel log, uname's version
        _write(copy, gpa, other)
    with RamFileMemory(copy) as mem:
        with pytest.raises(KernelMismatch) as e:
            KernelSpace.locate(mem, knowledge.symbols)
    message = str(e.value)
    assert f"another build of {guest.release}" in message, message
    assert other.decode() in message and version.decode() in message, message
    assert f"the memory runs kernel {guest.release}" not in message  # what used to contradict itself
    o = run_forked(["ps", str(copy), "--kernel", str(guest.kernel)], corpus.scratch)
    assert o.status == 1 and problems(o) == [] and "another build" in o.stderr, o.stderr
