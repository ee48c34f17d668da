"""hvkit's own hypervisor: real guests built with the SDK, run on /dev/kvm.

Guests under tests/hv_guests/ check the hypervisor's promises from inside (they print
"ok <check>" or "FAIL <check>: why"); the tests also look from outside (traces, figures,
guest memory). Without a usable /dev/kvm these tests skip with the reason hvkit gives.
"""

from __future__ import annotations

import re
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from hvkit.hv import Hypervisor, kvm_unavailable_reason, load_program
from hvkit.hv import kvm
from hvkit.hv.build import build_guest, sdk_dir
from hvkit.hv.dlh import DLH_MAGIC
from hvkit.hv.hypercalls import PORT_DLH_NOTIFY, PORT_HYPERCALL, Code, HintKind, Routine
from hvkit.hv.machine import BOOT_MAGIC

from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
GUESTS = Path(__file__).resolve().parent / "hv_guests"
EXAMPLES = ROOT / "examples" / "hv"
NO_KVM = kvm_unavailable_reason()
needs_kvm = pytest.mark.skipif(NO_KVM is not None, reason=f"no usable KVM: {NO_KVM}")


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """Every test guest and example, built once with the SDK."""
    out = tmp_path_factory.mktemp("hv-guests")
    built = {}
    for src in [*GUESTS.glob("*.c"), *EXAMPLES.glob("*.c")]:
        built[src.stem] = load_program(build_guest([src], out / f"{src.stem}.elf"))
    return built


def xorshift_words(seed: int, count: int) -> list[int]:
    mask, x, words = (1 << 64) - 1, seed, []
    for _ in range(count):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        words.append(x)
    return words


# ---------------------------------------------------------------- no KVM needed

def test_kvm_structures_match_the_kernel_headers(tmp_path):
    """Sizes, offsets and ioctl numbers hvkit computes == what <linux/kvm.h> says."""
    names = kvm.abi_sizes()
    lines = "\n".join(f'    printf("%s=%lu\\n", "{n}", (unsigned long)({n.replace("offsetof", "__builtin_offsetof")}));'
                      for n in names)
    src = tmp_path / "abi.c"
    src.write_text(f"#include <stdio.h>\n#include <linux/kvm.h>\nint main(void) {{\n{lines}\n    return 0;\n}}\n")
    subprocess.run(["cc", str(src), "-o", str(tmp_path / "abi")], check=True)
    out = subprocess.run([str(tmp_path / "abi")], capture_output=True, text=True, check=True).stdout
    from_c = dict(line.split("=") for line in out.split("\n") if line)
    assert {n: int(v) for n, v in from_c.items()} == names


def test_sdk_header_agrees_with_the_hypervisor():
    header = (sdk_dir() / "hvkit.h").read_text()
    defines = {m[1]: int(m[2], 0) for m in
               re.finditer(r"#define (HV_\w+) \(?(-?(?:0x[0-9a-fA-F]+|\d+))(?:ULL|u)?\)?", header)}
    for r in Routine:
        assert defines[f"HV_{r.name}"] == r.value
    for c in Code:
        assert defines[f"HV_{c.name}"] == c.value
    for h in HintKind:
        assert defines[f"HV_HINT_{h.name}"] == h.value
    assert defines["HV_PORT_HYPERCALL"] == PORT_HYPERCALL
    assert defines["HV_PORT_DLH_NOTIFY"] == PORT_DLH_NOTIFY
    assert defines["HV_BOOT_MAGIC"] == BOOT_MAGIC and defines["HV_DLH_MAGIC"] == DLH_MAGIC


