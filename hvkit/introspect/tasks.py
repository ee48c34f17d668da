"""The guest's processes, from the kernel's task list (init_task.tasks), as `ps` shows
them: thread-group leaders with pid, name, parent, and the pages their page tables map.

Names are what the guest's own `ps` shows (/proc/PID/stat, the kernel's proc_task_name):
task->comm, except for a kernel thread whose name comm truncated (its full name, kept in
its private struct kthread) and a workqueue worker (its name, then "+" or "-" and what
it works on or last did, from its private struct worker); the private layouts come from the kernel's
BTF (hvkit.kernel.private). Without them, comm.

The walk trusts nothing: it stops after as many tasks as the memory could hold, at a
task seen before (a loop), at a pointer that leads nowhere, and at the deadline of its
budget; the page tables of all processes share one budget of tables read (pagetables.
WalkBudget). What went wrong is reported per task, and what was read so far is kept.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

import numpy as np

from hvkit.errors import HvkitError
from hvkit.introspect.kernelspace import KernelSpace
from hvkit.introspect.pagetables import MappedPages, WalkBudget, walk_pages
from hvkit.kernel.layout import Layout

MAX_TASKS = 1 << 16  # a cap whatever the memory; small guests are bounded lower (max_tasks)
KERNEL_STACK = 16 << 10  # every task also has a kernel stack (THREAD_SIZE on x86-64)
SHARED_OWNER = -1  # owner of a page that several processes map


@dataclass(frozen=True)
class GuestTask:
    pid: int
    tgid: int
    name: str
    ppid: int
    mm: int  # kernel address of its mm_struct; 0 for kernel threads
    pages: int  # present user pages its page tables map (0 for kernel threads)


@dataclass
class TaskWalk:
    tasks: list[GuestTask] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one line per object that could not be read
    # per page frame: pid of the one process whose page tables map it, SHARED_OWNER when
    # several do, 0 when none; None when page tables were not walked. One array, whatever
    # the number of processes (a list of frames per process could grow with it).
    owner: np.ndarray | None = None

    def add_owner(self, pid: int, frames: np.ndarray) -> None:
        """Marks `frames` as mapped by `pid` (or by several, when another did too)."""
        owner = self.owner
        frames = frames[frames < owner.size]
        cur = owner[frames]
        owner[frames] = np.where((cur == 0) | (cur == pid), pid, SHARED_OWNER)


PROC_NAME_MAX = 64  # proc_task_name()'s buffer: what /proc shows at most, with its NUL


def _string(ks: KernelSpace, va: int, limit: int) -> str:
    """The NUL-ended text at kernel address `va`, at most `limit` bytes, read within
    its page (a name never crosses into memory that may not be mapped)."""
    n = min(limit, 4096 - (va & 0xFFF))
    return ks.read(va, n).split(b"\0", 1)[0].decode("utf-8", "replace")


def _shown_name(ks: KernelSpace, layout: Layout, raw: bytes, comm: str) -> str:
    """The name /proc/PID/stat shows for the task whose task_struct is `raw`; comm
    when the kernel's private layouts are unknown or its pointers lead nowhere."""
    private = ks.symbols.private
    c = layout.constants
    if "kthread" not in private or "worker_private" not in layout.structs["task_struct"].fields:
        return comm
    flags = struct.unpack_from("<I", raw, layout.offset("task_struct", "flags"))[0]
    kthread = struct.unpack_from("<Q", raw, layout.offset("task_struct", "worker_private"))[0]
    full = ""
    try:
        if flags & c.get("PF_KTHREAD", 0) and kthread:  # get_kthread_comm(): the full name
            name_va = ks.read_u64(kthread + private["kthread"]["full_name"])
            full = _string(ks, name_va, PROC_NAME_MAX - 1) if name_va else ""
        if flags & c.get("PF_WQ_WORKER", 0) and "worker" in private and kthread:
            # wq_worker_comm(): the worker's name (its comm; its full name where the
            # workqueue code names workers itself, format_worker_id(): 6.12 and later),
            # then '+' and what it works on, or '-' and what it last did
            name = full if full and "format_worker_id" in ks.symbols else comm
            w = private["worker"]
            worker = ks.read_u64(kthread + private["kthread"]["data"])
            if worker and ks.read_u64(worker + w["pool"]):
                desc = _string(ks, worker + w["desc"], w["desc.len"])
                if desc:
                    name += ("+" if ks.read_u64(worker + w["current_work"]) else "-") + desc
            return name[: PROC_NAME_MAX - 1]
    except HvkitError:
        pass  # a lying pointer: comm is still the task's name
    return full or comm


