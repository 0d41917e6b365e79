//! A boot-timer device compatible with Firecracker's: an MMIO page where
//! the guest writes the byte 123 when it has booted. flatlet then logs
//! `Guest-boot-time = <N> us <M> ms, <C> CPU us <D> CPU ms`: the wall and
//! process CPU time since the VMM began building the VM, in the format
//! tools written for Firecracker parse. Only the first signal is logged at
//! the info level: a guest writing the byte again and again gets
//! rate-limited debug lines.

use std::time::{Duration, Instant};

use log::info;
use nix::time::{ClockId, clock_gettime};

use crate::bus::BusDevice;
use crate::ratelimit::LogLimiter;

/// Guest-physical address of the boot-timer page (Firecracker's
/// `BOOT_DEVICE_MEM_START`, the start of the 32-bit MMIO window).
pub const BOOT_TIMER_ADDR: u64 = 0xc000_0000;
/// Size of the boot-timer page.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// The byte a guest writes at offset 0 when it has booted.
pub const MAGIC_BOOT_COMPLETE: u8 = 123;

/// What starts the boot-time log line.
const LINE_START: &str = "Guest-boot-time = ";

/// The boot-time log line for `wall` and `cpu` time since the start.
fn boot_time_line(wall: Duration, cpu: Duration) -> String {
    let (us, cpu_us) = (wall.as_micros(), cpu.as_micros());
    format!(
        "{LINE_START}{us:>6} us {} ms, {cpu_us:>6} CPU us {} CPU ms",
        us / 1000,
        cpu_us / 1000
    )
}

/// The wall time (µs) of the boot-time line in `text` (a log line, or a
/// whole log), if it holds one.
pub fn parse_boot_time_us(text: &str) -> Option<u64> {
    text.split(LINE_START)
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The process's CPU time so far (every thread).
pub fn process_cpu_time() -> Duration {
    clock_gettime(ClockId::CLOCK_PROCESS_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

/// Where the boot time counts from: the start of the VM build, or the
/// start a caller gave with Firecracker's `--start-time-us`,
/// `--start-time-cpu-us` and `--parent-cpu-time-us` (a jailer's start, so
/// that a jailed launch's boot time includes the jailer's work).
#[derive(Clone, Copy, Debug)]
pub struct StartTime {
    /// Wall-clock (monotonic) start.
    pub wall: Instant,
    /// This process's CPU time at the start.
    pub cpu: Duration,
    /// CPU time spent before this process by its parent (the jailer).
    pub parent_cpu: Duration,
}

impl StartTime {
    /// Now.
    pub fn now() -> Self {
        Self {
            wall: Instant::now(),
            cpu: process_cpu_time(),
            parent_cpu: Duration::ZERO,
        }
    }

    /// A start given in microseconds: `wall_us` on `CLOCK_MONOTONIC`,
    /// `cpu_us` of this process's CPU time (`CLOCK_PROCESS_CPUTIME_ID`,
    /// which goes on across `exec`; 0 when not given: the process's
    /// start) and `parent_cpu_us` spent by a parent before it. A start in
    /// the future counts as now.
    pub fn given(wall_us: u64, cpu_us: Option<u64>, parent_cpu_us: u64) -> Self {
        let now = Instant::now();
        let mono = clock_gettime(ClockId::CLOCK_MONOTONIC)
            .map(Duration::from)
            .unwrap_or_default();
        let ago = mono.saturating_sub(Duration::from_micros(wall_us));
        Self {
            wall: now.checked_sub(ago).unwrap_or(now),
            cpu: Duration::from_micros(cpu_us.unwrap_or(0)),
            parent_cpu: Duration::from_micros(parent_cpu_us),
        }
    }

    /// Wall time since the start.
    pub fn wall_elapsed(&self) -> Duration {
        self.wall.elapsed()
    }

    /// CPU time since the start: this process's since then, and the
    /// parent's.
    pub fn cpu_elapsed(&self) -> Duration {
        process_cpu_time().saturating_sub(self.cpu) + self.parent_cpu
    }
}

/// Microseconds on `CLOCK_MONOTONIC` now (what Firecracker's jailer
/// passes as `--start-time-us`).
pub fn monotonic_us() -> u64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| Duration::from(t).as_micros() as u64)
        .unwrap_or(0)
}

/// The boot-timer device.
pub struct BootTimer {
    start: StartTime,
    /// Boot time of the last signal, for tests and metrics.
    last: Option<Duration>,
    /// Boot signals received.
    signals: u64,
    log: LogLimiter,
}

impl BootTimer {
    /// A timer measuring from `start`.
    pub fn new(start: StartTime) -> Self {
        Self {
            start,
            last: None,
            signals: 0,
            log: LogLimiter::new("boot timer".into()),
        }
    }

    /// How many times the guest signalled.
    pub fn signals(&self) -> u64 {
        self.signals
    }

    /// The wall time from the start to the guest's last boot signal.
    pub fn boot_time(&self) -> Option<Duration> {
        self.last
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data != [MAGIC_BOOT_COMPLETE] {
            return;
        }
        let wall = self.start.wall_elapsed();
        let cpu = self.start.cpu_elapsed();
        self.last = Some(wall);
        self.signals += 1;
        if self.signals == 1 {
            info!("{}", boot_time_line(wall, cpu));
        } else {
            self.log.debug(format_args!(
                "signal {}: {}",
                self.signals,
                boot_time_line(wall, cpu)
            ));
        }
    }
}

/// The boot timer's state, for snapshots (the guest signalled boot
/// before the snapshot; the restored VM keeps those figures).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootTimerState {
    /// Boot time of the last signal, in microseconds.
    pub last_us: Option<u64>,
    /// Boot signals received.
    pub signals: u64,
}

