//! A timer the event loop watches: a timerfd opened non-blocking, so that
//! reading it never stalls the VMM thread. (A blocking timerfd can: the
//! loop is told it is readable, something re-arms or disarms it before the
//! read, and the read then waits for the next expiry, or for ever.)

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

/// A monotonic timer whose reads never block.
#[derive(Debug)]
pub struct Timer(TimerFd);

impl Timer {
    /// A disarmed timer.
    pub fn new() -> io::Result<Self> {
        TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map(Self)
        .map_err(io::Error::from)
    }

    /// Arms the timer: first after `first`, then every `interval` if given.
    /// (A zero `first` would disarm it; callers give a positive one.)
    pub fn reset(&self, first: Duration, interval: Option<Duration>) -> io::Result<()> {
        let expiration = match interval {
            None => Expiration::OneShot(TimeSpec::from_duration(first)),
            Some(i) if i == first => Expiration::Interval(TimeSpec::from_duration(i)),
            Some(i) => {
                Expiration::IntervalDelayed(TimeSpec::from_duration(first), TimeSpec::from_duration(i))
            }
        };
        self.0
            .set(expiration, TimerSetTimeFlags::empty())
            .map_err(io::Error::from)
    }

    /// Disarms the timer.
    pub fn clear(&self) -> io::Result<()> {
        self.0.unset().map_err(io::Error::from)
    }

    /// Takes the expirations that happened, without waiting; whether there
    /// were any.
    pub fn consume(&self) -> bool {
        self.0.wait().is_ok()
    }

    /// Whether the timer is armed.
    pub fn is_armed(&self) -> bool {
        matches!(self.0.get(), Ok(Some(_)))
    }
}

impl AsFd for Timer {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_with_nothing_to_read_does_not_block() {
        let t = Timer::new().unwrap();
        // Disarmed: a blocking timerfd would wait for ever here.
        assert!(!t.consume());
        t.reset(Duration::from_millis(1), None).unwrap();
        assert!(t.is_armed());
        std::thread::sleep(Duration::from_millis(5));
        assert!(t.consume());
        assert!(!t.consume(), "each expiry is taken once");
        // Armed but not yet expired: no wait for the expiry either.
        t.reset(Duration::from_secs(60), Some(Duration::from_secs(60)))
            .unwrap();
        let start = std::time::Instant::now();
        assert!(!t.consume());
        assert!(start.elapsed() < Duration::from_secs(1));
        t.clear().unwrap();
        assert!(!t.is_armed());
    }
}
