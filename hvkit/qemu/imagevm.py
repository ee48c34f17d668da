"""VMs that boot a disk image (hvkit.image) instead of hvkit's initramfs.

This module owns what such a VM has beyond every hvkit VM (RAM in a shared file,
QMP, console, control port): which image a name means, the kernel command line, the
VM's own disk (disk.py), its user network with an ssh port forward (network.py), the
guest agent's channel (agent.py), a vmgenid device, and when it counts as ready (the
agent answers `guest-ping` and hvkit's control service printed HVKIT-READY, which it
does after sshd runs). vm.py calls it at three places: start (the spec), the QEMU
command line, and the wait for ready.

A fork (hvkit.forking) of such a VM freezes its disk at the moment of the fork (the VM
goes on, on a new overlay over the frozen layer), and gives each child its own
overlay over that layer, its own ssh port, MAC (in the guest too) and VM generation
id, and sets its clock through the agent.

What a VM of an image has is recorded in its VMSpec (image, image_dir, disk,
ssh_port, mac), so another hvkit command (`vm ssh`, `vm list`) finds it again.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.guest import Workload
from hvkit.image import DebianImage, build_debian_image
from hvkit.memserver.daemon import MemServer
from hvkit.memserver.store import snapshot_disks
from hvkit.qemu.agent import GuestAgent, agent_args
from hvkit.qemu.disk import (active_layer, collect_frozen_layers, create_overlay, drive_args, freeze_stopped_disk,
                             switch_running_disk)
from hvkit.qemu.ownership import OWNERS_DIR
from hvkit.qemu.network import DEFAULT_GUEST_IP, NETDEV_ID, free_local_port, new_mac, user_net_args
from hvkit.qemu.runtime import RuntimeDir, VMSpec
from hvkit.units import parse_size

if TYPE_CHECKING:
    from hvkit.qemu.vm import VM

log = logging.getLogger(__name__)

IMAGES = ("debian",)  # names `--image` takes; each is built on first use, then cached
BOOT_TIMEOUT = 300.0  # systemd under TCG: 35-45 s alone, 90 s and more on a busy 2-core host


@dataclass(frozen=True)
class ImageBoot:
    """An image chosen for a VM that is about to start, with the VM's disk size."""

    name: str
    image: DebianImage
    disk_size: int | None  # bytes; None: the image's own size

    @classmethod
    def named(cls, name: str, paths: Paths, disk_size: str | int | None = None) -> "ImageBoot":
        """The image called `name` (built first if the cache has none), or a clear error."""
        if name not in IMAGES:
            raise HvkitError(f"unknown image {name!r}", f"the images hvkit has: {', '.join(IMAGES)}")
        size = parse_size(disk_size) if disk_size is not None else None
        if size is not None and size % 512:
            raise HvkitError(f"invalid disk size {disk_size!r}", "give a multiple of 512 bytes, e.g. 4G")
        return cls(name, build_debian_image(paths), size)

    def kernel_args(self, workload: Workload, append: str) -> str:
        """The image's own arguments (root disk, console), then hvkit's (a kernel panic
        ends QEMU, the control service's workload), then the user's."""
        return " ".join(filter(None, [self.image.kernel_args, "panic=-1 quiet", workload.kernel_args(), append]))

    def describe(self, spec: VMSpec) -> None:
        """Records the image in `spec` (the disk, port and MAC come at launch)."""
        spec.image, spec.image_dir, spec.disk_size = self.name, str(self.image.directory), self.disk_size


def prepare_launch(rundir: RuntimeDir, spec: VMSpec) -> None:
    """Makes the VM's overlay in its folder and picks its ssh port and MAC: right
    before QEMU starts (the port is free now, and the folder exists)."""
    image = load_image(spec)
    spec.disk = str(create_overlay(image.image, rundir.disk, spec.disk_size))
    spec.ssh_port = free_local_port()
    spec.mac = spec.mac or new_mac()
    spec.vmgenid = str(uuid.uuid4())


def device_args(rundir: RuntimeDir, spec: VMSpec) -> list[str]:
    """QEMU arguments of an image VM beyond every VM's: its disk, network, agent
    channel, and a VM generation id (a guest sees it change when it is forked or
    restored, and reseeds what must not repeat, such as its random numbers). A VM
    going on in a new QEMU (after its fork) keeps its generation id; a forked child
    gets a new one, which QEMU writes into the guest when it loads the device state."""
    return [*drive_args(Path(spec.disk)), *user_net_args(spec.ssh_port, spec.mac),
            *agent_args(rundir.qga_sock), "-device", f"vmgenid,id=vmgenid0,guid={spec.vmgenid or 'auto'}"]


