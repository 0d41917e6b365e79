//! virtio-blk request parsing and execution on made-up guest memory.
#![no_main]

mod common;

use std::io::Write;

use flatlet_devices::virtio::VirtioDevice;
use flatlet_devices::virtio::block::{Block, CacheType};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let image = vmm_sys_util::tempfile::TempFile::new().unwrap();
    image.as_file().write_all(&[0x5a; 8 * 512]).unwrap();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(image.as_path()).unwrap();
    // The first byte picks read-only and the cache mode.
    let flags = data.first().copied().unwrap_or(0);
    let cache = if flags & 2 != 0 { CacheType::Writeback } else { CacheType::Unsafe };
    let mut dev = Block::new(file, flags & 1 != 0, cache, "fuzz").unwrap();
    let mem = common::memory(data);
    dev.activate(common::activation(&mem, 1)).unwrap();
    dev.process_queue();
    // Nothing beyond the image's 8 sectors was ever read.
    let s = dev.stats();
    assert!(s.bytes_read <= 8 * 512 * s.reads);
});
