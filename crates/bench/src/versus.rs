//! flatlet against Firecracker, side by side in one run (issue 16): the
//! same tiny ELF guest (flatlet's test guest, written by `flatlet
//! guest-image`) booted by both, and the figures the issue sets targets
//! for, as ratios flatlet / Firecracker.
//!
//! Firecracker is run as its README for this machine says: `--no-seccomp`
//! (the reference build has no default filter for this target) and
//! `--boot-timer` (its boot-timer device is attached only when asked).
//! flatlet runs with its seccomp filters, as shipped.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::probe::Measurement;
use crate::stats::Summary;

/// A Firecracker binary and the files its launches read.
pub struct Firecracker {
    binary: PathBuf,
    dir: PathBuf,
    config: PathBuf,
}

impl Firecracker {
    /// Checks `binary`, and writes flatlet's test guest (with `flatlet
    /// guest-image`) and a config file that boots it with `vcpus` vCPUs
    /// and 128 MiB, as flatlet's own launches do.
    pub fn prepare(binary: &Path, flatlet: &Path, vcpus: u32) -> Result<Self, String> {
        if !binary.is_file() {
            return Err(format!("{}: no such Firecracker binary", binary.display()));
        }
        let dir = std::env::temp_dir().join(format!("flatlet-bench-fc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let fc = Self {
            binary: binary.to_path_buf(),
            config: dir.join("vm.json"),
            dir,
        };
        let guest = fc.dir.join("guest.elf");
        let status = Command::new(flatlet)
            .args(["guest-image", "--out"])
            .arg(&guest)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("{}: {e}", flatlet.display()))?;
        if !status.success() {
            return Err(format!("{} guest-image failed: {status}", flatlet.display()));
        }
        let config = serde_json::json!({
            "boot-source": {
                "kernel_image_path": guest.display().to_string(),
                "boot_args": "console=ttyS0",
            },
            "machine-config": { "vcpu_count": vcpus, "mem_size_mib": 128 },
            "drives": [],
        });
        std::fs::write(&fc.config, config.to_string())
            .map_err(|e| format!("{}: {e}", fc.config.display()))?;
        Ok(fc)
    }

    /// The command line of one launch (boots the guest, exits at its reset).
    pub fn launch_argv(&self) -> Vec<String> {
        vec![
            self.binary.display().to_string(),
            "--no-api".into(),
            "--no-seccomp".into(),
            "--boot-timer".into(),
            "--config-file".into(),
            self.config.display().to_string(),
        ]
    }

    /// The command line that serves the API on `sock`.
    pub fn api_argv(&self, sock: &Path) -> Vec<String> {
        crate::api::api_argv(&self.binary, sock, &["--no-seccomp"])
    }
}

impl Drop for Firecracker {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One side's samples of each figure.
#[derive(Clone, Debug, Default)]
pub struct Side {
    /// User + system CPU time per launch (process and threads), µs.
    pub cpu_us: Vec<f64>,
    /// The Guest-boot-time each launch logged, µs.
    pub boot_us: Vec<f64>,
    /// Peak RSS per launch, KiB.
    pub rss_kib: Vec<f64>,
    /// Spawn to the first answered `GET /`, µs.
    pub api_us: Vec<f64>,
    /// Launches per second with 16 at once, per round.
    pub lps16: Vec<f64>,
}

impl Side {
    /// Takes the per-launch figures of successful launches.
    pub fn add_launches<'a>(&mut self, launches: impl IntoIterator<Item = &'a Measurement>) {
        for m in launches.into_iter().filter(|m| m.error.is_none()) {
            self.cpu_us.push(m.cpu_us);
            self.rss_kib.push(m.max_rss_kib as f64);
            self.boot_us.extend(m.guest_boot_us);
        }
    }
}

/// A figure, how it compares and the target for the ratio.
struct Figure {
    name: &'static str,
    unit: &'static str,
    scale: f64,
    pick: fn(&Side) -> &Vec<f64>,
    /// The target ratio, and whether lower is better.
    target: f64,
    lower_is_better: bool,
}

