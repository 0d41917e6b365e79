//! virtio-net receive: frames of any size (0 to the largest a TAP can
//! give) arrive from the host side, through a datagram socket standing in
//! for the TAP as in the device's unit tests, while a hostile guest writes
//! descriptors, available-ring entries and indexes, and any other memory,
//! between the device's runs; queue size, readiness and resets vary too.
//!
//! Each run of the receive path is checked against a model of what it
//! must do, run on a copy of guest memory: afterwards every byte of guest
//! memory must match the model's (so nothing is written outside the
//! chains' device-writable buffers and the used ring, and a frame lands
//! whole, in order, in one chain), and so must the counters, the return
//! value and the interrupts: a frame is delivered whole, or waits for
//! buffers, or is dropped and counted.
#![no_main]

mod common;

use std::collections::VecDeque;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{HOLED, HOLED_END, Input, holed_contains, holed_memory};
use flatlet_devices::irq::{InterruptController, IrqLine};
use flatlet_devices::virtio::net::{MAX_FRAME, Net, NetStats, QUEUE_SIZE, VNET_HDR_LEN};
use flatlet_devices::virtio::{Activation, F_VERSION_1, VirtioDevice, VirtioInterrupt};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

// The receive queue's rings, and the transmit queue's (never ready).
const TABLE: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x1400;
const TX_RINGS: (u64, u64, u64) = (0x2000, 0x3000, 0x3400);

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

#[derive(Default)]
struct Counter(AtomicU64);
impl InterruptController for Counter {
    fn pulse(&self, _: usize) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn set_level(&self, _: usize, _: bool) {}
}

/// The model's receive queue.
struct Q {
    size: u16,
    ready: bool,
    next_avail: u16,
    next_used: u16,
}

/// A copy of guest memory, flat over `[0, HOLED_END)` (the hole unused).
struct Image(Vec<u8>);

impl Image {
    fn get(&self, addr: u64, len: usize) -> Option<&[u8]> {
        holed_contains(addr, len as u64).then(|| &self.0[addr as usize..addr as usize + len])
    }
    fn put(&mut self, addr: u64, data: &[u8]) -> bool {
        if !holed_contains(addr, data.len() as u64) {
            return false;
        }
        self.0[addr as usize..addr as usize + data.len()].copy_from_slice(data);
        true
    }
    fn u16(&self, addr: u64) -> u16 {
        u16::from_le_bytes(self.get(addr, 2).unwrap().try_into().unwrap())
    }
}

enum Delivery {
    Delivered,
    NoBuffer,
}

/// What the receive path must do, written from the virtio 1.x rules and
/// the device's documented choices (one frame per chain, never split;
/// a chain too small takes the frame and returns it dropped; a bad chain
/// is returned empty and the frame tries the next).
struct Model {
    mem: Image,
    active: Option<Q>,
    pending: Option<Vec<u8>>,
    socket: VecDeque<Vec<u8>>,
    stats: NetStats,
    pulses: u64,
}

