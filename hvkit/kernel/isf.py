"""Volatility 3 symbol tables (ISF, the Intermediate Symbol Format) made without a debug package.

Volatility's Linux plugins need, for the guest's exact kernel, every type they read
(structures, unions, enums, base types) and every kernel symbol with its link-time address.
Normally that is dwarf2json run over the 280 MB vmlinux of a -dbg package. build_isf()
makes the same table from what hvkit already has:

- types, from two sources:
  * the DWARF of a compiled interface (files/hvkit_isf.c, built against the kernel's own
    headers and .config with -g -fno-eliminate-unused-debug-types, exactly as layout.py
    builds hvkit_layout.c): every type the public headers declare;
  * the kernel's own BTF (the `.BTF` section of the vmlinux inside the kernel file, see
    btf.py): the types private to kernel source files (struct mount, the printk ring
    buffer, struct kthread, ...) and everything else the kernel uses.
  A type both have is taken from the DWARF and checked against the BTF: sizes and member
  offsets that disagree are listed in the report (IsfReport.disagreements).
- symbols: every kallsyms symbol of the kernel file with its unrandomized address
  (symbols.py; Volatility finds the KASLR shift itself), `linux_banner` with its bytes as
  constant_data (how Volatility matches a table to a memory image), and the types of the
  global variables plugins read as objects: from the interface's hvkit_v_* references
  (the header's declaration), else from the BTF's VARs (per-CPU variables), else from the
  interface's hand-written hvkit_p_* declarations (variables private to a source file).

The table is written to <cache>/isf/<release>-<hash>.json.xz beside a report
(<same>.report.json); the hash covers the kernel file, its .config, the interface source
and this module's output format, so a second call only reads the report back.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import lzma
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from elftools.elf.elffile import ELFFile

import hvkit
from hvkit.errors import HvkitError
from hvkit.kernel.btf import QUALIFIERS, Btf, BtfType, btf_of_vmlinux
from hvkit.kernel.compile import compile_interface
from hvkit.kernel.headers import KernelTree
from hvkit.kernel.image import read_kernel_image
from hvkit.kernel.symbols import load_symbols
from hvkit.kernel.vmlinux import extract_vmlinux

log = logging.getLogger(__name__)

ISF_FORMAT = "6.2.0"   # the ISF version written: 6.2 reads anonymous struct/union members
OUTPUT_FORMAT = b"4"   # what build_isf writes; part of the cache key (3: every anonymous member kept, 4: the kallsyms tables)
INTERFACE = "hvkit_isf.c"
MAX_DEPTH = 64         # type descriptors nest no deeper (pointer to array of pointer ...)
MAX_DISAGREEMENTS_PER_TYPE = 4

Desc = dict[str, Any]  # an ISF type descriptor, e.g. {"kind": "pointer", "subtype": {...}}
VOID: Desc = {"kind": "base", "name": "void"}


@dataclass
class IsfReport:
    path: Path                 # the .json.xz table
    release: str
    user_types_dwarf: int      # structs/unions taken from the interface's DWARF
    user_types_btf: int        # structs/unions taken from the kernel's BTF (not in the DWARF)
    enums_dwarf: int
    enums_btf: int
    base_types: int
    symbols: int
    typed_symbols: dict[str, int]   # source of the type ("header", "btf", "private", "kallsyms", "void") -> count
    checked: int                    # structs/unions both sources have, compared
    disagreements: list[str] = field(default_factory=list)
    seconds: float = 0.0            # time to build (0 when read from the cache)
    cached: bool = False

    def to_json(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "IsfReport":
        return cls(**{**data, "path": Path(data["path"])})


# ---------------------------------------------------------------------------------------
# the ISF pieces, shared by both type sources


def base_type_entry(size: int, kind: str, signed: bool) -> dict:
    """An ISF base_types entry (kind: int, char, bool, float or void)."""
    return {"size": size, "signed": signed, "kind": kind, "endian": "little"}


_INT_NAMES = {(1, True): "signed char", (1, False): "unsigned char", (2, True): "short int",
              (2, False): "short unsigned int", (4, True): "int", (4, False): "unsigned int",
              (8, True): "long int", (8, False): "long unsigned int"}


def bitfield(unit_size: int, bit_offset: int, bits: int, base: Desc) -> tuple[int, Desc]:
    """(byte offset, descriptor) of a bitfield at `bit_offset` in its struct. Volatility reads
    the storage unit at the byte offset as the base type and takes the bits from it, so the
    unit is the aligned one of the base type's size where the field fits in it, else the
    byte the field starts in (packed structures)."""
    unit = max(unit_size, 1)
    start = (bit_offset // (unit * 8)) * unit
    if bit_offset - start * 8 + bits > unit * 8:
        start = bit_offset // 8
    return start, {"kind": "bitfield", "bit_position": bit_offset - start * 8, "bit_length": bits,
                   "type": base}


def anonymous_member_name(fields: dict[str, dict]) -> str:
    """The name of the next anonymous struct/union member of an aggregate whose members so
    far are `fields`: unnamed_field_<n>, n counting the anonymous ones (hex), as dwarf2json
    names them; never the offset, which a union's anonymous structs all share (each would
    replace the one before: struct page kept only its last)."""
    count = sum(1 for f in fields.values() if f.get("anonymous"))
    while f"unnamed_field_{count:x}" in fields:
        count += 1
    return f"unnamed_field_{count:x}"


@dataclass
class TypeSet:
    """Types in ISF form, from one source."""

    user_types: dict[str, dict] = field(default_factory=dict)
    enums: dict[str, dict] = field(default_factory=dict)
    base_types: dict[str, dict] = field(default_factory=dict)
    variables: dict[str, Desc] = field(default_factory=dict)  # hvkit_v_*/hvkit_p_*/BTF VAR -> type
    # typedef name -> the user type it names (typedef struct refcount_struct refcount_t;)
    typedefs: dict[str, str] = field(default_factory=dict)


def enum_entry(size: int, values: dict[str, int], signed: bool | None = None, base: str | None = None) -> dict:
    """An ISF enum. `signed`/`base`: the compiler's underlying type where the source says it
    (DWARF's DW_AT_type, BTF's kind flag); else signed when a value is negative, which is
    what GCC picks for C enums (unsigned unless a value is negative)."""
    if signed is None:
        signed = any(v < 0 for v in values.values())
    return {"size": size, "base": base or _INT_NAMES.get((size, signed), "int"), "constants": values}


# ---------------------------------------------------------------------------------------
# DWARF of the compiled interface

_DW_ATE = {0x2: "bool", 0x4: "float", 0x5: "int", 0x6: "char", 0x7: "int", 0x8: "char", 0x10: "int"}
_DW_SIGNED = {0x5, 0x6, 0xD}
_DATA_FORMS = {"DW_FORM_data1": 1, "DW_FORM_data2": 2, "DW_FORM_data4": 4, "DW_FORM_data8": 8}
_AGGREGATES = ("DW_TAG_structure_type", "DW_TAG_union_type", "DW_TAG_enumeration_type")
_DW_PASS = ("DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type", "DW_TAG_restrict_type",
            "DW_TAG_atomic_type")


def _name(die) -> str | None:
    attr = die.attributes.get("DW_AT_name")
    return attr.value.decode("utf-8", "replace") if attr is not None else None


def _int_attr(die, name: str) -> int | None:
    attr = die.attributes.get(name)
    return attr.value if attr is not None and isinstance(attr.value, int) else None


class DwarfReader:
    """ISF types from the DWARF of one object file (the compiled interface)."""

    def __init__(self, obj: Path) -> None:
        self.obj = obj
        self.types = TypeSet()
        self._desc: dict[int, Desc] = {}
        self._typedef: dict[int, str] = {}  # DIE offset of an anonymous type -> its typedef's name

    def read(self) -> TypeSet:
        with self.obj.open("rb") as f:
            elf = ELFFile(f)
            if not elf.has_dwarf_info():
                raise HvkitError(f"{self.obj} has no DWARF; was it compiled with -g?")
            for cu in elf.get_dwarf_info().iter_CUs():
                dies = list(cu.iter_DIEs())
                self._typedef_names(dies)
                for die in dies:
                    self._visit(die)
        self.types.base_types.setdefault("void", base_type_entry(0, "void", False))
        return self.types

    def _typedef_names(self, dies: list) -> None:
        """Anonymous structs, unions and enums named by a typedef (`typedef struct {...}
        kernel_cap_t;`) take the typedef's name, as Volatility expects (it looks up
        kernel_cap_t); unless a struct, union or enum already has that name."""
        tags = {_name(d) for d in dies if d.tag in _AGGREGATES and "DW_AT_name" in d.attributes}
        for d in dies:
            name = _name(d)
            if d.tag != "DW_TAG_typedef" or not name or name in tags or "DW_AT_type" not in d.attributes:
                continue
            target = d.get_DIE_from_attribute("DW_AT_type")
            if target.tag in _AGGREGATES and "DW_AT_name" not in target.attributes:
                self._typedef.setdefault(target.offset, name)
                tags.add(name)
            elif target.tag in _AGGREGATES[:2] and "DW_AT_declaration" not in target.attributes:
                self.types.typedefs.setdefault(name, _name(target))

    def _visit(self, die) -> None:
        tag = die.tag
        if tag in ("DW_TAG_structure_type", "DW_TAG_union_type"):
            if "DW_AT_declaration" not in die.attributes and "DW_AT_byte_size" in die.attributes:
                self.types.user_types.setdefault(self._agg_name(die), self._aggregate(die))
        elif tag == "DW_TAG_enumeration_type":
            if "DW_AT_declaration" not in die.attributes:
                self.types.enums.setdefault(self._agg_name(die), self._enum(die))
        elif tag == "DW_TAG_base_type":
            self._base(die)
        elif tag == "DW_TAG_pointer_type":
            self.types.base_types.setdefault("pointer", base_type_entry(
                _int_attr(die, "DW_AT_byte_size") or 8, "int", False))
        elif tag == "DW_TAG_variable":
            name = _name(die)
            if not name or "DW_AT_type" not in die.attributes or die.get_parent().tag != "DW_TAG_compile_unit":
                return
            desc = self.desc(die.get_DIE_from_attribute("DW_AT_type"))
            if name.startswith(("hvkit_v_", "hvkit_p_")):
                if desc.get("kind") == "pointer":
                    self.types.variables[name] = desc["subtype"]
            else:  # a header's extern declaration (kept by -fno-eliminate-unused-debug-symbols)
                self.types.variables.setdefault(name, desc)

    def _enum(self, die) -> dict:
        """An enum with the underlying type the compiler gave it (DW_AT_type, which GCC writes
        for DWARF 3 and later). A DW_FORM_dataN carries no sign: GCC writes negative values as
        sdata and others in the smallest dataN (128 of an int enum as data1 0x80), so only a
        dataN as wide as a signed type is read as negative (-1 of an int enum as data4)."""
        size = _int_attr(die, "DW_AT_byte_size") or 4
        base, signed = None, None
        if "DW_AT_type" in die.attributes:
            under = die.get_DIE_from_attribute("DW_AT_type")
            while under.tag in _DW_PASS and "DW_AT_type" in under.attributes:
                under = under.get_DIE_from_attribute("DW_AT_type")
            if under.tag == "DW_TAG_base_type":
                base = self._base(under)["name"]
                signed = (_int_attr(under, "DW_AT_encoding") or 0x5) in _DW_SIGNED
        values = {}
        for c in die.iter_children():
            if c.tag == "DW_TAG_enumerator":
                attr = c.attributes["DW_AT_const_value"]
                value = attr.value
                width = _DATA_FORMS.get(attr.form)
                if signed and width == size and value >= 1 << (8 * width - 1):
                    value -= 1 << (8 * width)
                values[_name(c) or ""] = value
        return enum_entry(size, values, signed, base)

    def _base(self, die) -> Desc:
        name = _name(die) or "void"
        encoding = _int_attr(die, "DW_AT_encoding") or 0x5
        self.types.base_types.setdefault(name, base_type_entry(
            _int_attr(die, "DW_AT_byte_size") or 0, _DW_ATE.get(encoding, "int"), encoding in _DW_SIGNED))
        return {"kind": "base", "name": name}

    def _agg_name(self, die) -> str:
        return _name(die) or self._typedef.get(die.offset) or f"unnamed_d{die.offset:x}"

    def desc(self, die, depth: int = 0) -> Desc:
        """The ISF type descriptor of a type DIE (typedefs and qualifiers looked through)."""
        if die is None:
            return VOID
        cached = self._desc.get(die.offset)
        if cached is not None:
            return cached
        if depth > MAX_DEPTH:
            raise HvkitError(f"{self.obj}: DWARF types nest deeper than {MAX_DEPTH}")
        tag = die.tag
        target = die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else None
        if tag == "DW_TAG_base_type":
            result = self._base(die)
        elif tag == "DW_TAG_pointer_type":
            result = {"kind": "pointer", "subtype": self.desc(target, depth + 1)}
        elif tag in ("DW_TAG_structure_type", "DW_TAG_union_type"):
            result = {"kind": "struct" if tag == "DW_TAG_structure_type" else "union",
                      "name": self._agg_name(die)}
        elif tag == "DW_TAG_enumeration_type":
            result = {"kind": "enum", "name": self._agg_name(die)}
        elif tag in _DW_PASS:
            result = self.desc(target, depth + 1)
        elif tag == "DW_TAG_array_type":
            result = self._array(die, self.desc(target, depth + 1))
        elif tag == "DW_TAG_subroutine_type":
            result = {"kind": "function"}
        else:  # unspecified type, anything unknown
            result = VOID
        self._desc[die.offset] = result
        return result

    @staticmethod
    def _array(die, element: Desc) -> Desc:
        counts = []
        for sub in die.iter_children():
            if sub.tag != "DW_TAG_subrange_type":
                continue
            count = _int_attr(sub, "DW_AT_count")
            if count is None:
                upper = _int_attr(sub, "DW_AT_upper_bound")
                count = upper + 1 if upper is not None else 0
            counts.append(max(count, 0))
        result = element
        for count in reversed(counts or [0]):  # int a[2][3]: array of 2 arrays of 3
            result = {"kind": "array", "count": count, "subtype": result}
        return result

    def _size_of(self, die) -> int:
        for _ in range(MAX_DEPTH):
            if die is None:
                return 0
            size = _int_attr(die, "DW_AT_byte_size")
            if size is not None:
                return size
            if "DW_AT_type" not in die.attributes:
                return 0
            die = die.get_DIE_from_attribute("DW_AT_type")
        return 0

    def _aggregate(self, die) -> dict:
        fields: dict[str, dict] = {}
        for member in die.iter_children():
            if member.tag != "DW_TAG_member" or "DW_AT_type" not in member.attributes:
                continue
            mtype = member.get_DIE_from_attribute("DW_AT_type")
            desc = self.desc(mtype)
            offset = _int_attr(member, "DW_AT_data_member_location") or 0
            bits = _int_attr(member, "DW_AT_bit_size")
            entry: dict[str, Any]
            if bits:
                unit = _int_attr(member, "DW_AT_byte_size") or self._size_of(mtype)
                bit_offset = _int_attr(member, "DW_AT_data_bit_offset")
                if bit_offset is None:  # DWARF 2/3: counted from the unit's most significant bit
                    bit_offset = offset * 8 + unit * 8 - (_int_attr(member, "DW_AT_bit_offset") or 0) - bits
                byte, bf = bitfield(unit, bit_offset, bits, desc)
                entry = {"type": bf, "offset": byte}
            else:
                entry = {"type": desc, "offset": offset}
            name = _name(member)
            if name is None:
                name = anonymous_member_name(fields)
                entry["anonymous"] = True
            fields[name] = entry
        kind = "struct" if die.tag == "DW_TAG_structure_type" else "union"
        return {"kind": kind, "size": _int_attr(die, "DW_AT_byte_size") or 0, "fields": fields}


# ---------------------------------------------------------------------------------------
# the kernel's BTF


class BtfConverter:
    """ISF types from a kernel's BTF. Where BTF has several types of one name (the
    deduplication keeps distinct definitions apart), the first is `name` and the
    others are kept in `alternatives` (for the cross-check only)."""

    def __init__(self, btf: Btf) -> None:
        self.btf = btf
        self.types = TypeSet()
        self.alternatives: dict[str, list[str]] = {}  # name -> ISF names of other definitions
        self._names: dict[int, str] = {}
        self._typedef = self._typedef_names()

    def _typedef_names(self) -> dict[int, str]:
        """Type id of an anonymous struct/union/enum -> the name of a typedef of it (see
        DwarfReader._typedef_names), unless a struct, union or enum has that name."""
        names: dict[int, str] = {}
        taken = {key.split(" ", 1)[1] for key in self.btf.by_name
                 if key.startswith(("struct ", "union ", "enum "))}
        for t in self.btf.types[1:]:
            if t.kind != "TYPEDEF" or not t.name or t.name in taken:
                continue
            target = self.btf[t.type]
            if target.kind in ("STRUCT", "UNION", "ENUM", "ENUM64") and not target.name:
                names.setdefault(target.id, t.name)
                taken.add(t.name)
        return names

    def read(self) -> TypeSet:
        for t in self.btf.types[1:]:
            if t.kind in ("STRUCT", "UNION"):
                self._define(t)
            elif t.kind in ("ENUM", "ENUM64"):
                name = self._agg_name(t)
                if name not in self.types.enums:
                    # the kind flag says signed (pahole 1.24+); older BTF leaves it unset
                    self.types.enums[name] = enum_entry(t.size, dict(t.values), t.signed or None)
            elif t.kind in ("INT", "FLOAT"):
                self.desc(t.id)
            elif t.kind == "PTR":
                self.types.base_types.setdefault("pointer", base_type_entry(8, "int", False))
            elif t.kind == "VAR" and t.name:
                self.types.variables.setdefault(t.name, self.desc(t.type))
            elif t.kind == "TYPEDEF" and t.name:
                target = self.btf.resolve(t.id)
                if target.kind in ("STRUCT", "UNION") and target.name:
                    self.types.typedefs.setdefault(t.name, self._agg_name(target))
        self.types.base_types.setdefault("void", base_type_entry(0, "void", False))
        return self.types

    def _agg_name(self, t: BtfType) -> str:
        """The ISF name of a struct/union/enum: its own for the first of that name, else
        a unique one (unnamed types, later duplicates)."""
        cached = self._names.get(t.id)
        if cached is not None:
            return cached
        key = {"STRUCT": "struct", "UNION": "union", "ENUM": "enum", "ENUM64": "enum"}[t.kind]
        same = self.btf.by_name.get(f"{key} {t.name}", []) if t.name else []
        if t.name and same and same[0] == t.id:
            name = t.name
        elif t.name:
            name = f"{t.name}__btf{t.id}"
            self.alternatives.setdefault(t.name, []).append(name)
        else:
            name = self._typedef.get(t.id) or f"unnamed_b{t.id}"
        self._names[t.id] = name
        return name

    def desc(self, type_id: int, depth: int = 0) -> Desc:
        if depth > MAX_DEPTH:
            raise HvkitError(f"BTF type {type_id}: types nest deeper than {MAX_DEPTH}")
        t = self.btf[type_id]
        kind = t.kind
        if kind == "VOID":
            return VOID
        if kind == "INT":
            self.types.base_types.setdefault(t.name, base_type_entry(
                t.size, "bool" if t.bool_ else "char" if t.char or t.name.endswith("char") else "int",
                t.signed))
            return {"kind": "base", "name": t.name}
        if kind == "FLOAT":
            self.types.base_types.setdefault(t.name, base_type_entry(t.size, "float", True))
            return {"kind": "base", "name": t.name}
        if kind == "PTR":
            return {"kind": "pointer", "subtype": self.desc(t.type, depth + 1)}
        if kind == "ARRAY":
            return {"kind": "array", "count": t.nelems, "subtype": self.desc(t.type, depth + 1)}
        if kind in ("STRUCT", "UNION"):
            return {"kind": kind.lower(), "name": self._agg_name(t)}
        if kind in ("ENUM", "ENUM64"):
            return {"kind": "enum", "name": self._agg_name(t)}
        if kind == "FWD":
            return {"kind": "union" if t.union else "struct", "name": t.name}
        if kind in (*QUALIFIERS, "TYPEDEF"):
            return self.desc(t.type, depth + 1)
        if kind in ("FUNC_PROTO", "FUNC"):
            return {"kind": "function"}
        return VOID

    def _define(self, t: BtfType) -> None:
        fields: dict[str, dict] = {}
        for m in t.members:
            desc = self.desc(m.type)
            if m.bitfield_size:
                byte, bf = bitfield(self._size(m.type), m.bit_offset, m.bitfield_size, desc)
                entry: dict[str, Any] = {"type": bf, "offset": byte}
            else:
                entry = {"type": desc, "offset": m.bit_offset // 8}
            name = m.name
            if not name:
                name = anonymous_member_name(fields)
                entry["anonymous"] = True
            fields[name] = entry
        self.types.user_types[self._agg_name(t)] = {"kind": t.kind.lower(), "size": t.size, "fields": fields}

    def _size(self, type_id: int) -> int:
        t = self.btf.resolve(type_id)
        return t.size


# ---------------------------------------------------------------------------------------
# cross-check


def flat_members(types: dict[str, dict], name: str, base: int = 0, depth: int = 0) -> dict[str, tuple]:
    """member name -> (byte offset, bit position, bit length) of a user type, with the members
    of anonymous structs/unions brought up into it (the way C names them)."""
    out: dict[str, tuple] = {}
    entry = types.get(name)
    if entry is None or depth > 8:
        return out
    for member, f in entry["fields"].items():
        offset = base + f["offset"]
        t = f["type"]
        if f.get("anonymous"):
            out.update(flat_members(types, t.get("name", ""), offset, depth + 1))
        elif t.get("kind") == "bitfield":
            out[member] = (offset * 8 + t["bit_position"], t["bit_length"])
        else:
            out[member] = (offset * 8, 0)
    return out


def _compare(dwarf: dict[str, dict], btf: dict[str, dict], name: str, btf_name: str) -> list[str]:
    """How user type `name` of the DWARF differs from `btf_name` of the BTF ([] if not)."""
    d, b = dwarf[name], btf[btf_name]
    problems = []
    if d["kind"] != b["kind"]:
        problems.append(f"{d['kind']} {name}: a {b['kind']} in BTF")
    if d["size"] != b["size"]:
        problems.append(f"{d['kind']} {name}: size {d['size']} (DWARF) vs {b['size']} (BTF)")
    dm, bm = flat_members(dwarf, name), flat_members(btf, btf_name)
    for member in sorted(dm.keys() | bm.keys()):
        if member not in bm:
            problems.append(f"{d['kind']} {name}.{member}: only in DWARF")
        elif member not in dm:
            problems.append(f"{d['kind']} {name}.{member}: only in BTF")
        elif dm[member] != bm[member]:
            (dbit, dlen), (bbit, blen) = dm[member], bm[member]
            problems.append(f"{d['kind']} {name}.{member}: bit offset {dbit} (DWARF) vs {bbit} (BTF)"
                            + (f", bit length {dlen} vs {blen}" if dlen != blen else ""))
    return problems


def cross_check(dwarf: TypeSet, btf: TypeSet, alternatives: dict[str, list[str]]) -> tuple[int, list[str]]:
    """(types compared, disagreements) between the named user types and enums both sources have.
    A type agrees if any of BTF's definitions of that name matches it."""
    checked, problems = 0, []
    for name in sorted(dwarf.user_types):
        if name.startswith("unnamed_") or name not in btf.user_types:
            continue
        checked += 1
        candidates = [name, *alternatives.get(name, [])]
        results = [_compare(dwarf.user_types, btf.user_types, name, c) for c in candidates]
        if all(results):
            problems.extend(results[0][:MAX_DISAGREEMENTS_PER_TYPE])
            if len(results[0]) > MAX_DISAGREEMENTS_PER_TYPE:
                problems.append(f"{name}: {len(results[0]) - MAX_DISAGREEMENTS_PER_TYPE} more")
    for name in sorted(dwarf.enums):
        if name.startswith("unnamed_") or name not in btf.enums:
            continue
        d, b = dwarf.enums[name]["constants"], btf.enums[name]["constants"]
        wrong = [k for k in d.keys() & b.keys() if d[k] != b[k]]
        if wrong:
            problems.append(f"enum {name}: {', '.join(f'{k}={d[k]} (DWARF) vs {b[k]} (BTF)' for k in sorted(wrong)[:4])}")
    return checked, problems


