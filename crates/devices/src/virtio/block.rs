//! virtio-blk backed by a raw image file.
//!
//! Requests: read (`IN`), write (`OUT`), flush (`FLUSH`, with the
//! write-back cache) and get-id (`GET_ID`). A read-only drive offers
//! `VIRTIO_BLK_F_RO` and refuses writes with an I/O-error status. The
//! capacity is the image's size in 512-byte sectors (a regular file's
//! length, or a block device's size: both are where a seek to the end
//! lands).
//!
//! One request moves at most [`MAX_REQUEST_BYTES`] (1 MiB), so that no
//! request holds the VMM thread for long: the device offers
//! `VIRTIO_BLK_F_SEG_MAX` and `VIRTIO_BLK_F_SIZE_MAX` with
//! [`SEG_MAX`] x [`SIZE_MAX`] = 1 MiB, which keeps a driver that accepts
//! them (Linux does) under the cap, and answers a bigger request with
//! `IOERR`. Indirect descriptors are not offered, and a chain that uses
//! one is returned unused (see [`super::chain`]).
//!
//! Every descriptor of a chain is checked against guest memory before any
//! byte moves, and data then moves directly between guest memory and the
//! image, without a copy through a host buffer. Anything malformed (short
//! header, data in the wrong direction, sectors past the end, lengths that
//! are not whole sectors) gets an error status, and a chain with no room
//! for the status byte is returned unused. Host I/O errors become `IOERR`.
//! Every such request is counted (see [`BlockStats`]), and logged at a
//! bounded rate.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::warn;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::chain::{
    ChainError, Layout, Region, descriptors, gather, pop_head, scatter, skip, take_last_byte, total,
};
use super::{ActivateError, Activation, F_VERSION_1, TYPE_BLOCK, VirtioDevice, read_config_bytes};
use crate::rate_limiter::{BucketUpdate, RateLimiter, device as limits};
use crate::ratelimit::LogLimiter;

/// Bytes in a sector.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Length of the id `GET_ID` returns.
pub const ID_LEN: usize = 20;

/// The most one request may move (data, not counting header and status).
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;
/// Data segments a request may have (`seg_max`), offered to the driver.
pub const SEG_MAX: u32 = 128;
/// Bytes in one segment (`size_max`), offered to the driver.
pub const SIZE_MAX: u32 = (MAX_REQUEST_BYTES / SEG_MAX as u64) as u32;

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// Request status values.
pub const S_OK: u8 = 0;
/// The request failed.
pub const S_IOERR: u8 = 1;
/// The request type is not supported.
pub const S_UNSUPP: u8 = 2;

/// The request header the driver sends first: type (u32), reserved
/// (u32), sector (u64), little endian.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestHeader {
    /// Request type.
    pub request_type: u32,
    /// First sector.
    pub sector: u64,
}

/// Size of the header.
pub const HEADER_LEN: usize = 16;

impl RequestHeader {
    /// Decodes a header.
    pub fn parse(raw: &[u8; HEADER_LEN]) -> Self {
        let [t0, t1, t2, t3, _, _, _, _, s @ ..] = *raw;
        Self {
            request_type: u32::from_le_bytes([t0, t1, t2, t3]),
            sector: u64::from_le_bytes(s),
        }
    }
}

/// The host's caching of the image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheType {
    /// No flush feature: the guest's flushes are not honoured (fast, unsafe
    /// on host crash).
    #[default]
    Unsafe,
    /// Flush is offered and becomes `fdatasync` of the image.
    Writeback,
}

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image's size cannot be found.
    #[error("cannot find the size of the image: {0}")]
    Size(io::Error),
    /// An eventfd could not be made.
    #[error("eventfd: {0}")]
    EventFd(io::Error),
}

/// Counters, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Reads completed.
    pub reads: u64,
    /// Writes completed.
    pub writes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Requests answered with an error status or dropped.
    pub errors: u64,
    /// Notifications with an available index the queue cannot hold (or
    /// an unreadable available ring): nothing is processed.
    pub invalid_avail_idx: u64,
    /// Chains using an indirect descriptor (not offered): dropped.
    pub indirect: u64,
    /// Other malformed chains (loops, bad indexes, buffers outside guest
    /// memory, readable after writable, no status byte).
    pub invalid_chains: u64,
    /// Requests over [`MAX_REQUEST_BYTES`]: answered with `IOERR`.
    pub oversized: u64,
    /// Bytes read from the image.
    pub bytes_read: u64,
    /// Bytes written to the image.
    pub bytes_written: u64,
    /// Queue notifications handled.
    pub queue_events: u64,
    /// Requests held back by the rate limiter (each resumes from its
    /// timer).
    pub throttled: u64,
}

