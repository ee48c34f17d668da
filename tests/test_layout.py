"""The compiled layout interface against the real headers of the default guest's kernel."""

from __future__ import annotations

import subprocess

import pytest

from hvkit.errors import HvkitError
from hvkit.kernel.headers import debian_tree, prepared_tree
from hvkit.kernel.layout import STRUCTS, build_layout


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
    # enum pageflags members come from the DWARF
    assert 0 <= layout.const("PG_slab") < 64 and 0 <= layout.const("PG_reserved") < 64
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
    with pytest.raises(HvkitError, match="has no linux-headers-0.0.0-nosuch"):
        debian_tree("0.0.0-nosuch", paths.cache)
