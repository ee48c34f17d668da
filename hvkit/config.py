"""Where hvkit keeps things: a cache for built artifacts and a runtime folder for VMs.

Both are plain directories chosen once per process from the environment, so tests and
users can point them elsewhere without any global state:

- cache (guest kernels, initramfs images, probes): $HVKIT_CACHE, else ~/.cache/hvkit
- runtime (one folder per running VM: RAM file, sockets, logs): $HVKIT_RUNTIME,
  else /dev/shm/hvkit (tmpfs, so a VM's RAM file is memory, not disk)

Folders that hold guest memory (the runtime folder, each VM's, the memory server's
store) are made readable by their owner alone (0700), and the files in them 0600:
a guest's memory is nobody else's to read.
"""

from __future__ import annotations

import contextlib
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
        # absolute where they are read: the paths go to apt, QEMU and a memory server
        # that run in other folders (a relative HVKIT_CACHE made every header fetch fail)
        return cls(Path(cache).expanduser().absolute(), Path(runtime).expanduser().absolute())

    def vm_dir(self, name: str) -> Path:
        return self.runtime / name


def make_private_dir(path: Path) -> Path:
    """`path` created (with its parents) readable by its owner alone (0700): guest
    memory lives under it. A folder that exists already is left as it is."""
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    return path
