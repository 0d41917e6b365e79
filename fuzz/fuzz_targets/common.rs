//! A guest whose memory is the fuzzer's input: the descriptor table, the
//! rings and every buffer are whatever the bytes say. Also: a reader that
//! turns the rest of an input into a sequence of operations, and a guest
//! memory with a hole, for the targets that drive a device step by step.

// Each target uses part of this module.
#![allow(dead_code)]

use std::sync::Arc;

use flatlet_devices::irq::{InterruptController, IrqLine};
use flatlet_devices::virtio::{Activation, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM_SIZE: usize = 1 << 20;
pub const QSIZE: u16 = 16;
/// Each queue's rings: descriptor table, avail ring, used ring.
pub const QUEUES: [(u64, u64, u64); 2] = [(0x0, 0x100, 0x200), (0x1000, 0x1100, 0x1200)];

struct NoIrq;
impl InterruptController for NoIrq {
    fn pulse(&self, _: usize) {}
    fn set_level(&self, _: usize, _: bool) {}
}

/// Guest memory holding `data` from address 0.
pub fn memory(data: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let n = data.len().min(MEM_SIZE);
    mem.write_slice(&data[..n], GuestAddress(0)).unwrap();
    mem
}

/// The activation of a device with `n` queues laid out as `QUEUES` says.
pub fn activation(mem: &GuestMemoryMmap, n: usize) -> Activation {
    let queues = QUEUES[..n]
        .iter()
        .map(|&(d, a, u)| {
            let mut q = Queue::new(QSIZE).unwrap();
            q.try_set_size(QSIZE).unwrap();
            q.try_set_desc_table_address(GuestAddress(d)).unwrap();
            q.try_set_avail_ring_address(GuestAddress(a)).unwrap();
            q.try_set_used_ring_address(GuestAddress(u)).unwrap();
            q.set_ready(true);
            q
        })
        .collect();
    Activation {
        mem: mem.clone(),
        queues,
        interrupt: VirtioInterrupt::new(Arc::new(Default::default()), IrqLine::new(Arc::new(NoIrq), 5)),
        acked_features: 1 << 32,
    }
}

/// The two regions of `holed_memory`: guest RAM with a hole between them,
/// so that buffers, rings and accesses can straddle or fall into it.
pub const HOLED: [(u64, usize); 2] = [(0, 0x2_0000), (0x2_8000, 0x1_8000)];
/// One past the last guest address of `holed_memory`.
pub const HOLED_END: u64 = 0x4_0000;

/// Zeroed guest memory laid out as `HOLED` says.
pub fn holed_memory() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = HOLED.iter().map(|&(a, n)| (GuestAddress(a), n)).collect();
    GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap()
}

/// Whether `[addr, addr + len)` is wholly inside one region of `HOLED`.
pub fn holed_contains(addr: u64, len: u64) -> bool {
    HOLED.iter().any(|&(a, n)| addr >= a && addr.checked_add(len).is_some_and(|e| e <= a + n as u64))
}

/// The fuzzer's bytes, read front to back; past the end, every value is 0.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    fn le<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let got = self.bytes(N);
        b[..got.len()].copy_from_slice(got);
        b
    }

    pub fn u8(&mut self) -> u8 {
        self.le::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.le())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.le())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.le())
    }

    /// An access width: 1, 2, 4 or 8 bytes, or (rarely) 0, 3 or 16.
    pub fn width(&mut self) -> usize {
        [4, 4, 4, 1, 2, 8, 4, 4, 1, 2, 8, 0, 3, 16, 4, 4][usize::from(self.u8() & 15)]
    }
}

/// An interrupt line that goes nowhere.
pub fn irq_line() -> IrqLine {
    IrqLine::new(Arc::new(NoIrq), 5)
}
