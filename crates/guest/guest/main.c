/*
 * The flatlet test guest: a tiny kernel that exercises a VMM.
 *
 * It boots through the Linux 64-bit boot protocol, prints a banner, starts
 * every vCPU listed in the MP table (each prints its APIC ID), writes 123 to
 * the boot-timer page, acts on its command line, and resets through the
 * i8042. Ring-0 code is emulated instruction by instruction on some nested
 * hosts, so the guest does as little as it can.
 */
#include "guest.h"
#include "guest_main.h"

#define BOOT_TIMER_ADDR 0xc0000000UL
#define BOOT_TIMER_MAGIC 123
#define LAPIC_BASE 0xfee00000UL
#define LAPIC_ID 0x20
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define ICR_INIT_ASSERT 0x4500
#define ICR_STARTUP 0x4600
#define TRAMPOLINE_ADDR 0x6000UL
#define CMDLINE_MAX 2048
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_CMD_LINE_PTR 0x228
#define AP_TIMEOUT_CYCLES 4000000000UL
#define SEL_CODE64 0x10

extern u8 ap_tramp_start[], ap_tramp_end[];
extern u8 idt[];

struct frame {
    u64 r11, r10, r9, r8, rdi, rsi, rdx, rcx, rax;
    u64 vector, error;
    u64 rip, cs, rflags, rsp, ss;
};

struct idt_ptr {
    u16 limit;
    u64 base;
} __attribute__((packed));

static char cmdline[CMDLINE_MAX] = {0};
static u32 cpu_ids[MAX_CPUS] = {0};
static u32 cpu_count = 0;
static volatile u32 ap_checked_in = 0xffffffff;
static volatile u32 cpus_up = 1;
static const struct idt_ptr idtr = {256 * 16 - 1, (u64)idt};

u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }
void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }
void lapic_eoi(void) { lapic_write(LAPIC_EOI, 0); }
u32 lapic_id(void) { return lapic_read(LAPIC_ID) >> 24; }

static void set_gate(u32 vector, void (*handler)(void))
{
    u64 a = (u64)handler;
    u8 *e = idt + vector * 16;
    *(u16 *)(e + 0) = (u16)a;
    *(u16 *)(e + 2) = SEL_CODE64;
    *(u16 *)(e + 4) = 0x8e00; /* present, DPL 0, interrupt gate */
    *(u16 *)(e + 6) = (u16)(a >> 16);
    *(u32 *)(e + 8) = (u32)(a >> 32);
}

extern void isr_0(void), isr_3(void), isr_6(void), isr_8(void), isr_13(void), isr_14(void);
extern void isr_32(void), isr_33(void), isr_34(void), isr_35(void), isr_36(void);
extern void isr_37(void), isr_38(void), isr_39(void), isr_255(void);

static void setup_idt(void)
{
    static void (*const exceptions[])(void) = {isr_0, isr_3, isr_6, isr_8, isr_13, isr_14};
    static const u8 exception_vectors[] = {0, 3, 6, 8, 13, 14};
    static void (*const irqs[])(void) = {isr_32, isr_33, isr_34, isr_35,
                                         isr_36, isr_37, isr_38, isr_39};
    for (u32 i = 0; i < ARRAY_SIZE(exceptions); i++)
        set_gate(exception_vectors[i], exceptions[i]);
    for (u32 i = 0; i < ARRAY_SIZE(irqs); i++)
        set_gate(IRQ_VECTOR_BASE + i, irqs[i]);
    set_gate(255, isr_255);
}

static void load_idt(void) { __asm__ volatile("lidt %0" : : "m"(idtr)); }

/* Ends the VM the way a crashed kernel does: a triple fault (no IDT, then
 * an invalid opcode). */
static void __attribute__((noreturn)) triple_fault(void)
{
    static const struct idt_ptr none = {0, 0};
    __asm__ volatile("cli; lidt %0; ud2" : : "m"(none));
    for (;;)
        __asm__ volatile("hlt");
}

void guest_panic(const char *what)
{
    console_lock();
    puts_raw("flatlet-guest: panic: ");
    puts_raw(what);
    puts_raw("\n");
    triple_fault();
}

void i8042_reset(void)
{
    outb(0x64, 0xfe);
    for (;;)
        __asm__ volatile("cli; hlt");
}

void isr_dispatch(struct frame *f)
{
    if (f->vector >= IRQ_VECTOR_BASE && f->vector < IRQ_VECTOR_BASE + 8) {
        handle_irq((u32)(f->vector - IRQ_VECTOR_BASE));
        lapic_eoi();
        return;
    }
    if (f->vector == 255)
        return; /* spurious: no EOI */
    if (f->vector == 3) {
        print("flatlet-guest: int3 handled, resuming\n");
        return;
    }
    console_lock();
    puts_raw("flatlet-guest: exception ");
    put_dec(f->vector);
    puts_raw(" error ");
    put_hex(f->error);
    puts_raw(" at rip ");
    put_hex(f->rip);
    puts_raw("\n");
    console_unlock();
    guest_panic("unexpected exception");
}

/* --- boot params and command line --------------------------------------- */

static void copy_cmdline(const u8 *boot_params)
{
    u64 ptr = *(const u32 *)(boot_params + BP_CMD_LINE_PTR) |
              ((u64) * (const u32 *)(boot_params + BP_EXT_CMD_LINE_PTR) << 32);
    const char *src = (const char *)ptr;
    u32 i = 0;
    if (ptr)
        for (; i < CMDLINE_MAX - 1 && src[i]; i++)
            cmdline[i] = src[i];
    cmdline[i] = 0;
}

