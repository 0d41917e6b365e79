//! Rate limiters for devices, Firecracker's way: two token buckets, one
//! for bandwidth (bytes) and one for operations, each with a `size` that
//! refills completely every `refill_time`, and a `one_time_burst` spent
//! before the bucket and never refilled.
//!
//! A device asks [`RateLimiter::consume`] before each request (or frame).
//! When a bucket lacks the tokens, the limiter arms a timer for the moment
//! they will be there, and says no to everything until it fires: the
//! device leaves the request in its queue and stops, and resumes when the
//! event loop reports the timer (no polling). A request larger than a
//! bucket passes once the bucket is full, and leaves the bucket in debt,
//! so the rate still holds over time.

use std::io;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::timer::Timer;

/// One bucket's settings (Firecracker's `TokenBucket` body).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketConfig {
    /// Tokens the bucket holds, and refills every `refill_time_ms`.
    pub size: u64,
    /// Tokens spent before the bucket, once.
    pub one_time_burst: u64,
    /// Milliseconds to refill the whole bucket.
    pub refill_time_ms: u64,
}

/// Where a limiter reads the time: the monotonic clock, or a test's.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// `Instant::now()`.
    #[default]
    Real,
    /// Nanoseconds a test sets.
    Manual(Arc<AtomicU64>),
}

impl Clock {
    fn now_ns(&self) -> u64 {
        match self {
            Clock::Real => {
                static ORIGIN: OnceLock<Instant> = OnceLock::new();
                let origin = *ORIGIN.get_or_init(Instant::now);
                u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
            }
            Clock::Manual(ns) => ns.load(Ordering::Relaxed),
        }
    }
}

/// A token bucket.
#[derive(Clone, Debug)]
struct Bucket {
    config: BucketConfig,
    burst: u64,
    /// Tokens in the bucket; negative after a request larger than it.
    budget: i128,
    /// The time up to which refills have been counted.
    counted_ns: u64,
}

impl Bucket {
    fn new(config: BucketConfig, now_ns: u64) -> Self {
        Self {
            config,
            burst: config.one_time_burst,
            budget: i128::from(config.size),
            counted_ns: now_ns,
        }
    }

    fn refill_ns(&self) -> u128 {
        u128::from(self.config.refill_time_ms.max(1)) * 1_000_000
    }

    /// Adds what has refilled since the last count (whole tokens only;
    /// the rest of the time is kept for the next count).
    fn refill(&mut self, now_ns: u64) {
        let size = u128::from(self.config.size);
        if size == 0 || now_ns <= self.counted_ns {
            return;
        }
        let elapsed = u128::from(now_ns - self.counted_ns);
        let tokens = elapsed * size / self.refill_ns();
        if tokens == 0 {
            return;
        }
        let room = i128::from(self.config.size) - self.budget;
        if tokens as i128 >= room {
            self.budget = i128::from(self.config.size);
            self.counted_ns = now_ns;
        } else {
            self.budget += tokens as i128;
            self.counted_ns += u64::try_from(tokens * self.refill_ns() / size).unwrap_or(u64::MAX);
        }
    }

    /// Whether `n` tokens can be taken now.
    fn can_take(&self, n: u64) -> bool {
        let need = i128::from(n.saturating_sub(self.burst));
        need == 0 || self.budget >= need || (need > i128::from(self.config.size) && self.is_full())
    }

    fn is_full(&self) -> bool {
        self.budget >= i128::from(self.config.size)
    }

    fn take(&mut self, n: u64) {
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        self.budget -= i128::from(n - from_burst);
    }