# ---------------------------------------------------------------------------------------
# building the table


def _interface_source() -> bytes:
    return resources.files("hvkit.kernel").joinpath("files", INTERFACE).read_bytes()


def interface_object(tree: KernelTree, cache: Path) -> Path:
    """The compiled interface of `tree`, kept in the cache (<cache>/isf/<release>-<key>.o):
    the types the ISF is made from, and what drgn reads as its debug information
    (hvkit.forensics.drgn_support)."""
    key = hashlib.sha256(tree.config_hash().encode() + _interface_source()).hexdigest()[:16]
    kept = cache / "isf" / f"{tree.release}-{key}.o"
    if not kept.exists():
        kept.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="hvkit-isf-") as tmp:
            log.info("compiling the ISF interface against %s", tree.root)
            obj = compile_interface(tree, Path(tmp), _interface_source(), INTERFACE)
            staged = kept.with_suffix(".tmp")
            shutil.copyfile(obj, staged)
            staged.replace(kept)
    return kept


def _merge(dwarf: TypeSet, btf: TypeSet) -> dict:
    """user_types/enums/base_types: the DWARF's, and the BTF's for names the DWARF lacks;
    and a typedef of a struct or union (refcount_t, seqcount_t, gate_desc; kernel_cap_t
    before 6.3) as a user type of its own, the same as the one it names, unless a type
    has its name (dwarf2json writes typedefs of anonymous types only)."""
    user_types = {**btf.user_types, **dwarf.user_types}
    enums = {**btf.enums, **dwarf.enums}
    for name, target in {**btf.typedefs, **dwarf.typedefs}.items():
        if name not in user_types and name not in enums and target in user_types:
            user_types[name] = user_types[target]
    base_types = {**btf.base_types, **dwarf.base_types}
    for (size, signed), name in _INT_NAMES.items():  # enum bases must exist
        base_types.setdefault(name, base_type_entry(size, "int", signed))
    return {"user_types": user_types, "enums": enums, "base_types": base_types}


