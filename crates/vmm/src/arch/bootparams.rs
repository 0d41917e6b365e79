//! The zero page (`struct boot_params`) of the Linux boot protocol: the
//! setup header, command line and initrd pointers, and the e820 memory map.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::{CMDLINE_START, EBDA_END, HIMEM_START, MPTABLE_START, ZERO_PAGE_START};

/// Kinds of e820 ranges.
pub const E820_RAM: u32 = 1;
/// Reserved range.
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Boot protocol version flatlet speaks when the kernel gives none (ELF).
const BOOT_PROTOCOL_VERSION: u16 = 0x020f;

/// One e820 range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// Errors writing the zero page.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    /// Too many e820 ranges for the zero page.
    #[error("too many e820 entries ({0})")]
    TooManyE820Entries(usize),
    /// Writing to guest memory failed.
    #[error("cannot write the zero page: {0}")]
    Write(String),
}

/// The e820 map of guest RAM given as (start, length) regions: base memory
/// up to the MP table, the MP table reserved, then RAM from 1 MiB.
pub fn e820_map(regions: &[(u64, u64)]) -> Vec<E820Entry> {
    let mut map = Vec::new();
    for &(start, len) in regions {
        let end = start + len;
        if start < HIMEM_START {
            map.push(E820Entry {
                addr: start,
                size: MPTABLE_START.min(end) - start,
                kind: E820_RAM,
            });
            if end > MPTABLE_START {
                map.push(E820Entry {
                    addr: MPTABLE_START,
                    size: EBDA_END - MPTABLE_START,
                    kind: E820_RESERVED,
                });
            }
            if end > HIMEM_START {
                map.push(E820Entry {
                    addr: HIMEM_START,
                    size: end - HIMEM_START,
                    kind: E820_RAM,
                });
            }
        } else {
            map.push(E820Entry {
                addr: start,
                size: len,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// What goes into the zero page.
#[derive(Clone, Debug, Default)]
pub struct ZeroPage {
    /// The bzImage's setup header (None for an ELF kernel).
    pub setup_header: Option<setup_header>,
    /// Command line length including its NUL.
    pub cmdline_size: usize,
    /// Initrd (address, size).
    pub initrd: Option<(u64, u64)>,
    /// Memory map.
    pub e820: Vec<E820Entry>,
}

impl ZeroPage {
    /// The `boot_params` structure.
    pub fn build(&self) -> Result<boot_params, BootParamsError> {
        let mut params = boot_params::default();
        if let Some(hdr) = self.setup_header {
            params.hdr = hdr;
        } else {
            params.hdr.version = BOOT_PROTOCOL_VERSION;
        }
        params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.cmd_line_ptr = CMDLINE_START as u32;
        params.ext_cmd_line_ptr = (CMDLINE_START >> 32) as u32;
        params.hdr.cmdline_size = self.cmdline_size as u32;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
        if let Some((addr, size)) = self.initrd {
            params.hdr.ramdisk_image = addr as u32;
            params.ext_ramdisk_image = (addr >> 32) as u32;
            params.hdr.ramdisk_size = size as u32;
            params.ext_ramdisk_size = (size >> 32) as u32;
        }
        if self.e820.len() > params.e820_table.len() {
            return Err(BootParamsError::TooManyE820Entries(self.e820.len()));
        }
        for (slot, e) in params.e820_table.iter_mut().zip(&self.e820) {
            *slot = boot_e820_entry {
                addr: e.addr,
                size: e.size,
                r#type: e.kind,
            };
        }
        params.e820_entries = self.e820.len() as u8;
        Ok(params)
    }

    /// Writes the zero page at its place in guest memory.
    pub fn write(&self, mem: &GuestMemoryMmap) -> Result<(), BootParamsError> {
        let params = self.build()?;
        LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
            &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
            mem,
        )
        .map_err(|e| BootParamsError::Write(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn e820_of_small_and_split_memory() {
        let small = e820_map(&[(0, 128 << 20)]);
        assert_eq!(
            small,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x400,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: (128 << 20) - 0x10_0000,
                    kind: E820_RAM
                },
            ]
        );
        let big = e820_map(&[(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(big.len(), 4);
        assert_eq!(
            big[3],
            E820Entry {
                addr: 4 << 30,
                size: 1 << 30,
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn zero_page_fields() {
        let zp = ZeroPage {
            setup_header: None,
            cmdline_size: 20,
            initrd: Some((0x700_0000, 0x1234)),
            e820: e820_map(&[(0, 64 << 20)]),
        };
        let p = zp.build().unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 20);
        assert_eq!({ p.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.e820_table[2].addr }, 0x10_0000);

        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        zp.write(&mem).unwrap();
        // The guest finds cmd_line_ptr at offset 0x228 of the zero page.
        let ptr: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x228)).unwrap();
        assert_eq!(ptr, CMDLINE_START as u32);
    }

    #[test]
    fn too_many_e820_entries() {
        let zp = ZeroPage {
            e820: vec![
                E820Entry {
                    addr: 0,
                    size: 1,
                    kind: E820_RAM
                };
                200
            ],
            ..Default::default()
        };
        assert!(matches!(
            zp.build(),
            Err(BootParamsError::TooManyE820Entries(200))
        ));
    }
}
