//! A guest whose memory is the fuzzer's input: the descriptor table, the
//! rings and every buffer are whatever the bytes say.

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