def _kallsyms_table_type(ctype: str, count: int | None) -> Desc:
    """The type of a kallsyms table as kernel/kallsyms_internal.h declares it (that header
    is not among the ones Debian ships, and the tables are assembly: no DWARF or BTF has them)."""
    base = {"kind": "base", "name": ctype}
    return base if count is None else {"kind": "array", "count": count, "subtype": base}


def _symbols(addresses: dict[str, int], banner: str, dwarf: TypeSet, btf: TypeSet,
             tables: dict[str, tuple[str, int | None]]) -> tuple[dict[str, dict], dict[str, int]]:
    symbols: dict[str, dict] = {name: {"address": address} for name, address in addresses.items()}
    sources = {"header": 0, "btf": 0, "private": 0, "kallsyms": 0, "void": 0}
    for name, entry in symbols.items():
        if name in tables:
            entry["type"] = _kallsyms_table_type(*tables[name])
            sources["kallsyms"] += 1
            continue
        desc, source = dwarf.variables.get(f"hvkit_v_{name}") or dwarf.variables.get(name), "header"
        if desc is None:
            desc, source = btf.variables.get(name), "btf"
        if desc is None:
            desc, source = dwarf.variables.get(f"hvkit_p_{name}"), "private"
        if desc is None:  # functions, linker symbols, static data: void, as dwarf2json does
            desc, source = VOID, "void"
        entry["type"] = desc
        sources[source] += 1
    if "linux_banner" in symbols:  # as dwarf2json writes it: the bytes with their NUL
        data = banner.encode("latin-1", "replace") + b"\0"
        symbols["linux_banner"]["constant_data"] = base64.b64encode(data).decode()
        symbols["linux_banner"]["type"] = {"kind": "array", "count": len(data),
                                           "subtype": {"kind": "base", "name": "char"}}
    return symbols, sources


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def isf_path(kernel_file: Path, tree: KernelTree, cache: Path) -> Path:
    """Where build_isf puts the table of this kernel file and tree."""
    key = hashlib.sha256(b"\0".join([_digest(kernel_file).encode(), tree.config_hash().encode(),
                                     _interface_source(), OUTPUT_FORMAT])).hexdigest()[:16]
    return cache / "isf" / f"{tree.release}-{key}.json.xz"


