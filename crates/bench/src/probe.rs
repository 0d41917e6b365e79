//! One measured launch, run in a fresh helper process (`flatlet-bench
//! probe`) so that the resource usage the kernel reports for its children
//! (peak RSS, CPU time) belongs to this launch alone.
//!
//! Times are taken from just before the spawn: to the first byte on the
//! contender's stdout, to a "ready" line on its stderr or stdout, and to
//! its exit.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::resource::{UsageWho, getrusage};
use serde::{Deserialize, Serialize};

/// What one launch measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// Exit code (None if killed by a signal or never started).
    pub exit_code: Option<i32>,
    /// Spawn to the first byte on stdout, in µs.
    pub first_byte_us: Option<f64>,
    /// Spawn to the ready line, in µs.
    pub ready_us: Option<f64>,
    /// Spawn to exit, in µs.
    pub exit_us: f64,
    /// The `Guest-boot-time` the VMM reported, in µs.
    pub guest_boot_us: Option<f64>,
    /// Guest memory the VM touched, as flatlet reported it, in KiB.
    pub guest_touched_kib: Option<u64>,
    /// User + system CPU time of the process tree, in µs.
    pub cpu_us: f64,
    /// Peak resident set size of the largest process of the tree, in KiB.
    pub max_rss_kib: u64,
    /// Why the launch failed, if it did.
    pub error: Option<String>,
}

/// Where a stream's lines are read for the ready marker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ready {
    /// The first byte on stdout.
    FirstByte,
    /// A line containing this text (on stdout or stderr).
    Line(String),
    /// The exit.
    Exit,
}

impl Ready {
    /// Parses `first-byte`, `exit` or `line:TEXT`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "first-byte" => Ok(Ready::FirstByte),
            "exit" => Ok(Ready::Exit),
            _ => s
                .strip_prefix("line:")
                .map(|t| Ready::Line(t.to_string()))
                .ok_or_else(|| format!("bad ready marker {s:?}")),
        }
    }
}

enum Event {
    FirstByte(Instant),
    Line(Instant, String),
}

fn watch<R: Read + Send + 'static>(
    stream: R,
    first_byte: bool,
    tx: mpsc::Sender<Event>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut seen_byte = !first_byte;
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.fill_buf() {
                Ok(b) if !b.is_empty() => {}
                _ => break,
            }
            if !seen_byte {
                seen_byte = true;
                let _ = tx.send(Event::FirstByte(Instant::now()));
            }
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let _ = tx.send(Event::Line(
                        Instant::now(),
                        String::from_utf8_lossy(&line).into_owned(),
                    ));
                }
            }
        }
    })
}

/// How long the probe gives a launch unless told otherwise, in ms.
pub const DEFAULT_LIMIT_MS: u64 = 60_000;

/// Runs one launch of `argv` in a fresh probe process (this binary's
/// `probe` command) and returns what it measured.
pub fn in_fresh_process(argv: &[String], ready: &str, limit: Duration) -> Result<Measurement, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
    let out = Command::new(me)
        .args([
            "probe",
            "--ready",
            ready,
            "--timeout-ms",
            &limit.as_millis().to_string(),
            "--",
        ])
        .args(argv)
        .output()
        .map_err(|e| format!("cannot run the probe: {e}"))?;
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "probe output: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Parses `Guest-boot-time = <N> us` from a log line.
pub fn parse_guest_boot_us(line: &str) -> Option<f64> {
    flatlet_devices::boot_timer::parse_boot_time_us(line).map(|us| us as f64)
}

