"""A reader of BTF, the compact type information the kernel carries about itself.

A kernel built with CONFIG_DEBUG_INFO_BTF has a `.BTF` section in its vmlinux: every type
the kernel's C code uses (its private ones too, such as struct mount or the printk ring
buffer) with sizes, member offsets and bitfields, and its per-CPU variables. The format
is include/uapi/linux/btf.h: a header, then the types (ids 1, 2, ...; id 0 is void), then
a string table. This module owns decoding it into `Btf`; what the types are used for is
isf.py's business.

The section is input from a kernel file (or guest memory) and is decoded defensively:
every offset and count is checked against the data, and a malformed section raises
HvkitError instead of reading past its end or running unbounded.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field

from elftools.elf.elffile import ELFFile

from hvkit.errors import HvkitError

BTF_MAGIC = 0xEB9F
MAX_TYPES = 1 << 21  # far more than any kernel has (~150k); bounds the work on hostile input
MAX_VLEN = 0xFFFF    # vlen is 16 bits in the format itself

KINDS = {1: "INT", 2: "PTR", 3: "ARRAY", 4: "STRUCT", 5: "UNION", 6: "ENUM", 7: "FWD",
         8: "TYPEDEF", 9: "VOLATILE", 10: "CONST", 11: "RESTRICT", 12: "FUNC", 13: "FUNC_PROTO",
         14: "VAR", 15: "DATASEC", 16: "FLOAT", 17: "DECL_TAG", 18: "TYPE_TAG", 19: "ENUM64"}
QUALIFIERS = ("VOLATILE", "CONST", "RESTRICT", "TYPE_TAG")


@dataclass(frozen=True)
class BtfMember:
    name: str            # "" for an anonymous struct/union member
    type: int            # type id
    bit_offset: int      # from the start of the enclosing struct/union
    bitfield_size: int   # 0 unless a bitfield


@dataclass(frozen=True)
class BtfType:
    """One BTF type. Which fields mean something depends on `kind`:

    INT: size, encoding (signed/char/bool), bits; STRUCT/UNION: size, members;
    ENUM/ENUM64: size, values, signed; ARRAY: type (element), nelems;
    PTR/TYPEDEF/qualifiers/FUNC/VAR: type; FWD: union (a forward `union x;`)."""

    id: int
    kind: str
    name: str
    size: int = 0
    type: int = 0
    members: tuple[BtfMember, ...] = ()
    values: tuple[tuple[str, int], ...] = ()
    nelems: int = 0
    signed: bool = False
    char: bool = False
    bool_: bool = False
    bits: int = 0
    union: bool = False  # FWD only
    linkage: int = 0     # VAR, FUNC


@dataclass
class Btf:
    types: list[BtfType]  # index = type id; types[0] is void
    by_name: dict[str, list[int]] = field(default_factory=dict)  # "struct mount" -> ids

    def __getitem__(self, type_id: int) -> BtfType:
        if not 0 <= type_id < len(self.types):
            raise HvkitError(f"BTF refers to type {type_id}, which does not exist")
        return self.types[type_id]

    def named(self, kind: str, name: str) -> list[BtfType]:
        """The types `kind name` (e.g. "struct", "mount"); several where dedup kept several."""
        return [self.types[i] for i in self.by_name.get(f"{kind} {name}", [])]

    def resolve(self, type_id: int) -> BtfType:
        """`type_id` with typedefs and qualifiers followed (bounded)."""
        t = self[type_id]
        for _ in range(64):
            if t.kind not in (*QUALIFIERS, "TYPEDEF"):
                return t
            t = self[t.type]
        raise HvkitError(f"BTF type {type_id}: typedef/qualifier chain too long")


_HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
_KEY_KINDS = {"STRUCT": "struct", "UNION": "union", "ENUM": "enum", "ENUM64": "enum",
              "TYPEDEF": "typedef", "INT": "base", "FLOAT": "base", "VAR": "var", "FUNC": "func",
              "FWD": "fwd"}


class _Reader:
    def __init__(self, data: bytes, strings: bytes) -> None:
        self.data, self.strings, self.pos = data, strings, 0

    def take(self, fmt: struct.Struct) -> tuple:
        if self.pos + fmt.size > len(self.data):
            raise HvkitError("BTF type section ends inside a type (truncated or malformed)")
        out = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return out

    def name(self, offset: int) -> str:
        if offset >= len(self.strings):
            raise HvkitError(f"BTF name offset {offset} is outside its string table")
        end = self.strings.find(b"\0", offset)
        return self.strings[offset : end if end >= 0 else len(self.strings)].decode("utf-8", "replace")


_U32 = struct.Struct("<I")
_S32 = struct.Struct("<i")
_ARRAY = struct.Struct("<III")
_PAIR = struct.Struct("<II")
_TRIPLE = struct.Struct("<III")


def _one_type(r: _Reader, type_id: int) -> BtfType:
    name_off, info, size_or_type = r.take(_TYPE)
    vlen, kind_no, kind_flag = info & 0xFFFF, (info >> 24) & 0x1F, info >> 31
    kind = KINDS.get(kind_no)
    if kind is None:
        raise HvkitError(f"BTF type {type_id} has unknown kind {kind_no}")
    name = r.name(name_off)
    base = dict(id=type_id, kind=kind, name=name)
    if kind == "INT":
        enc, = r.take(_U32)
        encoding = (enc >> 24) & 0xF
        return BtfType(**base, size=size_or_type, signed=bool(encoding & 1), char=bool(encoding & 2),
                       bool_=bool(encoding & 4), bits=enc & 0xFF)
    if kind in ("STRUCT", "UNION"):
        members = []
        for _ in range(vlen):
            m_name, m_type, m_off = r.take(_TRIPLE)
            bit_off, bits = (m_off & 0xFFFFFF, m_off >> 24) if kind_flag else (m_off, 0)
            members.append(BtfMember(r.name(m_name), m_type, bit_off, bits))
        return BtfType(**base, size=size_or_type, members=tuple(members))
    if kind == "ENUM":
        values = []
        for _ in range(vlen):
            v_name, v = r.take(_PAIR)
            if kind_flag and v >= 1 << 31:  # kind_flag: a signed enum
                v -= 1 << 32
            values.append((r.name(v_name), v))
        return BtfType(**base, size=size_or_type, values=tuple(values), signed=bool(kind_flag))
    if kind == "ENUM64":
        values = []
        for _ in range(vlen):
            v_name, lo, hi = r.take(_TRIPLE)
            v = (hi << 32) | lo
            if kind_flag and v >= 1 << 63:
                v -= 1 << 64
            values.append((r.name(v_name), v))
        return BtfType(**base, size=size_or_type, values=tuple(values), signed=bool(kind_flag))
    if kind == "ARRAY":
        elem, _index, nelems = r.take(_ARRAY)
        return BtfType(**base, type=elem, nelems=nelems)
    if kind == "FUNC_PROTO":
        for _ in range(vlen):
            r.take(_PAIR)
        return BtfType(**base, type=size_or_type)
    if kind == "VAR":
        linkage, = r.take(_U32)
        return BtfType(**base, type=size_or_type, linkage=linkage)
    if kind == "DATASEC":
        for _ in range(vlen):
            r.take(_TRIPLE)
        return BtfType(**base, size=size_or_type)
    if kind == "DECL_TAG":
        r.take(_S32)
        return BtfType(**base, type=size_or_type)
    if kind == "FLOAT":
        return BtfType(**base, size=size_or_type)
    if kind == "FWD":
        return BtfType(**base, union=bool(kind_flag))
    if kind == "FUNC":
        return BtfType(**base, type=size_or_type, linkage=vlen)
    return BtfType(**base, type=size_or_type)  # PTR, TYPEDEF, qualifiers, TYPE_TAG


_REFERS = ("PTR", "ARRAY", "TYPEDEF", "FUNC", "FUNC_PROTO", "VAR", "DECL_TAG", *QUALIFIERS)


def _check_references(types: list[BtfType]) -> None:
    """Every type id a type refers to exists (so no reader of `Btf` indexes past it)."""
    count = len(types)
    for t in types:
        refs = [m.type for m in t.members]
        if t.kind in _REFERS:
            refs.append(t.type)
        bad = [r for r in refs if not 0 <= r < count]
        if bad:
            raise HvkitError(f"BTF type {t.id} ({t.kind} {t.name}) refers to type {bad[0]}, "
                             f"which does not exist (there are {count})")


def read_btf(data: bytes) -> Btf:
    """The types of a raw BTF blob (the contents of a `.BTF` section)."""
    if len(data) < _HEADER.size:
        raise HvkitError("BTF data is shorter than its header")
    magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(data)
    if magic != BTF_MAGIC:
        raise HvkitError(f"not BTF data (magic {magic:#x}, expected {BTF_MAGIC:#x}; "
                         "big-endian BTF is not supported)")
    if version != 1:
        raise HvkitError(f"BTF version {version} is not supported (only 1)")
    if hdr_len < _HEADER.size or hdr_len > len(data):
        raise HvkitError(f"BTF header length {hdr_len} is invalid")
    body = data[hdr_len:]
    for what, off, length in (("type", type_off, type_len), ("string", str_off, str_len)):
        if off + length > len(body):
            raise HvkitError(f"BTF {what} section ({off}+{length}) runs past the data ({len(body)} bytes)")
    reader = _Reader(body[type_off : type_off + type_len], body[str_off : str_off + str_len])
    types = [BtfType(0, "VOID", "void")]
    while reader.pos < len(reader.data):
        if len(types) > MAX_TYPES:
            raise HvkitError(f"BTF has more than {MAX_TYPES} types; refusing it as malformed")
        types.append(_one_type(reader, len(types)))
    _check_references(types)
    btf = Btf(types)
    for t in types[1:]:
        key_kind = _KEY_KINDS.get(t.kind)
        if key_kind and t.name:
            btf.by_name.setdefault(f"{key_kind} {t.name}", []).append(t.id)
    return btf


def btf_of_vmlinux(elf_bytes: bytes) -> Btf | None:
    """The BTF of a vmlinux ELF (None if the kernel was built without CONFIG_DEBUG_INFO_BTF)."""
    elf = ELFFile(io.BytesIO(elf_bytes))
    section = elf.get_section_by_name(".BTF")
    if section is None:
        return None
    return read_btf(section.data())