def load_image(spec: VMSpec) -> DebianImage:
    """The image a VM was started from, or a clear error for a VM without one."""
    if not spec.image or not spec.image_dir:
        raise HvkitError(f"VM {spec.name!r} has no disk image (so no ssh or guest agent)",
                         "start one with 'hvkit vm start --image debian'")
    try:
        return DebianImage.load(Path(spec.image_dir))
    except (OSError, ValueError, KeyError):
        raise HvkitError(f"the image of VM {spec.name!r} ({spec.image_dir}) is gone",
                         "stop the VM; 'hvkit image build' makes the image again") from None


def ssh_command(spec: VMSpec, *command: str) -> list[str]:
    """ssh into the VM as root with the image's key, checking its host key."""
    image = load_image(spec)
    if not spec.ssh_port:
        raise HvkitError(f"VM {spec.name!r} has no ssh port forward")
    return image.ssh_command(spec.ssh_port, *command)


# ---- fork (hvkit.forking): each child its own disk, port, MAC, generation id and clock ------------

def plan_disk_freeze(vm: "VM", layer: Path) -> dict:
    """The names a fork of `vm` freezes its disk under, recorded in the fork's journal
    before anything changes: `old_disk` (the overlay QEMU writes now, as QEMU itself
    says), `disk_layer` (that overlay's name as the frozen layer, in the store) and
    `new_disk` (the empty overlay over it that the VM goes on with)."""
    return {"old_disk": str(active_layer(vm.qmp)), "disk_layer": str(layer),
            "new_disk": str(vm.rundir.path / f"disk-{time.time_ns()}.qcow2")}


def machine_after_freeze(machine: dict, plan: dict) -> dict:
    """The VM's spec (as a dict) once its disk is frozen as `plan` says: what its
    snapshot records (children start from `frozen_disk`) and its next QEMU runs."""
    if not plan.get("disk_layer"):
        return machine
    return {**machine, "disk": plan["new_disk"], "frozen_disk": plan["disk_layer"]}


def freeze_stopped_disk_of(plan: dict) -> None:
    """A first fork, once the VM's QEMU ended: its disk frozen as `plan` says (disk.py);
    done again by a recovery, it finishes what was not done."""
    freeze_stopped_disk(Path(plan["old_disk"]), Path(plan["disk_layer"]), Path(plan["new_disk"]))


def switch_disk(vm: "VM", plan: dict) -> None:
    """A fork of a VM that runs on in its QEMU (it runs from a snapshot), once the
    snapshot is sealed and before the VM runs again: QEMU switched to the new overlay
    over the frozen layer (disk.py), and the VM's spec records both."""
    switch_running_disk(vm.qmp, Path(plan["old_disk"]), Path(plan["disk_layer"]), Path(plan["new_disk"]))
    vm.spec.disk, vm.spec.frozen_disk = plan["new_disk"], plan["disk_layer"]
    vm.rundir.write_spec(vm.spec)


def prepare_child(rundir: RuntimeDir, spec: VMSpec) -> None:
    """A forked child's own overlay over its parent's frozen disk, its own ssh port,
    MAC and generation id (spec is the parent's, renamed)."""
    if not spec.frozen_disk or not Path(spec.frozen_disk).is_file():
        raise HvkitError(f"the disk of {spec.parent or 'the parent'} as it was at the fork is gone "
                         f"({spec.frozen_disk or 'not recorded'}), so child {spec.name!r} has no disk to start from",
                         "fork the running VM again")
    spec.disk = str(create_overlay(Path(spec.frozen_disk), rundir.disk, spec.disk_size))
    spec.ssh_port = free_local_port()
    spec.mac = new_mac()
    spec.vmgenid = str(uuid.uuid4())


# Run by the guest's perl (perl-base is essential in Debian): host randomness into the
# input pool, then RNDRESEEDCRNG (_IO('R', 7)), so the CRNG is keyed from it at once.
_RESEED = ('open(my $w, ">", "/dev/urandom") or die "/dev/urandom: $!\\n"; binmode STDIN; local $/; '
           'my $seed = <STDIN>; length($seed) >= 32 or die "no seed on stdin\\n"; '
           'syswrite($w, $seed) == length($seed) or die "write: $!\\n"; '
           'ioctl($w, 0x5207, 0) or die "RNDRESEEDCRNG: $!\\n";')


