//! The 8250/16550A UART (COM1 at 0x3f8, IRQ 4), on vm-superio's model.
//!
//! Guest output goes to a writer (the VMM's stdout) as it is written. Host
//! input is queued into the UART's 64-byte FIFO by the VMM thread; when the
//! guest has drained the FIFO, the `input_ready` eventfd tells the VMM to
//! send more, so no input byte is dropped.

use std::io::{self, Write};

use log::warn;
use vm_superio::serial::SerialEvents;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::irq::IrqLine;

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

/// A UART on the port bus.
pub struct Serial {
    uart: vm_superio::Serial<IrqLine, InputEvents, Box<dyn Write + Send>>,
    lost_output: u64,
}

impl Serial {
    /// A UART raising `irq`, writing guest output to `out`, and signalling
    /// `input_ready` (if any) when it can take more input.
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>, input_ready: Option<EventFd>) -> Self {
        Self {
            uart: vm_superio::Serial::with_events(irq, InputEvents { input_ready }, out),
            lost_output: 0,
        }
    }

    /// Queues host input for the guest; returns how many bytes of `input`
    /// the FIFO took (0 when it is full: call again after `input_ready`).
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
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

    /// Flushes the output writer.
    pub fn flush(&mut self) -> io::Result<()> {
        self.uart.writer_mut().flush()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            *byte = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let ([value], Ok(offset)) = (data, u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.uart.write(offset, *value) {
            // Output the host cannot take (a closed pipe, say) is dropped:
            // the guest must never stall or crash the VMM through it. Say
            // so once, then every 64 Ki bytes.
            if self.lost_output % 65536 == 0 {
                warn!(
                    "serial: guest output lost ({} bytes so far): {e:?}",
                    self.lost_output + 1
                );
            }
            self.lost_output += 1;
        }
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
        assert_eq!(s.lost_output, 3);
        s.write(0, b"xy");
        s.write(0x1_0000, b"x");
        let mut d = [0xffu8; 2];
        s.read(0, &mut d);
        assert_eq!(d, [0, 0]);
    }
}
