/* Serial console on the 16550A UART at 0x3f8, polled.
 *
 * Port I/O is a VM exit, the dearest thing this guest does on a nested
 * host: with the 16-byte transmit FIFO enabled, one LSR read (THR empty
 * means the whole FIFO is free) covers 16 bytes instead of one. */
#include "guest.h"

#define COM1 0x3f8
#define UART_FCR 2
#define UART_LSR 5
#define FCR_ENABLE_CLEAR 0x07
#define LSR_THR_EMPTY 0x20
#define TX_FIFO_SIZE 16

static volatile u32 console_busy = 0;
/* Bytes the transmit FIFO can still take (under the console lock). */
static u32 tx_room = 0;

void console_init(void) { outb(COM1 + UART_FCR, FCR_ENABLE_CLEAR); }

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
    if (tx_room == 0) {
        while (!(inb(COM1 + UART_LSR) & LSR_THR_EMPTY))
            cpu_relax();
        tx_room = TX_FIFO_SIZE;
    }
    outb(COM1, (u8)c);
    tx_room--;
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
