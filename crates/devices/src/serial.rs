//! The 8250/16550A UART (COM1 at 0x3f8, IRQ 4), on vm-superio's model.
//!
//! Guest output is written on the vCPU thread, with the UART's lock held,
//! so it must never wait for the host's console: it goes into a bounded
//! buffer ([`ConsoleOutput`], [`OUTPUT_BUFFER`] bytes) in front of a
//! non-blocking writer (the VMM's stdout). The buffer is written out as
//! far as the writer takes it at each UART access; what does not fit in
//! the buffer is dropped and counted (`missed_write_count`, as
//! Firecracker's `uart` metrics). A stdout nobody reads thus costs guest
//! output, never a stalled vCPU.
//!
//! Host input is queued into the UART's 64-byte FIFO by the VMM thread;
//! when the guest has drained the FIFO, the `input_ready` eventfd tells the
//! VMM to send more, so no input byte is dropped.

use std::collections::VecDeque;
use std::io::{self, Write};

use log::warn;
use vm_superio::serial::SerialEvents;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::irq::IrqLine;
use crate::ratelimit::LogLimiter;

/// Port of COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// Number of ports of a UART.
pub const COM_PORT_LEN: u64 = 8;
/// IRQ (I/O APIC pin) of COM1.
pub const COM1_IRQ: usize = 4;

/// Signals the VMM when the guest has emptied the receive FIFO.
pub struct InputEvents {
    input_ready: Option<EventFd>,
}

impl SerialEvents for InputEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Some(evt) = &self.input_ready {
            if let Err(e) = evt.write(1) {
                warn!("serial: cannot signal input space: {e}");
            }
        }
    }
}

/// Guest output the buffer holds at most while the host's console takes
/// none.
pub const OUTPUT_BUFFER: usize = 64 * 1024;

/// Guest output on its way to the host: a bounded buffer in front of a
/// writer that must not block (a non-blocking file, or a regular file).
///
/// Writes go into the buffer (what does not fit is dropped and counted);
/// `flush` (vm-superio calls it after each byte) writes the buffer out as
/// far as the writer takes it now, and keeps the rest for later.
pub struct ConsoleOutput {
    out: Box<dyn Write + Send>,
    buf: VecDeque<u8>,
    capacity: usize,
    /// Bytes the guest wrote.
    accepted: u64,
    /// Bytes dropped: the buffer was full, or the writer failed.
    missed: u64,
    log: LogLimiter,
}

impl ConsoleOutput {
    /// A buffer of `capacity` bytes in front of `out`.
    pub fn new(out: Box<dyn Write + Send>, capacity: usize) -> Self {
        Self {
            out,
            buf: VecDeque::new(),
            capacity,
            accepted: 0,
            missed: 0,
            log: LogLimiter::new("serial".into()),
        }
    }

    /// Writes out what the writer takes now.
    pub fn drain(&mut self) {
        while !self.buf.is_empty() {
            let (front, _) = self.buf.as_slices();
            match self.out.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    self.buf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // A closed pipe, a full disk: what waits is lost.
                    self.missed += self.buf.len() as u64;
                    self.buf.clear();
                    self.log.warn(format_args!(
                        "guest output lost ({} bytes so far): {e}",
                        self.missed
                    ));
                }
            }
        }
    }

    /// Bytes waiting for the writer.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Bytes dropped so far.
    pub fn missed(&self) -> u64 {
        self.missed
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let take = data.len().min(self.capacity.saturating_sub(self.buf.len()));
        self.buf.extend(&data[..take]);
        self.accepted += data.len() as u64;
        self.missed += (data.len() - take) as u64;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.drain();
        Ok(())
    }
}

impl Drop for ConsoleOutput {
    fn drop(&mut self) {
        // A last try, without waiting: flatlet is ending.
        self.drain();
        let _ = self.out.flush();
    }
}

/// A UART on the port bus.
pub struct Serial {
    uart: vm_superio::Serial<IrqLine, InputEvents, ConsoleOutput>,
    log: LogLimiter,
}

