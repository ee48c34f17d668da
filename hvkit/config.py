"""Where hvkit keeps things: a cache for built artifacts and a runtime folder for VMs.

Both are plain directories chosen once per process from the environment, so tests and
users can point them elsewhere without any global state:

- cache (guest kernels, initramfs images, probes): $HVKIT_CACHE, else ~/.cache/hvkit
- runtime (one folder per running VM: RAM file, sockets, logs): $HVKIT_RUNTIME,
  else /dev/shm/hvkit (tmpfs, so a VM's RAM file is memory, not disk)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    cache: Path
    runtime: Path

    @classmethod
    def from_env(cls) -> "Paths":
        cache = os.environ.get("HVKIT_CACHE") or Path.home() / ".cache" / "hvkit"
        runtime = os.environ.get("HVKIT_RUNTIME") or "/dev/shm/hvkit"
        return cls(Path(cache), Path(runtime))

    def vm_dir(self, name: str) -> Path:
        return self.runtime / name
