//! Descriptor chains as device models see them: the device-readable
//! regions, then the device-writable ones, each checked to lie inside
//! guest memory before a device touches any of it.
//!
//! flatlet walks chains itself rather than through virtio-queue's
//! iterator, for two reasons: it offers no `VIRTIO_RING_F_INDIRECT_DESC`,
//! so a descriptor that points to an indirect table is refused, not
//! followed; and a driver's mistakes (an available index that claims more
//! chains than the queue holds, a descriptor index past the table) are
//! returned as errors the device counts and logs at a bounded rate,
//! instead of virtio-queue's own unlimited log lines.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// A stretch of guest memory a descriptor gives.
pub type Region = (GuestAddress, usize);

/// Size of a descriptor in the table.
const DESCRIPTOR_SIZE: u64 = 16;

/// What is wrong with a queue or a chain the driver made available.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The available index is more than a queue's worth ahead.
    #[error("available index {avail} is more than {size} ahead of {next}")]
    AvailIndex { avail: u16, next: u16, size: u16 },
    /// The available ring cannot be read.
    #[error("available ring outside guest memory")]
    AvailRing,
    /// A descriptor index past the end of the table.
    #[error("descriptor index {0} is past the end of the table")]
    Index(u16),
    /// A descriptor cannot be read.
    #[error("descriptor {0} outside guest memory")]
    Table(u16),
    /// An indirect descriptor: the feature is not offered.
    #[error("indirect descriptor (VIRTIO_RING_F_INDIRECT_DESC is not offered)")]
    Indirect,
    /// More descriptors than the queue has: a loop.
    #[error("chain longer than the queue (a loop)")]
    TooLong,
    /// A buffer outside guest memory.
    #[error("descriptor outside guest memory")]
    OutsideMemory,
    /// A device-readable buffer after a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// A buffer in the direction the queue does not use.
    #[error("descriptor in the wrong direction for this queue")]
    WrongDirection,
}

/// The head of the next chain the driver made available, if any. The
/// available index is checked first: a driver that claims more chains
/// than the queue holds gets [`ChainError::AvailIndex`], and the queue is
/// left as it was. A queue that is not ready has nothing available.
pub fn pop_head(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<Option<u16>, ChainError> {
    match avail_index(queue, mem)? {
        Some(avail) => take_head(queue, mem, avail),
        None => Ok(None),
    }
}

/// The driver's available index, checked as [`pop_head`] checks it; None
/// when the queue is not ready. A device that takes several chains at
/// once reads it once and takes each with [`take_head`].
pub fn avail_index(queue: &Queue, mem: &GuestMemoryMmap) -> Result<Option<Wrapping<u16>>, ChainError> {
    if !queue.ready() {
        return Ok(None);
    }
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|_| ChainError::AvailRing)?;
    let next = Wrapping(queue.next_avail());
    if (avail - next).0 > queue.size() {
        return Err(ChainError::AvailIndex {
            avail: avail.0,
            next: next.0,
            size: queue.size(),
        });
    }
    Ok(Some(avail))
}

/// The head of the chain at the queue's next available position, if
/// `avail` (from [`avail_index`]) is ahead of it; the position moves on.
/// As virtio-queue's own iterator does it, without building one (and
/// reading the available index again) for every chain.
pub fn take_head(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    avail: Wrapping<u16>,
) -> Result<Option<u16>, ChainError> {
    let next = queue.next_avail();
    if avail.0 == next || queue.size() == 0 {
        return Ok(None);
    }
    let slot = u64::from(next % queue.size()) * 2;
    let load = |addr: GuestAddress| match within_region(mem, addr, 2) {
        Some((region, at)) => region.load(at, Ordering::Acquire).ok(),
        None => mem.load(addr, Ordering::Acquire).ok(),
    };
    let head: u16 = GuestAddress(queue.avail_ring())
        .checked_add(4 + slot)
        .and_then(load)
        .map(u16::from_le)
        .ok_or(ChainError::AvailRing)?;
    queue.set_next_avail(next.wrapping_add(1));
    Ok(Some(head))
}

/// The descriptors of the chain at `head`, in order. Indirect descriptors
/// are refused, and a chain ends at the queue size (a loop is an error).
pub fn descriptors(mem: &GuestMemoryMmap, queue: &Queue, head: u16) -> Result<Vec<Descriptor>, ChainError> {
    let mut out = Vec::new();
    descriptors_into(mem, queue, head, &mut out)?;
    Ok(out)
}

/// As [`descriptors`], into `out` (cleared first), so that a device can
/// keep one vector for all its chains.
pub fn descriptors_into(
    mem: &GuestMemoryMmap,
    queue: &Queue,
    head: u16,
    out: &mut Vec<Descriptor>,
) -> Result<(), ChainError> {
    out.clear();
    let table = GuestAddress(queue.desc_table());
    let size = queue.size();
    let mut index = head;
    loop {
        if index >= size {
            return Err(ChainError::Index(index));
        }
        if out.len() >= usize::from(size) {
            return Err(ChainError::TooLong);
        }
        let d: Descriptor = table
            .checked_add(u64::from(index) * DESCRIPTOR_SIZE)
            .and_then(|addr| read_obj_fast(mem, addr))
            .ok_or(ChainError::Table(index))?;
        if d.refers_to_indirect_table() {
            return Err(ChainError::Indirect);
        }
        let next = d.has_next().then(|| d.next());
        out.push(d);
        match next {
            Some(n) => index = n,
            None => return Ok(()),
        }
    }
}

