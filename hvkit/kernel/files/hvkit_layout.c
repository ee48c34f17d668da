/*
 * hvkit's fixed interface: compiled against the headers and .config of the guest's exact
 * kernel, it turns into an object file from which hvkit reads
 *
 *   - structure layouts (sizes and field offsets) from the DWARF of the types below;
 *   - enum values from the DWARF, each under its enum's name (enum pageflags, enum
 *     pagetype, ...: the build keeps unused types with -fno-eliminate-unused-debug-types);
 *   - constants that no debug information carries (preprocessor macros such as the
 *     page-type values of older kernels), as initialised data: one symbol
 *     hvkit_c_<NAME> per constant.
 *
 * It is never loaded into a kernel. Every macro is guarded with #ifdef, so the same file
 * builds on kernels that lack some of them (or have an enum of that name instead): what
 * a kernel lacks is missing from the layout, and hvkit names it when it needs it.
 * hvkit decides how this kernel marks its pages from what is found here, never from
 * its version number (hvkit/kernel/layout.py, PageEncoding):
 *
 *   - page types as bits cleared under PAGE_TYPE_BASE (macros PG_buddy, PG_table, ...:
 *     Linux up to 6.10), or as the top byte of page_type (enum pagetype, PGTY_buddy,
 *     ...: Linux 6.11 and later);
 *   - slab pages marked by the page flag PG_slab (a member of enum pageflags), or by a
 *     page type (the macro PG_slab of 6.10, PGTY_slab of enum pagetype);
 *   - compound tails: the head's address + 1 in page->compound_head, or in 7.x's
 *     page->compound_info either that or a mask over the tail's own address;
 *   - free-block orders 0 .. HVKIT_FREE_AREAS - 1: the length of struct zone's free_area
 *     array, whatever the kernel calls its bound (MAX_ORDER, NR_PAGE_ORDERS).
 */
#include <linux/module.h>
#include <linux/mm.h>
#include <linux/mm_types.h>
#include <linux/mmzone.h>
#include <linux/page-flags.h>
#include <linux/sched.h>
#include <linux/fs.h>
#include <linux/utsname.h>
#include <linux/kernel-page-flags.h>

#define HVKIT_SIZE(type) const unsigned long long hvkit_s_##type = sizeof(struct type);
#define HVKIT_CONST(name) const unsigned long long hvkit_c_##name = (unsigned long long)(name);
#define HVKIT_VALUE(name, value) const unsigned long long hvkit_c_##name = (unsigned long long)(value);

HVKIT_SIZE(page)
HVKIT_SIZE(task_struct)
HVKIT_SIZE(mm_struct)
HVKIT_SIZE(vm_area_struct)
HVKIT_SIZE(zone)
HVKIT_SIZE(free_area)
HVKIT_SIZE(pglist_data)
HVKIT_SIZE(address_space)
HVKIT_SIZE(list_head)
HVKIT_SIZE(new_utsname)

/* what the C language itself can tell, on every kernel */
HVKIT_VALUE(HVKIT_FREE_AREAS, sizeof(((struct zone *)0)->free_area) / sizeof(struct free_area))
HVKIT_VALUE(HVKIT_PAGE_TYPE_BYTES, sizeof(((struct page *)0)->page_type))

#ifdef PAGE_SHIFT
HVKIT_CONST(PAGE_SHIFT)
#endif
#ifdef __START_KERNEL_map
HVKIT_CONST(__START_KERNEL_map)
#endif
#ifdef TASK_COMM_LEN /* an enum value in newer kernels: then from the DWARF */
HVKIT_CONST(TASK_COMM_LEN)
#endif
#ifdef MAX_NR_ZONES
HVKIT_CONST(MAX_NR_ZONES)
#endif
#ifdef PAGE_MAPPING_ANON
HVKIT_CONST(PAGE_MAPPING_ANON)
#endif
#ifdef PAGE_MAPPING_MOVABLE
HVKIT_CONST(PAGE_MAPPING_MOVABLE)
#endif
#ifdef PAGE_MAPPING_FLAGS
HVKIT_CONST(PAGE_MAPPING_FLAGS)
#endif
#ifdef FOLIO_MAPPING_ANON /* the names of 6.16 and later */
HVKIT_CONST(FOLIO_MAPPING_ANON)
#endif
#ifdef FOLIO_MAPPING_FLAGS
HVKIT_CONST(FOLIO_MAPPING_FLAGS)
#endif
#ifdef SECTION_SIZE_BITS
HVKIT_CONST(SECTION_SIZE_BITS)
#endif

