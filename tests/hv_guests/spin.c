/* Test guest: every vCPU counts in a loop for args[0] ms of host time, so the host can
 * see how far each VM got (the `progress` symbol) and how the slots were shared. */
#include <hvkit.h>

volatile uint64_t progress[64];

int hv_main(const struct hv_boot_info *boot, unsigned vcpu)
{
    uint64_t end = hv_time_ns() + boot->args[0] * 1000000ULL;
    while (hv_time_ns() < end) {
        for (int i = 0; i < 1000; i++)
            progress[vcpu]++;
    }
    return 0;
}
