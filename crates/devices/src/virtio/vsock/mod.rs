//! virtio-vsock (device id 19) with Firecracker's host side: stream
//! sockets between guest ports and host Unix sockets (see [`muxer`]).
//!
//! Three queues: receive (device to guest), transmit (guest to device)
//! and event (kept, unused until snapshots need
//! `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`). The configuration space holds
//! the guest's CID. Every transmit chain is checked ([`packet`]) before
//! the muxer sees it; a malformed one is returned, counted, logged at a
//! bounded rate, and never answered with more than an RST. Queue work,
//! host sockets and timeouts all run on the VMM thread's event loop, and
//! nothing there blocks.

pub mod connection;
pub mod muxer;
pub mod packet;
pub mod stats;

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::warn;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::chain::{Layout, descriptors, pop_head, scatter, total};
use super::{ActivateError, Activation, F_VERSION_1, VirtioDevice, VirtioInterrupt, read_config_bytes};
use crate::ratelimit::LogLimiter;
use crate::timer::Timer;
use muxer::Muxer;
pub use muxer::{MAX_CONNECTIONS, MuxerError, Watch, bind};
use packet::{PacketError, read_tx, rx_buffer};
pub use stats::VsockStats;

/// Device ID of a vsock device.
pub const TYPE_VSOCK: u32 = 19;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The smallest CID a guest may have (0-2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;

const RX: usize = 0;
const TX: usize = 1;
const EV: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, the event's id (a le32).
const EVENT_TRANSPORT_RESET: u32 = 0;
/// How often deadlines are checked while there are any.
const TICK: Duration = Duration::from_millis(250);

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// An eventfd or timer could not be made.
    #[error("vsock: {0}")]
    Io(#[from] io::Error),
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: VirtioInterrupt,
}

/// A virtio-vsock device.
pub struct Vsock {
    cid: u64,
    queue_evts: [EventFd; 3],
    queue_sizes: [u16; 3],
    kick: EventFd,
    timer: Timer,
    timer_armed: bool,
    active: Option<Active>,
    muxer: Muxer,
    log: LogLimiter,
}

impl Vsock {
    /// A device for guest `cid`, taking host connections on `listener`
    /// (bound at `uds_path`, see [`bind`]).
    pub fn new(cid: u64, uds_path: PathBuf, listener: UnixListener) -> Result<Self, VsockError> {
        let evt = || EventFd::new(EFD_NONBLOCK);
        Ok(Self {
            cid,
            queue_evts: [evt()?, evt()?, evt()?],
            queue_sizes: [QUEUE_SIZE; 3],
            kick: evt()?,
            timer: Timer::new()?,
            timer_armed: false,
            active: None,
            log: LogLimiter::new(format!("vsock cid {cid}")),
            muxer: Muxer::new(uds_path, listener, cid),
        })
    }

    /// The counters.
    pub fn stats(&self) -> VsockStats {
        self.muxer.stats
    }

    /// Connections open now.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Handles every chain the guest made available on the transmit
    /// queue; returns how many.
    pub fn process_tx(&mut self, w: &mut dyn Watch) -> usize {
        let Some(a) = self.active.as_mut() else { return 0 };
        let now = Instant::now();
        let mut done = 0;
        loop {
            let head = match pop_head(&mut a.queues[TX], &a.mem) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    self.muxer.stats.invalid_avail_idx += 1;
                    self.log.warn(format_args!("transmit queue ignored: {e}"));
                    break;
                }
            };
            self.muxer.stats.tx_packets_count += 1;
            match read_tx(&a.mem, &a.queues[TX], head) {
                Ok(pkt) => self.muxer.on_guest_packet(&a.mem, &pkt, now, w),
                Err(e) => {
                    match e {
                        PacketError::Chain(_) | PacketError::Direction => {
                            self.muxer.stats.invalid_chains += 1
                        }
                        _ => self.muxer.stats.bad_packets += 1,
                    }
                    self.log.warn(format_args!("transmit chain dropped: {e}"));
                }
            }
            if let Err(e) = a.queues[TX].add_used(&a.mem, head, 0) {
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

    /// Gives the guest what the muxer has for it, while the guest has
    /// receive buffers. Returns how many packets.
    pub fn process_rx(&mut self, w: &mut dyn Watch) -> usize {
        let Some(a) = self.active.as_mut() else { return 0 };
        let mut done = 0;
        while self.muxer.has_rx_work() {
            let head = match pop_head(&mut a.queues[RX], &a.mem) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    self.muxer.stats.invalid_avail_idx += 1;
                    self.log.warn(format_args!("receive queue ignored: {e}"));
                    break;
                }
            };
            let len = match rx_buffer(&a.mem, &a.queues[RX], head) {
                Ok(regions) => match self.muxer.fill_rx(&a.mem, &regions, w) {
                    Some(len) => len,
                    None => {
                        // Nothing after all: the buffer goes back unused.
                        let back = a.queues[RX].next_avail().wrapping_sub(1);
                        a.queues[RX].set_next_avail(back);
                        break;
                    }
                },
                Err(e) => {
                    self.muxer.stats.invalid_chains += 1;
                    self.log.warn(format_args!("receive chain returned unused: {e}"));
                    0
                }
            };
            if let Err(e) = a.queues[RX].add_used(&a.mem, head, len as u32) {
                self.log
                    .warn(format_args!("cannot return descriptor {head}: {e}"));
                break;
            }
            done += 1;
        }
        if done > 0 {
            notify(a, RX);
        }
        done
    }

    /// Tells the driver that every connection is gone (a snapshot was
    /// restored: the host side of each is in another process): one
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue, as the
    /// virtio spec (5.10.6.7) describes. Returns whether it was delivered;
    /// a driver that gave no event buffer does not get it.
    pub fn transport_reset(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let head = match pop_head(&mut a.queues[EV], &a.mem) {
            Ok(Some(h)) => h,
            Ok(None) => {
                self.log
                    .warn(format_args!("no event buffer for the transport reset"));
                return false;
            }
            Err(e) => {
                self.muxer.stats.invalid_avail_idx += 1;
                self.log.warn(format_args!("event queue ignored: {e}"));
                return false;
            }
        };
        let event = EVENT_TRANSPORT_RESET.to_le_bytes();
        let written = descriptors(&a.mem, &a.queues[EV], head)
            .and_then(|d| Layout::of(&a.mem, &d))
            .ok()
            .filter(|l| l.readable.is_empty() && total(&l.writable) >= event.len())
            .is_some_and(|l| scatter(&a.mem, &l.writable, &event).is_ok());
        if !written {
            self.muxer.stats.invalid_chains += 1;
            self.log.warn(format_args!(
                "event buffer {head} cannot take the transport reset"
            ));
        }
        let len = if written { event.len() as u32 } else { 0 };
        if let Err(e) = a.queues[EV].add_used(&a.mem, head, len) {
            self.log
                .warn(format_args!("cannot return event descriptor {head}: {e}"));
            return false;
        }
        notify(a, EV);
        written
    }

    fn sync_timer(&mut self) {
        let want = self.muxer.has_deadlines();
        if want == self.timer_armed {
            return;
        }
        let r = if want {
            self.timer.reset(TICK, Some(TICK))
        } else {
            self.timer.clear()
        };
        match r {
            Ok(()) => self.timer_armed = want,
            Err(e) => warn!("vsock: timer: {e}"),
        }
    }

    /// Handles readiness of `fd` (one of the device's own descriptors or
    /// a host socket), then moves what can move.
    pub fn handle(&mut self, fd: i32, set: EventSet, w: &mut dyn Watch) {
        let now = Instant::now();
        if fd == self.kick.as_raw_fd() {
            let _ = self.kick.read();
            if self.active.is_some() {
                self.muxer.start(w);
            } else {
                self.muxer.stop(w);
            }
        } else if fd == self.queue_evts[TX].as_raw_fd() {
            let _ = self.queue_evts[TX].read();
            self.muxer.stats.tx_queue_event_count += 1;
            self.process_tx(w);
        } else if fd == self.queue_evts[RX].as_raw_fd() {
            let _ = self.queue_evts[RX].read();
            self.muxer.stats.rx_queue_event_count += 1;
        } else if fd == self.queue_evts[EV].as_raw_fd() {
            let _ = self.queue_evts[EV].read();
        } else if fd == self.timer.as_raw_fd() {
            self.timer.consume();
            self.muxer.expire(now, w);
        } else if self.active.is_some() {
            self.muxer.on_event(fd, set, now, w);
        }
        self.process_rx(w);
        self.sync_timer();
    }
}

