/*
 * hvkit's fixed interface: compiled against the headers and .config of the guest's exact
 * kernel, it turns into an object file from which hvkit reads
 *
 *   - structure layouts (sizes and field offsets) from the DWARF of the types below;
 *   - constants that no debug information carries (preprocessor macros such as the
 *     page-type values), as initialised data: one symbol hvkit_c_<NAME> per constant.
 *
 * It is never loaded into a kernel. Every macro is guarded with #ifdef, so the same file
 * builds on kernels that lack some of them; enum values come from the DWARF (the build
 * keeps unused types with -fno-eliminate-unused-debug-types).
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

HVKIT_CONST(PAGE_SHIFT)
HVKIT_CONST(__START_KERNEL_map)
HVKIT_CONST(TASK_COMM_LEN)
HVKIT_CONST(MAX_NR_ZONES)
HVKIT_CONST(PAGE_MAPPING_ANON)
HVKIT_CONST(PAGE_MAPPING_MOVABLE)
#ifdef MAX_ORDER
HVKIT_CONST(MAX_ORDER)
#endif
#ifdef MAX_PAGE_ORDER
HVKIT_CONST(MAX_PAGE_ORDER)
#endif
#ifdef NR_PAGE_ORDERS
HVKIT_CONST(NR_PAGE_ORDERS)
#endif
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
#ifdef PAGE_TYPE_SHIFT
HVKIT_CONST(PAGE_TYPE_SHIFT)
#endif
#ifdef SECTION_SIZE_BITS
HVKIT_CONST(SECTION_SIZE_BITS)
#endif
/* /proc/kpageflags bit numbers, so tests read the guest's ground truth by name */
HVKIT_CONST(KPF_SLAB)
HVKIT_CONST(KPF_BUDDY)
HVKIT_CONST(KPF_ANON)
HVKIT_CONST(KPF_LRU)
HVKIT_CONST(KPF_NOPAGE)
HVKIT_CONST(KPF_PGTABLE)
HVKIT_CONST(KPF_RESERVED)
HVKIT_CONST(KPF_OFFLINE)
HVKIT_CONST(KPF_MMAP)
HVKIT_CONST(KPF_COMPOUND_TAIL)
HVKIT_CONST(KPF_COMPOUND_HEAD)
HVKIT_CONST(KPF_THP)
HVKIT_CONST(KPF_ZERO_PAGE)
HVKIT_CONST(KPF_HUGE)

MODULE_LICENSE("GPL");
