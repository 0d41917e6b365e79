//! Guest memory: anonymous private mappings (reserved lazily, so only
//! pages the guest touches cost host memory), split around the 32-bit
//! MMIO window.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::{MMIO32_START, RAM_ABOVE_4G_START};

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused the mapping.
    #[error("cannot map {mib} MiB of guest memory: {reason}")]
    Map { mib: usize, reason: String },
}

/// The guest-physical RAM regions, as (start, length), of a VM with
/// `bytes` of memory.
pub fn ram_regions(bytes: u64) -> Vec<(u64, u64)> {
    let low = bytes.min(MMIO32_START);
    let mut regions = vec![(0, low)];
    if bytes > MMIO32_START {
        regions.push((RAM_ABOVE_4G_START, bytes - MMIO32_START));
    }
    regions
}

/// Maps `mib` MiB of guest memory.
pub fn create(mib: usize) -> Result<GuestMemoryMmap, MemoryError> {
    let bytes = (mib as u64) << 20;
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(bytes)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Map {
        mib,
        reason: e.to_string(),
    })
}

/// The end of RAM below the 32-bit MMIO window.
pub fn low_ram_end(bytes: u64) -> u64 {
    bytes.min(MMIO32_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn memory_is_split_around_the_mmio_window() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_regions(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(ram_regions(5 << 30), vec![(0, 3 << 30), (4 << 30, 2 << 30)]);
        assert_eq!(low_ram_end(5 << 30), 3 << 30);
    }

    #[test]
    fn creates_lazily_reserved_memory() {
        let mem = create(64).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
    }
}
