//! The comparison's outputs: a table, JSON and CSV with every sample, an
//! SVG chart, and a description of the machine it ran on.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::compare::{Contender, Sample, SweepPoint};
use crate::stats::Summary;

/// Where the numbers come from.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Memory in MiB.
    pub mem_mib: u64,
    /// Kernel release.
    pub kernel: String,
    /// The KVM host, as flatlet sees it.
    pub kvm: String,
    /// Whether guest ring-0 code is emulated here.
    pub emulated_guest_kernel: bool,
}

impl Machine {
    /// Reads this machine.
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let cpus = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
        let mem_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .next()
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .map(|kib| kib / 1024)
            .unwrap_or(0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let host = flatlet_vmm::host::HostKind::detect();
        Self {
            cpu,
            cpus,
            mem_mib,
            kernel,
            kvm: host.to_string(),
            emulated_guest_kernel: host.emulates_guest_kernel(),
        }
    }

    /// A short text for the report.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "Machine: {} ({} CPUs, {} MiB), Linux {}.\nKVM: {}.\n",
            self.cpu, self.cpus, self.mem_mib, self.kernel, self.kvm
        );
        if self.emulated_guest_kernel {
            s.push_str(
                "Note: on this nested host guest ring-0 code runs in KVM's instruction emulator, so \
                 the guest's own boot is ~1000x slower than on a host with hardware virtualization; \
                 the flatlet figures here are mostly the VMM's and KVM's own costs plus an emulated guest.\n",
            );
        }
        s
    }
}

/// Per-contender summary.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Contender.
    pub contender: String,
    /// Successful samples.
    pub samples: usize,
    /// Failed launches.
    pub failures: usize,
    /// Spawn to ready, in ms.
    pub ready_ms: Option<Summary>,
    /// Spawn to exit, in ms.
    pub exit_ms: Option<Summary>,
    /// CPU time, in ms.
    pub cpu_ms: Option<Summary>,
    /// Peak RSS, in MiB.
    pub rss_mib: Option<Summary>,
    /// Median launches per second at each concurrency.
    pub launches_per_sec: Vec<(usize, f64)>,
}

fn ms(v: impl Iterator<Item = f64>) -> Option<Summary> {
    Summary::of(&v.map(|us| us / 1000.0).collect::<Vec<_>>())
}

/// Summarises the samples of each contender.
pub fn rows(contenders: &[Contender], samples: &[Sample], sweep: &[SweepPoint]) -> Vec<Row> {
    contenders
        .iter()
        .filter(|c| c.missing.is_none())
        .map(|c| {
            let ok: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.contender == c.name && s.m.error.is_none())
                .collect();
            let failures = samples
                .iter()
                .filter(|s| s.contender == c.name && s.m.error.is_some())
                .count();
            let mut lps: Vec<(usize, f64)> = sweep
                .iter()
                .filter(|p| p.contender == c.name)
                .filter_map(|p| Summary::of(&p.launches_per_sec).map(|s| (p.concurrency, s.median)))
                .collect();
            lps.sort_by_key(|(k, _)| *k);
            Row {
                contender: c.name.clone(),
                samples: ok.len(),
                failures,
                ready_ms: ms(ok.iter().filter_map(|s| s.m.ready_us)),
                exit_ms: ms(ok.iter().map(|s| s.m.exit_us)),
                cpu_ms: ms(ok.iter().map(|s| s.m.cpu_us)),
                rss_mib: Summary::of(
                    &ok.iter()
                        .map(|s| s.m.max_rss_kib as f64 / 1024.0)
                        .collect::<Vec<_>>(),
                ),
                launches_per_sec: lps,
            }
        })
        .collect()
}

/// The terminal table.
pub fn table(rows: &[Row], contenders: &[Contender]) -> String {
    let mut out = String::new();
    let f = |s: &Option<Summary>| s.map_or("-".to_string(), |s| format!("{:.2}", s.median));
    let p = |s: &Option<Summary>| s.map_or("-".to_string(), |s| format!("{:.2}", s.p95));
    let _ = writeln!(
        out,
        "{:<16} {:>4} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}  launches/s at 1/2/4/8/16 at once",
        "contender", "n", "ready ms", "(p95)", "exit ms", "(p95)", "CPU ms", "RSS MiB"
    );
    for r in rows {
        let lps: Vec<String> = r.launches_per_sec.iter().map(|(_, v)| rate(*v)).collect();
        let _ = writeln!(
            out,
            "{:<16} {:>4} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}  {}",
            r.contender,
            r.samples,
            f(&r.ready_ms),
            p(&r.ready_ms),
            f(&r.exit_ms),
            p(&r.exit_ms),
            f(&r.cpu_ms),
            f(&r.rss_mib),
            lps.join(" / ")
        );
        if r.failures > 0 {
            let _ = writeln!(out, "{:<16} {} launches failed", "", r.failures);
        }
    }
    for c in contenders.iter().filter(|c| c.missing.is_some()) {
        let _ = writeln!(
            out,
            "{:<16} missing: {}",
            c.name,
            c.missing.as_deref().unwrap_or("")
        );
    }
    out
}