def test_build_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.c"
    bad.write_text("int hv_main(void) { return nope; }\n")
    r = run_cli("hv", "build", str(bad), "-o", str(tmp_path / "bad.elf"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "building bad.elf failed" in r.stderr and "nope" in r.stderr


def test_without_kvm_hvkit_says_so_in_one_line(tmp_path):
    r = run_cli("hv", "run", str(EXAMPLES / "hello.c"), env={"HVKIT_KVM": str(tmp_path / "no-kvm")})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert "this host offers no KVM" in r.stderr


# ---------------------------------------------------------------- on /dev/kvm

@needs_kvm
def test_guests_print_through_the_console_routine():
    r = run_cli("hv", "run", str(EXAMPLES / "hello.c"), "--vms", "2")
    assert r.returncode == 0, r.stderr
    for vm in ("vm0", "vm1"):
        assert f"[{vm}] hello from {vm} (vCPU 0 of 1), 4096 KiB of memory" in r.stdout
        assert r.stdout.count(f"[{vm}] deferred hello") == 3
        assert f"[{vm}] 3 deferred writes done: 3 completed" in r.stdout


@needs_kvm
def test_deferred_hypercalls_run_in_order_once_before_the_vcpu_resumes(programs):
    n, tags = 300, (7, 8)
    with Hypervisor(slots=1) as hv:
        vms = [hv.add_vm(programs["dlh_check"], args=(n, tag), dlh_entries=512) for tag in tags]
        report = hv.run(timeout=120)
    for vm, rep, tag in zip(vms, report.vms, tags):
        assert rep.ok, (rep.error, rep.console)
        # from inside: not run before notify, all done when notify returned, full, failing
        assert "FAIL" not in rep.console
        for check in ("deferred", "order", "full", "failing"):
            assert f"ok {check}" in rep.console
        # from outside: the trace routine ran n + 1 times, in order, once each, for this VM only
        assert vm.host.trace == [(i, tag) for i in range(n)] + [(n, tag)]
        assert rep.queue_full == 1
        assert rep.deferred_failed == 3
        assert rep.notifications == 4  # order, full (twice), failing


@needs_kvm
def test_vms_see_only_their_own_memory_and_queue(programs):
    beyond = 5 << 20  # past the 4 MiB of the VM that reads it
    with Hypervisor(slots=1) as hv:
        vms = [hv.add_vm(programs["isolation"], name=f"iso{i}", args=(1 if i == 1 else 0, beyond))
               for i in range(3)]
        report = hv.run(timeout=120)
    for i, (vm, rep) in enumerate(zip(vms, report.vms)):
        assert f"ok isolation iso{i}" in rep.console  # its page kept its own pattern
        assert {a for a, _ in vm.host.trace} == {i} and len(vm.host.trace) == 50
    assert report.vms[0].ok and report.vms[2].ok
    assert not report.vms[1].ok
    assert "read guest-physical 0x500000" in report.vms[1].error
    assert "outside its 4 MiB of memory" in report.vms[1].error


@needs_kvm
def test_a_guest_that_faults_is_stopped_with_the_reason(programs):
    with Hypervisor(slots=1) as hv:
        hv.add_vm(programs["isolation"], args=(1, 5 << 30))  # past the identity map: no page
        report = hv.run(timeout=60)
    assert "triple-faulted" in report.vms[0].error


@needs_kvm
def test_more_vcpus_than_slots_share_fairly(programs):
    """4 vCPUs of 3 VMs (2 + 1 + 1) on 2 slots for 1.5 s: every VM progresses and each
    gets within 20% of a third of the run time."""
    with Hypervisor(slots=2, slice_s=0.01) as hv:
        vms = [hv.add_vm(programs["spin"], vcpus=v, args=(1500,)) for v in (2, 1, 1)]
        report = hv.run(timeout=60)
        progress = [[vm.machine.ram.u64(vm.machine.symbol("progress") + 8 * i)
                     for i in range(len(vm.vcpus))] for vm in vms]
    assert report.ok, [r.error for r in report.vms]
    assert all(sum(p) > 0 for p in progress), progress
    for rep in report.vms:
        assert abs(rep.share - 1 / 3) <= 0.2 / 3, [(r.name, r.share) for r in report.vms]
    assert sum(rep.preemptions for rep in report.vms) > 0  # slices were enforced by kicks


@needs_kvm
def test_checksum_example_computes_what_zlib_computes(programs):
    kib, seed = 32, 99
    with Hypervisor(slots=1) as hv:
        vm = hv.add_vm(programs["checksum"], args=(kib, seed))
        report = hv.run(timeout=120)
    rep = report.vms[0]
    assert rep.ok, (rep.error, rep.console)
    data = struct.pack(f"<{kib * 128}Q", *xorshift_words(seed, kib * 128))
    assert f"crc32 {zlib.crc32(data):x} of {kib} KiB" in rep.console
    assert vm.host.trace == [(i, zlib.crc32(data[i * 4096:(i + 1) * 4096])) for i in range(kib // 4)]
    assert f"gave {kib} KiB back to the host" in rep.console
    assert rep.hinted_free_bytes == kib * 1024


@needs_kvm
def test_sort_example_on_two_vcpus(programs):
    n, seed = 1000, 5
    with Hypervisor(slots=1) as hv:
        vm = hv.add_vm(programs["sort"], vcpus=2, args=(n, seed))
        report = hv.run(timeout=120)
    rep = report.vms[0]
    assert rep.ok, (rep.error, rep.console)
    for vcpu in (0, 1):
        keys = sorted(xorshift_words(seed + vcpu + 1, n))
        assert (f"vCPU {vcpu} sorted {n} keys: min {keys[0]} median {keys[n // 2]} "
                f"max {keys[-1]}") in rep.console
        assert [k for v, k in vm.host.trace if v == vcpu] == keys[::256]


@needs_kvm
def test_run_errors_are_one_line(tmp_path):
    cases = [
        (["hv", "run", "/etc/passwd"], "is not a guest program"),
        (["hv", "run", str(tmp_path / "missing.elf")], "no such file"),
        (["hv", "run", str(EXAMPLES / "hello.c"), "--memory", "3M"], "multiple of 2 MiB"),
        (["hv", "run", str(EXAMPLES / "hello.c"), "--queue", "100"], "power of two"),
        (["hv", "run", str(GUESTS / "spin.c"), "--arg", "100000", "--timeout", "1"],
         "still running after the time limit"),
    ]
    for args, message in cases:
        r = run_cli(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
