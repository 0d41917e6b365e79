//! virtio-net backed by a TAP device (opened with `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`, a 12-byte virtio-net header): one receive and one
//! transmit queue, no offloads.
//!
//! Receive is driven by the TAP's readiness and the guest's buffers: a
//! frame read from the TAP waits in the device until the guest has a
//! buffer for it (the TAP is not read meanwhile), so no frame is lost or
//! duplicated when the guest's receive queue is full. Transmit takes each
//! chain of device-readable descriptors as one frame. Malformed chains
//! (indirect descriptors included: the feature is not offered) are
//! dropped, counted, and logged at a bounded rate.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::warn;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::chain::{
    ChainError, Layout, add_used, avail_index, descriptors_into, gather, pop_head, scatter, take_head, total,
};
use super::{
    ActivateError, Activation, F_VERSION_1, TYPE_NET, VirtioDevice, VirtioInterrupt, read_config_bytes,
};
use crate::rate_limiter::{BucketUpdate, RateLimiter, device as limits};
use crate::ratelimit::LogLimiter;
use std::io::{Read, Write};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The virtio-net header of virtio 1.x (`virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame (header included) the device moves: a 64 KiB IP packet
/// plus Ethernet and virtio headers.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 14 + 65535;

const F_MAC: u64 = 1 << 5;
const RX: usize = 0;
const TX: usize = 1;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS: usize = 10;

/// Where frames go to and come from: a TAP device, or (in tests) a socket.
pub trait NetBackend: AsRawFd + Send {
    /// Reads one frame (with its virtio-net header), without blocking.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame (with its virtio-net header).
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize>;
}

impl NetBackend for std::fs::File {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.write(frame)
    }
}

impl NetBackend for UnixDatagram {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.send(frame)
    }
}

/// Where frames for a service inside flatlet (MMDS) go instead of the
/// TAP, and where that service's frames for the guest come from. Frames
/// are Ethernet frames, without the virtio-net header.
pub trait FrameDetour: Send {
    /// Takes a frame the guest transmits if it is for the service;
    /// returns whether it did (the frame then never reaches the TAP).
    fn detour_tx(&mut self, frame: &[u8]) -> bool;
    /// Writes the service's next frame for the guest into `buf`.
    fn next_rx_frame(&mut self, buf: &mut [u8]) -> Option<usize>;
    /// Whether the service has frames for the guest.
    fn has_pending(&self) -> bool;
    /// The service's counters, for metrics.
    fn counters(&self) -> Vec<(&'static str, u64)>;
}

/// Errors creating a net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// An eventfd could not be made.
    #[error("eventfd: {0}")]
    EventFd(io::Error),
}

/// Counters, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames sent to the backend.
    pub tx_frames: u64,
    /// Frames given to the guest.
    pub rx_frames: u64,
    /// Frames or chains dropped.
    pub dropped: u64,
    /// Times receive waited for guest buffers.
    pub rx_deferred: u64,
    /// Notifications with an available index the queue cannot hold (or
    /// an unreadable available ring): nothing is processed.
    pub invalid_avail_idx: u64,
    /// Chains using an indirect descriptor (not offered): dropped.
    pub indirect: u64,
    /// Frame bytes sent (without the virtio-net header).
    pub tx_bytes: u64,
    /// Frame bytes given to the guest (without the header).
    pub rx_bytes: u64,
    /// Transmit queue notifications handled.
    pub tx_queue_events: u64,
    /// Receive queue notifications handled.
    pub rx_queue_events: u64,
    /// TAP readiness events handled.
    pub rx_tap_events: u64,
    /// Frames the transmit rate limiter held back.
    pub tx_throttled: u64,
    /// Frames the receive rate limiter held back.
    pub rx_throttled: u64,
}

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: VirtioInterrupt,
}

/// What happened to the pending receive frame.
enum Delivery {
    Delivered,
    NoBuffer,
}

/// A virtio network device.
pub struct Net {
    backend: Box<dyn NetBackend>,
    mac: Option<[u8; 6]>,
    queue_evts: [EventFd; 2],
    queue_sizes: [u16; 2],
    activate_evt: EventFd,
    active: Option<Active>,
    rx_frame: Vec<u8>,
    rx_len: usize,
    tap_watched: bool,
    tx_buf: Vec<u8>,
    /// The transmit chain being read, kept between frames (no allocation
    /// per frame).
    tx_chain: (Vec<virtio_queue::desc::split::Descriptor>, Layout),
    /// The same for the receive chain being filled.
    rx_chain: (Vec<virtio_queue::desc::split::Descriptor>, Layout),
    log: LogLimiter,
    stats: NetStats,
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
    detour: Option<Box<dyn FrameDetour>>,
}

impl Net {
    /// A device over `backend` (which must be non-blocking), with `mac`
    /// in its configuration space if given.
    pub fn new(backend: Box<dyn NetBackend>, mac: Option<[u8; 6]>, id: &str) -> Result<Self, NetError> {
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Self {
            backend,
            mac,
            queue_evts: [evt()?, evt()?],
            queue_sizes: [QUEUE_SIZE; 2],
            activate_evt: evt()?,
            active: None,
            rx_frame: vec![0; MAX_FRAME],
            rx_len: 0,
            tap_watched: false,
            tx_buf: vec![0; MAX_FRAME],
            tx_chain: Default::default(),
            rx_chain: Default::default(),
            log: LogLimiter::new(format!("virtio-net {id}")),
            stats: NetStats::default(),
            rx_limiter: None,
            tx_limiter: None,
            detour: None,
        })
    }

    /// Sends the guest's frames for a service inside flatlet (MMDS) to
    /// `detour`, and gives the guest its frames before the TAP's.
    pub fn set_detour(&mut self, detour: Box<dyn FrameDetour>) {
        self.detour = Some(detour);
    }

    fn detour_pending(&self) -> bool {
        self.detour.as_ref().is_some_and(|d| d.has_pending())
    }

    /// Moves the detour's next frame (if any) into the receive frame,
    /// behind a zeroed header; returns its length with the header, or 0.
    fn detour_frame(&mut self) -> usize {
        let Some(d) = self.detour.as_mut() else { return 0 };
        match d.next_rx_frame(&mut self.rx_frame[VNET_HDR_LEN..]) {
            Some(n) => {
                self.rx_frame[..VNET_HDR_LEN].fill(0);
                VNET_HDR_LEN + n
            }
            None => 0,
        }
    }

    /// Limits receive and transmit (`rx_rate_limiter`,
    /// `tx_rate_limiter`); an interface that may be limited later
    /// (`PATCH`) gets limiters with no bucket.
    pub fn set_rate_limiters(&mut self, rx: RateLimiter, tx: RateLimiter) {
        self.rx_limiter = Some(rx);
        self.tx_limiter = Some(tx);
    }

    /// Changes the limits of a running interface (`PATCH`): (bandwidth,
    /// ops) for receive, then for transmit.
    pub fn update_rate_limiters(
        &mut self,
        rx: (BucketUpdate, BucketUpdate),
        tx: (BucketUpdate, BucketUpdate),
    ) -> bool {
        let rx_done = limits::update(self.rx_limiter.as_mut(), rx.0, rx.1);
        limits::update(self.tx_limiter.as_mut(), tx.0, tx.1) && rx_done
    }

    /// The counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Sends every frame the guest has queued; returns how many chains it
    /// consumed.
    pub fn process_tx(&mut self) -> usize {
        let Some(a) = self.active.as_mut() else { return 0 };
        let mut done = 0;
        // The available index is read once for all the chains it shows,
        // then again once they are done.
        let mut avail = None;
        loop {
            let mut head = match avail {
                Some(avail) => take_head(&mut a.tx, &a.mem, avail),
                None => Ok(None),
            };
            if matches!(head, Ok(None)) {
                head = match avail_index(&a.tx, &a.mem) {
                    Ok(Some(now)) if Some(now) != avail => {
                        avail = Some(now);
                        take_head(&mut a.tx, &a.mem, now)
                    }
                    Ok(_) => Ok(None),
                    Err(e) => Err(e),
                };
            }
            let head = match head {
                Ok(Some(head)) => head,
                Ok(None) => break,
                Err(e) => {
                    self.stats.invalid_avail_idx += 1;
                    self.log.warn(format_args!("transmit queue ignored: {e}"));
                    break;
                }
            };
            let frame = frame_of(&a.mem, &a.tx, head, &mut self.tx_chain, &mut self.tx_buf);
            if let Ok(len) = &frame {
                let bytes = len.saturating_sub(VNET_HDR_LEN) as u64;
                if !limits::admit(self.tx_limiter.as_mut(), &mut a.tx, 1, bytes) {
                    // Left in the queue, for when the limiter's timer fires.
                    self.stats.tx_throttled += 1;
                    break;
                }
            }
            let detoured =
                |d: &mut Box<dyn FrameDetour>, len: usize| d.detour_tx(&self.tx_buf[VNET_HDR_LEN..len]);
            match frame {
                Ok(len) if self.detour.as_mut().is_some_and(|d| detoured(d, len)) => {}
                Ok(len) => match self.backend.write_frame(&self.tx_buf[..len]) {
                    Ok(_) => {
                        self.stats.tx_frames += 1;
                        self.stats.tx_bytes += len.saturating_sub(VNET_HDR_LEN) as u64;
                    }
                    Err(e) => {
                        self.stats.dropped += 1;
                        self.log.warn(format_args!("TAP write: {e}"));
                    }
                },
                Err(why) => {
                    self.stats.dropped += 1;
                    if why == FrameError::Chain(ChainError::Indirect) {
                        self.stats.indirect += 1;
                    }
                    self.log.warn(format_args!("transmit chain dropped: {why}"));
                }
            }
            if let Err(e) = add_used(&mut a.tx, &a.mem, head, 0) {
                self.log
                    .warn(format_args!("cannot return descriptor {head}: {e}"));
                break;
            }
            done += 1;
        }
        if done > 0 {
            notify(a, TX);
        }
        done
    }

    /// Moves frames from the backend to the guest while it has buffers.
    /// Returns whether a frame is waiting for guest buffers.
    pub fn process_rx(&mut self) -> bool {
        let mut delivered = 0;
        loop {
            if self.rx_len == 0 {
                self.rx_len = self.detour_frame();
            }
            if self.rx_len == 0 {
                match self.backend.read_frame(&mut self.rx_frame) {
                    Ok(n) if n >= VNET_HDR_LEN => self.rx_len = n,
                    Ok(_) => {
                        self.stats.dropped += 1;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.log.warn(format_args!("TAP read: {e}"));
                        break;
                    }
                }
            }
            if let Some(limiter) = self.rx_limiter.as_mut().filter(|l| l.is_limiting()) {
                // The frame waits (and the TAP is not read) until the
                // limiter's timer fires.
                if !limiter.consume(1, self.rx_len.saturating_sub(VNET_HDR_LEN) as u64) {
                    self.stats.rx_throttled += 1;
                    break;
                }
            }
            match self.deliver() {
                Delivery::Delivered => {
                    self.rx_len = 0;
                    delivered += 1;
                }
                Delivery::NoBuffer => {
                    self.stats.rx_deferred += 1;
                    break;
                }
            }
        }
        if delivered > 0 {
            if let Some(a) = self.active.as_mut() {
                notify(a, RX);
            }
        }
        self.rx_len > 0
    }

    /// Gives the pending frame to the guest's next receive buffer.
    fn deliver(&mut self) -> Delivery {
        let Some(a) = self.active.as_mut() else {
            return Delivery::NoBuffer;
        };
        // The device, not the TAP, says how many buffers the frame took.
        self.rx_frame[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&1u16.to_le_bytes());
        let frame = &self.rx_frame[..self.rx_len];
        loop {
            let head = match pop_head(&mut a.rx, &a.mem) {
                Ok(Some(head)) => head,
                Ok(None) => return Delivery::NoBuffer,
                Err(e) => {
                    self.stats.invalid_avail_idx += 1;
                    self.log.warn(format_args!("receive queue ignored: {e}"));
                    return Delivery::NoBuffer;
                }
            };
            let chain = receive_buffer(&a.mem, &a.rx, head, &mut self.rx_chain);
            let regions = &self.rx_chain.1.writable;
            let written = match chain {
                Ok(()) if total(regions) >= frame.len() => match scatter(&a.mem, regions, frame) {
                    Ok(()) => Some(frame.len() as u32),
                    Err(e) => {
                        self.log.warn(format_args!("receive buffer: {e}"));
                        None
                    }
                },
                Ok(()) => {
                    self.log.warn(format_args!(
                        "receive buffer of {} bytes cannot hold a {}-byte frame; frame dropped",
                        total(regions),
                        frame.len()
                    ));
                    self.stats.dropped += 1;
                    let _ = add_used(&mut a.rx, &a.mem, head, 0);
                    return Delivery::Delivered;
                }
                Err(e) => {
                    if e == ChainError::Indirect {
                        self.stats.indirect += 1;
                    }
                    self.log.warn(format_args!("receive chain dropped: {e}"));
                    None
                }
            };
            match written {
                Some(len) => {
                    if let Err(e) = add_used(&mut a.rx, &a.mem, head, len) {
                        self.log
                            .warn(format_args!("cannot return descriptor {head}: {e}"));
                    }
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += (len as u64).saturating_sub(VNET_HDR_LEN as u64);
                    return Delivery::Delivered;
                }
                // A bad chain is returned empty; the frame tries the next.
                None => {
                    self.stats.dropped += 1;
                    let _ = add_used(&mut a.rx, &a.mem, head, 0);
                }
            }
        }
    }

    fn watch_tap(&mut self, ops: &mut EventOps, on: bool) {
        if on == self.tap_watched {
            return;
        }
        let fd = self.backend.as_raw_fd();
        let result = if on {
            ops.add(Events::new_raw(fd, EventSet::IN))
        } else {
            ops.remove(Events::empty_raw(fd))
        };
        match result {
            Ok(()) => self.tap_watched = on,
            Err(e) => warn!("virtio-net: cannot change the TAP's watch: {e}"),
        }
    }

    fn config_space(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        if let Some(mac) = self.mac {
            c[..6].copy_from_slice(&mac);
        }
        c
    }
}

/// Interrupts the guest for queue `which` if it asked to be.
fn notify(a: &mut Active, which: usize) {
    let q = if which == RX { &mut a.rx } else { &mut a.tx };
    if q.needs_notification(&a.mem).unwrap_or(true) {
        a.interrupt.signal_used();
    }
}

/// Why a transmit chain is dropped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum FrameError {
    /// The chain itself is malformed.
    #[error("{0}")]
    Chain(#[from] ChainError),
    /// Buffers the device would write to.
    #[error("device-writable descriptors in a transmit chain")]
    Writable,
    /// Too short for headers, or longer than a frame can be.
    #[error("frame of {0} bytes")]
    Length(usize),
    /// Guest memory could not be read.
    #[error("guest memory: {0}")]
    Memory(String),
}

/// Gathers the transmit chain at `head` into `buf`; returns its length.
/// The virtio-net header is cleared: flatlet offers no offloads, so the
/// host kernel must never act on offload fields a guest made up.
fn frame_of(
    mem: &GuestMemoryMmap,
    queue: &Queue,
    head: u16,
    chain: &mut (Vec<virtio_queue::desc::split::Descriptor>, Layout),
    buf: &mut [u8],
) -> Result<usize, FrameError> {
    let (descs, layout) = chain;
    descriptors_into(mem, queue, head, descs)?;
    layout.fill(mem, descs)?;
    if !layout.writable.is_empty() {
        return Err(FrameError::Writable);
    }
    let len = total(&layout.readable);
    if len < VNET_HDR_LEN + 14 || len > buf.len() {
        return Err(FrameError::Length(len));
    }
    gather(mem, &layout.readable, &mut buf[..len]).map_err(|e| FrameError::Memory(e.to_string()))?;
    buf[..VNET_HDR_LEN].fill(0);
    Ok(len)
}

/// The device-writable regions of the receive chain at `head` (a receive
/// buffer has no device-readable part).
/// Its regions are left in `chain`'s layout, kept between frames.
fn receive_buffer(
    mem: &GuestMemoryMmap,
    queue: &Queue,
    head: u16,
    chain: &mut (Vec<virtio_queue::desc::split::Descriptor>, Layout),
) -> Result<(), ChainError> {
    let (descs, layout) = chain;
    descriptors_into(mem, queue, head, descs)?;
    layout.fill(mem, descs)?;
    if !layout.readable.is_empty() {
        return Err(ChainError::WrongDirection);
    }
    Ok(())
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | if self.mac.is_some() { F_MAC } else { 0 }
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
        let got = a.queues.len();
        let mut queues = a.queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        self.active = Some(Active {
            mem: a.mem,
            rx,
            tx,
            interrupt: a.interrupt,
        });
        // The VMM thread starts watching the TAP when it sees this.
        self.activate_evt
            .write(1)
            .map_err(|e| ActivateError::Signal(e.to_string()))
    }

    fn reset(&mut self) {
        self.active = None;
        // A frame that waited for the old driver's buffers is dropped,
        // and counted as such.
        if self.rx_len > 0 {
            self.stats.dropped += 1;
        }
        self.rx_len = 0;
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active.as_ref().map(|a| vec![a.rx.state(), a.tx.state()])
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = self.stats;
        let mut counters = vec![
            // Firecracker's names first (its `net` metrics), then
            // flatlet's own.
            ("tx_packets_count", s.tx_frames),
            ("rx_packets_count", s.rx_frames),
            ("tx_count", s.tx_frames),
            ("rx_count", s.rx_frames),
            ("tx_bytes_count", s.tx_bytes),
            ("rx_bytes_count", s.rx_bytes),
            ("tx_queue_event_count", s.tx_queue_events),
            ("rx_queue_event_count", s.rx_queue_events),
            ("rx_tap_event_count", s.rx_tap_events),
            ("tx_rate_limiter_throttled", s.tx_throttled),
            ("rx_rate_limiter_throttled", s.rx_throttled),
            ("dropped", s.dropped),
            ("rx_deferred", s.rx_deferred),
            ("invalid_avail_idx_count", s.invalid_avail_idx),
            ("indirect_desc_count", s.indirect),
        ];
        counters.extend(self.detour.iter().flat_map(|d| d.counters()));
        counters
    }
}

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if limits::on_event(self.tx_limiter.as_mut(), fd) {
            self.process_tx();
            if !self.detour_pending() {
                return;
            }
        } else if limits::on_event(self.rx_limiter.as_mut(), fd) {
            // The waiting frame may go now: receive, below.
        } else if fd == self.activate_evt.as_raw_fd() {
            let _ = self.activate_evt.read();
        } else if fd == self.queue_evts[TX].as_raw_fd() {
            let _ = self.queue_evts[TX].read();
            self.stats.tx_queue_events += 1;
            self.process_tx();
            // Replies of a detour (MMDS) go out with the receive path.
            if !self.detour_pending() {
                return;
            }
        } else if fd == self.queue_evts[RX].as_raw_fd() {
            let _ = self.queue_evts[RX].read();
            self.stats.rx_queue_events += 1;
        } else {
            self.stats.rx_tap_events += 1;
        }
        // Activation, new receive buffers or TAP readiness: receive.
        if self.active.is_none() {
            self.watch_tap(ops, false);
            return;
        }
        let waiting = self.process_rx();
        // While a frame waits for buffers, the TAP is not read (nor
        // watched, so a level-triggered epoll does not spin on it).
        self.watch_tap(ops, !waiting);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for evt in [&self.activate_evt, &self.queue_evts[RX], &self.queue_evts[TX]] {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                warn!("virtio-net: cannot watch an event: {e}");
            }
        }
        limits::watch_timer(self.rx_limiter.as_ref(), ops, "virtio-net receive");
        limits::watch_timer(self.tx_limiter.as_ref(), ops, "virtio-net transmit");
    }
}

#[cfg(test)]
mod detour_tests;
#[cfg(test)]
mod tests;