impl Model {
    fn add_used(&mut self, head: u16, len: u32) {
        let q = self.active.as_mut().unwrap();
        if head >= q.size {
            return;
        }
        let slot = USED + 4 + 8 * u64::from(q.next_used % q.size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        assert!(self.mem.put(slot, &elem));
        q.next_used = q.next_used.wrapping_add(1);
        let idx = q.next_used.to_le_bytes();
        assert!(self.mem.put(USED + 2, &idx));
    }

    /// The device-writable buffers of the chain at `head`, or None if the
    /// chain is malformed (and whether for an indirect descriptor).
    fn chain(&self, head: u16) -> Result<Vec<(u64, usize)>, bool> {
        let size = self.active.as_ref().unwrap().size;
        let mut descs = Vec::new();
        let mut index = head;
        loop {
            if index >= size || descs.len() >= usize::from(size) {
                return Err(false);
            }
            let raw = self.mem.get(TABLE + 16 * u64::from(index), 16).unwrap();
            let addr = u64::from_le_bytes(raw[..8].try_into().unwrap());
            let len = u32::from_le_bytes(raw[8..12].try_into().unwrap());
            let flags = u16::from_le_bytes(raw[12..14].try_into().unwrap());
            let next = u16::from_le_bytes(raw[14..].try_into().unwrap());
            if flags & F_INDIRECT != 0 {
                return Err(true);
            }
            descs.push((addr, len, flags));
            if flags & F_NEXT == 0 {
                break;
            }
            index = next;
        }
        let mut writable = Vec::new();
        for (addr, len, flags) in descs {
            if len == 0 {
                continue;
            }
            // Outside memory, or device-readable: a receive chain has
            // only device-writable buffers.
            if !holed_contains(addr, u64::from(len)) || flags & F_WRITE == 0 {
                return Err(false);
            }
            writable.push((addr, len as usize));
        }
        Ok(writable)
    }

    fn deliver(&mut self) -> Delivery {
        if self.active.is_none() {
            return Delivery::NoBuffer;
        }
        let mut frame = self.pending.take().unwrap();
        frame[10..12].copy_from_slice(&1u16.to_le_bytes());
        let result = loop {
            let q = self.active.as_mut().unwrap();
            if !q.ready {
                break Delivery::NoBuffer;
            }
            let avail = self.mem.u16(AVAIL + 2);
            if avail.wrapping_sub(q.next_avail) > q.size {
                self.stats.invalid_avail_idx += 1;
                break Delivery::NoBuffer;
            }
            if avail == q.next_avail {
                break Delivery::NoBuffer;
            }
            let head = self.mem.u16(AVAIL + 4 + 2 * u64::from(q.next_avail % q.size));
            q.next_avail = q.next_avail.wrapping_add(1);
            match self.chain(head) {
                Ok(buffers) if buffers.iter().map(|b| b.1).sum::<usize>() >= frame.len() => {
                    let mut rest = &frame[..];
                    for (addr, len) in buffers {
                        let n = len.min(rest.len());
                        assert!(self.mem.put(addr, &rest[..n]));
                        rest = &rest[n..];
                    }
                    self.add_used(head, frame.len() as u32);
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += (frame.len() - VNET_HDR_LEN) as u64;
                    break Delivery::Delivered;
                }
                Ok(_) => {
                    self.stats.dropped += 1;
                    self.add_used(head, 0);
                    break Delivery::Delivered;
                }
                Err(indirect) => {
                    self.stats.indirect += u64::from(indirect);
                    self.stats.dropped += 1;
                    self.add_used(head, 0);
                }
            }
        };
        if matches!(result, Delivery::NoBuffer) {
            self.pending = Some(frame);
        }
        result
    }

    fn process_rx(&mut self) -> bool {
        let mut delivered = 0;
        loop {
            if self.pending.is_none() {
                match self.socket.pop_front() {
                    Some(f) if f.len() >= VNET_HDR_LEN => self.pending = Some(f),
                    Some(_) => {
                        self.stats.dropped += 1;
                        continue;
                    }
                    None => break,
                }
            }
            match self.deliver() {
                Delivery::Delivered => delivered += 1,
                Delivery::NoBuffer => {
                    self.stats.rx_deferred += 1;
                    break;
                }
            }
        }
        if delivered > 0 && self.active.is_some() {
            // No VIRTIO_RING_F_EVENT_IDX: every batch interrupts.
            self.pulses += 1;
        }
        self.pending.is_some()
    }
}

struct Rig {
    mem: GuestMemoryMmap,
    dev: Net,
    peer: UnixDatagram,
    irq: Arc<Counter>,
    model: Model,
    seq: u32,
}

impl Rig {
    /// A guest write, to both memories (or neither, if it does not fit).
    fn guest_write(&mut self, addr: u64, data: &[u8]) {
        if self.model.mem.put(addr, data) {
            self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        }
    }

