"""The guest's processes, from the kernel's task list (init_task.tasks), as `ps` shows
them: thread-group leaders with pid, name, parent, and the pages their page tables map.

The walk trusts nothing: it stops after MAX_TASKS, at a task seen before (a loop), and
at a pointer that leads nowhere; what went wrong is reported per task, and the tasks
read so far are kept.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from hvkit.errors import HvkitError
from hvkit.introspect.kernelspace import KernelSpace
from hvkit.introspect.pagetables import mapped_pages
from hvkit.kernel.layout import Layout

MAX_TASKS = 1 << 16


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
    frames: dict[int, np.ndarray] = field(default_factory=dict)  # pid -> pfns its page tables map


def _task_fields(ks: KernelSpace, layout: Layout, va: int) -> dict:
    off = lambda m: layout.offset("task_struct", m)  # noqa: E731
    raw = ks.read(va, layout.size("task_struct"))
    u64 = lambda m: struct.unpack_from("<Q", raw, off(m))[0]  # noqa: E731
    i32 = lambda m: struct.unpack_from("<i", raw, off(m))[0]  # noqa: E731
    comm_len = layout.const("TASK_COMM_LEN")
    name = raw[off("comm") : off("comm") + comm_len].split(b"\0", 1)[0]
    return {"pid": i32("pid"), "tgid": i32("tgid"), "name": name.decode("utf-8", "replace"),
            "mm": u64("mm"), "parent": u64("real_parent"), "next": u64("tasks")}


def _tgid(ks: KernelSpace, layout: Layout, task_va: int) -> int:
    """Only the tgid of a task (a parent): 4 bytes, not the whole task_struct."""
    return struct.unpack("<i", ks.read(task_va + layout.offset("task_struct", "tgid"), 4))[0]


def _user_frames(ks: KernelSpace, layout: Layout, mm: int) -> np.ndarray:
    pgd_va = ks.read_u64(mm + layout.offset("mm_struct", "pgd"))
    return mapped_pages(ks.mem, ks.va_to_pa(pgd_va), ks.levels)


def list_tasks(ks: KernelSpace, layout: Layout, count_pages: bool = True) -> TaskWalk:
    walk = TaskWalk()
    tasks_off = layout.offset("task_struct", "tasks")
    head = ks.symbol_va("init_task") + tasks_off
    seen = {head}
    cur = _task_fields(ks, layout, ks.symbol_va("init_task"))["next"]
    while cur != head:
        if len(walk.tasks) >= MAX_TASKS:
            walk.errors.append(f"task list: more than {MAX_TASKS} tasks, stopped there")
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
            try:
                walk.frames[t["pid"]] = frames = _user_frames(ks, layout, t["mm"])
                pages = int(frames.size)
            except HvkitError as e:
                walk.errors.append(f"task {t['pid']} ({t['name']}): page tables unreadable: {e}")
        walk.tasks.append(GuestTask(t["pid"], t["tgid"], t["name"], ppid, t["mm"], pages))
        cur = t["next"]
    walk.tasks.sort(key=lambda t: t.pid)
    return walk
