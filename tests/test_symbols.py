"""Kernel symbols from the kernel's own kallsyms tables, checked against the running
guest: the symbols must point at what the guest's memory really holds there."""

from __future__ import annotations

import pytest

from hvkit.errors import HvkitError
from hvkit.kernel.symbols import load_symbols
from hvkit.kernel.vmlinux import extract_vmlinux


@pytest.fixture(scope="session")
def symbols(guest, paths):
    return load_symbols(guest.kernel, paths.cache, guest.config)


def test_vmlinux_comes_out_of_the_bzimage(guest):
    elf = extract_vmlinux(guest.kernel)
    assert elf[:4] == b"\x7fELF" and len(elf) > guest.kernel.stat().st_size


def test_symbols_from_kallsyms(symbols, guest):
    assert len(symbols.addresses) > 10_000
    assert symbols.banner.startswith(f"Linux version {guest.release} ")
    text = symbols["_text"]
    for name in ("init_task", "linux_banner", "phys_base", "page_offset_base", "init_top_pgt"):
        assert text <= symbols[name] < symbols["_end"], name
    with pytest.raises(HvkitError, match="has no symbol no_such_symbol"):
        symbols["no_such_symbol"]


def test_symbols_locate_the_running_kernel(symbols, shared_vm):
    """The banner is in guest RAM, and init_uts_ns (found by symbol, relative to the
    banner) holds the release string: symbol distances are the running kernel's."""
    with shared_vm.memory() as mem:
        hits = mem.find(symbols.banner.encode(), limit=4)
        assert hits, "the kernel's banner is not in guest memory"
        phys_text = hits[0] - (symbols["linux_banner"] - symbols["_text"])
        assert phys_text % (2 << 20) == 0  # CONFIG_PHYSICAL_ALIGN
        uts = phys_text + symbols["init_uts_ns"] - symbols["_text"]
        assert shared_vm.spec.kernel_release.encode() in mem.read(uts, 512)


def test_cached_symbols_are_reused(symbols, guest, paths, monkeypatch):
    import hvkit.kernel.symbols as mod

    monkeypatch.setattr(mod, "extract_vmlinux", lambda *a: pytest.fail("extracted again"))
    assert load_symbols(guest.kernel, paths.cache, guest.config).addresses == symbols.addresses


# -- kernels of every flavour, read from their kernel file alone ----------------------

# (package, symbols kallsyms names once or more): the counts the reader gave before its
# tables were found by what they hold rather than by where one build put them
PINNED = [("linux-image-6.1.0-57-cloud-amd64", 82_125),
          ("linux-image-6.12.117+deb12-cloud-amd64", 148_055),
          ("linux-image-7.2.13+deb14-cloud-amd64", 180_438)]
# whatever unstable has today: 7.x puts the kernel file in linux-binary-<release>; the
# generic build's kallsyms tables are 4-, not 8-aligned (the reader once stopped there)
FLAVOURS = ["linux-image-amd64/sid", "linux-image-rt-amd64/sid", "linux-image-cloud-amd64/sid"]


def _kernel_file_only(paths, name: str):
    """The vmlinuz of Debian's kernel package `name`: from a guest hvkit already built
    of it, or fetched alone (its linux-binary-<release> part where it has one, not the
    modules) into the cache; the test is skipped, saying why, when the archive lacks it."""
    from hvkit.guest import debian
    from hvkit.guest.build import fetch_kernel_file

    if (paths.cache / "guest" / name / ".unpacked").exists():
        return fetch_kernel_file(paths, name)
    apt = debian.Apt.private(paths.cache)
    try:
        with apt.locked():
            apt.ensure_lists(debian.LISTS_MAX_AGE)
        package = debian.resolve_kernel_package(name, apt)
    except HvkitError as e:
        print(f"skipped: {name}: {e}")
        pytest.skip(f"Debian's archive does not give {name}: {e}")
    binary = [p for p in debian.kernel_parts(package, apt) if p.startswith("linux-binary-")] or [package]
    root = debian.fetch_and_unpack(binary[:1], paths.cache / "kernel-files" / binary[0], apt)
    found = sorted(root.glob("boot/vmlinuz-*")) + sorted(root.glob("usr/lib/modules/*/vmlinuz")) \
        + sorted(root.glob("lib/modules/*/vmlinuz"))
    assert found, f"{binary[0]} holds no vmlinuz"
    return found[0]


