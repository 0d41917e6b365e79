//! `flatlet-bench`: measures microVM launches with flatlet (and, later,
//! container starts) side by side, on this machine.

mod api;
mod compare;
mod devices;
mod probe;
mod report;
mod snapshot;
mod stats;
mod versus;
mod vsock;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use probe::{Measurement, Ready};
use stats::Summary;

#[derive(Debug, Parser)]
#[command(name = "flatlet-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Launch the built-in test guest N times (per irqchip mode) and report
    /// the medians: process start to the first console byte, the
    /// Guest-boot-time, process start to exit, peak RSS and peak RSS less
    /// the guest memory the VM touched.
    Boot {
        /// Measured launches per variant.
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Unmeasured launches first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// vCPUs of the guest.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// irqchip modes to compare (comma-separated: split, full, full-pit).
        #[arg(long, default_value = "split", value_delimiter = ',')]
        irqchip: Vec<String>,
        /// Device sets to compare (comma-separated): none, blk (one drive),
        /// blk+net (and a virtio-net device on --tap).
        #[arg(long, default_value = "none", value_delimiter = ',')]
        devices: Vec<String>,
        /// The TAP device for blk+net (run flatlet-bench in the network
        /// namespace that holds it).
        #[arg(long)]
        tap: Option<String>,
        /// The flatlet binary (default: the one next to flatlet-bench).
        #[arg(long)]
        flatlet: Option<PathBuf>,
        /// A Firecracker binary to run side by side (the same guest, and a
        /// plain process as the floor, interleaved), then spawn to first
        /// `GET /` and 16 launches at once of both: ratios flatlet /
        /// Firecracker against issue 16's targets.
        #[arg(long)]
        firecracker: Option<PathBuf>,
    },
    /// microVM launch against container start: flatlet (test guest, and
    /// under the jailer), runc, crun, bwrap, unshare+chroot and a plain
    /// process; a table, and JSON, CSV and an SVG chart in --out.
    Compare {
        /// A small run, for CI and a first look (under a minute).
        #[arg(long)]
        quick: bool,
        /// Measured launches per contender.
        #[arg(long)]
        runs: Option<usize>,
        /// Unmeasured rounds first.
        #[arg(long)]
        warmup: Option<usize>,
        /// Concurrency levels (comma-separated).
        #[arg(long, value_delimiter = ',')]
        sweep: Option<Vec<usize>>,
        /// Rounds per concurrency level.
        #[arg(long)]
        sweep_rounds: Option<usize>,
        /// Where the JSON, CSV and SVG files go.
        #[arg(long, default_value = "bench-out")]
        out: PathBuf,
        /// The OCI bundle tools/setup-bench made.
        #[arg(long, default_value = "/var/tmp/flatlet-bench/bundle")]
        bundle: PathBuf,
        /// A Linux kernel to boot as well (with --rootfs), for real hosts.
        #[arg(long, requires = "rootfs")]
        kernel: Option<PathBuf>,
        /// The root file system image for --kernel.
        #[arg(long, requires = "kernel")]
        rootfs: Option<PathBuf>,
        /// The flatlet binary (default: the one next to flatlet-bench).
        #[arg(long)]
        flatlet: Option<PathBuf>,
        /// A Firecracker binary: a contender booting the same guest, plus
        /// spawn to first `GET /` of both and ratios flatlet / Firecracker.
        #[arg(long)]
        firecracker: Option<PathBuf>,
        /// Only these contenders (comma-separated names, e.g.
        /// process,flatlet,firecracker).
        #[arg(long, value_delimiter = ',')]
        only: Option<Vec<String>>,
        /// An image imported in containerd (e.g. the one
        /// tools/build-oci-image makes): contenders `ctr run --rm` of
        /// /bin/true with runc (io.containerd.runc.v2) and with flatlet's
        /// shim (io.containerd.flatlet.v2; seconds per container on nested
        /// hosts: use few --runs and --sweep 1).
        #[arg(long, value_name = "IMAGE")]
        containerd_image: Option<String>,
        /// containerd's socket, for --containerd-image.
        #[arg(long, value_name = "PATH", default_value = "/run/containerd/containerd.sock")]
        containerd_address: String,
    },
    /// Throughput of the virtio device models without a guest, against the
    /// plain system calls they wrap (virtio-blk vs pread/pwrite on tmpfs,
    /// virtio-net TX vs write to a TAP; the latter needs root).
    Devices {
        /// MiB moved each way through virtio-blk (and through pread/pwrite).
        #[arg(long, default_value_t = 2048)]
        blk_mib: u64,
        /// Frames sent through virtio-net (and written to the TAP), per size.
        #[arg(long, default_value_t = 200_000)]
        frames: usize,
        /// Where the image goes (a tmpfs).
        #[arg(long, default_value = "/dev/shm")]
        dir: String,
        /// Rounds (the table shows the median of each figure).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// The API's costs: process start to the first answered `GET /`, and
    /// the latency of `GET /` and `PUT /machine-config` on one connection.
    Api {
        /// Launches timed to their first answer.
        #[arg(long, default_value_t = 20)]
        launches: usize,
        /// Requests of each kind timed.
        #[arg(long, default_value_t = 1000)]
        requests: usize,
        /// The flatlet binary (default: the one next to flatlet-bench).
        #[arg(long)]
        flatlet: Option<PathBuf>,
    },
    /// virtio-vsock through a microVM running the test guest's echo
    /// service, against a Unix socket pair echoed by a host thread:
    /// host->guest and guest->host MiB/s and a 1-byte round trip, as ratios.
    Vsock {
        /// MiB echoed per bulk round.
        #[arg(long, default_value_t = 16)]
        mib: usize,
        /// Bulk rounds per path (interleaved; the table shows medians).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// 1-byte round trips per path.
        #[arg(long, default_value_t = 1000)]
        trips: usize,
        /// The flatlet binary (default: the one next to flatlet-bench).
        #[arg(long)]
        flatlet: Option<PathBuf>,
    },
    /// Full snapshots of the test guest (1 vCPU, 128 MiB, flatlet.stay) and
    /// restores from them: create time and bytes written, load time,
    /// spawn to the restored guest's first console byte, and N clones
    /// restored at once; with --firecracker side by side, interleaved, with
    /// ratios against issue 14's targets.
    Snapshot {
        /// Measured runs per VMM (the table shows medians).
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Restores at once from one snapshot, per run.
        #[arg(long, default_value_t = 16)]
        clones: usize,
        /// Pause the guest this many ms after its heartbeat-1 line (its
        /// timer ticks every 1000 ms; both VMMs pause at the same point).
        #[arg(long, default_value_t = 900)]
        phase_ms: u64,
        /// A Firecracker binary to run side by side.
        #[arg(long)]
        firecracker: Option<PathBuf>,
        /// The flatlet binary (default: the one next to flatlet-bench).
        #[arg(long)]
        flatlet: Option<PathBuf>,
        /// Also the Linux guest (with --rootfs, from tools/build-linux-guest):
        /// booted once, snapshotted at its shell, then spawn to the restored
        /// shell answering a line, against runc starting /bin/true.
        #[arg(long, requires = "rootfs")]
        kernel: Option<PathBuf>,
        /// The Linux guest's root file system image (copied).
        #[arg(long, requires = "kernel")]
        rootfs: Option<PathBuf>,
        /// The OCI bundle tools/setup-bench made, for runc.
        #[arg(long, default_value = "/var/tmp/flatlet-bench/bundle")]
        bundle: PathBuf,
    },
    /// Measures one launch (used by the benchmarks themselves, so that each
    /// launch's resource usage is its own). Prints JSON.
    #[command(hide = true)]
    Probe {
        /// first-byte, exit, or line:TEXT.
        #[arg(long, default_value = "exit")]
        ready: String,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = probe::DEFAULT_LIMIT_MS)]
        timeout_ms: u64,
        /// The command.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
}

