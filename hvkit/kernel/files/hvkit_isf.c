/*
 * hvkit's interface for a Volatility 3 symbol table (ISF): compiled against the headers and
 * .config of the guest's exact kernel with -g -fno-eliminate-unused-debug-types, its DWARF
 * carries every structure, union, enum and typedef these headers declare, laid out exactly
 * as the kernel's build lays them out (hvkit/kernel/isf.py reads it). Types that live in
 * the kernel's private headers (struct mount, the printk ring buffer, ...) are not here;
 * isf.py takes them from the kernel's own BTF.
 *
 * Global variables: for each kernel variable that Volatility's Linux plugins read as an
 * object, a pointer to it is declared, so its DWARF gives the variable's type:
 *
 *   hvkit_v_<name>   __typeof__(&name): the variable is declared by a header; the type is
 *                    the kernel's own declaration (preferred by isf.py);
 *   hvkit_p_<name>   a pointer to a type written here by hand, for variables that are
 *                    static or declared only in a private header (used only when neither
 *                    a header nor the kernel's BTF gives the type). Each says why.
 *
 * It is never loaded into a kernel. Every macro is guarded with #ifdef (as in
 * hvkit_layout.c) and only variables that every supported kernel (Linux 6.1 to 6.12)
 * declares are referenced, so the same file builds on each of them.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/init.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>
#include <linux/init_task.h>
#include <linux/sched/mm.h>
#include <linux/mm.h>
#include <linux/mm_types.h>
#include <linux/mmzone.h>
#include <linux/maple_tree.h>
#include <linux/swap.h>
#include <linux/pagemap.h>
#include <linux/shmem_fs.h>
#include <linux/vmalloc.h>
#include <linux/slab.h>
#include <linux/fs.h>
#include <linux/fs_struct.h>
#include <linux/fdtable.h>
#include <linux/file.h>
#include <linux/mount.h>
#include <linux/dcache.h>
#include <linux/namei.h>
#include <linux/path.h>
#include <linux/seq_file.h>
#include <linux/proc_fs.h>
#include <linux/proc_ns.h>
#include <linux/mnt_namespace.h>
#include <linux/cred.h>
#include <linux/capability.h>
#include <linux/user_namespace.h>
#include <linux/pid.h>
#include <linux/pid_namespace.h>
#include <linux/nsproxy.h>
#include <linux/utsname.h>
#include <linux/ipc_namespace.h>
#include <linux/binfmts.h>
#include <linux/elf.h>
#include <linux/ptrace.h>
#include <linux/kthread.h>
#include <linux/kobject.h>
#include <linux/sysfs.h>
#include <linux/kallsyms.h>
#include <linux/ftrace.h>
#include <linux/tracepoint.h>
#include <linux/idr.h>
#include <linux/radix-tree.h>
#include <linux/xarray.h>
#include <linux/rbtree.h>
#include <linux/rbtree_latch.h>
#include <linux/printk.h>
#include <linux/kmsg_dump.h>
#include <linux/tty.h>
#include <linux/tty_driver.h>
#include <linux/keyboard.h>
#include <linux/notifier.h>
#include <linux/ioport.h>
#include <linux/interrupt.h>
#include <linux/irq.h>
#include <linux/irqdesc.h>
#include <linux/timekeeper_internal.h>
#include <linux/timekeeping.h>
#include <linux/time.h>
#include <linux/bpf.h>
#include <linux/filter.h>
#include <linux/fb.h>
#include <linux/net.h>
#include <linux/socket.h>
#include <linux/un.h>
#include <linux/netdevice.h>
#include <linux/netfilter.h>
#include <linux/netlink.h>
#include <linux/ipv6.h>
#include <linux/if_packet.h>
#include <net/sock.h>
#include <net/inet_sock.h>
#include <net/inet_connection_sock.h>
#include <net/inet_timewait_sock.h>
#include <net/af_unix.h>
#include <net/tcp.h>
#include <net/udp.h>
#include <net/raw.h>
#include <net/ipv6.h>
#include <net/net_namespace.h>
#include <net/af_vsock.h>
#include <net/xdp_sock.h>
#include <asm/desc.h>
#include <asm/syscall.h>
#include <asm/processor.h>

/* variables declared by the kernel's headers: their type is the header's */
#define HVKIT_VAR(name) __typeof__(&(name)) hvkit_v_##name;