impl Serial {
    /// A UART raising `irq`, writing guest output to `out` (which must not
    /// block: a non-blocking or regular file) through a buffer of
    /// [`OUTPUT_BUFFER`] bytes, and signalling `input_ready` (if any) when
    /// it can take more input.
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>, input_ready: Option<EventFd>) -> Self {
        Self::with_buffer(irq, out, input_ready, OUTPUT_BUFFER)
    }

    /// The same, with an output buffer of `capacity` bytes.
    pub fn with_buffer(
        irq: IrqLine,
        out: Box<dyn Write + Send>,
        input_ready: Option<EventFd>,
        capacity: usize,
    ) -> Self {
        let out = ConsoleOutput::new(out, capacity);
        Self {
            uart: vm_superio::Serial::with_events(irq, InputEvents { input_ready }, out),
            log: LogLimiter::new("serial".into()),
        }
    }

    /// The counters, for metrics (Firecracker's `uart` names).
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let out = self.uart.writer();
        vec![("write_count", out.accepted), ("missed_write_count", out.missed)]
    }

    /// Writes out buffered guest output, as far as the host takes it now.
    fn drain_output(&mut self) {
        let out = self.uart.writer_mut();
        if out.pending() > 0 {
            out.drain();
        }
    }

    /// Queues host input for the guest; returns how many bytes of `input`
    /// the FIFO took (0 when it is full: call again after `input_ready`).
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        self.drain_output();
        if self.uart.fifo_capacity() == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(e) => {
                warn!("serial: cannot queue input: {e:?}");
                0
            }
        }
    }

    /// Room left in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Writes out buffered output as far as the host takes it now.
    pub fn flush(&mut self) -> io::Result<()> {
        self.uart.writer_mut().flush()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // A guest polling the line status gets its earlier output out.
        self.drain_output();
        data.fill(0);
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            *byte = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let ([value], Ok(offset)) = (data, u8::try_from(offset)) else {
            return;
        };
        if offset != 0 {
            // (A data write drains after queueing its byte.)
            self.drain_output();
        }
        // The output buffer takes every byte (dropping what does not fit);
        // what can fail is raising the interrupt.
        if let Err(e) = self.uart.write(offset, *value) {
            self.log.warn(format_args!("register write: {e:?}"));
        }
    }
}

/// Errors restoring the UART.
#[derive(Debug, thiserror::Error)]
pub enum SerialStateError {
    /// The saved receive FIFO is larger than the UART's.
    #[error("serial state: the receive FIFO holds more than the UART's 64 bytes")]
    FifoTooLarge,
    /// The interrupt of the restored state could not be raised.
    #[error("serial state: raising its interrupt failed")]
    Interrupt,
}

/// The UART's registers and receive FIFO, for snapshots (vm-superio's
/// `SerialState`, as a serde struct).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialDeviceState {
    /// DLL, DLM.
    pub baud_divisor: [u8; 2],
    /// IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub registers: [u8; 7],
    /// Received bytes the guest has not read.
    pub in_buffer: Vec<u8>,
}

