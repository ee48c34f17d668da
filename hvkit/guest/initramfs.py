"""Writes initramfs images (the kernel's "newc" cpio format, gzip-compressed).

hvkit writes the archive itself instead of calling cpio(1) because the image needs a
/dev/console device node, which only root could create on disk; in the archive it is
just a header field.
"""

from __future__ import annotations

import gzip
import io
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    """One file, directory or device node of the archive."""

    path: str  # inside the image, without a leading slash
    mode: int  # full st_mode: type bits and permissions
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)  # (major, minor) for device nodes


def directory(path: str) -> Entry:
    return Entry(path, stat.S_IFDIR | 0o755)


def regular(path: str, data: bytes, executable: bool = False) -> Entry:
    return Entry(path, stat.S_IFREG | (0o755 if executable else 0o644), data)


def char_device(path: str, major: int, minor: int) -> Entry:
    return Entry(path, stat.S_IFCHR | 0o600, rdev=(major, minor))


def from_host_file(path: str, source: Path) -> Entry:
    """The host file `source`, keeping its executable bit."""
    return regular(path, source.read_bytes(), bool(source.stat().st_mode & 0o111))


def _header(ino: int, entry: Entry, name: bytes) -> bytes:
    fields = [
        ino, entry.mode, 0, 0, 1, 0, len(entry.data),  # ino mode uid gid nlink mtime filesize
        0, 0, entry.rdev[0], entry.rdev[1],  # devmajor devminor rdevmajor rdevminor
        len(name) + 1, 0,  # namesize (with NUL) check
    ]
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def cpio_newc(entries: list[Entry]) -> bytes:
    """The uncompressed archive, parents listed before their children."""
    out = io.BytesIO()
    for ino, entry in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = entry.path.encode()
        head = _header(ino, entry, name) + name + b"\0"
        out.write(head + _pad4(len(head)))
        out.write(entry.data + _pad4(len(entry.data)))
    return out.getvalue()


def write_initramfs(path: Path, entries: list[Entry]) -> None:
    """Writes the gzip-compressed archive atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(gzip.compress(cpio_newc(entries), compresslevel=6, mtime=0))
    tmp.replace(path)
