"""A VM's network: QEMU user networking (no root, no bridge, no tap), with the guest's
ssh port forwarded to a free port on the host's loopback.

This module owns choosing that port and the VM's MAC address, and the QEMU arguments
of the virtio-net card. The guest sees QEMU's usual 10.0.2.0/24 network (it gets its
address by DHCP, DNS at 10.0.2.3); nothing outside the host can reach it.
"""

from __future__ import annotations

import secrets
import socket

NETDEV_ID = "net0"
NIC_ID = "nic0"
DEFAULT_GUEST_IP = "10.0.2.15"  # the first address user networking's DHCP leases


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's choice). QEMU
    binds it a moment later; a VM that loses that race dies at start with QEMU's own
    message, which `start_vm` reports."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_mac() -> str:
    """A random MAC in QEMU's 52:54:00 prefix: each VM (and each forked child) its
    own, so two of them on one network never look like one machine."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def user_net_args(ssh_port: int, mac: str) -> list[str]:
    """QEMU arguments for a virtio-net card on user networking, whose guest port 22 is
    127.0.0.1:`ssh_port` on the host."""
    return ["-netdev", f"user,id={NETDEV_ID},hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
            "-device", f"virtio-net-pci,netdev={NETDEV_ID},id={NIC_ID},mac={mac}"]