HVKIT_VAR(init_task)             /* linux/sched/task.h */
HVKIT_VAR(init_files)            /* linux/init_task.h */
HVKIT_VAR(init_pid_ns)           /* linux/pid_namespace.h */
HVKIT_VAR(init_nsproxy)          /* linux/nsproxy.h */
HVKIT_VAR(init_net)              /* net/net_namespace.h */
HVKIT_VAR(init_mm)               /* linux/mm_types.h */
/* init_cred: declared by linux/init_task.h up to 6.x only; its declaration there types it */
HVKIT_VAR(init_user_ns)          /* linux/user_namespace.h */
HVKIT_VAR(iomem_resource)        /* linux/ioport.h */
HVKIT_VAR(ioport_resource)       /* linux/ioport.h */
HVKIT_VAR(module_kset)           /* linux/module.h */
HVKIT_VAR(net_namespace_list)    /* net/net_namespace.h */
HVKIT_VAR(tty_drivers)           /* linux/tty_driver.h */
HVKIT_VAR(mem_section)           /* linux/mmzone.h (SPARSEMEM_EXTREME) */
HVKIT_VAR(vmemmap_base)          /* asm/pgtable_64_types.h */
HVKIT_VAR(page_offset_base)      /* asm/page_64.h */
HVKIT_VAR(vmalloc_base)          /* asm/pgtable_64_types.h */
HVKIT_VAR(sys_call_table)        /* asm/syscall.h */
HVKIT_VAR(jiffies)               /* linux/jiffies.h */
HVKIT_VAR(boot_cpu_data)         /* asm/processor.h */
HVKIT_VAR(init_uts_ns)           /* linux/utsname.h */
HVKIT_VAR(linux_banner)          /* linux/printk.h */
#ifdef CONFIG_NUMA
HVKIT_VAR(node_data)             /* asm/mmzone_64.h */
#endif

/*
 * Variables private to one kernel source file (static, or declared in a header under
 * kernel/ or drivers/ that the headers package lacks), written here by hand. isf.py
 * uses these only when neither a header (above) nor a BTF VAR of the kernel gives the
 * type. Pointers to incomplete structures are fine: the structure comes from the BTF.
 */
/* kernel/printk/printk.c: static struct printk_ringbuffer *prb (since 5.10) */
struct printk_ringbuffer **hvkit_p_prb;
/* kernel/printk/printk.c: static char *log_buf */
char **hvkit_p_log_buf;
/* kernel/printk/printk.c: static u32 log_buf_len */
u32 *hvkit_p_log_buf_len;
/* kernel/module/internal.h: extern struct list_head modules */
struct list_head *hvkit_p_modules;
/* kernel/module/internal.h: extern struct mod_tree_root mod_tree (CONFIG_MODULES_TREE_LOOKUP) */
struct mod_tree_root *hvkit_p_mod_tree;
/* drivers/tty/vt/keyboard.c: static ATOMIC_NOTIFIER_HEAD(keyboard_notifier_list) */
struct atomic_notifier_head *hvkit_p_keyboard_notifier_list;
/* kernel/bpf/syscall.c: static DEFINE_IDR(prog_idr) */
struct idr *hvkit_p_prog_idr;
/* net/socket.c: static const struct file_operations socket_file_ops */
const struct file_operations *hvkit_p_socket_file_ops;
/* net/socket.c: static const struct dentry_operations sockfs_dentry_operations */
const struct dentry_operations *hvkit_p_sockfs_dentry_operations;
/* kernel/panic.c: const struct taint_flag taint_flags[TAINT_FLAGS_COUNT] (declared in
 * linux/panic.h on newer kernels, linux/kernel.h on older: by hand to build on both) */
const struct taint_flag (*hvkit_p_taint_flags)[TAINT_FLAGS_COUNT];
/* kernel/sysctl.c: static const int cap_last_cap = CAP_LAST_CAP */
const int *hvkit_p_cap_last_cap;
/* kernel/time/timekeeping.c: static struct { seqcount_raw_spinlock_t seq; struct timekeeper
 * timekeeper; } tk_core ____cacheline_aligned: an anonymous structure, replicated here */
