"""Every guest-physical page in one class, from the kernel's own `struct page` array.

With SPARSEMEM_VMEMMAP the kernel keeps one `struct page` per page frame at
`vmemmap_base + pfn * sizeof(struct page)`. That array is read once (a few reads of
2 MiB pages, 1/64 of RAM) and decoded with NumPy using the compiled layout: the same
fields and bits the kernel's own /proc/kpageflags reads, so no per-page Python runs.

Classes, in the order they are decided (the first that fits wins):
  not present   no RAM, or no struct page (the memmap is not populated there)
  free          in a free block of the buddy allocator; the block's first page carries
                the page type "buddy" and its order in `private`
  page table    page type "table" (user page tables; kernel ones have no mark)
  slab          on the head of its compound page: the page flag PG_slab, or the page
                type "slab" (newer kernels)
  kernel image  PG_reserved inside the physical span of the kernel image
  reserved      PG_reserved elsewhere (firmware, memmap, ...), or page type "offline"
  anonymous     the head page's `mapping` has PAGE_MAPPING_ANON (FOLIO_MAPPING_ANON)
  page cache    the head page's `mapping` points to an address_space (files, tmpfs)
  kernel other  anything else the kernel holds: stacks, vmalloc, per-CPU lists, ...

How page types, slab pages and free-block orders are encoded differs between kernels
(bits cleared under PAGE_TYPE_BASE, or enum pagetype in page_type's top byte; PG_slab
or a slab page type): kernel.layout.PageEncoding decides it from the kernel's compiled
interface.

Everything read is guest data: free-block orders, compound-head pointers and mapping
pointers are checked, and what fails a check is reported, never trusted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hvkit.introspect.kernelspace import KernelSpace, kernel_half_shift
from hvkit.introspect.pagetables import lookup
from hvkit.introspect.tasks import SHARED_OWNER, TaskWalk
from hvkit.kernel.layout import Layout, PageEncoding
from hvkit.memory import PAGE_SIZE, GuestAddressError
from hvkit.pageclass import PageClass

__all__ = ["SHARED_OWNER", "PageClass", "PageMap", "classify", "frame_count", "read_memmap"]


@dataclass
class PageMap:
    """The class of every page frame 0 .. max_pfn-1 (NumPy arrays indexed by pfn)."""

    classes: np.ndarray  # uint8 PageClass
    order: np.ndarray  # int8: buddy order at the first page of each free block, -1 elsewhere
    owner: np.ndarray  # int32: pid of the one process that maps the page, SHARED_OWNER, or 0
    errors: list[str] = field(default_factory=list)

    @property
    def pages(self) -> int:
        return int(self.classes.size)

    def counts(self) -> dict[PageClass, int]:
        n = np.bincount(self.classes, minlength=len(PageClass))
        return {c: int(n[c]) for c in PageClass}

    def runs(self, cls: PageClass | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first pfn, length, class) of every run of consecutive pages of one class;
        only runs of `cls` when given."""
        c = self.classes
        starts = np.concatenate(([0], np.flatnonzero(c[1:] != c[:-1]) + 1)) if c.size else np.empty(0, np.int64)
        lengths = np.diff(np.append(starts, c.size))
        kinds = c[starts]
        if cls is not None:
            keep = kinds == cls
            starts, lengths, kinds = starts[keep], lengths[keep], kinds[keep]
        return starts, lengths, kinds

    def free_blocks_by_order(self) -> list[int]:
        """Free blocks per buddy order, like /proc/buddyinfo summed over zones."""
        o = self.order[self.order >= 0]
        return np.bincount(o, minlength=int(o.max()) + 1 if o.size else 0).tolist()

    def anonymous_by_owner(self) -> dict[int, int]:
        """Anonymous pages per owning pid (SHARED_OWNER: mapped by several)."""
        owners = self.owner[self.classes == PageClass.ANONYMOUS]
        pids, n = np.unique(owners[owners != 0], return_counts=True)
        return {int(p): int(k) for p, k in zip(pids, n)}


# -- reading the struct page array ----------------------------------------------------

def _page_dtype(layout: Layout) -> np.dtype:
    off = lambda f: layout.offset("page", f)  # noqa: E731
    compound = layout.page_encoding().compound_field  # compound_head, or compound_info (7.x)
    return np.dtype({
        "names": ["flags", "compound_head", "mapping", "private", "page_type"],
        "formats": ["<u8", "<u8", "<u8", "<u8", "<u4"],
        "offsets": [off("flags"), off(compound), off("mapping"), off("private"), off("page_type")],
        "itemsize": layout.size("page"),
    })


