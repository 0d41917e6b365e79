//! The MP table (Intel MultiProcessor Specification 1.4): how the guest
//! learns its processors, its I/O APIC and how ISA IRQs reach it.
//!
//! It lives in the last KiB of base memory, where Linux looks first. Every
//! IRQ 0-23 is wired to the same I/O APIC pin, conforming polarity and
//! trigger (edge, active high, for the ISA bus).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{EBDA_END, LAPIC_START, MPTABLE_START};
use flatlet_devices::ioapic::{IOAPIC_BASE, NUM_PINS};

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const CPU_SIGNATURE: u32 = 0x600; // family 6
const CPU_FEATURES: u32 = 0x201; // FPU | APIC
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Errors building or writing the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MptableError {
    /// More vCPUs than the table's space holds.
    #[error("the MP table has no room for {0} vCPUs")]
    TooManyCpus(u8),
    /// Guest memory does not cover the table's place.
    #[error("guest memory does not cover the MP table at {MPTABLE_START:#x}")]
    Write,
}

/// The I/O APIC ID given a VM of `cpus` vCPUs: the first ID after the
/// local APICs.
pub fn ioapic_id(cpus: u8) -> u8 {
    cpus + 1
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the MP floating pointer and configuration table, to be placed
/// at `base`.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    let table_start = base + 16;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic = ioapic_id(cpus);
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    count += 1;
    for irq in 0..NUM_PINS as u8 {
        // type, interrupt type, flags (u16, conforming), bus, bus IRQ, APIC, pin
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, 0, irq, ioapic, irq]);
        count += 1;
    }
    // ExtINT to LINT0 and NMI to LINT1 of every local APIC.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    // The table must fit in the KiB below EBDA_END where it is placed.
    if 16 + table_len as u64 > EBDA_END - MPTABLE_START {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.extend_from_slice(&[SPEC_REV, 0]); // checksum patched below
    table.extend_from_slice(b"FLATLET ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16 + table.len());
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_start as u32).to_le_bytes());
    fp.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    Ok(fp)
}

/// Writes the MP table for `cpus` vCPUs at its place in guest memory.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let bytes = build(cpus, MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|_| MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Walks the table the way a guest does, returning (processor IDs with
    /// flags, I/O APIC IDs, IO-interrupt pins).
    fn parse(b: &[u8], base: u64) -> (Vec<(u8, u8)>, Vec<u8>, Vec<u8>) {
        assert_eq!(&b[..4], b"_MP_");
        assert_eq!(sum(&b[..16]), 0, "floating pointer checksum");
        let table_addr = u32::from_le_bytes(b[4..8].try_into().unwrap()) as u64;
        let t = &b[(table_addr - base) as usize..];
        assert_eq!(&t[..4], b"PCMP");
        let len = u16::from_le_bytes([t[4], t[5]]) as usize;
        assert_eq!(sum(&t[..len]), 0, "table checksum");
        let count = u16::from_le_bytes([t[34], t[35]]);
        assert_eq!(u32::from_le_bytes(t[36..40].try_into().unwrap()), 0xfee0_0000);
        let (mut cpus, mut ioapics, mut pins) = (vec![], vec![], vec![]);
        let mut off = 44;
        for _ in 0..count {
            match t[off] {
                0 => {
                    cpus.push((t[off + 1], t[off + 3]));
                    off += 20;
                }
                2 => {
                    ioapics.push(t[off + 1]);
                    off += 8;
                }
                3 => {
                    pins.push(t[off + 7]);
                    off += 8;
                }
                1 | 4 => off += 8,
                x => panic!("bad entry type {x}"),
            }
        }
        assert_eq!(off, len, "entry count and length agree");
        (cpus, ioapics, pins)
    }

    #[test]
    fn one_to_thirty_two_cpus_fit_and_parse() {
        for cpus in [1u8, 2, 4, 32] {
            let b = build(cpus, MPTABLE_START).unwrap();
            assert!(b.len() <= 1024, "{cpus} cpus: {} bytes", b.len());
            let (procs, ioapics, pins) = parse(&b, MPTABLE_START);
            assert_eq!(procs.len(), cpus as usize);
            assert_eq!(procs[0], (0, CPU_ENABLED | CPU_BOOT_PROCESSOR));
            assert!(
                procs[1..]
                    .iter()
                    .enumerate()
                    .all(|(i, p)| *p == (i as u8 + 1, CPU_ENABLED))
            );
            assert_eq!(ioapics, vec![cpus + 1]);
            assert_eq!(pins, (0..24).collect::<Vec<u8>>());
        }
    }

    #[test]
    fn written_where_linux_looks() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert_eq!(write(&small, 1), Err(MptableError::Write));
    }

    #[test]
    fn too_many_cpus_is_an_error() {
        assert_eq!(build(60, MPTABLE_START), Err(MptableError::TooManyCpus(60)));
    }
}
