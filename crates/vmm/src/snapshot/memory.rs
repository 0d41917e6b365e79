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

/// How guest memory goes to the memory file.
#[derive(Clone, Copy, Debug)]
pub enum WriteMode<'a> {
    /// The whole memory, into a file made empty first: pages the guest
    /// never touched and zero pages stay holes.
    Full,
    /// Into an existing memory file of the VM (an earlier Full snapshot,
    /// brought up to date by any Diffs since): only the pages that are not
    /// already there as they are now. `dirty` is KVM's log of the pages
    /// the guest wrote since the last snapshot (one bitmap per region):
    /// those are written without a look at the file; the other pages are
    /// compared with the file, because devices write guest memory too
    /// (used rings, received data) and KVM does not log that.
    Diff { dirty: &'a [Vec<u64>] },
}

fn bit(bitmap: Option<&Vec<u64>>, page: usize) -> bool {
    bitmap
        .and_then(|b| b.get(page / 64))
        .is_some_and(|w| w >> (page % 64) & 1 == 1)
}

/// Writes guest memory to `file` (regions back to back) as `mode` says;
/// returns the bytes written. The pages looked at are those resident in
/// memory and, for memory restored from a file, those the file has data
/// for (untouched pages of a restored VM are its file's, not zero).
pub fn write_memory(
    memory: &GuestMemoryMmap,
    file: &File,
    path: &Path,
    mode: WriteMode<'_>,
) -> Result<u64, MemoryFileError> {
    let io = |source| MemoryFileError::Io {
        path: path.display().to_string(),
        source,
    };
    let total: u64 = memory.iter().map(|r| r.len()).sum();
    match mode {
        WriteMode::Full => {
            file.set_len(0).map_err(io)?;
            file.set_len(total).map_err(io)?;
        }
        WriteMode::Diff { .. } => {
            let found = file.metadata().map_err(io)?.len();
            if found != total {
                return Err(MemoryFileError::Size {
                    path: path.display().to_string(),
                    found,
                    expected: total,
                });
            }
        }
    }
    let mut written = 0u64;
    let mut file_base = 0u64;
    let mut buf = vec![0u8; MAX_RUN];
    // What the file holds where a Diff may write (read a run at a time).
    let mut on_file = match mode {
        WriteMode::Diff { .. } => vec![0u8; MAX_RUN],
        WriteMode::Full => Vec::new(),
    };
    for (index, region) in memory.iter().enumerate() {
        let candidates = candidate_pages(region);
        for (page, end) in runs(&candidates) {
            let offset = (page * PAGE) as u64;
            let len = ((end - page) * PAGE).min(region.len() as usize - page * PAGE);
            let addr = region.start_addr().0 + offset;
            let run = &mut buf[..len];
            memory
                .read_slice(run, GuestAddress(addr))
                .map_err(|e| MemoryFileError::Guest {
                    addr,
                    reason: e.to_string(),
                })?;
            let at = file_base + offset;
            written += match mode {
                WriteMode::Full => write_pages(file, run, at, |_, new| new.iter().any(|b| *b != 0)),
                WriteMode::Diff { dirty } => {
                    let old = &mut on_file[..len];
                    file.read_exact_at(old, at).map_err(io)?;
                    write_pages(file, run, at, |i, new| {
                        bit(dirty.get(index), page + i) || old[i * PAGE..i * PAGE + new.len()] != *new
                    })
                }
            }
            .map_err(io)?;
        }
        file_base += region.len();
    }
    file.sync_data().map_err(io)?;
    Ok(written)
}

/// The runs of set flags in `pages`, each at most [`MAX_RUN`] bytes: (first
/// page, page after the last).
fn runs(pages: &[bool]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut page = 0;
    std::iter::from_fn(move || {
        while page < pages.len() && !pages[page] {
            page += 1;
        }
        if page == pages.len() {
            return None;
        }
        let start = page;
        while page < pages.len() && pages[page] && (page - start) * PAGE < MAX_RUN {
            page += 1;
        }
        Some((start, page))
    })
}

/// Writes the pages of `run` (at `at` in the file) that `pick` chooses
/// (given each page's index in the run and its bytes), adjacent ones in
/// one write; returns the bytes written.
fn write_pages(
    file: &File,
    run: &[u8],
    at: u64,
    pick: impl Fn(usize, &[u8]) -> bool,
) -> std::io::Result<u64> {
    let mut written = 0u64;
    let mut from: Option<usize> = None;
    let chunks = run.chunks(PAGE).map(Some).chain(std::iter::once(None));
    for (i, chunk) in chunks.enumerate() {
        let here = (i * PAGE).min(run.len());
        match (chunk.is_some_and(|c| pick(i, c)), from) {
            (true, None) => from = Some(here),
            (false, Some(f)) => {
                file.write_all_at(&run[f..here], at + f as u64)?;
                written += (here - f) as u64;
                from = None;
            }
            _ => {}
        }
    }
    Ok(written)
}

