//! The i8042 keyboard controller: enough of it for a guest to reset the
//! machine (command 0xfe, or output-port bit 0 cleared) and to receive
//! Ctrl-Alt-Del, and for Linux's i8042 driver to probe it quickly.
//!
//! Ports 0x60 (data) and 0x64 (status on read, command on write); the
//! device spans 0x60-0x64, and reads of 0x61-0x63 return 0.

use std::collections::VecDeque;

use log::debug;

use crate::bus::BusDevice;
use crate::irq::IrqLine;
use crate::ratelimit::LogLimiter;

/// First port of the controller.
pub const I8042_PORT: u64 = 0x60;
/// Ports it spans (0x60 to 0x64).
pub const I8042_PORT_LEN: u64 = 5;
/// IRQ (I/O APIC pin) of the keyboard.
pub const KBD_IRQ: usize = 1;

const OFFSET_DATA: u64 = 0;
const OFFSET_STATUS_COMMAND: u64 = 4;

const SB_OUT_FULL: u8 = 0x01;
const SB_SYSTEM: u8 = 0x04;
const SB_COMMAND: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

const CB_KBD_INT: u8 = 0x01;
const CB_SYSTEM: u8 = 0x04;
const CB_TRANSLATE: u8 = 0x40;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_KBD_OUT: u8 = 0xd2;
const CMD_RESET_CPU: u8 = 0xfe;

const KBD_ACK: u8 = 0xfa;
const KBD_RESET_OK: u8 = 0xaa;
const KBD_RESET: u8 = 0xff;
const KBD_IDENTIFY: u8 = 0xf2;
const KBD_SET_LEDS: u8 = 0xed;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_SET_RATE: u8 = 0xf3;

/// Set-2 scancodes of the Ctrl, Alt and Delete make codes, as Firecracker
/// sends them for `SendCtrlAltDel`.
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

/// Output buffer limit: keystrokes beyond it are refused, not queued forever.
const BUFFER_LIMIT: usize = 16;

/// Errors of the i8042.
#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    /// The keyboard buffer is full: the guest is not reading it.
    #[error("i8042 keyboard buffer is full; the guest is not reading it")]
    BufferFull,
}

/// What a data-port write means after the last command.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pending {
    None,
    ControllerByte,
    OutputPort,
    KeyboardOutput,
    KeyboardArgument,
}

/// The i8042 controller.
pub struct I8042 {
    status: u8,
    control: u8,
    output_port: u8,
    pending: Pending,
    buffer: VecDeque<u8>,
    on_reset: Box<dyn FnMut() + Send>,
    irq: IrqLine,
    log: LogLimiter,
}

impl I8042 {
    /// A controller that calls `on_reset` when the guest resets the
    /// machine, and raises `irq` when it has a byte for the guest.
    /// `on_reset` runs on the vCPU thread, within the guest's write: the
    /// VMM can stop that vCPU before it runs another instruction.
    pub fn new(on_reset: Box<dyn FnMut() + Send>, irq: IrqLine) -> Self {
        Self {
            status: SB_SYSTEM | SB_KBD_ENABLED,
            control: CB_KBD_INT | CB_SYSTEM | CB_TRANSLATE,
            output_port: 0x01,
            pending: Pending::None,
            buffer: VecDeque::new(),
            on_reset,
            irq,
            log: LogLimiter::new("i8042".into()),
        }
    }

