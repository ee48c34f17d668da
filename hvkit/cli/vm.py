"""`hvkit vm ...`: start, list, pause, resume, stop VMs and read their consoles."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import click

from hvkit.errors import HvkitError
from hvkit.cli.output import console, json_option, print_json, print_table
from hvkit.forking.reset import reset as reset_child
from hvkit.guest.workload import NAMES as WORKLOADS
from hvkit.qemu import adopt_vm, detach_vm, find_vm, list_vms, start_vm, vm_status
from hvkit.qemu.accel import ACCELS
from hvkit.qemu.imagevm import IMAGES
from hvkit.units import mib
from hvkit.guest.control import ground_truth


@click.group()
def vm() -> None:
    """Run real Linux guests in QEMU (RAM in a host file, control over QMP)."""


@vm.command()
@click.option("--name", help="VM name (default: vm1, vm2, ...).")
@click.option("--memory", "-m", default="256M", show_default=True, help="Guest RAM, e.g. 256M, 1G.")
@click.option("--cpus", default=1, show_default=True, type=int, help="Virtual CPUs.")
@click.option("--kernel", type=click.Path(path_type=Path), help="bzImage to boot (default: the default guest's kernel).")
@click.option("--initrd", type=click.Path(path_type=Path), help="Your own initramfs (default: hvkit's, which runs --workload).")
@click.option("--kernel-package", metavar="NAME",
              help="Boot this Debian kernel package (e.g. linux-image-6.12-cloud-amd64, or NAME/SUITE such as "
                   "linux-image-cloud-amd64/sid), fetched with hvkit's own apt, with hvkit's initramfs for it.")
@click.option("--append", default="", help="Extra kernel command line.")
@click.option("--workload", help=f"What hvkit's init runs: {', '.join(WORKLOADS)}, as NAME or NAME:MIB (default idle).")
@click.option("--accel", type=click.Choice(ACCELS), default="auto", show_default=True,
              help="QEMU accelerator; auto probes whether KVM really beats TCG here.")
@click.option("--cpu-model", help="QEMU -cpu model (e.g. max, for 5-level paging under TCG).")
@click.option("--ram", type=click.Choice(["file", "anonymous"]), default="file", show_default=True,
              help="file: a shared RAM file hvkit reads and gives back; anonymous: inside QEMU, "
                   "KSM merging allowed (for comparisons; hvkit cannot read it).")
@click.option("--balloon", is_flag=True, help="Add a virtio-balloon with free page reporting (for comparisons).")
@click.option("--image", type=click.Choice(IMAGES),
              help="Boot this disk image (built on first use: 'hvkit image build') on a disk of the VM's own, "
                   "with systemd, sshd ('hvkit vm ssh') and the QEMU guest agent.")
@click.option("--disk-size", metavar="SIZE", help="With --image: the VM's disk size, e.g. 4G (default: the image's).")
@click.option("--timeout", type=float, help="Seconds to wait for the guest to be ready (default 120; 300 with --image).")
@click.option("--no-wait", is_flag=True, help="Return once QEMU runs, before the guest is ready.")
@json_option
def start(name, memory, cpus, kernel, initrd, kernel_package, append, workload, accel, cpu_model, ram, balloon,
          image, disk_size, timeout, no_wait, as_json) -> None:
    """Start a VM in the background; it keeps running after this command returns."""
    t0 = time.monotonic()
    machine = start_vm(name, memory=memory, cpus=cpus, kernel=kernel, initrd=initrd,
                       kernel_package=kernel_package, append=append,
                       workload=workload, accel=accel, cpu_model=cpu_model, ram=ram, balloon=balloon,
                       image=image, disk_size=disk_size, wait=not no_wait, timeout=timeout)
    elapsed = time.monotonic() - t0
    if as_json:
        print_json({**vm_status(machine).to_json(), "start_seconds": round(elapsed, 3),
                    "agent_seconds": machine.spec.agent_seconds, "boot_seconds": machine.spec.boot_seconds})
        return
    ready = "ready" if machine.spec.workload and not no_wait else "started"
    console().print(f"VM [bold]{machine.name}[/] {ready} in {elapsed:.1f} s "
                    f"(pid {machine.pid}, {machine.spec.accel}, {mib(machine.spec.memory):.0f} MiB, "
                    f"RAM file {machine.ram_path})")
    if machine.spec.image:
        agent = f"; guest agent after {machine.spec.agent_seconds:.1f} s" if machine.spec.agent_seconds else ""
        console().print(f"image {machine.spec.image}, disk {machine.spec.disk}{agent}; "
                        f"ssh: hvkit vm ssh {machine.name} (port {machine.spec.ssh_port})")


@vm.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def ssh(name: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in a VM of a disk image over ssh as root (no COMMAND: a login
    shell), with the image's key and host key; exits with the command's status
    (255: ssh itself failed)."""
    argv = find_vm(name).ssh_command(*command)
    sys.exit(subprocess.run(argv).returncode)


