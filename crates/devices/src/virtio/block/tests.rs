//! virtio-blk with mock queues: the requests a driver sends, and the ones a
//! hostile guest makes up.

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::ioapic::tests::RecordingSink;
use virtio_queue::mock::MockSplitQueue;

use crate::virtio::test_utils::{DATA_BASE, MEM_SIZE, QUEUE_BASE, activation, add_chain, memory, mock, used};

const HDR: u64 = DATA_BASE;
const DATA: u64 = DATA_BASE + 0x1000;
const STATUS: u64 = DATA_BASE + 0x10_0000;
const IMAGE_SECTORS: u64 = 128;

/// An image of 128 sectors where every byte of sector `s` is `s`.
fn image() -> TempFile {
    let f = TempFile::new().unwrap();
    let mut bytes = Vec::new();
    for s in 0..IMAGE_SECTORS {
        bytes.extend(std::iter::repeat_n(s as u8, SECTOR_SIZE as usize));
    }
    f.as_file().write_all(&bytes).unwrap();
    f
}

fn image_bytes(f: &TempFile, offset: u64, len: usize) -> Vec<u8> {
    let mut file = f.as_file();
    file.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    file.read_exact(&mut buf).unwrap();
    buf
}

struct Rig {
    mem: &'static GuestMemoryMmap,
    m: MockSplitQueue<'static, GuestMemoryMmap>,
    dev: Block,
    sink: Arc<RecordingSink>,
    image: TempFile,
}

fn rig(read_only: bool, cache: CacheType) -> Rig {
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(memory()));
    let image = image();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image.as_path())
        .unwrap();
    let mut dev = Block::new(file, read_only, cache, "disk0").unwrap();
    let m = mock(mem, QUEUE_BASE[0], 16);
    let (act, sink) = activation(mem, &[&m]);
    dev.activate(act).unwrap();
    Rig {
        mem,
        m,
        dev,
        sink,
        image,
    }
}

impl Rig {
    fn header(&self, request_type: u32, sector: u64) {
        let mut raw = [0u8; HEADER_LEN];
        raw[..4].copy_from_slice(&request_type.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Queues a chain (descriptors from 0: the last one was consumed),
    /// processes it, and returns (used length, status).
    fn submit(&mut self, parts: &[(u64, u32, bool)]) -> (u32, u8) {
        let before = used(self.mem, &self.m, 0).2;
        add_chain(&self.m, 0, parts);
        assert_eq!(self.dev.process_queue(), 1, "one request completed");
        let (id, len, after) = used(self.mem, &self.m, u64::from(before % 16));
        assert_eq!(after, before.wrapping_add(1));
        assert_eq!(id, 0, "the chain's head is returned");
        (len, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }
}

fn req(data_len: u32, data_writable: bool) -> Vec<(u64, u32, bool)> {
    vec![
        (HDR, 16, false),
        (DATA, data_len, data_writable),
        (STATUS, 1, true),
    ]
}

#[test]
fn reads_sectors_into_guest_memory() {
    let mut r = rig(false, CacheType::Writeback);
    r.header(T_IN, 3);
    let (len, status) = r.submit(&req(1024, true));
    assert_eq!((len, status), (1025, S_OK));
    let mut got = vec![0u8; 1024];
    r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got[..512].iter().all(|b| *b == 3) && got[512..].iter().all(|b| *b == 4));
    assert_eq!(r.sink.sent.lock().unwrap().len(), 1, "the guest is interrupted");
    assert_eq!(r.dev.stats().reads, 1);
}

#[test]
fn writes_and_flushes_reach_the_image() {
    let mut r = rig(false, CacheType::Writeback);
    r.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    r.header(T_OUT, 1);
    assert_eq!(r.submit(&req(512, false)), (1, S_OK));
    assert_eq!(image_bytes(&r.image, 512, 512), vec![0xab; 512]);
    assert_eq!(
        image_bytes(&r.image, 1024, 1),
        vec![2],
        "the next sector is untouched"
    );
    r.header(T_FLUSH, 0);
    assert_eq!(r.submit(&[(HDR, 16, false), (STATUS, 1, true)]), (1, S_OK));
    assert_eq!(r.dev.stats().flushes, 1);
    assert_ne!(r.dev.features() & F_FLUSH, 0);
}

#[test]
fn read_only_drive_refuses_writes() {
    let mut r = rig(true, CacheType::Writeback);
    assert_ne!(r.dev.features() & F_RO, 0);
    r.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    r.header(T_OUT, 0);
    assert_eq!(r.submit(&req(512, false)), (1, S_IOERR));
    assert_eq!(
        image_bytes(&r.image, 0, 512),
        vec![0; 512],
        "nothing reached the file"
    );
    // Reads still work.
    r.header(T_IN, 5);
    assert_eq!(r.submit(&req(512, true)), (513, S_OK));
}

#[test]
fn unsafe_cache_offers_no_flush() {
    let mut r = rig(false, CacheType::Unsafe);
    assert_eq!(r.dev.features() & F_FLUSH, 0);
    r.header(T_FLUSH, 0);
    assert_eq!(r.submit(&[(HDR, 16, false), (STATUS, 1, true)]), (1, S_UNSUPP));
}

#[test]
fn get_id_and_unknown_types() {
    let mut r = rig(false, CacheType::Unsafe);
    r.header(T_GET_ID, 0);
    assert_eq!(r.submit(&req(20, true)), (21, S_OK));
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..5], b"disk0");
    assert_eq!(&id[5..], &[0; 15]);
    r.header(99, 0);
    assert_eq!(r.submit(&req(512, true)).1, S_UNSUPP);
}

