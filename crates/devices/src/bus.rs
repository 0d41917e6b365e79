//! Address buses: the port I/O bus and the MMIO bus that vCPU exits are
//! dispatched on.
//!
//! A bus maps non-overlapping address ranges to devices. An access is
//! dispatched only when it lies wholly inside one device's range; the device
//! sees the offset from the start of its range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// A device on a bus.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` within the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` within the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared, lockable bus device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors of building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange { base: u64, len: u64 },
    /// The range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other_base:#x}+{other_len:#x}")]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A bus: address ranges mapped to devices.
#[derive(Clone, Default)]
pub struct Bus {
    // Keyed by the base address of each range.
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        // The closest range starting at or below the new end can overlap.
        if let Some((&other_base, other)) = self.devices.range(..end).next_back() {
            if other_base + other.len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len: other.len,
                });
            }
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device whose range holds all of `[addr, addr + len)`, with the
    /// offset of `addr` in it.
    fn resolve(&self, addr: u64, len: usize) -> Option<(&Entry, u64)> {
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(len as u64)?;
        (end <= entry.len).then_some((entry, offset))
    }

    /// Dispatches a read. Returns false, leaving `data` untouched, when no
    /// device covers the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write. Returns false when no device covers the whole
    /// access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, going on when another thread panicked while holding it:
/// device state stays usable, and a VMM must not cascade one failure into
/// every vCPU.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access; reads return the offset's low byte.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe::default()))
    }

    #[test]
    fn dispatches_with_offset_inside_range() {
        let mut bus = Bus::new();
        let a = probe();
        let b = probe();
        bus.insert(a.clone(), 0x100, 0x10).unwrap();
        bus.insert(b.clone(), 0x110, 0x10).unwrap();

        let mut data = [0u8; 2];
        assert!(bus.read(0x105, &mut data));
        assert_eq!(data, [5, 5]);
        assert!(bus.write(0x11e, &[1, 2]));
        assert_eq!(b.lock().unwrap().last_write, Some((0xe, vec![1, 2])));
        assert_eq!(a.lock().unwrap().last_write, None);
    }

    #[test]
    fn rejects_accesses_outside_or_across_ranges() {
        let mut bus = Bus::new();
        bus.insert(probe(), 0x100, 0x10).unwrap();
        let mut data = [0xaa; 4];
        assert!(!bus.read(0xff, &mut data[..1]));
        assert!(!bus.read(0x110, &mut data[..1]));
        // Starts inside, ends outside.
        assert!(!bus.read(0x10e, &mut data));
        assert_eq!(data, [0xaa; 4], "a refused read leaves the buffer alone");
        assert!(!bus.write(u64::MAX, &[0; 4]));
        assert!(!Bus::new().read(0, &mut data));
    }

    #[test]
    fn refuses_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        bus.insert(probe(), 0x100, 0x10).unwrap();
        for (base, len) in [(0x100, 1), (0xf8, 0x10), (0x10f, 4), (0x0, 0x1000)] {
            assert!(
                matches!(bus.insert(probe(), base, len), Err(BusError::Overlap { .. })),
                "{base:#x}+{len:#x}"
            );
        }
        assert_eq!(
            bus.insert(probe(), 0x200, 0),
            Err(BusError::InvalidRange { base: 0x200, len: 0 })
        );
        assert!(matches!(
            bus.insert(probe(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
        // Touching ranges are fine.
        bus.insert(probe(), 0xf0, 0x10).unwrap();
        bus.insert(probe(), 0x110, 0x10).unwrap();
    }
}
