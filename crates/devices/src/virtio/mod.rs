//! virtio devices over the virtio-mmio transport (virtio 1.x, register
//! layout version 2).
//!
//! The transport ([`mmio::MmioTransport`]) runs on vCPU threads: it handles
//! register accesses and turns queue notifications into eventfd writes (the
//! same eventfds KVM signals directly once flatlet has registered them as
//! ioeventfds). The devices do their queue work on the VMM thread, as
//! event-manager subscribers woken by those eventfds.

pub mod block;
pub mod chain;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use event_manager::MutEventSubscriber;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::irq::IrqLine;

/// Device ID of a network card.
pub const TYPE_NET: u32 = 1;
/// Device ID of a block device.
pub const TYPE_BLOCK: u32 = 2;

/// `VIRTIO_F_VERSION_1`: the modern interface, the only one flatlet offers.
pub const F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bit: a queue has used buffers.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// Errors activating a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    /// The driver set up the wrong number of queues.
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    /// A queue's rings do not fit in guest memory or are misaligned.
    #[error("queue {0} is not valid")]
    InvalidQueue(usize),
    /// Signalling the VMM thread failed.
    #[error("cannot signal activation: {0}")]
    Signal(String),
}

/// How a device interrupts the guest: it sets bits in the transport's
/// interrupt status and pulses its IRQ line.
#[derive(Clone)]
pub struct VirtioInterrupt {
    status: Arc<AtomicU32>,
    line: IrqLine,
}

impl VirtioInterrupt {
    /// An interrupt over `line`, with its status shared with the transport.
    pub fn new(status: Arc<AtomicU32>, line: IrqLine) -> Self {
        Self { status, line }
    }

    /// Signals used buffers.
    pub fn signal_used(&self) {
        self.status.fetch_or(INT_VRING, Ordering::SeqCst);
        self.line.pulse();
    }

    /// Signals a change of the configuration space.
    pub fn signal_config(&self) {
        self.status.fetch_or(INT_CONFIG, Ordering::SeqCst);
        self.line.pulse();
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues, as the driver set them up (ready or not).
    pub queues: Vec<Queue>,
    /// The device's interrupt.
    pub interrupt: VirtioInterrupt,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// A queue as a snapshot saves it: virtio-queue's [`QueueState`] (which
/// has no serde). Untrusted on restore: it becomes a [`Queue`] only through
/// virtio-queue's checks, and the transport checks its maximum size
/// against the device's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    /// The device's largest size.
    pub max_size: u16,
    /// The next available-ring entry the device will take.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
    /// Whether VIRTIO_F_RING_EVENT_IDX was negotiated.
    pub event_idx: bool,
    /// The size the driver chose.
    pub size: u16,
    /// Whether the driver made it ready.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
}

impl From<QueueState> for SavedQueue {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<SavedQueue> for QueueState {
    fn from(q: SavedQueue) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// What a started single-queue device (block, rng) works with: guest
/// memory, its one queue and its interrupt.
pub(crate) struct SingleQueue {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) queue: Queue,
    pub(crate) interrupt: VirtioInterrupt,
}

impl SingleQueue {
    /// The driver's one queue from `a`, if it set it up and made it ready.
    pub(crate) fn from_activation(a: Activation) -> Result<Self, ActivateError> {
        let got = a.queues.len();
        let Some(queue) = a.queues.into_iter().next().filter(|q| q.ready()) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        Ok(Self {
            mem: a.mem,
            queue,
            interrupt: a.interrupt,
        })
    }
}

/// A virtio device model.
///
/// It is also an event-manager subscriber: the VMM thread calls it when its
/// queue eventfds (or backend, such as a TAP) are ready.
pub trait VirtioDevice: MutEventSubscriber + Send {
    /// The virtio device ID.
    fn device_type(&self) -> u32;
    /// The features the device offers.
    fn features(&self) -> u64;
    /// The largest size of each queue (their count is the queue count).
    fn queue_max_sizes(&self) -> &[u16];
    /// One eventfd per queue, signalled on the driver's notifications.
    fn queue_events(&self) -> &[EventFd];
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the driver's queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Returns the device to its state before activation.
    fn reset(&mut self);
    /// The queues of the active device as it has used them (where it has
    /// got to in each), for a snapshot; None before activation.
    fn queue_states(&self) -> Option<Vec<QueueState>> {
        None
    }
    /// Called once the device is active again after a snapshot was
    /// restored (vsock tells the driver its connections are gone).
    fn restored(&mut self) {}
    /// Changes each time the configuration space changes.
    fn config_generation(&self) -> u32 {
        0
    }
    /// The device's counters, for metrics.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// Copies the part of `config` that `offset` and `data` select; bytes
/// beyond the end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
pub(crate) mod test_utils {
    //! Guest memory, queues and interrupts for device tests, without KVM.