#[test]
fn capacity_and_config_space() {
    let r = rig(false, CacheType::Unsafe);
    assert_eq!(r.dev.sectors(), IMAGE_SECTORS);
    let mut cap = [0u8; 8];
    r.dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), IMAGE_SECTORS);
    let mut beyond = [0xffu8; 4];
    r.dev.read_config(100, &mut beyond);
    assert_eq!(beyond, [0; 4]);
    let mut huge = [0xffu8; 2];
    r.dev.read_config(u64::MAX, &mut huge);
    assert_eq!(huge, [0; 2]);
}

#[test]
fn requests_outside_the_image_or_not_whole_sectors_fail() {
    let mut r = rig(false, CacheType::Unsafe);
    r.header(T_IN, IMAGE_SECTORS - 1);
    assert_eq!(r.submit(&req(1024, true)).1, S_IOERR, "runs past the end");
    r.header(T_IN, u64::MAX);
    assert_eq!(r.submit(&req(512, true)).1, S_IOERR, "sector overflow");
    r.header(T_IN, 0);
    assert_eq!(r.submit(&req(100, true)).1, S_IOERR, "not a whole sector");
    r.header(T_OUT, IMAGE_SECTORS);
    assert_eq!(r.submit(&req(512, false)).1, S_IOERR);
    assert_eq!(r.dev.stats().errors, 4);
}

#[test]
fn data_in_the_wrong_direction_fails() {
    let mut r = rig(false, CacheType::Unsafe);
    r.header(T_IN, 0);
    assert_eq!(
        r.submit(&req(512, false)).1,
        S_IOERR,
        "read into device-readable memory"
    );
    r.header(T_OUT, 0);
    let before = image_bytes(&r.image, 0, 512);
    assert_eq!(
        r.submit(&req(512, true)).1,
        S_IOERR,
        "write from device-writable memory"
    );
    assert_eq!(image_bytes(&r.image, 0, 512), before);
    // A header the device may only write is no header.
    r.header(T_IN, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, true), (DATA, 512, true), (STATUS, 1, true)])
            .1,
        S_IOERR
    );
    // A header that is too short.
    r.header(T_IN, 0);
    assert_eq!(r.submit(&[(HDR, 8, false), (STATUS, 1, true)]).1, S_IOERR);
}

#[test]
fn header_and_data_split_anywhere_still_work() {
    let mut r = rig(false, CacheType::Unsafe);
    r.header(T_IN, 7);
    let parts = [
        (HDR, 10, false),
        (HDR + 10, 6, false),
        (DATA, 100, true),
        (DATA + 100, 412, true),
        (STATUS, 1, true),
    ];
    assert_eq!(r.submit(&parts), (513, S_OK));
    let mut got = [0u8; 512];
    r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got.iter().all(|b| *b == 7));
}

