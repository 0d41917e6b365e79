//! Metrics: counters of the VMM, its vCPUs and devices, written as one
//! JSON object per line to the file `PUT /metrics` names, on
//! `FlushMetrics` and every minute.
//!
//! The file is a [`Sink`]: written without blocking, so a FIFO nobody
//! reads costs a dropped line (`logger.missed_metrics_count`), never a
//! stalled VMM thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::config::ConfigError;
use crate::logger::{self, Sink, Written};

/// How often metrics are written without being asked.
pub const FLUSH_INTERVAL_SECS: u64 = 60;

/// `PUT /metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A file (or FIFO) to append metrics to.
    pub metrics_path: String,
}

/// vCPU exit counters, shared by every vCPU thread.
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port reads.
    pub io_in: AtomicU64,
    /// Port writes.
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// Emulation failures flatlet recovered from.
    pub recoveries: AtomicU64,
}

impl ExitCounters {
    /// Counts one.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn to_json(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "exit_io_in": get(&self.io_in),
            "exit_io_out": get(&self.io_out),
            "exit_mmio_read": get(&self.mmio_read),
            "exit_mmio_write": get(&self.mmio_write),
            "emulation_recoveries": get(&self.recoveries),
        })
    }
}

/// Counters of the request path.
#[derive(Debug, Default)]
pub struct RequestCounters {
    /// Requests handled.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
}

/// Where metrics go.
pub struct MetricsSink {
    sink: Sink,
    start: Instant,
    flushes: u64,
    missed: u64,
}

impl MetricsSink {
    /// Opens the metrics file (appending; a FIFO must have a reader).
    pub fn open(c: &MetricsConfig) -> Result<Self, ConfigError> {
        Ok(Self {
            sink: Sink::open(&c.metrics_path, "metrics file")?,
            start: Instant::now(),
            flushes: 0,
            missed: 0,
        })
    }

    /// Lines that could not be written.
    pub fn missed(&self) -> u64 {
        self.missed
    }

    /// Writes one line of metrics; a line the file cannot take now (a
    /// full FIFO) is dropped and counted, and is not an error.
    pub fn write(&mut self, snapshot: &Snapshot<'_>) -> std::io::Result<()> {
        let mut line = self.line(snapshot).to_string();
        line.push('\n');
        match self.sink.write_record(line.as_bytes()) {
            Ok(Written::Whole) => Ok(()),
            Ok(Written::Dropped) => {
                self.missed += 1;
                Ok(())
            }
            Err(e) => {
                self.missed += 1;
                Err(e)
            }
        }
    }

    /// The JSON object of one flush.
    fn line(&mut self, snapshot: &Snapshot<'_>) -> Value {
        self.flushes += 1;
        let utc_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let mut m = Map::new();
        m.insert("utc_timestamp_ms".into(), json!(utc_ms));
        m.insert("uptime_ms".into(), json!(self.start.elapsed().as_millis()));
        m.insert("flushes".into(), json!(self.flushes));
        m.insert(
            "api_server".into(),
            json!({"requests": snapshot.requests.requests, "errors": snapshot.requests.errors}),
        );
        if let Some(exits) = snapshot.exits {
            m.insert("vcpu".into(), exits.to_json());
        }
        let devices: Map<String, Value> = snapshot
            .devices
            .iter()
            .map(|(id, counters)| (id.clone(), counters_json(counters)))
            .collect();
        m.insert("devices".into(), Value::Object(devices));
        if let Some(us) = snapshot.guest_boot_us {
            m.insert("guest_boot_time_us".into(), json!(us));
        }
        if !snapshot.uart.is_empty() {
            m.insert("uart".into(), counters_json(&snapshot.uart));
        }
        let log = logger::counters();
        m.insert(
            "logger".into(),
            json!({
                "missed_log_count": log.missed,
                "rate_limited_log_count": log.rate_limited,
                "missed_metrics_count": self.missed,
            }),
        );
        Value::Object(m)
    }
}

