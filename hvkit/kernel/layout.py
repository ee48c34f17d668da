"""Structure layouts and constants of one guest kernel, compiled, not hand-written.

build_layout() compiles files/hvkit_layout.c with the kernel's own build system against
a KernelTree and reads the object file: DWARF for the structures (every member, with
anonymous unions and structs flattened into their parent, the way C code names them)
and for enum values, ELF symbols `hvkit_c_*`/`hvkit_s_*` for macro constants and sizes.
The result is cached per kernel release, .config and interface source, so a second run
compiles nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from elftools.elf.elffile import ELFFile

from hvkit.errors import HvkitError
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

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Layout":
        structs = {k: StructLayout(**v) for k, v in data["structs"].items()}
        return cls(data["release"], data["config_hash"], structs, data["constants"])


def _interface_source() -> bytes:
    return resources.files("hvkit.kernel").joinpath("files", "hvkit_layout.c").read_bytes()


def _compile(tree: KernelTree, workdir: Path) -> Path:
    (workdir / "hvkit_layout.c").write_bytes(_interface_source())
    (workdir / "Kbuild").write_text("obj-m := hvkit_layout.o\n"
                                    "ccflags-y := -g -fno-eliminate-unused-debug-types\n")
    if shutil.which("make") is None:
        raise HvkitError("make is not installed; it runs the kernel's build system",
                         "apt-get install make")
    proc = subprocess.run(["make", "-C", str(tree.root), f"M={workdir}", "hvkit_layout.o"],
                          capture_output=True, text=True)
    obj = workdir / "hvkit_layout.o"
    if proc.returncode != 0 or not obj.exists():
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
        raise HvkitError(f"compiling the layout interface against {tree.root} failed: "
                         f"{(errors or proc.stderr.strip().splitlines() or ['no output'])[0]}",
                         "are these the headers of the guest's kernel, with their .config?")
    return obj


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


def _read_object(obj: Path) -> tuple[dict[str, StructLayout], dict[str, int]]:
    structs: dict[str, StructLayout] = {}
    constants: dict[str, int] = {}
    with obj.open("rb") as f:
        elf = ELFFile(f)
        for cu in elf.get_dwarf_info().iter_CUs():
            for die in cu.iter_DIEs():
                if die.tag == "DW_TAG_enumerator":
                    constants.setdefault(die.attributes["DW_AT_name"].value.decode(),
                                         die.attributes["DW_AT_const_value"].value)
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
    return structs, constants


def _cache_file(tree: KernelTree, cache: Path) -> Path:
    iface = hashlib.sha256(_interface_source()).hexdigest()[:12]
    return cache / "layouts" / f"{tree.release}-{tree.config_hash()}-{iface}.json"


def build_layout(tree: KernelTree, cache: Path) -> Layout:
    """The layout of `tree`'s kernel: from the cache, or compiled and read now."""
    cached = _cache_file(tree, cache)
    if cached.exists():
        return Layout.from_json(json.loads(cached.read_text()))
    log.info("compiling the layout interface against %s", tree.root)
    with tempfile.TemporaryDirectory(prefix="hvkit-layout-") as tmp:
        structs, constants = _read_object(_compile(tree, Path(tmp)))
    layout = Layout(tree.release, tree.config_hash(), structs, constants)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmpfile = cached.with_suffix(".tmp")
    tmpfile.write_text(json.dumps(layout.to_json(), indent=1, sort_keys=True))
    tmpfile.replace(cached)
    return layout