/// Reads an object from guest memory through the region that holds it
/// (one lookup, one bounds check), falling back to the general path for
/// an object across regions. `GuestMemory::read_obj` walks its slice
/// iterator for every access: ~300 instructions per 16-byte descriptor,
/// as much as the rest of a frame's transmit work (issue 16).
fn read_obj_fast<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, addr: GuestAddress) -> Option<T> {
    if let Some((region, at)) = within_region(mem, addr, size_of::<T>()) {
        if let Ok(v) = region.read_obj(at) {
            return Some(v);
        }
    }
    mem.read_obj(addr).ok()
}

/// The region that holds all of `[addr, addr + len)`, and `addr` in it;
/// None when no single region does (the general paths handle that).
fn within_region(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
) -> Option<(&vm_memory::GuestRegionMmap, vm_memory::MemoryRegionAddress)> {
    use vm_memory::GuestMemoryRegion;
    let region = mem.find_region(addr)?;
    let offset = addr.0 - region.start_addr().0;
    let end = offset.checked_add(len as u64)?;
    (end <= region.len()).then_some((region, vm_memory::MemoryRegionAddress(offset)))
}

/// Returns chain `head` to the driver with `len` bytes written, as
/// virtio-queue's `add_used` does (the element, then the used index with
/// release ordering), but through the region that holds the used ring:
/// two accesses without `GuestMemory`'s per-access slice iteration. With
/// event-index notification on (its bookkeeping is virtio-queue's own), or
/// a ring across regions, it is virtio-queue's `add_used`.
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), virtio_queue::Error> {
    use vm_memory::{GuestMemoryRegion, MemoryRegionAddress};
    let size = queue.size();
    let ring = GuestAddress(queue.used_ring());
    let region = mem.find_region(ring).filter(|r| {
        let end = ring.0.checked_add(4 + 8 * u64::from(size));
        end.is_some_and(|end| end <= r.start_addr().0 + r.len())
    });
    let Some(region) = region.filter(|_| !queue.event_idx_enabled() && head < size && size > 0) else {
        return queue.add_used(mem, head, len);
    };
    let base = ring.0 - region.start_addr().0;
    let next = queue.next_used();
    // struct virtq_used_elem: le32 id, le32 len.
    let mut elem = [0u8; 8];
    elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
    elem[4..].copy_from_slice(&len.to_le_bytes());
    region
        .write_slice(&elem, MemoryRegionAddress(base + 4 + u64::from(next % size) * 8))
        .map_err(virtio_queue::Error::GuestMemory)?;
    let next = next.wrapping_add(1);
    queue.set_next_used(next);
    region
        .store(u16::to_le(next), MemoryRegionAddress(base + 2), Ordering::Release)
        .map_err(virtio_queue::Error::GuestMemory)
}

/// A request's buffers: device-readable regions, then device-writable
/// ones, each checked to lie in guest memory.
#[derive(Debug, Default)]
pub struct Layout {
    /// Device-readable regions, in order.
    pub readable: Vec<Region>,
    /// Device-writable regions, in order.
    pub writable: Vec<Region>,
}

impl Layout {
    /// The layout of a chain's descriptors.
    pub fn of(mem: &GuestMemoryMmap, descriptors: &[Descriptor]) -> Result<Self, ChainError> {
        let mut l = Layout::default();
        l.fill(mem, descriptors)?;
        Ok(l)
    }

