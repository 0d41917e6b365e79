//! An I/O APIC (82093AA-style, 24 pins), emulated in the VMM.
//!
//! flatlet runs KVM's split irqchip: the local APICs live in KVM, the
//! I/O APIC here. A pin that fires is turned into the MSI its redirection
//! entry describes and handed to an [`MsiSink`] (KVM_SIGNAL_MSI in the VMM).
//! Level-triggered entries keep their remote-IRR bit until the guest's EOI
//! for their vector comes back ([`IoApic::end_of_interrupt`]).

use std::io;
use std::sync::{Arc, Mutex};

use crate::bus::{BusDevice, lock};
use crate::irq::InterruptController;
use crate::ratelimit::LogLimiter;

/// Number of pins (GSIs 0 to 23).
pub const NUM_PINS: usize = 24;
/// Guest-physical base of the I/O APIC registers.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Size of the register window.
pub const IOAPIC_SIZE: u64 = 0x1000;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARBITRATION: u32 = 0x02;
const REG_REDIR_BASE: u32 = 0x10;
const VERSION: u32 = 0x11;

const VECTOR_MASK: u64 = 0xff;
const DELIVERY_MODE_SHIFT: u64 = 8;
const DEST_MODE_LOGICAL: u64 = 1 << 11;
const DELIVERY_STATUS: u64 = 1 << 12;
const REMOTE_IRR: u64 = 1 << 14;
const TRIGGER_LEVEL: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
const DEST_SHIFT: u64 = 56;
/// Bits the guest cannot write.
const READ_ONLY_BITS: u64 = DELIVERY_STATUS | REMOTE_IRR;

/// An MSI message: what a local APIC receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    /// Address: 0xfee0_0000 with destination and mode bits.
    pub address: u64,
    /// Data: vector, delivery mode, level and trigger bits.
    pub data: u32,
}

/// Where the I/O APIC sends interrupts.
pub trait MsiSink: Send + Sync {
    /// Delivers one MSI, the message of pin `pin`, to the local APICs.
    fn send(&self, pin: usize, msg: MsiMessage) -> io::Result<()>;
    /// Tells the sink that pin `pin` now routes to `route` (None: masked).
    /// The VMM uses level-triggered routes to get the guest's EOIs back.
    fn route_changed(&self, pin: usize, route: Option<MsiMessage>);
}

/// The I/O APIC state.
pub struct IoApic {
    id: u32,
    select: u32,
    redirection: [u64; NUM_PINS],
    /// The current level of each input line (for level-triggered sources).
    line: [bool; NUM_PINS],
    sink: Arc<dyn MsiSink>,
    log: LogLimiter,
}

impl IoApic {
    /// Creates an I/O APIC with every pin masked, as after reset.
    pub fn new(id: u8, sink: Arc<dyn MsiSink>) -> Self {
        Self {
            id: u32::from(id) << 24,
            select: 0,
            redirection: [MASKED; NUM_PINS],
            line: [false; NUM_PINS],
            sink,
            log: LogLimiter::new("ioapic".into()),
        }
    }

    fn msi(entry: u64) -> MsiMessage {
        let dest = (entry >> DEST_SHIFT) & 0xff;
        let logical = entry & DEST_MODE_LOGICAL != 0;
        let address = 0xfee0_0000 | (dest << 12) | (u64::from(logical) << 2);
        let delivery_mode = (entry >> DELIVERY_MODE_SHIFT) & 0x7;
        let level = entry & TRIGGER_LEVEL != 0;
        let data = (entry & VECTOR_MASK) | (delivery_mode << 8) | (1 << 14) | (u64::from(level) << 15);
        MsiMessage {
            address,
            data: data as u32,
        }
    }

    fn deliver(&mut self, pin: usize) {
        let entry = self.redirection[pin];
        if entry & MASKED != 0 {
            return;
        }
        if entry & TRIGGER_LEVEL != 0 {
            if entry & REMOTE_IRR != 0 {
                return; // The guest has not acknowledged the last one yet.
            }
            self.redirection[pin] |= REMOTE_IRR;
        }
        if let Err(e) = self.sink.send(pin, Self::msi(entry)) {
            self.log.warn(format_args!("delivering pin {pin} failed: {e}"));
        }
    }

    /// An edge on `pin` (a device's interrupt pulse). On a level-triggered
    /// entry it counts as a pulse of the line.
    pub fn pulse(&mut self, pin: usize) {
        if pin < NUM_PINS {
            self.deliver(pin);
        }
    }

