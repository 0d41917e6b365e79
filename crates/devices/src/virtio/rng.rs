//! virtio-rng, the entropy device (Firecracker's `PUT /entropy`): every
//! device-writable buffer the driver makes available is filled with bytes
//! from an entropy source (flatlet's VMM gives the host's `getrandom(2)`),
//! at most [`MAX_REQUEST_BYTES`] per request,
//! within the rate limiter's budget (bytes and requests). A chain that is
//! malformed or has no writable room is returned with nothing written,
//! and counted.

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::warn;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::chain::{Layout, descriptors, pop_head, scatter, total};
use super::{ActivateError, Activation, F_VERSION_1, VirtioDevice};
use crate::rate_limiter::{BucketUpdate, RateLimiter, device as limits};
use crate::ratelimit::LogLimiter;

/// Device ID of an entropy source.
pub const TYPE_RNG: u32 = 4;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most one request gets (Linux asks for far less).
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

/// Counters (Firecracker's `entropy` metric names in [`Rng::counters`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RngStats {
    /// Queue notifications handled.
    pub events: u64,
    /// Requests filled.
    pub requests: u64,
    /// Bytes given to the guest.
    pub bytes: u64,
    /// Requests that could not be filled (bad chains, no room).
    pub failed: u64,
    /// `getrandom` failures.
    pub host_failures: u64,
    /// Requests the rate limiter held back.
    pub throttled: u64,
}

use super::SingleQueue as Active;

/// Fills a buffer with random bytes.
pub type EntropySource = Box<dyn FnMut(&mut [u8]) -> std::io::Result<()> + Send>;

/// The entropy device.
pub struct Rng {
    source: EntropySource,
    queue_evts: [EventFd; 1],
    queue_sizes: [u16; 1],
    active: Option<Active>,
    limiter: Option<RateLimiter>,
    buf: Vec<u8>,
    log: LogLimiter,
    stats: RngStats,
}

impl Rng {
    /// An entropy device fed by `source`, limited by `limiter` if given.
    pub fn new(source: EntropySource, limiter: Option<RateLimiter>) -> std::io::Result<Self> {
        Ok(Self {
            source,
            queue_evts: [EventFd::new(EFD_NONBLOCK)?],
            queue_sizes: [QUEUE_SIZE],
            active: None,
            limiter,
            buf: vec![0; MAX_REQUEST_BYTES],
            log: LogLimiter::new("virtio-rng".into()),
            stats: RngStats::default(),
        })
    }

    /// The counters.
    pub fn stats(&self) -> RngStats {
        self.stats
    }

    /// Changes the rate limits (a running device's, too).
    pub fn update_rate_limiter(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) -> bool {
        limits::update(self.limiter.as_mut(), bandwidth, ops)
    }

    /// Fills every available buffer it may; returns how many it returned.
    pub fn process_queue(&mut self) -> usize {
        let Some(mut a) = self.active.take() else { return 0 };
        let mut done = 0;
        loop {
            let head = match pop_head(&mut a.queue, &a.mem) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    self.stats.failed += 1;
                    self.log.warn(format_args!("queue ignored: {e}"));
                    break;
                }
            };
            let layout = descriptors(&a.mem, &a.queue, head).and_then(|d| Layout::of(&a.mem, &d));
            let len = match layout {
                Ok(l) if total(&l.writable) > 0 => {
                    let n = total(&l.writable).min(MAX_REQUEST_BYTES);
                    if !limits::admit(self.limiter.as_mut(), &mut a.queue, 1, n as u64) {
                        self.stats.throttled += 1;
                        break;
                    }
                    self.fill(&a.mem, &l.writable, n)
                }
                Ok(_) => self.refuse(&"a request with no device-writable buffer"),
                Err(e) => self.refuse(&e),
            };
            if let Err(e) = a.queue.add_used(&a.mem, head, len) {
                self.log
                    .warn(format_args!("cannot return descriptor {head}: {e}"));
                break;
            }
            done += 1;
        }
        if done > 0 && a.queue.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.signal_used();
        }
        self.active = Some(a);
        done
    }

    /// Writes `n` random bytes into `regions`; returns how many it wrote.
    fn fill(&mut self, mem: &GuestMemoryMmap, regions: &[super::chain::Region], n: usize) -> u32 {
        let buf = &mut self.buf[..n];
        if let Err(e) = (self.source)(buf) {
            self.stats.host_failures += 1;
            self.log.warn(format_args!("getrandom: {e}"));
            return 0;
        }
        match scatter(mem, regions, buf) {
            Ok(()) => {
                self.stats.requests += 1;
                self.stats.bytes += n as u64;
                n as u32
            }
            Err(e) => {
                self.stats.failed += 1;
                self.log.warn(format_args!("buffer: {e}"));
                0
            }
        }
    }

    fn refuse(&mut self, e: &dyn std::fmt::Display) -> u32 {
        self.stats.failed += 1;
        self.log.warn(format_args!("request dropped: {e}"));
        0
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
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

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.active = Some(Active::from_activation(a)?);
        let _ = self.queue_evts[0].write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active.as_ref().map(|a| vec![a.queue.state()])
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = self.stats;
        vec![
            ("entropy_event_count", s.events),
            ("entropy_bytes", s.bytes),
            ("entropy_event_fails", s.failed),
            ("host_rng_fails", s.host_failures),
            ("entropy_rate_limiter_throttled", s.throttled),
            ("request_count", s.requests),
        ]
    }
}

