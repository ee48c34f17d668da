/* Test guest for the DLH queue. It checks, from inside, what the hypervisor promises and
 * prints one "ok <check>" line per check that held ("FAIL <check>: ..." otherwise):
 *
 *  deferred  queued entries do not run before the guest notifies, even across exits
 *  order     after hv_dlh_notify() returns, all N ran, in order, each exactly once
 *  full      the queue refuses entry `entries`+1 with HV_EFULL and counts it
 *  failing   a failing routine gets its code and later entries still run
 *
 * args[0] = N (entries to queue in `order`), args[1] = a tag recorded with each trace. */
#include <hvkit.h>

static int failures;

static void check(int ok, const char *name, const char *why)
{
    if (ok) {
        hv_printf("ok %s\n", name);
    } else {
        hv_printf("FAIL %s: %s\n", name, why);
        failures++;
    }
}

static int all_status(uint64_t from, uint64_t to, int32_t status)
{
    for (uint64_t s = from; s < to; s++)
        if (hv_dlh_entry(s)->status != status)
            return 0;
    return 1;
}

int hv_main(const struct hv_boot_info *boot, unsigned vcpu)
{
    struct hv_dlh_ring *q = hv_dlh();
    uint64_t n = boot->args[0], tag = boot->args[1];
    if (vcpu != 0)
        return 0;
    if (n > q->entries)
        n = q->entries;

    /* deferred + order */
    uint64_t first = q->head;
    for (uint64_t i = 0; i < n; i++)
        if (hv_defer(HV_TRACE, i, tag, 0) < 0)
            check(0, "order", "hv_defer refused an entry of an empty queue");
    hv_time_ns(); /* an exit that is not a notification */
    hv_yield();   /* and a trip through the scheduler */
    check(all_status(first, first + n, HV_PENDING) && q->completed == 0, "deferred",
          "an entry ran before the guest notified");
    hv_dlh_notify();
    int in_order = 1;
    for (uint64_t i = 0; i < n; i++) {
        struct hv_dlh_entry *e = hv_dlh_entry(first + i);
        if (e->status != HV_OK || e->result != (int64_t)i)
            in_order = 0; /* HV_TRACE returns the trace index: i if in order, once each */
    }
    check(in_order && q->tail == q->head && q->completed == n, "order",
          "entries not all done, in order, once each, when notify returned");

    /* full */
    uint64_t queued = 0;
    int64_t r;
    while ((r = hv_defer(HV_TIME, 0, 0, 0)) >= 0)
        queued++;
    check(r == HV_EFULL && queued == q->entries && q->full == 1, "full",
          "the queue did not refuse exactly its size + 1st entry");
    hv_dlh_notify();
    check(q->tail == q->head && hv_defer(HV_TIME, 0, 0, 0) >= 0, "full",
          "the queue did not accept entries again after notify");
    hv_dlh_notify();

    /* failing */
    uint64_t failed_before = q->failed;
    uint64_t a = hv_defer(99, 0, 0, 0);                            /* no such routine */
    uint64_t b = hv_defer(HV_EXIT, 0, 0, 0);                       /* cannot be deferred */
    uint64_t c = hv_defer(HV_CONSOLE_WRITE, boot->mem_size, 8, 0); /* outside memory */
    uint64_t d = hv_defer(HV_TRACE, n, tag, 0);                    /* fine */
    hv_dlh_notify();
    check(hv_dlh_entry(a)->status == HV_ENOSYS && hv_dlh_entry(b)->status == HV_EINVAL &&
              hv_dlh_entry(c)->status == HV_EFAULT && hv_dlh_entry(d)->status == HV_OK &&
              hv_dlh_entry(d)->result == (int64_t)n && q->failed == failed_before + 3,
          "failing", "failing routines did not report their codes, or stopped the queue");
    return failures;
}
