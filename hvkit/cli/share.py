"""`hvkit share`: give a guest's free pages back to the host."""

from __future__ import annotations

import json
import signal
import sys
import time

import click

from hvkit.errors import HvkitError
from hvkit.cli.output import console, json_option, print_json, print_table, status_console
from hvkit.qemu import VM, find_vm
from hvkit.sharing import Sharer, ShareResult, share_once
from hvkit.sharing.sharer import MAX_PAUSE
from hvkit.units import mib


def _summary(r: ShareResult) -> str:
    verb = "would give back" if r.dry_run else "gave back"
    amount = r.backed_free_pages * 4096 if r.dry_run else r.released_bytes
    return (f"{verb} {mib(amount):.1f} MiB; host holds {mib(r.host_after):.1f} MiB of guest RAM "
            f"(was {mib(r.host_before):.1f}); VM paused {r.paused_s * 1000:.0f} ms")


@click.command()
@click.argument("vm_name", metavar="VM")
@click.option("--dry-run", is_flag=True, help="Identify and report, give nothing back.")
@click.option("--watch", type=click.FloatRange(min=0.05), metavar="SECONDS",
              help="Share again every SECONDS until Ctrl-C, with a live status line.")
@click.option("--max-pause", type=click.FloatRange(min=0.01), default=MAX_PAUSE, show_default=True,
              metavar="SECONDS", help="Longest pause; more to give back waits for the next pause.")
@json_option
def share(vm_name: str, dry_run: bool, watch: float | None, max_pause: float, as_json: bool) -> None:
    """Give the free pages of a running VM's guest back to the host.

    The VM is paused; hvkit finds the pages on the guest kernel's free lists from
    outside (no driver in the guest), punches holes for them in the VM's RAM file, and
    resumes it. A page given back reads as zeros and costs the host nothing until the
    guest uses it again. When punching the holes would keep the VM paused longer than
    --max-pause, it runs again in between and the next pause identifies afresh. Refused,
    with the reason, when the guest poisons free pages or the RAM is not a shared file
    or is on huge pages.

    With --watch, --json prints one JSON object per cycle (JSON Lines).
    """
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
