/* What the guest does after boot, chosen on its command line:
 *   flatlet.int3         execute int3 (a #BP the VMM may have to inject)
 *   flatlet.crash=emul   execute lock cmpxchg16b, which nested hosts cannot emulate
 *   flatlet.crash=triple triple fault
 *   flatlet.stay         keep running: heartbeats, reset on Ctrl-Alt-Del
 */
#include "guest_main.h"

static u32 want_int3 = 0;
static u32 want_stay = 0;
static u32 crash_mode = 0; /* 0 none, 1 emul, 2 triple */

static void parse_option(const char *w, u32 len)
{
    if (option_is(w, len, "flatlet.int3"))
        want_int3 = 1;
    else if (option_is(w, len, "flatlet.stay"))
        want_stay = 1;
    else if (option_is(w, len, "flatlet.crash=emul"))
        crash_mode = 1;
    else if (option_is(w, len, "flatlet.crash=triple"))
        crash_mode = 2;
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
    if (crash_mode == 1)
        crash_emulation();
    else if (crash_mode == 2)
        guest_panic("triple fault requested");
    if (want_stay)
        stay();
}

void ap_idle(u32 id)
{
    (void)id;
    for (;;)
        __asm__ volatile("cli; hlt");
}

