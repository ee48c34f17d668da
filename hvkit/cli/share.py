"""`hvkit share`: give a guest's free pages back to the host."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import click

from hvkit.errors import HvkitError
from hvkit.cli.output import console, json_option, print_json, print_table, status_console
from hvkit.qemu import VM, find_vm
from hvkit.sharing import Sharer, ShareResult, share_once
from hvkit.sharing.sharer import MAX_PAUSE
from hvkit.units import mib, parse_size


def _summary(r: ShareResult) -> str:
    verb = "would give back" if r.dry_run else "gave back"
    amount = r.backed_free_pages * 4096 if r.dry_run else r.released_bytes
    return (f"{verb} {mib(amount):.1f} MiB; host holds {mib(r.host_after):.1f} MiB of guest RAM "
            f"(was {mib(r.host_before):.1f}); VM paused {r.paused_s * 1000:.0f} ms")


@click.command()
@click.argument("vm_name", metavar="[VM]", required=False)
@click.option("--all", "all_vms", is_flag=True,
              help="Every VM of HVKIT_RUNTIME, those that come later too (the host service; needs --watch).")
@click.option("--dry-run", is_flag=True, help="Identify and report, give nothing back.")
@click.option("--watch", type=click.FloatRange(min=0.05), metavar="SECONDS",
              help="Share again every SECONDS until Ctrl-C, with a live status line.")
@click.option("--max-pause", type=click.FloatRange(min=0.01), default=MAX_PAUSE, show_default=True,
              metavar="SECONDS", help="Longest pause; more to give back waits for the next pause.")
@click.option("--metrics", "metrics_at", metavar="ADDR:PORT",
              help="With --all: serve Prometheus metrics at http://ADDR:PORT/metrics.")
@click.option("--mem-available-below", metavar="SIZE",
              help="With --all: share only while the host's MemAvailable is below SIZE (e.g. 4G).")
@click.option("--keep-free", metavar="SIZE", default="0",
              help="With --all: leave SIZE of free memory (with host memory) to each guest.")
@click.option("--install-unit", is_flag=True,
              help="Write the systemd unit that runs 'share --all' with these options, and exit.")
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where --install-unit writes (default /etc/systemd/system).")
@json_option
def share(vm_name: str | None, all_vms: bool, dry_run: bool, watch: float | None, max_pause: float,
          metrics_at: str | None, mem_available_below: str | None, keep_free: str, install_unit: bool,
          unit_dir: Path | None, as_json: bool) -> None:
    """Give the free pages of a running VM's guest back to the host.

    The VM is paused; hvkit finds the pages on the guest kernel's free lists from
    outside (no driver in the guest), punches holes for them in the VM's RAM file, and
    resumes it. A page given back reads as zeros and costs the host nothing until the
    guest uses it again. When punching the holes would keep the VM paused longer than
    --max-pause, it runs again in between and the next pause identifies afresh. Refused,
    with the reason, when the guest poisons free pages or the RAM is not a shared file
    or is on huge pages.

    With --watch, --json prints one JSON object per cycle (JSON Lines).

    With --all --watch SECONDS it is a host service: every VM hvkit knows here, VMs
    coming and going, one log line per event, metrics with --metrics, a clean end on
    SIGTERM (see docs/share.md; --install-unit writes its systemd unit).
    """
    service_only = {"--metrics": metrics_at, "--mem-available-below": mem_available_below,
                    "--keep-free": keep_free != "0" or None}
    if install_unit or all_vms:
        from hvkit.cli.share_service import install, serve

        if vm_name:
            raise HvkitError(f"--all shares every VM; drop the VM name {vm_name!r}", "or drop --all")
        if watch is None:
            raise HvkitError("--all is a service: give it --watch SECONDS", "e.g. hvkit share --all --watch 10")
        options = dict(watch=watch, max_pause=max_pause, dry_run=dry_run, metrics_at=metrics_at,
                       below=parse_size(mem_available_below) if mem_available_below else None,
                       keep=parse_size(keep_free) if keep_free != "0" else 0, as_json=as_json)
        if install_unit:
            install(unit_dir, **options)
        else:
            serve(**options)
        return
    for flag, value in service_only.items():
        if value:
            raise HvkitError(f"{flag} belongs to the host service", "use it with --all --watch SECONDS")
    if not vm_name:
        raise HvkitError("which VM? give its name, or --all --watch SECONDS for every VM",
                         "see 'hvkit vm list' for the VMs there are")
    vm = find_vm(vm_name)
    if watch is None:
        with status_console().status(f"sharing {vm_name}"):
            r = share_once(vm, dry_run=dry_run, max_pause=max_pause)
        if as_json:
            print_json(r.to_json())
        else:
            print_table(["free MiB", "host-backed free MiB", "runs", "given back MiB",
                         "host MiB before", "host MiB after", "pauses", "longest pause ms"],
                        [[f"{mib(r.free_pages * 4096):.1f}", f"{mib(r.backed_free_pages * 4096):.1f}", r.runs,
                          f"{mib(r.released_bytes):.1f}", f"{mib(r.host_before):.1f}", f"{mib(r.host_after):.1f}",
                          r.pauses, f"{r.paused_s * 1000:.0f}"]])
            console().print(_summary(r))
        return
    _watch(vm, watch, dry_run, max_pause, as_json)


def _watch(vm: VM, period: float, dry_run: bool, max_pause: float, as_json: bool) -> None:
    """Shares every `period` seconds until Ctrl-C (or SIGTERM). A signal only asks the
    loop to end: the cycle under way finishes (its VM runs again), then the summary."""
    start, cycles, total, worst_pause = time.monotonic(), 0, 0, 0.0
    status = status_console()
    sharer = Sharer(vm)
    asked: list[int] = []
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: asked.append(signum))
    with status.status("starting") as line:
        while not asked:
            r = sharer.share(dry_run=dry_run, max_pause=max_pause)
            cycles += 1
            total += r.released_bytes
            worst_pause = max(worst_pause, r.paused_s)
            if as_json:
                sys.stdout.write(json.dumps({"t": round(time.monotonic() - start, 3), **r.to_json()}) + "\n")
                sys.stdout.flush()
            line.update(f"{vm.name}: cycle {cycles}, host holds {mib(r.host_after):.1f} MiB; "
                        f"given back {mib(total):.1f} MiB in all; last pause {r.paused_s * 1000:.0f} ms "
                        "(Ctrl-C stops)")
            wake = time.monotonic() + max(0.0, period - r.seconds)
            while not asked and time.monotonic() < wake:
                time.sleep(min(0.05, max(0.0, wake - time.monotonic())))
    if not as_json:
        try:
            state = find_vm(vm.name).run_state()
        except HvkitError as e:
            state = f"not reachable ({e})"
        console().print(f"stopped after {cycles} cycles in {time.monotonic() - start:.1f} s: given back "
                        f"{mib(total):.1f} MiB, longest pause {worst_pause * 1000:.0f} ms; VM {vm.name} "
                        f"is {state}")
