"""Memory sizes as people write them ("256M", "1G", "512MiB") and back."""

from __future__ import annotations

import re

from hvkit.errors import HvkitError

MiB = 1 << 20
_UNITS = {"": MiB, "K": 1 << 10, "M": MiB, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes in `text`; a bare number means MiB, as in QEMU's -m."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise HvkitError(f"invalid memory size {text!r}", "write it like 256M, 1G or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(nbytes: int) -> str:
    """'256M', '1G' or '1536M': the shortest exact form QEMU also accepts."""
    if nbytes % (1 << 30) == 0:
        return f"{nbytes >> 30}G"
    if nbytes % MiB == 0:
        return f"{nbytes // MiB}M"
    return f"{nbytes // 1024}K"


def mib(nbytes: int) -> float:
    return nbytes / MiB
