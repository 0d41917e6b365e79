//! Metrics: counters of the VMM, its vCPUs and devices, written as one
//! JSON object per line to the file `PUT /metrics` names, on
//! `FlushMetrics` and every minute.
//!
//! The line has Firecracker's shape for what flatlet has: its groups
//! (`api_server`, `get_api_requests`, `put_api_requests`,
//! `patch_api_requests`, `deprecated_api`, `block`, `net`, `vcpu`, `vmm`,
//! `seccomp`, `uart`, `i8042`, `latencies_us`, `signals`, `logger`, and one
//! group per device, `block_<id>`, `net_<id>`) and field names, and, as in
//! Firecracker, a counter reports what happened since the previous line;
//! a few values (times, `utc_timestamp_ms`) are as they are now. Fields
//! Firecracker does not have are flatlet's own additions beside its.
//!
//! The file is a [`Sink`]: written without blocking, so a FIFO nobody
//! reads costs a dropped line (`logger.missed_metrics_count`), never a
//! stalled VMM thread.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::config::ConfigError;
use crate::logger::{self, Sink, Written};

/// How often metrics are written without being asked.
pub const FLUSH_INTERVAL_SECS: u64 = 60;

/// `PUT /metrics` (Firecracker's `Metrics`), and `metrics` in a config
/// file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A file (or FIFO) to append metrics to.
    pub metrics_path: String,
    /// Whether each line carries the instance id as `id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emit_id: Option<bool>,
    /// Key-value pairs each line carries under `properties`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<BTreeMap<String, String>>,
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
            "failures": 0,
            "emulation_recoveries": get(&self.recoveries),
        })
    }
}

/// Counters of the request path: all requests, and Firecracker's per-route
/// counters (`<group>.<name>_count` and `_fails`).
#[derive(Debug, Default)]
pub struct RequestCounters {
    /// Requests handled.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    routes: HashMap<(&'static str, String), u64>,
}

impl RequestCounters {
    /// Counts one request of Firecracker's metric `group` and `name`
    /// (`put_api_requests`, `drive`); a failed one counts in `_fails`
    /// too (GET routes have no `_fails`).
    pub fn count(&mut self, group: &'static str, name: &str, failed: bool) {
        *self.routes.entry((group, format!("{name}_count"))).or_default() += 1;
        if failed && group != "get_api_requests" {
            *self.routes.entry((group, format!("{name}_fails"))).or_default() += 1;
        }
    }

    /// One group's counters, with every field Firecracker has for what
    /// flatlet serves (0 until counted).
    fn group(&self, group: &'static str, names: &[&str]) -> Value {
        let mut m = Map::new();
        for name in names {
            let mut fields = vec![format!("{name}_count")];
            if group != "get_api_requests" {
                fields.push(format!("{name}_fails"));
            }
            for f in fields {
                let v = self.routes.get(&(group, f.clone())).copied().unwrap_or(0);
                m.insert(f, json!(v));
            }
        }
        Value::Object(m)
    }
}

/// Times of the last operations (Firecracker's `latencies_us`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Latencies {
    /// The last pause, in microseconds.
    pub pause_vm: u64,
    /// The last resume, in microseconds.
    pub resume_vm: u64,
}

/// Process start-up times (Firecracker's `api_server` group): from the
/// start the caller gave (`--start-time-us`) to the API socket's binding.
#[derive(Clone, Copy, Debug, Default)]
pub struct Startup {
    /// Wall time, in microseconds.
    pub wall_us: u64,
    /// CPU time (with a parent's, `--parent-cpu-time-us`), in microseconds.
    pub cpu_us: u64,
}

/// Values that are reported as they are, not as changes since the last
/// line.
const GAUGES: &[&str] = &[
    "utc_timestamp_ms",
    "uptime_ms",
    "flushes",
    "guest_boot_time_us",
    "process_startup_time_us",
    "process_startup_time_cpu_us",
];

/// Where metrics go.
pub struct MetricsSink {
    sink: Sink,
    config: MetricsConfig,
    start: Instant,
    flushes: u64,
    missed: u64,
    fails: u64,
    /// Each counter's value at the last line, by its path.
    previous: HashMap<String, u64>,
}

