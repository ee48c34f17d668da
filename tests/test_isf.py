"""Volatility 3 symbol tables made by hvkit (hvkit/kernel/isf.py, btf.py): the BTF reader on
hostile input and on the real kernel, the table against Volatility's own schema, and real
`vol` runs on a paused copy of a real guest's RAM, compared with the guest's own view."""

from __future__ import annotations

import base64
import collections
import json
import lzma
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hvkit.errors import HvkitError
from hvkit.kernel.btf import btf_of_vmlinux, read_btf
from hvkit.kernel.headers import debian_tree
from hvkit.kernel.isf import flat_members, make_isf, volatility_symbol_dir
from hvkit.kernel.symbols import load_symbols
from hvkit.kernel.vmlinux import extract_vmlinux
from hvkit.guest.control import ground_truth

# plugins that must run clean on the default guest (a busybox system: no bash, no network
# sockets beyond the kernel's own, no framebuffer). Not here: linux.sockscan (Volatility 2.28
# dereferences None on a stale scan hit); linux.malware.hidden_modules runs as hvkit's
# version of it (see _check_pages_and_hidden_modules).
PLUGINS = [
    "linux.pslist.PsList", "linux.pstree.PsTree", "linux.psaux.PsAux", "linux.psscan.PsScan",
    "linux.pidhashtable.PIDHashTable", "linux.kthreads.Kthreads", "linux.envars.Envars",
    "linux.elfs.Elfs", "linux.proc.Maps", "linux.library_list.LibraryList", "linux.lsof.Lsof",
    "linux.mountinfo.MountInfo", "linux.pagecache.Files", "linux.lsmod.Lsmod", "linux.kmsg.Kmsg",
    "linux.bash.Bash", "linux.capabilities.Capabilities", "linux.sockstat.Sockstat",
    "linux.ip.Link", "linux.iomem.IOMem", "linux.boottime.Boottime",
    "linux.malware.check_syscall.Check_syscall", "linux.malware.check_idt.Check_idt",
    "linux.malware.check_modules.Check_modules", "linux.malware.check_creds.Check_creds",
    "linux.malware.check_afinfo.Check_afinfo", "linux.malware.tty_check.Tty_Check",
    "linux.malware.keyboard_notifiers.Keyboard_notifiers", "linux.malware.malfind.Malfind",
    "linux.malware.netfilter.Netfilter", "linux.tracing.tracepoints.CheckTracepoints",
    "linux.kallsyms.Kallsyms", "linux.pscallstack.PsCallStack",
]
LISTEN_PORT = 7777  # the guest listens here (hvkit.listen): something for sockstat to find

# 6.12: those held to the guest's own view, kallsyms and pscallstack, and a few checks (CI time:
# the 6.1 guest runs them all; on 6.12 the whole list of 6.1 less psscan, malfind and elfs ran
# clean in CI until December 2026)
PLUGINS_612 = ["linux.pslist.PsList", "linux.psaux.PsAux", "linux.envars.Envars", "linux.lsof.Lsof",
               "linux.mountinfo.MountInfo", "linux.lsmod.Lsmod", "linux.kmsg.Kmsg", "linux.sockstat.Sockstat",
               "linux.pagecache.Files", "linux.kallsyms.Kallsyms", "linux.pscallstack.PsCallStack",
               "linux.malware.check_syscall.Check_syscall", "linux.malware.check_modules.Check_modules",
               "linux.malware.check_creds.Check_creds"]
# unstable's newest (7.2): those held to the guest's own view, and a few checks. Volatility 2.28
# does not know three changes of 7.x, whatever the table: linux.lsmod (and what uses it) reads
# struct taint_flag's `module`, which 7.x removed; linux.kallsyms and pscallstack need
# kallsyms_relative_base, gone with 7.x's place-relative offsets; linux.boottime needs `tk_core`,
# which 7.x renamed ("Unsupported")
PLUGINS_SID = ["linux.pslist.PsList", "linux.psaux.PsAux", "linux.envars.Envars", "linux.lsof.Lsof",
               "linux.mountinfo.MountInfo", "linux.kmsg.Kmsg", "linux.sockstat.Sockstat",
               "linux.pagecache.Files", "linux.malware.check_syscall.Check_syscall",
               "linux.malware.check_idt.Check_idt", "linux.malware.check_creds.Check_creds"]


