"""`hvkit demo`: the main job on the default guest, step by step.

Each capability adds its steps here as it lands; a step returns a one-line result and
the demo prints a table of steps with their timings (or JSON).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from typing import Callable

import click

from hvkit.cli.hv import demo_hypercalls
from hvkit.cli.output import console, json_option, print_json, status_console
from hvkit.config import Paths
from hvkit.forking import fork
from hvkit.guest import build_default_guest
from hvkit.introspect import PageClass, classify, list_tasks
from hvkit.memory import PAGE_SIZE
from hvkit.introspect.source import open_guest
from hvkit.memserver import MemServer
from hvkit.qemu import VM, find_vm, list_vms, start_vm
from hvkit.sharing import share_once
from hvkit.units import mib
from hvkit.guest.control import ground_truth, frozen_ground_truth, request

HEARTBEAT = r"HVKIT-HEARTBEAT (\d+)"


def _last_heartbeat(vm: VM) -> int:
    beats = re.findall(HEARTBEAT, vm.console())
    return int(beats[-1]) if beats else -1


def _wait_heartbeats(vm: VM, count: int, timeout: float = 30.0) -> int:
    """The heartbeat number after `count` more heartbeats."""
    start = _last_heartbeat(vm)
    deadline = time.monotonic() + timeout
    while _last_heartbeat(vm) < start + count:
        if time.monotonic() > deadline:
            raise click.ClickException(f"the guest's heartbeat stalled at {start}")
        vm.raise_if_dead("during the demo")
        time.sleep(0.1)
    return _last_heartbeat(vm)


@click.command()
@click.option("--memory", "-m", default="256M", show_default=True, help="Guest RAM.")
@json_option
def demo(memory: str, as_json: bool) -> None:
    """Boot the default guest, show it is alive, and stop it cleanly."""
    paths = Paths.from_env()
    steps: list[dict] = []
    out = console()

    def step(title: str, action: Callable[[], str]) -> None:
        with status_console().status(title + " ..."):
            t0 = time.monotonic()
            result = action()
        steps.append({"step": title, "result": result, "seconds": round(time.monotonic() - t0, 3)})
        if not as_json:
            out.print(f"[green]✓[/] {title}: {result} [dim]({steps[-1]['seconds']:.2f} s)[/]")

    guest = {}
    step("prepare the default guest",
         lambda: (guest.setdefault("a", build_default_guest(paths)), f"kernel {guest['a'].release}")[1])
    vm = {}

    def boot() -> str:
        vm["vm"] = start_vm(f"demo-{os.getpid()}", memory=memory, workload="alloc:32", paths=paths)
        ready = re.search(r"HVKIT-READY (.*)", vm["vm"].console()).group(1)
        return f"{vm['vm'].name} ready ({vm['vm'].spec.accel}): {ready.strip()}"

    try:
        step("boot the guest", boot)
        machine: VM = vm["vm"]
        step("watch its heartbeat", lambda: f"heartbeat reached {_wait_heartbeats(machine, 2)}")

        def pause_resume() -> str:
            machine.pause()
            before = _last_heartbeat(machine)
            time.sleep(2.0)
            during = _last_heartbeat(machine)
            machine.resume()
            after = _wait_heartbeats(machine, 1)
            return f"paused at beat {before}, still {during} after 2 s, resumed to {after}"

        step("pause and resume", pause_resume)

        def truth() -> str:
            t = ground_truth(machine)
            return (f"MemTotal {mib(t.meminfo['MemTotal']):.0f} MiB, MemFree {mib(t.meminfo['MemFree']):.0f} MiB, "
                    f"{len(t.processes)} processes, {t.kpageflags.size} page frames; "
                    f"host holds {mib(machine.host_memory()):.0f} MiB of its RAM file")

        step("read the guest's own memory report", truth)

        def processes() -> str:
            own = {p.pid for p in ground_truth(machine).processes}
            with open_guest(machine.name, paths=paths) as g:
                walk = list_tasks(g.kernel, g.layout)
            found = {t.pid for t in walk.tasks}
            verdict = "the same pids the guest reports" if found == own else \
                f"differs from the guest's own list by {sorted(found ^ own)}"
            user = ", ".join(f"{t.name}({t.pid}): {t.pages} pages" for t in walk.tasks if t.mm)
            return (f"{len(found)} processes found from outside ({verdict}); user processes {user}; "
                    f"VM paused {g.paused_for * 1000:.0f} ms, layout of kernel {g.layout.release} "
                    "compiled from its headers")

        step("list its processes from outside (identify)", processes)

        def pages() -> str:
            def look():
                with open_guest(machine.name, paths=paths) as g:
                    return classify(g.kernel, g.layout, list_tasks(g.kernel, g.layout))

            truth, pm = frozen_ground_truth(machine, look)
            counts = pm.counts()
            share = ", ".join(f"{c.label} {mib(n * PAGE_SIZE):.0f}" for c, n in counts.items() if n)
            free_theirs = truth.meminfo["MemFree"] // PAGE_SIZE
            return (f"{pm.pages} page frames classified (MiB: {share}); free {counts[PageClass.FREE]} pages "
                    f"vs the guest's own MemFree {free_theirs} at the same paused moment")

        step("identify every page from outside", pages)

        def give_back() -> str:
            start = len(machine.console())
            request(machine, "run alloc 128", until="HVKIT-RUNNING alloc")
            machine.wait_for_console(r"HVKIT-ALLOC done mib=128", timeout=120, after=start)
            r = share_once(machine, paths)
            return (f"after the guest allocated and freed 128 MiB, gave {mib(r.released_bytes):.0f} MiB of its "
                    f"{mib(r.free_pages * PAGE_SIZE):.0f} MiB free back to the host (host now holds "
                    f"{mib(r.host_after):.0f} MiB, was {mib(r.host_before):.0f}); VM paused {r.paused_s * 1000:.0f} ms")

        step("share its free pages with the host", give_back)

        server = MemServer.of(paths)
        server_ran = server.pid() is not None  # a server the demo did not start stays
        store_was_there = server.store_path.exists()  # and so do snapshots it did not make

        def fork_it() -> str:
            beat = _last_heartbeat(machine)
            try:
                report = fork(machine.name, 2, paths)
            finally:  # it runs on in its own place (a new QEMU), even if the fork failed
                vm["vm"] = find_vm(machine.name, paths)
            kids = [find_vm(c.name, paths) for c in report.children]
            vm["children"] = kids
            beats = [_wait_heartbeats(k, 1) for k in kids]
            rows = {r.name: r for r in list_vms(paths)}
            times = ", ".join(f"{c.name} {c.seconds * 1000:.0f} ms" for c in report.children)
            pss = ", ".join(f"{k.name} {mib(rows[k.name].pss):.0f}" for k in kids)
            return (f"snapshot {report.snapshot} without copying its RAM; children running after {times}; "
                    f"their heartbeats go on from {beat} ({', '.join(map(str, beats))}); "
                    f"PSS MiB: {pss}")

        step("fork it into 2 children (memory server)", fork_it)

        def stop() -> str:
            left = []
            for one in [vm["vm"], *vm.get("children", [])]:
                pid, folder = one.pid, one.rundir.path
                one.stop()
                left += [str(folder)] if folder.exists() else []
                left += [f"pid {pid}"] if one.is_alive() else []
            if not server_ran:  # the demo started the memory server: it goes too
                server.stop()
            if not store_was_there:
                shutil.rmtree(server.root, ignore_errors=True)
            return "stopped, nothing left behind" if not left else f"left behind: {', '.join(left)}"

        step("stop it and its children", stop)
    finally:
        for one in [vm.get("vm"), *vm.get("children", [])]:
            if one is not None and one.is_alive():
                one.stop()
    step("run hypercalls on hvkit's own hypervisor (/dev/kvm)", lambda: demo_hypercalls(paths))
    total = sum(s["seconds"] for s in steps)
    if as_json:
        print_json({"steps": steps, "seconds": round(total, 3)})
    else:
        out.print(f"demo finished in {total:.1f} s")
