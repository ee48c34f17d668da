"""The types of an ISF (Volatility's symbol table), read from the two sources hvkit has
without a debug package: the DWARF of an interface compiled against the kernel's own
headers (DwarfReader) and the kernel's BTF (BtfConverter). Both give a TypeSet in ISF form;
isf.py checks one against the other, merges them and writes the table.

Where the sources leave a choice, the compiler's answer is taken: anonymous members named
`unnamed_field_<n>` counted per type (as dwarf2json 0.8.0 names them), bitfields placed from
DW_AT_data_bit_offset (DWARF 5) or BTF bit offsets, an enum's base type the one the compiler
gave it (DW_AT_type, BTF's kind flag), _Bool unsigned (C11 6.2.5: an unsigned integer type).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elftools.elf.elffile import ELFFile

from hvkit.errors import HvkitError
from hvkit.kernel.btf import QUALIFIERS, Btf, BtfType

MAX_DEPTH = 64         # type descriptors nest no deeper (pointer to array of pointer ...)

Desc = dict[str, Any]  # an ISF type descriptor, e.g. {"kind": "pointer", "subtype": {...}}
VOID: Desc = {"kind": "base", "name": "void"}

# ---------------------------------------------------------------------------------------
# the ISF pieces, shared by both type sources


def base_type_entry(size: int, kind: str, signed: bool) -> dict:
    """An ISF base_types entry (kind: int, char, bool, float or void)."""
    return {"size": size, "signed": signed, "kind": kind, "endian": "little"}


INT_NAMES = {(1, True): "signed char", (1, False): "unsigned char", (2, True): "short int",
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
    return {"size": size, "base": base or INT_NAMES.get((size, signed), "int"), "constants": values}


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