# --- BTF on hostile input ------------------------------------------------------------------

def _btf(types: bytes, strings: bytes = b"\0int\0", hdr_len: int = 24) -> bytes:
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, hdr_len, 0, len(types), len(types), len(strings))
    return header + types + strings


def test_btf_reads_a_small_blob():
    int_type = struct.pack("<III", 1, 1 << 24, 4) + struct.pack("<I", (1 << 24) | 32)  # signed int
    ptr = struct.pack("<III", 0, 2 << 24, 1)
    btf = read_btf(_btf(int_type + ptr))
    assert [t.kind for t in btf.types] == ["VOID", "INT", "PTR"]
    assert btf.types[1].name == "int" and btf.types[1].signed and btf.types[1].size == 4
    assert btf.resolve(2).kind == "PTR"


@pytest.mark.parametrize("blob", [
    b"",                                                   # empty
    b"\x9f\xeb\x01\x00" + b"\0" * 20,                     # header only, lengths 0 but hdr_len 0
    _btf(struct.pack("<III", 1, 1 << 24, 4)),              # INT without its encoding word
    _btf(struct.pack("<III", 999, 2 << 24, 0)),            # name offset outside the strings
    _btf(struct.pack("<III", 0, 31 << 24, 0)),             # unknown kind
    _btf(struct.pack("<III", 0, (4 << 24) | 5, 8)),        # struct claiming 5 members, none there
    _btf(b"", hdr_len=1000),                               # header length past the data
    struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, 1 << 30, 0, 0),  # type section past the data
    struct.pack("<HBBIIIII", 0x9FEB, 1, 0, 24, 0, 0, 0, 0),        # big-endian / wrong magic
])
def test_btf_rejects_malformed_data(blob):
    with pytest.raises(HvkitError):
        read_btf(blob)


def test_btf_type_ids_checked():
    ptr = struct.pack("<III", 0, 2 << 24, 12345)  # a pointer to a type that does not exist
    with pytest.raises(HvkitError, match="does not exist"):
        read_btf(_btf(ptr))
    loop = struct.pack("<III", 0, 8 << 24, 1)  # a typedef of itself: resolving it ends
    btf = read_btf(_btf(loop))
    with pytest.raises(HvkitError, match="too long"):
        btf.resolve(1)


# --- the real kernel -------------------------------------------------------------------------

@pytest.fixture(scope="session")
def isf(guest, paths):
    tree = debian_tree(guest.release, paths.cache)
    return make_isf(guest.kernel, tree, paths.cache)


@pytest.fixture(scope="session")
def table(isf):
    with lzma.open(isf.path, "rt") as f:
        return json.load(f)


def test_btf_of_the_guest_kernel_has_its_private_types(guest):
    btf = btf_of_vmlinux(extract_vmlinux(guest.kernel))
    assert btf is not None
    for kind, name in [("struct", "mount"), ("struct", "printk_ringbuffer"), ("struct", "prb_desc"),
                       ("struct", "task_struct"), ("union", "bpf_attr"), ("enum", "pid_type")]:
        assert btf.named(kind, name), (kind, name)
    (mount,) = btf.named("struct", "mount")
    assert {"mnt", "mnt_parent", "mnt_mountpoint"} <= {m.name for m in mount.members}


def test_isf_matches_volatility_schema(table):
    schemas = pytest.importorskip("volatility3.schemas")
    assert schemas.validate(table, use_cache=False)


def test_isf_has_types_from_both_sources_that_agree(isf, table):
    assert isf.user_types_dwarf > 1000 and isf.user_types_btf > 1000
    assert isf.checked > 1000
    assert isf.disagreements == []
    for name in ("task_struct", "mm_struct", "mount", "printk_ringbuffer", "prb_desc", "module",
                 "sock", "inet_sock", "unix_sock", "files_struct", "fdtable", "cred", "pid",
                 "nsproxy", "vfsmount", "dentry", "inode", "super_block"):
        assert name in table["user_types"], name
    # anonymous unions are flattened the way C names their members
    assert "comm" in flat_members(table["user_types"], "task_struct")
    assert "__state" in flat_members(table["user_types"], "task_struct")


