"""The kernel's own symbol table (kallsyms), read from its vmlinux: a System.map without
a debug package.

Debian ships a placeholder System.map (the real one is in the -dbg package), but every
kernel built with CONFIG_KALLSYMS carries its symbols compressed in .rodata, as written
by scripts/kallsyms.c:

    kallsyms_num_syms, kallsyms_names (length-prefixed runs of token indices),
    kallsyms_markers (offset of every 256th name), kallsyms_token_table (256 NUL-ended
    strings), kallsyms_token_index (256 u16), kallsyms_offsets (s32 per symbol), and up
    to 6.x kallsyms_relative_base (u64)

The tables carry no symbols of their own, and their order, padding and alignment changed
between versions and builds (8-aligned for years, 4- or 2-aligned in 7.x builds; 6.2 put
kallsyms_seqs_of_names between markers and token table; the offsets moved from before
num_syms to after the token index in 6.3, and became place-relative in 7.x). So no
position is assumed; each table is found by what it must hold:

- the token table holds the digits "0".."9" as tokens 48..57, and the token index that
  follows it (after 0..7 bytes of padding) holds the offset of every token;
- kallsyms_markers is a run of u32 (or u64; at any byte) before the token table: 0, then
  offsets growing by what 256 names can take; kallsyms_num_syms is a u32 (at any byte)
  followed, 4..15 bytes on, by exactly that many names, which decode to nm-style lines,
  end 0..7 bytes before the markers, and put every 256th name where its marker says;
- the offsets (before num_syms or after the token index, any padding up to 7 bytes,
  relative to a base or to their own place, per-CPU symbols absolute or not) are the
  reading whose addresses put the symbols where the image has them: `linux_banner` at
  the "Linux version " of .rodata, `_text` at the start of .text, `init_task` in .data
  (whichever of those the caller knows), and every kernel address sorted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from hvkit.errors import HvkitError

_DIGITS = b"".join(bytes([c]) + b"\0" for c in b"0123456789")
_PAD = range(8)  # bytes of padding a table may follow the previous one by (alignment 1..8)


@dataclass(frozen=True)
class Symbol:
    name: str
    address: int
    kind: str  # nm-style type letter: T, D, B, R, ...


class KallsymsError(HvkitError):
    pass


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
            if all(tokens):
                for pad in _PAD:
                    if list(struct.unpack_from("<256H", data, pos + pad)) == offsets:
                        return start, tokens, pos + pad
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


_TYPES = set(b"TtDdBbRrVvWwAaUuGgSsNnIi?")


def _plausible_name(data: bytes, pos: int, tokens: list[bytes]) -> bool:
    n, h = _name_length(data, pos)
    if not 1 <= n <= _MAX_NAME - 2:
        return False
    name = b"".join(tokens[i] for i in data[pos + h : pos + h + n])
    return len(name) >= 2 and name[0] in _TYPES and all(32 < c < 127 for c in name[1:])


def _walk(data: bytes, pos: int, count: int) -> int:
    """Where the `count` names from `pos` end (no checks)."""
    for _ in range(count):
        b = data[pos]
        pos += 2 + ((b & 0x7F) | (data[pos + 1] << 7)) if b & 0x80 else 1 + b
    return pos


def _walk_names(data: bytes, start: int, count: int, limit: int,
                tokens: list[bytes]) -> tuple[list[int], int] | None:
    """(offset from `start` of every 256th name, end of the last name) of `count` names
    from `start` that end before `limit`; None where that is not a run of names (the
    first 256 must decode to nm-style lines, none may be empty)."""
    markers, pos = [], start
    for i in range(count):
        if not i & 0xFF:
            markers.append(pos - start)
        if i < 256 and not _plausible_name(data, pos, tokens):
            return None
        b = data[pos]
        if b & 0x80:
            n, pos = (b & 0x7F) | (data[pos + 1] << 7), pos + 2
        else:
            n, pos = b, pos + 1
        if n == 0:
            return None
        pos += n
        if pos > limit:
            return None
    return markers, pos


_MAX_NAME = 2 + 512  # bytes of one name: a length (two bytes since 6.1), up to KSYM_NAME_LEN tokens
_MIN_GROUP, _MAX_GROUP = 256 * 2, 256 * _MAX_NAME  # bytes of 256 names


def _marker_runs(data: bytes, table_start: int) -> Iterator[tuple[int, int, list[int]]]:
    """(position, width, entries) of every run of u32 or u64 (at any byte) before the token
    table that could be kallsyms_markers: 0, then offsets growing by what 256 names
    can take; nearest the token table first."""
    runs = []
    for width, dtype in ((4, "<u4"), (8, "<u8")):
        for phase in range(width):
            n = (table_start - phase) // width
            if n < 3:
                continue
            v = np.frombuffer(data, dtype=dtype, count=n, offset=phase)
            step = np.diff(v.astype(np.int64))
            good = (step >= _MIN_GROUP) & (step <= _MAX_GROUP)
            for k in np.flatnonzero((v[:-2] == 0) & good[:-1] & good[1:]).tolist():
                end = k + 2
                while end < len(good) and good[end]:
                    end += 1
                runs.append((phase + width * k, width, v[k : end + 1].astype(np.int64).tolist()))
    runs.sort(key=lambda r: -r[0])
    return iter(runs)


@dataclass(frozen=True)
class _Names:
    count_at: int  # kallsyms_num_syms
    start: int  # kallsyms_names
    num: int
    markers_at: int  # kallsyms_markers
    marker_width: int  # 4 (since 4.20) or 8
    groups: int  # entries of kallsyms_markers


def _names_and_markers(data: bytes, table_start: int, tokens: list[bytes]) -> _Names:
    """Where kallsyms_num_syms, kallsyms_names and kallsyms_markers are: a
    count (a u32 at any byte) followed, 4..15 bytes on, by that many names which,
    decoded, end 0..7 bytes before a markers table that holds the offset of every
    256th of them, before the token table."""
    for markers_at, width, run in _marker_runs(data, table_start):
        for groups in range(len(run), 1, -1):  # the run may have caught a value or two beyond the table
            last = run[groups - 1]
            if groups < len(run) - 2:
                break
            # names end 0..7 bytes before the markers, one to 256 names after the last marker
            lo = max(0, markers_at - 7 - last - _MAX_GROUP)
            hi = markers_at - last - 2
            if hi - 4 <= lo:
                continue
            window = data[max(0, lo - 15) : hi - 4 + 4]
            base = max(0, lo - 15)
            for phase in range(4):
                n = (len(window) - phase) // 4
                if n <= 0:
                    continue
                counts = np.frombuffer(window, dtype="<u4", count=n, offset=phase).astype(np.int64)
                hits = np.flatnonzero((counts > 256 * (groups - 1)) & (counts <= 256 * groups))
                for k in hits.tolist():
                    at, num = base + phase + 4 * k, int(counts[k])
                    for start in range(max(at + 4, lo), min(at + 16, hi + 1)):
                        if not _plausible_name(data, start, tokens):
                            continue
                        try:
                            end = _walk(data, start + last, num - 256 * (groups - 1))
                        except IndexError:
                            continue
                        if not markers_at - 7 <= end <= markers_at:
                            continue
                        walked = _walk_names(data, start, num, table_start, tokens)
                        if walked is not None and walked == (run[:groups], end):
                            return _Names(at, start, num, markers_at, width, groups)
    raise KallsymsError("kallsyms_num_syms and the names were not found before the token table")


def _expand(data: bytes, start: int, count: int, tokens: list[bytes]) -> list[bytes]:
    names, pos = [], start
    for _ in range(count):
        n, h = _name_length(data, pos)
        pos += h
        names.append(b"".join(tokens[i] for i in data[pos : pos + n]))
        pos += n
    return names


def _is_kernel(address: int) -> bool:
    return address >> 47 == (1 << 17) - 1


@dataclass(frozen=True)
class _Layout:
    """One reading of kallsyms_offsets: at `offsets`, relative to the u64 at `base`
    (absolute per-CPU symbols or not), or to their own place (`base` None)."""
    offsets: int
    base: int | None
    absolute_percpu: bool = False

    def addresses(self, data: bytes, num: int, data_va: int | None,
                  index: np.ndarray | slice = slice(None)) -> np.ndarray:
        off = np.frombuffer(data, dtype="<i4", count=num, offset=self.offsets)[index].astype(np.int64)
        if self.base is None:  # place-relative: the offset's own address plus the offset
            place = np.uint64(data_va + self.offsets) + 4 * np.arange(num, dtype=np.uint64)[index]
            return place + off.astype(np.uint64)
        base, = struct.unpack_from("<Q", data, self.base)
        if self.absolute_percpu:  # non-negative: absolute (per-CPU); negative: base - 1 - offset
            rel = (np.uint64(base - 1) - off.astype(np.uint64)).astype(np.uint64)
            return np.where(off >= 0, off.astype(np.uint64), rel)
        return np.uint64(base) + off.astype(np.uint32).astype(np.uint64)


def _layouts(data: bytes, count_at: int, index_pos: int, num: int, absolute_percpu: bool,
             data_va: int | None) -> Iterator[_Layout]:
    """Every reading of kallsyms_offsets the image allows: before num_syms (up to 6.2:
    offsets, relative_base, num_syms) or after the token index (6.3+: token index,
    offsets, relative_base; 7.x: token index, place-relative offsets), each table 0..7
    bytes after the one before it; the configured per-CPU mode first."""
    modes = (absolute_percpu, not absolute_percpu)
    index_end = index_pos + 512
    relative = []
    for base in range(count_at - 8, count_at - 16, -1):
        relative += [(base - pad - 4 * num, base) for pad in _PAD]
    for pad in _PAD:
        off = index_end + pad
        relative += [(off, off + 4 * num + p) for p in _PAD]
    for off, base in relative:
        if off >= 0 and base + 8 <= len(data) and _is_kernel(struct.unpack_from("<Q", data, base)[0]):
            for mode in modes:
                yield _Layout(off, base, mode)
    if data_va is not None:
        for pad in _PAD:
            if index_end + pad + 4 * num <= len(data):
                yield _Layout(index_end + pad, None)


def _sorted_kernel_addresses(addresses: np.ndarray, num: int) -> bool:
    """Whether most addresses are in the kernel's upper half and those are sorted, as
    kallsyms keeps them."""
    kernel = addresses[addresses >= np.uint64(0xFFFF800000000000)]
    return kernel.size > num // 2 and bool(np.all(np.diff(kernel) >= 0))


def _addresses(data: bytes, names: list[bytes], count_at: int, index_pos: int, absolute_percpu: bool,
               data_va: int | None, sections: dict[str, tuple[int, int]]) -> tuple[np.ndarray, _Layout]:
    """The symbols' addresses, and the layout they were read with: from the one reading of kallsyms_offsets that puts the
    known symbols where the image has them and keeps the kernel's addresses sorted."""
    num = len(names)
    where = {}
    for i, raw in enumerate(names):
        if raw[1:] in (b"linux_banner", b"_text", b"init_task") and raw[1:] not in where:
            where[raw[1:]] = i
    checks = []
    if data_va is not None and b"linux_banner" in where:
        def banner(a: int) -> bool:
            return 0 <= a - data_va < len(data) and data.startswith(b"Linux version ", a - data_va)
        checks.append((where[b"linux_banner"], banner))
    if ".text" in sections and b"_text" in where:
        checks.append((where[b"_text"], lambda a: a == sections[".text"][0]))
    if ".data" in sections and b"init_task" in where:
        checks.append((where[b"init_task"], lambda a: sections[".data"][0] <= a < sections[".data"][1]))
    if not checks:
        raise KallsymsError("kallsyms has none of linux_banner, _text and init_task to check its addresses by")
    at = np.array([i for i, _ in checks])
    for layout in _layouts(data, count_at, index_pos, num, absolute_percpu, data_va):
        known = layout.addresses(data, num, data_va, at).tolist()
        if all(ok(a) for (_, ok), a in zip(checks, known)):
            addresses = layout.addresses(data, num, data_va)
            if _sorted_kernel_addresses(addresses, num):
                return addresses, layout
    raise KallsymsError("kallsyms_offsets not found (no reading puts linux_banner, _text and "
                        "init_task where the image has them)",
                        "kernels without CONFIG_KALLSYMS_BASE_RELATIVE are not supported")


