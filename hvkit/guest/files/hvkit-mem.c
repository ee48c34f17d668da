/*
 * hvkit-mem: the default guest's memory workloads, built statically into its initramfs.
 *
 * It exists because busybox alone cannot hold anonymous memory: every workload here
 * maps private anonymous pages, touches them, and (mostly) gives them back, so the host
 * sees the page churn that identification, sharing and forking have to cope with.
 *
 *   hvkit-mem heartbeat SECONDS        print "HVKIT-HEARTBEAT n" every SECONDS, forever
 *   hvkit-mem alloc MIB                allocate and touch MIB, free it, report
 *   hvkit-mem hold MIB                 allocate and touch MIB, keep it forever
 *   hvkit-mem fragment MIB             allocate MIB, free every other page, keep the rest
 *   hvkit-mem memcheck MIB [ROUNDS]    keep checksummed data in up to MIB while allocating
 *                                      and freeing; report any word that changed
 *   hvkit-mem freeze DIR MARKER FILE...
 *                                      read each /proc/FILE into memory, print MARKER, wait
 *                                      for a line on stdin, then write them to DIR/FILE
 *
 * Every line it prints starts with "HVKIT-" so the host can find it in the console log.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024UL * 1024UL)
#define PAGE 4096UL

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

/* Anonymous memory, every page touched. Without huge pages (no_huge), freeing one 4 KiB
 * page really frees it: inside a transparent huge page it would stay allocated. */
static void *map_pages(size_t bytes, unsigned char fill, int no_huge)
{
    unsigned char *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    if (no_huge)
        madvise(p, bytes, MADV_NOHUGEPAGE);
    for (size_t off = 0; off < bytes; off += PAGE)
        memset(p + off, fill, PAGE);
    return p;
}

static void *map_touched(size_t bytes, unsigned char fill)
{
    return map_pages(bytes, fill, 0);
}

static void sleep_seconds(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

static int heartbeat(double period)
{
    for (unsigned long n = 0;; n++) {
        say("HVKIT-HEARTBEAT %lu", n);
        sleep_seconds(period);
    }
    return 0;
}

static int alloc_free(unsigned long mib)
{
    void *p = map_touched(mib * MIB, 0x5a);
    if (!p) {
        say("HVKIT-ALLOC failed mib=%lu errno=%d", mib, errno);
        return 1;
    }
    munmap(p, mib * MIB);
    say("HVKIT-ALLOC done mib=%lu", mib);
    return 0;
}

static int hold(unsigned long mib)
{
    if (!map_touched(mib * MIB, 0xa5)) {
        say("HVKIT-HOLD failed mib=%lu errno=%d", mib, errno);
        return 1;
    }
    say("HVKIT-HOLD holding mib=%lu", mib);
    for (;;)
        pause();
}

static int fragment(unsigned long mib)
{
    size_t bytes = mib * MIB;
    unsigned char *p = map_pages(bytes, 0x3c, 1);
    if (!p) {
        say("HVKIT-FRAGMENT failed mib=%lu errno=%d", mib, errno);
        return 1;
    }
    /* Free every other page: the buddy allocator is left with order-0 holes only. */
    for (size_t off = 0; off < bytes; off += 2 * PAGE)
        munmap(p + off, PAGE);
    say("HVKIT-FRAGMENT holding mib=%lu freed_mib=%lu", mib / 2, mib - mib / 2);
    for (;;)
        pause();
}

/* The memory checker: a word of chunk data is a function of (seed, index) that is never
 * zero, so a page the host gave back behind the guest's back (and that now reads as
 * zeros) or a page that leaked from another VM is always caught. */
static inline uint64_t pattern(uint64_t seed, uint64_t i)
{
    return ((seed + i) * 0x9E3779B97F4A7C15ULL) | 1ULL;
}

struct chunk {
    uint64_t *words;
    uint64_t seed;
};

static uint64_t rng_state = 0x243F6A8885A308D3ULL;
static uint64_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static unsigned long verify(struct chunk *c, unsigned long idx)
{
    const size_t n = MIB / sizeof(uint64_t);
    unsigned long bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t want = pattern(c->seed, i);
        if (c->words[i] != want) {
            if (bad < 4)
                say("HVKIT-MEMCHECK-CORRUPT chunk=%lu offset=%zu expected=%016llx got=%016llx",
                    idx, i * sizeof(uint64_t), (unsigned long long)want,
                    (unsigned long long)c->words[i]);
            bad++;
        }
    }
    return bad;
}