def test_isf_symbols_are_the_kernels(isf, table, guest, paths):
    symbols = load_symbols(guest.kernel, paths.cache, guest.config)
    assert len(table["symbols"]) == len(symbols.addresses)
    assert table["symbols"]["init_task"]["address"] == symbols["init_task"]
    assert table["symbols"]["init_task"]["type"] == {"kind": "struct", "name": "task_struct"}
    assert table["symbols"]["prb"]["type"]["subtype"]["name"] == "printk_ringbuffer"
    banner = base64.b64decode(table["symbols"]["linux_banner"]["constant_data"])
    assert banner == symbols.banner.encode() + b"\0"


def test_isf_second_build_is_cached(isf, guest, paths):
    again = make_isf(guest.kernel, debian_tree(guest.release, paths.cache), paths.cache)
    assert again.cached and again.path == isf.path



def _btf_members(btf, t, depth: int = 0) -> set[str]:
    """The member names of BTF struct/union `t`, those of its anonymous members brought up."""
    names: set[str] = set()
    for m in t.members:
        if m.name:
            names.add(m.name)
        elif depth < 8:
            names |= _btf_members(btf, btf.resolve(m.type), depth + 1)
    return names


def test_isf_keeps_every_anonymous_member(table, guest):
    """A union of anonymous structs (struct page, maple_node, ...) keeps each of them: the
    anonymous members have names of their own (as dwarf2json gives them), and no named
    type of the table lacks a member the kernel's BTF gives it (a member reachable
    through anonymous structs/unions counts, as C and Volatility reach it)."""
    user_types = table["user_types"]
    page = flat_members(user_types, "page")
    assert {"flags", "mapping", "index", "lru", "private", "compound_head", "_refcount"} <= page.keys()
    assert page["mapping"][0] == 24 * 8 and page["lru"][0] == 8 * 8  # bit offsets, x86-64
    assert {"parent", "slot"} <= flat_members(user_types, "maple_node").keys()
    anonymous = [f for f in user_types["page"]["fields"].values() if f.get("anonymous")]
    assert anonymous and all(f["type"]["name"] in user_types for f in anonymous)
    assert _lacking_members(user_types, guest.kernel) == {}


