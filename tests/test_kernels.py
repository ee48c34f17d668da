"""identify, ps and share on guests of other Debian kernels than the default's (6.1):

- Linux 6.12 (linux-image-6.12-cloud-amd64, from bookworm-security), whose page types
  are `enum pagetype` in the top byte of page_type, whose slab pages carry a page type
  instead of PG_slab, and whose free-block bound is NR_PAGE_ORDERS;
- the newest cloud kernel of Debian unstable (linux-image-cloud-amd64/sid: 7.2 today),
  which Debian 12 cannot build against (gcc-16, a newer C library: hvkit compiles its
  interface in a Debian root of its own), whose kallsyms tables are 4-aligned with
  place-relative offsets, whose struct page has compound_info (a mask, not a pointer)
  and whose mapping flags are FOLIO_MAPPING_*.

The same checks as test_identify, test_ps and test_share make on the default guest,
against each guest's own ground truth at one paused moment.

The first run fetches each kernel and its headers with hvkit's own apt configuration
(about 45 MB each; for sid also a 420 MB build root, about 30 s) and compiles the
layout interface; after that everything comes from the cache."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from hvkit.guest import build_kernel_guest, guest_of_kernel
from hvkit.introspect import PageClass
from hvkit.kernel.headers import debian_tree
from hvkit.kernel.layout import build_layout
from hvkit.errors import HvkitError
from hvkit.qemu import VM, start_vm
from hvkit.guest.control import ground_truth, request

from conftest import run_cli
from test_identify import (assert_agrees_with_kpageflags, assert_fragmented_memory_has_its_owner,
                           identify_at_one_moment)
from test_ps import compare_with_ground_truth
from test_share import assert_share_gives_back_free_memory

pytestmark = pytest.mark.slow

KERNEL_612 = "linux-image-6.12-cloud-amd64"
NEWEST = "linux-image-cloud-amd64/sid"  # whatever unstable has on the day of the run
MEMORY = "256M"
HEADROOM_MIB = 12  # left free when the guest allocates all it has (7.2's kernel is larger)


@pytest.fixture(scope="module", params=[KERNEL_612, NEWEST], ids=["6.12", "sid"])
def kguest(request, paths):
    """The guest of a Debian cloud kernel (fetched and built on first use)."""
    return build_kernel_guest(paths, request.param)


@pytest.fixture(scope="module")
def klayout(kguest, paths):
    return build_layout(debian_tree(kguest.release, paths.cache), paths.cache)


def start_guest(name: str, guest, paths, workload: str | None) -> VM:
    """Boots `guest`'s kernel as `hvkit vm start --kernel-package` does: hvkit's own
    initramfs made for that kernel (its own modules) runs `workload`; init loads the
    kernel's own virtio_balloon module (no balloon device: it would report free pages)."""
    return start_vm(name, memory=MEMORY, kernel_package=guest.kernel_package, workload=workload,
                    append="hvkit.modules=virtio_balloon", paths=paths)


@pytest.fixture(scope="module")
def kvm(kguest, paths):
    """A 256 MiB guest of that kernel that allocated all its free memory (MemFree, by
    its own word, less HEADROOM_MIB) and freed it again, so the host backs it all."""
    release = kguest.release.split(".")
    with start_guest(f"k{release[0]}{release[1]}", kguest, paths, None) as vm:
        mib = ground_truth(vm).meminfo["MemFree"] // (1 << 20) - HEADROOM_MIB
        start = len(vm.console())
        request(vm, f"run alloc {mib}", until="HVKIT-RUNNING alloc")
        vm.wait_for_console(rf"HVKIT-ALLOC done mib={mib}", timeout=120, after=start)
        yield vm