use super::SingleQueue as Active;

/// A virtio block device.
pub struct Block {
    disk: File,
    sectors: u64,
    read_only: bool,
    cache: CacheType,
    id: [u8; ID_LEN],
    queue_evts: [EventFd; 1],
    queue_sizes: [u16; 1],
    active: Option<Active>,
    log: LogLimiter,
    stats: BlockStats,
    generation: u32,
    limiter: Option<RateLimiter>,
}

impl Block {
    /// A device over `disk`.
    pub fn new(disk: File, read_only: bool, cache: CacheType, id: &str) -> Result<Self, BlockError> {
        let size = image_size(&disk)?;
        if size % SECTOR_SIZE != 0 {
            warn!(
                "virtio-blk {id}: image size {size} is not a whole number of sectors; the last {} bytes are not visible",
                size % SECTOR_SIZE
            );
        }
        let mut id_bytes = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Self {
            disk,
            sectors: size / SECTOR_SIZE,
            read_only,
            cache,
            id: id_bytes,
            queue_evts: [EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?],
            queue_sizes: [QUEUE_SIZE],
            active: None,
            log: LogLimiter::new(format!("virtio-blk {id}")),
            stats: BlockStats::default(),
            generation: 0,
            limiter: None,
        })
    }

    /// Limits the drive's bandwidth and operations (`rate_limiter`). A
    /// drive that may be limited later (`PATCH`) gets one with no bucket.
    pub fn set_rate_limiter(&mut self, limiter: RateLimiter) {
        self.limiter = Some(limiter);
    }

    /// Changes the rate limits of a running drive (`PATCH /drives`).
    pub fn update_rate_limiter(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) -> bool {
        limits::update(self.limiter.as_mut(), bandwidth, ops)
    }

    /// Whether the rate limiter lets the request at `head` go now (one
    /// operation, its data bytes). When not, it stays in the queue.
    fn admit(&mut self, active: &mut Active, head: u16) -> bool {
        if !self.limiter.as_ref().is_some_and(RateLimiter::is_limiting) {
            return true;
        }
        let bytes = descriptors(&active.mem, &active.queue, head)
            .map(|d| d.iter().map(|d| u64::from(d.len())).sum::<u64>())
            .unwrap_or(0)
            .saturating_sub(HEADER_LEN as u64 + 1);
        let admitted = limits::admit(self.limiter.as_mut(), &mut active.queue, 1, bytes);
        if !admitted {
            self.stats.throttled += 1;
        }
        admitted
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether the drive is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Swaps the image for `disk` (`PATCH /drives`): the capacity follows
    /// the new file, and a running driver is told its configuration
    /// changed.
    pub fn replace_image(&mut self, disk: File) -> Result<(), BlockError> {
        let size = image_size(&disk)?;
        self.disk = disk;
        self.sectors = size / SECTOR_SIZE;
        self.generation = self.generation.wrapping_add(1);
        if let Some(a) = &self.active {
            a.interrupt.signal_config();
        }
        Ok(())
    }

    /// The counters.
    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    /// Handles every request the driver has made available; returns how
    /// many it completed. Interrupts the guest if it asked to be.
    pub fn process_queue(&mut self) -> usize {
        let Some(mut active) = self.active.take() else {
            return 0;
        };
        let mut done = 0;
        loop {
            let head = match pop_head(&mut active.queue, &active.mem) {
                Ok(Some(head)) => head,
                Ok(None) => break,
                Err(e) => {
                    self.stats.invalid_avail_idx += 1;
                    self.log.warn(format_args!("queue ignored: {e}"));
                    break;
                }
            };
            if !self.admit(&mut active, head) {
                break;
            }
            let len = self.execute(&active.mem, &active.queue, head);
            if let Err(e) = active.queue.add_used(&active.mem, head, len) {
                self.log
                    .warn(format_args!("cannot return descriptor {head}: {e}"));
                break;
            }
            done += 1;
        }
        if done > 0 {
            match active.queue.needs_notification(&active.mem) {
                Ok(true) => active.interrupt.signal_used(),
                Ok(false) => {}
                Err(e) => {
                    self.log.warn(format_args!("used ring: {e}"));
                    active.interrupt.signal_used();
                }
            }
        }
        self.active = Some(active);
        done
    }

    /// Runs the request at `head`; returns the bytes written into the
    /// chain.
    fn execute(&mut self, mem: &GuestMemoryMmap, queue: &Queue, head: u16) -> u32 {
        let descriptors = match descriptors(mem, queue, head) {
            Ok(d) => d,
            Err(e) => {
                // Not even the status byte can be trusted: returned unused.
                self.chain_fault(e);
                return 0;
            }
        };
        let layout = match Layout::of(mem, &descriptors) {
            Ok(l) => l,
            Err(e) => {
                self.chain_fault(e);
                return status_only(mem, descriptors.last(), S_IOERR);
            }
        };
        let mut data = layout.writable;
        // The status byte is the last device-writable byte.
        let Some(status_addr) = take_last_byte(&mut data) else {
            self.stats.errors += 1;
            self.stats.invalid_chains += 1;
            self.log
                .warn(format_args!("request without room for a status byte"));
            return 0;
        };
        let (status, written) = self.run(mem, &layout.readable, &data);
        if status != S_OK {
            self.stats.errors += 1;
        }
        if mem.write_obj(status, status_addr).is_err() {
            return 0;
        }
        written + 1
    }

    /// Counts (and logs, at a bounded rate) a chain that cannot be run.
    fn chain_fault(&mut self, e: ChainError) {
        self.stats.errors += 1;
        match e {
            ChainError::Indirect => self.stats.indirect += 1,
            _ => self.stats.invalid_chains += 1,
        }
        self.log.warn(format_args!("request dropped: {e}"));
    }

    /// Parses and performs a request; returns (status, bytes written to
    /// the guest before the status byte).
    fn run(&mut self, mem: &GuestMemoryMmap, readable: &[Region], writable: &[Region]) -> (u8, u32) {
        let mut raw = [0u8; HEADER_LEN];
        if total(readable) < HEADER_LEN || gather(mem, readable, &mut raw).is_err() {
            self.log.warn(format_args!("request header missing or short"));
            return (S_IOERR, 0);
        }
        let header = RequestHeader::parse(&raw);
        let payload = skip(readable, HEADER_LEN);
        match header.request_type {
            T_IN => self.read(mem, header.sector, &payload, writable),
            T_OUT => self.write(mem, header.sector, &payload, writable),
            T_FLUSH if self.cache == CacheType::Writeback => match self.disk.sync_data() {
                Ok(()) => {
                    self.stats.flushes += 1;
                    (S_OK, 0)
                }
                Err(e) => {
                    self.log.warn(format_args!("flush: {e}"));
                    (S_IOERR, 0)
                }
            },
            T_GET_ID => {
                let n = total(writable).min(ID_LEN);
                match scatter(mem, writable, &self.id[..n]) {
                    Ok(()) => (S_OK, n as u32),
                    Err(_) => (S_IOERR, 0),
                }
            }
            other => {
                self.log.debug(format_args!("unsupported request type {other}"));
                (S_UNSUPP, 0)
            }
        }
    }

    /// A read (`IN`) from `sector` into `writable`.
    fn read(
        &mut self,
        mem: &GuestMemoryMmap,
        sector: u64,
        payload: &[Region],
        writable: &[Region],
    ) -> (u8, u32) {
        if total(payload) != 0 {
            self.log
                .warn(format_args!("read request with device-readable data"));
            return (S_IOERR, 0);
        }
        let len = total(writable) as u64;
        let Some(offset) = self.check_range(sector, len) else {
            return (S_IOERR, 0);
        };
        match self.transfer(mem, writable, offset, Direction::FromImage) {
            Ok(()) => {
                self.stats.reads += 1;
                self.stats.bytes_read += len;
                (S_OK, len as u32)
            }
            Err(e) => {
                self.log.warn(format_args!("read at sector {sector}: {e}"));
                (S_IOERR, 0)
            }
        }
    }

    /// A write (`OUT`) of `payload` at `sector`.
    fn write(
        &mut self,
        mem: &GuestMemoryMmap,
        sector: u64,
        payload: &[Region],
        writable: &[Region],
    ) -> (u8, u32) {
        if self.read_only {
            self.log.warn(format_args!("write to a read-only drive refused"));
            return (S_IOERR, 0);
        }
        if total(writable) != 0 {
            self.log
                .warn(format_args!("write request with device-writable data"));
            return (S_IOERR, 0);
        }
        let len = total(payload) as u64;
        let Some(offset) = self.check_range(sector, len) else {
            return (S_IOERR, 0);
        };
        match self.transfer(mem, payload, offset, Direction::ToImage) {
            Ok(()) => {
                self.stats.writes += 1;
                self.stats.bytes_written += len;
                (S_OK, 0)
            }
            Err(e) => {
                self.log.warn(format_args!("write at sector {sector}: {e}"));
                (S_IOERR, 0)
            }
        }
    }

    /// The byte offset of `sector`, if `len` bytes from there are whole
    /// sectors inside the image, and no more than one request may move.
    fn check_range(&mut self, sector: u64, len: u64) -> Option<u64> {
        if len > MAX_REQUEST_BYTES {
            self.stats.oversized += 1;
            self.log.warn(format_args!(
                "request for {len} bytes refused: the limit is {MAX_REQUEST_BYTES}"
            ));
            return None;
        }
        let sectors = len / SECTOR_SIZE;
        let fits =
            len % SECTOR_SIZE == 0 && sector.checked_add(sectors).is_some_and(|end| end <= self.sectors);
        if !fits {
            self.log.warn(format_args!(
                "request for {len} bytes at sector {sector} is outside the {} sectors of the image or not whole sectors",
                self.sectors
            ));
            return None;
        }
        Some(sector * SECTOR_SIZE)
    }

    /// Moves the bytes of `regions` between guest memory and the image at
    /// `offset`, directly (no copy through a host buffer).
    fn transfer(
        &mut self,
        mem: &GuestMemoryMmap,
        regions: &[Region],
        offset: u64,
        dir: Direction,
    ) -> io::Result<()> {
        self.disk.seek(SeekFrom::Start(offset))?;
        for &(addr, len) in regions {
            match dir {
                Direction::FromImage => mem.read_exact_volatile_from(addr, &mut self.disk, len),
                Direction::ToImage => mem.write_all_volatile_to(addr, &mut self.disk, len),
            }
            .map_err(|e| io::Error::other(e.to_string()))?;
        }
        Ok(())
    }

    /// `virtio_blk_config` up to `seg_max`: capacity (u64), `size_max`
    /// (u32), `seg_max` (u32).
    fn config_space(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.sectors.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..].copy_from_slice(&SEG_MAX.to_le_bytes());
        c
    }
}