#[test]
fn descriptors_outside_guest_memory() {
    let mut r = rig(false, CacheType::Unsafe);
    r.header(T_IN, 0);
    // Data outside memory: the status byte still says why.
    assert_eq!(
        r.submit(&[(HDR, 16, false), (MEM_SIZE - 256, 512, true), (STATUS, 1, true)]),
        (1, S_IOERR)
    );
    // Header outside memory.
    assert_eq!(
        r.submit(&[(u64::MAX - 8, 16, false), (DATA, 512, true), (STATUS, 1, true)])
            .1,
        S_IOERR
    );
    // No status byte the device can write: the chain comes back unused.
    let (len, _) = r.submit(&[(HDR, 16, false), (DATA, 512, false)]);
    assert_eq!(len, 0);
    let (len, _) = r.submit(&[(HDR, 16, false), (MEM_SIZE + 4096, 1, true)]);
    assert_eq!(len, 0);
}

#[test]
fn a_looping_chain_ends() {
    let mut r = rig(false, CacheType::Unsafe);
    r.header(T_IN, 0);
    // Descriptor 0 points to itself: the chain is cut at the queue size.
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    let d = RawDescriptor::from(Descriptor::new(HDR, 16, 1, 0));
    r.m.add_desc_chains(&[d], 0).unwrap();
    assert_eq!(r.dev.process_queue(), 1);
    let (_, len, idx) = used(r.mem, &r.m, 0);
    assert_eq!((len, idx), (0, 1), "no writable status: returned unused");
}

#[test]
fn a_full_queue_of_requests_is_processed_in_one_go() {
    let mut r = rig(false, CacheType::Unsafe);
    r.header(T_IN, 2);
    for i in 0..5u16 {
        add_chain(&r.m, i * 3, &req(512, true));
    }
    assert_eq!(r.dev.process_queue(), 5);
    assert_eq!(used(r.mem, &r.m, 0).2, 5);
    assert_eq!(
        r.sink.sent.lock().unwrap().len(),
        1,
        "one interrupt for the batch"
    );
    assert_eq!(r.dev.process_queue(), 0, "nothing left");
}

#[test]
fn replacing_the_image_changes_capacity_and_tells_the_driver() {
    let mut r = rig(false, CacheType::Unsafe);
    let bigger = TempFile::new().unwrap();
    bigger.as_file().write_all(&vec![9u8; 256 * 512]).unwrap();
    let before = r.sink.sent.lock().unwrap().len();
    r.dev.replace_image(bigger.into_file()).unwrap();
    assert_eq!(r.dev.sectors(), 256);
    assert_eq!(r.dev.config_generation(), 1);
    assert_eq!(
        r.sink.sent.lock().unwrap().len(),
        before + 1,
        "config-change interrupt"
    );
    r.header(T_IN, 200);
    assert_eq!(r.submit(&req(512, true)), (513, S_OK));
    let mut got = [0u8; 512];
    r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got.iter().all(|b| *b == 9), "reads come from the new image");
}

/// A device over `file` with its queue at `QUEUE_BASE[0]`, logging as
/// `virtio-blk <id>`.
fn rig_over(image: TempFile, id: &str) -> Rig {
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(memory()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image.as_path())
        .unwrap();
    let mut dev = Block::new(file, false, CacheType::Unsafe, id).unwrap();
    let m = mock(mem, QUEUE_BASE[0], 16);
    let (act, sink) = activation(mem, &[&m]);
    dev.activate(act).unwrap();
    Rig {
        mem,
        m,
        dev,
        sink,
        image,
    }
}

#[test]
fn indirect_descriptors_are_refused_and_counted() {
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    let mut r = rig(false, CacheType::Unsafe);
    r.header(T_IN, 5);
    r.mem.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
    // A well-formed read request, in an indirect table.
    let table = GuestAddress(DATA_BASE + 0x8000);
    let parts = [
        Descriptor::new(HDR, 16, 1, 1),
        Descriptor::new(DATA, 512, 1 | 2, 2),
        Descriptor::new(STATUS, 1, 2, 0),
    ];
    for (i, d) in parts.iter().enumerate() {
        r.mem.write_obj(*d, table.unchecked_add(16 * i as u64)).unwrap();
    }
    let head = RawDescriptor::from(Descriptor::new(table.0, 48, 4, 0));
    r.m.add_desc_chains(&[head], 0).unwrap();
    assert_eq!(r.dev.process_queue(), 1, "the chain is returned");
    let (id, len, idx) = used(r.mem, &r.m, 0);
    assert_eq!((id, len, idx), (0, 0, 1), "returned unused");
    let mut data = [0u8; 512];
    r.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert_eq!(data, [0xee; 512], "no data moved");
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xff);
    let s = r.dev.stats();
    assert_eq!((s.indirect, s.errors, s.reads), (1, 1, 0));
    assert!(r.dev.counters().contains(&("indirect_desc_count", 1)));
}

