"""drgn on a guest whose kernel has no debug package: hvkit supplies what drgn would
read from vmlinux's DWARF.

drgn opens a core with VMCOREINFO by itself (hvkit's VMs write one: `hvkit vm dump`),
and reads the kernel's symbols from the kallsyms tables in it. What it lacks without
the -dbg package is types. hvkit has them: the interface it compiles against the
kernel's own headers (hvkit.kernel.isf) is an object file with DWARF for every type
the headers define and a declaration of every global variable it names. That object is
handed to drgn as an extra module (it has no build ID, so it is forced), and a small
object finder turns a global's name into an object: its type from that declaration, its
address from kallsyms.
"""

from __future__ import annotations

from pathlib import Path

from elftools.elf.elffile import ELFFile

from hvkit.errors import HvkitError

MAX_TYPE_DEPTH = 16


def _name(die) -> str | None:
    attr = die.attributes.get("DW_AT_name")
    return attr.value.decode() if attr else None


def _type_of(die):
    return die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else None


def c_type_name(die, depth: int = 0) -> str | None:
    """The C name of the type DIE `die` in a form drgn's Program.type() parses
    ("struct task_struct", "char [64]", "struct list_head *"); None when it has none."""
    if die is None:
        return "void"
    if depth > MAX_TYPE_DEPTH:
        return None
    tag = die.tag
    if tag in ("DW_TAG_const_type", "DW_TAG_volatile_type", "DW_TAG_restrict_type"):
        return c_type_name(_type_of(die), depth + 1)
    if tag in ("DW_TAG_base_type", "DW_TAG_typedef"):
        return _name(die)
    kinds = {"DW_TAG_structure_type": "struct", "DW_TAG_union_type": "union", "DW_TAG_enumeration_type": "enum"}
    if tag in kinds:
        return f"{kinds[tag]} {_name(die)}" if _name(die) else None
    if tag == "DW_TAG_pointer_type":
        inner = c_type_name(_type_of(die), depth + 1)
        return None if inner is None or "[" in inner else f"{inner} *"
    if tag == "DW_TAG_array_type":
        inner = c_type_name(_type_of(die), depth + 1)
        if inner is None or "[" in inner:
            return None
        bounds = [c for c in die.iter_children() if c.tag == "DW_TAG_subrange_type"]
        upper = bounds[0].attributes.get("DW_AT_upper_bound") if bounds else None
        count = bounds[0].attributes.get("DW_AT_count") if bounds else None
        n = count.value if count else (upper.value + 1 if upper and isinstance(upper.value, int) else None)
        return f"{inner} [{n}]" if n else f"{inner} []"
    return None


def global_types(obj: Path) -> dict[str, str]:
    """{variable: C type name} of every global variable the object declares."""
    found: dict[str, str] = {}
    with obj.open("rb") as f:
        for cu in ELFFile(f).get_dwarf_info().iter_CUs():
            for die in cu.get_top_DIE().iter_children():
                if die.tag == "DW_TAG_variable" and "DW_AT_declaration" in die.attributes:
                    name, kind = _name(die), c_type_name(_type_of(die))
                    if name and kind and not name.startswith("hvkit_"):
                        found.setdefault(name, kind)
    return found


def open_core(core: Path, types_object: Path):
    """A drgn Program on the ELF core `core` (with VMCOREINFO), its types from hvkit's
    compiled interface `types_object` and its symbols from the kallsyms in the core."""
    try:
        import drgn
        from drgn.helpers.linux.kallsyms import load_vmlinux_kallsyms
    except ImportError:
        raise HvkitError("drgn is not installed", ".venv/bin/pip install drgn") from None
    prog = drgn.Program()
    try:
        prog.set_core_dump(str(core))
        prog.register_symbol_finder("kallsyms", load_vmlinux_kallsyms(prog), enable_index=0)
    except (drgn.FaultError, ValueError, LookupError, OSError) as e:
        raise HvkitError(f"drgn cannot open {core} as a Linux core ({e})",
                         "make it with 'hvkit vm dump' (it carries VMCOREINFO)") from None
    module = prog.extra_module("hvkit-interface", 0, create=True)
    module.try_file(str(types_object), force=True)
    types = global_types(types_object)

    def find_object(prog, name, flags, filename):
        kind = types.get(name)
        if kind is None or not flags & drgn.FindObjectFlags.VARIABLE:
            return None
        try:
            return drgn.Object(prog, prog.type(kind), address=prog.symbol(name).address)
        except LookupError:
            return None

    prog.register_object_finder("hvkit-globals", find_object, enable_index=0)
    return prog
