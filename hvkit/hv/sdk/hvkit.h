/* hvkit guest SDK: the hypercall API of hvkit's own hypervisor (hvkit hv).
 *
 * A guest is a freestanding x86-64 program that starts in long mode at hv_main(),
 * identity-mapped, with its own stack per vCPU. It talks to the hypervisor in two ways:
 *
 *  - immediate hypercalls: hv_call() writes the routine number to an I/O port; the vCPU
 *    exits, the hypervisor runs the routine and puts the result in rax. One exit each.
 *  - deferrable hypercalls: hv_defer() appends the routine and its arguments to this VM's
 *    DLH queue, a ring in guest memory that the hypervisor set up at VM initialisation.
 *    No exit. hv_dlh_notify() tells the hypervisor's interrupt handler that work is
 *    waiting (one exit); the scheduler then grants a physical-CPU slot to a vCPU of this
 *    VM and the queued routines run, in order and exactly once, before that vCPU enters
 *    the guest again. When hv_dlh_notify() returns, every entry queued before it is done.
 *
 * Results: >= 0 is success; negative values are the HV_E* codes below. A full queue makes
 * hv_defer() return HV_EFULL without queueing (hv_defer_or_flush() notifies and retries).
 * A routine that fails gets its HV_E* code in its entry's status; later entries still run.
 *
 * Build with `hvkit hv build guest.c -o guest.elf`. The code is integer-only
 * (-mgeneral-regs-only): the emulating KVM of some hosts does not run SSE.
 */
#ifndef HVKIT_H
#define HVKIT_H

#include <stddef.h>
#include <stdint.h>
#include <stdarg.h>

#define HV_PORT_HYPERCALL 0x500
#define HV_PORT_DLH_NOTIFY 0x501

/* Routines (the same numbers immediate or deferred). */
#define HV_EXIT 0          /* (code) stop this vCPU; immediate only */
#define HV_CONSOLE_WRITE 1 /* (gpa, len) -> bytes written to the VM's console */
#define HV_TIME 2          /* () -> host monotonic time in ns */
#define HV_YIELD 3         /* () give the physical-CPU slot to someone else; immediate only */
#define HV_MEM_HINT 4      /* (gpa, len, kind) -> bytes hinted; kind below */
#define HV_TRACE 5         /* (a, b) record a pair in the VM's trace -> its index */

#define HV_HINT_FREE 0     /* the guest no longer needs these pages: their host memory is given back, they read as zero */
#define HV_HINT_WILLNEED 1 /* the guest will use these pages soon: the host populates them */

#define HV_OK 0
#define HV_PENDING 1       /* status of a queued entry that has not run yet */
#define HV_EIO (-5)        /* the routine failed */
#define HV_EFAULT (-14)    /* an address outside the guest's usable memory */
#define HV_EINVAL (-22)    /* a bad argument, or a routine that cannot be deferred */
#define HV_ENOSYS (-38)    /* no such routine */
#define HV_EFULL (-105)    /* the DLH queue is full: nothing was queued */

#define HV_BOOT_MAGIC 0x544f4f42544b5648ULL /* "HVKTBOOT" */
#define HV_DLH_MAGIC 0x484c44u             /* "DLH" */

struct hv_boot_info {         /* at a fixed guest-physical page, pointer passed to hv_main */
    uint64_t magic;
    uint32_t vm_index;        /* 0 .. vms-1 */
    uint32_t vcpus;
    uint64_t mem_size;        /* bytes of guest RAM, from guest-physical 0 */
    uint64_t heap_start;      /* first free page after the program */
    uint64_t heap_end;        /* below the vCPU stacks */
    uint64_t dlh_ring;        /* guest-physical address of this VM's DLH queue */
    uint64_t args[4];         /* hvkit hv run --arg values */
    char name[32];            /* the VM's name */
};

struct hv_dlh_entry {         /* 32 bytes; the guest writes the first three words */
    uint16_t routine;
    uint16_t arg2;            /* a deferred call's third argument is 16 bits (a hint kind) */
    int32_t status;           /* HV_PENDING until run, then HV_OK or an HV_E* code */
    uint64_t arg0;
    uint64_t arg1;
    int64_t result;           /* written by the hypervisor */
};

struct hv_dlh_ring {          /* 64-byte header, then `entries` entries */
    uint32_t magic;
    uint32_t entries;         /* a power of two */
    volatile uint64_t head;   /* next seq the guest fills (written by the guest only) */
    volatile uint64_t tail;   /* next seq the hypervisor runs (written by the hypervisor only) */
    volatile uint64_t completed; /* entries run with HV_OK */
    volatile uint64_t failed;    /* entries run with an error */
    uint64_t full;            /* hv_defer() calls refused because the queue was full */
    uint64_t notifications;   /* hv_dlh_notify() calls */
    uint64_t reserved;
    struct hv_dlh_entry entry[];
};

extern const struct hv_boot_info *hv_boot; /* set by the entry stub */

int hv_main(const struct hv_boot_info *boot, unsigned vcpu);

/* ------------------------------------------------------------ immediate hypercalls */

static inline int64_t hv_call(uint32_t routine, uint64_t a0, uint64_t a1, uint64_t a2)
{
    int64_t ret;
    __asm__ volatile("outl %%eax, %%dx"
                     : "=a"(ret)
                     : "a"(routine), "d"(HV_PORT_HYPERCALL), "D"(a0), "S"(a1), "c"(a2)
                     : "memory");
    return ret;
}