def _seqs_of_names(data: bytes, names: list[bytes], after: list[int]) -> int | None:
    """Where kallsyms_seqs_of_names is (6.2+): 3 big-endian bytes per symbol, the symbol
    indices in the order of their names, 0..7 bytes after one of the tables `after` it may
    follow (the markers up to 6.3, the offsets or relative_base since); None if absent."""
    num = len(names)
    order = None
    for end in after:
        for pad in _PAD:
            at = end + pad
            if at + 3 * num > len(data):
                continue
            raw = np.frombuffer(data, dtype=np.uint8, count=3 * num, offset=at).reshape(num, 3).astype(np.int64)
            seqs = (raw[:, 0] << 16) | (raw[:, 1] << 8) | raw[:, 2]
            if seqs.max() >= num or np.bincount(seqs, minlength=num).max() != 1:
                continue
            if order is None:
                order = [n[1:] for n in names]  # without the type letter, as the kernel sorts them
            if all(order[a] <= order[b] for a, b in zip(seqs[:-1].tolist(), seqs[1:].tolist())):
                return at
    return None


@dataclass(frozen=True)
class KallsymsTables:
    """Where each kallsyms table starts, as byte offsets into .rodata (None: this kernel
    has no such table). kallsyms lists none of them, though tools that read kallsyms
    from memory (Volatility's linux.kallsyms) look them up by name."""
    num_syms: int
    names: int
    markers: int
    token_table: int
    token_index: int
    offsets: int
    relative_base: int | None
    seqs_of_names: int | None
    count: int  # symbols
    marker_width: int  # bytes of kallsyms_num_syms and of each marker (4 since 4.20)
    markers_count: int

    def symbols(self, rodata_va: int) -> dict[str, tuple[int, str, int | None]]:
        """The tables by their kernel names: (link-time address, C type of an element, number
        of elements or None for a scalar), the types as kernel/kallsyms_internal.h declares them."""
        width = "unsigned int" if self.marker_width == 4 else "long unsigned int"
        where = {"kallsyms_num_syms": (self.num_syms, width, None),
                 "kallsyms_names": (self.names, "unsigned char", self.markers - self.names),
                 "kallsyms_markers": (self.markers, width, self.markers_count),
                 "kallsyms_token_table": (self.token_table, "char", self.token_index - self.token_table),
                 "kallsyms_token_index": (self.token_index, "short unsigned int", 256),
                 "kallsyms_offsets": (self.offsets, "int", self.count),
                 "kallsyms_relative_base": (self.relative_base, "long unsigned int", None),
                 "kallsyms_seqs_of_names": (self.seqs_of_names, "unsigned char", 3 * self.count)}
        return {name: (rodata_va + at, ctype, count) for name, (at, ctype, count) in where.items()
                if at is not None}