/// The size of an image: where a seek to its end lands. For a regular
/// file that is its length, for a block device its size (which its
/// metadata gives as 0).
fn image_size(disk: &File) -> Result<u64, BlockError> {
    let mut f = disk;
    f.seek(SeekFrom::End(0)).map_err(BlockError::Size)
}

/// Writes `status` into the last byte of the chain's last descriptor, if
/// that descriptor is device-writable and inside guest memory: the driver
/// then learns that a request it made up wrong failed. Returns the used
/// length (1, or 0 if there was no such byte).
fn status_only(mem: &GuestMemoryMmap, last: Option<&Descriptor>, status: u8) -> u32 {
    let Some(last) = last else { return 0 };
    if !last.is_write_only() || last.len() == 0 {
        return 0;
    }
    let Some(addr) = last.addr().checked_add(u64::from(last.len()) - 1) else {
        return 0;
    };
    u32::from(mem.write_obj(status, addr).is_ok())
}

/// Which way data moves.
#[derive(Clone, Copy)]
enum Direction {
    FromImage,
    ToImage,
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = F_VERSION_1 | F_SEG_MAX | F_SIZE_MAX;
        if self.read_only {
            f |= F_RO;
        }
        if self.cache == CacheType::Writeback {
            f |= F_FLUSH;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.active = Some(Active::from_activation(a)?);
        // Requests made before activation are picked up now.
        let _ = self.queue_evts[0].write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active.as_ref().map(|a| vec![a.queue.state()])
    }

