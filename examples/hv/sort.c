/* Example guest: sorts keys in its own memory and reports through hypercalls.
 *
 * Every vCPU generates args[0] keys (default 2000) with xorshift64 seeded by
 * args[1] + vCPU index, heap-sorts them, checks the order, and prints the smallest, the
 * median and the largest key. Each vCPU also queues a deferred trace record (vCPU, key)
 * for every 256th key, in sorted order, under a simple lock (one queue writer at a time). */
#include <hvkit.h>

static volatile int queue_lock;

static void lock(void)
{
    while (__atomic_exchange_n(&queue_lock, 1, __ATOMIC_ACQUIRE))
        hv_yield();
}

static void unlock(void) { __atomic_store_n(&queue_lock, 0, __ATOMIC_RELEASE); }

static void sift_down(uint64_t *a, size_t start, size_t n)
{
    size_t root = start;
    while (2 * root + 1 < n) {
        size_t child = 2 * root + 1;
        if (child + 1 < n && a[child] < a[child + 1])
            child++;
        if (a[root] >= a[child])
            return;
        uint64_t t = a[root];
        a[root] = a[child];
        a[child] = t;
        root = child;
    }
}

static void heapsort(uint64_t *a, size_t n)
{
    for (size_t i = n / 2; i-- > 0;)
        sift_down(a, i, n);
    for (size_t end = n; end-- > 1;) {
        uint64_t t = a[0];
        a[0] = a[end];
        a[end] = t;
        sift_down(a, 0, end);
    }
}

int hv_main(const struct hv_boot_info *boot, unsigned vcpu)
{
    size_t n = boot->args[0] ? boot->args[0] : 2000;
    uint64_t x = boot->args[1] + vcpu + 1;
    size_t share = (boot->heap_end - boot->heap_start) / boot->vcpus / 8;
    uint64_t *a = (uint64_t *)(uintptr_t)boot->heap_start + share * vcpu;
    if (n == 0 || n > share) {
        hv_printf("vCPU %u: %lu keys do not fit (at most %lu)\n", vcpu, n, share);
        return 2;
    }
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        a[i] = x;
    }
    heapsort(a, n);
    for (size_t i = 1; i < n; i++)
        if (a[i - 1] > a[i]) {
            hv_printf("vCPU %u: not sorted at %lu\n", vcpu, i);
            return 1;
        }
    lock();
    struct hv_dlh_writer w;
    hv_dlh_open(&w);
    for (size_t i = 0; i < n; i += 256)
        if (hv_dlh_put(&w, HV_TRACE, vcpu, a[i], 0) == HV_EFULL) {
            hv_dlh_flush(&w);
            hv_dlh_put(&w, HV_TRACE, vcpu, a[i], 0);
        }
    hv_dlh_flush(&w);
    hv_printf("vCPU %u sorted %lu keys: min %lu median %lu max %lu\n", vcpu, n, a[0], a[n / 2],
              a[n - 1]);
    unlock();
    return 0;
}
