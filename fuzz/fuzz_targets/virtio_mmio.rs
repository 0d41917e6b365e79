//! The virtio-mmio transport as a hostile guest driver drives it: reads
//! and writes of any width at any offset of its window (and just past
//! it, through the MMIO bus), feature negotiation and status changes in
//! any order, resets, queue setups with any sizes and ring addresses,
//! notifications, interrupt acknowledgements and config-space accesses,
//! and guest-memory writes between them. Behind it is a real device, a
//! block device on a temporary image or a net device on a datagram
//! socket, run by an event manager as the VMM thread runs it.
//!
//! Nothing may panic, and what the driver can observe must hold: the
//! identification registers never change, refused accesses read as zero,
//! status bits only accumulate until a reset and a reset clears them (and
//! the queues and interrupt status), FEATURES_OK is never granted for
//! features the device did not offer or without VERSION_1, the config
//! space reads as the device's, an interrupt is raised only with a bit in
//! the interrupt status, and the device itself never reads past its image
//! nor sends a malformed frame.
#![no_main]

mod common;

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::{HOLED_END, Input, holed_memory};
use event_manager::{EventManager, SubscriberOps};
use flatlet_devices::bus::Bus;
use flatlet_devices::irq::{InterruptController, IrqLine};
use flatlet_devices::virtio::block::{Block, CacheType};
use flatlet_devices::virtio::mmio::MmioTransport;
use flatlet_devices::virtio::net::{MAX_FRAME, Net, VNET_HDR_LEN};
use flatlet_devices::virtio::{F_VERSION_1, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

const BASE: u64 = 0xd000_0000;
const WINDOW: u64 = 0x1000;

// The register layout of virtio 1.x, section 4.2.2, written out here.
const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR_ID: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;
const REGISTERS: [u64; 24] = [
    MAGIC,
    VERSION,
    DEVICE_ID,
    VENDOR_ID,
    DEVICE_FEATURES,
    DEVICE_FEATURES_SEL,
    DRIVER_FEATURES,
    DRIVER_FEATURES_SEL,
    QUEUE_SEL,
    QUEUE_NUM_MAX,
    QUEUE_NUM,
    QUEUE_READY,
    QUEUE_NOTIFY,
    INTERRUPT_STATUS,
    INTERRUPT_ACK,
    STATUS,
    QUEUE_DESC_LOW,
    QUEUE_DESC_HIGH,
    QUEUE_DRIVER_LOW,
    QUEUE_DRIVER_HIGH,
    QUEUE_DEVICE_LOW,
    QUEUE_DEVICE_HIGH,
    CONFIG_GENERATION,
    0x0c0, // not a register
];

const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;

const MAC: [u8; 6] = [0x06, 0, 0xac, 0x10, 0, 2];

#[derive(Default)]
struct Counter(AtomicU64);
impl InterruptController for Counter {
    fn pulse(&self, _: usize) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn set_level(&self, _: usize, _: bool) {}
}

enum Kind {
    Block {
        dev: Arc<Mutex<Block>>,
        image_len: u64,
        _image: TempFile,
        _spare: Option<TempFile>,
    },
    Net {
        peer: UnixDatagram,
        mac: Option<[u8; 6]>,
    },
}

/// What the harness knows from what the driver did.
#[derive(Default)]
struct Shadow {
    queue_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    /// `STATUS` as last read or written through the transport.
    status: u32,
}

struct Rig {
    kind: Kind,
    transport: Arc<Mutex<MmioTransport>>,
    bus: Bus,
    mem: GuestMemoryMmap,
    em: EventManager<Arc<Mutex<dyn VirtioDevice>>>,
    irq: Arc<Counter>,
    device_id: u32,
    offered: u64,
    queues: u32,
    shadow: Shadow,
}

impl Rig {
    fn status(&self) -> u32 {
        self.transport.lock().unwrap().status()
    }

    /// The device's configuration space, as its specification lays it out.
    fn config(&self) -> Vec<u8> {
        match &self.kind {
            Kind::Block { dev, .. } => {
                let mut c = dev.lock().unwrap().sectors().to_le_bytes().to_vec();
                c.extend_from_slice(&8192u32.to_le_bytes()); // size_max: 1 MiB / 128
                c.extend_from_slice(&128u32.to_le_bytes()); // seg_max
                c
            }
            Kind::Net { mac, .. } => {
                let mut c = mac.unwrap_or_default().to_vec();
                c.extend_from_slice(&[0, 0]);
                c
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let inside = offset.checked_add(data.len() as u64).is_some_and(|e| e <= WINDOW);
        let before = self.status();
        assert_eq!(self.bus.write(BASE + offset, data), inside, "bus dispatch at {offset:#x}");
        let Ok(b) = <[u8; 4]>::try_from(data) else {
            self.check_status(before, false);
            return;
        };
        let v = u32::from_le_bytes(b);
        let mut reset = false;
        let configuring = before & DRIVER != 0 && before & (DRIVER_OK | 0x80 | FEATURES_OK) == 0;
        match offset {
            QUEUE_SEL => self.shadow.queue_sel = v,
            DRIVER_FEATURES_SEL => self.shadow.driver_features_sel = v,
            DRIVER_FEATURES if configuring => {
                let f = &mut self.shadow.driver_features;
                match self.shadow.driver_features_sel {
                    0 => *f = (*f & !0xffff_ffff) | u64::from(v),
                    1 => *f = (*f & 0xffff_ffff) | (u64::from(v) << 32),
                    _ => {}
                }
            }
            STATUS if v == 0 => {
                reset = true;
                self.shadow = Shadow::default();
            }
            _ => {}
        }
        self.check_status(before, reset);
        if reset {
            self.check_reset();
        }
    }

    /// Status bits only accumulate, until a reset.
    fn check_status(&mut self, before: u32, reset: bool) {
        let s = self.status();
        if !reset {
            assert_eq!(s & before, before, "status {before:#x} -> {s:#x} without a reset");
        }
        if s & FEATURES_OK != 0 {
            let f = self.shadow.driver_features;
            assert_eq!(f & !self.offered, 0, "FEATURES_OK with features {f:#x} not offered");
            assert_ne!(f & F_VERSION_1, 0, "FEATURES_OK for a legacy driver");
        }
        self.shadow.status = s;
    }

    /// After a reset, the driver sees a device as new.
    fn check_reset(&mut self) {
        assert_eq!(self.reg(STATUS), 0, "status after a reset");
        assert_eq!(self.reg(INTERRUPT_STATUS), 0, "interrupt status after a reset");
        for q in 0..self.queues {
            self.bus.write(BASE + QUEUE_SEL, &q.to_le_bytes());
            assert_eq!(self.reg(QUEUE_READY), 0, "queue {q} ready after a reset");
        }
        self.bus.write(BASE + QUEUE_SEL, &0u32.to_le_bytes());
    }

    /// A well-formed register read, checked.
    fn reg(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let width = data.len();
        let inside = offset.checked_add(width as u64).is_some_and(|e| e <= WINDOW);
        data.fill(0xa5);
        assert_eq!(self.bus.read(BASE + offset, data), inside, "bus dispatch at {offset:#x}");
        if !inside {
            assert!(data.iter().all(|b| *b == 0xa5), "a refused read leaves the buffer alone");
            return;
        }
        if offset >= CONFIG {
            let config = self.config();
            for (i, b) in data.iter().enumerate() {
                let want = usize::try_from(offset - CONFIG)
                    .ok()
                    .and_then(|o| config.get(o + i))
                    .copied()
                    .unwrap_or(0);
                assert_eq!(*b, want, "config byte {:#x}", offset - CONFIG + i as u64);
            }
            return;
        }
        if width != 4 || offset % 4 != 0 {
            assert!(data.iter().all(|b| *b == 0), "{width}-byte read at {offset:#x} reads 0");
            return;
        }
        let v = u32::from_le_bytes((&*data).try_into().unwrap());
        match offset {
            MAGIC => assert_eq!(v, 0x7472_6976),
            VERSION => assert_eq!(v, 2),
            DEVICE_ID => assert_eq!(v, self.device_id),
            VENDOR_ID => assert_eq!(v, 0x464c_4154),
            DEVICE_FEATURES => {
                // DeviceFeaturesSel is not tracked: any 32-bit window of
                // the offered features, or 0.
                assert!(v == 0 || v == self.offered as u32 || v == (self.offered >> 32) as u32);
            }
            QUEUE_NUM_MAX => {
                let want = if self.shadow.queue_sel < self.queues { 256 } else { 0 };
                assert_eq!(v, want, "QueueNumMax of queue {}", self.shadow.queue_sel);
            }
            QUEUE_READY => assert!(v <= 1),
            INTERRUPT_STATUS => assert_eq!(v & !3, 0, "interrupt status {v:#x}"),
            STATUS => assert_eq!(v, self.status()),
            CONFIG_GENERATION => {}
            _ => assert_eq!(v, 0, "register {offset:#x} reads 0"),
        }
    }

    fn wr(&mut self, offset: u64, v: u32) {
        self.write(offset, &v.to_le_bytes());
    }

    /// A queue set up as a driver does it (the writes may well be refused).
    fn setup_queue(&mut self, sel: u32, num: u32, rings: [u64; 3], ready: bool) {
        self.wr(QUEUE_SEL, sel);
        self.wr(QUEUE_NUM, num);
        for (reg, addr) in [QUEUE_DESC_LOW, QUEUE_DRIVER_LOW, QUEUE_DEVICE_LOW].into_iter().zip(rings) {
            self.wr(reg, addr as u32);
            self.wr(reg + 4, (addr >> 32) as u32);
        }
        self.wr(QUEUE_READY, u32::from(ready));
    }

    /// Runs the VMM thread's loop once, as it would run after the vCPU's
    /// writes; checks what the device did.
    fn run(&mut self) {
        let pulses = self.irq.0.load(Ordering::Relaxed);
        self.em.run_with_timeout(0).unwrap();
        if self.irq.0.load(Ordering::Relaxed) != pulses {
            assert_ne!(self.reg(INTERRUPT_STATUS), 0, "an interrupt with no status bit");
        }
        match &self.kind {
            Kind::Block { dev, image_len, .. } => {
                let s = dev.lock().unwrap().stats();
                assert!(s.bytes_read <= image_len * s.reads);
                assert!(s.bytes_written <= image_len * s.writes);
            }
            Kind::Net { peer, .. } => {
                let mut buf = vec![0u8; MAX_FRAME + 1];
                while let Ok(n) = peer.recv(&mut buf) {
                    assert!((VNET_HDR_LEN + 14..=MAX_FRAME).contains(&n), "{n}-byte frame");
                    assert!(buf[..VNET_HDR_LEN].iter().all(|b| *b == 0), "offload fields reached the TAP");
                }
            }
        }
    }
}

fn image(len: usize) -> (TempFile, std::fs::File) {
    let image = TempFile::new().unwrap();
    image.as_file().write_all(&vec![0x5a; len]).unwrap();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(image.as_path()).unwrap();
    (image, file)
}

/// A ring address: mostly inside (or near) guest memory, sometimes any.
fn address(input: &mut Input, wild: bool) -> u64 {
    if wild {
        input.u64()
    } else {
        u64::from(input.u32()) % (HOLED_END + 0x1000)
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let setup = input.u8();
    let mem = holed_memory();
    let (kind, dev): (Kind, Arc<Mutex<dyn VirtioDevice>>) = if setup & 1 == 0 {
        // 1 to 8 sectors, plus a partial one sometimes.
        let len = 512 * (usize::from(setup >> 1 & 7) + 1) + if setup & 0x10 != 0 { 100 } else { 0 };
        let (tmp, file) = image(len);
        let cache = if setup & 0x20 != 0 { CacheType::Writeback } else { CacheType::Unsafe };
        let dev = Arc::new(Mutex::new(Block::new(file, setup & 0x40 != 0, cache, "fuzz").unwrap()));
        let kind = Kind::Block {
            dev: dev.clone(),
            image_len: len as u64,
            _image: tmp,
            _spare: None,
        };
        (kind, dev)
    } else {
        let (ours, peer) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        peer.set_nonblocking(true).unwrap();
        let mac = (setup & 2 != 0).then_some(MAC);
        let dev = Arc::new(Mutex::new(Net::new(Box::new(ours), mac, "fuzz").unwrap()));
        (Kind::Net { peer, mac }, dev)
    };
    let (device_id, offered, queues) = {
        let d = dev.lock().unwrap();
        (d.device_type(), d.features(), d.queue_max_sizes().len() as u32)
    };
    let irq = Arc::new(Counter::default());
    let transport = Arc::new(Mutex::new(MmioTransport::new(
        dev.clone(),
        mem.clone(),
        IrqLine::new(irq.clone(), 5),
    )));
    let mut bus = Bus::new();
    bus.insert(transport.clone(), BASE, WINDOW).unwrap();
    let mut em = EventManager::new().unwrap();
    em.add_subscriber(dev);
    let mut rig = Rig {
        kind,
        transport,
        bus,
        mem,
        em,
        irq,
        device_id,
        offered,
        queues,
        shadow: Shadow::default(),
    };

    let mut ops = 0;
    while !input.is_empty() && ops < 1024 {
        ops += 1;
        match input.u8() % 14 {
            0 => {
                let offset = u64::from(input.u16() & 0x1fff);
                let width = input.width();
                let mut buf = [0u8; 16];
                buf[..8].copy_from_slice(&input.u64().to_le_bytes());
                rig.write(offset, &buf[..width]);
            }
            1 => {
                let offset = u64::from(input.u16() & 0x1fff);
                let width = input.width();
                let mut buf = [0u8; 16];
                rig.read(offset, &mut buf[..width]);
            }
            2 => {
                let reg = REGISTERS[usize::from(input.u8()) % REGISTERS.len()];
                let v = input.u32();
                rig.wr(reg, v);
            }
            3 => {
                let reg = REGISTERS[usize::from(input.u8()) % REGISTERS.len()];
                rig.reg(reg);
            }
            4 => {
                let v = u32::from(input.u8());
                rig.wr(STATUS, v);
            }
            5 => {
                let sel = u32::from(input.u8() % 4);
                let num = u32::from(input.u16());
                let ctl = input.u8();
                let rings = [
                    address(&mut input, ctl & 1 != 0),
                    address(&mut input, ctl & 2 != 0),
                    address(&mut input, ctl & 4 != 0),
                ];
                rig.setup_queue(sel, num, rings, ctl & 8 == 0);
            }
            6 => {
                // The whole bring-up of a driver, with features and queue
                // sizes from the input and rings laid out in low memory.
                let ctl = input.u8();
                let features = match ctl & 3 {
                    0 => F_VERSION_1,
                    1 => rig.offered,
                    2 => rig.offered & input.u64(),
                    _ => input.u64(),
                };
                rig.wr(STATUS, 0);
                rig.wr(STATUS, ACKNOWLEDGE);
                rig.wr(STATUS, ACKNOWLEDGE | DRIVER);
                rig.wr(DRIVER_FEATURES_SEL, 0);
                rig.wr(DRIVER_FEATURES, features as u32);
                rig.wr(DRIVER_FEATURES_SEL, 1);
                rig.wr(DRIVER_FEATURES, (features >> 32) as u32);
                rig.wr(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
                let size = 1u32 << (ctl >> 2 & 7);
                for q in 0..rig.queues {
                    let base = 0x4000 * u64::from(q);
                    rig.setup_queue(q, size, [base, base + 0x1000, base + 0x2000], true);
                }
                rig.wr(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
            }
            7 => {
                let addr = u64::from(input.u32()) % HOLED_END;
                let n = usize::from(input.u8());
                let bytes = input.bytes(n);
                let _ = rig.mem.write_slice(bytes, GuestAddress(addr));
            }
            8 => {
                let b = input.u8();
                let q = if b & 0x80 != 0 { input.u32() } else { u32::from(b % 4) };
                rig.wr(QUEUE_NOTIFY, q);
            }
            9 | 10 => rig.run(),
            11 => {
                let v = input.u32();
                rig.wr(INTERRUPT_ACK, v);
            }
            12 => {
                // The device-specific configuration space.
                let offset = CONFIG + u64::from(input.u8());
                let width = input.width();
                let mut buf = [0u8; 16];
                if input.u8() & 1 != 0 {
                    rig.read(offset, &mut buf[..width]);
                } else {
                    buf[..8].copy_from_slice(&input.u64().to_le_bytes());
                    rig.write(offset, &buf[..width]);
                }
            }
            _ => match &mut rig.kind {
                // The host's side: a frame arrives, or the image is
                // swapped (PATCH /drives).
                Kind::Net { peer, .. } => {
                    let len = usize::from(input.u16()) % 2048;
                    let frame: Vec<u8> = (0..len).map(|i| i as u8).collect();
                    let _ = peer.send(&frame);
                }
                Kind::Block {
                    dev,
                    image_len,
                    _spare,
                    ..
                } => {
                    let len = 512 * (usize::from(input.u8() % 8) + 1);
                    let (tmp, file) = image(len);
                    let generation = dev.lock().unwrap().config_generation();
                    dev.lock().unwrap().replace_image(file).unwrap();
                    assert_ne!(dev.lock().unwrap().config_generation(), generation);
                    *image_len = (*image_len).max(len as u64);
                    *_spare = Some(tmp);
                }
            },
        }
    }
    rig.run();
});