    /// How long until `n` tokens can be taken (a request larger than the
    /// bucket waits for a full bucket).
    fn wait_for(&self, n: u64) -> Duration {
        let need = i128::from(n.saturating_sub(self.burst)).min(i128::from(self.config.size));
        let missing = (need - self.budget).max(0) as u128;
        let size = u128::from(self.config.size.max(1));
        let ns = (missing * self.refill_ns()).div_ceil(size);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

/// What a `PATCH` does to one bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BucketUpdate {
    /// Left as it is.
    #[default]
    Keep,
    /// No limit any more.
    Remove,
    /// New settings (a full bucket).
    Set(BucketConfig),
}

/// Limits a device's bandwidth and operations.
pub struct RateLimiter {
    bandwidth: Option<Bucket>,
    ops: Option<Bucket>,
    clock: Clock,
    timer: Timer,
    blocked: bool,
    throttled: u64,
}

impl RateLimiter {
    /// A limiter with the given buckets (none: no limit, until a `PATCH`).
    pub fn new(bandwidth: Option<BucketConfig>, ops: Option<BucketConfig>) -> io::Result<Self> {
        Self::with_clock(bandwidth, ops, Clock::Real)
    }

    /// The same, reading time from `clock`.
    pub fn with_clock(
        bandwidth: Option<BucketConfig>,
        ops: Option<BucketConfig>,
        clock: Clock,
    ) -> io::Result<Self> {
        let timer = Timer::new()?;
        let now = clock.now_ns();
        let bucket = |c: Option<BucketConfig>| c.filter(|c| c.size > 0).map(|c| Bucket::new(c, now));
        Ok(Self {
            bandwidth: bucket(bandwidth),
            ops: bucket(ops),
            clock,
            timer,
            blocked: false,
            throttled: 0,
        })
    }

    /// Whether any bucket limits.
    pub fn is_limiting(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }

    /// Takes one operation of `ops` ops and `bytes` bytes, if the buckets
    /// allow it now. If not, nothing is taken, the timer is armed for when
    /// they will, and every call says no until [`Self::on_timer`].
    pub fn consume(&mut self, ops: u64, bytes: u64) -> bool {
        if self.blocked {
            return false;
        }
        let wait = self.shortfall(ops, bytes);
        if wait > Duration::ZERO {
            self.block(wait);
            return false;
        }
        for (bucket, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, ops)] {
            if let Some(b) = bucket {
                b.take(n);
            }
        }
        true
    }

    fn block(&mut self, wait: Duration) {
        self.blocked = true;
        self.throttled += 1;
        // A zero duration would disarm the timer.
        let wait = wait.max(Duration::from_micros(50));
        if let Err(e) = self.timer.reset(wait, None) {
            log::warn!("rate limiter: cannot arm its timer ({e}); not limiting until the next request");
            self.blocked = false;
        }
    }

    /// Whether the limiter waits for its timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timer's descriptor, for the event loop.
    pub fn timer(&self) -> &Timer {
        &self.timer
    }

    /// The timer fired: requests may be tried again.
    pub fn on_timer(&mut self) {
        if self.blocked {
            // Expired, so it does not block; the count is not needed.
            self.timer.consume();
        }
        self.blocked = false;
    }

    /// Times a request was held back.
    pub fn throttled(&self) -> u64 {
        self.throttled
    }

    /// Changes the buckets of a running device (`PATCH`).
    pub fn update(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) {
        let now = self.clock.now_ns();
        for (bucket, update) in [(&mut self.bandwidth, bandwidth), (&mut self.ops, ops)] {
            match update {
                BucketUpdate::Keep => {}
                BucketUpdate::Remove => *bucket = None,
                BucketUpdate::Set(c) if c.size == 0 => *bucket = None,
                BucketUpdate::Set(c) => *bucket = Some(Bucket::new(c, now)),
            }
        }
        // New settings apply at once: a wait for the old ones ends.
        if self.blocked {
            self.blocked = false;
            let _ = self.timer.reset(Duration::from_micros(50), None);
        }
    }

    /// How long a blocked limiter waits (for tests driving a manual clock).
    pub fn wait_hint(&mut self, ops: u64, bytes: u64) -> Duration {
        self.shortfall(ops, bytes)
    }

