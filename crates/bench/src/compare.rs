//! microVM launch against container start, side by side on this machine.
//!
//! Contenders run interleaved (A B C A B C ...) so that a machine whose
//! load drifts favours none; each launch is measured in a fresh probe
//! process (its own peak RSS and CPU time). Then a concurrency sweep
//! launches 1, 2, 4, ... of each at once and counts launches per second.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::probe::{self, Measurement};

/// Unique numbers for container and jail ids.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A thing to launch.
#[derive(Clone, Debug, Serialize)]
pub struct Contender {
    /// Its name in tables and charts.
    pub name: String,
    /// What it is.
    pub what: String,
    /// The command; `{n}` is replaced by a number unique to the launch.
    pub argv: Vec<String>,
    /// The probe's ready marker (`exit`, `line:TEXT`).
    pub ready: String,
    /// Run after each launch, outside the timing (`{n}` as in `argv`).
    pub cleanup: Option<Vec<String>>,
    /// Why it cannot run here, if it cannot.
    pub missing: Option<String>,
}

impl Contender {
    /// A contender that is installed and needs no clean-up.
    pub fn plain(name: &str, argv: Vec<String>, ready: &str) -> Self {
        Self {
            name: name.into(),
            what: String::new(),
            argv,
            ready: ready.into(),
            cleanup: None,
            missing: None,
        }
    }

    fn argv_for(&self, n: u64) -> Vec<String> {
        subst(&self.argv, n)
    }