    /// Sends the Ctrl-Alt-Del key sequence to the guest.
    pub fn trigger_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        if self.buffer.len() + CTRL_ALT_DEL.len() > BUFFER_LIMIT {
            return Err(I8042Error::BufferFull);
        }
        for b in CTRL_ALT_DEL {
            self.push(b);
        }
        Ok(())
    }

    fn push(&mut self, byte: u8) {
        if self.buffer.len() >= BUFFER_LIMIT {
            self.log.debug(format_args!("buffer full, dropping {byte:#x}"));
            return;
        }
        self.buffer.push_back(byte);
        self.status |= SB_OUT_FULL;
        if self.control & CB_KBD_INT != 0 {
            self.irq.pulse();
        }
    }

    fn pop(&mut self) -> u8 {
        let byte = self.buffer.pop_front().unwrap_or(0);
        if self.buffer.is_empty() {
            self.status &= !SB_OUT_FULL;
        } else if self.control & CB_KBD_INT != 0 {
            // One interrupt per byte, as the hardware does.
            self.irq.pulse();
        }
        byte
    }

    fn reset(&mut self) {
        debug!("i8042: guest requested a reset");
        (self.on_reset)();
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_COMMAND;
        self.pending = Pending::None;
        match cmd {
            CMD_READ_CTR => self.push(self.control),
            CMD_WRITE_CTR => self.pending = Pending::ControllerByte,
            CMD_READ_OUTP => self.push(self.output_port),
            CMD_WRITE_OUTP => self.pending = Pending::OutputPort,
            CMD_WRITE_KBD_OUT => self.pending = Pending::KeyboardOutput,
            CMD_SELF_TEST => self.push(0x55),
            CMD_TEST_KBD | CMD_TEST_AUX => self.push(0x00),
            CMD_DISABLE_KBD => self.status &= !SB_KBD_ENABLED,
            CMD_ENABLE_KBD => self.status |= SB_KBD_ENABLED,
            CMD_DISABLE_AUX | CMD_ENABLE_AUX => {}
            CMD_RESET_CPU => self.reset(),
            // 0xf0-0xff pulse output-port lines low; bit 0 is the reset line.
            c if c & 0xf0 == 0xf0 && c & 0x01 == 0 => self.reset(),
            c => self.log.debug(format_args!("ignored command {c:#x}")),
        }
    }

    fn data(&mut self, value: u8) {
        self.status &= !SB_COMMAND;
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::ControllerByte => {
                self.control = value;
                self.status = (self.status & !SB_SYSTEM) | (value & CB_SYSTEM);
            }
            Pending::OutputPort => {
                self.output_port = value;
                if value & 0x01 == 0 {
                    self.reset();
                }
            }
            Pending::KeyboardOutput => self.push(value),
            Pending::KeyboardArgument => self.push(KBD_ACK),
            Pending::None => self.keyboard_command(value),
        }
    }

    fn keyboard_command(&mut self, value: u8) {
        match value {
            KBD_RESET => {
                self.push(KBD_ACK);
                self.push(KBD_RESET_OK);
            }
            KBD_IDENTIFY => {
                self.push(KBD_ACK);
                self.push(0xab);
                self.push(0x83);
            }
            KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_SET_RATE => {
                self.push(KBD_ACK);
                self.pending = Pending::KeyboardArgument;
            }
            _ => self.push(KBD_ACK),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let [byte] = data else { return };
        *byte = match offset {
            OFFSET_DATA => self.pop(),
            OFFSET_STATUS_COMMAND => self.status,
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        match offset {
            OFFSET_DATA => self.data(*value),
            OFFSET_STATUS_COMMAND => self.command(*value),
            _ => {}
        }
    }
}

/// Errors restoring the i8042.
#[derive(Debug, thiserror::Error)]
pub enum I8042StateError {
    /// A field out of range.
    #[error("i8042 state: {0}")]
    Invalid(&'static str),
}

/// The i8042's state, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    /// Status register.
    pub status: u8,
    /// Controller configuration byte.
    pub control: u8,
    /// Output port.
    pub output_port: u8,
    /// What the next data-port write means (0-4).
    pub pending: u8,
    /// Bytes waiting for the guest.
    pub buffer: Vec<u8>,
}

impl Pending {
    const ALL: [Pending; 5] = [
        Pending::None,
        Pending::ControllerByte,
        Pending::OutputPort,
        Pending::KeyboardOutput,
        Pending::KeyboardArgument,
    ];
}

impl I8042 {
    /// Its state, for a snapshot.
    pub fn state(&self) -> I8042State {
        I8042State {
            status: self.status,
            control: self.control,
            output_port: self.output_port,
            pending: Pending::ALL.iter().position(|p| *p == self.pending).unwrap_or(0) as u8,
            buffer: self.buffer.iter().copied().collect(),
        }
    }

    /// Sets a fresh controller to `state` (untrusted: checked).
    pub fn restore(&mut self, state: &I8042State) -> Result<(), I8042StateError> {
        let pending = *Pending::ALL
            .get(usize::from(state.pending))
            .ok_or(I8042StateError::Invalid("unknown pending command"))?;
        if state.buffer.len() > BUFFER_LIMIT {
            return Err(I8042StateError::Invalid("output buffer too long"));
        }
        self.status = state.status;
        self.control = state.control;
        self.output_port = state.output_port;
        self.pending = pending;
        self.buffer = state.buffer.iter().copied().collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ioapic::IoApic;
    use crate::ioapic::tests::RecordingSink;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    struct Rig {
        dev: I8042,
        resets: Arc<AtomicUsize>,
        sink: Arc<RecordingSink>,
    }

    fn rig() -> Rig {
        let sink = Arc::new(RecordingSink::default());
        let ioapic = Arc::new(Mutex::new(IoApic::new(0, sink.clone())));
        // Route pin 1 to vector 0x21, unmasked.
        {
            let mut io = ioapic.lock().unwrap();
            io.write(0, &(0x10u32 + 2).to_le_bytes());
            io.write(0x10, &0x21u32.to_le_bytes());
        }
        let resets = Arc::new(AtomicUsize::new(0));
        let counter = resets.clone();
        let on_reset = Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let dev = I8042::new(on_reset, IrqLine::new(ioapic, KBD_IRQ));
        Rig { dev, resets, sink }
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_reset() {
        let mut r = rig();
        assert_eq!(r.resets.load(Ordering::SeqCst), 0);
        r.dev.write(4, &[0xfe]);
        assert_eq!(r.resets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn output_port_reset_line_signals_reset() {
        let mut r = rig();
        r.dev.write(4, &[CMD_WRITE_OUTP]);
        r.dev.write(0, &[0x02]);
        assert_eq!(r.resets.load(Ordering::SeqCst), 1);
        r.dev.write(4, &[0xf0]); // pulse all lines, including reset
        assert_eq!(r.resets.load(Ordering::SeqCst), 2);
        r.dev.write(4, &[0xf1]); // bit 0 not pulsed: no reset
        assert_eq!(r.resets.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn ctrl_alt_del_is_delivered_byte_by_byte_with_interrupts() {
        let mut r = rig();
        r.dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(read(&mut r.dev, 4) & SB_OUT_FULL, SB_OUT_FULL);
        let got: Vec<u8> = (0..4).map(|_| read(&mut r.dev, 0)).collect();
        assert_eq!(got, CTRL_ALT_DEL);
        assert_eq!(read(&mut r.dev, 4) & SB_OUT_FULL, 0);
        // One interrupt for the first byte, then one per further byte read.
        assert_eq!(r.sink.sent.lock().unwrap().len(), 4 + 3);
    }

    #[test]
    fn a_guest_that_never_reads_cannot_grow_the_buffer() {
        let mut r = rig();
        for _ in 0..4 {
            r.dev.trigger_ctrl_alt_del().unwrap();
        }
        assert!(matches!(
            r.dev.trigger_ctrl_alt_del(),
            Err(I8042Error::BufferFull)
        ));
        for _ in 0..100 {
            r.dev.write(0, &[KBD_RESET]);
        }
        assert!(r.dev.buffer.len() <= BUFFER_LIMIT);
    }

    #[test]
    fn controller_byte_and_probing_answers() {
        let mut r = rig();
        r.dev.write(4, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut r.dev, 0), 0x55);
        r.dev.write(4, &[CMD_WRITE_CTR]);
        r.dev.write(0, &[0x00]);
        r.dev.write(4, &[CMD_READ_CTR]);
        assert_eq!(read(&mut r.dev, 0), 0x00);
        // Interrupts are now off: a key press raises none.
        let before = r.sink.sent.lock().unwrap().len();
        r.dev.write(0, &[KBD_RESET]);
        assert_eq!(r.sink.sent.lock().unwrap().len(), before);
        assert_eq!(read(&mut r.dev, 0), KBD_ACK);
        assert_eq!(read(&mut r.dev, 0), KBD_RESET_OK);
        // Set LEDs takes an argument, acknowledged too.
        r.dev.write(0, &[KBD_SET_LEDS]);
        r.dev.write(0, &[0x07]);
        assert_eq!([read(&mut r.dev, 0), read(&mut r.dev, 0)], [KBD_ACK, KBD_ACK]);
        // Odd sizes and reads of 0x61-0x63 are harmless.
        let mut two = [0xffu8; 2];
        r.dev.read(0, &mut two);
        assert_eq!(two, [0, 0]);
        assert_eq!(read(&mut r.dev, 1), 0);
        r.dev.write(4, &[0xfe, 0xfe]);
        assert_eq!(
            r.resets.load(Ordering::SeqCst),
            0,
            "a two-byte write is not a reset command"
        );
    }

    #[test]
    fn state_round_trips_and_bad_states_are_refused() {
        let mut r = rig();
        r.dev.trigger_ctrl_alt_del().unwrap();
        r.dev.write(4, &[CMD_WRITE_CTR]);
        let state = r.dev.state();
        assert_eq!(state.buffer.len(), 4);
        assert_eq!(state.pending, 1);
        let mut fresh = rig();
        fresh.dev.restore(&state).unwrap();
        assert_eq!(fresh.dev.state(), state);
        assert_eq!(read(&mut fresh.dev, 0), 0x14);
        let mut bad = state.clone();
        bad.pending = 9;
        assert!(fresh.dev.restore(&bad).is_err());
        let mut bad = state;
        bad.buffer = vec![0; BUFFER_LIMIT + 1];
        assert!(fresh.dev.restore(&bad).is_err());
    }
}