def settle_child(vm: "VM", timeout: float = 60.0) -> None:
    """After a child runs, through the guest agent: its random number generator
    reseeded with host randomness (siblings went on from one CRNG state), its clock
    set to the host's (it went on from its parent's moment) and its network card given
    the child's own MAC inside the guest too (the guest's driver keeps the address it
    read at boot)."""
    agent = GuestAgent(vm.rundir.qga_sock)
    agent.wait_until_answers(timeout, lambda: vm.raise_if_dead("after the fork"), f"child {vm.name!r}")
    reseed_random(vm, agent)
    agent.set_time()
    nics = [n for n in agent.call("guest-network-get-interfaces")
            if n.get("hardware-address") not in (None, "00:00:00:00:00:00")]
    for nic in nics[:1]:
        # QEMU's user network answers the guest at the MAC it last saw in an ARP packet
        # from it: the guest forgets its neighbours and reaches for the gateway, so its
        # ARP request tells the user network the new address at once
        script = (f"ip link set dev {nic['name']} address {vm.spec.mac} && ip neigh flush dev {nic['name']} && "
                  "{ timeout 3 bash -c 'exec 3<>/dev/tcp/10.0.2.2/9' 2>/dev/null; true; }")
        result = agent.exec("/bin/sh", "-c", script)
        if result.exitcode != 0:
            raise HvkitError(f"child {vm.name!r} could not take its MAC {vm.spec.mac}: {result.stderr.strip()}")
        _forward_ssh_to_new_lease(vm, agent, nic["name"])


def reseed_random(vm: "VM", agent: GuestAgent) -> None:
    """The child's kernel CRNG reseeded from 64 bytes of the host's randomness. A new
    VM generation id (vmgenid) makes kernels with CONFIG_VMGENID reseed by themselves,
    but not every kernel has it (Debian 12's cloud kernel does not): without this,
    siblings would draw the same 'random' numbers (keys, nonces, TCP sequence numbers)
    until their next periodic reseed. A child that cannot be reseeded is an error."""
    result = agent.exec("/usr/bin/perl", "-e", _RESEED, input=os.urandom(64))
    if result.exitcode != 0:
        said = (result.stderr or result.stdout).strip() or f"exit status {result.exitcode}"
        raise HvkitError(f"child {vm.name!r}: its random number generator could not be reseeded ({said}), "
                         "so it would repeat its siblings' random numbers", "the guest needs perl (perl-base)")


def _forward_ssh_to_new_lease(vm: "VM", agent: GuestAgent, nic: str, timeout: float = 20.0) -> None:
    """QEMU's user network leases addresses per MAC, and the guest asks again for one
    when its MAC changes: the child gets the next address (10.0.2.16, ...), so its ssh
    forward is pointed there (hostfwd_remove/hostfwd_add on the running QEMU)."""
    deadline, ip = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        nics = {n["name"]: n for n in agent.call("guest-network-get-interfaces")}
        ip = next((a["ip-address"] for a in nics.get(nic, {}).get("ip-addresses", [])
                   if a.get("ip-address-type") == "ipv4"), None)
        if ip and ip != DEFAULT_GUEST_IP:
            break
        time.sleep(0.5)
    if ip is None:
        raise HvkitError(f"child {vm.name!r} has no IPv4 address {timeout:.0f} s after taking its MAC")
    if ip == DEFAULT_GUEST_IP:
        return  # it kept its address: the forward reaches it already
    rule = f"tcp:127.0.0.1:{vm.spec.ssh_port}"
    for line in (f"hostfwd_remove {NETDEV_ID} {rule}", f"hostfwd_add {NETDEV_ID} {rule}-{ip}:22"):
        said = vm.qmp("human-monitor-command", {"command-line": line}).strip()
        if said and "removed" not in said:
            raise HvkitError(f"child {vm.name!r}: QEMU refused '{line}': {said}")


def set_clock(vm: "VM") -> None:
    """The guest's clock set to the host's after it was paused for a while (a fork);
    an agent that does not answer at once is left alone (the guest runs on anyway)."""
    try:
        GuestAgent(vm.rundir.qga_sock).set_time()
    except HvkitError as e:
        log.warning("VM %s: its clock was not set after the fork (%s)", vm.name, e)


def collect_disks(paths: Paths) -> None:
    """Frozen disk layers nothing needs any more are removed (disk.py): needed are the
    layers of the memory server's snapshots, every VM's disk and frozen disk, and the
    layer of a fork in progress (its intent record names it)."""
    store = MemServer.of(paths).store_path
    try:
        needed = snapshot_disks(store)
    except HvkitError as e:
        log.warning("frozen disk layers kept: %s", e)
        return
    for record in [*paths.runtime.glob("*/vm.json"), *paths.runtime.glob(f"{OWNERS_DIR}/*.json")]:
        try:
            facts = json.loads(record.read_text())
        except (OSError, ValueError):
            log.warning("frozen disk layers kept: %s cannot be read", record)
            return
        if not isinstance(facts, dict):
            continue
        for where in (facts, facts.get("machine")):  # a spec, an intent, an intent's machine
            if isinstance(where, dict):
                needed += [Path(where[k]) for k in ("disk", "frozen_disk", "disk_layer", "old_disk", "new_disk")
                           if isinstance(where.get(k), str)]
    for layer in collect_frozen_layers(store / "disks", needed):
        log.info("removed frozen disk layer %s (nothing needs it)", layer)
