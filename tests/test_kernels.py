"""identify, ps and share on a guest of another Debian kernel than the default's: Linux
6.12 (linux-image-6.12-cloud-amd64, from bookworm-security), whose page types are
`enum pagetype` in the top byte of page_type, whose slab pages carry a page type instead
of PG_slab, and whose free-block bound is NR_PAGE_ORDERS. The same checks as
test_identify, test_ps and test_share make on the default guest, against this guest's
own ground truth at one paused moment.

The first run fetches the kernel and its headers with hvkit's own apt configuration
(about 45 MB) and compiles the layout interface; after that everything comes from the
cache."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from hvkit.guest import build_kernel_guest, guest_of_kernel
from hvkit.introspect import PageClass
from hvkit.kernel.headers import debian_tree
from hvkit.kernel.layout import build_layout
from hvkit.qemu import VM

from conftest import run_cli
from test_identify import (assert_agrees_with_kpageflags, assert_fragmented_memory_has_its_owner,
                           identify_at_one_moment)
from test_ps import compare_with_ground_truth
from test_share import assert_share_gives_back_free_memory

pytestmark = pytest.mark.slow

KERNEL_PACKAGE = "linux-image-6.12-cloud-amd64"
MEMORY = "256M"


@pytest.fixture(scope="module")
def guest612(paths):
    """The guest of Debian's 6.12 cloud kernel (fetched and built on first use)."""
    return build_kernel_guest(paths, KERNEL_PACKAGE)


@pytest.fixture(scope="module")
def layout612(guest612, paths):
    return build_layout(debian_tree(guest612.release, paths.cache), paths.cache)


def start_guest(name: str, guest, paths, workload: str) -> VM:
    """Boots `guest`'s kernel as `hvkit vm start --kernel-package` does: hvkit's own
    initramfs made for that kernel (its own modules) runs `workload`; init loads the
    kernel's own virtio_balloon module (no balloon device: it would report free pages)."""
    return VM.start(name, memory=MEMORY, kernel_package=guest.kernel_package, workload=workload,
                    append="hvkit.modules=virtio_balloon", paths=paths)


@pytest.fixture(scope="module")
def vm612(guest612, paths):
    """A 256 MiB 6.12 guest that allocated 180 MiB and freed it at boot."""
    with start_guest("k612", guest612, paths, "alloc:180") as vm:
        vm.wait_for_console(r"HVKIT-ALLOC done mib=180", timeout=120)
        yield vm


def test_guest_runs_the_kernel_of_the_package(guest612, layout612, vm612):
    assert guest612.release.startswith("6.12.") and guest612.kernel_package != KERNEL_PACKAGE
    ready = re.search(r"HVKIT-READY kernel=(\S+)", vm612.console())
    assert ready and ready.group(1) == guest612.release
    assert "HVKIT-ERROR" not in vm612.console()  # its own virtio_balloon (and deps) loaded
    # what hvkit found in this kernel's compiled interface
    enc = layout612.page_encoding()
    assert enc.scheme == "enum pagetype" and enc.slab_flag is None and "slab" in enc.types
    assert enc.types["buddy"].value == layout612.enum("pagetype")["PGTY_buddy"] << 24
    assert "PAGE_TYPE_BASE" not in layout612.constants and "PG_slab" not in layout612.enum("pageflags")
    assert enc.free_orders == layout612.const("NR_PAGE_ORDERS") == layout612.const("MAX_PAGE_ORDER") + 1


def test_classes_agree_with_kpageflags(vm612, paths):
    truth, pm, layout, walk = identify_at_one_moment(vm612, paths)
    report = assert_agrees_with_kpageflags(truth, pm, layout)
    print("agreement (kpageflags, hvkit, both):", report)
    assert pm.counts()[PageClass.KERNEL_IMAGE] > 0
    # free blocks per order agree with the guest's buddyinfo of the same moment
    theirs = np.sum([counts for counts in truth.buddyinfo.values()], axis=0).tolist()
    ours = pm.free_blocks_by_order()
    assert ours == theirs[: len(ours)] and not any(theirs[len(ours):])
    assert {p.pid for p in truth.processes} <= {t.pid for t in walk.tasks}


def test_ps_matches_the_guest(vm612, paths):
    walk = compare_with_ground_truth(vm612, paths)
    assert {t.name for t in walk.tasks if t.mm} >= {"init", "hvkit-mem"}


def test_identify_cli(vm612):
    proc = run_cli("identify", vm612.name, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["pages"] == 65536 and doc["classes"]["free"]["pages"] > 0
    assert "Traceback" not in proc.stderr


def test_share_gives_back_the_guests_free_memory(vm612, paths):
    assert_share_gives_back_free_memory(vm612, paths)


def test_fragmented_memory_and_owners(vm612, paths):
    assert_fragmented_memory_has_its_owner(vm612, paths)


def test_kernel_ran_without_oops(vm612):
    """6.12.95 (bookworm-backports) oopses at random under QEMU 7.2 TCG unless booted
    with mitigations=off; 6.12.117 (bookworm-security) needs nothing of the kind."""
    assert not re.search(r"Oops|BUG:|general protection fault|Kernel panic", vm612.console())


def test_guest_build_cli(guest612, guest, paths):
    proc = run_cli("guest", "build", "--kernel-package", KERNEL_PACKAGE, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kernel"] == str(guest612.kernel)  # from the cache
    # a VM started with a kernel file alone can find the initramfs built for it
    assert guest_of_kernel(paths, guest612.kernel) == guest612
    assert guest_of_kernel(paths, guest.kernel) == guest
    bad = run_cli("guest", "build", "--kernel-package", "busybox-static")
    assert bad.returncode == 1 and "is not the name of a Debian kernel image package" in bad.stderr
    missing = run_cli("guest", "build", "--kernel-package", "linux-image-0.0-nosuch-amd64")
    assert missing.returncode == 1 and "Debian's archive has no package linux-image-0.0-nosuch-amd64" in missing.stderr
    assert "Traceback" not in bad.stderr + missing.stderr
