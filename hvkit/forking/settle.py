"""Settling a forked child of a disk-image VM, through its guest agent, right after it
runs: its random number generator reseeded with host randomness (siblings went on from
one CRNG state), its clock set to the host's, and its network card given the child's
own MAC inside the guest too, with its ssh forward pointed at the address it then gets.
"""

from __future__ import annotations

import logging
import os
import time

from hvkit.errors import HvkitError
from hvkit.qemu import VM
from hvkit.qemu.agent import GuestAgent
from hvkit.qemu.network import DEFAULT_GUEST_IP, NETDEV_ID

log = logging.getLogger(__name__)


# Run by the guest's perl (perl-base is essential in Debian): host randomness into the
# input pool, then RNDRESEEDCRNG (_IO('R', 7)), so the CRNG is keyed from it at once.
_RESEED = ('open(my $w, ">", "/dev/urandom") or die "/dev/urandom: $!\\n"; binmode STDIN; local $/; '
           'my $seed = <STDIN>; length($seed) >= 32 or die "no seed on stdin\\n"; '
           'syswrite($w, $seed) == length($seed) or die "write: $!\\n"; '
           'ioctl($w, 0x5207, 0) or die "RNDRESEEDCRNG: $!\\n";')


def settle_child(vm: VM, timeout: float = 60.0) -> None:
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


def reseed_random(vm: VM, agent: GuestAgent) -> None:
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


def _forward_ssh_to_new_lease(vm: VM, agent: GuestAgent, nic: str, timeout: float = 20.0) -> None:
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


def set_clock(vm: VM) -> None:
    """The guest's clock set to the host's after it was paused for a while (a fork);
    an agent that does not answer at once is left alone (the guest runs on anyway)."""
    try:
        GuestAgent(vm.rundir.qga_sock).set_time()
    except HvkitError as e:
        log.warning("VM %s: its clock was not set after the fork (%s)", vm.name, e)