/* Calls f for each space-separated word of the command line. */
void for_each_option(void (*f)(const char *word, u32 len))
{
    const char *p = cmdline;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *start = p;
        while (*p && *p != ' ')
            p++;
        if (p > start)
            f(start, (u32)(p - start));
    }
}

int option_is(const char *word, u32 len, const char *name)
{
    return strlen(name) == len && memcmp(word, name, len) == 0;
}

/* --- MP table and SMP bring-up ------------------------------------------- */

static int checksum_ok(const u8 *p, u32 len)
{
    u8 sum = 0;
    for (u32 i = 0; i < len; i++)
        sum = (u8)(sum + p[i]);
    return sum == 0;
}

static const u8 *scan_mp(u64 start, u64 len)
{
    for (u64 a = start; a + 16 <= start + len; a += 16) {
        const u8 *p = (const u8 *)a;
        if (p[0] == '_' && p[1] == 'M' && p[2] == 'P' && p[3] == '_' && checksum_ok(p, 16))
            return p;
    }
    return NULL;
}

/* Finds the MP floating pointer where Linux looks for it: the EBDA, the
 * last KiB of base memory, then the BIOS area. */
static const u8 *find_mp(void)
{
    u64 ebda = (u64)(*(const volatile u16 *)0x40e) << 4;
    const u8 *p = NULL;
    if (ebda >= 0x80000 && ebda < 0xa0000)
        p = scan_mp(ebda, 1024);
    if (!p)
        p = scan_mp(0x9fc00, 1024);
    if (!p)
        p = scan_mp(0xf0000, 0x10000);
    return p;
}

static void read_mp_table(void)
{
    const u8 *fp = find_mp();
    cpu_count = 0;
    if (fp) {
        const u8 *t = (const u8 *)(u64) * (const u32 *)(fp + 4);
        u16 len = t ? *(const u16 *)(t + 4) : 0;
        if (t && memcmp(t, "PCMP", 4) == 0 && checksum_ok(t, len)) {
            u16 entries = *(const u16 *)(t + 34);
            const u8 *e = t + 44;
            for (u16 i = 0; i < entries && e < t + len; i++) {
                if (e[0] == 0) {
                    if ((e[3] & 1) && cpu_count < MAX_CPUS)
                        cpu_ids[cpu_count++] = e[1];
                    e += 20;
                } else if (e[0] <= 4) {
                    e += 8;
                } else {
                    break;
                }
            }
        } else {
            print("flatlet-guest: MP table is invalid\n");
        }
    }
    if (cpu_count == 0) {
        cpu_ids[0] = lapic_id();
        cpu_count = 1;
    }
}

static void say_cpu_up(u32 id)
{
    console_lock();
    puts_raw("flatlet-guest: cpu ");
    put_dec(id);
    puts_raw(" up\n");
    console_unlock();
}

static void start_aps(u32 bsp_id)
{
    memcpy((void *)TRAMPOLINE_ADDR, ap_tramp_start, (usize)(ap_tramp_end - ap_tramp_start));
    for (u32 i = 0; i < cpu_count; i++) {
        u32 id = cpu_ids[i];
        if (id == bsp_id)
            continue;
        ap_checked_in = 0xffffffff;
        lapic_write(LAPIC_ICR_HI, id << 24);
        lapic_write(LAPIC_ICR_LO, ICR_INIT_ASSERT);
        lapic_write(LAPIC_ICR_HI, id << 24);
        lapic_write(LAPIC_ICR_LO, ICR_STARTUP | (u32)(TRAMPOLINE_ADDR >> 12));
        u64 deadline = rdtsc() + AP_TIMEOUT_CYCLES;
        while (ap_checked_in != id && rdtsc() < deadline)
            cpu_relax();
        if (ap_checked_in != id) {
            console_lock();
            puts_raw("flatlet-guest: cpu ");
            put_dec(id);
            puts_raw(" did not start\n");
            console_unlock();
        }
    }
}

void ap_main(u32 id)
{
    load_idt();
    lapic_write(LAPIC_SVR, 0x1ff);
    say_cpu_up(id);
    __atomic_add_fetch(&cpus_up, 1, __ATOMIC_SEQ_CST);
    ap_checked_in = id;
    ap_idle(id);
}

/* --- main ---------------------------------------------------------------- */

void bsp_main(const u8 *boot_params)
{
    extern u8 pml4[];
    /* Read what the VMM gave while its page tables are still in use. */
    copy_cmdline(boot_params);
    __asm__ volatile("mov %0, %%cr3" : : "r"((u64)pml4) : "memory");

    console_init();
    print("flatlet-guest: booting\n");
    setup_idt();
    load_idt();
    lapic_write(LAPIC_SVR, 0x1ff);

    u32 bsp_id = lapic_id();
    read_mp_table();
    say_cpu_up(bsp_id);
    start_aps(bsp_id);

    mmio_write8(BOOT_TIMER_ADDR, BOOT_TIMER_MAGIC);

    console_lock();
    puts_raw("flatlet-guest: boot complete, ");
    put_dec(cpus_up);
    puts_raw(" of ");
    put_dec(cpu_count);
    puts_raw(" cpus up\nflatlet-guest: cmdline: ");
    puts_raw(cmdline);
    puts_raw("\n");
    console_unlock();

    run_options();

    print("flatlet-guest: resetting\n");
    i8042_reset();
}
