//! Interrupt lines: how a device raises its IRQ, whichever interrupt
//! controller the VM has (flatlet's I/O APIC on KVM's split irqchip, or
//! KVM's own I/O APIC).

use std::io;
use std::sync::Arc;

/// An interrupt controller with numbered input pins (GSIs).
pub trait InterruptController: Send + Sync {
    /// An edge on `pin`.
    fn pulse(&self, pin: usize);
    /// The level of `pin`, for level-sensitive sources.
    fn set_level(&self, pin: usize, asserted: bool);
}

/// One controller input, as a device sees it.
#[derive(Clone)]
pub struct IrqLine {
    chip: Arc<dyn InterruptController>,
    pin: usize,
}

impl IrqLine {
    /// The line into `pin` of `chip`.
    pub fn new(chip: Arc<dyn InterruptController>, pin: usize) -> Self {
        Self { chip, pin }
    }

    /// The pin (GSI) this line drives.
    pub fn pin(&self) -> usize {
        self.pin
    }

    /// Sends an edge (a pulse) on the line.
    pub fn pulse(&self) {
        self.chip.pulse(self.pin);
    }

    /// Sets the line's level.
    pub fn set_level(&self, asserted: bool) {
        self.chip.set_level(self.pin, asserted);
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.pulse();
        Ok(())
    }
}