/// A thing to launch and measure.
#[derive(Clone, Debug)]
struct Contender {
    name: String,
    argv: Vec<String>,
    ready: String,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Probe {
            ready,
            timeout_ms,
            argv,
        } => {
            let ready = match Ready::parse(&ready) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("flatlet-bench: {e}");
                    return ExitCode::from(2);
                }
            };
            let m = probe::measure(&argv, &ready, Duration::from_millis(timeout_ms));
            println!("{}", serde_json::to_string(&m).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Cmd::Compare {
            quick,
            runs,
            warmup,
            sweep,
            sweep_rounds,
            out,
            bundle,
            kernel,
            rootfs,
            flatlet,
            firecracker,
            only,
            containerd_image,
            containerd_address,
        } => {
            let plan = compare::Plan {
                runs: runs.unwrap_or(if quick { 5 } else { 20 }),
                warmup: warmup.unwrap_or(if quick { 1 } else { 2 }),
                sweep: sweep.unwrap_or_else(|| {
                    if quick {
                        vec![1, 2, 4]
                    } else {
                        vec![1, 2, 4, 8, 16]
                    }
                }),
                sweep_rounds: sweep_rounds.unwrap_or(if quick { 1 } else { 3 }),
                // A first flatlet container builds the shim's template
                // (a Linux boot, minutes on nested hosts).
                timeout: Duration::from_secs(if containerd_image.is_some() { 900 } else { 120 }),
            };
            let opts = CompareOptions {
                bundle,
                linux: kernel.zip(rootfs),
                flatlet,
                firecracker,
                only,
                containerd: containerd_image.map(|image| (containerd_address, image)),
            };
            match run_compare(&plan, &out, opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("flatlet-bench: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Api {
            launches,
            requests,
            flatlet,
        } => match flatlet
            .map_or_else(|| sibling("flatlet"), Ok)
            .and_then(|f| api::run(&f, launches, requests))
        {
            Ok(figures) => {
                api::print(&figures);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("flatlet-bench: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Vsock {
            mib,
            rounds,
            trips,
            flatlet,
        } => match flatlet
            .map_or_else(|| sibling("flatlet"), Ok)
            .and_then(|f| vsock::run(&f, mib, rounds, trips))
        {
            Ok(figures) => {
                vsock::print(&figures);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("flatlet-bench: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Snapshot {
            runs,
            clones,
            phase_ms,
            firecracker,
            flatlet,
            kernel,
            rootfs,
            bundle,
        } => match flatlet
            .map_or_else(|| sibling("flatlet"), Ok)
            .and_then(|flatlet| {
                snapshot::run(&snapshot::Plan {
                    flatlet,
                    firecracker,
                    runs,
                    clones,
                    phase_ms,
                    linux: kernel.zip(rootfs).map(|(kernel, rootfs)| snapshot::Linux {
                        kernel,
                        rootfs,
                        bundle,
                    }),
                })
            }) {
            Ok(figures) => {
                print!("{}", snapshot::table(&figures));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("flatlet-bench: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Devices {
            blk_mib,
            frames,
            dir,
            rounds,
        } => {
            device_table(blk_mib, frames, &dir, rounds);
            ExitCode::SUCCESS
        }
        Cmd::Boot {
            runs,
            warmup,
            vcpus,
            irqchip,
            devices,
            tap,
            flatlet,
            firecracker,
        } => match boot(
            BootPlan {
                runs,
                warmup,
                vcpus,
                irqchip,
                devices,
                tap,
            },
            flatlet,
            firecracker,
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("flatlet-bench: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn sibling(name: &str) -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
    let p = me.with_file_name(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(format!("{} not found (build it, or pass its path)", p.display()))
    }
}

/// Runs `runs` measured launches of each contender, interleaved (A B C A B
/// C ...) so that a drifting machine favours none, after `warmup` rounds.
fn run_interleaved(
    contenders: &[Contender],
    runs: usize,
    warmup: usize,
) -> Result<Vec<Vec<Measurement>>, String> {
    let mut samples = vec![Vec::with_capacity(runs); contenders.len()];
    for round in 0..warmup + runs {
        for (i, c) in contenders.iter().enumerate() {
            let m =
                probe::in_fresh_process(&c.argv, &c.ready, Duration::from_millis(probe::DEFAULT_LIMIT_MS))?;
            if let Some(e) = &m.error {
                return Err(format!("{} failed: {e}", c.name));
            }
            if round >= warmup {
                samples[i].push(m);
            }
        }
    }
    Ok(samples)
}

fn fmt_ms(us: Option<Summary>) -> String {
    us.map(|s| format!("{:>7.2} ({:>6.2})", s.median / 1000.0, s.p95 / 1000.0))
        .unwrap_or_else(|| format!("{:>16}", "-"))
}

fn fmt_kib(kib: Option<Summary>) -> String {
    kib.map(|s| format!("{:>7.2}", s.median / 1024.0))
        .unwrap_or_else(|| format!("{:>7}", "-"))
}

/// What `flatlet-bench boot` launches.
struct BootPlan {
    runs: usize,
    warmup: usize,
    vcpus: u32,
    irqchip: Vec<String>,
    devices: Vec<String>,
    tap: Option<String>,
}

/// The floor: a plain process, measured by the same probe.
const FLOOR: &str = "process (/bin/true)";

fn boot(plan: BootPlan, flatlet: Option<PathBuf>, firecracker: Option<PathBuf>) -> Result<(), String> {
    let BootPlan {
        runs,
        warmup,
        vcpus,
        ref irqchip,
        ref devices,
        ref tap,
    } = plan;
    let tap = tap.as_deref();
    let flatlet = match flatlet {
        Some(p) => p,
        None => sibling("flatlet")?,
    };
    let fc = firecracker
        .map(|p| versus::Firecracker::prepare(&p, &flatlet, vcpus))
        .transpose()?;
    let image = std::env::temp_dir().join(format!("flatlet-bench-{}.img", std::process::id()));
    std::fs::write(&image, vec![0u8; 64 * 1024]).map_err(|e| e.to_string())?;
    let mut contenders = Vec::new();
    for mode in irqchip {
        for set in devices {
            let mut argv = vec![
                flatlet.display().to_string(),
                "run".into(),
                "--vcpus".into(),
                vcpus.to_string(),
                "--irqchip".into(),
                mode.clone(),
            ];
            match set.as_str() {
                "none" => {}
                "blk" => argv.extend(["--drive".to_string(), image.display().to_string()]),
                "blk+net" => {
                    let tap = tap.ok_or("blk+net needs --tap")?;
                    argv.extend([
                        "--drive".to_string(),
                        image.display().to_string(),
                        "--net".into(),
                        tap.into(),
                    ]);
                }
                other => return Err(format!("unknown device set {other:?} (none, blk, blk+net)")),
            }
            contenders.push(Contender {
                name: format!("{mode}, {set}"),
                argv,
                ready: "line:Guest-boot-time".into(),
            });
        }
    }
    if let Some(fc) = &fc {
        contenders.push(Contender {
            name: "firecracker".into(),
            argv: fc.launch_argv(),
            ready: "line:Guest-boot-time".into(),
        });
        contenders.push(Contender {
            name: FLOOR.into(),
            argv: vec!["/bin/true".into()],
            ready: "exit".into(),
        });
    }
    eprintln!(
        "flatlet-bench: {runs} launches of the test guest ({vcpus} vCPU) per variant, after {warmup} warm-up rounds"
    );
    let samples = run_interleaved(&contenders, runs, warmup);
    let _ = std::fs::remove_file(&image);
    let samples = samples?;
    println!(
        "{:<26} {:>16} {:>16} {:>16} {:>7} {:>7} {:>16}",
        "median (p95), ms / MiB",
        "start->1st byte",
        "Guest-boot-time",
        "start->exit",
        "RSS",
        "RSS-mem",
        "CPU"
    );
    for (c, ms) in contenders.iter().zip(&samples) {
        let pick = |f: &dyn Fn(&Measurement) -> Option<f64>| {
            Summary::of(&ms.iter().filter_map(f).collect::<Vec<_>>())
        };
        let rss = pick(&|m| Some(m.max_rss_kib as f64));
        let net = pick(&|m| {
            m.guest_touched_kib
                .map(|t| m.max_rss_kib.saturating_sub(t) as f64)
        });
        println!(
            "{:<26} {} {} {} {} {} {}",
            c.name,
            fmt_ms(pick(&|m| m.first_byte_us)),
            fmt_ms(pick(&|m| m.guest_boot_us)),
            fmt_ms(pick(&|m| Some(m.exit_us))),
            fmt_kib(rss),
            fmt_kib(net),
            fmt_ms(pick(&|m| Some(m.cpu_us))),
        );
    }
    if let Some(fc) = &fc {
        // The first variant (the default: split irqchip, no devices)
        // against Firecracker.
        let fc_at = contenders.len() - 2;
        versus_boot(
            fc,
            &contenders[0],
            &samples[0],
            &samples[fc_at],
            &samples[fc_at + 1],
            runs,
        )?;
    }
    Ok(())
}

/// `boot --firecracker`: spawn to first `GET /` and 16 launches at once,
/// interleaved, then the ratio table.
fn versus_boot(
    fc: &versus::Firecracker,
    flatlet: &Contender,
    flatlet_launches: &[Measurement],
    fc_launches: &[Measurement],
    floor: &[Measurement],
    runs: usize,
) -> Result<(), String> {
    let (mut ours, mut theirs) = (versus::Side::default(), versus::Side::default());
    ours.add_launches(flatlet_launches);
    theirs.add_launches(fc_launches);
    let flatlet_bin = PathBuf::from(&flatlet.argv[0]);
    eprintln!("flatlet-bench: spawn to first GET / of flatlet and Firecracker, {runs} each, interleaved");
    let api = api::first_answers_interleaved(2, runs, &|i, sock| match i {
        0 => api::api_argv(&flatlet_bin, sock, &[]),
        _ => fc.api_argv(sock),
    })?;
    ours.api_us = api[0].clone();
    theirs.api_us = api[1].clone();
    let pair = [
        compare::Contender::plain("flatlet", flatlet.argv.clone(), "exit"),
        compare::Contender::plain("firecracker", fc.launch_argv(), "exit"),
    ];
    let plan = compare::Plan {
        runs: 0,
        warmup: 0,
        sweep: vec![16],
        sweep_rounds: 3,
        timeout: Duration::from_secs(120),
    };
    eprintln!("flatlet-bench: 16 launches at once of each, 3 rounds, interleaved");
    let (points, errors) = compare::sweep(&pair, &plan);
    for e in &errors {
        eprintln!("flatlet-bench: sweep: {e}");
    }
    for p in points {
        match p.contender.as_str() {
            "flatlet" => ours.lps16 = p.launches_per_sec,
            _ => theirs.lps16 = p.launches_per_sec,
        }
    }
    let floor_rss = Summary::of(&floor.iter().map(|m| m.max_rss_kib as f64).collect::<Vec<_>>());
    print!("{}", versus::table(&ours, &theirs, floor_rss.map(|s| s.median)));
    Ok(())
}

/// `compare --firecracker`: the ratio table from the launches, the sweep's
/// 16-at-once point and the API phase.
fn versus_compare(samples: &[compare::Sample], sweep: &[compare::SweepPoint], api: Vec<Vec<f64>>) -> String {
    let side = |name: &str, api_us: Vec<f64>| {
        let mut side = versus::Side::default();
        side.add_launches(samples.iter().filter(|s| s.contender == name).map(|s| &s.m));
        side.api_us = api_us;
        side.lps16 = sweep
            .iter()
            .find(|p| p.contender == name && p.concurrency == 16)
            .map(|p| p.launches_per_sec.clone())
            .unwrap_or_default();
        side
    };
    let mut api = api.into_iter();
    let ours = side("flatlet", api.next().unwrap_or_default());
    let theirs = side("firecracker", api.next().unwrap_or_default());
    let floor: Vec<f64> = samples
        .iter()
        .filter(|s| s.contender == "process" && s.m.error.is_none())
        .map(|s| s.m.max_rss_kib as f64)
        .collect();
    versus::table(&ours, &theirs, Summary::of(&floor).map(|s| s.median))
}

fn device_table(blk_mib: u64, frames: usize, dir: &str, rounds: usize) {
    let mut rows: Vec<(String, &'static str, Vec<f64>, Vec<f64>)> = Vec::new();
    let mut add = |r: Result<Vec<devices::Throughput>, String>, what: &str| match r {
        Ok(list) => {
            for t in list {
                match rows.iter_mut().find(|row| row.0 == t.what) {
                    Some(row) => {
                        row.2.push(t.device);
                        row.3.push(t.baseline);
                    }
                    None => rows.push((t.what, t.unit, vec![t.device], vec![t.baseline])),
                }
            }
        }
        Err(e) => eprintln!("flatlet-bench: {what} skipped: {e}"),
    };
    for _ in 0..rounds.max(1) {
        add(devices::block(blk_mib << 20, dir), "virtio-blk");
        add(devices::net(frames), "virtio-net");
    }
    println!(
        "{:<38} {:>14} {:>14} {:>9}",
        format!("median of {} rounds", rounds.max(1)),
        "device",
        "plain syscall",
        "ratio"
    );
    for (what, unit, dev, base) in rows {
        let (d, b) = (
            Summary::of(&dev).map_or(0.0, |s| s.median),
            Summary::of(&base).map_or(0.0, |s| s.median),
        );
        println!(
            "{what:<38} {:>14} {:>14} {:>9.2}",
            format!("{d:.0} {unit}"),
            format!("{b:.0} {unit}"),
            d / b
        );
    }
}

/// What `flatlet-bench compare` runs, besides its plan.
struct CompareOptions {
    bundle: PathBuf,
    linux: Option<(PathBuf, PathBuf)>,
    flatlet: Option<PathBuf>,
    firecracker: Option<PathBuf>,
    only: Option<Vec<String>>,
    containerd: Option<(String, String)>,
}

fn run_compare(plan: &compare::Plan, out: &std::path::Path, opts: CompareOptions) -> Result<(), String> {
    let flatlet = match opts.flatlet {
        Some(p) => p,
        None => sibling("flatlet")?,
    };
    let fc = opts
        .firecracker
        .map(|p| versus::Firecracker::prepare(&p, &flatlet, 1))
        .transpose()?;
    let jailer = flatlet.with_file_name("flatlet-jailer");
    let jail_dir = std::env::temp_dir().join(format!("flatlet-bench-jails-{}", std::process::id()));
    let setup = compare::Setup {
        flatlet: flatlet.clone(),
        jailer,
        bundle: opts.bundle,
        jail_dir: jail_dir.clone(),
        linux: opts.linux,
        firecracker: fc.as_ref().map(versus::Firecracker::launch_argv),
        containerd: opts.containerd,
    };
    let mut contenders = compare::contenders(&setup);
    if let Some(only) = &opts.only {
        if let Some(name) = only.iter().find(|n| !contenders.iter().any(|c| &c.name == *n)) {
            return Err(format!("--only: no contender {name:?}"));
        }
        contenders.retain(|c| only.contains(&c.name));
    }
    let machine = report::Machine::probe();
    eprint!("{}", machine.describe());
    eprintln!(
        "flatlet-bench: {} launches of each contender after {} warm-up rounds, interleaved; then {:?} at once, {} rounds",
        plan.runs, plan.warmup, plan.sweep, plan.sweep_rounds
    );
    let samples = compare::measure(&contenders, plan);
    let (sweep, errors) = compare::sweep(&contenders, plan);
    let _ = std::fs::remove_dir_all(&jail_dir);
    for e in &errors {
        eprintln!("flatlet-bench: sweep: {e}");
    }
    let api = match &fc {
        Some(fc) => {
            eprintln!(
                "flatlet-bench: spawn to first GET / of flatlet and Firecracker, {} each, interleaved",
                plan.runs
            );
            Some(api::first_answers_interleaved(
                2,
                plan.runs,
                &|i, sock| match i {
                    0 => api::api_argv(&flatlet, sock, &[]),
                    _ => fc.api_argv(sock),
                },
            )?)
        }
        None => None,
    };
    let rows = report::rows(&contenders, &samples, &sweep);
    print!("{}", machine.describe());
    print!("{}", report::table(&rows, &contenders));
    if let Some(api) = api {
        print!("{}", versus_compare(&samples, &sweep, api));
    }
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let json = serde_json::to_string_pretty(&report::Report {
        machine: &machine,
        contenders: &contenders,
        summary: &rows,
        samples: &samples,
        sweep: &sweep,
    })
    .map_err(|e| e.to_string())?;
    let write = |name: &str, text: &str| {
        std::fs::write(out.join(name), text).map_err(|e| format!("{}: {e}", out.join(name).display()))
    };
    write("results.json", &json)?;
    write("samples.csv", &report::csv(&samples))?;
    report::svg(&out.join("chart.svg"), &rows, &samples, &machine)?;
    println!("wrote {}/results.json, samples.csv and chart.svg", out.display());
    Ok(())
}