/// A list of counters as a JSON object.
fn counters_json(counters: &[(&'static str, u64)]) -> Value {
    Value::Object(
        counters
            .iter()
            .map(|(k, v)| ((*k).to_string(), json!(v)))
            .collect(),
    )
}

/// What a flush reports.
pub struct Snapshot<'a> {
    /// Request counters.
    pub requests: &'a RequestCounters,
    /// vCPU exit counters (once a VM runs).
    pub exits: Option<&'a ExitCounters>,
    /// Each device's id and counters.
    pub devices: Vec<(String, Vec<(&'static str, u64)>)>,
    /// The boot time the guest signalled.
    pub guest_boot_us: Option<u128>,
    /// The console UART's counters (once a VM runs).
    pub uart: Vec<(&'static str, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_json_line_per_flush() {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let path = f.as_path().display().to_string();
        let mut sink = MetricsSink::open(&MetricsConfig {
            metrics_path: path.clone(),
        })
        .unwrap();
        let exits = ExitCounters::default();
        ExitCounters::bump(&exits.io_out);
        let requests = RequestCounters {
            requests: 3,
            errors: 1,
        };
        for _ in 0..2 {
            sink.write(&Snapshot {
                requests: &requests,
                exits: Some(&exits),
                devices: vec![("rootfs".into(), vec![("reads", 7)])],
                guest_boot_us: Some(1234),
                uart: vec![("missed_write_count", 5)],
            })
            .unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["flushes"], 2);
        assert_eq!(lines[0]["api_server"]["errors"], 1);
        assert_eq!(lines[0]["vcpu"]["exit_io_out"], 1);
        assert_eq!(lines[0]["devices"]["rootfs"]["reads"], 7);
        assert_eq!(lines[0]["guest_boot_time_us"], 1234);
        assert_eq!(lines[0]["uart"]["missed_write_count"], 5);
        assert_eq!(lines[1]["logger"]["missed_metrics_count"], 0);
        assert!(
            MetricsSink::open(&MetricsConfig {
                metrics_path: "/nonexistent/m".into()
            })
            .is_err()
        );
    }
}

#[cfg(test)]
mod sink_tests {
    use super::*;
    use crate::logger::tests::{Dir, idle_reader, within};
    use std::time::Duration;

    fn snapshot(requests: &RequestCounters) -> Snapshot<'_> {
        Snapshot {
            requests,
            exits: None,
            devices: vec![("rootfs".into(), vec![("reads", 7)])],
            guest_boot_us: None,
            uart: Vec::new(),
        }
    }

    #[test]
    fn a_fifo_without_a_reader_is_refused_at_once() {
        let dir = Dir::new("metrics-noreader");
        let metrics_path = dir.fifo("m.fifo");
        let err = within(Duration::from_secs(5), move || {
            MetricsSink::open(&MetricsConfig { metrics_path }).err()
        })
        .expect("no reader: refused");
        assert!(
            err.to_string().contains("no process has open for reading"),
            "{err}"
        );
    }

    #[test]
    fn a_full_fifo_drops_lines_and_counts_them_instead_of_blocking() {
        let dir = Dir::new("metrics-full");
        let metrics_path = dir.fifo("m.fifo");
        let mut reader = idle_reader(&metrics_path);
        let mut sink = MetricsSink::open(&MetricsConfig { metrics_path }).unwrap();
        const N: u64 = 5000;
        let sink = within(Duration::from_secs(10), move || {
            let requests = RequestCounters::default();
            for _ in 0..N {
                sink.write(&snapshot(&requests)).unwrap();
            }
            sink
        });
        let missed = sink.missed();
        assert!(missed > 0 && missed < N, "{missed} of {N} dropped");
        // The lines that went through are whole JSON objects.
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut reader, &mut buf);
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(text.lines().count() as u64, N - missed);
        for l in text.lines() {
            let v: Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["devices"]["rootfs"]["reads"], 7);
        }
        // Once there is room, the next line says how many were lost.
        let mut sink = sink;
        sink.write(&snapshot(&RequestCounters::default())).unwrap();
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut reader, &mut buf);
        let last: Value = serde_json::from_str(String::from_utf8(buf).unwrap().trim_end()).unwrap();
        assert_eq!(last["logger"]["missed_metrics_count"], missed);
    }
}
