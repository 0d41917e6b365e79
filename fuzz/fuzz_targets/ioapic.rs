//! The I/O APIC as a hostile guest and misbehaving devices drive it:
//! IOREGSEL/IOWIN accesses of any width and offset (through the MMIO bus,
//! in and just beyond its window), redirection-table programming, pin
//! pulses and levels (pins past the 24 included), EOIs, and an MSI sink
//! that sometimes fails. Every MSI sent is checked against the 82093AA's
//! rules: a masked pin sends nothing, the message encodes the pin's entry,
//! a level-triggered pin sends once until its EOI.
#![no_main]

mod common;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::Input;
use flatlet_devices::bus::Bus;
use flatlet_devices::ioapic::{IOAPIC_BASE, IOAPIC_SIZE, IoApic, MsiMessage, MsiSink, NUM_PINS};
use flatlet_devices::irq::IrqLine;
use libfuzzer_sys::fuzz_target;

// The 82093AA's registers and entry bits, written out here rather than
// taken from the model.
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const VERSION_VALUE: u32 = (23 << 16) | 0x11;
const REDIR: u32 = 0x10;
const DELIVERY_STATUS: u64 = 1 << 12;
const REMOTE_IRR: u64 = 1 << 14;
const LEVEL: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
const RO: u64 = DELIVERY_STATUS | REMOTE_IRR;
/// Pins the fuzzer names: the 24 and some that do not exist.
const PIN_SPACE: u8 = 32;

/// The MSI an entry stands for (Intel SDM, 11.11: address 0xfeexxxxx with
/// the destination in bits 19:12 and the destination mode in bit 2; data
/// with vector, delivery mode, level-assert and trigger mode).
fn encode(entry: u64) -> MsiMessage {
    let dest = entry >> 56;
    let logical = (entry >> 11) & 1;
    MsiMessage {
        address: 0xfee0_0000 | (dest << 12) | (logical << 2),
        data: ((entry & 0xff) | (entry & (7 << 8)) | (1 << 14) | (entry & LEVEL)) as u32,
    }
}

fn route(entry: u64) -> Option<MsiMessage> {
    (entry & MASKED == 0).then(|| encode(entry))
}

#[derive(Default)]
struct Sink {
    sent: Mutex<Vec<(usize, MsiMessage)>>,
    routes: Mutex<Vec<(usize, Option<MsiMessage>)>>,
    fail: AtomicBool,
}

impl MsiSink for Sink {
    fn send(&self, pin: usize, msg: MsiMessage) -> io::Result<()> {
        self.sent.lock().unwrap().push((pin, msg));
        if self.fail.load(Ordering::Relaxed) {
            return Err(io::Error::other("KVM_SIGNAL_MSI failed"));
        }
        Ok(())
    }

    fn route_changed(&self, pin: usize, route: Option<MsiMessage>) {
        assert!(pin < NUM_PINS, "route of pin {pin}");
        self.routes.lock().unwrap().push((pin, route));
    }
}

/// What the harness knows of the chip, from what it wrote.
struct Shadow {
    select: u32,
    id: u32,
    /// The writable bits of each entry, as last written.
    entries: [u64; NUM_PINS],
    lines: [bool; NUM_PINS],
    /// The last route the chip reported for each pin.
    routes: [Option<MsiMessage>; NUM_PINS],
}

impl Shadow {
    /// Records a write of `value` to the register `select` points at.
    fn write(&mut self, value: u32) {
        match self.select {
            0 => self.id = value & 0x0f00_0000,
            r if (REDIR..REDIR + 2 * NUM_PINS as u32).contains(&r) => {
                let pin = ((r - REDIR) / 2) as usize;
                let e = &mut self.entries[pin];
                *e = if r % 2 == 0 {
                    (*e & !0xffff_ffff) | u64::from(value)
                } else {
                    (*e & 0xffff_ffff) | (u64::from(value) << 32)
                };
            }
            _ => {}
        }
    }
}

/// What one operation did.
enum Op {
    /// A register write that may change entries (or nothing at all).
    Write,
    Pulse(usize),
    Level(usize, bool),
    Eoi(u8),
    Other,
}

struct Rig {
    chip: Arc<Mutex<IoApic>>,
    bus: Bus,
    sink: Arc<Sink>,
    shadow: Shadow,
}

impl Rig {
    fn entry(&self, pin: usize) -> u64 {
        self.chip.lock().unwrap().redirection_entry(pin).unwrap()
    }

    fn entries(&self) -> [u64; NUM_PINS] {
        std::array::from_fn(|p| self.entry(p))
    }

    /// What IOWIN must read, given the shadow and the chip's entries.
    fn check_window(&self, got: u32) {
        let s = &self.shadow;
        match s.select {
            0 | 2 => assert_eq!(got, s.id, "ID/arbitration register (select {})", s.select),
            1 => assert_eq!(got, VERSION_VALUE, "version register"),
            r if (REDIR..REDIR + 2 * NUM_PINS as u32).contains(&r) => {
                let pin = ((r - REDIR) / 2) as usize;
                let (want, ro) = if r % 2 == 0 {
                    (s.entries[pin] as u32, RO as u32)
                } else {
                    ((s.entries[pin] >> 32) as u32, 0)
                };
                assert_eq!(got & !ro, want & !ro, "register {r:#x}: writable bits as written");
                assert_eq!(got & ro, (self.entry(pin) as u32) & ro);
            }
            r => assert_eq!(got, 0, "unknown register {r:#x} reads 0"),
        }
    }

