"""A NUMA guest's nodes as its kernel keeps them (`node_data[]`, one `pglist_data` per
node), read to check that guest RAM made of several memory backends is assembled in the
right order.

QEMU lays a NUMA machine's node backends end to end in node order, and says which
backend is which (probe.py); what it does not say is where each backend lies in its own
process. hvkit finds that in QEMU's own records (qemu/ramblocks.py); where it cannot,
and nodes have RAM of the same size inside QEMU, it tries the ways of placing them
(VM.memory_candidates) and keeps the one where the kernel's own node records read back
as themselves. Each node's `pglist_data` is allocated on that node (a guest with one
node: at the top of its RAM, memblock allocating top down), so in a wrong placement a
record reads as other memory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hvkit.errors import HvkitError
from hvkit.introspect.kernelspace import GuestInconsistent, KernelSpace
from hvkit.kernel.layout import Layout


@dataclass(frozen=True)
class Node:
    nid: int
    start_pfn: int  # first page frame of the node
    spanned: int  # pages from start_pfn to the node's end (holes included)


def kernel_nodes(ks: KernelSpace, layout: Layout, count: int) -> list[Node]:
    """The nodes among 0 .. count-1 that the kernel has (a guest may see fewer nodes than
    QEMU has backends: without ACPI it finds no SRAT and makes one node of all RAM);
    GuestInconsistent when a node's record does not read as itself: its zones point
    back to it (`zone_pgdat`), it names its own id, nodes follow each other. A record
    read from the wrong backend fails that."""
    if "node_data" not in ks.symbols:
        raise HvkitError(f"kernel {ks.symbols.release} has no node_data (built without CONFIG_NUMA)",
                         "its RAM cannot be split across NUMA nodes")
    pointers = struct.unpack(f"<{count}Q", ks.read(ks.symbol_va("node_data"), 8 * count))
    at = {name: layout.offset("pglist_data", name) for name in ("node_id", "node_start_pfn", "node_spanned_pages")}
    back = layout.offset("pglist_data", "node_zones") + layout.offset("zone", "zone_pgdat")
    nodes: list[Node] = []
    for nid, pgdat in enumerate(pointers):
        if pgdat == 0:
            continue
        try:
            own = struct.unpack("<i", ks.read(pgdat + at["node_id"], 4))[0]
            start, spanned = ks.read_u64(pgdat + at["node_start_pfn"]), ks.read_u64(pgdat + at["node_spanned_pages"])
            points_back = ks.read_u64(pgdat + back) == pgdat
        except HvkitError:
            raise GuestInconsistent(f"node {nid}'s record at {pgdat:#x} is not in guest RAM") from None
        if own != nid or not points_back or (nodes and start < nodes[-1].start_pfn + nodes[-1].spanned) \
                or start + spanned > ks.max_pfn:
            raise GuestInconsistent(f"node {nid}'s record does not read as node {nid} (node_id {own}, "
                                    f"pages {start:#x}+{spanned:#x})")
        nodes.append(Node(nid, start, spanned))
    if not nodes:
        raise GuestInconsistent("the kernel's node_data lists no node")
    return nodes
