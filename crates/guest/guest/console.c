/* Serial console on the 8250 UART at 0x3f8, polled. */
#include "guest.h"

#define COM1 0x3f8
#define LSR_THR_EMPTY 0x20

static volatile u32 console_busy = 0;

void console_lock(void)
{
    u32 one = 1;
    for (;;) {
        __asm__ volatile("xchg %0, %1" : "+r"(one), "+m"(console_busy) : : "memory");
        if (one == 0)
            return;
        while (console_busy)
            cpu_relax();
        one = 1;
    }
}

void console_unlock(void)
{
    barrier();
    console_busy = 0;
}

static void putc_raw(char c)
{
    /* A virtual UART is always ready; a real one (or a busy emulation)
     * clears THR-empty while it sends. */
    while (!(inb(COM1 + 5) & LSR_THR_EMPTY))
        cpu_relax();
    outb(COM1, (u8)c);
}

void puts_raw(const char *s)
{
    for (; *s; s++) {
        if (*s == '\n')
            putc_raw('\r');
        putc_raw(*s);
    }
}

void put_dec(u64 v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts_raw(&buf[i]);
}

static const char hexdigits[] = "0123456789abcdef";

void put_hex(u64 v)
{
    char buf[17];
    int i = 16;
    buf[i] = 0;
    do {
        buf[--i] = hexdigits[v & 0xf];
        v >>= 4;
    } while (v);
    puts_raw("0x");
    puts_raw(&buf[i]);
}

void put_hex_byte(u8 v)
{
    char buf[3] = {hexdigits[v >> 4], hexdigits[v & 0xf], 0};
    puts_raw(buf);
}

void print(const char *s)
{
    console_lock();
    puts_raw(s);
    console_unlock();
}
