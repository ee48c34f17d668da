/* hvkit guest SDK runtime: the few library functions a freestanding program needs
 * (the compiler may call memset/memcpy on its own) and a small printf to the console. */
#include "hvkit.h"

size_t hv_strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

void hv_puts(const char *s) { hv_console_write(s, hv_strlen(s)); }

void *memset(void *dst, int c, size_t n)
{
    unsigned char *d = dst;
    while (n--)
        *d++ = (unsigned char)c;
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x - *y;
    return 0;
}

struct out {
    char buf[256];
    size_t len, total;
};

static void put(struct out *o, char c)
{
    if (o->len == sizeof o->buf) {
        hv_console_write(o->buf, o->len);
        o->len = 0;
    }
    o->buf[o->len++] = c;
    o->total++;
}

static void put_number(struct out *o, uint64_t v, unsigned base, int negative)
{
    char digits[24];
    int n = 0;
    if (negative)
        put(o, '-');
    do {
        digits[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    while (n)
        put(o, digits[--n]);
}

int hv_printf(const char *fmt, ...)
{
    struct out o = {.len = 0, .total = 0};
    va_list ap;
    va_start(ap, fmt);
    for (const char *p = fmt; *p; p++) {
        if (*p != '%') {
            put(&o, *p);
            continue;
        }
        int longs = 0;
        while (*++p == 'l')
            longs++;
        switch (*p) {
        case 'd': {
            int64_t v = longs ? va_arg(ap, int64_t) : va_arg(ap, int);
            put_number(&o, v < 0 ? -(uint64_t)v : (uint64_t)v, 10, v < 0);
            break;
        }
        case 'u':
            put_number(&o, longs ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 10, 0);
            break;
        case 'x':
            put_number(&o, longs ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16, 0);
            break;
        case 'p':
            put(&o, '0');
            put(&o, 'x');
            put_number(&o, (uint64_t)(uintptr_t)va_arg(ap, void *), 16, 0);
            break;
        case 'c':
            put(&o, (char)va_arg(ap, int));
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            while (s && *s)
                put(&o, *s++);
            break;
        }
        case '%':
            put(&o, '%');
            break;
        default:
            put(&o, '%');
            if (*p)
                put(&o, *p);
            else
                p--;
        }
    }
    va_end(ap);
    if (o.len)
        hv_console_write(o.buf, o.len);
    return (int)o.total;
}