impl Serial {
    /// Its state, for a snapshot (buffered output is the host's, not
    /// the guest's: it is not saved).
    pub fn state(&self) -> SerialDeviceState {
        let s = self.uart.state();
        SerialDeviceState {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            registers: [
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in `state` (untrusted: checked), otherwise as [`Serial::new`].
    pub fn from_state(
        irq: IrqLine,
        out: Box<dyn Write + Send>,
        input_ready: Option<EventFd>,
        state: &SerialDeviceState,
    ) -> Result<Self, SerialStateError> {
        let [ier, iir, lcr, lsr, mcr, msr, scr] = state.registers;
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor[0],
            baud_divisor_high: state.baud_divisor[1],
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch: scr,
            in_buffer: state.in_buffer.clone(),
        };
        let out = ConsoleOutput::new(out, OUTPUT_BUFFER);
        let uart = vm_superio::Serial::from_state(&s, irq, InputEvents { input_ready }, out).map_err(
            |e| match e {
                vm_superio::serial::Error::FullFifo => SerialStateError::FifoTooLarge,
                _ => SerialStateError::Interrupt,
            },
        )?;
        Ok(Self {
            uart,
            log: LogLimiter::new("serial".into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ioapic::IoApic;
    use crate::ioapic::tests::RecordingSink;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A pipe nobody reads: it takes `room` bytes, then would block.
    #[derive(Clone, Default)]
    struct Pipe {
        room: Arc<Mutex<usize>>,
        got: SharedBuf,
    }
    impl Write for Pipe {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let mut room = self.room.lock().unwrap();
            if *room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = b.len().min(*room);
            *room -= n;
            self.got.write(&b[..n])
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn line() -> IrqLine {
        let sink = Arc::new(RecordingSink::default());
        IrqLine::new(Arc::new(Mutex::new(IoApic::new(0, sink))), COM1_IRQ)
    }

    #[test]
    fn guest_output_reaches_the_writer() {
        let buf = SharedBuf::default();
        let mut s = Serial::new(line(), Box::new(buf.clone()), None);
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn input_is_queued_read_back_and_signals_when_drained() {
        let ready = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(
            line(),
            Box::new(SharedBuf::default()),
            Some(ready.try_clone().unwrap()),
        );
        let big = [b'x'; 100];
        let took = s.enqueue_input(&big);
        assert_eq!(took, 64, "the FIFO holds 64 bytes");
        assert_eq!(s.enqueue_input(&big), 0, "a full FIFO takes nothing");
        assert!(ready.read().is_err(), "not drained yet");
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        for _ in 0..64 {
            let mut b = [0u8];
            s.read(0, &mut b);
            assert_eq!(b[0], b'x');
        }
        assert_eq!(ready.read().unwrap(), 1, "drained FIFO is signalled");
        assert_eq!(s.input_capacity(), 64);
    }

    #[test]
    fn broken_output_and_odd_accesses_do_not_panic() {
        let mut s = Serial::new(line(), Box::new(Broken), None);
        for _ in 0..3 {
            s.write(0, b"x");
        }
        assert_eq!(s.uart.writer().missed(), 3);
        assert!(s.counters().contains(&("missed_write_count", 3)));
        s.write(0, b"xy");
        s.write(0x1_0000, b"x");
        let mut d = [0xffu8; 2];
        s.read(0, &mut d);
        assert_eq!(d, [0, 0]);
    }

    #[test]
    fn output_nobody_reads_is_buffered_then_dropped_and_counted() {
        let pipe = Pipe::default();
        *pipe.room.lock().unwrap() = 100;
        let mut s = Serial::with_buffer(line(), Box::new(pipe.clone()), None, 1000);
        const N: usize = 100_000;
        let start = std::time::Instant::now();
        for i in 0..N {
            s.write(0, &[b'a' + (i % 26) as u8]);
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(pipe.got.0.lock().unwrap().len(), 100, "what the pipe took");
        assert_eq!(s.uart.writer().pending(), 1000, "the buffer is full");
        assert!(s.counters().contains(&("write_count", N as u64)));
        assert!(s.counters().contains(&("missed_write_count", (N - 1100) as u64)));
        // Once the reader reads, the next access writes the buffer out,
        // in order after what went before.
        *pipe.room.lock().unwrap() = usize::MAX;
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        let got = pipe.got.0.lock().unwrap().clone();
        assert_eq!(got.len(), 1100);
        let expected: Vec<u8> = (0..1100).map(|i| b'a' + (i % 26) as u8).collect();
        assert_eq!(got, expected);
        assert_eq!(s.uart.writer().pending(), 0);
    }

    #[test]
    fn buffered_output_is_written_out_when_the_uart_goes() {
        let pipe = Pipe::default();
        let s = {
            let mut s = Serial::with_buffer(line(), Box::new(pipe.clone()), None, 1000);
            for b in b"bye\n" {
                s.write(0, &[*b]);
            }
            s
        };
        assert!(pipe.got.0.lock().unwrap().is_empty());
        *pipe.room.lock().unwrap() = usize::MAX;
        drop(s);
        assert_eq!(&*pipe.got.0.lock().unwrap(), b"bye\n");
    }

    #[test]
    fn state_round_trips_with_pending_input() {
        let mut s = Serial::new(line(), Box::new(io::sink()), None);
        s.write(3, &[0x83]); // LCR: DLAB on
        s.write(0, &[0x0c]); // divisor 12
        s.write(3, &[0x03]);
        s.write(7, &[0x5a]); // scratch
        assert_eq!(s.enqueue_input(b"hi"), 2);
        let state = s.state();
        assert_eq!(state.baud_divisor[0], 0x0c);
        let mut r = Serial::from_state(line(), Box::new(io::sink()), None, &state).unwrap();
        assert_eq!(r.state(), state);
        let mut b = [0u8];
        r.read(0, &mut b);
        assert_eq!(b[0], b'h');
    }

    #[test]
    fn an_oversized_fifo_is_refused() {
        let s = Serial::new(line(), Box::new(io::sink()), None);
        let mut state = s.state();
        state.in_buffer = vec![0; 65];
        assert!(matches!(
            Serial::from_state(line(), Box::new(io::sink()), None, &state),
            Err(SerialStateError::FifoTooLarge)
        ));
    }
}