struct hvkit_tk_core {
	seqcount_raw_spinlock_t seq;
	struct timekeeper timekeeper;
};
struct hvkit_tk_core *hvkit_p_tk_core;
/* arch/x86/kernel/idt.c: static gate_desc idt_table[IDT_ENTRIES] */
gate_desc (*hvkit_p_idt_table)[IDT_ENTRIES];
/* arch/x86/entry/syscall_32.c: const sys_call_ptr_t ia32_sys_call_table[] (its declaration in
 * asm/syscall.h moved between versions) */
#ifdef CONFIG_IA32_EMULATION
const sys_call_ptr_t (*hvkit_p_ia32_sys_call_table)[];
#endif
/* drivers/video/fbdev/core/fbmem.c: struct fb_info *registered_fb[FB_MAX]; int
 * num_registered_fb (declared in linux/fb.h only while fbdev exports them) */
struct fb_info *(*hvkit_p_registered_fb)[FB_MAX];
int *hvkit_p_num_registered_fb;
/* kernel/kallsyms_internal.h: the kallsyms tables (in kallsyms itself only since 6.x, and
 * only their addresses matter to Volatility, but it sizes num_syms by its type) */
const unsigned int *hvkit_p_kallsyms_num_syms;
const unsigned long *hvkit_p_kallsyms_relative_base;
/* include/asm-generic/vmlinux.lds.h: the tracepoint table's bounds (linker symbols; the
 * element type is the header's: an int offset with PREL32 relocations, else a pointer) */
#ifdef CONFIG_TRACEPOINTS
tracepoint_ptr_t (*hvkit_p___start___tracepoints_ptrs)[];
#endif
/* net/ipv4/tcp_ipv4.c, net/ipv6/tcp_ipv6.c, net/ipv4/udp.c, ...: static struct
 * tcp_seq_afinfo tcp4_seq_afinfo and the like, and static const struct seq_operations
 * *_seq_ops (the proc interfaces Volatility's check_afinfo compares with the kernel's) */
struct tcp_seq_afinfo *hvkit_p_tcp4_seq_afinfo, *hvkit_p_tcp6_seq_afinfo;
struct udp_seq_afinfo *hvkit_p_udp4_seq_afinfo, *hvkit_p_udp6_seq_afinfo,
	*hvkit_p_udplite4_seq_afinfo, *hvkit_p_udplite6_seq_afinfo;
const struct seq_operations *hvkit_p_raw_seq_ops, *hvkit_p_udp_seq_ops, *hvkit_p_arp_seq_ops,
	*hvkit_p_unix_seq_ops, *hvkit_p_udp6_seq_ops, *hvkit_p_raw6_seq_ops, *hvkit_p_tcp_seq_ops,
	*hvkit_p_tcp4_seq_ops, *hvkit_p_tcp6_seq_ops, *hvkit_p_packet_seq_ops;
/* kernel/trace/ftrace.c: static LIST_HEAD(ftrace_mod_maps), LIST_HEAD(ftrace_ops_trampoline_list);
 * kernel/bpf/core.c: static LIST_HEAD(bpf_kallsyms) (where Volatility finds symbols kallsyms lacks) */
struct list_head *hvkit_p_ftrace_mod_maps, *hvkit_p_ftrace_ops_trampoline_list, *hvkit_p_bpf_kallsyms;
/* kernel/trace/ftrace.c: struct ftrace_ops __rcu *ftrace_ops_list, ftrace_list_end */
#ifdef CONFIG_FUNCTION_TRACER
struct ftrace_ops **hvkit_p_ftrace_ops_list;
struct ftrace_ops *hvkit_p_ftrace_list_end;
#endif

/* macro constants no debug information carries (as in hvkit_layout.c) */
#define HVKIT_CONST(name) const unsigned long long hvkit_c_##name = (unsigned long long)(name);
#ifdef PAGE_SHIFT
HVKIT_CONST(PAGE_SHIFT)
#endif
#ifdef TASK_COMM_LEN
HVKIT_CONST(TASK_COMM_LEN)
#endif
#ifdef __START_KERNEL_map
HVKIT_CONST(__START_KERNEL_map)
#endif
