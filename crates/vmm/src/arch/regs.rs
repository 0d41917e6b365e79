//! Boot vCPU state for the Linux 64-bit boot protocol: long mode with an
//! identity map, a flat GDT with `__BOOT_CS` (0x10) and `__BOOT_DS`
//! (0x18), `%rsi` pointing at the zero page, interrupts off.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    BOOT_GDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START, ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_WP: u64 = 1 << 16;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT selectors of the boot protocol.
pub const BOOT_CS: u16 = 0x10;
/// Data selector.
pub const BOOT_DS: u16 = 0x18;
/// Task register selector (VMX needs a usable TR).
pub const BOOT_TSS: u16 = 0x20;

/// Errors writing boot state to guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A boot structure does not fit in guest memory.
    #[error("cannot write the {0} to guest memory")]
    Write(&'static str),
}

/// Encodes a GDT descriptor from its flags (access byte and the high
/// flag nibble: `0xG0AA` style), base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << (56 - 24))
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << (48 - 16))
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// The boot GDT: null, null, code (0x10), data (0x18), TSS (0x20).
pub const BOOT_GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code, present, DPL 0, 4 KiB granular
    gdt_entry(0xc093, 0, 0xfffff), // data, read/write
    gdt_entry(0x808b, 0, 0xfffff), // 32-bit busy TSS
];

/// The KVM segment a GDT entry describes, for selector `selector`.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let raw_limit = ((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff);
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            ((raw_limit << 12) | 0xfff) as u32
        } else {
            raw_limit as u32
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

/// Writes the boot GDT and the identity map of the first GiB (2 MiB
/// pages) into guest memory.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|_| RegsError::Write("boot GDT"))?;
    }
    mem.write_obj(PDPTE_START | 0x3, GuestAddress(PML4_START))
        .map_err(|_| RegsError::Write("PML4"))?;
    mem.write_obj(PDE_START | 0x3, GuestAddress(PDPTE_START))
        .map_err(|_| RegsError::Write("PDPT"))?;
    let mut pd = [0u8; 4096];
    for (i, chunk) in pd.chunks_exact_mut(8).enumerate() {
        // Present, writable, 2 MiB page.
        chunk.copy_from_slice(&(((i as u64) << 21) | 0x83).to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PDE_START))
        .map_err(|_| RegsError::Write("page directory"))?;
    Ok(())
}

/// Special registers of the boot vCPU: long mode, paging on the identity
/// map, the boot GDT loaded.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(BOOT_GDT[2], BOOT_CS);
    let data = segment_from_gdt(BOOT_GDT[3], BOOT_DS);
    let tss = segment_from_gdt(BOOT_GDT[4], BOOT_TSS);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers of the boot vCPU: entry point, boot stack, zero page
/// in `%rsi`, interrupts off.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// FPU state after reset (as Linux expects from firmware).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let cs = segment_from_gdt(BOOT_GDT[2], BOOT_CS);
        assert_eq!(
            (cs.base, cs.limit, cs.type_, cs.l, cs.db, cs.g, cs.present, cs.s),
            (0, 0xffff_ffff, 0xb, 1, 0, 1, 1, 1)
        );
        let ds = segment_from_gdt(BOOT_GDT[3], BOOT_DS);
        assert_eq!((ds.type_, ds.l, ds.db, ds.g, ds.unusable), (0x3, 0, 1, 1, 0));
        let tr = segment_from_gdt(BOOT_GDT[4], BOOT_TSS);
        assert_eq!((tr.type_, tr.s, tr.present), (0xb, 0, 1));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
        // The encoding of a well-known descriptor.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn sregs_enter_long_mode_on_the_identity_map() {
        let s = boot_sregs(kvm_sregs::default());
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr0 & X86_CR0_PE, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.selector, BOOT_CS);
        assert_eq!(s.ss.selector, BOOT_DS);
        let r = boot_regs(0x100_0000);
        assert_eq!((r.rip, r.rsi, r.rflags & 0x200), (0x100_0000, ZERO_PAGE_START, 0));
    }

    #[test]
    fn boot_tables_identity_map_the_first_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpt: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pdpt, PDE_START | 3);
        for i in [0u64, 1, 511] {
            let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 8 * i)).unwrap();
            assert_eq!(pde, (i << 21) | 0x83);
        }
        let cs: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 0x10)).unwrap();
        assert_eq!(cs, BOOT_GDT[2]);
        // Memory too small for the tables is an error, not a panic.
        let tiny = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(write_boot_tables(&tiny).is_err());
    }
}
