"""hvkit's Python API: what the CLI does, as functions that return data.

    import hvkit

    with hvkit.start(memory="256M", workload="alloc:64") as vm:   # stopped when the block ends
        print(hvkit.identify(vm).counts())        # pages per class, read from outside the guest
        print([t.name for t in hvkit.ps(vm).tasks])
        print(hvkit.share(vm).released_bytes)     # free pages given back to the host
        report = hvkit.fork(vm, 2)                # children vm-1, vm-2 from vm's exact state
        for child in report.children:
            hvkit.vm(child.name).stop()

Every function takes a VM (a `hvkit.VM`, or the name of one that another process
started) or, for identify and ps, also a RAM file or an ELF core. Errors are
`hvkit.HvkitError` with a message and a hint, as the CLI prints them. The CLI's commands
are built on these functions, so both behave the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from hvkit.config import Paths
from hvkit.forking import ForkReport
from hvkit.forking import fork as _fork
from hvkit.forking.pool import PoolStatus, set_pool
from hvkit.forking.reset import ResetReport
from hvkit.forking.reset import reset as _reset
from hvkit.guest import GroundTruth
from hvkit.guest.control import ground_truth as _ground_truth
from hvkit.introspect import PageMap, TaskWalk, classify, list_tasks
from hvkit.introspect.source import open_guest
from hvkit.qemu import VM, VMStatus, find_vm, list_vms, start_vm
from hvkit.sharing import ShareResult, share_once
from hvkit.sharing.sharer import MAX_PAUSE

@dataclass
class Identification:
    """What `identify` found: every page frame's class (`pages`), the guest's processes
    (`tasks`), the kernel release, and how long it took and paused the VM."""

    pages: PageMap
    tasks: TaskWalk
    kernel: str
    seconds: float  # classifying, once memory was open
    paused_seconds: float  # how long a running VM was paused (0 for a file)

    def counts(self) -> dict[str, int]:
        """Pages per class, by the class's label ("free", "anonymous", ...)."""
        return {c.label: n for c, n in self.pages.counts().items()}


def start(name: str | None = None, **options) -> VM:
    """Starts a VM in the background (see `hvkit.qemu.start_vm` for the options:
    memory, cpus, kernel, kernel_package, workload, image, ...). Used as a context
    manager, it is stopped when the block ends; otherwise it runs on after Python exits."""
    return start_vm(name, **options)


def vm(name: str, paths: Paths | None = None) -> VM:
    """The VM called `name` (started by this process, the CLI or another program)."""
    return find_vm(name, paths)


def vms(paths: Paths | None = None) -> list[VMStatus]:
    """Every VM hvkit knows, as `hvkit vm list` shows them."""
    return list_vms(paths)


def fork(source: VM | str, n: int = 1, *, paused: bool = False, keep_free: bool = False,
         paths: Paths | None = None) -> ForkReport:
    """Forks a running VM into `n` children named NAME-1, NAME-2, ... (see hvkit.forking).
    The VM runs on unless `paused`; at its first fork its free pages are given back
    unless `keep_free`. The report lists the children (`report.children[i].name`)."""
    return _fork(_source_of(source), n, paths=_paths_of(source, paths), stay_paused=paused, give_back_free=not keep_free)


def reset(child: VM | str, *, paused: bool = False, paths: Paths | None = None) -> ResetReport:
    """Takes fork child `child` back to the exact state of the snapshot it started from
    (its writes dropped, its CPUs and devices loaded again) in a fresh QEMU (a pooled one
    when `pool` keeps some of its kind); it runs on unless `paused` (see
    hvkit.forking.reset)."""
    return _reset(_source_of(child), paths=_paths_of(child, paths), stay_paused=paused)


def pool(like: VM | str, n: int, *, paths: Paths | None = None) -> PoolStatus:
    """Keeps `n` child QEMUs ready for VMs of `like`'s kind (0: none), so that their
    forks' children only load their device state (see hvkit.forking.pool); what is
    ready and what it costs."""
    return set_pool(_paths_of(like, paths) or Paths.from_env(), _source_of(like), n)


def share(source: VM | str, *, dry_run: bool = False, max_pause: float = MAX_PAUSE,
          paths: Paths | None = None) -> ShareResult:
    """Gives the guest's free pages back to the host, pausing the VM for at most about
    `max_pause` seconds at a time (see hvkit.sharing)."""
    target = source if isinstance(source, VM) else find_vm(source, paths)
    return share_once(target, paths, dry_run=dry_run, max_pause=max_pause)


def identify(source: VM | str | Path, *, kernel: str | Path | None = None, headers: str | Path | None = None,
             paths: Paths | None = None) -> Identification:
    """Classifies every page of the guest in `source` (a VM, paused meanwhile; a RAM
    file or an ELF core, with `kernel` unless the core names it)."""
    with open_guest(_source_of(source), kernel, headers, _paths_of(source, paths)) as guest:
        t0 = time.monotonic()
        walk = list_tasks(guest.kernel, guest.layout)
        pm = classify(guest.kernel, guest.layout, walk)
        seconds = time.monotonic() - t0
    return Identification(pm, walk, guest.layout.release, seconds, guest.paused_for)


def ps(source: VM | str | Path, *, kernel: str | Path | None = None, headers: str | Path | None = None,
       paths: Paths | None = None) -> TaskWalk:
    """The guest's processes (`.tasks`) read from outside it, and what could not be read
    (`.errors`)."""
    with open_guest(_source_of(source), kernel, headers, _paths_of(source, paths), op="ps") as guest:
        return list_tasks(guest.kernel, guest.layout)


def ground_truth(source: VM | str, paths: Paths | None = None) -> GroundTruth:
    """The guest's own view of its memory and processes (hvkit's guests only)."""
    return _ground_truth(source if isinstance(source, VM) else find_vm(source, paths))


def _paths_of(source: VM | str | Path, paths: Paths | None) -> Paths | None:
    """The folders of `source`'s VM, unless the caller named others."""
    return paths or (source.paths() if isinstance(source, VM) else None)


def _source_of(source: VM | str | Path) -> str:
    if isinstance(source, VM):
        return source.name
    return str(source)
