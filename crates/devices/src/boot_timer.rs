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

/// When the VM build started.
#[derive(Clone, Copy, Debug)]
pub struct StartTime {
    /// Wall-clock (monotonic) start.
    pub wall: Instant,
    /// Process CPU time at the start.
    pub cpu: Duration,
}

impl StartTime {
    /// Now.
    pub fn now() -> Self {
        Self {
            wall: Instant::now(),
            cpu: process_cpu_time(),
        }
    }
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
        let wall = self.start.wall.elapsed();
        let cpu = process_cpu_time().saturating_sub(self.start.cpu);
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
    fn the_line_is_firecrackers_and_parses_back() {
        let line = boot_time_line(Duration::from_micros(5982), Duration::from_micros(6025));
        assert_eq!(line, "Guest-boot-time =   5982 us 5 ms,   6025 CPU us 6 CPU ms");
        let logged = format!("[    0.006280 INFO ] {line}");
        assert_eq!(parse_boot_time_us(&logged), Some(5982));
        assert_eq!(parse_boot_time_us("nothing"), None);
    }
}
