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