/// Parses `guest memory touched: <N> KiB` from a log line.
pub fn parse_touched_kib(line: &str) -> Option<u64> {
    line.split("guest memory touched: ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs `argv` once and measures it, giving up after `limit`.
pub fn measure(argv: &[String], ready: &Ready, limit: Duration) -> Measurement {
    let mut m = Measurement::default();
    let Some((program, args)) = argv.split_first() else {
        m.error = Some("empty command".into());
        return m;
    };
    let (tx, rx) = mpsc::channel();
    let t0 = Instant::now();
    let mut child = match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            m.error = Some(format!("cannot start {program}: {e}"));
            return m;
        }
    };
    let readers = [
        child.stdout.take().map(|s| watch(s, true, tx.clone())),
        child.stderr.take().map(|s| watch(s, false, tx.clone())),
    ];
    drop(tx);
    let deadline = t0 + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                m.error = Some(format!("timed out after {limit:?}"));
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_micros(200)),
            Err(e) => {
                m.error = Some(format!("wait: {e}"));
                break None;
            }
        }
    };
    let t_exit = Instant::now();
    for r in readers.into_iter().flatten() {
        let _ = r.join();
    }
    m.exit_us = us(t_exit - t0);
    m.exit_code = status.and_then(|s| s.code());
    for ev in rx.try_iter() {
        match ev {
            Event::FirstByte(t) => m.first_byte_us = Some(us(t - t0)),
            Event::Line(t, text) => {
                if let Ready::Line(marker) = ready {
                    if m.ready_us.is_none() && text.contains(marker.as_str()) {
                        m.ready_us = Some(us(t - t0));
                    }
                }
                m.guest_boot_us = m.guest_boot_us.or_else(|| parse_guest_boot_us(&text));
                m.guest_touched_kib = m.guest_touched_kib.or_else(|| parse_touched_kib(&text));
            }
        }
    }
    match ready {
        Ready::FirstByte => m.ready_us = m.first_byte_us,
        Ready::Exit => m.ready_us = Some(m.exit_us),
        Ready::Line(_) => {}
    }
    if let Ok(usage) = getrusage(UsageWho::RUSAGE_CHILDREN) {
        let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e6 + t.tv_usec() as f64;
        m.cpu_us = tv(usage.user_time()) + tv(usage.system_time());
        m.max_rss_kib = u64::try_from(usage.max_rss()).unwrap_or(0);
    }
    if m.error.is_none() && m.exit_code != Some(0) {
        m.error = Some(format!("exit status {:?}", status));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flatlet_log_lines() {
        let l = "[    0.006280 INFO ] Guest-boot-time =   5982 us 5 ms,   6025 CPU us 6 CPU ms";
        assert_eq!(parse_guest_boot_us(l), Some(5982.0));
        assert_eq!(
            parse_touched_kib("[ 0.01 INFO ] guest memory touched: 68 KiB"),
            Some(68)
        );
        assert_eq!(parse_guest_boot_us("nothing"), None);
    }

    #[test]
    fn ready_markers() {
        assert_eq!(Ready::parse("exit"), Ok(Ready::Exit));
        assert_eq!(Ready::parse("line:up"), Ok(Ready::Line("up".into())));
        assert!(Ready::parse("soon").is_err());
    }

    #[test]
    fn measures_a_real_process() {
        let argv: Vec<String> = ["sh", "-c", "echo hello; echo ready >&2; sleep 0.05"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let m = measure(&argv, &Ready::Line("ready".into()), Duration::from_secs(10));
        assert_eq!(m.exit_code, Some(0), "{m:?}");
        let (first, ready) = (m.first_byte_us.unwrap(), m.ready_us.unwrap());
        assert!(first <= m.exit_us && ready <= m.exit_us, "{m:?}");
        assert!(m.exit_us >= 50_000.0, "the sleep is inside the exit time: {m:?}");
        assert!(m.max_rss_kib > 0);
        assert!(m.error.is_none());
    }

    #[test]
    fn failures_are_reported() {
        let m = measure(
            &["/nonexistent/bin".to_string()],
            &Ready::Exit,
            Duration::from_secs(1),
        );
        assert!(m.error.unwrap().contains("cannot start"));
        let m = measure(&["false".to_string()], &Ready::Exit, Duration::from_secs(5));
        assert_eq!(m.exit_code, Some(1));
        assert!(m.error.is_some());
        let m = measure(
            &["sleep".to_string(), "5".to_string()],
            &Ready::Exit,
            Duration::from_millis(100),
        );
        assert!(m.error.unwrap().contains("timed out"));
    }
}
