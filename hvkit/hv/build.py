"""Builds guest programs with the system's C compiler and the SDK shipped in sdk/.

The flags make a freestanding, static, integer-only x86-64 program linked at 1 MiB:
no libc, no red zone (nothing to clobber it, but a later interrupt would), no SSE (the
emulating KVM of some hosts cannot run it), no stack protector (no TLS to hold its
canary), and no loop-to-memset rewriting (the SDK's own memset would call itself).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from hvkit.errors import HvkitError

log = logging.getLogger(__name__)

CFLAGS = ("-std=gnu11", "-O2", "-g", "-ffreestanding", "-fno-pic", "-fno-pie", "-no-pie",
          "-nostdlib", "-static", "-mno-red-zone", "-mgeneral-regs-only",
          "-fno-stack-protector", "-fno-tree-loop-distribute-patterns",
          "-fno-asynchronous-unwind-tables", "-Wall", "-Wl,--build-id=none",
          "-Wl,-z,noexecstack", "-Wl,--no-warn-rwx-segments")


def sdk_dir() -> Path:
    """The folder holding hvkit.h, entry.S, runtime.c and guest.ld."""
    return Path(str(resources.files("hvkit.hv") / "sdk"))


def compiler() -> str:
    found = shutil.which("cc") or shutil.which("gcc")
    if not found:
        raise HvkitError("no C compiler found (cc or gcc)",
                         "apt-get install gcc, or run ./setup.sh")
    return found


def build_guest(sources: list[Path], output: Path, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile and link `sources` with the SDK into the guest ELF `output`."""
    if not sources:
        raise HvkitError("no source files to build")
    for src in sources:
        if not Path(src).is_file():
            raise HvkitError(f"{src}: no such file")
    sdk = sdk_dir()
    command = [compiler(), *CFLAGS, *extra_flags, f"-I{sdk}", f"-Wl,-T,{sdk / 'guest.ld'}",
               str(sdk / "entry.S"), str(sdk / "runtime.c"), *map(str, sources), "-o", str(output)]
    log.debug("%s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        log.info("%s", done.stderr)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if ": error:" in line or "undefined reference" in line] or lines
        first = errors[0] if errors else f"exit status {done.returncode}"
        raise HvkitError(f"building {output.name} failed: {first}",
                         f"{len(errors)} error(s) in all; hvkit -v hv build shows the compiler's output")
    return output