    /// As [`Layout::of`], into this layout (cleared first), so that a
    /// device can keep one for all its chains.
    pub fn fill(&mut self, mem: &GuestMemoryMmap, descriptors: &[Descriptor]) -> Result<(), ChainError> {
        self.readable.clear();
        self.writable.clear();
        let l = self;
        for d in descriptors {
            let len = d.len() as usize;
            if len == 0 {
                continue;
            }
            if within_region(mem, d.addr(), len).is_none() && !mem.check_range(d.addr(), len) {
                return Err(ChainError::OutsideMemory);
            }
            if d.is_write_only() {
                l.writable.push((d.addr(), len));
            } else if l.writable.is_empty() {
                l.readable.push((d.addr(), len));
            } else {
                return Err(ChainError::ReadableAfterWritable);
            }
        }
        Ok(())
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
        match within_region(mem, addr, n) {
            Some((region, at)) => region.read_slice(&mut buf[done..done + n], at)?,
            None => mem.read_slice(&mut buf[done..done + n], addr)?,
        }
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
        match within_region(mem, addr, n) {
            Some((region, at)) => region.write_slice(&data[done..done + n], at)?,
            None => mem.write_slice(&data[done..done + n], addr)?,
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{DATA_BASE, MEM_SIZE, QUEUE_BASE, add_chain, memory, mock};
    use virtio_queue::desc::RawDescriptor;

    fn layout(parts: &[(u64, u32, bool)]) -> Result<Layout, ChainError> {
        let mem = memory();
        let m = mock(&mem, QUEUE_BASE[0], 16);
        add_chain(&m, 0, parts);
        let mut q: Queue = m.create_queue().unwrap();
        let head = pop_head(&mut q, &mem).unwrap().unwrap();
        Layout::of(&mem, &descriptors(&mem, &q, head)?)
    }

    #[test]
    fn add_used_writes_what_virtio_queue_writes() {
        let (m1, m2) = (memory(), memory());
        let mut q1: Queue = mock(&m1, QUEUE_BASE[0], 16).create_queue().unwrap();
        let mut q2: Queue = mock(&m2, QUEUE_BASE[0], 16).create_queue().unwrap();
        // Past one lap of the ring, so that the index wraps its slots.
        for (n, head) in [3u16, 0, 15, 7].iter().cycle().take(40).enumerate() {
            add_used(&mut q1, &m1, *head, n as u32 * 1000).unwrap();
            q2.add_used(&m2, *head, n as u32 * 1000).unwrap();
        }
        assert_eq!(q1.next_used(), q2.next_used());
        let ring = GuestAddress(q1.used_ring());
        let (mut a, mut b) = ([0u8; 4 + 8 * 16], [0u8; 4 + 8 * 16]);
        m1.read_slice(&mut a, ring).unwrap();
        m2.read_slice(&mut b, ring).unwrap();
        assert_eq!(a, b);
        assert!(add_used(&mut q1, &m1, 16, 0).is_err(), "a head past the queue");
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

    /// A queue of 16 over `descs` (from descriptor 0), made available.
    fn queue_with(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Queue {
        let m = mock(mem, QUEUE_BASE[0], 16);
        let raw: Vec<RawDescriptor> = descs.iter().map(|d| RawDescriptor::from(*d)).collect();
        m.add_desc_chains(&raw, 0).unwrap();
        m.create_queue().unwrap()
    }

    #[test]
    fn indirect_descriptors_are_refused_not_followed() {
        let mem = memory();
        // A valid indirect table: the walk must not reach it.
        let table = GuestAddress(DATA_BASE + 0x4000);
        mem.write_obj(Descriptor::new(DATA_BASE, 16, 0, 0), table)
            .unwrap();
        let mut q = queue_with(&mem, &[Descriptor::new(table.0, 16, 4, 0)]);
        let head = pop_head(&mut q, &mem).unwrap().unwrap();
        assert_eq!(descriptors(&mem, &q, head).unwrap_err(), ChainError::Indirect);
        // Also in the middle of a chain.
        let mut q = queue_with(
            &mem,
            &[
                Descriptor::new(DATA_BASE, 16, 1, 1),
                Descriptor::new(table.0, 16, 4, 0),
            ],
        );
        let head = pop_head(&mut q, &mem).unwrap().unwrap();
        assert_eq!(descriptors(&mem, &q, head).unwrap_err(), ChainError::Indirect);
    }

    #[test]
    fn loops_and_bad_indexes_are_errors() {
        let mem = memory();
        let mut q = queue_with(&mem, &[Descriptor::new(DATA_BASE, 16, 1, 0)]);
        let head = pop_head(&mut q, &mem).unwrap().unwrap();
        assert_eq!(descriptors(&mem, &q, head).unwrap_err(), ChainError::TooLong);
        let mut q = queue_with(&mem, &[Descriptor::new(DATA_BASE, 16, 1, 99)]);
        let head = pop_head(&mut q, &mem).unwrap().unwrap();
        assert_eq!(descriptors(&mem, &q, head).unwrap_err(), ChainError::Index(99));
    }

    #[test]
    fn an_available_index_too_far_ahead_is_an_error_and_moves_nothing() {
        let mem = memory();
        let m = mock(&mem, QUEUE_BASE[0], 16);
        add_chain(&m, 0, &[(DATA_BASE, 16, false)]);
        let mut q: Queue = m.create_queue().unwrap();
        m.avail().idx().store(1000u16.to_le());
        for _ in 0..3 {
            assert_eq!(
                pop_head(&mut q, &mem),
                Err(ChainError::AvailIndex {
                    avail: 1000,
                    next: 0,
                    size: 16
                })
            );
        }
        assert_eq!(q.next_avail(), 0);
        m.avail().idx().store(1u16.to_le());
        assert_eq!(pop_head(&mut q, &mem), Ok(Some(0)));
        assert_eq!(pop_head(&mut q, &mem), Ok(None));
        q.set_ready(false);
        m.avail().idx().store(1000u16.to_le());
        assert_eq!(pop_head(&mut q, &mem), Ok(None), "a queue not ready has nothing");
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
