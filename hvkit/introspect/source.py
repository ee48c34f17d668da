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
from hvkit.introspect.kernelspace import GuestInconsistent, KernelSpace
from hvkit.introspect.numa import kernel_nodes
from hvkit.kernel.headers import debian_tree, prepared_tree
from hvkit.kernel.image import read_kernel_image
from hvkit.kernel.layout import Layout, build_layout
from hvkit.kernel.symbols import KernelSymbols, load_symbols
from hvkit.memory import ElfCoreMemory, GuestMemory, RamFileMemory
from hvkit.qemu import VM, find_vm


@dataclass
class Guest:
    """A guest's memory with what it takes to read it as its kernel does."""

    memory: GuestMemory
    kernel: KernelSpace
    layout: Layout
    paused_for: float = 0.0  # seconds a running VM was paused (filled in on exit)
    paused_at: float | None = None  # time.monotonic() when hvkit paused it; None: not paused by hvkit
    vm: VM | None = None  # the VM it is, as it was when paused (None: a file)


def _node_files(source: str) -> list[Path] | None:
    """The files of `source` when it names a NUMA guest's RAM as node files joined by
    commas ("n0.ram,n1.ram"), each of which exists; else None (one file)."""
    if Path(source).exists() or "," not in source:
        return None
    files = [Path(part) for part in source.split(",")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise HvkitError(f"{', '.join(missing)} does not exist", "give a NUMA guest's node RAM files, "
                         "in node order, joined by commas")
    return files


def _open_file(path: Path) -> GuestMemory:
    """A RAM file or an ELF core, told apart by its first bytes."""
    if path.is_dir():
        raise HvkitError(f"{path} is a directory", "give a VM name, a RAM file or an ELF core")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise HvkitError(f"cannot read {path} ({e.strerror})", "give a VM name, a RAM file or an ELF core") from None
    return ElfCoreMemory(path) if magic == b"\x7fELF" else RamFileMemory(path)


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


@dataclass
class _Located:
    memory: GuestMemory
    kernel: KernelSpace

    def close(self) -> None:
        self.memory.close()


def _locate_in(vm: VM, knowledge: KernelKnowledge) -> _Located:
    """The guest memory of `vm` where its kernel is found: its RAM file, or of the
    mappings of its QEMU process that could be its RAM, the one that holds it (a NUMA
    VM's: the placement of its nodes' backends where the kernel finds its nodes)."""
    candidates = vm.memory_candidates()
    nodes = len(vm.spec.ram_nodes)
    failure: HvkitError | None = None
    try:
        for i, memory in enumerate(candidates):
            try:
                located = _Located(memory, KernelSpace.locate(memory, knowledge.symbols, knowledge.layout.fixed_bases()))
                if nodes > 1:
                    kernel_nodes(located.kernel, knowledge.layout, nodes)
            except HvkitError as e:
                failure = failure or e
                continue
            candidates.pop(i)
            return located
    finally:
        for memory in candidates:
            memory.close()
    assert failure is not None
    raise failure


def kernel_named_by_core(path: Path, paths: Paths) -> Path | None:
    """For an ELF core whose VMCOREINFO names its kernel release (cores of 'hvkit vm
    dump'), Debian's kernel of that release (from the cache, or fetched); else None."""
    from hvkit.memory.elfcore import vmcoreinfo
    from hvkit.qemu.probe import fetch_debian_kernel

    try:
        release = vmcoreinfo(path).get("OSRELEASE")
    except (HvkitError, OSError):
        return None
    return fetch_debian_kernel(release, paths) if release else None


@contextlib.contextmanager
def open_guest(source: str, kernel: str | Path | None = None, headers: str | Path | None = None,
               paths: Paths | None = None, knowledge: KernelKnowledge | None = None,
               op: str = "identify") -> Iterator[Guest]:
    """The guest in `source` (a VM name, a RAM file, a NUMA guest's node RAM files
    joined by commas, or an ELF core), ready to read.
    A VM is held and paused inside the block (VM.paused: no other hvkit command resumes
    or changes it meanwhile, and it runs again after, unless the user had paused it);
    its memory is opened only then, so it is the memory of the VM as it is now.
    `knowledge` (of this guest's kernel) saves loading symbols and layout again."""
    paths = paths or Paths.from_env()
    path = Path(source)
    nodes = _node_files(source)
    if nodes is not None or path.exists() or "/" in source:
        if nodes is None and not path.exists():
            raise HvkitError(f"{source} does not exist", "give a VM name, a RAM file or an ELF core")
        kernel = kernel or (kernel_named_by_core(path, paths) if nodes is None else None)
        if kernel is None:
            raise HvkitError(f"reading {source} needs the guest's kernel", "pass --kernel FILE (its bzImage or vmlinux)")
        knowledge = knowledge or load_kernel_knowledge(Path(kernel), headers, paths)
        with contextlib.closing(RamFileMemory(nodes) if nodes else _open_file(path)) as memory:
            located = KernelSpace.locate(memory, knowledge.symbols, knowledge.layout.fixed_bases())
            if nodes:
                try:
                    kernel_nodes(located, knowledge.layout, len(nodes))
                except GuestInconsistent as e:
                    raise HvkitError(f"{source} does not read as one guest's nodes ({e.message})",
                                     "give the node files in node order") from None
            yield Guest(memory, located, knowledge.layout)
        return
    vm = find_vm(source, paths)
    knowledge = knowledge or load_kernel_knowledge(Path(kernel) if kernel else Path(vm.spec.kernel), headers, paths)
    with vm.paused(op) as pause, contextlib.closing(_locate_in(vm, knowledge)) as found:
        memory, kernel_space = found.memory, found.kernel
        guest = Guest(memory, kernel_space, knowledge.layout, paused_at=pause.at if pause.ours else None, vm=vm)
        try:
            yield guest
        finally:
            guest.paused_for = time.monotonic() - pause.at if pause.ours else 0.0
