//! Rate-limited logging of guest misbehaviour: a hostile guest must not be
//! able to flood the host's log. What a guest does wrong is counted by the
//! device (for metrics); the log only gets a sample of it.

use std::fmt::Arguments;
use std::time::{Duration, Instant};

use log::Level;

/// Lines a limiter lets through in a burst.
pub const BURST: u32 = 10;
/// After a burst, one more line each this long.
pub const REFILL: Duration = Duration::from_secs(1);

/// A token bucket: `capacity` tokens, one more every `refill`.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    capacity: u32,
    refill: Duration,
    tokens: u32,
    last: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(capacity: u32, refill: Duration) -> Self {
        Self {
            capacity,
            refill,
            tokens: capacity,
            last: None,
        }
    }

    /// Takes a token at `now`, if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        match self.last {
            None => self.last = Some(now),
            Some(last) => {
                let elapsed = now.saturating_duration_since(last).as_nanos();
                let new = elapsed / self.refill.as_nanos().max(1);
                if new >= u128::from(self.capacity) {
                    self.tokens = self.capacity;
                    self.last = Some(now);
                } else if new > 0 {
                    // `new` is below the capacity (a u32): no overflow.
                    let new = new as u32;
                    self.tokens = (self.tokens + new).min(self.capacity);
                    self.last = Some(last + self.refill * new);
                }
            }
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// Lets through a burst of [`BURST`] lines, then one per [`REFILL`]; the
/// first line let through after some were held back is preceded by a
/// summary of how many were.
pub struct LogLimiter {
    source: String,
    bucket: TokenBucket,
    suppressed: u64,
    emitted: u64,
}

impl LogLimiter {
    /// A limiter for messages about `source`.
    pub fn new(source: String) -> Self {
        Self {
            source,
            bucket: TokenBucket::new(BURST, REFILL),
            suppressed: 0,
            emitted: 0,
        }
    }

    /// Whether a message may be logged now (counting it either way).
    pub fn allow(&mut self) -> bool {
        self.allow_at(Instant::now())
    }

    fn allow_at(&mut self, now: Instant) -> bool {
        if self.bucket.take(now) {
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Logs a message at `level`, if the rate allows. A message the log
    /// level hides costs nothing and takes no token.
    pub fn log(&mut self, level: Level, args: Arguments<'_>) {
        if level > log::max_level() || !self.allow() {
            return;
        }
        if self.suppressed > 0 {
            log::log!(
                level,
                "{}: {} similar messages suppressed",
                self.source,
                self.suppressed
            );
            self.suppressed = 0;
            self.emitted += 1;
        }
        log::log!(level, "{}: {args}", self.source);
        self.emitted += 1;
    }

    /// Logs a warning, if the rate allows.
    pub fn warn(&mut self, args: Arguments<'_>) {
        self.log(Level::Warn, args);
    }

    /// Logs a debug message, if the rate allows.
    pub fn debug(&mut self, args: Arguments<'_>) {
        self.log(Level::Debug, args);
    }

    /// Messages held back since the last summary.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }

    /// Lines logged so far (summaries included).
    pub fn emitted(&self) -> u64 {
        self.emitted
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Mutex, OnceLock};
    use std::thread::ThreadId;

    /// A logger for tests: it keeps every record's message, by thread, so
    /// that tests running in parallel each see their own lines.
    struct Capture(Mutex<Vec<(ThreadId, String)>>);

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            let line = format!("{} {}", record.target(), record.args());
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((std::thread::current().id(), line));
        }
        fn flush(&self) {}
    }

    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();

    /// Installs the capturing logger (once), at the debug level.
    pub(crate) fn capture_logs() {
        let c = CAPTURE.get_or_init(|| Box::leak(Box::new(Capture(Mutex::new(Vec::new())))));
        if log::set_logger(*c).is_ok() {
            log::set_max_level(log::LevelFilter::Debug);
        }
    }

    /// The lines this thread logged so far that contain `needle`.
    pub(crate) fn logged(needle: &str) -> Vec<String> {
        let me = std::thread::current().id();
        CAPTURE
            .get()
            .map(|c| {
                c.0.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter()
                    .filter(|(t, l)| *t == me && l.contains(needle))
                    .map(|(_, l)| l.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn bursts_then_suppresses() {
        let mut l = LogLimiter::new("test".into());
        let t0 = Instant::now();
        let allowed = (0..100).filter(|_| l.allow_at(t0)).count();
        assert_eq!(allowed, BURST as usize);
        assert_eq!(l.suppressed(), 90);
        // One more line per refill period.
        assert!(!l.allow_at(t0 + REFILL / 2));
        assert!(l.allow_at(t0 + REFILL));
        assert!(!l.allow_at(t0 + REFILL));
        // A long quiet time refills the whole burst, no more.
        let later = t0 + REFILL * 1000;
        assert_eq!((0..100).filter(|_| l.allow_at(later)).count(), BURST as usize);
    }

    #[test]
    fn a_flood_logs_a_burst_and_one_summary() {
        capture_logs();
        let mut l = LogLimiter::new("flood-source".into());
        for i in 0..1000 {
            l.warn(format_args!("bad thing {i}"));
        }
        assert_eq!(logged("flood-source").len(), BURST as usize);
        assert_eq!(l.emitted(), u64::from(BURST));
        // The next line let through says how many were held back.
        l.bucket = TokenBucket::new(1, REFILL);
        l.warn(format_args!("after"));
        let lines = logged("flood-source");
        assert_eq!(lines.len(), BURST as usize + 2);
        assert!(
            lines[BURST as usize].contains("990 similar messages suppressed"),
            "{lines:?}"
        );
        assert!(lines[BURST as usize + 1].contains("after"));
    }
}