    /// Sets the level of a level-sensitive input line.
    pub fn set_level(&mut self, pin: usize, asserted: bool) {
        if pin >= NUM_PINS {
            return;
        }
        let rising = asserted && !self.line[pin];
        self.line[pin] = asserted;
        let level_triggered = self.redirection[pin] & TRIGGER_LEVEL != 0;
        if rising || (asserted && level_triggered) {
            self.deliver(pin);
        }
    }

    /// The guest's EOI for `vector` (KVM_EXIT_IOAPIC_EOI): clears remote IRR
    /// of the level-triggered pins on that vector, and fires again those
    /// whose line is still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for pin in 0..NUM_PINS {
            let entry = self.redirection[pin];
            if entry & TRIGGER_LEVEL != 0 && entry & VECTOR_MASK == u64::from(vector) {
                self.redirection[pin] &= !REMOTE_IRR;
                if self.line[pin] {
                    self.deliver(pin);
                }
            }
        }
    }

    /// The raw redirection entry of a pin, for tests and diagnostics.
    pub fn redirection_entry(&self, pin: usize) -> Option<u64> {
        self.redirection.get(pin).copied()
    }

    fn read_register(&mut self) -> u32 {
        match self.select {
            REG_ID => self.id,
            REG_VERSION => ((NUM_PINS as u32 - 1) << 16) | VERSION,
            REG_ARBITRATION => self.id,
            r if r >= REG_REDIR_BASE && ((r - REG_REDIR_BASE) / 2) < NUM_PINS as u32 => {
                let entry = self.redirection[((r - REG_REDIR_BASE) / 2) as usize];
                if r % 2 == 0 {
                    entry as u32
                } else {
                    (entry >> 32) as u32
                }
            }
            r => {
                self.log.debug(format_args!("read of unknown register {r:#x}"));
                0
            }
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.select {
            REG_ID => self.id = value & 0x0f00_0000,
            r if r >= REG_REDIR_BASE && ((r - REG_REDIR_BASE) / 2) < NUM_PINS as u32 => {
                let pin = ((r - REG_REDIR_BASE) / 2) as usize;
                let old = self.redirection[pin];
                let new = if r % 2 == 0 {
                    (old & !0xffff_ffff) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                let new = (new & !READ_ONLY_BITS) | (old & READ_ONLY_BITS);
                // An edge-triggered entry has no remote IRR.
                let new = if new & TRIGGER_LEVEL == 0 {
                    new & !REMOTE_IRR
                } else {
                    new
                };
                self.redirection[pin] = new;
                if new != old {
                    let route = (new & MASKED == 0).then(|| Self::msi(new));
                    self.sink.route_changed(pin, route);
                }
                // Unmasking a level-triggered pin whose line is up fires it.
                if old & MASKED != 0 && new & MASKED == 0 && new & TRIGGER_LEVEL != 0 && self.line[pin] {
                    self.deliver(pin);
                }
            }
            r => self
                .log
                .debug(format_args!("write of read-only or unknown register {r:#x}")),
        }
    }
}

impl BusDevice for IoApic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (IOREGSEL, 4) => self.select,
            (IOWIN, 4) => self.read_register(),
            _ => {
                self.log.debug(format_args!(
                    "ignored {}-byte read at offset {offset:#x}",
                    data.len()
                ));
                0
            }
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.log.debug(format_args!(
                "ignored {}-byte write at offset {offset:#x}",
                data.len()
            ));
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.select = value & 0xff,
            IOWIN => self.write_register(value),
            _ => self
                .log
                .debug(format_args!("ignored write at offset {offset:#x}")),
        }
    }
}

impl InterruptController for Mutex<IoApic> {
    fn pulse(&self, pin: usize) {
        lock(self).pulse(pin);
    }

    fn set_level(&self, pin: usize, asserted: bool) {
        lock(self).set_level(pin, asserted);
    }
}

/// Errors restoring an I/O APIC.
#[derive(Debug, thiserror::Error)]
pub enum IoApicStateError {
    /// The state has another number of pins.
    #[error("I/O APIC state has {found} pins, this I/O APIC has {NUM_PINS}")]
    Pins { found: usize },
}

/// The I/O APIC's state, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoApicState {
    /// The ID register.
    pub id: u32,
    /// IOREGSEL.
    pub select: u32,
    /// The redirection table.
    pub redirection: Vec<u64>,
    /// The level of each input line.
    pub line: Vec<bool>,
}