def frame_count(ks: KernelSpace, layout: Layout) -> int:
    """Page frames to classify: up to the kernel's max_pfn rounded up to a whole memory
    section (the kernel keeps struct pages, and /proc/kpageflags reports, per section),
    but never past the memory (an ELF core also holds BIOS ROM just below 4 GiB)."""
    section = 1 << (layout.const("SECTION_SIZE_BITS") - layout.const("PAGE_SHIFT"))
    return min(ks.mem.max_pfn, -(-ks.max_pfn // section) * section)


def read_memmap(ks: KernelSpace, layout: Layout, errors: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(struct page of every page frame, mask of the frames that have one). The array's
    virtual range is walked through the kernel's page tables a mapping at a time; what
    is not mapped (or mapped outside RAM) is left as zeros, not present."""
    mem = ks.mem
    dtype = _page_dtype(layout)
    n = frame_count(ks, layout)
    size = dtype.itemsize
    raw = bytearray(n * size)
    view = memoryview(raw)
    have = np.zeros(n, bool)
    pos, unreadable, first_error = 0, 0, ""
    while pos < len(raw):
        va = ks.vmemmap_base + pos
        try:
            pa, span = lookup(mem, ks.top_pgt, va, ks.levels)
        except GuestAddressError as e:  # a lying page table: skip this page of the array
            pa, span = None, PAGE_SIZE - (va % PAGE_SIZE)
            unreadable += 1
            first_error = first_error or f"at {va:#x}: {e}"
        span = min(span, len(raw) - pos)
        if pa is not None and mem.contains(pa, span):
            mem.read_into(pa, view[pos : pos + span])
            have[-(-pos // size) : (pos + span) // size] = True
        elif pa is not None:
            unreadable += 1
            first_error = first_error or f"at {va:#x}: maps to {pa:#x}, outside RAM"
        pos += span
    if unreadable:
        errors.append(f"struct page array: {unreadable} pages of it unreadable (first {first_error}); "
                      "their page frames count as not present")
    elif n and not have.any():  # a kernel always maps its array: vmemmap_base or its tables lie
        errors.append(f"struct page array: nothing of it is mapped at vmemmap_base = {ks.vmemmap_base:#x}; "
                      "every page frame counts as not present")
    in_ram = np.zeros(n, bool)
    for r in mem.ranges:
        in_ram[r.gpa // PAGE_SIZE : min(r.end // PAGE_SIZE, n)] = True
    return np.frombuffer(raw, dtype), have & in_ram


# -- deciding the class of each page ---------------------------------------------------

MAX_REPORTED = 3  # example pfns named in one error line


def _examples(pfns: np.ndarray) -> str:
    return ", ".join(str(int(p)) for p in pfns[:MAX_REPORTED]) + (", ..." if pfns.size > MAX_REPORTED else "")


def _has_type(enc: PageEncoding, page_type: np.ndarray, name: str) -> np.ndarray:
    """PageBuddy() and friends, as this kernel tests them (PageEncoding: a bit cleared
    under PAGE_TYPE_BASE, or the top byte of page_type)."""
    test = enc.types[name]
    return (page_type & np.uint32(test.mask)) == np.uint32(test.value)


def _head_pfns(ks: KernelSpace, layout: Layout, pages: np.ndarray, errors: list[str]) -> np.ndarray:
    """The pfn of each page's compound head (itself for a page that is not a tail). A
    tail's compound word is the head's struct page address plus 1, or (PageEncoding.
    tail_mask) a mask plus 1 that turns the tail's own struct page address into the head's."""
    pfn = np.arange(pages.size, dtype=np.int64)
    ch = pages["compound_head"]
    tail = (ch & np.uint64(1)) != 0
    size = np.uint64(pages.dtype.itemsize)
    if layout.page_encoding().tail_mask:
        own = np.uint64(ks.vmemmap_base) + pfn[tail].astype(np.uint64) * size
        head = own & (ch[tail] - np.uint64(1))
    else:
        head = ch[tail] - np.uint64(1)
    rel = head - np.uint64(ks.vmemmap_base)  # wraps when below: caught next
    ok = (rel % size == 0) & (rel // size < np.uint64(pages.size))
    tails = pfn[tail]
    if not ok.all():
        errors.append(f"{int((~ok).sum())} compound tail pages point at no struct page "
                      f"(pfn {_examples(tails[~ok])}); taken as pages of their own")
    pfn[tails[ok]] = (rel[ok] // size).astype(np.int64)
    return pfn


def _free_pages(enc: PageEncoding, pages: np.ndarray, order: np.ndarray, errors: list[str]) -> np.ndarray:
    """Mask of the pages inside free buddy blocks; fills `order` at each block's head.
    A head whose order is impossible (past the kernel's free lists, misaligned, past the
    end) is reported and its block is not counted free: releasing memory on a guest's
    word needs it right."""
    n = pages.size
    heads = np.flatnonzero(_has_type(enc, pages["page_type"], "buddy"))
    orders = pages["private"][heads]
    ok = orders < np.uint64(enc.free_orders)
    sizes = np.ones(heads.size, np.int64)
    sizes[ok] = np.left_shift(1, orders[ok].astype(np.int64))
    ok &= (heads % sizes == 0) & (heads + sizes <= n)
    if not ok.all():
        errors.append(f"{int((~ok).sum())} free blocks have impossible orders "
                      f"(pfn {_examples(heads[~ok])}); not counted free")
    heads, sizes = heads[ok], sizes[ok]
    order[heads] = orders[ok].astype(np.int8)
    edges = np.zeros(n + 1, np.int64)  # +1 where a block starts, -1 where it ends
    np.add.at(edges, heads, 1)
    np.add.at(edges, heads + sizes, -1)
    return np.cumsum(edges[:n]) > 0


def _slab(enc: PageEncoding, pages: np.ndarray, heads: np.ndarray) -> np.ndarray:
    """Pages of slab memory: the compound head carries the page flag PG_slab, or (on
    kernels where slab is a page type) the page type slab."""
    if enc.slab_flag is not None:
        return (pages["flags"][heads] >> np.uint64(enc.slab_flag)) & np.uint64(1) != 0
    return _has_type(enc, pages["page_type"][heads], "slab")


def _is_kernel_pointer(p: np.ndarray, levels: int) -> np.ndarray:
    shift = kernel_half_shift(levels)
    return (p >> np.uint64(shift)) == np.uint64((1 << (64 - shift)) - 1)


def classify(ks: KernelSpace, layout: Layout, tasks: TaskWalk | None = None) -> PageMap:
    """The class of every page frame of the guest; owners of mapped pages from `tasks`
    (a task walk with frames) when given."""
    enc = layout.page_encoding()  # before reading: a kernel hvkit cannot decode fails fast
    errors: list[str] = []
    pages, present = read_memmap(ks, layout, errors)
    n = pages.size
    order = np.full(n, -1, np.int8)
    heads = _head_pfns(ks, layout, pages, errors)
    mapping = pages["mapping"][heads]
    flag = lambda flags, name: (flags >> np.uint64(layout.const(name))) & np.uint64(1) != 0  # noqa: E731
    image = np.zeros(n, bool)
    image[ks.phys_text // PAGE_SIZE : -(-ks.symbol_pa("_end") // PAGE_SIZE)] = True
    low_bits = mapping & np.uint64(enc.mapping_flags)
    reserved = flag(pages["flags"], "PG_reserved") | _has_type(enc, pages["page_type"], "offline")

    # The first condition that holds decides (np.select takes them in order).
    conditions = [
        ~present,
        _free_pages(enc, pages, order, errors),
        _has_type(enc, pages["page_type"], "table"),
        _slab(enc, pages, heads),
        reserved & image,
        reserved,
        (low_bits & np.uint64(enc.mapping_anon)) != 0,
        (mapping != 0) & (low_bits == 0) & _is_kernel_pointer(mapping, ks.levels),
    ]
    choices = [PageClass.NOT_PRESENT, PageClass.FREE, PageClass.PAGE_TABLE, PageClass.SLAB,
               PageClass.KERNEL_IMAGE, PageClass.RESERVED, PageClass.ANONYMOUS, PageClass.PAGE_CACHE]
    classes = np.select(conditions, [np.uint8(c) for c in choices], np.uint8(PageClass.KERNEL_OTHER)).astype(np.uint8)
    order[classes != PageClass.FREE] = -1
    return PageMap(classes, order, _owners(n, tasks), errors)


def _owners(n: int, tasks: TaskWalk | None) -> np.ndarray:
    """The task walk's owner of each of the `n` page frames (0 where it has none)."""
    owner = np.zeros(n, np.int32)
    if tasks is not None and tasks.owner is not None:
        m = min(n, tasks.owner.size)
        owner[:m] = tasks.owner[:m]
    return owner