impl MetricsSink {
    /// Opens the metrics file (appending; a FIFO must have a reader).
    pub fn open(c: &MetricsConfig) -> Result<Self, ConfigError> {
        Ok(Self {
            sink: Sink::open(&c.metrics_path, "metrics file")?,
            config: c.clone(),
            start: Instant::now(),
            flushes: 0,
            missed: 0,
            fails: 0,
            previous: HashMap::new(),
        })
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &MetricsConfig {
        &self.config
    }

    /// Lines that could not be written.
    pub fn missed(&self) -> u64 {
        self.missed
    }

    /// Writes one line of metrics; a line the file cannot take now (a
    /// full FIFO) is dropped and counted, and is not an error.
    pub fn write(&mut self, snapshot: &Snapshot<'_>) -> std::io::Result<()> {
        let totals = self.line(snapshot);
        let mut now = HashMap::new();
        let mut line = self.changes(totals, "", &mut now).to_string();
        line.push('\n');
        match self.sink.write_record(line.as_bytes()) {
            Ok(Written::Whole) => {
                // Only a line that went out moves the baseline: what a
                // dropped line would have said goes in the next one.
                self.previous.extend(now);
                Ok(())
            }
            Ok(Written::Dropped) => {
                self.missed += 1;
                Ok(())
            }
            Err(e) => {
                self.missed += 1;
                self.fails += 1;
                Err(e)
            }
        }
    }

    /// `totals` with each counter replaced by its change since the last
    /// line (gauges and text stay as they are).
    fn changes(&self, totals: Value, path: &str, now: &mut HashMap<String, u64>) -> Value {
        match totals {
            Value::Object(m) => Value::Object(
                m.into_iter()
                    .map(|(k, v)| {
                        let v = if path.is_empty() && (k == "id" || k == "properties") {
                            v
                        } else {
                            self.changes(v, &format!("{path}/{k}"), now)
                        };
                        (k, v)
                    })
                    .collect(),
            ),
            Value::Number(n) => {
                let gauge = path.starts_with("/latencies_us/")
                    || GAUGES.iter().any(|g| path.rsplit('/').next() == Some(g));
                match n.as_u64() {
                    Some(v) if !gauge => {
                        let before = self.previous.get(path).copied().unwrap_or(0);
                        now.insert(path.to_string(), v);
                        json!(v.saturating_sub(before))
                    }
                    _ => Value::Number(n),
                }
            }
            other => other,
        }
    }

    /// The JSON object of one flush, with totals.
    fn line(&mut self, snapshot: &Snapshot<'_>) -> Value {
        self.flushes += 1;
        let utc_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let r = snapshot.requests;
        let mut m = Map::new();
        m.insert("utc_timestamp_ms".into(), json!(utc_ms));
        if self.config.emit_id == Some(true) {
            m.insert("id".into(), json!(snapshot.id));
        }
        if let Some(p) = &self.config.properties {
            m.insert("properties".into(), json!(p));
        }
        m.insert(
            "api_server".into(),
            json!({
                "process_startup_time_us": snapshot.startup.wall_us,
                "process_startup_time_cpu_us": snapshot.startup.cpu_us,
                "sync_response_fails": 0,
                "sync_vmm_send_timeout_count": 0,
                "requests": r.requests,
                "errors": r.errors,
            }),
        );
        m.insert(
            "get_api_requests".into(),
            r.group(
                "get_api_requests",
                &["instance_info", "machine_cfg", "mmds", "vmm_version"],
            ),
        );
        m.insert(
            "put_api_requests".into(),
            r.group(
                "put_api_requests",
                &[
                    "actions",
                    "boot_source",
                    "drive",
                    "logger",
                    "machine_cfg",
                    "metrics",
                    "mmds",
                    "network",
                ],
            ),
        );
        m.insert(
            "patch_api_requests".into(),
            r.group("patch_api_requests", &["drive", "network", "machine_cfg", "mmds"]),
        );
        m.insert("deprecated_api".into(), json!({"deprecated_http_api_calls": 0}));
        for (kind, group) in device_groups(&snapshot.devices) {
            m.insert(kind, group);
        }
        let exits = snapshot.exits.map(ExitCounters::to_json);
        m.insert(
            "vcpu".into(),
            exits.unwrap_or_else(|| ExitCounters::default().to_json()),
        );
        m.insert("vmm".into(), json!({"panic_count": 0}));
        m.insert("seccomp".into(), json!({"num_faults": 0}));
        let mut uart = json!({"write_count": 0, "missed_write_count": 0});
        for (k, v) in &snapshot.uart {
            uart[*k] = json!(v);
        }
        m.insert("uart".into(), uart);
        // An i8042 reset ends the VM (and flatlet) at once.
        m.insert("i8042".into(), json!({"reset_count": 0}));
        let l = snapshot.latencies;
        m.insert(
            "latencies_us".into(),
            json!({
                "pause_vm": l.pause_vm, "resume_vm": l.resume_vm,
                "vmm_pause_vm": l.pause_vm, "vmm_resume_vm": l.resume_vm,
            }),
        );
        m.insert(
            "signals".into(),
            json!({"sigbus": 0, "sigsegv": 0, "sigxfsz": 0, "sigxcpu": 0, "sigpipe": 0, "sighup": 0, "sigill": 0}),
        );
        let log = logger::counters();
        m.insert(
            "logger".into(),
            json!({
                "missed_log_count": log.missed,
                "rate_limited_log_count": log.rate_limited,
                "missed_metrics_count": self.missed,
                "metrics_fails": self.fails,
            }),
        );
        // flatlet's own.
        m.insert("uptime_ms".into(), json!(self.start.elapsed().as_millis()));
        m.insert("flushes".into(), json!(self.flushes));
        if let Some(us) = snapshot.guest_boot_us {
            m.insert("guest_boot_time_us".into(), json!(us));
        }
        Value::Object(m)
    }
}

/// The groups of the devices: `<kind>_<id>` for each, and `<kind>` with
/// the sums of every device of that kind (`block` and `net` are there
/// with no device too).
fn device_groups(devices: &[DeviceCounters]) -> Vec<(String, Value)> {
    let mut sums: BTreeMap<&str, Map<String, Value>> = BTreeMap::new();
    sums.insert("block", Map::new());
    sums.insert("net", Map::new());
    let mut out = Vec::new();
    for d in devices {
        let sum = sums.entry(d.kind).or_default();
        for (k, v) in &d.counters {
            let total = sum.get(*k).and_then(Value::as_u64).unwrap_or(0) + v;
            sum.insert((*k).to_string(), json!(total));
        }
        out.push((format!("{}_{}", d.kind, d.id), counters_json(&d.counters)));
    }
    out.extend(sums.into_iter().map(|(k, v)| (k.to_string(), Value::Object(v))));
    out
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

/// One device's counters.
pub struct DeviceCounters {
    /// Its kind, as Firecracker names its metric group (`block`, `net`).
    pub kind: &'static str,
    /// Its id.
    pub id: String,
    /// Its counters.
    pub counters: Vec<(&'static str, u64)>,
}

/// Firecracker's metric group of a virtio device type.
pub fn device_kind(device_type: u32) -> &'static str {
    match device_type {
        1 => "net",
        2 => "block",
        4 => "entropy",
        5 => "balloon",
        19 => "vsock",
        _ => "virtio",
    }
}

/// What a flush reports.
pub struct Snapshot<'a> {
    /// The instance id.
    pub id: &'a str,
    /// Request counters.
    pub requests: &'a RequestCounters,
    /// vCPU exit counters (once a VM runs).
    pub exits: Option<&'a ExitCounters>,
    /// Each device's counters.
    pub devices: Vec<DeviceCounters>,
    /// The boot time the guest signalled.
    pub guest_boot_us: Option<u128>,
    /// The console UART's counters (once a VM runs).
    pub uart: Vec<(&'static str, u64)>,
    /// Process start-up times.
    pub startup: Startup,
    /// Last pause and resume times.
    pub latencies: Latencies,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_json_line_per_flush() {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let path = f.as_path().display().to_string();
        let props = BTreeMap::from([("team".to_string(), "a".to_string())]);
        let mut sink = MetricsSink::open(&MetricsConfig {
            metrics_path: path.clone(),
            emit_id: Some(true),
            properties: Some(props),
        })
        .unwrap();
        let exits = ExitCounters::default();
        ExitCounters::bump(&exits.io_out);
        let mut requests = RequestCounters::default();
        requests.count("put_api_requests", "drive", true);
        requests.count("get_api_requests", "instance_info", false);
        let disk = |reads| DeviceCounters {
            kind: "block",
            id: "rootfs".into(),
            counters: vec![("read_count", reads)],
        };
        let startup = Startup {
            wall_us: 900,
            cpu_us: 400,
        };
        for reads in [7, 10] {
            sink.write(&Snapshot {
                id: "vm-1",
                requests: &requests,
                exits: Some(&exits),
                devices: vec![disk(reads)],
                guest_boot_us: Some(1234),
                uart: vec![("missed_write_count", 5)],
                startup,
                latencies: Latencies {
                    pause_vm: 30,
                    resume_vm: 0,
                },
            })
            .unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        let (a, b) = (&lines[0], &lines[1]);
        assert_eq!(a["id"], "vm-1");
        assert_eq!(a["properties"]["team"], "a");
        assert_eq!(a["put_api_requests"]["drive_count"], 1);
        assert_eq!(a["put_api_requests"]["drive_fails"], 1);
        assert_eq!(a["put_api_requests"]["logger_fails"], 0);
        assert_eq!(a["get_api_requests"]["instance_info_count"], 1);
        assert_eq!(a["vcpu"]["exit_io_out"], 1);
        assert_eq!(a["block_rootfs"]["read_count"], 7);
        assert_eq!(a["block"]["read_count"], 7);
        assert_eq!(a["net"], json!({}));
        assert_eq!(a["uart"]["missed_write_count"], 5);
        assert_eq!(a["api_server"]["process_startup_time_us"], 900);
        // Counters are changes since the last line, as in Firecracker;
        // times are as they are.
        assert_eq!(b["block_rootfs"]["read_count"], 3);
        assert_eq!(b["put_api_requests"]["drive_count"], 0);
        assert_eq!(b["uart"]["missed_write_count"], 0);
        assert_eq!(b["api_server"]["process_startup_time_us"], 900);
        assert_eq!(b["latencies_us"]["pause_vm"], 30);
        assert_eq!(b["guest_boot_time_us"], 1234);
        assert_eq!(b["flushes"], 2);
        assert_eq!(b["logger"]["missed_metrics_count"], 0);
        for group in [
            "seccomp",
            "vmm",
            "signals",
            "i8042",
            "deprecated_api",
            "patch_api_requests",
        ] {
            assert!(b[group].is_object(), "{group}");
        }
        assert!(
            MetricsSink::open(&MetricsConfig {
                metrics_path: "/nonexistent/m".into(),
                emit_id: None,
                properties: None,
            })
            .is_err()
        );
        let c: MetricsConfig =
            serde_json::from_str(r#"{"metrics_path": "/m", "emit_id": false, "properties": {"k": "v"}}"#)
                .unwrap();
        assert_eq!(c.emit_id, Some(false));
        assert!(serde_json::from_str::<MetricsConfig>(r#"{"metrics_path": "/m", "x": 1}"#).is_err());
    }
}

#[cfg(test)]
mod sink_tests {
    use super::*;
    use crate::logger::tests::{Dir, idle_reader, within};
    use std::time::Duration;

    fn snapshot(requests: &RequestCounters) -> Snapshot<'_> {
        Snapshot {
            id: "x",
            requests,
            exits: None,
            devices: vec![DeviceCounters {
                kind: "block",
                id: "rootfs".into(),
                counters: vec![("read_count", 7)],
            }],
            guest_boot_us: None,
            uart: Vec::new(),
            startup: Startup::default(),
            latencies: Latencies::default(),
        }
    }

    #[test]
    fn a_fifo_without_a_reader_is_refused_at_once() {
        let dir = Dir::new("metrics-noreader");
        let metrics_path = dir.fifo("m.fifo");
        let err = within(Duration::from_secs(5), move || {
            MetricsSink::open(&MetricsConfig {
                metrics_path,
                emit_id: None,
                properties: None,
            })
            .err()
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
        let mut sink = MetricsSink::open(&MetricsConfig {
            metrics_path,
            emit_id: None,
            properties: None,
        })
        .unwrap();
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
            assert!(v["block_rootfs"]["read_count"].is_u64(), "{v}");
        }
        let seen: u64 = text
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["logger"]["missed_metrics_count"]
                    .as_u64()
                    .unwrap()
            })
            .sum();
        // Once there is room, the next line says how many more were lost.
        let mut sink = sink;
        sink.write(&snapshot(&RequestCounters::default())).unwrap();
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut reader, &mut buf);
        let last: Value = serde_json::from_str(String::from_utf8(buf).unwrap().trim_end()).unwrap();
        assert_eq!(
            seen + last["logger"]["missed_metrics_count"].as_u64().unwrap(),
            missed
        );
    }
}