impl IoApic {
    /// Its state, for a snapshot.
    pub fn state(&self) -> IoApicState {
        IoApicState {
            id: self.id,
            select: self.select,
            redirection: self.redirection.to_vec(),
            line: self.line.to_vec(),
        }
    }

    /// Sets a fresh I/O APIC to `state` (untrusted: checked), telling the
    /// sink every unmasked route, as the guest's writes would have.
    pub fn restore(&mut self, state: &IoApicState) -> Result<(), IoApicStateError> {
        let redirection: [u64; NUM_PINS] =
            state
                .redirection
                .as_slice()
                .try_into()
                .map_err(|_| IoApicStateError::Pins {
                    found: state.redirection.len(),
                })?;
        let line: [bool; NUM_PINS] =
            state
                .line
                .as_slice()
                .try_into()
                .map_err(|_| IoApicStateError::Pins {
                    found: state.line.len(),
                })?;
        self.id = state.id;
        self.select = state.select & 0xff;
        for (pin, entry) in redirection.iter().enumerate() {
            // Read-only bits beyond what the guest can set are kept as
            // saved: remote IRR says a level interrupt awaits its EOI.
            self.redirection[pin] = *entry;
            if entry & MASKED == 0 {
                self.sink.route_changed(pin, Some(Self::msi(*entry)));
            }
        }
        self.line = line;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Records what the I/O APIC sends.
    #[derive(Default)]
    pub(crate) struct RecordingSink {
        pub sent: Mutex<Vec<MsiMessage>>,
        pub routes: Mutex<Vec<(usize, Option<MsiMessage>)>>,
    }

    impl MsiSink for RecordingSink {
        fn send(&self, _pin: usize, msg: MsiMessage) -> io::Result<()> {
            self.sent.lock().unwrap().push(msg);
            Ok(())
        }
        fn route_changed(&self, pin: usize, route: Option<MsiMessage>) {
            self.routes.lock().unwrap().push((pin, route));
        }
    }

    fn ioapic() -> (IoApic, Arc<RecordingSink>) {
        let sink = Arc::new(RecordingSink::default());
        (IoApic::new(2, sink.clone()), sink)
    }

    fn write_reg(io: &mut IoApic, reg: u32, value: u32) {
        io.write(IOREGSEL, &reg.to_le_bytes());
        io.write(IOWIN, &value.to_le_bytes());
    }

    fn read_reg(io: &mut IoApic, reg: u32) -> u32 {
        io.write(IOREGSEL, &reg.to_le_bytes());
        let mut d = [0u8; 4];
        io.read(IOWIN, &mut d);
        u32::from_le_bytes(d)
    }

    fn program(io: &mut IoApic, pin: u32, low: u32, dest: u8) {
        write_reg(io, REG_REDIR_BASE + 2 * pin + 1, u32::from(dest) << 24);
        write_reg(io, REG_REDIR_BASE + 2 * pin, low);
    }

    #[test]
    fn identification_registers() {
        let (mut io, _) = ioapic();
        assert_eq!(read_reg(&mut io, REG_ID), 2 << 24);
        assert_eq!(read_reg(&mut io, REG_VERSION), (23 << 16) | 0x11);
        // Pins start masked.
        assert_eq!(read_reg(&mut io, REG_REDIR_BASE), MASKED as u32);
        // Unknown registers read as zero.
        assert_eq!(read_reg(&mut io, 0x80), 0);
    }

    #[test]
    fn masked_pins_do_not_fire() {
        let (mut io, sink) = ioapic();
        io.pulse(4);
        assert!(sink.sent.lock().unwrap().is_empty());
    }

    #[test]
    fn edge_pin_becomes_msi_for_its_entry() {
        let (mut io, sink) = ioapic();
        program(&mut io, 4, 0x34, 3); // vector 0x34, fixed, physical, edge, unmasked
        io.pulse(4);
        io.pulse(4);
        let sent = sink.sent.lock().unwrap();
        assert_eq!(sent.len(), 2, "every edge is delivered");
        assert_eq!(sent[0].address, 0xfee0_3000);
        assert_eq!(sent[0].data, 0x34 | (1 << 14));
        let routes = sink.routes.lock().unwrap();
        assert_eq!(routes.last(), Some(&(4, Some(sent[0]))));
    }

    #[test]
    fn level_pin_waits_for_eoi() {
        let (mut io, sink) = ioapic();
        program(&mut io, 9, 0x41 | TRIGGER_LEVEL as u32, 0);
        io.set_level(9, true);
        io.set_level(9, true);
        assert_eq!(sink.sent.lock().unwrap().len(), 1, "remote IRR holds the second");
        assert_ne!(read_reg(&mut io, REG_REDIR_BASE + 18) & REMOTE_IRR as u32, 0);
        // EOI for another vector changes nothing.
        io.end_of_interrupt(0x42);
        assert_eq!(sink.sent.lock().unwrap().len(), 1);
        // EOI with the line still up fires again.
        io.end_of_interrupt(0x41);
        assert_eq!(sink.sent.lock().unwrap().len(), 2);
        assert_eq!(
            sink.sent.lock().unwrap()[1].data & (1 << 15),
            1 << 15,
            "level bit set"
        );
        // Line down, EOI: nothing more.
        io.set_level(9, false);
        io.end_of_interrupt(0x41);
        assert_eq!(sink.sent.lock().unwrap().len(), 2);
        assert_eq!(read_reg(&mut io, REG_REDIR_BASE + 18) & REMOTE_IRR as u32, 0);
    }

    #[test]
    fn unmasking_an_asserted_level_pin_fires_it() {
        let (mut io, sink) = ioapic();
        io.set_level(5, true);
        assert!(sink.sent.lock().unwrap().is_empty());
        program(&mut io, 5, 0x50 | TRIGGER_LEVEL as u32, 0);
        assert_eq!(sink.sent.lock().unwrap().len(), 1);
    }

    #[test]
    fn guest_cannot_set_read_only_bits_or_reach_outside_the_table() {
        let (mut io, sink) = ioapic();
        program(&mut io, 1, 0x30 | (REMOTE_IRR | DELIVERY_STATUS) as u32, 0);
        assert_eq!(read_reg(&mut io, REG_REDIR_BASE + 2) & (READ_ONLY_BITS as u32), 0);
        // Pin 24 does not exist: registers 0x40/0x41 are ignored.
        write_reg(&mut io, REG_REDIR_BASE + 48, 0x20);
        assert_eq!(read_reg(&mut io, REG_REDIR_BASE + 48), 0);
        io.pulse(24);
        io.set_level(99, true);
        // Odd-sized and misplaced accesses are ignored.
        io.write(IOWIN, &[1, 2]);
        io.write(0x20, &7u32.to_le_bytes());
        let mut d = [0xff; 8];
        io.read(IOWIN, &mut d);
        assert_eq!(d, [0; 8]);
        assert!(sink.sent.lock().unwrap().is_empty());
    }

    #[test]
    fn logical_destination_and_delivery_mode_reach_the_msi() {
        let (mut io, sink) = ioapic();
        // Lowest priority (1), logical destination 0x0f.
        program(&mut io, 2, 0x61 | (1 << 8) | DEST_MODE_LOGICAL as u32, 0x0f);
        io.pulse(2);
        let msg = sink.sent.lock().unwrap()[0];
        assert_eq!(msg.address, 0xfee0_f004);
        assert_eq!(msg.data, 0x61 | (1 << 8) | (1 << 14));
    }

    #[test]
    fn state_round_trips_and_reannounces_routes() {
        let (mut io, _) = ioapic();
        program(&mut io, 4, 0x31, 0);
        program(&mut io, 9, 0x41 | (1 << 15), 1);
        let state = io.state();
        let (mut fresh, sink) = ioapic();
        fresh.restore(&state).unwrap();
        assert_eq!(fresh.state(), state);
        assert_eq!(read_reg(&mut fresh, REG_REDIR_BASE + 2 * 4) & 0xff, 0x31);
        let routes = sink.routes.lock().unwrap();
        let pins: Vec<usize> = routes
            .iter()
            .filter(|(_, r)| r.is_some())
            .map(|(p, _)| *p)
            .collect();
        assert_eq!(pins, vec![4, 9]);
    }

    #[test]
    fn a_state_with_the_wrong_pin_count_is_refused() {
        let (io, _) = ioapic();
        let mut state = io.state();
        state.redirection.pop();
        let (mut fresh, _) = ioapic();
        assert!(matches!(
            fresh.restore(&state),
            Err(IoApicStateError::Pins { .. })
        ));
        let mut state = io.state();
        state.line.push(true);
        assert!(fresh.restore(&state).is_err());
    }
}