    fn bus_write(&mut self, offset: u64, data: &[u8]) {
        let inside = offset.checked_add(data.len() as u64).is_some_and(|e| e <= IOAPIC_SIZE);
        assert_eq!(self.bus.write(IOAPIC_BASE + offset, data), inside, "bus dispatch at {offset:#x}");
        if let Ok(b) = <[u8; 4]>::try_from(data) {
            let v = u32::from_le_bytes(b);
            match offset {
                IOREGSEL => self.shadow.select = v & 0xff,
                IOWIN => self.shadow.write(v),
                _ => {}
            }
        }
    }

    fn bus_read(&mut self, offset: u64, width: usize) {
        let mut buf = [0xa5u8; 16];
        let inside = offset.checked_add(width as u64).is_some_and(|e| e <= IOAPIC_SIZE);
        let dispatched = self.bus.read(IOAPIC_BASE + offset, &mut buf[..width]);
        assert!(buf[width..].iter().all(|b| *b == 0xa5), "read past the access");
        assert_eq!(dispatched, inside, "bus dispatch at {offset:#x}");
        if !dispatched {
            assert!(buf.iter().all(|b| *b == 0xa5), "a refused read leaves the buffer alone");
            return;
        }
        let data = &buf[..width];
        match (offset, width) {
            (IOREGSEL, 4) => assert_eq!(u32::from_le_bytes(data.try_into().unwrap()), self.shadow.select),
            (IOWIN, 4) => self.check_window(u32::from_le_bytes(data.try_into().unwrap())),
            _ => assert!(data.iter().all(|b| *b == 0), "a {width}-byte read at {offset:#x} reads 0"),
        }
    }

    fn select(&mut self, reg: u32) {
        self.bus_write(IOREGSEL, &reg.to_le_bytes());
    }