    fn config_generation(&self) -> u32 {
        self.generation
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = self.stats;
        vec![
            // Firecracker's names first (its `block` metrics), then
            // flatlet's own.
            ("read_count", s.reads),
            ("write_count", s.writes),
            ("flush_count", s.flushes),
            ("read_bytes", s.bytes_read),
            ("write_bytes", s.bytes_written),
            ("queue_event_count", s.queue_events),
            ("execute_fails", s.errors),
            ("invalid_reqs_count", s.invalid_chains + s.oversized + s.indirect),
            ("invalid_avail_idx_count", s.invalid_avail_idx),
            ("indirect_desc_count", s.indirect),
            ("invalid_chain_count", s.invalid_chains),
            ("oversized_req_count", s.oversized),
            ("rate_limiter_throttled_events", s.throttled),
        ]
    }
}

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, _: &mut EventOps) {
        if !limits::on_event(self.limiter.as_mut(), events.fd()) {
            let _ = self.queue_evts[0].read();
            self.stats.queue_events += 1;
        }
        self.process_queue();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_evts[0], EventSet::IN)) {
            warn!("virtio-blk: cannot watch the queue: {e}");
        }
        limits::watch_timer(self.limiter.as_ref(), ops, "virtio-blk");
    }
}

#[cfg(test)]
mod tests;
