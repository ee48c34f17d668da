"""The kernel's own symbol table (kallsyms), read from its vmlinux: a System.map without
a debug package.

Debian ships a placeholder System.map (the real one is in the -dbg package), but every
kernel built with CONFIG_KALLSYMS carries its symbols compressed in .rodata, as written
by scripts/kallsyms.c:

    kallsyms_num_syms, kallsyms_names (length-prefixed runs of token indices),
    kallsyms_markers (offset of every 256th name), kallsyms_token_table (256 NUL-ended
    strings), kallsyms_token_index (256 u16), kallsyms_offsets (s32 per symbol) and
    kallsyms_relative_base (u64)

The tables carry no symbols of their own, so they are found by their shape: the token
table holds the digits "0".."9" as tokens 48..57; kallsyms_num_syms, the names and the
markers are contiguous in every version (the names decode to printable nm-style lines,
and markers[1] is where name 256 starts); the offsets sit either before num_syms (up
to 6.2) or after the token index (6.3+), whichever gives sorted kernel addresses.
Versions differ in what lies between (6.2 added kallsyms_seqs_of_names), which is why
nothing here relies on two tables being adjacent except those three.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from hvkit.errors import HvkitError

_DIGITS = b"".join(bytes([c]) + b"\0" for c in b"0123456789")


@dataclass(frozen=True)
class Symbol:
    name: str
    address: int
    kind: str  # nm-style type letter: T, D, B, R, ...


class KallsymsError(HvkitError):
    pass


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _aligned_candidates(pos: int) -> list[int]:
    """Where a table that follows at `pos` may start: scripts/kallsyms.c aligned its tables
    to 8 bytes for years; newer kernels (7.x) align less. Most aligned first."""
    return list(dict.fromkeys([_align8(pos), (pos + 3) & ~3, (pos + 1) & ~1]))


def _strings_back(data: bytes, pos: int, count: int) -> int:
    """Start of the string `count` NUL-terminated strings before the one at `pos`."""
    for _ in range(count):
        prev_nul = data.rfind(b"\0", 0, pos - 1)
        if prev_nul < 0:
            raise KallsymsError("kallsyms token table runs off the start of .rodata")
        pos = prev_nul + 1
    return pos


def _token_table(data: bytes) -> tuple[int, list[bytes], int]:
    """(start, tokens, token_index position) of the token table."""
    hit = data.find(_DIGITS)
    while hit >= 0:
        try:
            start = _strings_back(data, hit, ord("0"))
            tokens, pos = [], start
            for _ in range(256):
                end = data.index(b"\0", pos)
                tokens.append(data[pos:end])
                pos = end + 1
            offsets, off = [], 0
            for t in tokens:
                offsets.append(off)
                off += len(t) + 1
            for index_pos in _aligned_candidates(pos):
                index = struct.unpack_from("<256H", data, index_pos)
                if list(index) == offsets and all(tokens):
                    return start, tokens, index_pos
        except (KallsymsError, ValueError, struct.error):
            pass
        hit = data.find(_DIGITS, hit + 1)
    raise KallsymsError("no kallsyms token table found", "is the kernel built with CONFIG_KALLSYMS?")


def _name_length(data: bytes, pos: int) -> tuple[int, int]:
    """(length, header bytes) of a kallsyms_names entry (two-byte lengths since 6.1)."""
    b = data[pos]
    if b & 0x80:
        return (b & 0x7F) | (data[pos + 1] << 7), 2
    return b, 1


def _skip_names(data: bytes, pos: int, count: int) -> int:
    for _ in range(count):
        n, h = _name_length(data, pos)
        if n == 0:
            raise KallsymsError("empty kallsyms name")
        pos += h + n
    return pos


_TYPES = set(b"TtDdBbRrVvWwAaUuGgSsNnIi?")


def _plausible_name(data: bytes, pos: int, tokens: list[bytes]) -> bool:
    n, h = _name_length(data, pos)
    if not 1 <= n <= 512:
        return False
    name = b"".join(tokens[i] for i in data[pos + h : pos + h + n])
    return len(name) >= 2 and name[0] in _TYPES and all(32 < c < 127 for c in name[1:])


_SEARCH_WINDOW = 32 << 20


def _names_and_markers(data: bytes, table_start: int, tokens: list[bytes]) -> tuple[int, int]:
    """(start of kallsyms_names, number of symbols): the u32 before the names counts
    them (8 bytes before them up to 6.x, 4 in 7.x), and the markers that follow the
    names (8- or 4-aligned) agree with them."""
    lo = max(8, table_start - _SEARCH_WINDOW) & ~7
    counts = np.frombuffer(data, dtype="<u4", count=(table_start - lo) // 4, offset=lo)
    for k in np.flatnonzero((counts >= 256) & (counts < 1 << 22))[::-1]:
        num, at = int(counts[k]), lo + 4 * int(k)
        for start in (at + 8, at + 4):
            if start % 8 or not _plausible_name(data, start, tokens):
                continue
            try:
                end = _skip_names(data, start, num)
                second = _skip_names(data, start, 256) - start
                if end < table_start and any(struct.unpack_from("<II", data, markers) == (0, second)
                                             for markers in _aligned_candidates(end)[:2]):
                    return start, num
            except (KallsymsError, IndexError, struct.error):
                continue
    raise KallsymsError("kallsyms_num_syms and the names were not found before the token table")


def _expand(data: bytes, start: int, count: int, tokens: list[bytes]) -> list[bytes]:
    names, pos = [], start
    for _ in range(count):
        n, h = _name_length(data, pos)
        pos += h
        names.append(b"".join(tokens[i] for i in data[pos : pos + n]))
        pos += n
    return names


def _addresses(offsets: np.ndarray, base: int, absolute_percpu: bool) -> np.ndarray:
    """Symbol addresses from kallsyms_offsets (scripts/kallsyms.c, base-relative mode)."""
    off = offsets.astype(np.int64)
    if absolute_percpu:  # non-negative: absolute (per-CPU); negative: base - 1 - offset
        rel = (np.uint64(base - 1) - off.astype(np.uint64)).astype(np.uint64)
        return np.where(off >= 0, off.astype(np.uint64), rel)
    return np.uint64(base) + offsets.view(np.uint32).astype(np.uint64)


def _sorted_kernel_addresses(addresses: np.ndarray, num: int) -> bool:
    """Whether most addresses are in the kernel's upper half and those are sorted, as
    kallsyms keeps them."""
    kernel = addresses[addresses >= np.uint64(0xFFFF800000000000)]
    return kernel.size > num // 2 and bool(np.all(np.diff(kernel) >= 0))


def _offsets_and_base(data: bytes, names_start: int, index_pos: int, num: int,
                      absolute_percpu: bool, data_va: int | None = None) -> np.ndarray:
    """Symbol addresses, from kallsyms_offsets and kallsyms_relative_base in the order
    of up to 6.2 (offsets, base, num_syms, names) or of 6.3+ (token index, offsets, base);
    or, in 7.x, from place-relative offsets after the token index (each symbol's address
    is the address of its offset plus the offset; `data_va`: where `data` is mapped)."""
    candidates = [(names_start - 16 - _align8(4 * num), names_start - 16)]
    off_pos = _align8(index_pos + 512)
    candidates.append((off_pos, _align8(off_pos + 4 * num)))
    for off_pos, base_pos in candidates:
        if off_pos < 0 or base_pos + 8 > len(data):
            continue
        base, = struct.unpack_from("<Q", data, base_pos)
        if base >> 47 != (1 << 17) - 1:  # not a kernel (upper-half) address
            continue
        addresses = _addresses(np.frombuffer(data, dtype="<i4", count=num, offset=off_pos),
                               base, absolute_percpu)
        if _sorted_kernel_addresses(addresses, num):
            return addresses
    if data_va is not None:  # 7.x: the offsets follow the index with no gap beyond 4-alignment
        for off_pos in dict.fromkeys([(index_pos + 512 + 3) & ~3, _align8(index_pos + 512)]):
            if off_pos + 4 * num > len(data):
                continue
            offsets = np.frombuffer(data, dtype="<i4", count=num, offset=off_pos).astype(np.int64)
            places = data_va + off_pos + 4 * np.arange(num, dtype=np.int64).astype(np.uint64)
            addresses = (places.astype(np.uint64) + offsets.astype(np.uint64)).astype(np.uint64)
            if _sorted_kernel_addresses(addresses, num):
                return addresses
    raise KallsymsError("kallsyms_offsets and kallsyms_relative_base not found",
                        "kernels without CONFIG_KALLSYMS_BASE_RELATIVE are not supported")


def read_kallsyms(rodata: bytes, absolute_percpu: bool = True, rodata_va: int | None = None) -> list[Symbol]:
    """Every symbol of the kernel whose .rodata is `rodata` (mapped at `rodata_va`), in
    kallsyms order."""
    try:
        table_start, tokens, index_pos = _token_table(rodata)
        names_start, num = _names_and_markers(rodata, table_start, tokens)
        raw = _expand(rodata, names_start, num, tokens)
        addresses = _offsets_and_base(rodata, names_start, index_pos, num, absolute_percpu, rodata_va)
    except (struct.error, IndexError) as e:
        raise KallsymsError(f"the kallsyms tables are damaged ({e})") from None
    return [Symbol(r[1:].decode("ascii", "replace"), int(a), chr(r[0]))
            for r, a in zip(raw, addresses.tolist())]