@vm.command()
@click.option("--qmp", "qmp_socket", type=click.Path(path_type=Path),
              help="The QMP socket of the running QEMU (its -qmp unix:PATH,server=on).")
@click.option("--libvirt", "domain", metavar="DOMAIN", help="A running libvirt domain (QMP through libvirt).")
@click.option("--connect", default="qemu:///system", show_default=True, metavar="URI",
              help="The libvirt connection of --libvirt.")
@click.option("--name", help="Name for it in hvkit (default: the domain's name, else attached1, ...).")
@click.option("--kernel", type=click.Path(path_type=Path),
              help="The guest's kernel file, when QEMU has no -kernel and the guest's kernel is not "
                   "a Debian kernel hvkit can fetch.")
@json_option
def attach(qmp_socket: Path | None, domain: str | None, connect: str, name: str | None, kernel: Path | None,
           as_json: bool) -> None:
    """Adopt a running QEMU that hvkit did not start, by its QMP socket or as a
    libvirt domain (hvkit then talks QMP through libvirt, which owns the socket).

    Its guest RAM, machine and kernel are found from QEMU and the guest's memory.
    Then identify, ps, share (RAM in a shared file only), vm pause and vm resume work on
    it by name. hvkit never stops or restarts it ('hvkit vm detach' forgets it), and
    does not fork it (a fork restarts its VM)."""
    if (qmp_socket is None) == (domain is None):
        raise HvkitError("give either --qmp SOCKET or --libvirt DOMAIN", "see 'hvkit vm attach --help'")
    machine = adopt_vm(qmp_socket, name, kernel, libvirt=domain, connect=connect)
    if as_json:
        print_json(vm_status(machine).to_json())
        return
    where = f"RAM file {machine.ram_file()}" if machine.spec.ram == "file" else "RAM inside QEMU"
    if machine.spec.ram_nodes:
        where = f"{len(machine.spec.ram_nodes)} NUMA nodes, " + where.replace("RAM file", "RAM files")
    console().print(f"attached QEMU pid {machine.pid} as VM [bold]{machine.name}[/]: "
                    f"{mib(machine.spec.memory):.0f} MiB ({where}), kernel {machine.spec.kernel_release}")


@vm.command()
@click.argument("name")
def detach(name: str) -> None:
    """Forget an attached VM; its QEMU runs on, untouched."""
    detach_vm(find_vm(name))
    console().print(f"VM {name} detached (its QEMU runs on)")


@vm.command(name="list")
@json_option
def list_(as_json) -> None:
    """List VMs with their state and host memory; dead VMs are shown once and cleaned up.

    'host MiB' is guest RAM the host holds for the VM alone: its RAM file's allocated
    pages, or for a forked VM the pages it wrote itself. 'PSS MiB' is the whole QEMU
    process's proportional set size: pages shared by k processes count 1/k in each."""
    rows = list_vms()
    if as_json:
        print_json([r.to_json() for r in rows])
        return
    if not rows:
        console().print("no VMs")
        return
    print_table(
        ["name", "state", "pid", "cpus", "memory MiB", "host MiB", "PSS MiB", "parent", "uptime s",
         "accel", "workload", "from", "ssh"],
        [[r.name, r.state + (f" ({r.owner})" if r.owner else ""), r.pid, r.cpus,
          f"{mib(r.memory):.0f}", f"{mib(r.host_memory):.1f}", f"{mib(r.pss):.1f}", r.parent or "",
          f"{r.uptime:.0f}" if r.uptime is not None else "", r.accel, r.workload,
          r.origin.split(":", 1)[0] if not r.image else f"image {r.image}", r.ssh_port or ""] for r in rows],
    )
    for r in rows:
        if r.state == "dead":
            console().print(f"{r.name} is dead ({r.reason}); its leftovers were removed")


def _simple(verb: str, method: str, helptext: str):
    @vm.command(name=verb, help=helptext)
    @click.argument("name")
    def command(name: str) -> None:
        getattr(find_vm(name), method)()
        console().print(f"VM {name}: {verb} done")

    return command


_simple("pause", "pause", "Pause a VM (its vCPUs stop; memory stays).")
_simple("resume", "resume", "Resume a paused VM.")
_simple("stop", "stop", "Stop a VM: QEMU ends and its runtime folder is removed.")