def _lacking_members(user_types: dict, kernel: Path) -> dict[str, list[str]]:
    """Named types of the table that lack a member the kernel's BTF gives them."""
    btf = btf_of_vmlinux(extract_vmlinux(kernel))
    lacking = {}
    for name, entry in user_types.items():
        if name.startswith("unnamed_"):
            continue
        definitions = btf.named(entry["kind"], name)
        have = flat_members(user_types, name).keys()
        missing = [sorted(_btf_members(btf, d) - have) for d in definitions]
        if missing and all(missing):
            lacking[name] = missing[0]
    return lacking


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the first run compiles the interface (unstable's in its own build root)
@pytest.mark.parametrize("package", ["linux-image-6.12.117+deb12-cloud-amd64", "linux-image-cloud-amd64/sid"],
                         ids=["6.12", "sid"])
def test_no_type_of_other_kernels_lacks_a_member_of_their_btf(package, paths):
    from hvkit.guest import build_kernel_guest

    g = build_kernel_guest(paths, package)
    report = make_isf(g.kernel, debian_tree(g.release, paths.cache), paths.cache)
    with lzma.open(report.path, "rt") as f:
        user_types = json.load(f)["user_types"]
    assert {"mapping", "lru", "private"} <= flat_members(user_types, "page").keys()  # 7.x: no `index`
    assert _lacking_members(user_types, g.kernel) == {}


def test_isf_has_the_kernels_typedef_names(table):
    """Typedefs of named structs are types of their own too, as the kernel's code names them."""
    user_types = table["user_types"]
    for typedef, named in [("refcount_t", "refcount_struct"), ("seqcount_t", "seqcount"),
                           ("gate_desc", "gate_struct"), ("kernel_cap_t", "kernel_cap_struct")]:
        assert typedef in user_types, typedef
        if named in user_types:  # kernel_cap_t names an anonymous struct since 6.3
            assert user_types[typedef] == user_types[named], typedef


def _named_enums_of(obj: Path) -> list[str]:
    """The enums the compiled interface declares with a name of their own (read with
    pyelftools here, not with hvkit's reader)."""
    from elftools.elf.elffile import ELFFile

    names = set()
    with obj.open("rb") as f:
        for cu in ELFFile(f).get_dwarf_info().iter_CUs():
            for die in cu.iter_DIEs():
                if (die.tag == "DW_TAG_enumeration_type" and "DW_AT_name" in die.attributes
                        and "DW_AT_declaration" not in die.attributes):
                    names.add(die.attributes["DW_AT_name"].value.decode())
    return sorted(names)


def test_isf_signedness_is_the_compilers(table, guest, paths, tmp_path):
    """Whether each named enum and _Bool is signed, as the compiler itself evaluates it
    against the kernel's headers (`(enum X)-1 < 0`, compiled by the kernel's build system
    into an array read back from the object), is what the table's base types say. (dwarf2json
    differs on two counts: it reads enum constants as int64, so an enum holding 1 << 63 comes
    out signed, and it writes _Bool as signed.)"""
    from elftools.elf.elffile import ELFFile

    from hvkit.kernel.compile import compile_interface
    from hvkit.kernel.isf import _interface_source, interface_object

    tree = debian_tree(guest.release, paths.cache)
    enums = [n for n in _named_enums_of(interface_object(tree, paths.cache)) if n in table["enums"]]
    assert len(enums) > 500
    probes = [f"(enum {n})-1 < 0" for n in enums] + ["(_Bool)-1 < 0"]
    source = _interface_source() + ("\nconst unsigned char hvkit_signed[] __attribute__((used)) = {\n"
                                    + ",\n".join(probes) + "\n};\n").encode()
    obj = compile_interface(tree, tmp_path, source, "hvkit_signed.c", flags=("-O0",))
    with obj.open("rb") as f:
        elf = ELFFile(f)
        (sym,) = [s for s in elf.get_section_by_name(".symtab").iter_symbols() if s.name == "hvkit_signed"]
        section = elf.get_section(sym["st_shndx"])
        compiled = list(section.data()[sym["st_value"] : sym["st_value"] + len(probes)])
    bases = table["base_types"]
    said = [bases[table["enums"][n]["base"]]["signed"] for n in enums] + [bases["_Bool"]["signed"]]
    wrong = [(p, bool(c), s) for p, c, s in zip(probes, compiled, said) if bool(c) != s]
    assert wrong == []
    assert 0 < sum(compiled) < len(enums)  # both kinds are there
    assert not bases["_Bool"]["signed"] and any(table["enums"][n]["size"] == 8 for n in enums)


# --- Volatility on a real guest ----------------------------------------------------------------

def _vol(symbols: Path, raw: Path, cache: Path, plugin: str, *args: str,
         out: Path | None = None) -> subprocess.CompletedProcess:
    from hvkit.cli.forensics import volatility_plugin_dir

    vol = Path(sys.executable).with_name("vol")
    return subprocess.run([str(vol), "-q", "-r", "json", "--offline", "--cache-path", str(cache),
                           "-p", str(volatility_plugin_dir()), *(["-o", str(out)] if out else []),
                           "-s", str(symbols), "-f", str(raw), plugin, *args],
                          capture_output=True, text=True, timeout=900)


def _vol_batches(symbols: Path, raw: Path, cache: Path, plugins: list[str],
                 out: Path) -> dict[str, subprocess.CompletedProcess]:
    """Each plugin's run, as `_vol` gives it: the plugins in two processes side by side
    (volbatch.py: the kernel found once per process, not once per plugin, which is most
    of a run's time on a small guest); a plugin that fails there runs again alone in
    `vol`, whose run is the one that counts (Volatility's own CLI is the reference)."""
    from hvkit.cli.forensics import volatility_plugin_dir

    batch = Path(__file__).with_name("volbatch.py")
    halves = [plugins[0::2], plugins[1::2]]
    procs = []
    for i, half in enumerate(halves):
        (out / str(i)).mkdir(parents=True)
        procs.append(subprocess.Popen([sys.executable, str(batch), str(symbols), str(raw), str(cache),
                                       str(volatility_plugin_dir()), str(out / str(i)), *half],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        assert proc.wait(timeout=1200) == 0, proc.stderr.read()
    runs = {}
    for i, half in enumerate(halves):
        for plugin in half:
            done = out / str(i) / f"{plugin}.json"
            runs[plugin] = (subprocess.CompletedProcess([plugin], 0, done.read_text(), "") if done.exists()
                            else _vol(symbols, raw, cache, plugin))
    return runs


def _why(proc: subprocess.CompletedProcess) -> str:
    """What went wrong in a failed `vol` run, in one line: the last line of its stderr that
    names something (vol's own explanation, an argument error, an exception's last line),
    not its banner, hints or closing words."""
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    named = [line for line in lines if ":" in line and not line.startswith(("Volatility 3 Framework", "*"))]
    return (named or lines or ["?"])[-1][:300]


def _dump(vm, dest: Path) -> Path:
    vm.pause()
    try:
        shutil.copyfile(vm.ram_path, dest)
    finally:
        vm.resume()
    return dest


def _rows(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _check_guest(vm, isf, tmp_path, plugins, release: str) -> None:
    """Every plugin runs clean on a paused copy of the guest's RAM; what pslist, lsmod,
    mountinfo, envars and lsof find is what the guest's own /proc says: its processes,
    its modules, the mounts of every namespace, every process's environment and open files (the
    processes that lived through both looks); kmsg has its kernel's banner and
    sockstat its listening socket."""
    pytest.importorskip("volatility3")
    symbols = volatility_symbol_dir(isf.path, tmp_path / "symbols")
    cache = tmp_path / "volcache"
    cache.mkdir()
    truth = ground_truth(vm)
    raw = _dump(vm, tmp_path / "ram.raw")
    runs = _vol_batches(symbols, raw, cache, plugins, tmp_path / "batches")
    failed = {plugin: _why(proc) for plugin, proc in runs.items()
              if proc.returncode != 0 or "Traceback" in proc.stderr or "Unsatisfied" in proc.stderr}
    assert not failed, "plugins failed in vol:\n" + "\n".join(f"  {p}: {why}" for p, why in failed.items())
    assert {row["PID"] for row in _rows(runs["linux.pslist.PsList"])} == {p.pid for p in truth.processes}
    if "linux.lsmod.Lsmod" in runs:
        modules = {row["Module Name"] for row in _rows(runs["linux.lsmod.Lsmod"])}
        assert modules == set(truth.modules) and "qemu_fw_cfg" in modules  # init loads it at every boot
    mounts = {(row["MOUNT_POINT"], row["FSTYPE"]) for row in _rows(runs["linux.mountinfo.MountInfo"])}
    # 7.x: a namespace's first mount is an empty nullfs with the root file system mounted over
    # it; Volatility lists every mount of the namespace, /proc/PID/mountinfo only those at or
    # under the process's root, which is on top of it
    mounts.discard(("/", "nullfs"))
    assert mounts == set(truth.mounts) and ("/tmp", "tmpfs") in mounts
    assert any(row["line"].startswith(f"Linux version {release} ") for row in _rows(runs["linux.kmsg.Kmsg"]))
    # processes that lived through both looks (the guest's export, then the copy of its memory)
    both = {p.pid for p in truth.processes} & {row["PID"] for row in _rows(runs["linux.pslist.PsList"])}
    env: dict[int, dict[str, str]] = {}
    for row in _rows(runs["linux.envars.Envars"]):
        env.setdefault(row["PID"], {})[row["KEY"]] = row["VALUE"]
    assert {pid: e for pid, e in env.items() if pid in both} == {
        pid: e for pid, e in truth.environ.items() if pid in both and e}
    assert env[1]["HOME"] == "/" and any(e.get("HVKIT_GUEST") == "1" for pid, e in env.items() if pid != 1)
    files = {(row["PID"], row["FD"], row["Path"]) for row in _rows(runs["linux.lsof.Lsof"])
             if row["PID"] in both and str(row["Path"]).startswith("/")}
    truth_files = {(pid, fd, path) for pid, fds in truth.open_files.items() if pid in both
                   for fd, path in fds.items() if path.startswith("/")}

    def standard(found):  # init's shell points fd 0 or 1 at the control port while it reads a
        # request or writes the export: which one is which depends on the moment, not the set
        return {(pid, frozenset(p for q, fd, p in found if q == pid and fd <= 2)) for pid, _, _ in found}

    assert {f for f in files if f[1] > 2} == {f for f in truth_files if f[1] > 2}
    assert standard(files) == standard(truth_files)
    assert (1, "/dev/ttyS1") in {(pid, path) for pid, _, path in files}
    listening = [row for row in _rows(runs["linux.sockstat.Sockstat"])
                 if str(row.get("Source Port")) == str(LISTEN_PORT) and row.get("State") == "LISTEN"]
    assert listening, "the guest's listening socket"
    if "linux.kallsyms.Kallsyms" in runs:
        _check_kallsyms(runs, isf)


def _check_kallsyms(runs: dict, isf) -> None:
    """linux.kallsyms reads the kernel's own kallsyms through the tables hvkit located: every
    core symbol, each at hvkit's address plus one KASLR slide; linux.pscallstack names the
    functions the tasks sleep in."""
    with lzma.open(isf.path, "rt") as f:
        symbols = json.load(f)["symbols"]
    core = [row for row in _rows(runs["linux.kallsyms.Kallsyms"]) if row["ModuleName"] == "kernel"]
    assert len(core) == symbols["kallsyms_offsets"]["type"]["count"]  # kallsyms_num_syms
    once = {n for n, c in collections.Counter(row["SymbolName"] for row in core).items() if c == 1}
    mask = (1 << 48) - 1  # Volatility prints addresses masked to the layer's 48 bits
    slides = {(row["Addr"] - symbols[row["SymbolName"]]["address"]) & mask for row in core
              if row["SymbolName"] in once and row["Type"] not in "Aa"}  # absolute (per-CPU) ones do not move
    assert len(slides) == 1, f"{len(slides)} different offsets between Volatility's and hvkit's addresses"
    frames = {row["Name"] for row in _rows(runs["linux.pscallstack.PsCallStack"])}
    assert {"schedule", "__schedule"} <= frames


def _hide_module(raw: Path, kernel: Path, table: dict, name: str, paths) -> None:
    """Unlink module `name` from the kernel's module list in the RAM copy `raw`, as a rootkit
    hiding itself does (list_del of its struct module's `list`): lsmod no longer sees it."""
    from hvkit.introspect.source import open_guest

    module = table["user_types"]["module"]["fields"]
    at_list, at_name = module["list"]["offset"], module["name"]["offset"]
    with open_guest(str(raw), kernel=kernel, paths=paths) as g:
        ks, mem = g.kernel, g.memory
        head = ks.symbol_va("modules")
        entry = ks.read_u64(head)
        while entry != head:
            if ks.read(entry - at_list + at_name, 56).split(b"\0")[0] == name.encode():
                break
            entry = ks.read_u64(entry)
        else:
            pytest.fail(f"module {name} is not in the guest's module list")
        nxt, prev = ks.read_u64(entry), ks.read_u64(entry + 8)
        writes = [(ks.va_to_pa(prev), nxt), (ks.va_to_pa(nxt + 8), prev)]  # prev->next, next->prev
        ranges = mem.ranges
    with raw.open("r+b") as f:
        for pa, value in writes:
            (r,) = [r for r in ranges if r.gpa <= pa < r.end]
            f.seek(r.offset + pa - r.gpa)
            f.write(struct.pack("<Q", value))


def _check_pages_and_hidden_modules(raw: Path, symbols: Path, cache: Path, kernel: Path, isf, paths,
                                    tmp_path: Path) -> None:
    """Plugins that read struct page fields and module memory, against what the guest holds:
    linux.pagecache.InodePages rebuilds files of the guest's root file system from its page cache
    (struct page's mapping and index) byte for byte as the host put them there; after a module is
    unlinked from the module list in the copy, lsmod misses it and linux.malware.hidden_modules
    (hvkit's version, `hvkit vol` runs it for that name) finds it; on the untouched copy, none."""
    from hvkit.guest.build import BUSYBOX_PACKAGE, _guest_file

    out = tmp_path / "pages"
    out.mkdir()
    busybox = paths.cache / "guest" / BUSYBOX_PACKAGE / "bin" / "busybox"  # the guest's (build.py)
    files = {"/init": _guest_file("init"), "/bin/busybox": busybox.read_bytes()}
    with ThreadPoolExecutor(2) as pool:  # one vol process per run: two at a time
        found = {path: pool.submit(_vol, symbols, raw, cache, "linux.pagecache.InodePages", "--find", path,
                                   "--dump", out=out) for path in files}
        own = pool.submit(_vol, symbols, raw, cache, "linux.malware.hidden_modules")  # Volatility's, as it is
        untouched = pool.submit(_vol, symbols, raw, cache, "hvkit.hidden_modules.Hidden_modules")
        for path, original in files.items():
            rows = _rows(found[path].result())
            assert sorted(row["Index"] for row in rows) == list(range(-(-len(original) // 4096))), path
            (dumped,) = {row["Output File"] for row in rows}
            assert (out / dumped).read_bytes() == original, path
        own = own.result()
        assert (own.returncode == 0 and json.loads(own.stdout) == []) or "dwarf2json" in own.stderr
        assert _rows(untouched.result()) == []
        with lzma.open(isf.path, "rt") as f:
            table = json.load(f)
        _hide_module(raw, kernel, table, "qemu_fw_cfg", paths)
        lsmod = pool.submit(_vol, symbols, raw, cache, "linux.lsmod.Lsmod")
        hidden = _rows(_vol(symbols, raw, cache, "hvkit.hidden_modules.Hidden_modules"))
        assert "qemu_fw_cfg" not in {row["Module Name"] for row in _rows(lsmod.result())}
    assert [row.get("Module Name") or row.get("Name") for row in hidden] == ["qemu_fw_cfg"], hidden


@pytest.mark.timeout(1800)  # 33 plugins in two processes, 6 vol runs: ~1 min idle, over 10 on a host loaded 10x
def test_volatility_runs_on_the_default_guest(guest, isf, paths, tmp_path):
    from hvkit.qemu import start_vm

    with start_vm("isf", memory="256M", workload="hold:32", append=f"hvkit.listen={LISTEN_PORT}",
                  paths=paths) as vm:
        _check_guest(vm, isf, tmp_path, PLUGINS, guest.release)
    _check_pages_and_hidden_modules(tmp_path / "ram.raw", tmp_path / "symbols", tmp_path / "volcache",
                                    guest.kernel, isf, paths, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 14 Volatility runs: ~1 min idle, over 5 on a host loaded 10x
def test_volatility_runs_on_linux_6_12(paths, tmp_path):
    from hvkit.guest import build_kernel_guest
    from hvkit.qemu import start_vm

    package = "linux-image-6.12.117+deb12-cloud-amd64"
    g = build_kernel_guest(paths, package)
    report = make_isf(g.kernel, debian_tree(g.release, paths.cache), paths.cache)
    with start_vm("isf612", memory="256M", workload="hold:32", kernel_package=package,
                  append=f"hvkit.listen={LISTEN_PORT}", paths=paths) as vm:
        _check_guest(vm, report, tmp_path, PLUGINS_612, g.release)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_volatility_runs_on_unstables_newest(paths, tmp_path):
    from hvkit.guest import build_kernel_guest
    from hvkit.qemu import start_vm

    g = build_kernel_guest(paths, "linux-image-cloud-amd64/sid")
    report = make_isf(g.kernel, debian_tree(g.release, paths.cache), paths.cache)
    with start_vm("isfsid", memory="256M", workload="hold:32", kernel_package=g.kernel_package,
                  append=f"hvkit.listen={LISTEN_PORT}", paths=paths) as vm:
        _check_guest(vm, report, tmp_path, PLUGINS_SID, g.release)
