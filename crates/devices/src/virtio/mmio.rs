//! The virtio-mmio transport, register layout version 2 (virtio 1.x).
//!
//! Every register access comes from a vCPU thread and is guest-controlled:
//! wrong sizes, offsets, queue indexes, queue setups and out-of-order
//! status changes are ignored, never trusted. Each is counted
//! ([`MmioStats`], in the device's metrics) and logged at a bounded rate.
//! Queue setup is checked here, before virtio-queue sees it, so that its
//! own (unlimited) error lines are never reached.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{Activation, F_VERSION_1, SavedQueue, VirtioDevice, VirtioInterrupt};
use crate::bus::{BusDevice, lock};
use crate::irq::IrqLine;
use crate::ratelimit::LogLimiter;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x464c_4154; // "FLAT"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// Offset of the queue-notify register (the ioeventfd address).
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// The driver knows how to drive the device.
pub const STATUS_DRIVER: u32 = 2;
/// The driver is ready.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Feature negotiation is complete.
pub const STATUS_FEATURES_OK: u32 = 8;
/// The device hit an error it cannot recover from without a reset.
pub const STATUS_NEEDS_RESET: u32 = 0x40;
/// The driver gave up.
pub const STATUS_FAILED: u32 = 0x80;

/// What the driver got wrong, counted.
#[derive(Debug, Default)]
pub struct MmioStats {
    /// Accesses of the wrong size or alignment, to unknown registers, or
    /// to queue registers outside queue setup.
    pub invalid_access: AtomicU64,
    /// Queue setups refused: a size or ring address the queue cannot
    /// take, or rings outside guest memory at DRIVER_OK.
    pub invalid_queue_config: AtomicU64,
    /// Notifications before DRIVER_OK or of queues that do not exist.
    pub invalid_notify: AtomicU64,
    /// Status writes refused: bits taken back, features not offered.
    pub invalid_status: AtomicU64,
    /// Activations that failed.
    pub activate_fails: AtomicU64,
}

impl MmioStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters, for metrics.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("mmio_invalid_access_count", get(&self.invalid_access)),
            ("mmio_invalid_queue_config_count", get(&self.invalid_queue_config)),
            ("mmio_invalid_notify_count", get(&self.invalid_notify)),
            ("mmio_invalid_status_count", get(&self.invalid_status)),
            ("activate_fails", get(&self.activate_fails)),
        ]
    }
}

/// A transport's registers and queues, as a snapshot saves them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// The device ID, checked on restore.
    pub device_type: u32,
    /// The status register.
    pub status: u32,
    /// Which half of the device features the driver reads.
    pub device_features_sel: u32,
    /// Which half of the driver features the driver writes.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// The selected queue.
    pub queue_sel: u32,
    /// Interrupt status bits the driver has not acknowledged.
    pub interrupt_status: u32,
    /// Whether the device was active (DRIVER_OK accepted).
    pub activated: bool,
    /// Each queue: the driver's setup and, when active, the device's
    /// positions in it.
    pub queues: Vec<SavedQueue>,
}

/// Why a saved transport state cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransportRestoreError {
    /// The state is of another kind of device.
    #[error("saved device type {saved}, the device is type {actual}")]
    DeviceType { saved: u32, actual: u32 },
    /// The state has another number of queues.
    #[error("{saved} saved queues, the device has {actual}")]
    QueueCount { saved: usize, actual: usize },
    /// A queue's saved setup is not one the device or virtio-queue takes.
    #[error("queue {0}: saved setup is not valid")]
    Queue(usize),
    /// The driver features include ones the device does not offer.
    #[error("saved driver features {0:#x} are not all offered")]
    Features(u64),
    /// An active device's status lacks FEATURES_OK or DRIVER_OK.
    #[error("saved status {0:#x} is not that of an active device")]
    Status(u32),
    /// The device would not start from the saved queues.
    #[error("the device cannot be started from the saved queues")]
    Activate,
}

/// The transport of one device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    irq: IrqLine,
    interrupt_status: Arc<AtomicU32>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    activated: bool,
    stats: Arc<MmioStats>,
    log: LogLimiter,
}

