//! Throughput of the device models without a guest: flatlet-bench drives a
//! virtio queue in guest memory itself (as a driver would), and compares
//! each device with the plain system calls it wraps, in the same run.
//!
//! - virtio-blk: 64 KiB reads and writes of an image on tmpfs, against
//!   `pread`/`pwrite` of the same file.
//! - virtio-net: frames through the transmit path into a TAP device (in a
//!   network namespace the benchmark creates, addressed to a MAC nobody
//!   has, so the kernel drops them at once), against `write` to the TAP.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flatlet_devices::irq::{InterruptController, IrqLine};
use flatlet_devices::virtio::block::{Block, CacheType};
use flatlet_devices::virtio::net::{Net, VNET_HDR_LEN};
use flatlet_devices::virtio::{Activation, F_VERSION_1, VirtioDevice, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Size of the queues the benchmark drives.
const QSIZE: u16 = 256;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x3000;
const USED_RING: u64 = 0x4000;
/// Request headers and status bytes.
const META: u64 = 0x10_0000;
/// Data buffers.
const DATA: u64 = 0x100_0000;

/// Interrupts go nowhere.
struct NoInterrupts;

impl InterruptController for NoInterrupts {
    fn pulse(&self, _: usize) {}
    fn set_level(&self, _: usize, _: bool) {}
}

/// A driver's view of one split queue in guest memory.
struct Driver {
    mem: GuestMemoryMmap,
    avail_idx: u16,
}

impl Driver {
    fn new(mem: GuestMemoryMmap) -> Self {
        Self { mem, avail_idx: 0 }
    }

    fn queue(&self) -> Result<Queue, String> {
        let mut q = Queue::new(QSIZE).map_err(|e| e.to_string())?;
        q.try_set_size(QSIZE).map_err(|e| e.to_string())?;
        q.try_set_desc_table_address(GuestAddress(DESC_TABLE))
            .map_err(|e| e.to_string())?;
        q.try_set_avail_ring_address(GuestAddress(AVAIL_RING))
            .map_err(|e| e.to_string())?;
        q.try_set_used_ring_address(GuestAddress(USED_RING))
            .map_err(|e| e.to_string())?;
        q.set_ready(true);
        Ok(q)
    }

    fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) -> Result<(), String> {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&raw, GuestAddress(DESC_TABLE + 16 * u64::from(index)))
            .map_err(|e| e.to_string())
    }

    /// Makes the chain at `head` available.
    fn push(&mut self, head: u16) -> Result<(), String> {
        let slot = AVAIL_RING + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem
            .write_obj(head, GuestAddress(slot))
            .map_err(|e| e.to_string())?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
            .map_err(|e| e.to_string())
    }
}

fn activation(mem: &GuestMemoryMmap, queues: Vec<Queue>) -> Activation {
    let line = IrqLine::new(Arc::new(NoInterrupts), 5);
    Activation {
        mem: mem.clone(),
        queues,
        interrupt: VirtioInterrupt::new(Arc::new(Default::default()), line),
        acked_features: F_VERSION_1,
    }
}

/// A throughput: bytes (or frames) per second, of the device and of the
/// plain system call, over the same work.
pub struct Throughput {
    pub what: String,
    pub unit: &'static str,
    pub device: f64,
    pub baseline: f64,
}

fn rate(amount: f64, d: Duration) -> f64 {
    amount / d.as_secs_f64()
}

const BLOCK_REQ: usize = 64 * 1024;
const BLOCK_IMAGE: u64 = 64 << 20;

/// virtio-blk against pread/pwrite: `total` bytes each way, 64 KiB a
/// request, 64 requests a batch.
pub fn block(total: u64, dir: &str) -> Result<Vec<Throughput>, String> {
    let path = format!("{dir}/flatlet-bench-{}.img", std::process::id());
    let image = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| format!("{path}: {e}"))?;
    let _cleanup = RemoveOnDrop(path.clone());
    image.set_len(BLOCK_IMAGE).map_err(|e| e.to_string())?;
    // Fill it, so reads copy real pages.
    let chunk = vec![0xa5u8; BLOCK_REQ];
    for off in (0..BLOCK_IMAGE).step_by(BLOCK_REQ) {
        image.write_all_at(&chunk, off).map_err(|e| e.to_string())?;
    }
    let requests = (total / BLOCK_REQ as u64) as usize;
    let mut out = Vec::new();
    for write in [false, true] {
        let baseline = time_plain_io(&image, requests, write)?;
        let device = time_virtio_blk(&path, requests, write)?;
        let mib = (requests * BLOCK_REQ) as f64 / (1024.0 * 1024.0);
        out.push(Throughput {
            what: format!(
                "virtio-blk {} (64 KiB, tmpfs)",
                if write { "write" } else { "read" }
            ),
            unit: "MiB/s",
            device: rate(mib, device),
            baseline: rate(mib, baseline),
        });
    }
    Ok(out)
}

