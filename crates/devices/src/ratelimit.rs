//! Rate-limited logging of guest misbehaviour: a hostile guest must not be
//! able to flood the host's log.

use std::fmt::Arguments;
use std::time::{Duration, Instant};

use log::warn;

/// Messages allowed per window.
const BURST: u32 = 10;
/// The window.
const WINDOW: Duration = Duration::from_secs(5);

/// Lets through at most `BURST` warnings per `WINDOW`, then says how many
/// it held back.
pub struct LogLimiter {
    source: String,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter for messages about `source`.
    pub fn new(source: String) -> Self {
        Self {
            source,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Whether a message may be logged now (counting it either way).
    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        match self.window_start {
            Some(start) if now.duration_since(start) < WINDOW => {}
            _ => {
                if self.suppressed > 0 {
                    warn!("{}: {} similar messages suppressed", self.source, self.suppressed);
                    self.suppressed = 0;
                }
                self.window_start = Some(now);
                self.in_window = 0;
            }
        }
        if self.in_window < BURST {
            self.in_window += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Logs a warning, if the rate allows.
    pub fn warn(&mut self, args: Arguments<'_>) {
        if self.allow() {
            warn!("{}: {args}", self.source);
        }
    }

    /// Messages held back in the current window.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_suppresses() {
        let mut l = LogLimiter::new("test".into());
        let allowed = (0..100).filter(|_| l.allow()).count();
        assert_eq!(allowed, BURST as usize);
        assert_eq!(l.suppressed(), 90);
    }
}