def _report_path(table: Path) -> Path:
    return table.with_name(table.name.removesuffix(".json.xz") + ".report.json")


def make_isf(kernel_file: Path, tree: KernelTree, cache: Path) -> IsfReport:
    """The ISF of `kernel_file` (a bzImage or vmlinux), with types from `tree` (its headers)
    and its BTF; from the cache when built before. Returns the report (report.path: the table)."""
    kernel_file = Path(kernel_file)
    image = read_kernel_image(kernel_file)
    if image.release != tree.release:
        raise HvkitError(f"the kernel file is release {image.release}, the headers are {tree.release}")
    path = isf_path(kernel_file, tree, cache)
    report_file = _report_path(path)
    if path.exists() and report_file.exists():
        report = IsfReport.from_json(json.loads(report_file.read_text()))
        report.path, report.cached, report.seconds = path, True, 0.0
        return report
    start = time.monotonic()
    symbols = load_symbols(kernel_file, cache, tree.config)
    dwarf, obj_digest = _interface_types(tree, cache)
    btf, alternatives = _btf_types(kernel_file, image.format, tree.release)
    checked, disagreements = cross_check(dwarf, btf, alternatives)
    table = {"metadata": _metadata(kernel_file, obj_digest), **_merge(dwarf, btf)}
    table["symbols"], typed = _symbols(symbols.addresses, symbols.banner, dwarf, btf, symbols.tables)
    _write(path, table)
    report = IsfReport(
        path=path, release=tree.release,
        user_types_dwarf=len(dwarf.user_types),
        user_types_btf=sum(1 for n in btf.user_types if n not in dwarf.user_types),
        enums_dwarf=len(dwarf.enums),
        enums_btf=sum(1 for n in table["enums"] if n not in dwarf.enums),
        base_types=len(table["base_types"]), symbols=len(table["symbols"]), typed_symbols=typed,
        checked=checked, disagreements=disagreements, seconds=round(time.monotonic() - start, 2))
    tmp = report_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=1))
    tmp.replace(report_file)
    return report


