/*
 * Entry points of the flatlet test guest.
 *
 * _start: the Linux 64-bit boot protocol entry. The VMM enters in long mode
 * with paging on (its own identity map), interrupts off, %rsi = boot params.
 *
 * ap_tramp_*: the real-mode start of an application processor. The BSP
 * copies it below 1 MiB and points a SIPI at it; it switches to protected
 * mode, then long mode on the guest's own page tables, and calls ap_main.
 *
 * Every instruction here runs in ring 0, which some hosts emulate one
 * instruction at a time: keep it short and avoid what emulators lack
 * (xsave, cmpxchg16b, popcnt, fwait, SSE).
 */

#define SEL_CODE64 0x10
#define SEL_DATA 0x18
#define SEL_CODE32 0x20
#define STACK_SIZE 8192
#define MAX_CPUS 32

    .section .text.boot, "ax"
    .code64
    .globl _start
_start:
    cli
    lgdt gdt_ptr(%rip)
    mov $SEL_DATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    lea bsp_stack_top(%rip), %rsp
    mov %rsi, %rdi
    call bsp_main
1:  cli
    hlt
    jmp 1b

/* Long-mode entry of an AP, reached from ap_pm32. */
ap_long64:
    mov $SEL_DATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    /* The APIC ID picks the stack; an ID the guest has no stack for halts. */
    mov $0xfee00020, %ecx
    mov (%rcx), %eax
    shr $24, %eax
    cmp $MAX_CPUS, %eax
    jae 2f
    mov %eax, %edi
    lea 1(%rax), %rax
    imul $STACK_SIZE, %rax, %rax
    lea ap_stacks(%rip), %rsp
    add %rax, %rsp
    call ap_main
2:  cli
    hlt
    jmp 2b

    .code32
ap_pm32:
    mov $SEL_DATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %cr4, %eax
    or $0x20, %eax              /* PAE */
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx       /* EFER */
    rdmsr
    or $0x100, %eax             /* LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax        /* PG | PE */
    mov %eax, %cr0
    ljmp $SEL_CODE64, $ap_long64

    .code16
    .globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (tramp_gdt_ptr - ap_tramp_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $SEL_CODE32, $ap_pm32
    .align 4
tramp_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:

    .code64
/* Interrupt and exception entry stubs. Each pushes a vector number (and a
 * dummy error code where the CPU pushes none) and joins isr_common, which
 * saves the caller-saved registers and calls isr_dispatch(frame). */
#define ISR_NOERR(v) .globl isr_##v; isr_##v: push $0; push $v; jmp isr_common
#define ISR_ERR(v) .globl isr_##v; isr_##v: push $v; jmp isr_common
ISR_NOERR(0)
ISR_NOERR(3)
ISR_NOERR(6)
ISR_ERR(8)
ISR_ERR(13)
ISR_ERR(14)
ISR_NOERR(32)
ISR_NOERR(33)
ISR_NOERR(34)
ISR_NOERR(35)
ISR_NOERR(36)
ISR_NOERR(37)
ISR_NOERR(38)
ISR_NOERR(39)
ISR_NOERR(255)

isr_common:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    mov %rsp, %rdi
    call isr_dispatch
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    add $16, %rsp
    iretq

/*
 * u32 syscall_probe(void): the flatlet.syscall probe. Drops to ring 3
 * (IOPL 3, so that either ring can use the serial port) and executes
 * `syscall`; the entry (LSTAR, set by the caller) reports the CPL it was
 * entered at through syscall_probe_report, which resets the machine unless
 * it was ring 0. Back in ring 0, the kernel stack is restored and the
 * entry's %cs is returned.
 */
    .text
    .globl syscall_probe
syscall_probe:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, probe_kernel_rsp(%rip)
    pushq $0x2b                 /* SS: user data, RPL 3 */
    lea probe_user_stack_top(%rip), %rax
    push %rax
    pushq $0x3002               /* RFLAGS: IOPL 3, interrupts off */
    pushq $0x33                 /* CS: user code, RPL 3 */
    lea probe_user(%rip), %rax
    push %rax
    iretq
probe_user:
    syscall
    ud2
    .globl syscall_probe_entry
syscall_probe_entry:
    mov %cs, %edi
    lea probe_user_stack_top(%rip), %rsp
    call syscall_probe_report
    mov probe_kernel_rsp(%rip), %rsp
    mov %cs, %eax
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret

    .section .data
    .align 8
probe_kernel_rsp:
    .quad 0

    .section .data
    .align 16
    .globl gdt
gdt:
    .quad 0
    .quad 0x00af9b000000ffff    /* 0x08: 64-bit code (the selector some VMMs boot with) */
    .quad 0x00af9b000000ffff    /* 0x10: 64-bit code, __BOOT_CS */
    .quad 0x00cf93000000ffff    /* 0x18: flat data, __BOOT_DS */
    .quad 0x00cf9b000000ffff    /* 0x20: 32-bit code for the AP trampoline */
    .quad 0x00cff3000000ffff    /* 0x28: user data (SYSRET's SS with STAR base 0x20) */
    .quad 0x00affb000000ffff    /* 0x30: user 64-bit code (SYSRET's CS) */
gdt_end:
    .align 16
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

/* Page tables, initialised at build time so the guest spends no emulated
 * instructions on them: the first 1 GiB identity mapped with 2 MiB pages,
 * and the MMIO pages the guest uses in the 3-4 GiB window (boot timer and
 * virtio-mmio at 0xc0000000, IOAPIC at 0xfec00000, LAPIC at 0xfee00000),
 * uncached. */
    .section .data.pagetables, "aw"
    .align 4096
    .globl pml4
pml4:
    .quad pdpt + 0x3
    .fill 511, 8, 0
    .globl pdpt
pdpt:
    .quad pd_low + 0x3
    .quad 0
    .quad 0
    .quad pd_high + 0x3
    .fill 508, 8, 0
    .globl pd_low
pd_low:
    .set addr, 0
    .rept 512
    .quad addr + 0x83
    .set addr, addr + 0x200000
    .endr
pd_high:
    .quad 0xc0000000 + 0x9b     /* P | RW | PWT | PCD | PS */
    .fill 501, 8, 0
    .quad 0xfec00000 + 0x9b
    .quad 0xfee00000 + 0x9b
    .fill 8, 8, 0

    .section .data
    .align 16
    .globl idt
idt:
    .fill 256 * 16, 1, 0

    .section .stack, "aw", @nobits
    .align 4096
bsp_stack:
    .skip STACK_SIZE
bsp_stack_top:
    .globl ap_stacks
ap_stacks:
    .skip STACK_SIZE * (MAX_CPUS + 1)
probe_user_stack:
    .skip 4096
probe_user_stack_top:

    .section .note.GNU-stack, "", @progbits
