/* The smallest hvkit guest: prints through the console routine, asks the time, and
 * queues a few deferred console writes that run when it notifies. */
#include <hvkit.h>

int hv_main(const struct hv_boot_info *boot, unsigned vcpu)
{
    static const char deferred[] = "deferred hello\n";
    hv_printf("hello from %s (vCPU %u of %u), %lu KiB of memory\n", boot->name, vcpu,
              boot->vcpus, boot->mem_size >> 10);
    uint64_t t0 = hv_time_ns();
    for (int i = 0; i < 3; i++)
        hv_defer(HV_CONSOLE_WRITE, (uint64_t)(uintptr_t)deferred, sizeof deferred - 1, 0);
    hv_dlh_notify();
    hv_printf("3 deferred writes done: %lu completed, took %lu us\n", hv_dlh()->completed,
              (hv_time_ns() - t0) / 1000);
    return 0;
}
