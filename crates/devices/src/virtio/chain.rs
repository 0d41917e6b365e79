//! Descriptor chains as device models see them: the device-readable
//! regions, then the device-writable ones, each checked to lie inside
//! guest memory before a device touches any of it.

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// A stretch of guest memory a descriptor gives.
pub type Region = (GuestAddress, usize);

/// A request's buffers: device-readable regions, then device-writable
/// ones, each checked to lie in guest memory.
pub struct Layout {
    /// Device-readable regions, in order.
    pub readable: Vec<Region>,
    /// Device-writable regions, in order.
    pub writable: Vec<Region>,
}

impl Layout {
    /// The layout of `chain`.
    pub fn of(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> Result<Self, &'static str> {
        let mut l = Layout {
            readable: Vec::new(),
            writable: Vec::new(),
        };
        // The chain's iterator ends loops and over-long chains at the
        // queue size (or the indirect table's).
        for d in chain {
            let len = d.len() as usize;
            if len == 0 {
                continue;
            }
            if !mem.check_range(d.addr(), len) {
                return Err("descriptor outside guest memory");
            }
            if d.is_write_only() {
                l.writable.push((d.addr(), len));
            } else if l.writable.is_empty() {
                l.readable.push((d.addr(), len));
            } else {
                return Err("device-readable descriptor after a device-writable one");
            }
        }
        Ok(l)
    }
}

/// Bytes in the regions.
pub fn total(regions: &[Region]) -> usize {
    regions.iter().map(|r| r.1).sum()
}

/// The regions after their first `n` bytes.
pub fn skip(regions: &[Region], mut n: usize) -> Vec<Region> {
    let mut out = Vec::new();
    for &(addr, len) in regions {
        if n >= len {
            n -= len;
            continue;
        }
        out.push((addr.unchecked_add(n as u64), len - n));
        n = 0;
    }
    out
}

/// Removes the last byte of the regions; returns its address.
pub fn take_last_byte(regions: &mut Vec<Region>) -> Option<GuestAddress> {
    let (addr, len) = regions.pop()?;
    if len > 1 {
        regions.push((addr, len - 1));
    }
    Some(addr.unchecked_add(len as u64 - 1))
}

/// Fills `buf` from the start of the regions.
pub fn gather(
    mem: &GuestMemoryMmap,
    regions: &[Region],
    buf: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0;
    for &(addr, len) in regions {
        if done == buf.len() {
            break;
        }
        let n = len.min(buf.len() - done);
        mem.read_slice(&mut buf[done..done + n], addr)?;
        done += n;
    }
    Ok(())
}

/// Writes `data` to the start of the regions.
pub fn scatter(
    mem: &GuestMemoryMmap,
    regions: &[Region],
    data: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0;
    for &(addr, len) in regions {
        if done == data.len() {
            break;
        }
        let n = len.min(data.len() - done);
        mem.write_slice(&data[done..done + n], addr)?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{DATA_BASE, MEM_SIZE, QUEUE_BASE, add_chain, memory, mock};
    use virtio_queue::{Queue, QueueT};

    fn layout(parts: &[(u64, u32, bool)]) -> Result<Layout, &'static str> {
        let mem = memory();
        let m = mock(&mem, QUEUE_BASE[0], 16);
        add_chain(&m, 0, parts);
        let mut q: Queue = m.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        Layout::of(&mem, chain)
    }

    #[test]
    fn readable_then_writable() {
        let l = layout(&[
            (DATA_BASE, 16, false),
            (DATA_BASE + 100, 0, false),
            (DATA_BASE + 512, 8, true),
        ])
        .unwrap();
        assert_eq!(
            l.readable,
            vec![(GuestAddress(DATA_BASE), 16)],
            "empty descriptors are skipped"
        );
        assert_eq!(l.writable, vec![(GuestAddress(DATA_BASE + 512), 8)]);
        assert!(
            layout(&[(DATA_BASE, 8, true), (DATA_BASE + 8, 8, false)]).is_err(),
            "readable after writable"
        );
        assert!(
            layout(&[(MEM_SIZE - 4, 8, false)]).is_err(),
            "crosses the end of memory"
        );
        assert!(
            layout(&[(u64::MAX - 2, 8, true)]).is_err(),
            "wraps the address space"
        );
    }

    #[test]
    fn region_arithmetic() {
        let a = GuestAddress(0x1000);
        let b = GuestAddress(0x8000);
        let regions = vec![(a, 10), (b, 6)];
        assert_eq!(total(&regions), 16);
        assert_eq!(skip(&regions, 4), vec![(GuestAddress(0x1004), 6), (b, 6)]);
        assert_eq!(skip(&regions, 10), vec![(b, 6)]);
        assert_eq!(skip(&regions, 99), vec![]);
        let mut r = regions.clone();
        assert_eq!(take_last_byte(&mut r), Some(GuestAddress(0x8005)));
        assert_eq!(r, vec![(a, 10), (b, 5)]);
        let mut one = vec![(a, 1)];
        assert_eq!(take_last_byte(&mut one), Some(a));
        assert!(one.is_empty());
        assert_eq!(take_last_byte(&mut one), None);
    }

    #[test]
    fn gather_and_scatter_across_regions() {
        let mem = memory();
        let regions = vec![(GuestAddress(0x1000), 3), (GuestAddress(0x2000), 5)];
        scatter(&mem, &regions, b"abcdefg").unwrap();
        let mut buf = [0u8; 7];
        gather(&mem, &regions, &mut buf).unwrap();
        assert_eq!(&buf, b"abcdefg");
        let first: [u8; 3] = mem.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(&first, b"abc");
    }
}