    /// Checks what an operation sent and left, given the entries before.
    fn check(&mut self, op: Op, before: &[u64; NUM_PINS], sent_before: usize) {
        let after = self.entries();
        let sent: Vec<(usize, MsiMessage)> = self.sink.sent.lock().unwrap()[sent_before..].to_vec();
        let mut per_pin = [0usize; NUM_PINS];
        for &(pin, msg) in &sent {
            assert!(pin < NUM_PINS, "MSI for pin {pin}");
            per_pin[pin] += 1;
            let e = after[pin];
            assert_eq!(e & MASKED, 0, "pin {pin} is masked but sent {msg:?}");
            assert_eq!(msg, encode(e), "pin {pin}: MSI does not encode entry {e:#x}");
            if e & LEVEL != 0 {
                assert_ne!(e & REMOTE_IRR, 0, "level pin {pin} sent without setting remote IRR");
            }
        }
        for pin in 0..NUM_PINS {
            let (b, a) = (before[pin], after[pin]);
            assert!(per_pin[pin] <= 1, "pin {pin} sent {} MSIs in one operation", per_pin[pin]);
            assert_eq!(a & DELIVERY_STATUS, 0, "pin {pin}: delivery status set");
            if a & REMOTE_IRR != 0 {
                assert_ne!(a & LEVEL, 0, "pin {pin}: remote IRR on an edge entry");
            }
            // Only the chip sets or clears remote IRR; the guest's other bits
            // are as it wrote them.
            assert_eq!(a & !RO, self.shadow.entries[pin] & !RO, "pin {pin}: entry {a:#x}");
            let eoi_here = matches!(op, Op::Eoi(v) if u64::from(v) == b & 0xff);
            if b & REMOTE_IRR != 0 && a & LEVEL != 0 && !eoi_here {
                assert_eq!(per_pin[pin], 0, "pin {pin} re-fired before its EOI");
                assert_ne!(a & REMOTE_IRR, 0, "pin {pin}: remote IRR cleared without an EOI");
            }
            if let Op::Eoi(v) = op {
                if b & LEVEL != 0 && b & 0xff == u64::from(v) && !self.shadow.lines[pin] {
                    assert_eq!(a & REMOTE_IRR, 0, "pin {pin}: EOI {v:#x} left remote IRR set");
                }
            }
        }
        // Exactly one MSI per edge on an unmasked pin that is free to fire.
        let fires = |e: u64| e & MASKED == 0 && (e & LEVEL == 0 || e & REMOTE_IRR == 0);
        match op {
            Op::Pulse(p) if p < NUM_PINS => {
                assert_eq!(per_pin[p], usize::from(fires(before[p])), "pulse of pin {p} ({:#x})", before[p]);
            }
            Op::Pulse(_) => assert!(sent.is_empty()),
            Op::Level(p, up) if p < NUM_PINS => {
                let was = self.shadow.lines[p];
                let want = up && (!was || before[p] & LEVEL != 0) && fires(before[p]);
                assert_eq!(per_pin[p], usize::from(want), "pin {p} level {was} -> {up} ({:#x})", before[p]);
                self.shadow.lines[p] = up;
            }
            Op::Level(..) => assert!(sent.is_empty()),
            Op::Write | Op::Other => {
                // A write fires only a level pin it unmasks while the line is up.
                for &(pin, _) in &sent {
                    assert!(
                        matches!(op, Op::Write)
                            && before[pin] & MASKED != 0
                            && after[pin] & LEVEL != 0
                            && self.shadow.lines[pin],
                        "pin {pin} fired on a write ({:#x} -> {:#x})",
                        before[pin],
                        after[pin]
                    );
                }
            }
            Op::Eoi(v) => {
                for &(pin, _) in &sent {
                    assert!(after[pin] & 0xff == u64::from(v) && self.shadow.lines[pin], "EOI {v:#x} fired pin {pin}");
                }
            }
        }
        // The routes the chip reported follow the entries.
        for (pin, r) in self.sink.routes.lock().unwrap().drain(..) {
            self.shadow.routes[pin] = r;
        }
        for pin in 0..NUM_PINS {
            assert_eq!(self.shadow.routes[pin], route(after[pin]), "pin {pin}: stale route");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let id = input.u8();
    let sink = Arc::new(Sink::default());
    let chip = Arc::new(Mutex::new(IoApic::new(id, sink.clone())));
    let mut bus = Bus::new();
    bus.insert(chip.clone(), IOAPIC_BASE, IOAPIC_SIZE).unwrap();
    let mut rig = Rig {
        chip,
        bus,
        sink,
        shadow: Shadow {
            select: 0,
            id: u32::from(id) << 24,
            entries: [MASKED; NUM_PINS],
            lines: [false; NUM_PINS],
            routes: [None; NUM_PINS],
        },
    };
    let mut ops = 0;
    while !input.is_empty() && ops < 4096 {
        ops += 1;
        let before = rig.entries();
        let sent_before = rig.sink.sent.lock().unwrap().len();
        let op = match input.u8() % 10 {
            0 => {
                let offset = u64::from(input.u16() & 0x1fff);
                let width = input.width();
                let value = input.bytes(16);
                let mut buf = [0u8; 16];
                buf[..value.len()].copy_from_slice(value);
                rig.bus_write(offset, &buf[..width]);
                Op::Write
            }
            1 => {
                let offset = u64::from(input.u16() & 0x1fff);
                let width = input.width();
                rig.bus_read(offset, width);
                Op::Other
            }
            2 => {
                let reg = u32::from(input.u8());
                let value = input.u32();
                rig.select(reg);
                rig.bus_write(IOWIN, &value.to_le_bytes());
                Op::Write
            }
            3 => {
                rig.select(u32::from(input.u8()));
                rig.bus_read(IOWIN, 4);
                Op::Other
            }
            4 => {
                // A whole entry, high half first, as drivers program it.
                let pin = u32::from(input.u8() % PIN_SPACE);
                let low = input.u32();
                let dest = input.u8();
                rig.select(REDIR + 2 * pin + 1);
                rig.bus_write(IOWIN, &(u32::from(dest) << 24).to_le_bytes());
                let mid = rig.entries();
                let mid_sent = rig.sink.sent.lock().unwrap().len();
                rig.check(Op::Write, &before, sent_before);
                rig.select(REDIR + 2 * pin);
                rig.bus_write(IOWIN, &low.to_le_bytes());
                rig.check(Op::Write, &mid, mid_sent);
                continue;
            }
            5 => {
                let pin = usize::from(input.u8() % PIN_SPACE);
                // Through the interrupt-controller interface, as devices do.
                IrqLine::new(rig.chip.clone(), pin).pulse();
                Op::Pulse(pin)
            }
            6 => {
                let b = input.u8();
                let pin = usize::from(b % PIN_SPACE);
                let up = b & 0x80 != 0;
                if b & 0x40 != 0 {
                    IrqLine::new(rig.chip.clone(), pin).set_level(up);
                } else {
                    rig.chip.lock().unwrap().set_level(pin, up);
                }
                Op::Level(pin, up)
            }
            7 => {
                // Mostly the vector of some pin's entry, else any.
                let b = input.u8();
                let v = if b & 0x80 != 0 {
                    before[usize::from(b & 0x7f) % NUM_PINS] as u8
                } else {
                    input.u8()
                };
                rig.chip.lock().unwrap().end_of_interrupt(v);
                Op::Eoi(v)
            }
            8 => {
                let fail = input.u8() & 1 != 0;
                rig.sink.fail.store(fail, Ordering::Relaxed);
                Op::Other
            }
            _ => {
                let pin = usize::from(input.u8() % PIN_SPACE);
                rig.chip.lock().unwrap().pulse(pin);
                Op::Pulse(pin)
            }
        };
        rig.check(op, &before, sent_before);
    }
    // Identification never changes, whatever was done.
    rig.select(1);
    rig.bus_read(IOWIN, 4);
});
