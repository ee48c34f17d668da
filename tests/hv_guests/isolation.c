/* Test guest: each VM writes its own pattern over a page of its heap and queues trace
 * entries tagged with its index, yields a few times so the other VMs run, then checks
 * its page still holds its own pattern. With args[0] == 1 it then reads args[1] (an
 * address past its memory), which must stop it with a fault, and never returns. */
#include <hvkit.h>

int hv_main(const struct hv_boot_info *boot, unsigned vcpu)
{
    volatile uint64_t *page = (volatile uint64_t *)(uintptr_t)boot->heap_start;
    uint64_t mine = 0x1111111111111111ULL * (boot->vm_index + 1);
    for (int i = 0; i < 512; i++)
        page[i] = mine;
    for (int round = 0; round < 5; round++) {
        for (int i = 0; i < 10; i++)
            hv_defer(HV_TRACE, boot->vm_index, round * 10 + i, 0);
        hv_dlh_notify();
        hv_yield();
    }
    for (int i = 0; i < 512; i++)
        if (page[i] != mine) {
            hv_printf("FAIL isolation: %s page word %d = %lx\n", boot->name, i, page[i]);
            return 1;
        }
    hv_printf("ok isolation %s\n", boot->name);
    if (boot->args[0] == 1) {
        volatile uint64_t *outside = (volatile uint64_t *)(uintptr_t)boot->args[1];
        hv_printf("read %lx\n", *outside);
    }
    return 0;
}