    fn activate(&mut self, size: u16, ready: bool) {
        let queue = |(d, a, u): (u64, u64, u64), size: u16, ready: bool| {
            let mut q = Queue::new(QUEUE_SIZE).unwrap();
            q.try_set_size(size).unwrap();
            q.try_set_desc_table_address(GuestAddress(d)).unwrap();
            q.try_set_avail_ring_address(GuestAddress(a)).unwrap();
            q.try_set_used_ring_address(GuestAddress(u)).unwrap();
            q.set_ready(ready);
            q
        };
        let activation = Activation {
            mem: self.mem.clone(),
            queues: vec![queue((TABLE, AVAIL, USED), size, ready), queue(TX_RINGS, size, false)],
            interrupt: VirtioInterrupt::new(Arc::new(Default::default()), IrqLine::new(self.irq.clone(), 5)),
            acked_features: F_VERSION_1,
        };
        self.dev.activate(activation).unwrap();
        self.model.active = Some(Q {
            size,
            ready,
            next_avail: 0,
            next_used: 0,
        });
    }

    fn process_rx(&mut self) {
        let waiting = self.dev.process_rx();
        let want = self.model.process_rx();
        assert_eq!(waiting, want, "process_rx's answer");
        // The counters the model keeps (the device may have more).
        let (got, want) = (self.dev.stats(), &self.model.stats);
        let fields = |s: &NetStats| {
            [s.rx_frames, s.rx_bytes, s.dropped, s.rx_deferred, s.invalid_avail_idx, s.indirect, s.tx_frames]
        };
        assert_eq!(
            fields(&got),
            fields(want),
            "counters rx_frames, rx_bytes, dropped, rx_deferred, invalid_avail_idx, indirect, tx_frames"
        );
        assert_eq!(self.irq.0.load(Ordering::Relaxed), self.model.pulses, "interrupts");
        for &(base, len) in &HOLED {
            let mut got = vec![0u8; len];
            self.mem.read_slice(&mut got, GuestAddress(base)).unwrap();
            let want = &self.model.mem.0[base as usize..base as usize + len];
            if got != want {
                let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
                panic!(
                    "guest memory differs from the model's at {:#x}: {:#04x}, expected {:#04x}",
                    base + at as u64,
                    got[at],
                    want[at]
                );
            }
        }
    }
}

fn queue_size(b: u8) -> u16 {
    1 << (b % 9)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let (ours, peer) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    peer.set_nonblocking(true).unwrap();
    let mut rig = Rig {
        mem: holed_memory(),
        dev: Net::new(Box::new(ours), None, "fuzz").unwrap(),
        peer,
        irq: Arc::new(Counter::default()),
        model: Model {
            mem: Image(vec![0; HOLED_END as usize]),
            active: None,
            pending: None,
            socket: VecDeque::new(),
            stats: NetStats::default(),
            pulses: 0,
        },
        seq: 0,
    };
    let setup = input.u8();
    rig.activate(queue_size(setup), setup & 0x80 == 0);
    let mut ops = 0;
    while !input.is_empty() && ops < 1024 {
        ops += 1;
        match input.u8() % 9 {
            0 => {
                // A descriptor, written by the guest.
                let index = u64::from(input.u8());
                let ctl = input.u8();
                let addr = if ctl & 1 != 0 {
                    input.u64()
                } else {
                    u64::from(input.u32()) % HOLED_END
                };
                let len = if ctl & 2 != 0 {
                    input.u32()
                } else {
                    u32::from(input.u16())
                };
                let flags = u16::from((ctl >> 2) & 7);
                let next = if ctl & 0x20 != 0 {
                    input.u16()
                } else {
                    u16::from(input.u8())
                };
                let mut d = [0u8; 16];
                d[..8].copy_from_slice(&addr.to_le_bytes());
                d[8..12].copy_from_slice(&len.to_le_bytes());
                d[12..14].copy_from_slice(&flags.to_le_bytes());
                d[14..].copy_from_slice(&next.to_le_bytes());
                rig.guest_write(TABLE + 16 * index, &d);
            }
            1 => {
                // A head made available, as a driver does it.
                let head = if input.u8() & 1 != 0 {
                    input.u16()
                } else {
                    u16::from(input.u8())
                };
                let idx = rig.model.mem.u16(AVAIL + 2);
                let size = rig.model.active.as_ref().map_or(QUEUE_SIZE, |q| q.size);
                rig.guest_write(AVAIL + 4 + 2 * u64::from(idx % size), &head.to_le_bytes());
                rig.guest_write(AVAIL + 2, &idx.wrapping_add(1).to_le_bytes());
            }
            2 => {
                let idx = input.u16();
                rig.guest_write(AVAIL + 2, &idx.to_le_bytes());
            }
            3 => {
                // Any bytes anywhere: rings, descriptors, buffers.
                let addr = u64::from(input.u32()) % HOLED_END;
                let n = usize::from(input.u8());
                let bytes = input.bytes(n);
                rig.guest_write(addr, bytes);
            }
            4 => {
                // A well-formed chain of device-writable buffers, made
                // available.
                let size = rig.model.active.as_ref().map_or(QUEUE_SIZE, |q| q.size);
                let head = u16::from(input.u8()) % size;
                let n = u16::from(input.u8() % 4 + 1).min(size);
                for i in 0..n {
                    let at = (head + i) % size;
                    let addr = 0x4000 + u64::from(input.u16()) * 2;
                    let len = u32::from(input.u16());
                    let last = i + 1 == n;
                    let mut d = [0u8; 16];
                    d[..8].copy_from_slice(&addr.to_le_bytes());
                    d[8..12].copy_from_slice(&len.to_le_bytes());
                    d[12..14].copy_from_slice(&(F_WRITE | if last { 0 } else { F_NEXT }).to_le_bytes());
                    d[14..].copy_from_slice(&((at + 1) % size).to_le_bytes());
                    rig.guest_write(TABLE + 16 * u64::from(at), &d);
                }
                let idx = rig.model.mem.u16(AVAIL + 2);
                rig.guest_write(AVAIL + 4 + 2 * u64::from(idx % size), &head.to_le_bytes());
                rig.guest_write(AVAIL + 2, &idx.wrapping_add(1).to_le_bytes());
            }
            5 => {
                // A frame from the host: a header as given, then a
                // sequence number and a pattern.
                let ctl = input.u8();
                let l = usize::from(input.u16());
                let len = match ctl % 4 {
                    0 => l % 128,
                    1 => l % 2048,
                    2 => l.min(MAX_FRAME),
                    _ => MAX_FRAME - l % 64,
                };
                let hdr = input.bytes(VNET_HDR_LEN);
                rig.seq += 1;
                let seq = rig.seq;
                let mut frame: Vec<u8> = (0..len).map(|i| (i as u32).wrapping_mul(31).wrapping_add(seq) as u8).collect();
                let n = hdr.len().min(len);
                frame[..n].copy_from_slice(&hdr[..n]);
                if len >= VNET_HDR_LEN + 4 {
                    frame[VNET_HDR_LEN..VNET_HDR_LEN + 4].copy_from_slice(&seq.to_le_bytes());
                }
                // A full socket refuses it: then the host never sent it.
                if rig.peer.send(&frame).is_ok() {
                    rig.model.socket.push_back(frame);
                }
            }
            6 | 7 => rig.process_rx(),
            _ => {
                // Reset (a frame waiting for buffers is dropped, counted), and
                // maybe a new activation.
                let b = input.u8();
                rig.dev.reset();
                rig.model.active = None;
                if rig.model.pending.take().is_some() {
                    rig.model.stats.dropped += 1;
                }
                if b & 0x40 == 0 {
                    rig.activate(queue_size(b), b & 0x80 == 0);
                }
            }
        }
    }
    rig.process_rx();
});