/// Every sample as CSV.
pub fn csv(samples: &[Sample]) -> String {
    let mut out =
        String::from("contender,run,ready_ms,exit_ms,first_byte_ms,guest_boot_ms,cpu_ms,max_rss_kib,error\n");
    let opt = |v: Option<f64>| v.map_or(String::new(), |x| format!("{:.3}", x / 1000.0));
    for s in samples {
        let error = s.m.error.as_deref().unwrap_or("").replace(['"', '\n'], " ");
        let _ = writeln!(
            out,
            "{},{},{},{:.3},{},{},{:.3},{},\"{}\"",
            s.contender,
            s.run,
            opt(s.m.ready_us),
            s.m.exit_us / 1000.0,
            opt(s.m.first_byte_us),
            opt(s.m.guest_boot_us),
            s.m.cpu_us / 1000.0,
            s.m.max_rss_kib,
            error
        );
    }
    out
}

/// Everything, as JSON.
#[derive(Serialize)]
pub struct Report<'a> {
    /// The machine.
    pub machine: &'a Machine,
    /// The contenders (missing ones with why).
    pub contenders: &'a [Contender],
    /// Summaries.
    pub summary: &'a [Row],
    /// Every sample.
    pub samples: &'a [Sample],
    /// The sweep.
    pub sweep: &'a [SweepPoint],
}

