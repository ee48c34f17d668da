"""Members of kernel-private structures, from the kernel's own BTF.

Some of what the guest's own tools show lives in structures no headers package has:
a kernel thread's full name (`struct kthread`, kernel/kthread.c) and what a workqueue
worker is doing (`struct worker`, kernel/workqueue_internal.h). Every Debian kernel
carries BTF (CONFIG_DEBUG_INFO_BTF) with those types, in the same vmlinux as its
kallsyms, so their offsets are read from there (btf.py) and kept with the symbols. A
kernel without BTF, or without one of these members, simply has no entry: what needs it
falls back to what the headers give (task->comm).
"""

from __future__ import annotations

import logging

from hvkit.errors import HvkitError
from hvkit.kernel.btf import Btf, btf_of_vmlinux

log = logging.getLogger(__name__)

# struct -> the members hvkit reads from it
WANTED = {
    "kthread": ("full_name", "data"),
    "worker": ("desc", "current_work", "pool"),
}


def _members(btf: Btf, struct: str, wanted: tuple[str, ...]) -> dict[str, int] | None:
    """{member: byte offset} of `struct` (anonymous members flattened), plus
    "<member>.len" for array members; None when the kernel lacks any of them."""
    found: dict[str, int] = {}
    for t in btf.named("struct", struct)[:1]:
        pending = [(t, 0)]
        while pending:
            agg, base = pending.pop()
            for m in agg.members:
                offset = base + m.bit_offset // 8
                kind = btf.resolve(m.type)
                if not m.name and kind.kind in ("STRUCT", "UNION"):
                    pending.append((kind, offset))
                elif m.name in wanted:
                    found[m.name] = offset
                    if kind.kind == "ARRAY":
                        found[f"{m.name}.len"] = kind.nelems
    return found if all(w in found for w in wanted) else None


def private_layouts(vmlinux: bytes) -> dict[str, dict[str, int]]:
    """The WANTED members of the kernel ELF `vmlinux` ({} without BTF)."""
    try:
        btf = btf_of_vmlinux(vmlinux)
    except HvkitError as e:
        log.warning("the kernel's BTF is unreadable (%s); private structures unknown", e)
        return {}
    if btf is None:
        return {}
    layouts = {}
    for struct, wanted in WANTED.items():
        members = _members(btf, struct, wanted)
        if members is not None:
            layouts[struct] = members
    return layouts
