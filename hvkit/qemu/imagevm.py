"""VMs that boot a disk image (hvkit.image) instead of hvkit's initramfs.

This module owns what such a VM has beyond every hvkit VM (RAM in a shared file,
QMP, console, control port): which image a name means, the kernel command line, the
VM's own disk (disk.py), its user network with an ssh port forward (network.py), the
guest agent's channel (agent.py), a vmgenid device, and when it counts as ready (the
agent answers `guest-ping` and hvkit's control service printed HVKIT-READY, which it
does after sshd runs). launch.py calls it at three places: start (the spec), the QEMU
command line, and the wait for ready.

A fork (hvkit.forking: disks.py, settle.py) of such a VM freezes its disk at the moment
of the fork (the VM goes on, on a new overlay over the frozen layer), and gives each
child its own overlay over that layer (`prepare_child`, here), its own ssh port, MAC (in
the guest too) and VM generation id, and sets its clock through the agent.

What a VM of an image has is recorded in its VMSpec (image, image_dir, disk,
ssh_port, mac), so another hvkit command (`vm ssh`, `vm list`) finds it again.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.guest import Workload
from hvkit.image import DebianImage, build_debian_image
from hvkit.memserver.daemon import MemServer
from hvkit.memserver.store import snapshot_disks
from hvkit.qemu.agent import agent_args
from hvkit.qemu.disk import collect_frozen_layers, create_overlay, drive_args
from hvkit.qemu.ownership import OWNERS_DIR
from hvkit.qemu.network import free_local_port, new_mac, user_net_args
from hvkit.qemu.runtime import RuntimeDir, VMSpec
from hvkit.units import parse_size

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


# ---- a fork's child (hvkit.forking: its disk freeze and settling live there) ---------------------

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