struct RemoveOnDrop(String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The same requests with pread/pwrite, rotating over as many buffers as
/// the virtio run uses (so both touch the same amount of memory).
fn time_plain_io(image: &File, requests: usize, write: bool) -> Result<Duration, String> {
    let mut bufs = vec![0x3cu8; BLOCK_REQ * BLOCK_BATCH];
    let start = Instant::now();
    for i in 0..requests {
        let off = (i as u64 * BLOCK_REQ as u64) % BLOCK_IMAGE;
        let b = (i % BLOCK_BATCH) * BLOCK_REQ;
        let buf = &mut bufs[b..b + BLOCK_REQ];
        if write {
            image.write_all_at(buf, off).map_err(|e| e.to_string())?;
        } else {
            image.read_exact_at(buf, off).map_err(|e| e.to_string())?;
        }
    }
    Ok(start.elapsed())
}

/// Requests per batch (and buffers in use).
const BLOCK_BATCH: usize = 64;

fn time_virtio_blk(path: &str, requests: usize, write: bool) -> Result<Duration, String> {
    const BATCH: usize = BLOCK_BATCH;
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).map_err(|e| e.to_string())?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| e.to_string())?;
    let mut dev = Block::new(file, false, CacheType::Unsafe, "bench").map_err(|e| e.to_string())?;
    let mut drv = Driver::new(mem.clone());
    dev.activate(activation(&mem, vec![drv.queue()?]))
        .map_err(|e| e.to_string())?;
    // BATCH requests: header, data (device-writable for reads), status.
    let data_flags = if write { 1 } else { 1 | 2 };
    for r in 0..BATCH as u16 {
        let (hdr, status, data) = (
            META + 32 * u64::from(r),
            META + 0x8000 + u64::from(r),
            DATA + BLOCK_REQ as u64 * u64::from(r),
        );
        drv.desc(3 * r, hdr, 16, 1, 3 * r + 1)?;
        drv.desc(3 * r + 1, data, BLOCK_REQ as u32, data_flags, 3 * r + 2)?;
        drv.desc(3 * r + 2, status, 1, 2, 0)?;
    }
    let sectors_per_req = (BLOCK_REQ / 512) as u64;
    let image_reqs = (BLOCK_IMAGE / BLOCK_REQ as u64) as usize;
    // Only the device's work is timed, as for virtio-net.
    let mut elapsed = Duration::ZERO;
    let mut done = 0;
    while done < requests {
        let n = BATCH.min(requests - done);
        for r in 0..n {
            let mut hdr = [0u8; 16];
            hdr[..4].copy_from_slice(&u32::from(write).to_le_bytes());
            let sector = ((done + r) % image_reqs) as u64 * sectors_per_req;
            hdr[8..].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&hdr, GuestAddress(META + 32 * r as u64))
                .map_err(|e| e.to_string())?;
            drv.push(3 * r as u16)?;
        }
        let start = Instant::now();
        let got = dev.process_queue();
        elapsed += start.elapsed();
        if got != n {
            return Err(format!("virtio-blk completed {got} of {n} requests"));
        }
        done += n;
    }
    if dev.stats().errors != 0 {
        return Err(format!("virtio-blk reported {} errors", dev.stats().errors));
    }
    Ok(elapsed)
}

/// A network namespace for the TAP benchmark, removed on drop.
struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.0]).status();
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let st = Command::new("ip")
        .args(args)
        .status()
        .map_err(|e| format!("ip: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("ip {} failed", args.join(" ")))
    }
}

/// Opens TAP `name` from inside namespace `ns` (on a thread that joins it;
/// the TAP stays in the namespace).
fn open_tap_in(ns: &str, name: &str) -> Result<File, String> {
    let path = format!("/var/run/netns/{ns}");
    let name = name.to_string();
    std::thread::spawn(move || -> Result<File, String> {
        let f = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns: {e}"))?;
        flatlet_vmm::sys::open_tap(&name, VNET_HDR_LEN as i32).map_err(|e| format!("TAP {name}: {e}"))
    })
    .join()
    .map_err(|_| "TAP thread panicked".to_string())?
}