    use std::sync::{Arc, Mutex};

    use virtio_queue::Queue;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::{Activation, VirtioInterrupt};
    use crate::bus::BusDevice;
    use crate::ioapic::IoApic;
    use crate::ioapic::tests::RecordingSink;
    use crate::irq::IrqLine;

    /// Guest memory size of the tests: 16 MiB.
    pub const MEM_SIZE: u64 = 16 << 20;
    /// Where the mock queues go.
    pub const QUEUE_BASE: [u64; 2] = [0x1000, 0x8000];
    /// Where test buffers go.
    pub const DATA_BASE: u64 = 0x10_0000;

    /// 16 MiB of guest memory.
    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    /// An IRQ line into an I/O APIC whose pin 5 is unmasked, and the sink
    /// that records what it sends.
    pub fn irq() -> (IrqLine, Arc<RecordingSink>) {
        let sink = Arc::new(RecordingSink::default());
        let mut ioapic = IoApic::new(0, sink.clone());
        ioapic.write(0, &(0x10u32 + 10).to_le_bytes());
        ioapic.write(0x10, &0x35u32.to_le_bytes());
        (IrqLine::new(Arc::new(Mutex::new(ioapic)), 5), sink)
    }

    /// A mock split queue of `size` at `base`.
    pub fn mock(mem: &GuestMemoryMmap, base: u64, size: u16) -> MockSplitQueue<'_, GuestMemoryMmap> {
        MockSplitQueue::create(mem, GuestAddress(base), size)
    }

    /// An activation over the given mocks.
    pub fn activation(
        mem: &GuestMemoryMmap,
        mocks: &[&MockSplitQueue<'_, GuestMemoryMmap>],
    ) -> (Activation, Arc<RecordingSink>) {
        let (line, sink) = irq();
        let queues: Vec<Queue> = mocks.iter().map(|m| m.create_queue::<Queue>().unwrap()).collect();
        let activation = Activation {
            mem: mem.clone(),
            queues,
            interrupt: VirtioInterrupt::new(Arc::new(Default::default()), line),
            acked_features: super::F_VERSION_1,
        };
        (activation, sink)
    }

    /// A buffer in a chain: (guest address, length, device-writable).
    pub type Part = (u64, u32, bool);

    /// Makes a chain of `parts` available, its descriptors from `start` on.
    pub fn add_chain(mock: &MockSplitQueue<'_, GuestMemoryMmap>, start: u16, parts: &[Part]) {
        let descs: Vec<RawDescriptor> = parts
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let last = i + 1 == parts.len();
                let flags = u16::from(!last) | if writable { 2 } else { 0 };
                let next = if last { 0 } else { start + i as u16 + 1 };
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        mock.add_desc_chains(&descs, start).unwrap();
    }

    /// The (id, len) of used-ring entry `i`, and the used index.
    pub fn used(
        mem: &GuestMemoryMmap,
        mock: &MockSplitQueue<'_, GuestMemoryMmap>,
        i: u64,
    ) -> (u32, u32, u16) {
        let base = mock.used_addr().0;
        let idx: u16 = mem.read_obj(GuestAddress(base + 2)).unwrap();
        let id: u32 = mem.read_obj(GuestAddress(base + 4 + 8 * i)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(base + 8 + 8 * i)).unwrap();
        (id, len, idx)
    }
}
