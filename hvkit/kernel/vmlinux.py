"""The uncompressed kernel (vmlinux ELF) inside a bzImage.

A bzImage is a small decompressor plus the compressed kernel ELF (the "payload", found by
the setup header's payload_offset/payload_length). The ELF is stripped of its symbol
table, but keeps its program headers, so every kernel virtual address maps to bytes of
the file; kallsyms.py finds the symbols in it.
"""

from __future__ import annotations

import bz2
import lzma
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

from hvkit.errors import HvkitError

_LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
_LZ4_LEGACY_BLOCK = 8 << 20


def _lz4_legacy(data: bytes) -> bytes:
    import lz4.block

    out, pos = bytearray(), 4
    while pos + 4 <= len(data):
        size, = struct.unpack_from("<I", data, pos)
        if size == 0 or pos + 4 + size > len(data) or data[pos:pos + 4] == _LZ4_LEGACY_MAGIC:
            break  # the appended uncompressed size, or padding
        out += lz4.block.decompress(data[pos + 4 : pos + 4 + size], uncompressed_size=_LZ4_LEGACY_BLOCK)
        pos += 4 + size
    return bytes(out)


def _lzo(data: bytes) -> bytes:
    """An lzop stream (what the kernel's LZO compression writes), through Debian's lzop:
    Python has no LZO in its standard library, and the PyPI binding needs a compiler.
    lzop warns (status 2) about the 4-byte size the kernel appends; the output is whole."""
    if shutil.which("lzop") is None:
        raise HvkitError("this kernel is LZO-compressed and lzop is not installed to unpack it",
                         "apt-get install lzop (./setup.sh does), or pass its uncompressed vmlinux")
    proc = subprocess.run(["lzop", "-dc"], input=data, capture_output=True)
    if proc.returncode not in (0, 2) or not proc.stdout:
        raise HvkitError(f"the LZO kernel payload does not decompress: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def _decompress(payload: bytes) -> bytes:
    if payload[:2] == b"\x1f\x8b":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)  # ignores trailing bytes
    if payload[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if payload[:3] == b"\x5d\x00\x00":
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
    if payload[:3] == b"BZh":
        return bz2.BZ2Decompressor().decompress(payload)
    if payload[:4] == _LZ4_LEGACY_MAGIC:
        return _lz4_legacy(payload)
    if payload[:4] == b"\x28\xb5\x2f\xfd":
        return _zstd(payload)
    if payload[:4] == b"\x89LZO":
        return _lzo(payload)
    if payload[:4] == b"\x7fELF":
        return payload
    raise HvkitError(f"unknown compression of the kernel payload (starts {payload[:4].hex()})")


def extract_vmlinux(bzimage: Path) -> bytes:
    """The kernel ELF inside `bzimage`."""
    data = bzimage.read_bytes()
    if data[0x202:0x206] != b"HdrS":
        raise HvkitError(f"{bzimage} is not a bzImage")
    proto, = struct.unpack_from("<H", data, 0x206)
    if proto < 0x208:
        raise HvkitError(f"{bzimage} uses boot protocol {proto >> 8}.{proto & 0xFF}, "
                         "too old to locate its payload", "pass its vmlinux instead")
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    try:
        elf = _decompress(data[start : start + length])
    except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError, RuntimeError) as e:
        raise HvkitError(f"the kernel payload of {bzimage} does not decompress: {e}") from None
    if elf[:4] != b"\x7fELF":
        raise HvkitError(f"the payload of {bzimage} is not an ELF kernel")
    return elf
