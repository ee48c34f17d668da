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

import hvkit
from hvkit.errors import HvkitError
from hvkit.kernel.btf import btf_of_vmlinux
from hvkit.kernel.compile import compile_interface
from hvkit.kernel.headers import KernelTree
from hvkit.kernel.image import read_kernel_image
from hvkit.kernel.isftypes import (INT_NAMES, VOID, BtfConverter, Desc, DwarfReader, TypeSet,
                                   base_type_entry)
from hvkit.kernel.symbols import load_symbols
from hvkit.kernel.vmlinux import extract_vmlinux

log = logging.getLogger(__name__)

ISF_FORMAT = "6.2.0"   # the ISF version written: 6.2 reads anonymous struct/union members
OUTPUT_FORMAT = b"4"   # what build_isf writes; part of the cache key (3: every anonymous member kept, 4: the kallsyms tables)
INTERFACE = "hvkit_isf.c"
MAX_DISAGREEMENTS_PER_TYPE = 4



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
    for (size, signed), name in INT_NAMES.items():  # enum bases must exist
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
