"""What the default guest runs besides its heartbeat, chosen on the kernel command line.

A workload is written `NAME` or `NAME:MIB`, e.g. `idle`, `alloc:100`, `memcheck:64`:

- idle       nothing but the heartbeat
- alloc      allocate and touch MIB of anonymous memory, free it, then idle
- hold       allocate and touch MIB, and keep it
- fragment   allocate MIB, free every other page, keep the rest
- memcheck   keep checksummed data in up to MIB while allocating and freeing all the
             time; any word that changes is reported as HVKIT-MEMCHECK-CORRUPT
"""

from __future__ import annotations

from dataclasses import dataclass

from hvkit.errors import HvkitError

NAMES = ("idle", "alloc", "hold", "fragment", "memcheck")


@dataclass(frozen=True)
class Workload:
    name: str = "idle"
    mib: int = 64

    @classmethod
    def parse(cls, text: str) -> "Workload":
        name, _, size = text.partition(":")
        if name not in NAMES:
            raise HvkitError(f"unknown workload {name!r}", f"choose one of {', '.join(NAMES)}")
        if not size:
            return cls(name)
        if not size.isdigit() or int(size) <= 0:
            raise HvkitError(f"invalid workload size {size!r}", "give whole MiB, e.g. alloc:100")
        return cls(name, int(size))

    def kernel_args(self) -> str:
        return f"hvkit.workload={self.name} hvkit.mib={self.mib}"

    def __str__(self) -> str:
        return self.name if self.name == "idle" else f"{self.name}:{self.mib}"
