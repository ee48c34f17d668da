"""What `hvkit identify`/`hvkit ps` read: a running hvkit VM (by name), a raw RAM file,
or a QEMU dump-guest-memory ELF core; and everything needed to read it (the kernel's
symbols and compiled layout). A running VM is paused while it is read, then resumed."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.introspect.kernelspace import KernelSpace
from hvkit.kernel.headers import debian_tree, prepared_tree
from hvkit.kernel.image import read_kernel_image
from hvkit.kernel.layout import Layout, build_layout
from hvkit.kernel.symbols import KernelSymbols, load_symbols
from hvkit.memory import ElfCoreMemory, GuestMemory, RamFileMemory
from hvkit.qemu import VM


@dataclass
class Guest:
    """A guest's memory with what it takes to read it as its kernel does."""

    memory: GuestMemory
    kernel: KernelSpace
    layout: Layout
    paused_for: float = 0.0  # seconds a running VM was paused (filled in on exit)
    paused_at: float | None = None  # time.monotonic() when hvkit paused it; None: not paused by hvkit


def _open_memory(source: str, paths: Paths) -> tuple[GuestMemory, Path | None, VM | None]:
    path = Path(source)
    if path.exists():
        with path.open("rb") as f:
            magic = f.read(4)
        memory = ElfCoreMemory(path) if magic == b"\x7fELF" else RamFileMemory(path)
        return memory, None, None
    if "/" in source:
        raise HvkitError(f"{source} does not exist", "give a VM name, a RAM file or an ELF core")
    vm = VM.attach(source, paths)
    return vm.memory(), Path(vm.spec.kernel), vm


@dataclass(frozen=True)
class KernelKnowledge:
    """What hvkit knows of a guest kernel before reading any memory: its symbols and
    compiled layout. Loading it costs tens of milliseconds even from the cache, so a
    caller that reads the same guest again and again (share --watch) keeps it."""

    symbols: KernelSymbols
    layout: Layout


def load_kernel_knowledge(kernel_file: Path, headers: str | Path | None, paths: Paths) -> KernelKnowledge:
    release = read_kernel_image(kernel_file).release
    tree = prepared_tree(headers, release) if headers else debian_tree(release, paths.cache)
    return KernelKnowledge(load_symbols(kernel_file, paths.cache, tree.config), build_layout(tree, paths.cache))


@contextlib.contextmanager
def open_guest(source: str, kernel: str | Path | None = None, headers: str | Path | None = None,
               paths: Paths | None = None, knowledge: KernelKnowledge | None = None) -> Iterator[Guest]:
    """The guest in `source`, ready to read; a running VM stays paused inside the block.
    `knowledge` (of this guest's kernel) saves loading symbols and layout again."""
    paths = paths or Paths.from_env()
    memory, vm_kernel, vm = _open_memory(source, paths)
    try:
        kernel_file = Path(kernel) if kernel else vm_kernel
        if kernel_file is None:
            raise HvkitError(f"reading {source} needs the guest's kernel", "pass --kernel FILE (its bzImage or vmlinux)")
        knowledge = knowledge or load_kernel_knowledge(kernel_file, headers, paths)
        symbols, layout = knowledge.symbols, knowledge.layout
        paused = vm is not None and vm.run_state() == "running"
        t0 = time.monotonic()
        if paused:
            vm.pause()
        guest = None
        try:  # from here on, whatever fails (a lying guest too), the VM runs again
            guest = Guest(memory, KernelSpace.locate(memory, symbols), layout,
                          paused_at=t0 if paused else None)
            yield guest
        finally:
            if paused:
                vm.resume()
            if guest is not None:
                guest.paused_for = time.monotonic() - t0 if paused else 0.0
    finally:
        memory.close()