/// A frame of `len` bytes (virtio-net header included) to a MAC nobody has.
fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[VNET_HDR_LEN..VNET_HDR_LEN + 6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14].copy_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    f
}

/// virtio-net transmit against write(2) to the TAP: `frames` of each size.
pub fn net(frames: usize) -> Result<Vec<Throughput>, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root (a network namespace and a TAP device)".into());
    }
    let ns = Ns(format!("flatlet-bench-{}", std::process::id()));
    ip(&["netns", "add", &ns.0])?;
    ip(&["-n", &ns.0, "tuntap", "add", "dev", "flbench0", "mode", "tap"])?;
    ip(&["-n", &ns.0, "link", "set", "flbench0", "up"])?;
    let mut out = Vec::new();
    for size in [VNET_HDR_LEN + 60, VNET_HDR_LEN + 1514] {
        let tap = open_tap_in(&ns.0, "flbench0")?;
        let f = frame(size);
        let start = Instant::now();
        let mut sent = 0;
        while sent < frames {
            match (&tap).write_frame(&f) {
                Ok(_) => sent += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => return Err(format!("TAP write: {e}")),
            }
        }
        let baseline = start.elapsed();
        drop(tap);
        let device = time_virtio_net_tx(open_tap_in(&ns.0, "flbench0")?, &f, frames)?;
        out.push(Throughput {
            what: format!("virtio-net TX ({}-byte frames, TAP)", size - VNET_HDR_LEN),
            unit: "frames/s",
            device: rate(frames as f64, device),
            baseline: rate(frames as f64, baseline),
        });
    }
    out.extend(net_rx(&ns.0, frames)?);
    Ok(out)
}

/// Frames the receive benchmark has the host send before each timed
/// drain: fewer than the TAP queues (its txqueuelen, 500 or more).
const RX_BATCH: usize = 128;

/// virtio-net receive against read(2) from the TAP. The host sends
/// `RX_BATCH` UDP datagrams out of the TAP (untimed), then either reads
/// them from the TAP or has the device move them into the guest's
/// receive buffers (timed), until `frames` have been taken.
fn net_rx(ns: &str, frames: usize) -> Result<Vec<Throughput>, String> {
    ip(&["-n", ns, "addr", "add", "10.99.0.1/24", "dev", "flbench0"])?;
    ip(&[
        "-n",
        ns,
        "neigh",
        "add",
        "10.99.0.2",
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "flbench0",
    ])?;
    let mut out = Vec::new();
    // Ethernet + IPv4 + UDP headers are 42 bytes.
    for (label, payload) in [(60, 18), (1514, 1472)] {
        let data = vec![0x5au8; payload];
        let tap = open_tap_in(ns, "flbench0")?;
        let sock = udp_in(ns, "10.99.0.2:9")?;
        let mut buf = vec![0u8; 65 * 1024];
        let (mut taken, mut baseline) = (0, Duration::ZERO);
        while taken < frames {
            send_all(&sock, &data, RX_BATCH)?;
            let start = Instant::now();
            loop {
                match std::io::Read::read(&mut { &tap }, &mut buf) {
                    Ok(_) => taken += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("TAP read: {e}")),
                }
            }
            baseline += start.elapsed();
        }
        let base_frames = taken;
        drop(tap);
        let (device_frames, device) = time_virtio_net_rx(open_tap_in(ns, "flbench0")?, &sock, &data, frames)?;
        out.push(Throughput {
            what: format!("virtio-net RX ({label}-byte frames, TAP)"),
            unit: "frames/s",
            device: rate(device_frames as f64, device),
            baseline: rate(base_frames as f64, baseline),
        });
    }
    Ok(out)
}

/// A UDP socket made inside namespace `ns`, connected to `to`.
fn udp_in(ns: &str, to: &str) -> Result<std::net::UdpSocket, String> {
    let path = format!("/var/run/netns/{ns}");
    let to = to.to_string();
    std::thread::spawn(move || -> Result<std::net::UdpSocket, String> {
        let f = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns: {e}"))?;
        let s = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("UDP socket: {e}"))?;
        s.connect(&to).map_err(|e| format!("UDP connect {to}: {e}"))?;
        Ok(s)
    })
    .join()
    .map_err(|_| "socket thread panicked".to_string())?
}

fn send_all(sock: &std::net::UdpSocket, data: &[u8], n: usize) -> Result<(), String> {
    for _ in 0..n {
        sock.send(data).map_err(|e| format!("UDP send: {e}"))?;
    }
    Ok(())
}

