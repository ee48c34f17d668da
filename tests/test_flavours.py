"""identify and ps on every flavour of Debian's kernels: generic and PREEMPT_RT beside the cloud
builds the other tests use (6.1 in test_identify and test_ps, 6.12 and unstable's newest in
test_kernels), for 6.1, 6.12 and Debian unstable's newest.

The flavours are built from one source with other configurations (the generic build has every
driver, NUMA and memory hotplug, 4-aligned kallsyms tables in 7.x; RT has PREEMPT_RT, other
locks in struct page's neighbours and its own per-CPU lists). Nothing of the cloud build is
assumed: each guest's kallsyms, layout and page encoding come from its own kernel file and
headers. Each guest is held to its own ground truth at one paused moment: every page class
agreeing both ways with /proc/kpageflags (>= 99%), free blocks per order equal to buddyinfo,
and ps equal to its process list (pids, names, parents).

The first run fetches each kernel (with its modules, for hvkit's initramfs) and its headers;
flavours of one release share the headers' common part. A flavour Debian's archive lacks today is
skipped with the reason printed."""

from __future__ import annotations

import numpy as np
import pytest

from hvkit.errors import HvkitError
from hvkit.guest import build_kernel_guest
from hvkit.kernel.headers import debian_tree
from hvkit.kernel.layout import build_layout
from hvkit.qemu import start_vm

from test_identify import assert_agrees_with_kpageflags, identify_at_one_moment
from test_ps import compare_with_ground_truth

# a flavour's first setup fetches its kernel and headers and compiles its layout: minutes on a loaded host
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _of_default(flavour: str):
    """The `flavour` build of the default guest's 6.1 release (the same -common headers)."""
    return lambda guest: f"linux-image-{guest.release.removesuffix('-cloud-amd64')}-{flavour}"


FLAVOURS = {
    "6.1-generic": _of_default("amd64"),
    "6.1-rt": _of_default("rt-amd64"),
    "6.12-generic": "linux-image-6.12-amd64",
    "6.12-rt": "linux-image-6.12-rt-amd64",
    "sid-generic": "linux-image-amd64/sid",
    "sid-rt": "linux-image-rt-amd64/sid",
}


@pytest.fixture(scope="module", params=list(FLAVOURS), ids=list(FLAVOURS))
def flavour_vm(request, guest, paths):
    """A 256 MiB guest of that flavour, booted with hvkit's initramfs made for its kernel."""
    name = FLAVOURS[request.param]
    package = name(guest) if callable(name) else name
    try:
        built = build_kernel_guest(paths, package)
    except HvkitError as e:
        if "archive has no" not in str(e):
            raise
        print(f"skipped: {package}: {e}")
        pytest.skip(f"Debian's archive does not give {package}: {e}")
    build_layout(debian_tree(built.release, paths.cache), paths.cache)  # compiled once, then cached
    with start_vm(f"flv-{request.param}", memory="256M", kernel_package=built.kernel_package,
                  paths=paths) as vm:
        yield built, vm


def test_identify_agrees_with_the_guest(flavour_vm, paths):
    built, vm = flavour_vm
    assert vm.spec.kernel_release == built.release
    truth, pm, layout, walk = identify_at_one_moment(vm, paths)
    print(built.release, "agreement (kpageflags, hvkit, both):", assert_agrees_with_kpageflags(truth, pm, layout))
    theirs = np.sum([counts for counts in truth.buddyinfo.values()], axis=0).tolist()
    ours = pm.free_blocks_by_order()
    assert ours == theirs[: len(ours)] and not any(theirs[len(ours):])


def test_ps_matches_the_guest(flavour_vm, paths):
    _, vm = flavour_vm
    walk = compare_with_ground_truth(vm, paths)
    assert {t.name for t in walk.tasks if t.mm} >= {"init"}