    /// Refills the buckets to now; how long until both can take the
    /// request (zero: now).
    fn shortfall(&mut self, ops: u64, bytes: u64) -> Duration {
        let now = self.clock.now_ns();
        let mut wait = Duration::ZERO;
        for (bucket, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, ops)] {
            if let Some(b) = bucket {
                b.refill(now);
                if !b.can_take(n) {
                    wait = wait.max(b.wait_for(n));
                }
            }
        }
        wait
    }
}

/// What a device does with its (optional) limiter, in one place.
pub mod device {
    use std::os::fd::{AsRawFd, RawFd};

    use event_manager::{EventOps, Events};
    use virtio_queue::{Queue, QueueT};
    use vmm_sys_util::epoll::EventSet;

    use super::{BucketUpdate, RateLimiter};

    /// Whether a request of `ops` operations and `bytes` bytes may go now
    /// (always, without a limiter). When not, the chain the device just
    /// popped from `queue` goes back, to be popped again when the
    /// limiter's timer fires.
    pub fn admit(limiter: Option<&mut RateLimiter>, queue: &mut Queue, ops: u64, bytes: u64) -> bool {
        let Some(l) = limiter.filter(|l| l.is_limiting()) else {
            return true;
        };
        if l.consume(ops, bytes) {
            return true;
        }
        let next = queue.next_avail().wrapping_sub(1);
        queue.set_next_avail(next);
        false
    }

    /// Watches the limiter's timer on the event loop (`what` names the
    /// device in a warning).
    pub fn watch_timer(limiter: Option<&RateLimiter>, ops: &mut EventOps, what: &str) {
        if let Some(l) = limiter {
            if let Err(e) = ops.add(Events::new(l.timer(), EventSet::IN)) {
                log::warn!("{what}: cannot watch the rate limiter: {e}");
            }
        }
    }

    /// If `fd` is the limiter's timer: it fired, and is handled (true).
    pub fn on_event(limiter: Option<&mut RateLimiter>, fd: RawFd) -> bool {
        match limiter {
            Some(l) if l.timer().as_raw_fd() == fd => {
                l.on_timer();
                true
            }
            _ => false,
        }
    }