@vm.command()
@click.argument("name")
@click.option("--paused", "stay_paused", is_flag=True, help="Leave it paused after the reset.")
@json_option
def reset(name: str, stay_paused: bool, as_json: bool) -> None:
    """Reset fork child NAME to the exact state of the snapshot it started from.

    Its QEMU stays: the pages it wrote are dropped (it reads the snapshot again) and
    its CPUs and devices are loaded as they were at the fork. It then runs if it ran
    before (unless --paused). Only fork children without a disk can be reset."""
    report = reset_child(name, stay_paused=stay_paused)
    if as_json:
        print_json(report.to_json())
        return
    console().print(f"VM {report.vm} reset to snapshot {report.snapshot} in {report.seconds * 1000:.0f} ms "
                    f"({report.pages_dropped} pages it wrote dropped; not running for {report.stopped_seconds * 1000:.0f} ms); "
                    f"it is {report.vm_state}")


@vm.command()
@click.argument("name")
@click.option("-n", "--lines", type=int, default=0, help="Only the last N lines.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing as the console grows (Ctrl-C ends).")
def log(name: str, lines: int, follow: bool) -> None:
    """Print a VM's serial console."""
    machine = find_vm(name)
    text = machine.console()
    if lines:
        text = "\n".join(text.splitlines()[-lines:]) + "\n"
    sys.stdout.write(text)
    seen = len(machine.console())
    while follow:
        time.sleep(0.5)
        if not machine.is_alive():
            click.echo(f"[VM {name} stopped]", err=True)
            return
        text = machine.console()
        sys.stdout.write(text[seen:])
        sys.stdout.flush()
        seen = len(text)


@vm.command()
@click.argument("name")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The core file to write.")
@json_option
def dump(name: str, output: Path, as_json: bool) -> None:
    """Write a VM's memory as an ELF core (QEMU's dump-guest-memory; the VM is paused
    meanwhile). hvkit's VMs carry a vmcoreinfo device and load qemu_fw_cfg, so the core
    holds the guest's VMCOREINFO: drgn and crash open it as it is, and 'hvkit ps',
    'hvkit identify' and 'hvkit vol' read it with --kernel."""
    from hvkit.memory.elfcore import vmcoreinfo

    if not output.parent.is_dir():
        raise HvkitError(f"{output.parent} is not a folder", "give -o a path in an existing folder")
    from hvkit.cli.forensics import write_core

    machine = find_vm(name)
    t0 = time.monotonic()
    with machine.paused("dump"):
        write_core(machine, output)  # no name until whole: a killed dump leaves no copy
    info = vmcoreinfo(output)
    doc = {"name": name, "core": str(output.resolve()), "bytes": output.stat().st_size,
           "seconds": round(time.monotonic() - t0, 3), "vmcoreinfo": bool(info),
           "release": info.get("OSRELEASE"), "kernel_offset": info.get("KERNELOFFSET")}
    if as_json:
        print_json(doc)
        return
    note = (f"VMCOREINFO of {doc['release']}" if info else
            "no VMCOREINFO (the guest kernel did not give it: no qemu_fw_cfg?)")
    console().print(f"VM {name}: {mib(doc['bytes']):.0f} MiB core written to {doc['core']} in "
                    f"{doc['seconds']:.1f} s; {note}")


@vm.command()
@click.argument("name")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Also save the raw export here.")
@json_option
def groundtruth(name: str, output: Path | None, as_json: bool) -> None:
    """Ask the default guest for its own view of its memory (meminfo, buddyinfo,
    kpageflags, processes), exported through its second serial port."""
    truth = ground_truth(find_vm(name), save_to=output)
    summary = {
        "mem_total_mib": mib(truth.meminfo.get("MemTotal", 0)),
        "mem_free_mib": mib(truth.meminfo.get("MemFree", 0)),
        "buddy_free_mib": mib(truth.free_pages_by_buddyinfo() * 4096),
        "page_frames": int(truth.kpageflags.size),
        "processes": [p.__dict__ for p in truth.processes],
    }
    if as_json:
        print_json(summary)
        return
    console().print(f"MemTotal {summary['mem_total_mib']:.1f} MiB, MemFree {summary['mem_free_mib']:.1f} MiB, "
                    f"free in buddy lists {summary['buddy_free_mib']:.1f} MiB, "
                    f"{summary['page_frames']} page frames, {len(truth.processes)} processes"
                    + (f"; raw export in {output}" if output else ""))
