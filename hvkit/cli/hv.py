"""`hvkit hv`: build guest programs with the SDK and run them on hvkit's own hypervisor."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import click

from hvkit.cli.output import console, json_option, print_json, print_table
from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.hv.build import build_guest, sdk_dir
from hvkit.hv.hypervisor import DEFAULT_DLH_ENTRIES, DEFAULT_MEMORY, Hypervisor, RunReport
from hvkit.hv.machine import load_program
from hvkit.hv.scheduler import DEFAULT_SLICE
from hvkit.units import format_size, parse_size


@click.group()
def hv() -> None:
    """hvkit's own hypervisor on /dev/kvm, with deferrable hypercalls.

    Guests are small freestanding C programs built with the SDK that ships with hvkit
    (hvkit.h, an entry stub, a linker script): 'hvkit hv build guest.c -o guest.elf',
    then 'hvkit hv run guest.elf'. Examples are in the repository's examples/hv/.
    """


@hv.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="The guest ELF to write.")
@click.option("-D", "defines", multiple=True, metavar="NAME[=VALUE]", help="A preprocessor define.")
def build(sources: tuple[Path, ...], output: Path, defines: tuple[str, ...]) -> None:
    """Compile and link C SOURCES with the guest SDK into a guest ELF."""
    build_guest(list(sources), output, tuple(f"-D{d}" for d in defines))
    console().print(f"built {output} (SDK: {sdk_dir()})")


@hv.command()
def sdk() -> None:
    """Print where the SDK's header, entry stub and linker script are."""
    click.echo(sdk_dir())


class _ConsolePrinter:
    """Guest console output, a whole line at a time, each prefixed with its VM's name."""

    def __init__(self, prefix: bool) -> None:
        self.prefix = prefix
        self.partial: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def __call__(self, vm: str, data: bytes) -> None:
        with self.lock:
            text = self.partial.pop(vm, b"") + data
            *lines, rest = text.split(b"\n")
            if rest:
                self.partial[vm] = rest
            for line in lines:
                self._emit(vm, line)

    def flush(self) -> None:
        with self.lock:
            for vm, rest in self.partial.items():
                self._emit(vm, rest)
            self.partial.clear()

    def _emit(self, vm: str, line: bytes) -> None:
        text = line.decode(errors="replace")
        sys.stdout.write(f"[{vm}] {text}\n" if self.prefix else f"{text}\n")
        sys.stdout.flush()


def _program_path(guest: Path, paths: Paths) -> Path:
    """A .c file is built first (into the cache), an ELF is used as it is."""
    if guest.suffix != ".c":
        return guest
    out = paths.cache / "hv-guests" / (guest.stem + ".elf")
    out.parent.mkdir(parents=True, exist_ok=True)
    return build_guest([guest], out)


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "hv"


def demo_hypercalls(paths: Paths) -> str:
    """The demo's step: the checksum example in 2 VMs sharing 1 physical-CPU slot."""
    from hvkit.hv import kvm_unavailable_reason

    reason = kvm_unavailable_reason()
    if reason:
        return f"skipped: {reason}"
    source = EXAMPLES / "checksum.c"
    if not source.is_file():
        return f"skipped: {source} is not here (run the demo from a checkout)"
    program = load_program(_program_path(source, paths))
    with Hypervisor(slots=1) as hypervisor:
        for i in range(2):
            hypervisor.add_vm(program, name=f"demo{i}", args=(32, i + 1))
        report = hypervisor.run(timeout=120)
    if not report.ok:
        bad = next(vm for vm in report.vms if not vm.ok)
        raise HvkitError(f"the hypervisor demo failed: {bad.error or bad.exit_codes}")
    crcs = [vm.console.split()[1] for vm in report.vms]
    first = report.vms[0]
    return (f"2 VMs on 1 physical-CPU slot checksummed 32 KiB each (crc32 {', '.join(crcs)}); "
            f"{first.deferred} deferred hypercalls ran on {first.notifications} notification, "
            f"{first.immediate} immediate; shares "
            f"{', '.join(f'{vm.share:.0%}' for vm in report.vms)}")


def print_report(report: RunReport) -> None:
    rows = []
    for vm in report.vms:
        result = "failed" if vm.error else ", ".join(
            "stopped" if c is None else f"exit {c}" for c in vm.exit_codes)
        rows.append([vm.name, vm.vcpus, f"{vm.run_s:.3f}", f"{vm.share:.0%}", vm.exits,
                     vm.preemptions, vm.immediate, vm.deferred, vm.deferred_failed,
                     vm.notifications, vm.queue_full, result])
    print_table(["VM", "vCPUs", "run s", "share", "exits", "preempted", "immediate",
                 "deferred", "deferred failed", "notifications", "queue full", "result"], rows,
                title=f"{len(report.vms)} VMs on {report.slots} physical-CPU slots, "
                      f"{report.seconds:.2f} s")
    for vm in report.vms:
        if vm.error:
            console().print(f"{vm.name}: {vm.error}")


@hv.command()
@click.argument("guest", type=click.Path(path_type=Path))
@click.option("--vms", type=click.IntRange(1, 64), default=1, show_default=True,
              help="How many VMs run the program.")
@click.option("--vcpus", type=click.IntRange(1, 64), default=1, show_default=True, help="vCPUs per VM.")
@click.option("--pcpus", type=click.IntRange(1, 256), default=None,
              help="Physical-CPU slots the vCPUs share  [default: the host's cores]")
@click.option("--memory", default=format_size(DEFAULT_MEMORY), show_default=True,
              help="Guest memory per VM (a multiple of 2M).")
@click.option("--queue", "queue_entries", type=int, default=DEFAULT_DLH_ENTRIES, show_default=True,
              help="Entries of each VM's DLH queue (a power of two).")
@click.option("--slice-ms", type=click.FloatRange(min=0.5), default=DEFAULT_SLICE * 1000,
              show_default=True, help="Time slice before a vCPU is kicked out for a waiting one.")
@click.option("--arg", "args", type=int, multiple=True, metavar="N",
              help="A number passed to the guest in boot->args (up to 4).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Stop VMs still running after this many seconds.")
@json_option
def run(guest: Path, vms: int, vcpus: int, pcpus: int | None, memory: str, queue_entries: int,
        slice_ms: float, args: tuple[int, ...], timeout: float, as_json: bool) -> None:
    """Run GUEST (an ELF built with 'hvkit hv build', or a .c file to build first) in
    one or more VMs, print their console output, then per-VM figures: run time and its
    share, exits, preemptions, immediate and deferred hypercalls.

    Exit status 1 when a VM failed or returned non-zero.
    """
    if len(args) > 4:
        raise HvkitError(f"{len(args)} --arg values: a guest takes up to 4")
    program = load_program(_program_path(guest, Paths.from_env()))
    printer = None if as_json else _ConsolePrinter(prefix=vms > 1)
    with Hypervisor(slots=pcpus, slice_s=slice_ms / 1000, on_console=printer) as hypervisor:
        for i in range(vms):
            hypervisor.add_vm(program, name=f"vm{i}", memory=parse_size(memory), vcpus=vcpus,
                              dlh_entries=queue_entries, args=args)
        report = hypervisor.run(timeout=timeout)
    if as_json:
        print_json(report.to_json())
    else:
        printer.flush()
        print_report(report)
    failed = [vm for vm in report.vms if not vm.ok]
    if failed:
        first = failed[0]
        why = first.error or f"{first.name} returned {first.exit_codes}"
        raise HvkitError(f"{len(failed)} of {len(report.vms)} VMs failed; {why}")