/// The pages of `region` a snapshot looks at: resident ones, and those
/// its backing file (if it was restored from one) has data for.
fn candidate_pages(region: &GuestRegionMmap) -> Vec<bool> {
    let mut pages = crate::sys::resident_pages(region);
    if let Some(backing) = region.file_offset() {
        let start = backing.start();
        let end = start + region.len();
        let mut at = start;
        while at < end {
            let Ok(data) = nix::unistd::lseek(backing.file(), at as i64, nix::unistd::Whence::SeekData)
            else {
                break;
            };
            let data = data as u64;
            if data >= end {
                break;
            }
            let hole = nix::unistd::lseek(backing.file(), data as i64, nix::unistd::Whence::SeekHole)
                .map_or(end, |h| (h as u64).min(end));
            let first = ((data - start) / PAGE as u64) as usize;
            let last = (hole - start).div_ceil(PAGE as u64) as usize;
            for p in pages.iter_mut().take(last).skip(first) {
                *p = true;
            }
            at = hole;
        }
    }
    pages
}

/// Maps the memory file at `path` privately as the guest memory of a VM
/// with `mem_size_mib` MiB: writes stay in this process.
pub fn map_private(path: &Path, mem_size_mib: u64) -> Result<GuestMemoryMmap, MemoryFileError> {
    let io = |source| MemoryFileError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = crate::config::files::open_checked(path, false, crate::config::files::Accept::RegularFile)
        .map_err(|reason| MemoryFileError::Map(format!("{}: {reason}", path.display())))?;
    let file = std::sync::Arc::new(file);
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
        let written = write_memory(&mem, &file, &path, WriteMode::Full).unwrap();
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

    #[test]
    fn runs_are_the_set_pages_cut_at_the_largest_write() {
        let pages = [false, true, true, false, true];
        assert_eq!(runs(&pages).collect::<Vec<_>>(), [(1, 3), (4, 5)]);
        let per_run = MAX_RUN / PAGE;
        let long = vec![true; per_run + 1];
        assert_eq!(
            runs(&long).collect::<Vec<_>>(),
            [(0, per_run), (per_run, per_run + 1)]
        );
        assert_eq!(runs(&[false; 3]).count(), 0);
    }

    #[test]
    fn a_diff_writes_what_changed_and_a_restored_vm_saves_its_files_pages() {
        // On a disk file system (not tmpfs, whose pages are always in
        // memory): /var/tmp.
        let dir = Path::new("/var/tmp").join(format!("flatlet-snapdiff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mem");
        let mem = crate::memory::create(64).unwrap();
        for page in 0..8u64 {
            mem.write_slice(&[page as u8 + 1; 16], GuestAddress(page * 0x1000))
                .unwrap();
        }
        // And one far from the others (beyond any readahead of theirs).
        const FAR: u64 = 0x200_0000;
        mem.write_slice(&[9; 16], GuestAddress(FAR)).unwrap();
        let rw = |p: &Path| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .unwrap()
        };
        let full = write_memory(&mem, &rw(&path), &path, WriteMode::Full).unwrap();
        assert_eq!(full, 9 * PAGE as u64);
        // Nothing changed: nothing written.
        let none = write_memory(&mem, &rw(&path), &path, WriteMode::Diff { dirty: &[] }).unwrap();
        assert_eq!(none, 0);
        // A page a device wrote (not in KVM's log) is found by content; a
        // page in the log is written without a look.
        mem.write_slice(b"device", GuestAddress(0x3000)).unwrap();
        let dirty = vec![vec![1u64 << 5]];
        let two = write_memory(&mem, &rw(&path), &path, WriteMode::Diff { dirty: &dirty }).unwrap();
        assert_eq!(two, 2 * PAGE as u64);
        // Out of the page cache, so that the restored VM's untouched
        // pages are not resident.
        nix::fcntl::posix_fadvise(
            rw(&path),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        let back = map_private(&path, 64).unwrap();
        let mut got = [0u8; 6];
        back.read_slice(&mut got, GuestAddress(0x3000)).unwrap();
        assert_eq!(&got, b"device");

        // A VM restored from the file and saved to another: the pages it
        // never touched come from the file, not as holes.
        let region = back.iter().next().unwrap();
        assert!(
            !crate::sys::resident_pages(region)[(FAR / 0x1000) as usize],
            "the far page is not resident"
        );
        let other = dir.join("other");
        let again = write_memory(&back, &rw(&other), &other, WriteMode::Full).unwrap();
        assert_eq!(again, 9 * PAGE as u64);
        let copy = map_private(&other, 64).unwrap();
        copy.read_slice(&mut got, GuestAddress(FAR)).unwrap();
        assert_eq!(got, [9u8; 6]);
        // A Diff into a file of another size is refused.
        let small = dir.join("small");
        std::fs::write(&small, [0u8; 4096]).unwrap();
        assert!(matches!(
            write_memory(&mem, &rw(&small), &small, WriteMode::Diff { dirty: &[] }),
            Err(MemoryFileError::Size { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