static inline __attribute__((noreturn)) void hv_exit(int code)
{
    hv_call(HV_EXIT, (uint64_t)(int64_t)code, 0, 0);
    for (;;)
        __asm__ volatile("hlt");
}

static inline int64_t hv_console_write(const void *buf, size_t len)
{
    return hv_call(HV_CONSOLE_WRITE, (uint64_t)(uintptr_t)buf, len, 0);
}

static inline uint64_t hv_time_ns(void) { return (uint64_t)hv_call(HV_TIME, 0, 0, 0); }
static inline void hv_yield(void) { hv_call(HV_YIELD, 0, 0, 0); }

static inline int64_t hv_mem_hint(void *start, size_t len, int kind)
{
    return hv_call(HV_MEM_HINT, (uint64_t)(uintptr_t)start, len, (uint64_t)kind);
}

static inline int64_t hv_trace(uint64_t a, uint64_t b) { return hv_call(HV_TRACE, a, b, 0); }

/* ------------------------------------------------------------ deferrable hypercalls */

static inline struct hv_dlh_ring *hv_dlh(void)
{
    return (struct hv_dlh_ring *)(uintptr_t)hv_boot->dlh_ring;
}

/* A writer fills the queue with entries the hypervisor cannot see until they are
 * published (one store of head), so a batch costs the guest three stores per entry and
 * one per batch. Use one writer at a time per VM (one vCPU, or a lock of the guest's). */
struct hv_dlh_writer {
    struct hv_dlh_ring *q;
    struct hv_dlh_entry *ring;
    uint64_t mask, head, limit;
};

static inline void hv_dlh_open(struct hv_dlh_writer *w)
{
    struct hv_dlh_ring *q = hv_dlh();
    w->q = q;
    w->ring = q->entry;
    w->mask = q->entries - 1;
    w->head = q->head;
    w->limit = q->tail + q->entries;
}

#define HV_DLH_WORD0(routine, arg2) \
    ((uint64_t)(uint16_t)(routine) | (uint64_t)(uint16_t)(arg2) << 16 | (uint64_t)HV_PENDING << 32)

/* Add an entry (not yet visible): 0, or HV_EFULL when the queue has no room. */
static inline int hv_dlh_put(struct hv_dlh_writer *w, uint32_t routine, uint64_t a0,
                             uint64_t a1, uint64_t a2)
{
    if (__builtin_expect(w->head == w->limit, 0)) {
        w->limit = w->q->tail + w->q->entries;
        if (w->head == w->limit) {
            w->q->full++;
            return HV_EFULL;
        }
    }
    uint64_t *e = (uint64_t *)&w->ring[w->head & w->mask];
    e[0] = HV_DLH_WORD0(routine, a2);
    e[1] = a0;
    e[2] = a1;
    w->head++;
    return 0;
}

/* Make the entries put so far visible to the hypervisor (they still wait for a notify). */
static inline void hv_dlh_publish(struct hv_dlh_writer *w)
{
    __asm__ volatile("" ::: "memory"); /* entries are complete before head moves */
    w->q->head = w->head;
}

static inline void hv_dlh_notify(void);

/* Publish and notify: when this returns, everything put so far has run. */
static inline void hv_dlh_flush(struct hv_dlh_writer *w)
{
    hv_dlh_publish(w);
    hv_dlh_notify();
    w->limit = w->q->tail + w->q->entries;
}

/* Queue one routine; no exit. Returns its seq (>= 0), HV_EFULL when the queue is full,
 * HV_EINVAL when a2 does not fit in 16 bits. */
static inline int64_t hv_defer(uint32_t routine, uint64_t a0, uint64_t a1, uint64_t a2)
{
    struct hv_dlh_writer w;
    if (a2 > 0xffff)
        return HV_EINVAL;
    hv_dlh_open(&w);
    uint64_t seq = w.head;
    if (hv_dlh_put(&w, routine, a0, a1, a2) < 0)
        return HV_EFULL;
    hv_dlh_publish(&w);
    return (int64_t)seq;
}

/* Tell the hypervisor that deferred work waits. When this returns, it has all run. */
static inline void hv_dlh_notify(void)
{
    hv_dlh()->notifications++;
    __asm__ volatile("outl %%eax, %%dx" : : "a"(0), "d"(HV_PORT_DLH_NOTIFY) : "memory");
}

/* hv_defer(), and when the queue is full, notify (which empties it) and queue again. */
static inline int64_t hv_defer_or_flush(uint32_t routine, uint64_t a0, uint64_t a1, uint64_t a2)
{
    int64_t seq = hv_defer(routine, a0, a1, a2);
    if (seq == HV_EFULL) {
        hv_dlh_notify();
        seq = hv_defer(routine, a0, a1, a2);
    }
    return seq;
}

static inline struct hv_dlh_entry *hv_dlh_entry(uint64_t seq)
{
    struct hv_dlh_ring *q = hv_dlh();
    return &q->entry[seq & (q->entries - 1)];
}

/* ------------------------------------------------------------ small helpers */

size_t hv_strlen(const char *s);
void hv_puts(const char *s);                   /* console write, no newline added */
int hv_printf(const char *fmt, ...);          /* %s %c %d %u %x %lu %ld %lx %llu %p %% */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);

#endif