def _task_fields(ks: KernelSpace, layout: Layout, va: int) -> dict:
    off = lambda m: layout.offset("task_struct", m)  # noqa: E731
    raw = ks.read(va, layout.size("task_struct"))
    u64 = lambda m: struct.unpack_from("<Q", raw, off(m))[0]  # noqa: E731
    i32 = lambda m: struct.unpack_from("<i", raw, off(m))[0]  # noqa: E731
    comm_len = layout.const("TASK_COMM_LEN")
    comm = raw[off("comm") : off("comm") + comm_len].split(b"\0", 1)[0].decode("utf-8", "replace")
    return {"pid": i32("pid"), "tgid": i32("tgid"), "name": _shown_name(ks, layout, raw, comm),
            "mm": u64("mm"), "parent": u64("real_parent"), "next": u64("tasks")}


def _tgid(ks: KernelSpace, layout: Layout, task_va: int) -> int:
    """Only the tgid of a task (a parent): 4 bytes, not the whole task_struct."""
    return struct.unpack("<i", ks.read(task_va + layout.offset("task_struct", "tgid"), 4))[0]


def _user_pages(ks: KernelSpace, layout: Layout, mm: int, budget: WalkBudget) -> MappedPages:
    pgd_va = ks.read_u64(mm + layout.offset("mm_struct", "pgd"))
    return walk_pages(ks.mem, ks.va_to_pa(pgd_va), ks.levels, budget=budget, max_pfn=ks.max_pfn)


def max_tasks(ks: KernelSpace, layout: Layout) -> int:
    """The most tasks this memory can hold: each has a task_struct and a kernel stack."""
    return max(1, min(MAX_TASKS, ks.mem.size // (layout.size("task_struct") + KERNEL_STACK)))


def _count_pages(ks: KernelSpace, layout: Layout, walk: TaskWalk, t: dict, budget: WalkBudget) -> int:
    """Pages the process `t` maps, its frames added to walk.owner; a walk that was cut
    short or met wild pointers is reported for this process (what it found is kept)."""
    who = f"task {t['pid']} ({t['name']})"
    try:
        found = _user_pages(ks, layout, t["mm"], budget)
    except HvkitError as e:
        walk.errors.append(f"{who}: page tables unreadable: {e}")
        return 0
    walk.add_owner(t["pid"], found.frames)
    if found.wild:
        walk.errors.append(f"{who}: {found.wild} page-table entries point to tables outside RAM; not followed")
    if found.stopped:
        walk.errors.append(f"{who}: page tables read in part ({found.tables} tables): {found.stopped}")
    return int(found.frames.size)


def list_tasks(ks: KernelSpace, layout: Layout, count_pages: bool = True,
               budget: WalkBudget | None = None) -> TaskWalk:
    """The processes of the guest; with `count_pages`, also what their page tables map,
    all within `budget` (default: the budget of this memory, pagetables.WalkBudget)."""
    budget = budget or WalkBudget.for_memory(ks.mem)
    walk = TaskWalk(owner=np.zeros(ks.max_pfn, np.int32) if count_pages else None)
    limit, not_walked = max_tasks(ks, layout), 0
    tasks_off = layout.offset("task_struct", "tasks")
    head = ks.symbol_va("init_task") + tasks_off
    seen = {head}
    cur = _task_fields(ks, layout, ks.symbol_va("init_task"))["next"]
    while cur != head:
        if len(walk.tasks) >= limit:
            walk.errors.append(f"task list: more than {limit} tasks (all this memory can hold), stopped there")
            break
        if time.monotonic() > budget.deadline:
            walk.errors.append(f"task list: stopped after {len(walk.tasks)} tasks at the time limit "
                               f"of {budget.seconds:.1f} s")
            break
        if cur in seen:
            walk.errors.append(f"task list: loops back to {cur:#x} without reaching init_task")
            break
        seen.add(cur)
        va = cur - tasks_off
        try:
            t = _task_fields(ks, layout, va)
            ppid = _tgid(ks, layout, t["parent"]) if t["parent"] else 0
        except HvkitError as e:
            walk.errors.append(f"task at {va:#x}: {e}")
            break
        pages = 0
        if t["mm"] and count_pages:
            if budget.why_spent():
                not_walked += 1
            else:
                pages = _count_pages(ks, layout, walk, t, budget)
        walk.tasks.append(GuestTask(t["pid"], t["tgid"], t["name"], ppid, t["mm"], pages))
        cur = t["next"]
    if not_walked:
        walk.errors.append(f"page tables of {not_walked} more processes not read: {budget.why_spent()}")
    walk.tasks.sort(key=lambda t: t.pid)
    return walk