impl MutEventSubscriber for Rng {
    fn process(&mut self, events: Events, _: &mut EventOps) {
        if !limits::on_event(self.limiter.as_mut(), events.fd()) {
            let _ = self.queue_evts[0].read();
            self.stats.events += 1;
        }
        self.process_queue();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_evts[0], EventSet::IN)) {
            warn!("virtio-rng: cannot watch the queue: {e}");
        }
        limits::watch_timer(self.limiter.as_ref(), ops, "virtio-rng");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::rate_limiter::{BucketConfig, Clock};
    use crate::virtio::test_utils::{
        DATA_BASE, MEM_SIZE, QUEUE_BASE, activation, add_chain, memory, mock, used,
    };

    /// The host's /dev/urandom.
    fn urandom() -> EntropySource {
        let mut f = std::fs::File::open("/dev/urandom").unwrap();
        Box::new(move |buf| std::io::Read::read_exact(&mut f, buf))
    }

    #[test]
    fn fills_buffers_with_random_bytes_and_refuses_bad_chains() {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(memory()));
        let mut dev = Rng::new(urandom(), None).unwrap();
        let m = mock(mem, QUEUE_BASE[0], 16);
        let (act, _sink) = activation(mem, &[&m]);
        dev.activate(act).unwrap();
        // Two writable descriptors of 64 bytes each.
        add_chain(&m, 0, &[(DATA_BASE, 64, true), (DATA_BASE + 0x1000, 64, true)]);
        assert_eq!(dev.process_queue(), 1);
        assert_eq!(used(mem, &m, 0).1, 128);
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        mem.read_slice(&mut a, GuestAddress(DATA_BASE)).unwrap();
        mem.read_slice(&mut b, GuestAddress(DATA_BASE + 0x1000)).unwrap();
        assert!(
            a.iter().any(|&x| x != 0) && a != b,
            "random, not zeros or repeats"
        );
        // Read-only, and outside guest memory: nothing written, counted.
        add_chain(&m, 2, &[(DATA_BASE, 64, false)]);
        add_chain(&m, 3, &[(MEM_SIZE - 8, 64, true)]);
        assert_eq!(dev.process_queue(), 2);
        assert_eq!(used(mem, &m, 1).1, 0);
        assert_eq!(used(mem, &m, 2).1, 0);
        assert_eq!(dev.stats().failed, 2);
        assert_eq!(dev.stats().bytes, 128);
    }

    #[test]
    fn the_rate_limiter_holds_its_rate() {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(memory()));
        let ns = Arc::new(AtomicU64::new(1_000_000_000));
        let bw = BucketConfig {
            size: 1000,
            one_time_burst: 0,
            refill_time_ms: 100,
        };
        let limiter = RateLimiter::with_clock(Some(bw), None, Clock::Manual(ns.clone())).unwrap();
        let mut dev = Rng::new(urandom(), Some(limiter)).unwrap();
        let m = mock(mem, QUEUE_BASE[0], 16);
        let (act, _sink) = activation(mem, &[&m]);
        dev.activate(act).unwrap();
        add_chain(&m, 0, &[(DATA_BASE, 100, true)]);
        let avail = m.avail_addr().0;
        let end = ns.load(Ordering::Relaxed) + 2_000_000_000;
        let mut bytes = 0u64;
        while ns.load(Ordering::Relaxed) < end {
            if dev.process_queue() == 1 {
                bytes += 100;
                let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
                mem.write_obj(0u16, GuestAddress(avail + 4 + 2 * u64::from(idx % 16)))
                    .unwrap();
                mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
                    .unwrap();
                continue;
            }
            let l = dev.limiter.as_mut().unwrap();
            assert!(l.is_blocked());
            let wait = l.wait_hint(1, 100).max(std::time::Duration::from_micros(1));
            ns.fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
            l.on_timer();
        }
        // 10,000 bytes/s for 2 s, and the full bucket at the start.
        let want = 21_000.0;
        assert!((bytes as f64 - want).abs() <= want * 0.05, "{bytes}");
        assert!(dev.stats().throttled > 0);
    }
}