def test_guest_runs_the_kernel_of_the_package(kguest, klayout, kvm):
    assert kguest.kernel_package == f"linux-image-{kguest.release}"  # the concrete package
    ready = re.search(r"HVKIT-READY kernel=(\S+)", kvm.console())
    assert ready and ready.group(1) == kguest.release
    assert "HVKIT-ERROR" not in kvm.console()  # its own virtio_balloon (and deps) loaded
    # what hvkit found in this kernel's compiled interface
    enc = klayout.page_encoding()
    assert enc.scheme == "enum pagetype" and enc.slab_flag is None and "slab" in enc.types
    assert enc.types["buddy"].value == klayout.enum("pagetype")["PGTY_buddy"] << 24
    assert "PAGE_TYPE_BASE" not in klayout.constants and "PG_slab" not in klayout.enum("pageflags")
    assert enc.free_orders == klayout.const("NR_PAGE_ORDERS") == klayout.const("MAX_PAGE_ORDER") + 1


def test_classes_agree_with_kpageflags(kvm, paths):
    truth, pm, layout, walk = identify_at_one_moment(kvm, paths)
    report = assert_agrees_with_kpageflags(truth, pm, layout)
    print("agreement (kpageflags, hvkit, both):", report)
    assert pm.counts()[PageClass.KERNEL_IMAGE] > 0
    # free blocks per order agree with the guest's buddyinfo of the same moment
    theirs = np.sum([counts for counts in truth.buddyinfo.values()], axis=0).tolist()
    ours = pm.free_blocks_by_order()
    assert ours == theirs[: len(ours)] and not any(theirs[len(ours):])
    assert {p.pid for p in truth.processes} <= {t.pid for t in walk.tasks}


def test_ps_matches_the_guest(kvm, paths):
    walk = compare_with_ground_truth(kvm, paths)
    assert {t.name for t in walk.tasks if t.mm} >= {"init", "hvkit-mem"}


