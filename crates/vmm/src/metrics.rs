//! Metrics: counters of the VMM, its vCPUs and devices, written as one
//! JSON object per line to the file `PUT /metrics` names, on
//! `FlushMetrics` and every minute.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::config::ConfigError;

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
    file: File,
    start: Instant,
    flushes: u64,
}

impl MetricsSink {
    /// Opens the metrics file (appending).
    pub fn open(c: &MetricsConfig) -> Result<Self, ConfigError> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&c.metrics_path)
            .map_err(|e| ConfigError::Unreadable {
                what: "metrics file",
                path: c.metrics_path.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            file,
            start: Instant::now(),
            flushes: 0,
        })
    }

    /// Writes one line of metrics.
    pub fn write(&mut self, snapshot: &Snapshot<'_>) -> std::io::Result<()> {
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
            .map(|(id, counters)| {
                let c: Map<String, Value> = counters
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), json!(v)))
                    .collect();
                (id.clone(), Value::Object(c))
            })
            .collect();
        m.insert("devices".into(), Value::Object(devices));
        if let Some(us) = snapshot.guest_boot_us {
            m.insert("guest_boot_time_us".into(), json!(us));
        }
        let mut line = Value::Object(m).to_string();
        line.push('\n');
        self.file.write_all(line.as_bytes())
    }
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
        assert!(
            MetricsSink::open(&MetricsConfig {
                metrics_path: "/nonexistent/m".into()
            })
            .is_err()
        );
    }
}