const FIGURES: [Figure; 5] = [
    Figure {
        name: "CPU time per launch",
        unit: "ms",
        scale: 1e-3,
        pick: |s| &s.cpu_us,
        target: 0.5,
        lower_is_better: true,
    },
    Figure {
        name: "Guest-boot-time",
        unit: "ms",
        scale: 1e-3,
        pick: |s| &s.boot_us,
        target: 0.4,
        lower_is_better: true,
    },
    Figure {
        name: "spawn -> first GET / answered",
        unit: "ms",
        scale: 1e-3,
        pick: |s| &s.api_us,
        target: 0.6,
        lower_is_better: true,
    },
    Figure {
        name: "peak RSS",
        unit: "MiB",
        scale: 1.0 / 1024.0,
        pick: |s| &s.rss_kib,
        target: 0.7,
        lower_is_better: true,
    },
    Figure {
        name: "launches/s, 16 at once",
        unit: "/s",
        scale: 1.0,
        pick: |s| &s.lps16,
        target: 2.0,
        lower_is_better: false,
    },
];

/// The ratio table: medians of each side, flatlet / Firecracker, and the
/// issue's target. `floor_rss_kib` is the peak RSS a plain `/bin/true`
/// shows through the same probe: the probe's own (the child shares its
/// pages until it execs, and the kernel keeps the larger peak), a floor
/// below which no launch can show.
pub fn table(flatlet: &Side, fc: &Side, floor_rss_kib: Option<f64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nflatlet against Firecracker (same guest, same harness, interleaved; medians)"
    );
    let _ = writeln!(
        out,
        "{:<32} {:>12} {:>12} {:>8} {:>8}",
        "figure", "flatlet", "Firecracker", "ratio", "target"
    );
    let median = |v: &Vec<f64>| Summary::of(v).map(|s| s.median);
    for f in &FIGURES {
        let (a, b) = (median((f.pick)(flatlet)), median((f.pick)(fc)));
        let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2} {}", v * f.scale, f.unit));
        let (ratio, verdict) = match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => {
                let r = a / b;
                let met = if f.lower_is_better {
                    r <= f.target
                } else {
                    r >= f.target
                };
                (format!("{r:.2}"), if met { "met" } else { "missed" })
            }
            _ => ("-".to_string(), "not measured"),
        };
        let target = format!("{}{}", if f.lower_is_better { "<=" } else { ">=" }, f.target);
        let _ = writeln!(
            out,
            "{:<32} {:>12} {:>12} {:>8} {:>8}  {verdict}",
            f.name,
            cell(a),
            cell(b),
            ratio,
            target
        );
    }
    if let Some(floor) = floor_rss_kib {
        let _ = writeln!(
            out,
            "(peak RSS: a plain /bin/true shows {:.2} MiB through the same probe, the probe's own peak; \
             a launch below that would show as that)",
            floor / 1024.0
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_gives_ratios_and_verdicts() {
        let fl = Side {
            cpu_us: vec![4000.0, 5000.0, 6000.0],
            boot_us: vec![4000.0],
            rss_kib: vec![2560.0],
            api_us: vec![1000.0],
            lps16: vec![300.0],
        };
        let fc = Side {
            cpu_us: vec![10_000.0],
            boot_us: vec![8000.0],
            rss_kib: vec![4096.0],
            api_us: vec![2000.0],
            lps16: vec![100.0],
        };
        let t = table(&fl, &fc, Some(2048.0));
        let line = |name: &str| t.lines().find(|l| l.starts_with(name)).unwrap().to_string();
        assert!(line("CPU time per launch").contains("0.50") && line("CPU time").ends_with(" met"));
        assert!(line("Guest-boot-time").contains("0.50") && line("Guest-boot-time").ends_with("missed"));
        assert!(line("launches/s").contains("3.00") && line("launches/s").ends_with(" met"));
        assert!(t.contains("shows 2.00 MiB"), "{t}");
        let empty = table(&Side::default(), &fc, None);
        assert!(empty.contains("not measured"));
    }

    #[test]
    fn launches_with_errors_are_left_out() {
        let mut s = Side::default();
        let ok = Measurement {
            cpu_us: 1.0,
            max_rss_kib: 2,
            guest_boot_us: Some(3.0),
            ..Default::default()
        };
        let bad = Measurement {
            error: Some("x".into()),
            ..ok.clone()
        };
        s.add_launches([&ok, &bad]);
        assert_eq!((s.cpu_us.len(), s.rss_kib, s.boot_us), (1, vec![2.0], vec![3.0]));
    }
}