#[test]
fn one_request_moves_at_most_the_cap() {
    // An image large enough that only the cap can refuse the request.
    let image = TempFile::new().unwrap();
    image.as_file().set_len(4 * MAX_REQUEST_BYTES).unwrap();
    let mut r = rig_over(image, "big");
    const BIG: u64 = 0x40_0000;
    r.header(T_IN, 0);
    let at_cap = MAX_REQUEST_BYTES as u32;
    assert_eq!(
        r.submit(&[(HDR, 16, false), (BIG, at_cap, true), (STATUS, 1, true)]),
        (at_cap + 1, S_OK)
    );
    r.header(T_IN, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (BIG, at_cap + 512, true), (STATUS, 1, true)]),
        (1, S_IOERR),
        "a read over the cap"
    );
    r.header(T_OUT, 0);
    assert_eq!(
        r.submit(&[
            (HDR, 16, false),
            (BIG, at_cap, false),
            (BIG, 512, false),
            (STATUS, 1, true)
        ]),
        (1, S_IOERR),
        "a write over the cap, in two segments"
    );
    let s = r.dev.stats();
    assert_eq!((s.oversized, s.reads, s.writes, s.bytes_written), (2, 1, 0, 0));
}

#[test]
fn the_cap_is_offered_as_seg_max_and_size_max() {
    let r = rig(false, CacheType::Unsafe);
    assert_ne!(r.dev.features() & F_SEG_MAX, 0);
    assert_ne!(r.dev.features() & F_SIZE_MAX, 0);
    let mut c = [0u8; 16];
    r.dev.read_config(0, &mut c);
    let size_max = u32::from_le_bytes(c[8..12].try_into().unwrap());
    let seg_max = u32::from_le_bytes(c[12..16].try_into().unwrap());
    assert_eq!((size_max, seg_max), (SIZE_MAX, SEG_MAX));
    assert_eq!(u64::from(size_max) * u64::from(seg_max), MAX_REQUEST_BYTES);
    assert!(
        seg_max + 2 <= u32::from(QUEUE_SIZE),
        "a full request fits the ring"
    );
}

#[test]
fn a_flood_of_bad_available_indexes_is_counted_and_logged_at_a_bounded_rate() {
    crate::ratelimit::tests::capture_logs();
    let image = image();
    let mut r = rig_over(image, "flood-blk");
    r.m.avail().idx().store(1000u16.to_le());
    const N: u64 = 1000;
    for _ in 0..N {
        assert_eq!(r.dev.process_queue(), 0);
    }
    assert_eq!(r.dev.stats().invalid_avail_idx, N, "every notification counted");
    let lines = crate::ratelimit::tests::logged("flood-blk");
    assert!(
        !lines.is_empty() && lines.len() <= crate::ratelimit::BURST as usize,
        "{lines:?}"
    );
    assert!(
        crate::ratelimit::tests::logged("Iterator error").is_empty(),
        "virtio-queue's own line is never reached"
    );
    // A driver that puts it right is served again.
    r.m.avail().idx().store(0);
    r.header(T_IN, 1);
    assert_eq!(r.submit(&req(512, true)), (513, S_OK));
}

/// A loop device over a file, detached when dropped.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(file: &std::path::Path) -> Result<Self, String> {
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self(String::from_utf8_lossy(&out.stdout).trim().to_string()))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

#[test]
fn a_block_device_has_its_size_as_capacity() {
    let image = TempFile::new().unwrap();
    let size: u64 = (2 << 20) + 8 * SECTOR_SIZE;
    image.as_file().set_len(size).unwrap();
    let dev = match LoopDevice::attach(image.as_path()) {
        Ok(d) => d,
        Err(e) => {
            assert!(
                std::env::var("FLATLET_REQUIRE_HOST").as_deref() != Ok("1"),
                "FLATLET_REQUIRE_HOST=1 but no loop device: {e}"
            );
            writeln!(
                io::stderr(),
                "SKIPPED a_block_device_has_its_size_as_capacity: {e} (needs root and losetup)"
            )
            .unwrap();
            return;
        }
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev.0)
        .unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_block_device(
        &file.metadata().unwrap().file_type()
    ));
    let mut block = Block::new(file, false, CacheType::Unsafe, "loop").unwrap();
    assert_eq!(block.sectors(), size / SECTOR_SIZE);
    let mut cap = [0u8; 8];
    block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), size / SECTOR_SIZE);
    // PATCH /drives onto a block device too.
    let again = File::open(&dev.0).unwrap();
    block.replace_image(again).unwrap();
    assert_eq!(block.sectors(), size / SECTOR_SIZE);
}

