//! The x86-64 guest-physical address layout flatlet gives a VM.
//!
//! Low memory follows Firecracker's layout (so that guests and tools that
//! know it find things in the same places):
//!
//! | address       | what                                   |
//! |---------------|----------------------------------------|
//! | 0x500         | boot GDT                               |
//! | 0x7000        | zero page (`boot_params`)              |
//! | 0x8ff0        | boot stack pointer                     |
//! | 0x9000        | PML4, then PDPT and PD (identity map)  |
//! | 0x20000       | kernel command line                    |
//! | 0x9fc00       | MP table (last KiB of base memory)     |
//! | 0x100000      | kernel (ELF `p_paddr`, bzImage 1 MiB)  |
//! | 0xc000_0000   | 32-bit MMIO window: boot timer, virtio |
//! | 0xfec0_0000   | I/O APIC                               |
//! | 0xfee0_0000   | local APICs (in KVM)                   |
//! | 4 GiB         | RAM beyond 3 GiB continues here        |

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4 of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the boot identity map (2 MiB pages, first 1 GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line, with its terminating NUL (Linux's x86
/// `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// MP table: the last KiB of base memory, where Linux searches.
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of base (conventional) memory.
pub const EBDA_END: u64 = 0xa0000;
/// Start of high memory, where kernels load.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO window (3 GiB).
pub const MMIO32_START: u64 = 0xc000_0000;
/// Size of the 32-bit MMIO window (up to 4 GiB).
pub const MMIO32_SIZE: u64 = 0x4000_0000;
/// First address past the 32-bit window: RAM resumes here.
pub const RAM_ABOVE_4G_START: u64 = 0x1_0000_0000;
/// Where the local APICs are.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM's TSS area (needed by VMX for real-mode emulation), inside the
/// MMIO window and never RAM.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// First MMIO slot for virtio devices, after the boot timer's page.
pub const VIRTIO_MMIO_START: u64 = MMIO32_START + 0x1000;
/// Size of one virtio-mmio device's window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