impl BootTimer {
    /// Its state, for a snapshot.
    pub fn state(&self) -> BootTimerState {
        BootTimerState {
            last_us: self.last.map(|d| d.as_micros() as u64),
            signals: self.signals,
        }
    }

    /// Sets the timer to `state`.
    pub fn restore(&mut self, state: &BootTimerState) {
        self.last = state.last_us.map(Duration::from_micros);
        self.signals = state.signals;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_magic_byte_at_offset_zero_counts() {
        let mut t = BootTimer::new(StartTime::now());
        t.write(1, &[MAGIC_BOOT_COMPLETE]);
        t.write(0, &[122]);
        t.write(0, &[MAGIC_BOOT_COMPLETE, 0]);
        assert_eq!(t.boot_time(), None);
        std::thread::sleep(Duration::from_millis(2));
        t.write(0, &[MAGIC_BOOT_COMPLETE]);
        let d = t.boot_time().expect("boot signal recorded");
        assert!(d >= Duration::from_millis(2), "{d:?}");
    }

    #[test]
    fn only_the_first_signal_is_logged_at_info_then_rate_limited() {
        crate::ratelimit::tests::capture_logs();
        let mut t = BootTimer::new(StartTime::now());
        for _ in 0..1000 {
            t.write(0, &[MAGIC_BOOT_COMPLETE]);
        }
        assert_eq!(t.signals(), 1000, "every signal is counted");
        let lines = crate::ratelimit::tests::logged(LINE_START);
        let info = lines.iter().filter(|l| !l.contains("boot timer:")).count();
        assert_eq!(info, 1, "{lines:?}");
        assert!(
            lines.len() <= 1 + crate::ratelimit::BURST as usize,
            "{} lines",
            lines.len()
        );
    }

    #[test]
    fn a_given_start_counts_from_then() {
        // A start 50 ms ago, with 7 ms of a parent's CPU time.
        let start = StartTime::given(monotonic_us() - 50_000, Some(0), 7_000);
        let wall = start.wall_elapsed();
        assert!(
            wall >= Duration::from_millis(50) && wall < Duration::from_secs(5),
            "{wall:?}"
        );
        assert!(start.cpu_elapsed() >= Duration::from_millis(7));
        // A start in the future is now.
        let later = StartTime::given(monotonic_us() + 10_000_000, None, 0);
        assert!(later.wall_elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn the_line_is_firecrackers_and_parses_back() {
        let line = boot_time_line(Duration::from_micros(5982), Duration::from_micros(6025));
        assert_eq!(line, "Guest-boot-time =   5982 us 5 ms,   6025 CPU us 6 CPU ms");
        let logged = format!("[    0.006280 INFO ] {line}");
        assert_eq!(parse_boot_time_us(&logged), Some(5982));
        assert_eq!(parse_boot_time_us("nothing"), None);
    }

    #[test]
    fn state_round_trips() {
        let mut t = BootTimer::new(StartTime::now());
        t.write(0, &[MAGIC_BOOT_COMPLETE]);
        let state = t.state();
        assert_eq!(state.signals, 1);
        let mut fresh = BootTimer::new(StartTime::now());
        fresh.restore(&state);
        assert_eq!(fresh.state(), state);
        assert!(fresh.boot_time().is_some());
    }
}