/// Reads of `len` bytes back to back for `secs` of manual time, through
/// the device's rate limiter; returns the (requests, bytes) completed.
/// Also returns how many completed before any time passed.
fn limited_reads(r: &mut Rig, ns: &std::sync::atomic::AtomicU64, len: u32, secs: u64) -> (u64, u64, u64) {
    use std::sync::atomic::Ordering;
    let start = ns.load(Ordering::Relaxed);
    let end = start + secs * 1_000_000_000;
    let (mut reqs, mut bytes, mut at_once) = (0, 0, 0);
    // The chain at descriptor 0, made available again and again (the
    // mock's own add_desc_chains does not wrap around the ring).
    add_chain(&r.m, 0, &[(HDR, 16, false), (DATA, len, true), (STATUS, 1, true)]);
    let avail = r.m.avail_addr().0;
    let mut first = true;
    while ns.load(Ordering::Relaxed) < end {
        r.header(T_IN, 0);
        if !first {
            let idx: u16 = r.mem.read_obj(GuestAddress(avail + 2)).unwrap();
            r.mem
                .write_obj(0u16, GuestAddress(avail + 4 + 2 * u64::from(idx % 16)))
                .unwrap();
            r.mem
                .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
                .unwrap();
        }
        first = false;
        loop {
            if r.dev.process_queue() == 1 {
                reqs += 1;
                bytes += u64::from(len);
                if ns.load(Ordering::Relaxed) == start {
                    at_once += 1;
                }
                break;
            }
            // Held back: the chain is still queued; the timer would fire
            // after this long.
            let limiter = r.dev.limiter.as_mut().unwrap();
            assert!(
                limiter.is_blocked(),
                "request {reqs}: not held back by the limiter"
            );
            let wait = limiter
                .wait_hint(1, u64::from(len))
                .max(std::time::Duration::from_micros(1));
            ns.fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
            limiter.on_timer();
        }
    }
    (reqs, bytes, at_once)
}

#[test]
fn rate_limited_drives_keep_their_rates() {
    use crate::rate_limiter::{BucketConfig, Clock, RateLimiter};
    use std::sync::atomic::AtomicU64;
    let within = |got: u64, want: f64| (got as f64 - want).abs() <= want * 0.05;
    // Bandwidth: 64 KiB per 100 ms (640 KiB/s), 4 KiB reads, 2 s.
    let mut r = rig(false, CacheType::Unsafe);
    let ns = Arc::new(AtomicU64::new(1_000_000_000));
    let bw = BucketConfig {
        size: 64 << 10,
        one_time_burst: 0,
        refill_time_ms: 100,
    };
    r.dev
        .set_rate_limiter(RateLimiter::with_clock(Some(bw), None, Clock::Manual(ns.clone())).unwrap());
    let (_, bytes, _) = limited_reads(&mut r, &ns, 4096, 2);
    assert!(
        within(bytes, (640 << 10) as f64 * 2.0 + (64 << 10) as f64),
        "{bytes}"
    );
    assert!(r.dev.stats().throttled > 0);
    assert!(
        r.dev
            .counters()
            .contains(&("rate_limiter_throttled_events", r.dev.stats().throttled))
    );
    // Operations: 50 per 100 ms (500/s), with a one-time burst of 200
    // that passes at once.
    let mut r = rig(false, CacheType::Unsafe);
    let ns = Arc::new(AtomicU64::new(1_000_000_000));
    let ops = BucketConfig {
        size: 50,
        one_time_burst: 200,
        refill_time_ms: 100,
    };
    r.dev
        .set_rate_limiter(RateLimiter::with_clock(None, Some(ops), Clock::Manual(ns.clone())).unwrap());
    let (reqs, _, at_once) = limited_reads(&mut r, &ns, 512, 2);
    assert!(within(reqs, 500.0 * 2.0 + 250.0), "{reqs}");
    // The burst and the full bucket went before any time passed.
    assert_eq!(at_once, 250);
}
