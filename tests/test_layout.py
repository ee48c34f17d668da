"""The compiled layout interface against the real headers of the default guest's kernel."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest

from hvkit.errors import HvkitError
from hvkit.introspect import classify
from hvkit.kernel.headers import debian_tree, prepared_tree
from hvkit.kernel.layout import STRUCTS, TypeTest, build_layout


@pytest.fixture(scope="session")
def tree(guest, paths):
    return debian_tree(guest.release, paths.cache)


@pytest.fixture(scope="session")
def layout(tree, paths):
    return build_layout(tree, paths.cache)


def test_headers_match_the_guest_kernel(tree, guest):
    assert tree.release == guest.release
    # every option of the kernel package's config is set the same in the headers'
    # (the headers add only module-signing options)
    def options(path):
        return {line for line in path.read_text().splitlines() if line.startswith("CONFIG_")}

    assert options(guest.config) <= options(tree.config)


def test_layout_has_every_structure(layout):
    for name in STRUCTS:
        s = layout.structs[name]
        assert s.size > 0
        # (a flexible array member, like mm_struct.cpu_bitmap[], sits at the very end)
        assert all(0 <= off <= s.size for off in s.fields.values()), name
    # the fields identification and ps read, flattened out of anonymous unions
    for member in ("flags", "mapping", "index", "private", "_refcount", "lru", "compound_head"):
        layout.offset("page", member)
    for member in ("tasks", "pid", "tgid", "comm", "mm", "real_parent"):
        layout.offset("task_struct", member)
    assert layout.size("list_head") == 16
    assert layout.const("PAGE_SHIFT") == 12
    assert layout.const("TASK_COMM_LEN") == 16


def test_constants_no_debug_info_carries(layout):
    # page-type values are preprocessor macros on some kernels, enum values on others
    buddy = layout.constants.get("PG_buddy", layout.constants.get("PGTY_buddy"))
    assert buddy is not None
    # enum pageflags members come from the DWARF, also by their enum's name
    assert 0 <= layout.const("PG_reserved") < 64
    assert layout.enum("pageflags")["PG_reserved"] == layout.const("PG_reserved")
    assert layout.const("KPF_BUDDY") == 10  # a stable ABI bit of /proc/kpageflags


def test_second_build_compiles_nothing(tree, paths, layout, monkeypatch):
    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiling)
    assert build_layout(tree, paths.cache) == layout


def test_missing_member_is_named(layout):
    with pytest.raises(HvkitError, match="no member nosuch in struct page"):
        layout.offset("page", "nosuch")


def test_unprepared_tree_is_refused(tmp_path):
    with pytest.raises(HvkitError, match="not a prepared kernel tree"):
        prepared_tree(tmp_path)


def test_release_without_headers_in_archive(paths):
    with pytest.raises(HvkitError, match="has no linux-headers-0.0.0-99-nosuch-amd64") as e:
        debian_tree("0.0.0-99-nosuch-amd64", paths.cache)
    assert "--headers DIR" in str(e.value)


def test_kernel_not_of_debian_is_told_how_to_supply_headers(paths):
    for release in ("6.8.0-45-generic", "6.9.0"):  # Ubuntu's, a self-built one
        with pytest.raises(HvkitError, match=f"kernel {release} is not one of Debian's") as e:
            debian_tree(release, paths.cache)
        assert "pass --headers DIR" in str(e.value)


def test_host_without_apt_is_told_how_to_supply_headers(paths, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no apt-get, no dpkg-deb
    with pytest.raises(HvkitError, match="this host has no apt-get, apt-cache, dpkg-deb") as e:
        debian_tree("6.1.0-99-cloud-amd64", paths.cache)
    assert "pass --headers DIR" in str(e.value)


# -- how the kernel marks its pages, from its compiled interface ---------------------------

def test_page_encoding_comes_from_the_interface(layout):
    enc = layout.page_encoding()
    if "PAGE_TYPE_BASE" in layout.constants:  # Debian 12's 6.1: bits cleared under a base
        base = layout.const("PAGE_TYPE_BASE")
        assert enc.scheme == "PAGE_TYPE_BASE"
        assert enc.types["buddy"].mask == base | layout.const("PG_buddy") and enc.types["buddy"].value == base
    else:  # enum pagetype: the type in page_type's top byte
        assert enc.scheme == "enum pagetype"
        assert enc.types["buddy"].value == layout.enum("pagetype")["PGTY_buddy"] << 24
    if "PG_slab" in layout.enum("pageflags"):
        assert enc.slab_flag == layout.enum("pageflags")["PG_slab"] and "slab" not in enc.types
    else:
        assert enc.slab_flag is None and "slab" in enc.types
    # the number of free lists per zone, whatever the kernel names its bound
    bound = layout.constants
    assert enc.free_orders == bound.get("NR_PAGE_ORDERS", bound.get("MAX_ORDER")) == 11


def _without(layout, *names, enums=()):
    """`layout` as if the interface had not found `names` (constants) and `enums`."""
    return dataclasses.replace(layout, constants={k: v for k, v in layout.constants.items() if k not in names},
                               enums={k: v for k, v in layout.enums.items() if k not in enums})


def test_missing_page_type_constants_are_named(layout):
    if "PAGE_TYPE_BASE" not in layout.constants:
        pytest.skip("the default kernel has enum pagetype")
    with pytest.raises(HvkitError, match=r"has no constant PG_table, PG_offline|has no constant PG_offline, PG_table"):
        _without(layout, "PG_table", "PG_offline").page_encoding()
    with pytest.raises(HvkitError, match="finds neither the constant PAGE_TYPE_BASE nor enum pagetype"):
        _without(layout, "PAGE_TYPE_BASE", enums=("pagetype",)).page_encoding()
    with pytest.raises(HvkitError, match="marks slab pages neither with the page flag PG_slab"):
        _without(layout, enums=("pageflags",)).page_encoding()
    broken = _without(layout, "PAGE_TYPE_BASE", enums=("pagetype",))
    with pytest.raises(HvkitError, match="nor enum pagetype"):
        classify(None, broken)  # before anything is read: one clear error, no crash


def test_other_encodings_of_page_types(layout):
    """Layouts as the interface finds them on kernels other than the default's."""
    # Linux 6.10: PAGE_TYPE_BASE 0x80000000 and slab a page type (the macro PG_slab)
    c610 = {**_without(layout, "PAGE_TYPE_BASE").constants, "PAGE_TYPE_BASE": 0x80000000,
            "PG_buddy": 0x40000000, "PG_offline": 0x20000000, "PG_table": 0x10000000,
            "PAGE_TYPE_PG_slab": 0x02000000}
    enc = dataclasses.replace(layout, constants=c610, enums={}).page_encoding()
    assert enc.types["slab"] == TypeTest(0x82000000, 0x80000000) and enc.slab_flag is None
    # enum pagetype without PGTY_slab (slab still a page flag)
    pagetype = {"PGTY_buddy": 0xF0, "PGTY_offline": 0xF1, "PGTY_table": 0xF2}
    enc = dataclasses.replace(_without(layout, "PAGE_TYPE_BASE"), enums={
        "pagetype": pagetype, "pageflags": {"PG_slab": 7}}).page_encoding()
    assert enc.scheme == "enum pagetype" and enc.slab_flag == 7
    assert enc.types["table"] == TypeTest(0xFF000000, 0xF2000000)
    with pytest.raises(HvkitError, match="enum pagetype has no PGTY_table"):
        dataclasses.replace(_without(layout, "PAGE_TYPE_BASE"), enums={
            "pagetype": {"PGTY_buddy": 0xF0, "PGTY_offline": 0xF1}}).page_encoding()
    # no count of free lists at all
    with pytest.raises(HvkitError, match="number of free-block orders"):
        _without(layout, "HVKIT_FREE_AREAS", "NR_PAGE_ORDERS", "MAX_PAGE_ORDER").page_encoding()