/* which tasks are kernel threads and workqueue workers (their names, as /proc shows them) */
#ifdef PF_KTHREAD
HVKIT_CONST(PF_KTHREAD)
#endif
#ifdef PF_WQ_WORKER
HVKIT_CONST(PF_WQ_WORKER)
#endif

/* the bound of free-block orders, by whichever name this kernel has */
#ifdef MAX_ORDER
HVKIT_CONST(MAX_ORDER)
#endif
#ifdef MAX_PAGE_ORDER
HVKIT_CONST(MAX_PAGE_ORDER)
#endif
#ifdef NR_PAGE_ORDERS
HVKIT_CONST(NR_PAGE_ORDERS)
#endif

/* page types as bits cleared under PAGE_TYPE_BASE (macros, up to Linux 6.10) */
#ifdef PAGE_TYPE_BASE
HVKIT_CONST(PAGE_TYPE_BASE)
#endif
#ifdef PAGE_MAPCOUNT_RESERVE
HVKIT_CONST(PAGE_MAPCOUNT_RESERVE)
#endif
#ifdef PG_buddy
HVKIT_CONST(PG_buddy)
#endif
#ifdef PG_offline
HVKIT_CONST(PG_offline)
#endif
#ifdef PG_table
HVKIT_CONST(PG_table)
#endif
#ifdef PG_guard
HVKIT_CONST(PG_guard)
#endif
#ifdef PG_slab /* a macro only where slab is a page type (6.10); else enum pageflags' flag bit */
HVKIT_VALUE(PAGE_TYPE_PG_slab, PG_slab)
#endif
#ifdef PAGE_TYPE_SHIFT
HVKIT_CONST(PAGE_TYPE_SHIFT)
#endif

/* where the direct map and the struct page array start in a kernel built without
 * CONFIG_RANDOMIZE_MEMORY (with it, the variables page_offset_base and vmemmap_base) */
#ifdef __PAGE_OFFSET_BASE_L4
HVKIT_CONST(__PAGE_OFFSET_BASE_L4)
#endif
#ifdef __PAGE_OFFSET_BASE_L5
HVKIT_CONST(__PAGE_OFFSET_BASE_L5)
#endif
#ifdef __VMEMMAP_BASE_L4
HVKIT_CONST(__VMEMMAP_BASE_L4)
#endif
#ifdef __VMEMMAP_BASE_L5
HVKIT_CONST(__VMEMMAP_BASE_L5)
#endif

/* how a compound tail names its head: Linux 7.x keeps, in page->compound_info, a mask
 * (instead of the head's address) where this option is on and sizeof(struct page) is a
 * power of two (compound_info_has_mask() in linux/page-flags.h) */
#ifdef CONFIG_HUGETLB_PAGE_OPTIMIZE_VMEMMAP
HVKIT_VALUE(HVKIT_HUGETLB_PAGE_OPTIMIZE_VMEMMAP, 1)
#endif

/* /proc/kpageflags bit numbers, so tests read the guest's ground truth by name */
#ifdef KPF_SLAB
HVKIT_CONST(KPF_SLAB)
#endif
#ifdef KPF_BUDDY
HVKIT_CONST(KPF_BUDDY)
#endif
#ifdef KPF_ANON
HVKIT_CONST(KPF_ANON)
#endif
#ifdef KPF_LRU
HVKIT_CONST(KPF_LRU)
#endif
#ifdef KPF_NOPAGE
HVKIT_CONST(KPF_NOPAGE)
#endif
#ifdef KPF_PGTABLE
HVKIT_CONST(KPF_PGTABLE)
#endif
#ifdef KPF_RESERVED
HVKIT_CONST(KPF_RESERVED)
#endif
#ifdef KPF_OFFLINE
HVKIT_CONST(KPF_OFFLINE)
#endif
#ifdef KPF_MMAP
HVKIT_CONST(KPF_MMAP)
#endif
#ifdef KPF_COMPOUND_TAIL
HVKIT_CONST(KPF_COMPOUND_TAIL)
#endif
#ifdef KPF_COMPOUND_HEAD
HVKIT_CONST(KPF_COMPOUND_HEAD)
#endif
#ifdef KPF_THP
HVKIT_CONST(KPF_THP)
#endif
#ifdef KPF_ZERO_PAGE
HVKIT_CONST(KPF_ZERO_PAGE)
#endif
#ifdef KPF_HUGE
HVKIT_CONST(KPF_HUGE)
#endif

MODULE_LICENSE("GPL");
