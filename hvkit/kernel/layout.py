"""Structure layouts and constants of one guest kernel, compiled, not hand-written.

build_layout() compiles files/hvkit_layout.c with the kernel's own build system against
a KernelTree and reads the object file: DWARF for the structures (every member, with
anonymous unions and structs flattened into their parent, the way C code names them)
and for enum values (each also under its enum's name), ELF symbols `hvkit_c_*`/`hvkit_s_*`
for macro constants and sizes. PageEncoding tells from these how the kernel marks its
pages (page types, slab pages, free-block orders).
The result is cached per kernel release, .config and interface source, so a second run
compiles nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from elftools.elf.elffile import ELFFile

from hvkit.errors import HvkitError
from hvkit.kernel.compile import compile_interface
from hvkit.kernel.headers import KernelTree

log = logging.getLogger(__name__)

STRUCTS = ("page", "task_struct", "mm_struct", "vm_area_struct", "zone", "free_area",
           "pglist_data", "address_space", "list_head", "new_utsname")
_NESTING = 2  # named struct members are also listed as a.b, a.b.c


@dataclass
class StructLayout:
    size: int
    fields: dict[str, int] = field(default_factory=dict)  # member name -> byte offset


@dataclass
class Layout:
    release: str
    config_hash: str
    structs: dict[str, StructLayout]
    constants: dict[str, int]  # macros, sizes and enum values by name
    enums: dict[str, dict[str, int]] = field(default_factory=dict)  # named enum -> its members

    def offset(self, struct: str, member: str) -> int:
        try:
            return self.structs[struct].fields[member]
        except KeyError:
            raise HvkitError(f"kernel {self.release} has no member {member} in struct {struct}",
                             "this kernel version is not supported yet") from None

    def size(self, struct: str) -> int:
        return self.structs[struct].size

    def const(self, name: str) -> int:
        try:
            return self.constants[name]
        except KeyError:
            raise HvkitError(f"kernel {self.release} has no constant {name}") from None

    def enum(self, name: str) -> dict[str, int]:
        """The members of `enum name` ({} when the kernel has no such enum)."""
        return self.enums.get(name, {})

    def missing(self, *names: str) -> list[str]:
        """Those of `names` the compiled interface did not find."""
        return [n for n in names if n not in self.constants]

    def fixed_bases(self) -> dict[str, int]:
        """The region bases of a kernel without CONFIG_RANDOMIZE_MEMORY, by paging levels:
        {"page_offset_base_L4": ..., "vmemmap_base_L5": ...} (as many as the headers define)."""
        names = {"__PAGE_OFFSET_BASE": "page_offset_base", "__VMEMMAP_BASE": "vmemmap_base"}
        return {f"{name}_L{levels}": self.constants[f"{macro}_L{levels}"]
                for macro, name in names.items() for levels in (4, 5)
                if f"{macro}_L{levels}" in self.constants}

    def page_encoding(self) -> "PageEncoding":
        """How this kernel marks its pages (see PageEncoding.of)."""
        return PageEncoding.of(self)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Layout":
        structs = {k: StructLayout(**v) for k, v in data["structs"].items()}
        return cls(data["release"], data["config_hash"], structs, data["constants"], data.get("enums", {}))


@dataclass(frozen=True)
class TypeTest:
    """A page type as the kernel tests it: (page_type & mask) == value."""

    mask: int
    value: int


@dataclass(frozen=True)
class PageEncoding:
    """How one kernel marks its pages, decided from what its compiled interface found
    (never from its version number):

    - page types (buddy, table, offline, and slab where slab is one): as bits cleared
      under PAGE_TYPE_BASE (`(page_type & (PAGE_TYPE_BASE | PG_x)) == PAGE_TYPE_BASE`,
      the macros of Linux up to 6.10) or, where the kernel has `enum pagetype`, as the
      top byte of page_type (`page_type >> 24 == PGTY_x`, Linux 6.11 and later);
    - slab pages: the page flag PG_slab (enum pageflags) of the compound head, or the
      page type slab of the head (the macro PG_slab of 6.10, PGTY_slab);
    - free blocks: the order in `private` of the block's first page, at most
      free_orders - 1 (the length of struct zone's free_area array);
    - anonymous pages: the bit PAGE_MAPPING_ANON (FOLIO_MAPPING_ANON since 6.16) of the
      head's `mapping`, whose low bits (PAGE_/FOLIO_MAPPING_FLAGS) are flags, not address;
    - compound tails (bit 0 of the word after flags set): the rest is the head's
      struct page address (`compound_head`, and 7.x's `compound_info` in general), or a
      mask that turns the tail's own struct page address into its head's (7.x's
      `compound_info` where CONFIG_HUGETLB_PAGE_OPTIMIZE_VMEMMAP is on and struct page
      has a power-of-two size: compound_info_has_mask())."""

    scheme: str  # "PAGE_TYPE_BASE" or "enum pagetype": which the interface found
    types: dict[str, TypeTest]  # buddy, offline, table (and slab when it is a page type)
    slab_flag: int | None  # bit of PG_slab in page->flags, when slab is a flag
    free_orders: int  # free-block orders are 0 .. free_orders - 1
    mapping_anon: int = 1  # the bit of `mapping` that marks an anonymous page
    mapping_flags: int = 3  # the low bits of `mapping` that are flags
    compound_field: str = "compound_head"  # the struct page member that marks tails
    tail_mask: bool = False  # a tail's word is a mask over its own address, not a pointer

    REQUIRED = ("buddy", "offline", "table")

    @classmethod
    def of(cls, layout: Layout) -> "PageEncoding":
        if "PAGE_TYPE_BASE" in layout.constants:
            return cls._compound(layout, cls._cleared_bits(layout))
        if layout.enum("pagetype"):
            return cls._compound(layout, cls._top_byte(layout))
        raise HvkitError(f"kernel {layout.release}: the compiled interface finds neither the constant "
                         "PAGE_TYPE_BASE nor enum pagetype, so how it marks free pages is unknown",
                         "this kernel's page types are not supported yet")

    @classmethod
    def _cleared_bits(cls, layout: Layout) -> "PageEncoding":
        names = [f"PG_{t}" for t in cls.REQUIRED]
        cls._require(layout, ["PAGE_TYPE_BASE", *names], "page types under PAGE_TYPE_BASE")
        base = layout.const("PAGE_TYPE_BASE") & 0xFFFFFFFF
        types = {t: TypeTest(base | layout.const(n), base) for t, n in zip(cls.REQUIRED, names)}
        slab_flag = None
        if "PAGE_TYPE_PG_slab" in layout.constants:  # the macro PG_slab: a page type (6.10)
            types["slab"] = TypeTest(base | layout.const("PAGE_TYPE_PG_slab"), base)
        else:
            slab_flag = cls._slab_flag(layout)
        return cls("PAGE_TYPE_BASE", types, slab_flag, cls._free_orders(layout))

    @classmethod
    def _top_byte(cls, layout: Layout) -> "PageEncoding":
        members = layout.enum("pagetype")
        missing = [f"PGTY_{t}" for t in cls.REQUIRED if f"PGTY_{t}" not in members]
        if missing:
            raise HvkitError(f"kernel {layout.release}: enum pagetype has no {', '.join(missing)}",
                             "this kernel's page types are not supported yet")
        width = 8 * layout.constants.get("HVKIT_PAGE_TYPE_BYTES", 4)
        shift = layout.constants.get("PAGE_TYPE_SHIFT", width - 8)  # the type is page_type's top byte
        mask = ((1 << width) - 1) & ~((1 << shift) - 1)
        types = {t: TypeTest(mask, members[f"PGTY_{t}"] << shift) for t in cls.REQUIRED}
        slab_flag = None
        if "PGTY_slab" in members:
            types["slab"] = TypeTest(mask, members["PGTY_slab"] << shift)
        else:
            slab_flag = cls._slab_flag(layout)
        return cls("enum pagetype", types, slab_flag, cls._free_orders(layout))

    @staticmethod
    def _mapping_bits(layout: Layout) -> tuple[int, int]:
        """(anonymous bit, flag bits) of page->mapping, by whichever names the kernel has."""
        c = layout.constants
        for anon, flags, movable in (("PAGE_MAPPING_ANON", "PAGE_MAPPING_FLAGS", "PAGE_MAPPING_MOVABLE"),
                                     ("FOLIO_MAPPING_ANON", "FOLIO_MAPPING_FLAGS", None)):
            if anon in c:
                return c[anon], c.get(flags, c[anon] | c.get(movable or "", 0))
        raise HvkitError(f"kernel {layout.release} has no constant PAGE_MAPPING_ANON or FOLIO_MAPPING_ANON "
                         "(how page->mapping marks anonymous memory)",
                         "this kernel's struct page is not supported yet")

    @classmethod
    def _compound(cls, layout: Layout, enc: "PageEncoding") -> "PageEncoding":
        anon, flags = cls._mapping_bits(layout)
        enc = dataclasses.replace(enc, mapping_anon=anon, mapping_flags=flags)
        fields = layout.structs["page"].fields
        if "compound_head" in fields:
            return enc
        if "compound_info" not in fields:
            raise HvkitError(f"kernel {layout.release}: struct page has neither compound_head nor "
                             "compound_info, so compound pages cannot be told apart",
                             "this kernel's struct page is not supported yet")
        size = layout.size("page")
        mask = "HVKIT_HUGETLB_PAGE_OPTIMIZE_VMEMMAP" in layout.constants and size & (size - 1) == 0
        return dataclasses.replace(enc, compound_field="compound_info", tail_mask=mask)

    @staticmethod
    def _require(layout: Layout, names: list[str], what: str) -> None:
        missing = layout.missing(*names)
        if missing:
            raise HvkitError(f"kernel {layout.release} has no constant {', '.join(missing)} ({what})",
                             "this kernel's page types are not supported yet")

    @staticmethod
    def _slab_flag(layout: Layout) -> int:
        flags = layout.enum("pageflags")
        if "PG_slab" not in flags:
            raise HvkitError(f"kernel {layout.release} marks slab pages neither with the page flag PG_slab "
                             "(enum pageflags) nor with a page type (PG_slab, PGTY_slab)",
                             "this kernel's page types are not supported yet")
        return flags["PG_slab"]

    @staticmethod
    def _free_orders(layout: Layout) -> int:
        """The number of free lists per zone. From the array itself; a layout without it
        falls back on the names of its bound (NR_PAGE_ORDERS and MAX_PAGE_ORDER count
        unambiguously; MAX_ORDER meant the count before 6.4, the highest order after)."""
        c = layout.constants
        if "HVKIT_FREE_AREAS" in c:
            return c["HVKIT_FREE_AREAS"]
        if "NR_PAGE_ORDERS" in c:
            return c["NR_PAGE_ORDERS"]
        if "MAX_PAGE_ORDER" in c:
            return c["MAX_PAGE_ORDER"] + 1
        raise HvkitError(f"kernel {layout.release} has no constant HVKIT_FREE_AREAS, NR_PAGE_ORDERS or "
                         "MAX_PAGE_ORDER (the number of free-block orders)",
                         "this kernel's free lists are not supported yet")


def _interface_source() -> bytes:
    return resources.files("hvkit.kernel").joinpath("files", "hvkit_layout.c").read_bytes()


def _strip(die):
    """Follows typedefs and qualifiers to the underlying type DIE."""
    for _ in range(16):
        if die is None or die.tag not in ("DW_TAG_typedef", "DW_TAG_const_type",
                                          "DW_TAG_volatile_type"):
            return die
        die = die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else None
    return die


def _members(die, base: int, prefix: str, depth: int, out: dict[str, int]) -> None:
    for child in die.iter_children():
        if child.tag != "DW_TAG_member":
            continue
        loc = child.attributes.get("DW_AT_data_member_location")
        offset = base + (loc.value if loc is not None and isinstance(loc.value, int) else 0)
        name_attr = child.attributes.get("DW_AT_name")
        kind = _strip(child.get_DIE_from_attribute("DW_AT_type")) if "DW_AT_type" in child.attributes else None
        aggregate = kind is not None and kind.tag in ("DW_TAG_structure_type", "DW_TAG_union_type")
        if name_attr is None:
            if aggregate:  # anonymous struct/union: its members belong to the parent
                _members(kind, offset, prefix, depth, out)
            continue
        name = prefix + name_attr.value.decode()
        out.setdefault(name, offset)
        if aggregate and depth > 0:
            _members(kind, offset, name + ".", depth - 1, out)


def _enum(die) -> tuple[str | None, dict[str, int]]:
    """(name or None, members) of an enumeration type DIE."""
    name = die.attributes["DW_AT_name"].value.decode() if "DW_AT_name" in die.attributes else None
    members = {c.attributes["DW_AT_name"].value.decode(): c.attributes["DW_AT_const_value"].value
               for c in die.iter_children() if c.tag == "DW_TAG_enumerator"}
    return name, members


def _read_object(obj: Path) -> tuple[dict[str, StructLayout], dict[str, int], dict[str, dict[str, int]]]:
    structs: dict[str, StructLayout] = {}
    constants: dict[str, int] = {}
    enums: dict[str, dict[str, int]] = {}
    with obj.open("rb") as f:
        elf = ELFFile(f)
        for cu in elf.get_dwarf_info().iter_CUs():
            for die in cu.iter_DIEs():
                if die.tag == "DW_TAG_enumeration_type":
                    name, members = _enum(die)
                    for member, value in members.items():
                        constants.setdefault(member, value)
                    if name and members:
                        enums.setdefault(name, members)
                elif (die.tag == "DW_TAG_structure_type" and "DW_AT_byte_size" in die.attributes
                      and "DW_AT_name" in die.attributes):
                    name = die.attributes["DW_AT_name"].value.decode()
                    if name in STRUCTS and name not in structs:
                        layout = StructLayout(die.attributes["DW_AT_byte_size"].value)
                        _members(die, 0, "", _NESTING, layout.fields)
                        structs[name] = layout
        symtab = elf.get_section_by_name(".symtab")
        for sym in symtab.iter_symbols():
            if sym.name.startswith(("hvkit_c_", "hvkit_s_")) and sym["st_size"] == 8:
                section = elf.get_section(sym["st_shndx"])
                raw = section.data()[sym["st_value"] : sym["st_value"] + 8]
                key = sym.name[8:] if sym.name.startswith("hvkit_c_") else f"sizeof({sym.name[8:]})"
                constants[key] = int.from_bytes(raw, "little")
    missing = [s for s in STRUCTS if s not in structs]
    if missing:
        raise HvkitError(f"the compiled interface has no DWARF for struct {', '.join(missing)}")
    for name, layout in structs.items():  # DWARF and sizeof() must agree
        if constants.get(f"sizeof({name})", layout.size) != layout.size:
            raise HvkitError(f"struct {name}: DWARF and sizeof disagree")
    return structs, constants, enums


LAYOUT_FORMAT = b"2"  # what a cached layout holds (2: enums by name); part of its cache key


def _cache_file(tree: KernelTree, cache: Path) -> Path:
    iface = hashlib.sha256(_interface_source() + LAYOUT_FORMAT).hexdigest()[:12]
    return cache / "layouts" / f"{tree.release}-{tree.config_hash()}-{iface}.json"


def build_layout(tree: KernelTree, cache: Path) -> Layout:
    """The layout of `tree`'s kernel: from the cache, or compiled and read now."""
    cached = _cache_file(tree, cache)
    if cached.exists():
        return Layout.from_json(json.loads(cached.read_text()))
    log.info("compiling the layout interface against %s", tree.root)
    with tempfile.TemporaryDirectory(prefix="hvkit-layout-") as tmp:
        obj = compile_interface(tree, Path(tmp), _interface_source(), "hvkit_layout.c",
                                flags=("-fno-eliminate-unused-debug-types",))
        structs, constants, enums = _read_object(obj)
    layout = Layout(tree.release, tree.config_hash(), structs, constants, enums)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmpfile = cached.with_suffix(".tmp")
    tmpfile.write_text(json.dumps(layout.to_json(), indent=1, sort_keys=True))
    tmpfile.replace(cached)
    return layout
