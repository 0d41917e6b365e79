//! The virtio-mmio transport, register layout version 2 (virtio 1.x).
//!
//! Every register access comes from a vCPU thread and is guest-controlled:
//! wrong sizes, offsets, queue indexes and out-of-order status changes are
//! ignored (with a debug log), never trusted.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Activation, F_VERSION_1, VirtioDevice, VirtioInterrupt};
use crate::bus::{BusDevice, lock};
use crate::irq::IrqLine;

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
}

impl MmioTransport {
    /// The transport of `device`, interrupting through `irq`.
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, mem: GuestMemoryMmap, irq: IrqLine) -> Self {
        let queues = Self::fresh_queues(&*lock(&device));
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
        }
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
                debug!("virtio-mmio: read of unknown register {offset:#x}");
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
            REG_QUEUE_NUM if queue_setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
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
                let (lo, hi) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                if let Some(q) = self.selected_queue() {
                    match offset & !4 {
                        REG_QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                        REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            REG_QUEUE_NOTIFY => self.notify(v),
            REG_INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!v, Ordering::SeqCst);
            }
            REG_STATUS => self.set_status(v),
            _ => debug!("virtio-mmio: ignored write of {v:#x} to register {offset:#x}"),
        }
    }

    fn notify(&self, index: u32) {
        if !self.activated {
            debug!("virtio-mmio: notify before DRIVER_OK ignored");
            return;
        }
        let device = lock(&self.device);
        match device.queue_events().get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    warn!("virtio-mmio: cannot signal queue {index}: {e}");
                }
            }
            None => debug!("virtio-mmio: notify of queue {index}, which does not exist"),
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Status bits only accumulate (until a reset).
        if v & self.status != self.status {
            debug!(
                "virtio-mmio: status {v:#x} drops bits of {:#x}; ignored",
                self.status
            );
            return;
        }
        let new = v & !self.status;
        if new & STATUS_FEATURES_OK != 0 {
            let offered = lock(&self.device).features();
            if self.driver_features & !offered != 0 || self.driver_features & F_VERSION_1 == 0 {
                // Features the device did not offer, or a legacy driver:
                // leave FEATURES_OK unset, so the driver sees the refusal.
                debug!("virtio-mmio: driver features {:#x} refused", self.driver_features);
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
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                warn!("virtio-mmio: queue {i} set up by the driver is invalid; device needs reset");
                self.status |= STATUS_NEEDS_RESET;
                return;
            }
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
        match lock(&self.device).activate(activation) {
            Ok(()) => self.activated = true,
            Err(e) => {
                warn!("virtio-mmio: activation failed: {e}");
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

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).read_config(offset - CONFIG_SPACE, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 || offset % 4 != 0 {
            debug!("virtio-mmio: {}-byte read at {offset:#x} ignored", data.len());
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
            debug!("virtio-mmio: {}-byte write at {offset:#x} ignored", data.len());
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