const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// The chart: a box plot of spawn-to-ready times per contender, and
/// launches per second against concurrency.
pub fn svg(path: &Path, rows: &[Row], samples: &[Sample], machine: &Machine) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let title = format!("flatlet vs containers on {} ({} CPUs)", machine.cpu, machine.cpus);
    let root = root.titled(&title, ("sans-serif", 20)).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(660);

    let names: Vec<String> = rows.iter().map(|r| r.contender.clone()).collect();
    let max_ms = samples
        .iter()
        .filter(|s| s.m.error.is_none())
        .filter_map(|s| s.m.ready_us)
        .fold(1.0f64, f64::max)
        / 1000.0;
    let mut chart = ChartBuilder::on(&left)
        .caption("spawn to ready (ms)", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(110)
        .build_cartesian_2d(0f32..(max_ms * 1.05) as f32, names.as_slice().into_segmented())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("milliseconds")
        .disable_y_mesh()
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(name) | SegmentValue::Exact(name) => name.to_string(),
            SegmentValue::Last => String::new(),
        })
        .draw()
        .map_err(|e| err(&e))?;
    for (i, r) in rows.iter().enumerate() {
        let values: Vec<f32> = samples
            .iter()
            .filter(|s| s.contender == r.contender && s.m.error.is_none())
            .filter_map(|s| s.m.ready_us.map(|us| (us / 1000.0) as f32))
            .collect();
        if values.is_empty() {
            continue;
        }
        let q = Quartiles::new(&values);
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(std::iter::once(
                Boxplot::new_horizontal(SegmentValue::CenterOf(&names[i]), &q)
                    .width(18)
                    .style(colour.stroke_width(2)),
            ))
            .map_err(|e| err(&e))?;
    }

    let max_k = rows
        .iter()
        .flat_map(|r| r.launches_per_sec.iter().map(|(k, _)| *k))
        .max()
        .unwrap_or(1)
        .max(2);
    let max_lps = rows
        .iter()
        .flat_map(|r| r.launches_per_sec.iter().map(|(_, v)| *v))
        .fold(1.0f64, f64::max);
    // Logarithmic axes: the plain process launches ~10x faster than the
    // rest, and the concurrency levels double.
    let min_lps = rows
        .iter()
        .flat_map(|r| r.launches_per_sec.iter().map(|(_, v)| *v))
        .filter(|v| *v > 0.0)
        .fold(max_lps, f64::min);
    let mut chart = ChartBuilder::on(&right)
        .caption("launches per second", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (1f64..max_k as f64).log_scale(),
            // Headroom above for the legend.
            (min_lps * 0.8..max_lps * 10.0).log_scale(),
        )
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("launched at once")
        .y_desc("launches/s")
        .light_line_style(WHITE)
        .x_label_formatter(&|k| format!("{k:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, r) in rows.iter().enumerate() {
        if r.launches_per_sec.is_empty() {
            continue;
        }
        let colour = COLOURS[i % COLOURS.len()];
        let pts: Vec<(f64, f64)> = r.launches_per_sec.iter().map(|(k, v)| (*k as f64, *v)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(r.contender.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, colour.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

/// A launch rate for the table: whole numbers where they are large, but a
/// slow contender (a Linux boot on a nested host) does not show as 0.
fn rate(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::Measurement;

    fn sample(c: &str, run: usize, ready_ms: f64, error: Option<&str>) -> Sample {
        Sample {
            contender: c.into(),
            run,
            m: Measurement {
                exit_code: Some(0),
                ready_us: Some(ready_ms * 1000.0),
                exit_us: ready_ms * 1000.0 + 500.0,
                cpu_us: 1000.0,
                max_rss_kib: 2048,
                error: error.map(String::from),
                ..Default::default()
            },
        }
    }

    fn contender(name: &str, missing: Option<&str>) -> Contender {
        Contender {
            name: name.into(),
            what: String::new(),
            argv: vec!["/bin/true".into()],
            ready: "exit".into(),
            cleanup: None,
            missing: missing.map(String::from),
        }
    }

    #[test]
    fn rates_keep_slow_contenders_visible() {
        assert_eq!(rate(1654.4), "1654");
        assert_eq!(rate(2.345), "2.3");
        assert_eq!(rate(1.0 / 63.0), "0.016");
    }

    #[test]
    fn rows_summarise_and_skip_failures() {
        let cs = vec![contender("a", None), contender("b", Some("not installed"))];
        let samples = vec![
            sample("a", 0, 1.0, None),
            sample("a", 1, 3.0, None),
            sample("a", 2, 2.0, None),
            sample("a", 3, 99.0, Some("boom")),
        ];
        let sweep = vec![SweepPoint {
            contender: "a".into(),
            concurrency: 2,
            launches_per_sec: vec![10.0, 30.0, 20.0],
        }];
        let r = rows(&cs, &samples, &sweep);
        assert_eq!(r.len(), 1, "missing contenders have no row");
        assert_eq!((r[0].samples, r[0].failures), (3, 1));
        assert_eq!(r[0].ready_ms.unwrap().median, 2.0);
        assert_eq!(r[0].exit_ms.unwrap().max, 3.5);
        assert_eq!(r[0].rss_mib.unwrap().median, 2.0);
        assert_eq!(r[0].launches_per_sec, vec![(2, 20.0)]);
        let t = table(&r, &cs);
        assert!(t.contains("missing: not installed"), "{t}");
        assert!(t.contains("1 launches failed"), "{t}");
    }

    #[test]
    fn csv_has_a_row_per_sample() {
        let samples = vec![sample("a", 0, 1.5, None), sample("b", 0, 2.0, Some("x\"y"))];
        let text = csv(&samples);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("contender,run,ready_ms"));
        assert!(lines[1].starts_with("a,0,1.500,2.000,"));
        assert!(lines[2].ends_with("\"x y\""), "{}", lines[2]);
    }

    #[test]
    fn svg_is_written() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("chart.svg");
        let cs = vec![contender("a", None), contender("b", None)];
        let samples = vec![
            sample("a", 0, 1.0, None),
            sample("a", 1, 2.0, None),
            sample("b", 0, 5.0, None),
        ];
        let sweep = vec![
            SweepPoint {
                contender: "a".into(),
                concurrency: 1,
                launches_per_sec: vec![100.0],
            },
            SweepPoint {
                contender: "a".into(),
                concurrency: 4,
                launches_per_sec: vec![300.0],
            },
        ];
        let r = rows(&cs, &samples, &sweep);
        let m = Machine {
            cpu: "test cpu".into(),
            cpus: 2,
            mem_mib: 1,
            kernel: "6".into(),
            kvm: "kvm".into(),
            emulated_guest_kernel: true,
        };
        svg(&path, &r, &samples, &m).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("<svg"));
        assert!(text.contains("launches per second") && text.contains("test cpu"));
        assert!(m.describe().contains("emulator"));
    }
}
