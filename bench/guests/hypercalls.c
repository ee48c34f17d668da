/* Benchmark guest: the same hypercall (HV_TRACE, i, i) issued `count` times, either
 * immediately (one port write each) or through the DLH queue, notifying every `batch`
 * (batch <= the queue's size).
 * args[0] = 0 immediate / 1 deferred, args[1] = count, args[2] = batch.
 * Prints "ns <elapsed>" measured with the time routine around the loop. */
#include <hvkit.h>

int hv_main(const struct hv_boot_info *boot, unsigned vcpu)
{
    uint64_t deferred = boot->args[0], count = boot->args[1], batch = boot->args[2];
    if (vcpu != 0)
        return 0;
    if (batch == 0)
        batch = 1;
    uint64_t t0 = hv_time_ns();
    if (!deferred) {
        for (uint64_t i = 0; i < count; i++)
            hv_call(HV_TRACE, i, i, 0);
    } else {
        struct hv_dlh_writer w;
        hv_dlh_open(&w);
        uint64_t next = batch;
        for (uint64_t i = 0; i < count; i++) {
            hv_dlh_put(&w, HV_TRACE, i, i, 0);
            if (i + 1 == next) {
                hv_dlh_flush(&w);
                next += batch;
            }
        }
        hv_dlh_flush(&w);
    }
    uint64_t t1 = hv_time_ns();
    hv_printf("ns %lu\n", t1 - t0);
    return 0;
}