fn time_virtio_net_rx(
    tap: File,
    sock: &std::net::UdpSocket,
    data: &[u8],
    frames: usize,
) -> Result<(usize, Duration), String> {
    const BUF: u32 = 2048;
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).map_err(|e| e.to_string())?;
    let mut dev = Net::new(Box::new(tap), None, "bench").map_err(|e| e.to_string())?;
    let mut rx = Driver::new(mem.clone());
    // Only the RX queue is driven; TX gets an empty queue of its own.
    let mut tx_queue = Driver::new(mem.clone()).queue()?;
    tx_queue
        .try_set_desc_table_address(GuestAddress(0x20_0000))
        .map_err(|e| e.to_string())?;
    tx_queue
        .try_set_avail_ring_address(GuestAddress(0x21_0000))
        .map_err(|e| e.to_string())?;
    tx_queue
        .try_set_used_ring_address(GuestAddress(0x22_0000))
        .map_err(|e| e.to_string())?;
    dev.activate(activation(&mem, vec![rx.queue()?, tx_queue]))
        .map_err(|e| e.to_string())?;
    const WRITE: u16 = 2;
    for i in 0..QSIZE {
        rx.desc(i, DATA + u64::from(BUF) * u64::from(i), BUF, WRITE, 0)?;
    }
    let mut elapsed = Duration::ZERO;
    let mut next = 0u16;
    let mut taken = 0;
    while taken < frames {
        // The guest's buffers for this batch (its driver's work, untimed).
        for _ in 0..RX_BATCH {
            rx.push(next % QSIZE)?;
            next = next.wrapping_add(1);
        }
        send_all(sock, data, RX_BATCH)?;
        let before = dev.stats().rx_frames;
        let start = Instant::now();
        dev.process_rx();
        elapsed += start.elapsed();
        let got = (dev.stats().rx_frames - before) as usize;
        if got == 0 {
            return Err("virtio-net received nothing".into());
        }
        taken += got;
        // Buffers the batch left unused are given again next time: take
        // the avail index back to what the device used.
        rx.avail_idx = rx.avail_idx.wrapping_sub((RX_BATCH - got.min(RX_BATCH)) as u16);
        next = next.wrapping_sub((RX_BATCH - got.min(RX_BATCH)) as u16);
    }
    Ok((taken, elapsed))
}

trait WriteFrame {
    fn write_frame(self, f: &[u8]) -> std::io::Result<usize>;
}

impl WriteFrame for &File {
    fn write_frame(self, f: &[u8]) -> std::io::Result<usize> {
        std::io::Write::write(&mut { self }, f)
    }
}

fn time_virtio_net_tx(tap: File, f: &[u8], frames: usize) -> Result<Duration, String> {
    const BATCH: usize = 128;
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).map_err(|e| e.to_string())?;
    let mut dev = Net::new(Box::new(tap), None, "bench").map_err(|e| e.to_string())?;
    let rx = Driver::new(mem.clone());
    let mut tx = Driver::new(mem.clone());
    // Only the TX queue is driven; RX gets an empty queue of its own.
    let mut rx_queue = rx.queue()?;
    rx_queue
        .try_set_desc_table_address(GuestAddress(0x20_0000))
        .map_err(|e| e.to_string())?;
    rx_queue
        .try_set_avail_ring_address(GuestAddress(0x21_0000))
        .map_err(|e| e.to_string())?;
    rx_queue
        .try_set_used_ring_address(GuestAddress(0x22_0000))
        .map_err(|e| e.to_string())?;
    dev.activate(activation(&mem, vec![rx_queue, tx.queue()?]))
        .map_err(|e| e.to_string())?;
    for i in 0..BATCH as u16 {
        let addr = DATA + 0x1_0000 * u64::from(i);
        mem.write_slice(f, GuestAddress(addr))
            .map_err(|e| e.to_string())?;
        tx.desc(i, addr, f.len() as u32, 0, 0)?;
    }
    // Only the device's work is timed: making the frames available is the
    // guest driver's.
    let mut elapsed = Duration::ZERO;
    let mut done = 0;
    while done < frames {
        let n = BATCH.min(frames - done);
        for i in 0..n {
            tx.push(i as u16)?;
        }
        let start = Instant::now();
        let got = dev.process_tx();
        elapsed += start.elapsed();
        if got != n {
            return Err(format!("virtio-net took {got} of {n} frames"));
        }
        done += n;
    }
    let stats = dev.stats();
    if stats.dropped != 0 {
        return Err(format!("virtio-net dropped {} frames", stats.dropped));
    }
    Ok(elapsed)
}
