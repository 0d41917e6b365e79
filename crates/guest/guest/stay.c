/*
 * flatlet.stay: the guest keeps running after boot. The BSP prints a
 * heartbeat once a second from its LAPIC timer, and resets when the
 * keyboard sends Ctrl-Alt-Del (the scancodes Firecracker's SendCtrlAltDel
 * produces: set-2 Ctrl, Alt, then E0 71 for Delete).
 */
#include "guest_main.h"

#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3e0
#define TIMER_PERIODIC (1u << 17)
#define TIMER_DIV_1 0xb
#define IOAPIC_BASE 0xfec00000UL
#define KBD_PIN 1
#define TIMING_LEAF 0x40000010u
#define DEFAULT_BUS_KHZ 1000000u

static volatile u64 heartbeats = 0;
static u32 kbd_state = 0;
static const u8 ctrl_alt_del[] = {0x14, 0x11, 0xe0, 0x71};

/* The LAPIC timer's frequency, from the hypervisor's timing leaf (KVM
 * runs it at 1 GHz when the leaf is missing). */
static u32 lapic_bus_khz(void)
{
    u32 a, b, c, d;
    cpuid(0x40000000u, &a, &b, &c, &d);
    if (a >= TIMING_LEAF) {
        cpuid(TIMING_LEAF, &a, &b, &c, &d);
        if (b)
            return b;
    }
    return DEFAULT_BUS_KHZ;
}

void ioapic_route(u32 pin, u32 vector, u32 dest)
{
    mmio_write32(IOAPIC_BASE, 0x10 + 2 * pin + 1);
    mmio_write32(IOAPIC_BASE + 0x10, dest << 24);
    mmio_write32(IOAPIC_BASE, 0x10 + 2 * pin);
    mmio_write32(IOAPIC_BASE + 0x10, vector); /* fixed, physical, edge, unmasked */
}

static void keyboard_irq(void)
{
    /* Every byte the controller holds. */
    while (inb(0x64) & 1) {
        u8 b = inb(0x60);
        kbd_state = (b == ctrl_alt_del[kbd_state]) ? kbd_state + 1 : (b == ctrl_alt_del[0]);
        if (kbd_state == sizeof(ctrl_alt_del)) {
            print("flatlet-guest: ctrl-alt-del, resetting\n");
            i8042_reset();
        }
    }
}

static void timer_irq(void)
{
    u64 n = ++heartbeats;
    console_lock();
    puts_raw("flatlet-guest: heartbeat ");
    put_dec(n);
    puts_raw("\n");
    console_unlock();
}

void handle_irq(u32 irq)
{
    if (irq == 0)
        timer_irq();
    else if (irq == KBD_PIN)
        keyboard_irq();
    else if (irq == 2)
        vsock_irq();
}

void stay(void)
{
    /* KVM's full irqchip has the legacy 8259 PICs, wired to LINT0: mask
     * every line of both, so that ISA interrupts arrive only through the
     * I/O APIC (as with any APIC-using kernel). */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    ioapic_route(KBD_PIN, IRQ_VECTOR_BASE + KBD_PIN, lapic_id());
    lapic_write(LAPIC_TIMER_DIV, TIMER_DIV_1);
    lapic_write(LAPIC_LVT_TIMER, IRQ_VECTOR_BASE | TIMER_PERIODIC);
    lapic_write(LAPIC_TIMER_INIT, lapic_bus_khz() * 1000u);
    print("flatlet-guest: staying: heartbeat every second, Ctrl-Alt-Del resets\n");
    u64 seen = 0;
    for (;;) {
        if (heartbeats != seen) {
            seen = heartbeats;
            virtio_heartbeat(seen);
        }
        if (vsock_active())
            vsock_step();
        else
            __asm__ volatile("sti; hlt; cli" ::: "memory");
    }
}