    fn clean(&self, n: u64) {
        if let Some(c) = &self.cleanup {
            let c = subst(c, n);
            let _ = Command::new(&c[0])
                .args(&c[1..])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn subst(argv: &[String], n: u64) -> Vec<String> {
    argv.iter().map(|a| a.replace("{n}", &n.to_string())).collect()
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// What the contenders need from the machine.
pub struct Setup {
    /// The flatlet binary.
    pub flatlet: PathBuf,
    /// The jailer binary.
    pub jailer: PathBuf,
    /// The OCI bundle (`tools/setup-bench` makes it).
    pub bundle: PathBuf,
    /// Where jails go.
    pub jail_dir: PathBuf,
    /// A Linux kernel and root file system, for the real-host contender.
    pub linux: Option<(PathBuf, PathBuf)>,
    /// Firecracker's command line booting flatlet's test guest, if given.
    pub firecracker: Option<Vec<String>>,
    /// containerd's socket and an image imported there, for `ctr run`.
    pub containerd: Option<(String, String)>,
}

/// Every contender, those that cannot run here marked missing.
pub fn contenders(setup: &Setup) -> Vec<Contender> {
    let fl = setup.flatlet.display().to_string();
    let rootfs = setup.bundle.join("rootfs");
    let rootfs_s = rootfs.display().to_string();
    let bundle_s = setup.bundle.display().to_string();
    let no_bundle = (!rootfs.join("bin/true").exists()).then(|| {
        format!(
            "no busybox bundle at {} (run tools/setup-bench)",
            setup.bundle.display()
        )
    });
    let missing_tool = |tool: &str, package: &str| {
        which(tool)
            .is_none()
            .then(|| format!("{tool} is not installed (apt install {package}, or tools/setup-bench)"))
            .or_else(|| no_bundle.clone())
    };
    let mut list = vec![
        Contender {
            name: "process".into(),
            what: "/bin/true, a plain process: the floor".into(),
            argv: s(&["/bin/true"]),
            ready: "exit".into(),
            cleanup: None,
            missing: None,
        },
        Contender {
            name: "unshare+chroot".into(),
            what: "/bin/true in new mount/UTS/IPC/PID namespaces and a chroot".into(),
            argv: s(&[
                "unshare",
                "--mount",
                "--uts",
                "--ipc",
                "--pid",
                "--fork",
                "chroot",
                &rootfs_s,
                "/bin/true",
            ]),
            ready: "exit".into(),
            cleanup: None,
            missing: which("unshare")
                .is_none()
                .then(|| "unshare is not installed".into())
                .or(no_bundle.clone()),
        },
        Contender {
            name: "bwrap".into(),
            what: "bubblewrap: /bin/true in a sandbox of all namespaces".into(),
            argv: s(&[
                "bwrap",
                "--ro-bind",
                &rootfs_s,
                "/",
                "--dev",
                "/dev",
                "--proc",
                "/proc",
                "--unshare-all",
                "/bin/true",
            ]),
            ready: "exit".into(),
            cleanup: None,
            missing: missing_tool("bwrap", "bubblewrap"),
        },
        Contender {
            name: "crun".into(),
            what: "crun run of the busybox bundle (in a private mount namespace without the cgroup v2 mount)"
                .into(),
            argv: vec![
                "unshare".into(),
                "--mount".into(),
                "sh".into(),
                "-c".into(),
                format!(
                    "umount /sys/fs/cgroup/unified 2>/dev/null; exec crun run --bundle {bundle_s} fl-crun-{{n}}"
                ),
            ],
            ready: "exit".into(),
            cleanup: None,
            missing: missing_tool("crun", "crun"),
        },
        Contender {
            name: "runc".into(),
            what: "runc run of the busybox bundle".into(),
            argv: vec![
                "runc".into(),
                "run".into(),
                "--bundle".into(),
                bundle_s.clone(),
                "fl-runc-{n}".into(),
            ],
            ready: "exit".into(),
            cleanup: None,
            missing: missing_tool("runc", "runc"),
        },
        Contender {
            name: "flatlet".into(),
            what: "flatlet booting its test guest (ready: the guest's boot-timer write)".into(),
            argv: s(&[&fl, "run", "--log-level", "info"]),
            ready: "line:Guest-boot-time".into(),
            cleanup: None,
            missing: (!setup.flatlet.exists()).then(|| format!("{fl} not found")),
        },
    ];
    if let Some(argv) = &setup.firecracker {
        list.push(Contender {
            name: "firecracker".into(),
            what: "Firecracker (--no-seccomp --boot-timer) booting the same test guest \
                   (ready: the guest's boot-timer write)"
                .into(),
            argv: argv.clone(),
            ready: "line:Guest-boot-time".into(),
            cleanup: None,
            missing: None,
        });
    }
    let jail_dir = setup.jail_dir.display().to_string();
    let jailer = setup.jailer.display().to_string();
    let not_root = (!nix::unistd::geteuid().is_root()).then(|| "the jailer needs root".to_string());
    list.push(Contender {
        name: "flatlet+jailer".into(),
        what: "the same, under flatlet-jailer (chroot, namespaces, UID 65534)".into(),
        argv: s(&[
            &jailer,
            "--id",
            "bench-{n}",
            "--exec-file",
            &fl,
            "--uid",
            "65534",
            "--gid",
            "65534",
            "--chroot-base-dir",
            &jail_dir,
            "--",
            "run",
        ]),
        ready: "line:Guest-boot-time".into(),
        cleanup: Some(s(&[
            &jailer,
            "clean",
            "--id",
            "bench-{n}",
            "--chroot-base-dir",
            &jail_dir,
        ])),
        missing: (!setup.jailer.exists())
            .then(|| format!("{jailer} not found"))
            .or(not_root),
    });
    if let Some((address, image)) = &setup.containerd {
        for (name, runtime) in [
            ("ctr+runc", "io.containerd.runc.v2"),
            ("ctr+flatlet", "io.containerd.flatlet.v2"),
        ] {
            list.push(Contender {
                name: name.into(),
                what: format!("ctr run --rm --runtime {runtime} {image} /bin/true (containerd at {address})"),
                argv: vec![
                    "ctr".into(),
                    "--address".into(),
                    address.clone(),
                    "run".into(),
                    "--rm".into(),
                    "--null-io".into(),
                    "--runtime".into(),
                    runtime.into(),
                    image.clone(),
                    format!("fl-{name}-{{n}}").replace('+', "-"),
                    "/bin/true".into(),
                ],
                ready: "exit".into(),
                cleanup: None,
                missing: missing_tool("ctr", "containerd"),
            });
        }
    }
    if let Some((kernel, rootfs)) = &setup.linux {
        list.push(Contender {
            name: "flatlet+linux".into(),
            what: format!(
                "flatlet booting {} on {} (ready: its init's boot-timer write)",
                kernel.display(),
                rootfs.display()
            ),
            argv: vec![
                fl.clone(),
                "run".into(),
                "--kernel".into(),
                kernel.display().to_string(),
                "--drive".into(),
                format!("{},root,ro", rootfs.display()),
                "--mem-mib".into(),
                "256".into(),
                // The init of tools/build-linux-guest runs what follows
                // `--` and resets; without a command it would start a shell
                // on the console and never exit. Other inits get `true` as
                // an argument, which they ignore.
                "--cmdline".into(),
                "console=ttyS0 reboot=k panic=1 -- true".into(),
            ],
            ready: "line:Guest-boot-time".into(),
            cleanup: None,
            missing: None,
        });
    }
    list
}

/// One measured launch.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Contender.
    pub contender: String,
    /// Round.
    pub run: usize,
    /// What the probe measured.
    #[serde(flatten)]
    pub m: Measurement,
}

/// Launches per second at one concurrency.
#[derive(Clone, Debug, Serialize)]
pub struct SweepPoint {
    /// Contender.
    pub contender: String,
    /// Launched at once.
    pub concurrency: usize,
    /// Launches per second, per round.
    pub launches_per_sec: Vec<f64>,
}

/// How much to measure.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Measured launches per contender.
    pub runs: usize,
    /// Unmeasured rounds first.
    pub warmup: usize,
    /// Concurrency levels of the sweep.
    pub sweep: Vec<usize>,
    /// Rounds per sweep level.
    pub sweep_rounds: usize,
    /// Give up on a launch after this long.
    pub timeout: Duration,
}

fn probe(c: &Contender, n: u64, timeout: Duration) -> Result<Measurement, String> {
    let m = probe::in_fresh_process(&c.argv_for(n), &c.ready, timeout);
    c.clean(n);
    m
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{msg:>24} [{bar:40}] {pos}/{len} {elapsed}") {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

/// Measures every available contender, interleaved.
pub fn measure(contenders: &[Contender], plan: &Plan) -> Vec<Sample> {
    let ready: Vec<&Contender> = contenders.iter().filter(|c| c.missing.is_none()).collect();
    let pb = bar(((plan.warmup + plan.runs) * ready.len()) as u64, "launches");
    let mut samples = Vec::new();
    for round in 0..plan.warmup + plan.runs {
        for c in &ready {
            let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            let m = probe(c, n, plan.timeout).unwrap_or_else(|e| Measurement {
                error: Some(e),
                ..Default::default()
            });
            if round >= plan.warmup {
                samples.push(Sample {
                    contender: c.name.clone(),
                    run: round - plan.warmup,
                    m,
                });
            }
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    samples
}

/// Launches `k` of a contender at once; returns launches per second.
fn burst(c: &Contender, k: usize, timeout: Duration) -> Result<f64, String> {
    let ids: Vec<u64> = (0..k).map(|_| NEXT_ID.fetch_add(1, Ordering::Relaxed)).collect();
    let start = Instant::now();
    let mut children = Vec::with_capacity(k);
    for &n in &ids {
        let argv = c.argv_for(n);
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", c.name))?;
        children.push(child);
    }
    let mut failed = 0;
    for mut child in children {
        let deadline = start + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(st)) => {
                    failed += usize::from(!st.success());
                    break;
                }
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    failed += 1;
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_micros(200)),
                Err(_) => {
                    failed += 1;
                    break;
                }
            }
        }
    }
    let elapsed = start.elapsed();
    for n in ids {
        c.clean(n);
    }
    if failed > 0 {
        return Err(format!("{}: {failed} of {k} launches failed", c.name));
    }
    Ok(k as f64 / elapsed.as_secs_f64())
}

/// The concurrency sweep, interleaved by contender within each level.
pub fn sweep(contenders: &[Contender], plan: &Plan) -> (Vec<SweepPoint>, Vec<String>) {
    let ready: Vec<&Contender> = contenders.iter().filter(|c| c.missing.is_none()).collect();
    let total: usize = plan.sweep.iter().sum::<usize>() * plan.sweep_rounds * ready.len();
    let pb = bar(total as u64, "concurrency sweep");
    let mut points: Vec<SweepPoint> = Vec::new();
    let mut errors = Vec::new();
    for &k in &plan.sweep {
        for _ in 0..plan.sweep_rounds {
            for c in &ready {
                match burst(c, k, plan.timeout) {
                    Ok(rate) => match points
                        .iter_mut()
                        .find(|p| p.contender == c.name && p.concurrency == k)
                    {
                        Some(p) => p.launches_per_sec.push(rate),
                        None => points.push(SweepPoint {
                            contender: c.name.clone(),
                            concurrency: k,
                            launches_per_sec: vec![rate],
                        }),
                    },
                    Err(e) => errors.push(e),
                }
                pb.inc(k as u64);
            }
        }
    }
    pb.finish_and_clear();
    (points, errors)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn setup(containerd: Option<(String, String)>) -> Setup {
        Setup {
            flatlet: PathBuf::from("/nonexistent/flatlet"),
            jailer: PathBuf::from("/nonexistent/flatlet-jailer"),
            bundle: PathBuf::from("/nonexistent/bundle"),
            jail_dir: PathBuf::from("/nonexistent/jails"),
            linux: None,
            firecracker: None,
            containerd,
        }
    }

    #[test]
    fn containerd_contenders_run_the_image_with_each_runtime() {
        assert!(!contenders(&setup(None)).iter().any(|c| c.name.starts_with("ctr")));
        let list = contenders(&setup(Some(("/run/c.sock".into(), "img:1".into()))));
        for (name, runtime) in [
            ("ctr+runc", "io.containerd.runc.v2"),
            ("ctr+flatlet", "io.containerd.flatlet.v2"),
        ] {
            let c = list.iter().find(|c| c.name == name).unwrap();
            let argv = c.argv_for(7);
            let at = argv.iter().position(|a| a == "--runtime").unwrap();
            assert_eq!(argv[at + 1], runtime);
            assert_eq!(
                &argv[at + 2..],
                ["img:1", &format!("fl-{}-7", name.replace('+', "-")), "/bin/true"]
            );
            assert_eq!(argv[..3], ["ctr", "--address", "/run/c.sock"]);
            assert_eq!(c.ready, "exit");
        }
    }
}
