/* Shared helpers of the flatlet test guest: port and MMIO access, the
 * serial console, and the few library functions the compiler may call. */
#ifndef FLATLET_GUEST_H
#define FLATLET_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef unsigned long usize;

#define NULL ((void *)0)
#define MAX_CPUS 32
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline void mmio_write8(u64 addr, u8 v) { *(volatile u8 *)addr = v; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/* console.c */
void console_init(void);
void console_lock(void);
void console_unlock(void);
void puts_raw(const char *s);
void put_dec(u64 v);
void put_hex(u64 v);
void put_hex_byte(u8 v);
void print(const char *s);

/* string helpers (lib.c) */
void *memcpy(void *dst, const void *src, usize n);
void *memset(void *dst, int c, usize n);
int memcmp(const void *a, const void *b, usize n);
usize strlen(const char *s);
int str_starts_with(const char *s, const char *prefix);
u64 parse_u64(const char **s, int base);

/* platform (main.c) */
void guest_panic(const char *what) __attribute__((noreturn));
void i8042_reset(void) __attribute__((noreturn));

#endif