    /// Applies a `PATCH`; false when the device has no limiter.
    pub fn update(limiter: Option<&mut RateLimiter>, bandwidth: BucketUpdate, ops: BucketUpdate) -> bool {
        match limiter {
            Some(l) => {
                l.update(bandwidth, ops);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manual() -> (Clock, Arc<AtomicU64>) {
        let ns = Arc::new(AtomicU64::new(1_000_000_000));
        (Clock::Manual(ns.clone()), ns)
    }

    fn bucket(size: u64, burst: u64, ms: u64) -> Option<BucketConfig> {
        Some(BucketConfig {
            size,
            one_time_burst: burst,
            refill_time_ms: ms,
        })
    }

    /// Runs requests of `ops`/`bytes` back to back for `secs` of manual
    /// time, advancing the clock as the limiter asks; returns what passed.
    fn run(rl: &mut RateLimiter, ns: &AtomicU64, ops: u64, bytes: u64, secs: u64) -> (u64, u64) {
        let end = ns.load(Ordering::Relaxed) + secs * 1_000_000_000;
        let (mut n_ops, mut n_bytes) = (0, 0);
        while ns.load(Ordering::Relaxed) < end {
            if rl.consume(ops, bytes) {
                n_ops += ops;
                n_bytes += bytes;
            } else {
                let wait = rl.wait_hint(ops, bytes).max(Duration::from_micros(1));
                ns.fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
                rl.on_timer();
            }
        }
        (n_ops, n_bytes)
    }

    fn within(measured: f64, wanted: f64, pct: f64) -> bool {
        (measured - wanted).abs() <= wanted * pct / 100.0
    }

    #[test]
    fn bandwidth_holds_its_rate() {
        // 1 MiB per 100 ms = 10 MiB/s, 4 KiB requests, over 2 s.
        let (clock, ns) = manual();
        let mut rl = RateLimiter::with_clock(bucket(1 << 20, 0, 100), None, clock).unwrap();
        let (_, bytes) = run(&mut rl, &ns, 1, 4096, 2);
        // The full bucket at the start passes at once, then the rate.
        let wanted = (10u64 << 20) as f64 * 2.0 + (1 << 20) as f64;
        assert!(within(bytes as f64, wanted, 5.0), "{bytes} vs {wanted}");
        assert!(rl.throttled() > 100);
    }

    #[test]
    fn operations_hold_their_rate() {
        // 500 ops per 250 ms = 2000 ops/s, over 2 s.
        let (clock, ns) = manual();
        let mut rl = RateLimiter::with_clock(None, bucket(500, 0, 250), clock).unwrap();
        let (ops, _) = run(&mut rl, &ns, 1, 1 << 16, 2);
        let wanted = 2000.0 * 2.0 + 500.0;
        assert!(within(ops as f64, wanted, 5.0), "{ops} vs {wanted}");
    }

    #[test]
    fn the_one_time_burst_passes_at_once_and_only_once() {
        let (clock, ns) = manual();
        let mut rl = RateLimiter::with_clock(bucket(1000, 100_000, 1000), None, clock).unwrap();
        let start = ns.load(Ordering::Relaxed);
        // The burst and the full bucket, with no time passing.
        let mut passed = 0;
        while rl.consume(1, 1000) {
            passed += 1000;
        }
        assert_eq!(passed, 101_000);
        assert_eq!(ns.load(Ordering::Relaxed), start);
        // Then 1000 bytes/s.
        rl.on_timer();
        let (_, bytes) = run(&mut rl, &ns, 1, 100, 2);
        assert!(within(bytes as f64, 2000.0, 5.0), "{bytes}");
    }

    #[test]
    fn a_request_larger_than_the_bucket_passes_and_the_rate_holds() {
        let (clock, ns) = manual();
        let mut rl = RateLimiter::with_clock(bucket(1000, 0, 1000), None, clock).unwrap();
        let (_, bytes) = run(&mut rl, &ns, 1, 5000, 10);
        // 1000 bytes/s over 10 s, give or take one request.
        assert!((10_000..=16_000).contains(&bytes), "{bytes}");
    }

    #[test]
    fn an_update_changes_the_rate_of_a_running_limiter() {
        let (clock, ns) = manual();
        let mut rl = RateLimiter::with_clock(bucket(1000, 0, 1000), None, clock).unwrap();
        let (_, slow) = run(&mut rl, &ns, 1, 100, 2);
        rl.update(
            BucketUpdate::Set(BucketConfig {
                size: 10_000,
                one_time_burst: 0,
                refill_time_ms: 1000,
            }),
            BucketUpdate::Keep,
        );
        assert!(!rl.is_blocked());
        let (_, fast) = run(&mut rl, &ns, 1, 100, 2);
        assert!(within(slow as f64, 3000.0, 5.0), "{slow}");
        assert!(within(fast as f64, 30_000.0, 5.0), "{fast}");
        rl.update(BucketUpdate::Remove, BucketUpdate::Keep);
        assert!(!rl.is_limiting());
        assert!(rl.consume(1, u64::MAX));
    }

    #[test]
    fn a_blocked_limiter_arms_its_timer() {
        // Real time: the timer fires (the event loop would wake).
        let mut rl = RateLimiter::new(bucket(100, 0, 20), None).unwrap();
        assert!(rl.consume(1, 100));
        assert!(!rl.consume(1, 100));
        assert!(rl.is_blocked());
        assert!(!rl.consume(1, 1), "nothing passes while blocked");
        use std::os::fd::AsRawFd;
        use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
        let epoll = Epoll::new().unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                rl.timer().as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        let mut events = [EpollEvent::default()];
        let n = epoll.wait(2000, &mut events).unwrap();
        assert_eq!(n, 1, "the timer fired");
        rl.on_timer();
        assert!(rl.consume(1, 100));
    }
}