def _interface_types(tree: KernelTree, cache: Path) -> tuple[TypeSet, str]:
    """The types (and declared variables) of the compiled interface, and the object's sha256."""
    obj = interface_object(tree, cache)
    return DwarfReader(obj).read(), _digest(obj)


def _btf_types(kernel_file: Path, image_format: str, release: str) -> tuple[TypeSet, dict[str, list[str]]]:
    """The types of the kernel's BTF and, per name, its other definitions (see BtfConverter)."""
    elf = extract_vmlinux(kernel_file) if image_format == "bzImage" else kernel_file.read_bytes()
    btf = btf_of_vmlinux(elf)
    if btf is None:
        log.warning("kernel %s has no BTF: types private to its source files (struct mount, the "
                    "printk ring buffer, ...) are missing from its ISF", release)
        return TypeSet(), {}
    converter = BtfConverter(btf)
    return converter.read(), converter.alternatives


def build_isf(kernel_file: Path, tree: KernelTree, cache: Path) -> Path:
    """The path of the ISF (.json.xz) of `kernel_file`, built now or found in the cache."""
    return make_isf(kernel_file, tree, cache).path


def _metadata(kernel_file: Path, obj_digest: str) -> dict:
    return {
        "format": ISF_FORMAT,
        "producer": {"name": "hvkit", "version": hvkit.__version__,
                     "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat()},
        "linux": {
            "symbols": [{"kind": "symtab", "name": kernel_file.name, "hash_type": "sha256",
                         "hash_value": _digest(kernel_file)}],
            # the interface's DWARF; the BTF came from the kernel file listed under symbols
            "types": [{"kind": "dwarf", "name": "hvkit_isf.o", "hash_type": "sha256",
                       "hash_value": obj_digest}],
        },
    }


def _write(path: Path, table: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with lzma.open(tmp, "wt", preset=2) as f:
        json.dump(table, f, separators=(",", ":"))
    tmp.replace(path)


def volatility_symbol_dir(table: Path, where: Path) -> Path:
    """A directory to give Volatility as --symbol-dirs that holds just `table` (as
    <where>/linux/<table name>, a symlink), so its banner search sees no other table."""
    (where / "linux").mkdir(parents=True, exist_ok=True)
    link = where / "linux" / table.name
    if not link.is_symlink():
        link.symlink_to(table.resolve())
    return where