impl MmioTransport {
    /// The transport of `device`, interrupting through `irq`.
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, mem: GuestMemoryMmap, irq: IrqLine) -> Self {
        let (queues, kind) = {
            let d = lock(&device);
            (Self::fresh_queues(&*d), d.device_type())
        };
        Self {
            device,
            mem,
            irq,
            interrupt_status: Arc::new(AtomicU32::new(0)),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            activated: false,
            stats: Arc::default(),
            log: LogLimiter::new(format!("virtio-mmio (device type {kind})")),
        }
    }

    /// The counters of what the driver got wrong (shared: the VMM reads
    /// them without taking the transport's lock).
    pub fn stats(&self) -> Arc<MmioStats> {
        self.stats.clone()
    }

    /// Counts `counter` and logs `what` at a bounded rate (debug level).
    fn refuse(&mut self, counter: fn(&MmioStats) -> &AtomicU64, what: std::fmt::Arguments<'_>) {
        MmioStats::bump(counter(&self.stats));
        self.log.debug(what);
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| Queue::new(max).ok())
            .collect()
    }

    /// The device's status register, for tests and diagnostics.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The registers and queues, for a snapshot of a paused VM. An active
    /// device's queues are saved where the device has got to in them
    /// (the transport's own copies keep only the driver's setup).
    pub fn state(&self) -> TransportState {
        let device = lock(&self.device);
        let live = if self.activated {
            device.queue_states()
        } else {
            None
        };
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let mut saved = q.state();
                if let Some(l) = live.as_ref().and_then(|l| l.get(i)) {
                    saved.next_avail = l.next_avail;
                    saved.next_used = l.next_used;
                    saved.event_idx_enabled = l.event_idx_enabled;
                }
                SavedQueue::from(saved)
            })
            .collect();
        TransportState {
            device_type: device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status.load(Ordering::SeqCst),
            activated: self.activated,
            queues,
        }
    }

    /// Sets a fresh transport to a saved state (untrusted: every part is
    /// checked against the device), and starts the device if it was
    /// active. On error the transport is left reset.
    pub fn restore(&mut self, s: &TransportState) -> Result<(), TransportRestoreError> {
        let result = self.try_restore(s);
        if result.is_err() {
            self.reset();
        }
        result
    }

    fn try_restore(&mut self, s: &TransportState) -> Result<(), TransportRestoreError> {
        let (actual, max_sizes, offered) = {
            let d = lock(&self.device);
            (d.device_type(), d.queue_max_sizes().to_vec(), d.features())
        };
        if s.device_type != actual {
            return Err(TransportRestoreError::DeviceType {
                saved: s.device_type,
                actual,
            });
        }
        if s.queues.len() != max_sizes.len() {
            return Err(TransportRestoreError::QueueCount {
                saved: s.queues.len(),
                actual: max_sizes.len(),
            });
        }
        if s.driver_features & !offered != 0 {
            return Err(TransportRestoreError::Features(s.driver_features));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, (saved, max)) in s.queues.iter().zip(max_sizes).enumerate() {
            if saved.max_size != max {
                return Err(TransportRestoreError::Queue(i));
            }
            let q = Queue::try_from(QueueState::from(*saved)).map_err(|_| TransportRestoreError::Queue(i))?;
            queues.push(q);
        }
        let active = STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        if s.activated && s.status & active != active {
            return Err(TransportRestoreError::Status(s.status));
        }
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.interrupt_status.store(s.interrupt_status, Ordering::SeqCst);
        self.queues = queues;
        if s.activated {
            self.activate();
            if !self.activated {
                return Err(TransportRestoreError::Activate);
            }
            lock(&self.device).restored();
        }
        Ok(())
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        let device = lock(&self.device);
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => device.features() as u32,
                1 => (device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => {
                drop(device);
                self.selected_queue().map_or(0, |q| u32::from(q.max_size()))
            }
            REG_QUEUE_READY => {
                drop(device);
                self.selected_queue().map_or(0, |q| u32::from(q.ready()))
            }
            REG_INTERRUPT_STATUS => self.interrupt_status.load(Ordering::SeqCst),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => device.config_generation(),
            _ => {
                drop(device);
                self.refuse(
                    |s| &s.invalid_access,
                    format_args!("read of unknown register {offset:#x}"),
                );
                0
            }
        }
    }

    /// Whether the driver may still set up queues and features.
    fn configuring(&self) -> bool {
        self.status & STATUS_DRIVER != 0 && self.status & (STATUS_DRIVER_OK | STATUS_FAILED) == 0
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        let queue_setup = self.configuring() && self.status & STATUS_FEATURES_OK != 0;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES if self.configuring() && self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM if queue_setup => self.set_queue_size(v),
            REG_QUEUE_READY if queue_setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH
                if queue_setup =>
            {
                self.set_queue_address(offset, v)
            }
            REG_QUEUE_NOTIFY => self.notify(v),
            REG_INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!v, Ordering::SeqCst);
            }
            REG_STATUS => self.set_status(v),
            _ => self.refuse(
                |s| &s.invalid_access,
                format_args!("ignored write of {v:#x} to register {offset:#x}"),
            ),
        }
    }

    /// `QueueNum`: a power of two up to the queue's maximum.
    fn set_queue_size(&mut self, v: u32) {
        let ok = match (u16::try_from(v), self.selected_queue()) {
            (Ok(size), Some(q)) => q.try_set_size(size).is_ok(),
            _ => false,
        };
        if !ok {
            let sel = self.queue_sel;
            self.refuse(
                |s| &s.invalid_queue_config,
                format_args!("queue {sel}: size {v} refused"),
            );
        }
    }

    /// One half of a ring's address; the whole must be aligned as the
    /// ring needs (16 bytes for descriptors, 2 available, 4 used).
    fn set_queue_address(&mut self, offset: u64, v: u32) {
        let sel = self.queue_sel;
        let Some(q) = self.selected_queue() else {
            self.refuse(
                |s| &s.invalid_queue_config,
                format_args!("ring address for queue {sel}, which does not exist"),
            );
            return;
        };
        let old = match offset & !4 {
            REG_QUEUE_DESC_LOW => q.desc_table(),
            REG_QUEUE_DRIVER_LOW => q.avail_ring(),
            _ => q.used_ring(),
        };
        let new = if offset & 4 == 0 {
            (old & !0xffff_ffff) | u64::from(v)
        } else {
            (old & 0xffff_ffff) | (u64::from(v) << 32)
        };
        let addr = GuestAddress(new);
        let set = match offset & !4 {
            REG_QUEUE_DESC_LOW => q.try_set_desc_table_address(addr),
            REG_QUEUE_DRIVER_LOW => q.try_set_avail_ring_address(addr),
            _ => q.try_set_used_ring_address(addr),
        };
        if set.is_err() {
            self.refuse(
                |s| &s.invalid_queue_config,
                format_args!("misaligned ring address {new:#x} (register {offset:#x}) refused"),
            );
        }
    }

    fn notify(&mut self, index: u32) {
        if !self.activated {
            self.refuse(
                |s| &s.invalid_notify,
                format_args!("notify before DRIVER_OK ignored"),
            );
            return;
        }
        let device = lock(&self.device);
        let signalled = device.queue_events().get(index as usize).map(|evt| evt.write(1));
        drop(device);
        match signalled {
            Some(Ok(_)) => {}
            Some(Err(e)) => self.log.warn(format_args!("cannot signal queue {index}: {e}")),
            None => self.refuse(
                |s| &s.invalid_notify,
                format_args!("notify of queue {index}, which does not exist"),
            ),
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Status bits only accumulate (until a reset).
        if v & self.status != self.status {
            let old = self.status;
            self.refuse(
                |s| &s.invalid_status,
                format_args!("status {v:#x} drops bits of {old:#x}; ignored"),
            );
            return;
        }
        let new = v & !self.status;
        if new & STATUS_FEATURES_OK != 0 {
            let offered = lock(&self.device).features();
            if self.driver_features & !offered != 0 || self.driver_features & F_VERSION_1 == 0 {
                // Features the device did not offer, or a legacy driver:
                // leave FEATURES_OK unset, so the driver sees the refusal.
                let features = self.driver_features;
                self.refuse(
                    |s| &s.invalid_status,
                    format_args!("driver features {features:#x} refused"),
                );
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
        }
        self.status = v;
        if new & STATUS_DRIVER_OK != 0 && self.status & STATUS_FEATURES_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let bad = self
            .queues
            .iter()
            .position(|q| q.ready() && !rings_in_memory(q, &self.mem));
        if let Some(i) = bad {
            self.refuse(
                |s| &s.invalid_queue_config,
                format_args!("queue {i}: rings outside guest memory; device needs reset"),
            );
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        // The device gets copies; the transport keeps its own for the
        // registers the driver may still read.
        let queues = self
            .queues
            .iter()
            .filter_map(|q| Queue::try_from(q.state()).ok())
            .collect();
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            interrupt: VirtioInterrupt::new(self.interrupt_status.clone(), self.irq.clone()),
            acked_features: self.driver_features,
        };
        let result = lock(&self.device).activate(activation);
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                MmioStats::bump(&self.stats.activate_fails);
                self.log.warn(format_args!("activation failed: {e}"));
                self.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            lock(&self.device).reset();
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status.store(0, Ordering::SeqCst);
        self.queues = Self::fresh_queues(&*lock(&self.device));
    }
}

/// Whether the rings of `q` lie in guest memory (checked here rather than
/// with virtio-queue's `is_valid`, which logs every failure).
fn rings_in_memory(q: &Queue, mem: &GuestMemoryMmap) -> bool {
    let size = u64::from(q.size());
    let fits = |addr: u64, len: u64| mem.check_range(GuestAddress(addr), len as usize);
    fits(q.desc_table(), 16 * size) && fits(q.avail_ring(), 6 + 2 * size) && fits(q.used_ring(), 6 + 8 * size)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).read_config(offset - CONFIG_SPACE, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 || offset % 4 != 0 {
            self.refuse(
                |s| &s.invalid_access,
                format_args!("{}-byte read at {offset:#x} ignored", data.len()),
            );
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).write_config(offset - CONFIG_SPACE, data);
            return;
        }
        let (Ok(bytes), 0) = (<[u8; 4]>::try_from(data), offset % 4) else {
            self.refuse(
                |s| &s.invalid_access,
                format_args!("{}-byte write at {offset:#x} ignored", data.len()),
            );
            return;
        };
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::{Block, CacheType};
    use crate::virtio::test_utils::{QUEUE_BASE, irq, memory};
    use std::io::Write;
    use vmm_sys_util::tempfile::TempFile;

    struct Rig {
        t: MmioTransport,
        dev: Arc<Mutex<Block>>,
        _image: TempFile,
    }

    fn rig() -> Rig {
        let image = TempFile::new().unwrap();
        image.as_file().write_all(&[0u8; 4096]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(image.as_path())
            .unwrap();
        let dev = Arc::new(Mutex::new(
            Block::new(file, false, CacheType::Writeback, "d").unwrap(),
        ));
        let (line, _) = irq();
        let t = MmioTransport::new(dev.clone(), memory(), line);
        Rig {
            t,
            dev,
            _image: image,
        }
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Drives the transport as a virtio 1.x driver does, accepting
    /// `features`; returns the final status.
    fn bring_up(t: &mut MmioTransport, features: u64) -> u32 {
        wr(t, REG_STATUS, 0);
        wr(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        wr(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(t, REG_DRIVER_FEATURES_SEL, 0);
        wr(t, REG_DRIVER_FEATURES, features as u32);
        wr(t, REG_DRIVER_FEATURES_SEL, 1);
        wr(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        wr(t, REG_STATUS, s);
        if rd(t, REG_STATUS) & STATUS_FEATURES_OK == 0 {
            return rd(t, REG_STATUS);
        }
        wr(t, REG_QUEUE_SEL, 0);
        wr(t, REG_QUEUE_NUM, 16);
        let base = QUEUE_BASE[0];
        wr(t, REG_QUEUE_DESC_LOW, base as u32);
        wr(t, REG_QUEUE_DESC_HIGH, 0);
        wr(t, REG_QUEUE_DRIVER_LOW, (base + 0x100) as u32);
        wr(t, REG_QUEUE_DEVICE_LOW, (base + 0x200) as u32);
        wr(t, REG_QUEUE_READY, 1);
        wr(t, REG_STATUS, s | STATUS_DRIVER_OK);
        rd(t, REG_STATUS)
    }

    /// Puts a flush request (header, status) in the queue `bring_up` set
    /// up, as chain `n` (descriptors 2n and 2n+1).
    fn add_flush(mem: &GuestMemoryMmap, n: u16) {
        use vm_memory::{Address, Bytes};
        let base = QUEUE_BASE[0];
        let hdr = 0x10_0000 + u64::from(n) * 0x100;
        mem.write_obj(4u32, GuestAddress(hdr)).unwrap();
        let desc = |i: u16, addr: u64, len: u32, flags: u16, next: u16| {
            let at = GuestAddress(base + u64::from(i) * 16);
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(len, at.unchecked_add(8)).unwrap();
            mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            mem.write_obj(next, at.unchecked_add(14)).unwrap();
        };
        desc(2 * n, hdr, 16, 1, 2 * n + 1);
        desc(2 * n + 1, hdr + 0x80, 1, 2, 0);
        let avail = GuestAddress(base + 0x100);
        mem.write_obj(2 * n, avail.unchecked_add(4 + 2 * u64::from(n)))
            .unwrap();
        mem.write_obj(n + 1, avail.unchecked_add(2)).unwrap();
    }

    #[test]
    fn a_saved_transport_restores_with_the_devices_positions() {
        let mut r = rig();
        bring_up(&mut r.t, F_VERSION_1);
        let mem = r.t.mem.clone();
        for n in 0..3 {
            add_flush(&mem, n);
        }
        assert_eq!(r.dev.lock().unwrap().process_queue(), 3);
        r.t.interrupt_status.store(1, Ordering::SeqCst);
        let saved = r.t.state();
        assert!(saved.activated);
        assert_eq!(saved.device_type, 2);
        assert_eq!((saved.queues[0].next_avail, saved.queues[0].next_used), (3, 3));
        assert_eq!(saved.queues[0].size, 16);

        // A new device and transport (as after a restore) go on from there.
        let mut back = rig();
        back.t.mem = mem.clone();
        back.t.restore(&saved).unwrap();
        assert!(back.t.activated);
        assert_eq!(back.t.state(), saved, "the state round-trips");
        assert_eq!(rd(&mut back.t, REG_INTERRUPT_STATUS), 1);
        let q = back.dev.lock().unwrap().queue_states().unwrap();
        assert_eq!((q[0].next_avail, q[0].next_used), (3, 3));
        add_flush(&mem, 3);
        assert_eq!(
            back.dev.lock().unwrap().process_queue(),
            1,
            "only the request made after the snapshot"
        );
    }

    #[test]
    fn a_bad_saved_transport_is_refused_and_left_reset() {
        let mut r = rig();
        bring_up(&mut r.t, F_VERSION_1);
        let good = r.t.state();
        type Spoil = fn(&mut TransportState);
        let cases: [(Spoil, TransportRestoreError); 7] = [
            (
                |s| s.device_type = 1,
                TransportRestoreError::DeviceType { saved: 1, actual: 2 },
            ),
            (
                |s| s.queues.push(SavedQueue::default()),
                TransportRestoreError::QueueCount { saved: 2, actual: 1 },
            ),
            (|s| s.queues[0].max_size = 1024, TransportRestoreError::Queue(0)),
            (|s| s.queues[0].size = 3, TransportRestoreError::Queue(0)),
            (
                |s| s.queues[0].desc_table = 0x1001,
                TransportRestoreError::Queue(0),
            ),
            (
                |s| s.driver_features |= 1 << 60,
                TransportRestoreError::Features(F_VERSION_1 | 1 << 60),
            ),
            (
                |s| s.status &= !STATUS_DRIVER_OK,
                TransportRestoreError::Status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK),
            ),
        ];
        for (spoil, expected) in cases {
            let mut bad = good.clone();
            spoil(&mut bad);
            let mut fresh = rig();
            assert_eq!(fresh.t.restore(&bad), Err(expected));
            assert_eq!(fresh.t.status(), 0);
            assert!(fresh.dev.lock().unwrap().queue_states().is_none());
        }
        // Rings outside guest memory: the device is not started.
        let mut bad = good.clone();
        bad.queues[0].used_ring = 0x10_0000_0000;
        assert_eq!(rig().t.restore(&bad), Err(TransportRestoreError::Activate));
    }

    #[test]
    fn identification() {
        let mut r = rig();
        assert_eq!(rd(&mut r.t, REG_MAGIC), 0x7472_6976);
        assert_eq!(rd(&mut r.t, REG_VERSION), 2);
        assert_eq!(rd(&mut r.t, REG_DEVICE_ID), 2);
        wr(&mut r.t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut r.t, REG_DEVICE_FEATURES), 1, "VERSION_1 in the high word");
        wr(&mut r.t, REG_QUEUE_SEL, 0);
        assert_eq!(rd(&mut r.t, REG_QUEUE_NUM_MAX), 256);
        wr(&mut r.t, REG_QUEUE_SEL, 7);
        assert_eq!(rd(&mut r.t, REG_QUEUE_NUM_MAX), 0, "no such queue");
        let mut cap = [0u8; 8];
        r.t.read(CONFIG_SPACE, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8, "4 KiB image = 8 sectors");
    }

    #[test]
    fn negotiation_activation_and_notification() {
        let mut r = rig();
        let status = bring_up(&mut r.t, F_VERSION_1);
        assert_eq!(status & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
        assert_eq!(status & STATUS_NEEDS_RESET, 0);
        assert!(r.t.activated);
        wr(&mut r.t, REG_QUEUE_NOTIFY, 0);
        assert!(
            r.dev.lock().unwrap().queue_events()[0].read().is_ok(),
            "notify signals the queue"
        );
        // A notify of a queue that does not exist is ignored.
        wr(&mut r.t, REG_QUEUE_NOTIFY, 9);
        // Queue setup after DRIVER_OK is ignored.
        wr(&mut r.t, REG_QUEUE_SEL, 0);
        wr(&mut r.t, REG_QUEUE_READY, 0);
        assert_eq!(rd(&mut r.t, REG_QUEUE_READY), 1);
        // Interrupt status is acknowledged bit by bit.
        r.t.interrupt_status.store(3, Ordering::SeqCst);
        wr(&mut r.t, REG_INTERRUPT_ACK, 1);
        assert_eq!(rd(&mut r.t, REG_INTERRUPT_STATUS), 2);
        // Reset returns to the start.
        wr(&mut r.t, REG_STATUS, 0);
        assert_eq!(rd(&mut r.t, REG_STATUS), 0);
        assert!(!r.t.activated);
        assert_eq!(rd(&mut r.t, REG_INTERRUPT_STATUS), 0);
        assert_eq!(
            bring_up(&mut r.t, F_VERSION_1) & STATUS_DRIVER_OK,
            STATUS_DRIVER_OK,
            "again"
        );
    }

    #[test]
    fn refuses_features_not_offered_and_legacy_drivers() {
        let mut r = rig();
        let status = bring_up(&mut r.t, F_VERSION_1 | (1 << 40));
        assert_eq!(status & STATUS_FEATURES_OK, 0);
        let status = bring_up(&mut r.t, 0);
        assert_eq!(status & STATUS_FEATURES_OK, 0, "no VERSION_1: legacy, refused");
        // DRIVER_OK without FEATURES_OK activates nothing.
        wr(
            &mut r.t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
        );
        assert!(!r.t.activated);
    }

    #[test]
    fn notify_before_activation_is_ignored() {
        let mut r = rig();
        wr(&mut r.t, REG_QUEUE_NOTIFY, 0);
        assert!(r.dev.lock().unwrap().queue_events()[0].read().is_err());
    }

    #[test]
    fn invalid_queue_sets_needs_reset() {
        let mut r = rig();
        wr(&mut r.t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(&mut r.t, REG_DRIVER_FEATURES_SEL, 1);
        wr(&mut r.t, REG_DRIVER_FEATURES, 1);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        wr(&mut r.t, REG_STATUS, s);
        wr(&mut r.t, REG_QUEUE_NUM, 16);
        // Rings beyond guest memory.
        wr(&mut r.t, REG_QUEUE_DESC_LOW, 0xffff_f000);
        wr(&mut r.t, REG_QUEUE_DESC_HIGH, 0xff);
        wr(&mut r.t, REG_QUEUE_READY, 1);
        wr(&mut r.t, REG_STATUS, s | STATUS_DRIVER_OK);
        assert_ne!(rd(&mut r.t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        assert!(!r.t.activated);
        assert_eq!(r.t.stats().invalid_queue_config.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_flood_of_bad_queue_setups_and_notifies_is_counted_and_rate_limited() {
        crate::ratelimit::tests::capture_logs();
        let mut r = rig();
        r.t.log = LogLimiter::new("flood-mmio".into());
        wr(&mut r.t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(&mut r.t, REG_DRIVER_FEATURES_SEL, 1);
        wr(&mut r.t, REG_DRIVER_FEATURES, 1);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        wr(&mut r.t, REG_STATUS, s);
        const N: u64 = 1000;
        for i in 0..N {
            // Not a power of two, too big, and misaligned rings.
            wr(&mut r.t, REG_QUEUE_NUM, 3 + 2 * i as u32);
            wr(&mut r.t, REG_QUEUE_DESC_LOW, 0x1001);
            wr(&mut r.t, REG_QUEUE_DRIVER_LOW, 0x2001);
            wr(&mut r.t, REG_QUEUE_DEVICE_LOW, 0x3002);
            // Before DRIVER_OK, and an unknown register.
            wr(&mut r.t, REG_QUEUE_NOTIFY, 0);
            wr(&mut r.t, 0x0c0, 1);
        }
        let stats = r.t.stats();
        let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(count(&stats.invalid_queue_config), 4 * N);
        assert_eq!(count(&stats.invalid_notify), N);
        assert_eq!(count(&stats.invalid_access), N);
        assert!(
            r.dev.lock().unwrap().queue_events()[0].read().is_err(),
            "nothing was signalled"
        );
        let lines = crate::ratelimit::tests::logged("flood-mmio");
        assert!(
            !lines.is_empty() && lines.len() <= crate::ratelimit::BURST as usize,
            "{} lines",
            lines.len()
        );
        assert!(
            crate::ratelimit::tests::logged("virtio queue").is_empty(),
            "virtio-queue's own lines are never reached"
        );
        // The refused values were not taken: a good setup still works.
        wr(&mut r.t, REG_QUEUE_NUM, 16);
        let base = QUEUE_BASE[0];
        wr(&mut r.t, REG_QUEUE_DESC_LOW, base as u32);
        wr(&mut r.t, REG_QUEUE_DRIVER_LOW, (base + 0x100) as u32);
        wr(&mut r.t, REG_QUEUE_DEVICE_LOW, (base + 0x200) as u32);
        wr(&mut r.t, REG_QUEUE_READY, 1);
        wr(&mut r.t, REG_STATUS, s | STATUS_DRIVER_OK);
        assert!(r.t.activated);
        let q = &r.t.queues[0];
        assert_eq!((q.size(), q.desc_table()), (16, base));
        let counters = stats.counters();
        assert!(counters.contains(&("mmio_invalid_queue_config_count", 4 * N)));
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let mut r = rig();
        let mut two = [0xffu8; 2];
        r.t.read(REG_MAGIC, &mut two);
        assert_eq!(two, [0, 0]);
        r.t.write(REG_STATUS, &[1]);
        assert_eq!(rd(&mut r.t, REG_STATUS), 0);
        assert_eq!(rd(&mut r.t, 0x0ff), 0, "unaligned");
        assert_eq!(rd(&mut r.t, 0x0c0), 0, "unknown register");
        // Status bits cannot be taken back without a reset.
        wr(&mut r.t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(&mut r.t, REG_STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(rd(&mut r.t, REG_STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    }
}
