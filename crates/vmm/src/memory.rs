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
    /// The host refused transparent huge pages.
    #[error("huge_pages \"Transparent\": the host refused transparent huge pages ({0})")]
    HugePages(String),
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

/// Asks for transparent huge pages on all guest memory
/// (`huge_pages: "Transparent"`).
pub fn advise_huge_pages(memory: &GuestMemoryMmap) -> Result<(), MemoryError> {
    crate::sys::advise_huge_pages(memory).map_err(|e| MemoryError::HugePages(e.to_string()))
}

/// The end of RAM below the 32-bit MMIO window.
pub fn low_ram_end(bytes: u64) -> u64 {
    bytes.min(MMIO32_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

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

    #[test]
    fn transparent_huge_pages_are_applied() {
        let mem = create(64).unwrap();
        advise_huge_pages(&mem).unwrap();
        let host = mem
            .iter()
            .next()
            .unwrap()
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap() as usize;
        // The mapping shows the advice (`hg` in its VmFlags).
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_region = false;
        let mut flagged = false;
        for line in smaps.lines() {
            if let Some(range) = line
                .split_whitespace()
                .next()
                .filter(|r| r.contains('-') && r.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
            {
                let start = usize::from_str_radix(range.split('-').next().unwrap(), 16).unwrap_or(0);
                in_region = start == host;
            } else if in_region && line.starts_with("VmFlags:") {
                flagged = line.split_whitespace().any(|f| f == "hg");
            }
        }
        assert!(flagged, "guest memory at {host:#x} lacks the hg flag");
    }
}
