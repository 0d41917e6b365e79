//! Guest memory in a snapshot: written sparsely (only pages the guest
//! touched and that are not zero; the rest are holes), and mapped back
//! `MAP_PRIVATE`, so pages load on first touch and VMs restored from one
//! file share its unmodified pages through the page cache.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::memory::ram_regions;

const PAGE: usize = 4096;
/// The most bytes copied per write.
const MAX_RUN: usize = 1 << 20;

/// Errors saving or mapping guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// The memory file could not be written or read.
    #[error("memory file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// Guest memory could not be read.
    #[error("reading guest memory at {addr:#x}: {reason}")]
    Guest { addr: u64, reason: String },
    /// The memory file does not have the size the state says.
    #[error("memory file {path} is {found} bytes, the snapshot's VM has {expected}")]
    Size { path: String, found: u64, expected: u64 },
    /// The host refused the mapping.
    #[error("mapping the memory file: {0}")]
    Map(String),
}

/// Writes guest memory to `file` (regions back to back), leaving holes
/// for untouched and zero pages; returns the bytes written.
pub fn write_sparse(memory: &GuestMemoryMmap, file: &File, path: &Path) -> Result<u64, MemoryFileError> {
    let io = |source| MemoryFileError::Io {
        path: path.display().to_string(),
        source,
    };
    let total: u64 = memory.iter().map(|r| r.len()).sum();
    file.set_len(0).map_err(io)?;
    file.set_len(total).map_err(io)?;
    let mut written = 0u64;
    let mut file_base = 0u64;
    let mut buf = vec![0u8; MAX_RUN];
    for region in memory.iter() {
        let resident = crate::sys::resident_pages(region);
        let mut page = 0usize;
        while page < resident.len() {
            if !resident[page] {
                page += 1;
                continue;
            }
            // A run of resident pages, read at once, written without its
            // zero pages.
            let mut end = page;
            while end < resident.len() && resident[end] && (end - page) * PAGE < MAX_RUN {
                end += 1;
            }
            let offset = (page * PAGE) as u64;
            let len = ((end - page) * PAGE).min(region.len() as usize - page * PAGE);
            let addr = region.start_addr().0 + offset;
            memory
                .read_slice(&mut buf[..len], GuestAddress(addr))
                .map_err(|e| MemoryFileError::Guest {
                    addr,
                    reason: e.to_string(),
                })?;
            for (i, chunk) in buf[..len].chunks(PAGE).enumerate() {
                if chunk.iter().all(|b| *b == 0) {
                    continue;
                }
                let at = file_base + offset + (i * PAGE) as u64;
                file.write_all_at(chunk, at).map_err(io)?;
                written += chunk.len() as u64;
            }
            page = end;
        }
        file_base += region.len();
    }
    file.sync_data().map_err(io)?;
    Ok(written)
}

/// Maps the memory file at `path` privately as the guest memory of a VM
/// with `mem_size_mib` MiB: writes stay in this process.
pub fn map_private(path: &Path, mem_size_mib: u64) -> Result<GuestMemoryMmap, MemoryFileError> {
    let io = |source| MemoryFileError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::sync::Arc::new(super::open_regular(path, false).map_err(io)?);
    if !file.metadata().map_err(io)?.is_file() {
        return Err(MemoryFileError::Map(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let bytes = mem_size_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| MemoryFileError::Map(format!("{mem_size_mib} MiB is too large")))?;
    let found = file.metadata().map_err(io)?.len();
    if found != bytes {
        return Err(MemoryFileError::Size {
            path: path.display().to_string(),
            found,
            expected: bytes,
        });
    }
    let mut regions = Vec::new();
    let mut file_base = 0u64;
    for (start, len) in ram_regions(bytes) {
        let mapping = MmapRegionBuilder::new(len as usize)
            .with_file_offset(FileOffset::from_arc(file.clone(), file_base))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE)
            .build()
            .map_err(|e| MemoryFileError::Map(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| MemoryFileError::Map(format!("region at {start:#x} overflows")))?;
        regions.push(region);
        file_base += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryFileError::Map(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn writes_only_touched_nonzero_pages_and_maps_them_back_privately() {
        let dir = std::env::temp_dir().join(format!("flatlet-snapmem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mem");
        let mem = crate::memory::create(64).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
        mem.write_slice(b"world", GuestAddress(0x300_0000)).unwrap();
        // Touched, but zero: not written.
        mem.write_slice(&[0u8; 8], GuestAddress(0x10_0000)).unwrap();
        let file = File::create(&path).unwrap();
        let written = write_sparse(&mem, &file, &path).unwrap();
        assert_eq!(written, 2 * PAGE as u64);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "{} blocks allocated",
            meta.blocks()
        );

        let back = map_private(&path, 64).unwrap();
        let mut got = [0u8; 5];
        back.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert_eq!(&got, b"hello");
        back.read_slice(&mut got, GuestAddress(0x300_0000)).unwrap();
        assert_eq!(&got, b"world");
        // Private: the guest's writes do not reach the file.
        back.write_slice(b"HELLO", GuestAddress(0x1000)).unwrap();
        let again = map_private(&path, 64).unwrap();
        again.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert_eq!(&got, b"hello");

        assert!(matches!(
            map_private(&path, 128),
            Err(MemoryFileError::Size { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
