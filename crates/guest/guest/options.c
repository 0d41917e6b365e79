/* What the guest does after boot, chosen on its command line:
 *   flatlet.int3         execute int3 (a #BP the VMM may have to inject)
 *   flatlet.fwait        execute fwait (which the VMM may have to reproduce)
 *   flatlet.crash=emul   execute lock cmpxchg16b, which nested hosts cannot emulate
 *   flatlet.crash=triple triple fault
 *   flatlet.stay         keep running: heartbeats, reset on Ctrl-Alt-Del
 *   flatlet.beatio       with flatlet.stay: drive and NIC I/O on each heartbeat
 *   flatlet.flood        print to the console without end (a chatty guest,
 *                        for the tests of a console nobody reads)
 *   flatlet.syscall      execute `syscall` from ring 3 and report the ring
 *                        its entry ran in (nested PVM hosts get it wrong)
 *   flatlet.vsock=...    echo:PORT or connect:PORT (see vsock.c)
 */
#include "guest_main.h"

static u32 want_int3 = 0;
static u32 want_fwait = 0;
static u32 want_stay = 0;
static u32 crash_mode = 0; /* 0 none, 1 emul, 2 triple */
static u32 want_syscall = 0;
static u32 want_flood = 0;

static void parse_option(const char *w, u32 len)
{
    if (option_is(w, len, "flatlet.int3"))
        want_int3 = 1;
    else if (option_is(w, len, "flatlet.fwait"))
        want_fwait = 1;
    else if (option_is(w, len, "flatlet.stay"))
        want_stay = 1;
    else if (option_is(w, len, "flatlet.crash=emul"))
        crash_mode = 1;
    else if (option_is(w, len, "flatlet.crash=triple"))
        crash_mode = 2;
    else if (option_is(w, len, "flatlet.syscall"))
        want_syscall = 1;
    else if (option_is(w, len, "flatlet.flood"))
        want_flood = 1;
}

/* flatlet.flood: numbered lines, as fast as the UART takes them. */
static void flood(void)
{
    print("flatlet-guest: flooding the console\n");
    for (u64 n = 1;; n++) {
        console_lock();
        puts_raw("flatlet-guest: flood ");
        put_dec(n);
        puts_raw(" ..................................................\n");
        console_unlock();
    }
}

/* --- flatlet.syscall ------------------------------------------------------ */

#define MSR_EFER 0xc0000080u
#define MSR_STAR 0xc0000081u
#define MSR_LSTAR 0xc0000082u
#define MSR_SFMASK 0xc0000084u
#define EFER_SCE 1u
#define PTE_USER 4u

u32 syscall_probe(void);
void syscall_probe_entry(void);
extern u64 pml4[], pdpt[], pd_low[];

static u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}

static void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}

/* Called by syscall_probe_entry with the %cs it was entered with. */
void syscall_probe_report(u32 cs)
{
    console_lock();
    puts_raw("flatlet-guest: syscall entry ran in ring ");
    put_dec(cs & 3);
    puts_raw(", cs ");
    put_hex(cs);
    puts_raw("\n");
    console_unlock();
    if ((cs & 3) != 0) {
        print("flatlet-guest: syscall did not reach ring 0, resetting\n");
        i8042_reset(); /* port I/O, allowed in ring 3 by IOPL 3 */
    }
}

static void probe_syscall(void)
{
    u64 cr3;
    print("flatlet-guest: executing syscall from ring 3\n");
    /* The guest's first 2 MiB (its code, data and stacks) become reachable
     * from ring 3; the rest stays supervisor-only. */
    pml4[0] |= PTE_USER;
    pdpt[0] |= PTE_USER;
    pd_low[0] |= PTE_USER;
    __asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
    /* SYSCALL: CS 0x10 (SS 0x18); SYSRET base 0x20 (SS 0x2b, CS 0x33). */
    wrmsr(MSR_STAR, (0x20ul << 48) | (0x10ul << 32));
    wrmsr(MSR_LSTAR, (u64)syscall_probe_entry);
    wrmsr(MSR_SFMASK, 0x300); /* IF and TF off; IOPL kept */
    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SCE);
    u32 cs = syscall_probe();
    print(cs == 0x10 ? "flatlet-guest: syscall: ok\n" : "flatlet-guest: syscall: wrong cs\n");
}

static void crash_emulation(void)
{
    static u64 target[2] __attribute__((aligned(16))) = {0, 0};
    print("flatlet-guest: executing lock cmpxchg16b\n");
    __asm__ volatile("xor %%eax, %%eax; xor %%edx, %%edx; mov $1, %%ebx; xor %%ecx, %%ecx;"
                     "lock cmpxchg16b %0"
                     : "+m"(target[0])
                     :
                     : "rax", "rbx", "rcx", "rdx", "memory", "cc");
    print("flatlet-guest: lock cmpxchg16b ran natively\n");
}

void run_options(void)
{
    virtio_run();
    for_each_option(parse_option);
    if (want_int3) {
        print("flatlet-guest: executing int3\n");
        __asm__ volatile("int3");
        print("flatlet-guest: after int3\n");
    }
    if (want_fwait) {
        print("flatlet-guest: executing fwait\n");
        __asm__ volatile("fwait");
        print("flatlet-guest: after fwait\n");
    }
    if (want_syscall)
        probe_syscall();
    if (crash_mode == 1)
        crash_emulation();
    else if (crash_mode == 2)
        guest_panic("triple fault requested");
    if (want_flood)
        flood();
    if (vsock_run() == 0 && !want_stay)
        while (vsock_active())
            vsock_step();
    if (want_stay)
        stay();
}

void ap_idle(u32 id)
{
    (void)id;
    for (;;)
        __asm__ volatile("cli; hlt");
}