/// Interrupts the guest for queue `which` if it asked to be.
fn notify(a: &mut Active, which: usize) {
    if a.queues[which].needs_notification(&a.mem).unwrap_or(true) {
        a.interrupt.signal_used();
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn features(&self) -> u64 {
        F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        if a.queues.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: a.queues.len(),
            });
        }
        self.active = Some(Active {
            mem: a.mem,
            queues: a.queues,
            interrupt: a.interrupt,
        });
        // The VMM thread starts taking host connections when it sees this.
        self.kick
            .write(1)
            .map_err(|e| ActivateError::Signal(e.to_string()))
    }

    fn reset(&mut self) {
        self.active = None;
        // The VMM thread ends the connections (it owns their watches).
        if let Err(e) = self.kick.write(1) {
            warn!("vsock: cannot signal the reset: {e}");
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.muxer.stats.named()
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(|q| q.state()).collect())
    }

    fn restored(&mut self) {
        self.transport_reset();
    }
}

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.handle(events.fd(), events.event_set(), ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            self.kick.as_raw_fd(),
            self.queue_evts[RX].as_raw_fd(),
            self.queue_evts[TX].as_raw_fd(),
            self.queue_evts[EV].as_raw_fd(),
            self.timer.as_raw_fd(),
        ];
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                warn!("vsock: cannot watch an event: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
