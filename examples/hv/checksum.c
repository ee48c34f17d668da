/* Example guest: checksums a buffer in its own memory and reports through hypercalls.
 *
 * It fills args[0] KiB (default 64) of its heap with a xorshift64 sequence seeded with
 * args[1] (default 1), computes the CRC-32 (IEEE, as zlib's crc32) of the whole buffer and
 * of each 4 KiB chunk, queues one deferred trace record (chunk, crc) per chunk, and prints
 * the total through the console routine. Then it gives the buffer's pages back to the
 * host (HV_MEM_HINT, HV_HINT_FREE) and checks they read as zeros. */
#include <hvkit.h>

static uint32_t table[256];

static void make_table(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
        table[i] = c;
    }
}

static uint32_t crc32(uint32_t crc, const uint8_t *p, size_t n)
{
    crc = ~crc;
    while (n--)
        crc = table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

int hv_main(const struct hv_boot_info *boot, unsigned vcpu)
{
    uint64_t kib = boot->args[0] ? boot->args[0] : 64, seed = boot->args[1] ? boot->args[1] : 1;
    uint64_t *buf = (uint64_t *)(uintptr_t)boot->heap_start;
    size_t bytes = kib * 1024, words = bytes / 8;
    if (vcpu != 0)
        return 0;
    if (boot->heap_start + bytes > boot->heap_end) {
        hv_printf("%lu KiB do not fit in the heap\n", kib);
        return 2;
    }
    make_table();
    uint64_t x = seed;
    for (size_t i = 0; i < words; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf[i] = x;
    }
    struct hv_dlh_writer w;
    hv_dlh_open(&w);
    uint32_t total = 0;
    for (size_t off = 0; off < bytes; off += 4096) {
        size_t n = bytes - off < 4096 ? bytes - off : 4096;
        const uint8_t *chunk = (const uint8_t *)buf + off;
        total = crc32(total, chunk, n);
        if (hv_dlh_put(&w, HV_TRACE, off / 4096, crc32(0, chunk, n), 0) == HV_EFULL) {
            hv_dlh_flush(&w);
            hv_dlh_put(&w, HV_TRACE, off / 4096, crc32(0, chunk, n), 0);
        }
    }
    hv_dlh_flush(&w);
    hv_printf("crc32 %x of %lu KiB (seed %lu), %lu chunk records\n", total, kib, seed,
              hv_dlh()->completed);
    size_t whole = bytes & ~(size_t)4095;
    int64_t given = whole ? hv_mem_hint(buf, whole, HV_HINT_FREE) : 0;
    if (given != (int64_t)whole || (whole && buf[0] != 0)) {
        hv_printf("memory hint failed: %ld\n", given);
        return 1;
    }
    hv_printf("gave %lu KiB back to the host\n", whole / 1024);
    return 0;
}
