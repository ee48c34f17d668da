"""Compiling a C file of hvkit's against a kernel's headers with that kernel's own build
system, for the debug information of the object it makes (never loaded into a kernel).
Shared by the layout interface (layout.py) and the ISF interface (isf.py). The build runs
here or, for a kernel newer than this host can build for, inside its build root
(KernelTree.make, buildroot.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from hvkit.errors import HvkitError
from hvkit.kernel import buildroot
from hvkit.kernel.headers import KernelTree

DEBUG_FLAGS = ("-fno-eliminate-unused-debug-types", "-fno-eliminate-unused-debug-symbols")


def compile_interface(tree: KernelTree, workdir: Path, source: bytes, name: str,
                      flags: tuple[str, ...] = DEBUG_FLAGS) -> Path:
    """`name`.c compiled against `tree` with debug information for every type (and, with
    -fno-eliminate-unused-debug-symbols, every extern variable) its headers declare: the
    kernel's own build system (Kbuild, M=workdir), here or in the tree's build root
    (KernelTree.make), as layout.py compiles its interface."""
    with buildroot.scratch_dir(tree.sysroot) as (scratch, seen_as):
        stem = name.removesuffix(".c")
        (scratch / f"{stem}.c").write_bytes(source)
        (scratch / "Kbuild").write_text(f"obj-m := {stem}.o\n"
                                        f"ccflags-y := -g {' '.join(flags)}\n")
        proc = tree.make(seen_as, f"{stem}.o")
        obj = scratch / f"{stem}.o"
        if proc.returncode != 0 or not obj.exists():
            errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
            raise HvkitError(f"compiling {name} against {tree.root} failed: "
                             f"{(errors or proc.stderr.strip().splitlines() or ['no output'])[0]}",
                             "are these the headers of the guest's kernel, with their .config?")
        out = workdir / f"{stem}.o"
        shutil.copyfile(obj, out)
        return out