static int memcheck(unsigned long mib, unsigned long rounds)
{
    const size_t n = MIB / sizeof(uint64_t);
    struct chunk *chunks = calloc(mib, sizeof(*chunks));
    unsigned long errors = 0, live = 0;
    if (!chunks)
        return 1;
    rng_state ^= (uint64_t)time(NULL);
    say("HVKIT-MEMCHECK start mib=%lu", mib);
    for (unsigned long r = 1; rounds == 0 || r <= rounds; r++) {
        /* One round: every chunk is checked, then about a quarter are freed or refilled,
         * so the guest allocates and frees all the time. */
        for (unsigned long k = 0; k < mib; k++) {
            struct chunk *c = &chunks[k];
            if (c->words)
                errors += verify(c, k);
            if (c->words && rng() % 4 == 0) {
                munmap(c->words, MIB);
                c->words = NULL;
                live--;
            } else if (!c->words && rng() % 2 == 0) {
                c->words = mmap(NULL, MIB, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                if (c->words == MAP_FAILED) {
                    c->words = NULL;
                    continue;
                }
                c->seed = rng();
                for (size_t i = 0; i < n; i++)
                    c->words[i] = pattern(c->seed, i);
                live++;
            }
        }
        say("HVKIT-MEMCHECK round=%lu live_mib=%lu errors=%lu", r, live, errors);
    }
    say("HVKIT-MEMCHECK done errors=%lu", errors);
    return errors ? 2 : 0;
}

/* freeze: the guest's own view of its memory at one moment the host can pause at. All
 * files are read into buffers allocated and touched beforehand (so reading them does
 * not change the page flags being read), then the process announces MARKER and blocks
 * on stdin: the host pauses the VM there, reads guest memory from outside, resumes and
 * sends a line. Only then is anything written (writing allocates page cache). */
static size_t read_all(int fd, unsigned char *into, size_t room)
{
    static unsigned char scratch[1 << 16];
    size_t total = 0;
    ssize_t n;
    while ((n = read(fd, into ? into + total : scratch,
                     into ? room - total : sizeof(scratch))) > 0)
        total += (size_t)n;
    return total;
}

/* Raw read(2), no stdio: stdio would allocate its buffer mid-read. */
static size_t proc_file(const char *name, unsigned char *into, size_t room)
{
    char path[256];
    snprintf(path, sizeof(path), "/proc/%s", name);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return 0;
    size_t n = read_all(fd, into, room);
    close(fd);
    return n;
}

static int wait_for_continue(void)
{
    char line[64], c;
    size_t n = 0;
    while (read(0, &c, 1) == 1) {
        if (c != '\n') {
            if (n < sizeof(line) - 1)
                line[n++] = c;
            continue;
        }
        line[n] = 0;
        n = 0;
        if (!strncmp(line, "continue", 8))
            return 0;
    }
    return -1;
}

static int write_files(const char *dir, int nfiles, char **names, unsigned char **buf, size_t *len)
{
    char path[512];
    for (int i = 0; i < nfiles; i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
        FILE *f = fopen(path, "w");
        if (!f || fwrite(buf[i], 1, len[i], f) != len[i]) {
            say("HVKIT-FREEZE failed writing %s errno=%d", path, errno);
            return 1;
        }
        fclose(f);
    }
    return 0;
}

static int freeze(const char *dir, const char *marker, int nfiles, char **names)
{
    char line[256];
    unsigned char *buf[64];
    size_t len[64];
    if (nfiles > 64)
        return 64;
    for (int i = 0; i < nfiles; i++) { /* sizes first, then one touched buffer each */
        size_t room = proc_file(names[i], NULL, 0) + 2 * PAGE; /* lines may appear meanwhile */
        buf[i] = map_touched((room + PAGE - 1) & ~(PAGE - 1), 0);
        len[i] = room;
        if (!buf[i]) {
            say("HVKIT-FREEZE failed %s errno=%d", names[i], errno);
            return 1;
        }
    }
    for (int i = 0; i < nfiles; i++)
        len[i] = proc_file(names[i], buf[i], len[i]);
    /* Raw write and read, no stdio: its buffers would be allocated now, and a new page
     * (or page table) here would differ from the page flags just read. */
    int mlen = snprintf(line, sizeof(line), "%s\n", marker);
    if (write(1, line, (size_t)mlen) < 0)
        return 1;
    alarm(300); /* a host that never says "continue" does not block the guest forever */
    return wait_for_continue() ? 1 : write_files(dir, nfiles, names, buf, len);
}

static unsigned long arg_ulong(int argc, char **argv, int i, unsigned long dflt)
{
    return argc > i ? strtoul(argv[i], NULL, 0) : dflt;
}

int main(int argc, char **argv)
{
    const char *cmd = argc > 1 ? argv[1] : "";
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!strcmp(cmd, "heartbeat"))
        return heartbeat(argc > 2 ? atof(argv[2]) : 1.0);
    if (!strcmp(cmd, "alloc"))
        return alloc_free(arg_ulong(argc, argv, 2, 64));
    if (!strcmp(cmd, "hold"))
        return hold(arg_ulong(argc, argv, 2, 64));
    if (!strcmp(cmd, "fragment"))
        return fragment(arg_ulong(argc, argv, 2, 64));
    if (!strcmp(cmd, "memcheck"))
        return memcheck(arg_ulong(argc, argv, 2, 32), arg_ulong(argc, argv, 3, 0));
    if (!strcmp(cmd, "freeze") && argc > 4)
        return freeze(argv[2], argv[3], argc - 4, argv + 4);
    fprintf(stderr, "usage: hvkit-mem heartbeat|alloc|hold|fragment|memcheck|freeze ARGS\n");
    return 64;
}