def test_identify_cli(kvm):
    proc = run_cli("identify", kvm.name, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["pages"] == 65536 and doc["classes"]["free"]["pages"] > 0
    assert "Traceback" not in proc.stderr


def test_share_gives_back_the_guests_free_memory(kvm, paths):
    assert_share_gives_back_free_memory(kvm, paths)


def test_fragmented_memory_and_owners(kvm, paths):
    assert_fragmented_memory_has_its_owner(kvm, paths)


def test_tree_builds_where_it_can(kguest, klayout, paths):
    """Decided from the kernel's headers: where this host cannot build (its compiler
    missing, kbuild needing a newer C library), the tree is one inside a Debian root."""
    from hvkit.kernel import buildroot
    tree = debian_tree(kguest.release, paths.cache)
    why = buildroot.host_cannot_build(paths.cache / "headers" / kguest.release / "usr" / "src"
                                      / f"linux-headers-{kguest.release}", tree.compiler())
    assert (tree.sysroot is not None) == (why is not None), why
    if tree.sysroot:
        assert (tree.host_root / "Makefile").exists() and not any(
            line.split()[1].startswith(str(tree.sysroot)) for line in open("/proc/mounts"))
    print(f"{kguest.release}: built {'in ' + str(tree.sysroot) if tree.sysroot else 'on this host'} ({why})")


def test_kernel_ran_without_oops(kvm):
    """6.12.95 (bookworm-backports) oopses at random under QEMU 7.2 TCG unless booted
    with mitigations=off; 6.12.117 (bookworm-security) needs nothing of the kind.

    The kernel's watchdogs ("BUG: soft lockup", "BUG: workqueue lockup") report that
    the guest got no CPU for a while, which a host loaded to five times its cores does
    to a TCG guest: those are printed and told apart, not taken for a kernel bug."""
    console = kvm.console()
    starved = re.findall(r"BUG: (?:soft lockup|workqueue lockup).*", console)
    if starved:
        print(f"{len(starved)} watchdog reports of a starved guest, e.g. {starved[0]!r}")
    bugs = [line for line in console.splitlines() if re.search(r"Oops|BUG:|general protection fault|Kernel panic", line)
            and not re.search(r"BUG: (?:soft lockup|workqueue lockup)", line)]
    assert not bugs, bugs[:5]


def test_guest_build_cli(guest, paths):
    kguest = build_kernel_guest(paths, KERNEL_612)  # from the cache
    proc = run_cli("guest", "build", "--kernel-package", KERNEL_612, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kernel"] == str(kguest.kernel)  # from the cache
    # a VM started with a kernel file alone can find the initramfs built for it
    assert guest_of_kernel(paths, kguest.kernel) == kguest
    assert guest_of_kernel(paths, guest.kernel) == guest
    bad = run_cli("guest", "build", "--kernel-package", "busybox-static")
    assert bad.returncode == 1 and "is not the name of a Debian kernel image package" in bad.stderr
    missing = run_cli("guest", "build", "--kernel-package", "linux-image-0.0-nosuch-amd64")
    assert missing.returncode == 1 and "Debian's archive has no package linux-image-0.0-nosuch-amd64" in missing.stderr
    assert "Traceback" not in bad.stderr + missing.stderr


def test_kernel_without_randomized_memory_uses_the_bases_of_its_headers(guest, paths):
    """A kernel built without CONFIG_RANDOMIZE_MEMORY has no page_offset_base and
    vmemmap_base variables; its direct map and struct page array sit where its headers
    say (__PAGE_OFFSET_BASE_L4, __VMEMMAP_BASE_L4). Real memory of that kind: the default
    guest booted with nokaslr (the variables then keep those values), read with a symbol
    table that lacks the two variables."""
    from hvkit.introspect import KernelSpace, list_tasks
    from hvkit.introspect.source import load_kernel_knowledge
    from hvkit.kernel.symbols import KernelSymbols
    from hvkit.memory import RamFileMemory

    knowledge = load_kernel_knowledge(guest.kernel, None, paths)
    bases = knowledge.layout.fixed_bases()
    assert {"page_offset_base_L4", "vmemmap_base_L4", "page_offset_base_L5", "vmemmap_base_L5"} <= set(bases)
    symbols = knowledge.symbols
    fixed = KernelSymbols(symbols.release, {k: v for k, v in symbols.addresses.items()
                                            if k not in ("page_offset_base", "vmemmap_base")}, symbols.banner)
    with start_vm("nokaslr", memory=MEMORY, append="nokaslr", paths=paths) as vm:
        with vm.paused("test"), RamFileMemory(vm.ram_path) as mem:
            real = KernelSpace.locate(mem, symbols)
            ks = KernelSpace.locate(mem, fixed, bases)
            assert (ks.page_offset_base, ks.vmemmap_base) == (real.page_offset_base, real.vmemmap_base)
            assert ks.page_offset_base == bases["page_offset_base_L4"]
            pids = {t.pid for t in list_tasks(ks, knowledge.layout, count_pages=False).tasks}
            with pytest.raises(HvkitError, match="built without CONFIG_RANDOMIZE_MEMORY"):
                KernelSpace.locate(mem, fixed)
        truth = ground_truth(vm)
    assert {p.pid for p in truth.processes} <= pids


def test_lzo_compressed_kernel_is_read(guest, paths, tmp_path):
    """The default guest's kernel repacked as an LZO bzImage (its own setup code, its
    vmlinux compressed with lzop as the kernel's build does): the same symbols."""
    import struct
    import subprocess

    from hvkit.kernel.symbols import load_symbols
    from hvkit.kernel.vmlinux import extract_vmlinux

    original = guest.kernel.read_bytes()
    payload = subprocess.run(["lzop", "-c", "-1"], input=extract_vmlinux(guest.kernel),
                             capture_output=True, check=True).stdout + struct.pack("<I", 0)
    setup = bytearray(original[: ((original[0x1F1] or 4) + 1) * 512])
    struct.pack_into("<II", setup, 0x248, 0, len(payload))  # payload_offset, payload_length
    lzo = tmp_path / "vmlinuz-lzo"
    lzo.write_bytes(bytes(setup) + payload)
    cache = tmp_path / "cache"
    assert load_symbols(lzo, cache).addresses == load_symbols(guest.kernel, paths.cache).addresses
