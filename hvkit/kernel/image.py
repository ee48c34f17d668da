"""Reads the version of a Linux kernel from its file, without running it.

A bzImage/vmlinuz carries a pointer to its version string in the x86 boot protocol's
setup header ("HdrS" at 0x202, kernel_version at 0x20E); an uncompressed vmlinux (ELF)
carries the "Linux version ..." banner in its data. Both give the release string
(`uname -r`), which is what header packages and module trees are named after.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from hvkit.errors import HvkitError

_BANNER = re.compile(rb"Linux version (\S+) \(([^\n\x00]{0,300})")


@dataclass(frozen=True)
class KernelImage:
    path: Path
    format: str  # "bzImage" or "vmlinux"
    release: str  # e.g. "6.1.0-56-cloud-amd64", as `uname -r` prints it
    version_string: str  # the full version text the kernel carries
    boot_protocol: str | None = None  # e.g. "2.15", bzImage only

    @property
    def bootable(self) -> bool:
        """Whether QEMU's -kernel can boot it directly."""
        return self.format == "bzImage"


def _not_a_kernel(path: Path, why: str) -> HvkitError:
    return HvkitError(
        f"{path} is not a Linux kernel ({why})",
        "pass a bzImage/vmlinuz (for example /boot/vmlinuz-*) or a vmlinux",
    )


def _read_bzimage(path: Path, data: bytes) -> KernelImage:
    proto, = struct.unpack_from("<H", data, 0x206)
    ptr, = struct.unpack_from("<H", data, 0x20E)
    start = ptr + 0x200
    if ptr == 0 or start >= len(data):
        raise _not_a_kernel(path, "its setup header has no version string")
    text = data[start : start + 512].split(b"\0", 1)[0].decode("ascii", "replace")
    if not text.strip():
        raise _not_a_kernel(path, "its setup header has an empty version string")
    return KernelImage(path, "bzImage", text.split()[0], text, f"{proto >> 8}.{proto & 0xFF}")


def _read_vmlinux(path: Path) -> KernelImage:
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        match = _BANNER.search(m)
        if not match:
            raise _not_a_kernel(path, "an ELF file without a 'Linux version' banner")
        text = match.group(0)[len(b"Linux version ") :].decode("ascii", "replace")
        return KernelImage(path, "vmlinux", match.group(1).decode("ascii", "replace"), text)


def read_kernel_image(path: str | Path) -> KernelImage:
    """The kernel in `path`, or an HvkitError that says why it is not one."""
    path = Path(path)
    if not path.exists():
        raise HvkitError(f"kernel file {path} does not exist", "check the path given to --kernel")
    if not path.is_file():
        raise _not_a_kernel(path, "not a regular file")
    with path.open("rb") as f:
        head = f.read(0x10000 + 512)
    if len(head) >= 0x210 and head[0x202:0x206] == b"HdrS":
        return _read_bzimage(path, head)
    if head[:4] == b"\x7fELF":
        return _read_vmlinux(path)
    raise _not_a_kernel(path, "no x86 boot header and not an ELF file")