def _kallsyms_of(kernel):
    """What the reader finds in the kernel file's kallsyms, and the .rodata's address."""
    import io

    from elftools.elf.elffile import ELFFile

    from hvkit.kernel.kallsyms import read_kallsyms

    elf = ELFFile(io.BytesIO(extract_vmlinux(kernel)))
    rodata = elf.get_section_by_name(".rodata")
    sections = {n: (s["sh_addr"], s["sh_addr"] + s["sh_size"])
                for n in (".text", ".data") if (s := elf.get_section_by_name(n)) is not None}
    return read_kallsyms(rodata.data(), True, rodata["sh_addr"], sections), rodata["sh_addr"]


def _assert_symbols_agree_with_the_image(kernel, symbols):
    """The symbols put the banner, _text and init_task where the kernel's ELF has them."""
    import io

    from elftools.elf.elffile import ELFFile

    from hvkit.kernel import read_kernel_image

    release = read_kernel_image(kernel).release
    elf = ELFFile(io.BytesIO(extract_vmlinux(kernel)))
    text, data = elf.get_section_by_name(".text"), elf.get_section_by_name(".data")
    assert symbols.banner.startswith(f"Linux version {release} ")
    assert symbols["_text"] == text["sh_addr"]
    assert data["sh_addr"] <= symbols["init_task"] < data["sh_addr"] + data["sh_size"]
    for name in ("linux_banner", "init_uts_ns", "page_offset_base", "init_top_pgt", "startup_64"):
        assert symbols["_text"] <= symbols[name] < symbols["_end"], name


@pytest.mark.slow
@pytest.mark.parametrize("package,count", PINNED, ids=["6.1", "6.12", "7.2-cloud"])
def test_symbol_counts_as_before(package, count, paths, tmp_path):
    """The same symbols as before from the kernels hvkit read before (the reader runs:
    a cache of the test's own)."""
    kernel = _kernel_file_only(paths, package)
    symbols = load_symbols(kernel, tmp_path)
    kallsyms, _ = _kallsyms_of(kernel)
    assert len({s.name for s in kallsyms.symbols}) == count
    # and the kallsyms tables themselves, which 6.1's kallsyms does not list
    assert set(symbols.addresses) == {s.name for s in kallsyms.symbols} | set(symbols.tables)
    _assert_symbols_agree_with_the_image(kernel, symbols)


TABLES = ["kallsyms_num_syms", "kallsyms_names", "kallsyms_markers", "kallsyms_token_table",
          "kallsyms_token_index", "kallsyms_offsets", "kallsyms_seqs_of_names"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [p for p, _ in PINNED] + FLAVOURS,
                         ids=["6.1", "6.12", "7.2-cloud", "sid-generic", "sid-rt", "sid-cloud"])
def test_kallsyms_tables_are_where_the_kernel_says(name, paths):
    """Where the reader found each kallsyms table (it looks for what they hold, never at a
    fixed place) is where the kernel's own kallsyms puts them, on kernels that list them
    (6.12 and later; 6.1 does not list them, and they are found all the same). Volatility's
    linux.kallsyms looks them up by these names."""
    kernel = _kernel_file_only(paths, name)
    kallsyms, rodata_va = _kallsyms_of(kernel)
    found = {n: address for n, (address, _, _) in kallsyms.tables.symbols(rodata_va).items()}
    assert set(TABLES) <= set(found), f"not found: {set(TABLES) - set(found)}"
    listed = {s.name: s.address for s in kallsyms.symbols if s.name in found}
    for table, address in listed.items():
        assert found[table] == address, f"{table}: found at {found[table]:#x}, kallsyms says {address:#x}"
    if name.startswith("linux-image-6.1."):
        assert not listed and "kallsyms_relative_base" in found
    else:
        assert set(TABLES) <= set(listed)


@pytest.mark.slow
@pytest.mark.parametrize("name", FLAVOURS, ids=["sid-generic", "sid-rt", "sid-cloud"])
def test_symbols_of_every_flavour(name, paths, tmp_path):
    """Debian unstable's kernels of every flavour (only their kernel file is fetched)."""
    kernel = _kernel_file_only(paths, name)
    symbols = load_symbols(kernel, tmp_path)
    assert len(symbols.addresses) > 100_000
    _assert_symbols_agree_with_the_image(kernel, symbols)