@dataclass(frozen=True)
class Kallsyms:
    symbols: list[Symbol]  # in kallsyms order
    tables: KallsymsTables


def read_kallsyms(rodata: bytes, absolute_percpu: bool = True, rodata_va: int | None = None,
                  sections: dict[str, tuple[int, int]] | None = None) -> Kallsyms:
    """Every symbol of the kernel whose .rodata is `rodata` (mapped at `rodata_va`), in
    kallsyms order, and where its tables are. `sections`: (start, end) addresses of the
    image's .text and .data, which the symbols _text and init_task must agree with;
    `absolute_percpu` (CONFIG_KALLSYMS_ABSOLUTE_PERCPU) is tried first, the other mode too."""
    try:
        table_start, tokens, index_pos = _token_table(rodata)
        found = _names_and_markers(rodata, table_start, tokens)
        raw = _expand(rodata, found.start, found.num, tokens)
        addresses, layout = _addresses(rodata, raw, found.count_at, index_pos, absolute_percpu,
                                       rodata_va, sections or {})
    except (struct.error, IndexError) as e:
        raise KallsymsError(f"the kallsyms tables are damaged ({e})") from None
    offsets_end = layout.offsets + 4 * found.num
    seqs = _seqs_of_names(rodata, raw, [found.markers_at + found.marker_width * found.groups, offsets_end]
                          + ([layout.base + 8] if layout.base is not None else []))
    tables = KallsymsTables(
        num_syms=found.count_at, names=found.start, markers=found.markers_at, token_table=table_start,
        token_index=index_pos, offsets=layout.offsets, relative_base=layout.base, seqs_of_names=seqs,
        count=found.num, marker_width=found.marker_width, markers_count=found.groups)
    symbols = [Symbol(r[1:].decode("ascii", "replace"), int(a), chr(r[0]))
               for r, a in zip(raw, addresses.tolist())]
    return Kallsyms(symbols, tables)
