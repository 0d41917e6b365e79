//! `flatlet-bench snapshot` (issue 14): Full snapshots of the built-in
//! test guest (1 vCPU, 128 MiB, `flatlet.stay`), and restores from them,
//! with flatlet and, when a binary is given, Firecracker side by side in
//! one run, interleaved (flatlet, Firecracker, flatlet, ...).
//!
//! Each run, for each VMM: boot the guest through the API (the same ELF
//! for both, written by `flatlet guest-image`), wait for its heartbeat 1,
//! pause it `phase` ms after that line (so that both snapshots catch the
//! guest's one-second timer at the same point), and time `PUT
//! /snapshot/create` (Full); then the files' sizes (the memory file's
//! allocated blocks, as it may be sparse). Then one restore in a new
//! process: the `PUT /snapshot/load` request (`resume_vm`), and process
//! spawn to the first byte of the restored guest's next heartbeat line.
//! Then `clones` restores at once from the same files: from the first
//! spawn until every clone has printed a heartbeat.
//!
//! Firecracker runs as `versus` runs it, with `--no-seccomp` (the
//! reference build has no default filter for this target); flatlet with
//! its filters, as shipped.

use std::fmt::Write as _;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flatlet_api::client::Client;

use crate::stats::Summary;
use crate::versus::Firecracker;

/// The guest's command line: stay up, a heartbeat line every second.
const BOOT_ARGS: &str = "console=ttyS0 flatlet.stay";
/// The first bytes of a heartbeat line.
const HEARTBEAT: &str = "flatlet-guest: heartbeat ";
/// How long a guest may take to print what is waited for.
const WAIT: Duration = Duration::from_secs(60);

/// What to run.
pub struct Plan {
    /// The flatlet binary.
    pub flatlet: PathBuf,
    /// A Firecracker binary, to run side by side.
    pub firecracker: Option<PathBuf>,
    /// Measured runs per VMM.
    pub runs: usize,
    /// Restores at once from one snapshot.
    pub clones: usize,
    /// Pause this long after the heartbeat line, ms.
    pub phase_ms: u64,
    /// The Linux guest part, when asked for.
    pub linux: Option<Linux>,
}

/// The Linux guest part: a kernel and root file system (from
/// `tools/build-linux-guest`), and the OCI bundle runc starts
/// (`tools/setup-bench`).
pub struct Linux {
    /// The guest kernel (vmlinux).
    pub kernel: PathBuf,
    /// Its root file system (copied; the copy is written to).
    pub rootfs: PathBuf,
    /// The busybox bundle runc runs `/bin/true` in.
    pub bundle: PathBuf,
}

/// What the Linux part measured.
#[derive(Clone, Debug, Default)]
pub struct LinuxFigures {
    /// Process start to the booted guest's shell waiting for a line, µs
    /// (the one boot).
    pub boot_us: f64,
    /// `flatlet run --snapshot` spawned, a line written to its console, to
    /// the restored guest's shell answering it, µs.
    pub answer_us: Vec<f64>,
    /// The same start to the guest kernel's echo of the line (its tty's
    /// first byte), µs.
    pub echo_us: Vec<f64>,
    /// `runc run` of `/bin/true` in the busybox bundle, start to exit, µs.
    pub runc_us: Vec<f64>,
}

/// The Linux guest's command: a shell that says it is ready, reads a
/// line and answers it with its builtin echo.
const LINUX_COMMAND: &str = "echo ready-$((6*7))&&read l&&echo answer-$l";
/// How long the Linux guest may take to boot (guest ring 0 is emulated on
/// the nested hosts).
const LINUX_BOOT: Duration = Duration::from_secs(900);

/// Boots the Linux guest once, snapshots it at its shell's `read`, then
/// `runs` times: a restore answering a line, and runc starting
/// `/bin/true`, interleaved.
fn linux_runs(flatlet: &Path, linux: &Linux, runs: usize, dir: &Path) -> Result<LinuxFigures, String> {
    let image = dir.join("linux-rootfs.ext4");
    std::fs::copy(&linux.rootfs, &image).map_err(|e| format!("{}: {e}", linux.rootfs.display()))?;
    let config = dir.join("linux.json");
    let vm = serde_json::json!({
        "boot-source": {
            "kernel_image_path": linux.kernel.display().to_string(),
            "boot_args": format!("console=ttyS0 reboot=k panic=1 -- {LINUX_COMMAND}"),
        },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": 128 },
        "drives": [{
            "drive_id": "rootfs",
            "path_on_host": image.display().to_string(),
            "is_root_device": true,
            "is_read_only": false,
        }],
    });
    std::fs::write(&config, vm.to_string()).map_err(|e| format!("{}: {e}", config.display()))?;
    let (state, mem) = (dir.join("linux.state"), dir.join("linux.mem"));
    let mut figures = LinuxFigures::default();
    {
        let config = config.display().to_string();
        let sock = dir.join("linux.sock");
        let argv = crate::api::api_argv(flatlet, &sock, &["--config-file", &config]);
        eprintln!("flatlet-bench: booting the Linux guest (minutes on a nested host)");
        let mut src = Running::serve("flatlet (Linux)", &argv, &sock)?;
        let ready = src.wait_within("ready-42", LINUX_BOOT)?;
        figures.boot_us = ready.duration_since(src.spawned).as_secs_f64() * 1e6;
        // The shell prints its line, then reads: give it a moment to block.
        std::thread::sleep(Duration::from_millis(500));
        // The API closes a connection idle that long: a new one.
        src.client = Some(Client::connect(&sock).map_err(|e| format!("{}: {e}", src.name))?);
        src.call("PATCH", "/vm", r#"{"state": "Paused"}"#)?;
        let create = serde_json::json!({
            "snapshot_type": "Full",
            "snapshot_path": state.display().to_string(),
            "mem_file_path": mem.display().to_string(),
        });
        src.call("PUT", "/snapshot/create", &create.to_string())?;
    }
    let restore = [
        flatlet.display().to_string(),
        "run".into(),
        "--snapshot".into(),
        state.display().to_string(),
        "--mem".into(),
        mem.display().to_string(),
        "--log-level".into(),
        "error".into(),
    ];
    let bundle = linux.bundle.display().to_string();
    for run in 0..runs.max(1) {
        eprintln!("flatlet-bench: Linux run {} of {}", run + 1, runs.max(1));
        {
            let mut guest = Running::start("flatlet (Linux restore)", &restore, Stdio::piped())?;
            let line = format!("ping{run}");
            if let Some(mut stdin) = guest.child.stdin.take() {
                use std::io::Write;
                stdin
                    .write_all(format!("{line}\n").as_bytes())
                    .map_err(|e| format!("writing to the restored guest's console: {e}"))?;
            }
            // The tty echoes the line first, then the shell answers.
            let echoed = guest.wait_within(&line, WAIT)?;
            figures
                .echo_us
                .push(echoed.duration_since(guest.spawned).as_secs_f64() * 1e6);
            let answered = guest.wait_within(&format!("answer-{line}"), WAIT)?;
            figures
                .answer_us
                .push(answered.duration_since(guest.spawned).as_secs_f64() * 1e6);
        }
        let argv = [
            "runc".to_string(),
            "run".into(),
            "--bundle".into(),
            bundle.clone(),
            format!("fl-snap-runc-{}-{run}", std::process::id()),
        ];
        let m = crate::probe::in_fresh_process(&argv, "exit", WAIT)?;
        if let Some(e) = m.error {
            return Err(format!("runc: {e}"));
        }
        figures.runc_us.push(m.exit_us);
    }
    Ok(figures)
}

/// A VMM under test: flatlet, or Firecracker as `versus` runs it.
#[derive(Clone, Copy)]
enum Vmm<'a> {
    Flatlet(&'a Path),
    Firecracker(&'a Firecracker),
}

impl Vmm<'_> {
    fn name(&self) -> &'static str {
        match self {
            Vmm::Flatlet(_) => "flatlet",
            Vmm::Firecracker(_) => "firecracker",
        }
    }

    /// The command line that serves the API on `sock`, logging only errors.
    fn argv(&self, sock: &Path) -> Vec<String> {
        match self {
            Vmm::Flatlet(p) => crate::api::api_argv(p, sock, &[]),
            Vmm::Firecracker(fc) => fc.api_argv(sock),
        }
    }
}

/// One VMM's samples, one per run (clones: one per run).
#[derive(Clone, Debug, Default)]
pub struct Side {
    /// `PUT /snapshot/create`, µs.
    pub create_us: Vec<f64>,
    /// The memory file's allocated bytes.
    pub mem_bytes: Vec<f64>,
    /// The memory file's length.
    pub mem_len: Vec<f64>,
    /// The state file's length.
    pub state_bytes: Vec<f64>,
    /// `PUT /snapshot/load` with `resume_vm`, µs.
    pub load_us: Vec<f64>,
    /// Spawn to that request answered (the vCPUs running again), µs.
    pub running_us: Vec<f64>,
    /// Spawn to the first byte of the next heartbeat line, µs.
    pub first_byte_us: Vec<f64>,
    /// The first spawn to the last clone's first heartbeat byte, µs
    /// (runs where every clone printed one).
    pub clones_us: Vec<f64>,
    /// The first spawn to the last clone's load answered, µs.
    pub clones_running_us: Vec<f64>,
    /// Restores made (the single one and the clones).
    pub restores: usize,
    /// Restored guests that stopped (the process exited) before a
    /// heartbeat.
    pub failed: usize,
}

/// Everything measured.
pub struct Figures {
    /// flatlet's samples.
    pub flatlet: Side,
    /// Firecracker's, when it ran.
    pub firecracker: Option<Side>,
    /// Runs per VMM.
    pub runs: usize,
    /// Clones per run.
    pub clones: usize,
    /// The pause's phase after the heartbeat line, ms.
    pub phase_ms: u64,
    /// The Linux part's figures, when it ran.
    pub linux: Option<LinuxFigures>,
}

/// A VMM process serving its API, its console (stdout) read by a thread
/// that notes when each chunk arrived. Killed when dropped.
struct Running {
    name: &'static str,
    child: Child,
    sock: Option<PathBuf>,
    spawned: Instant,
    console: Arc<Mutex<Console>>,
    client: Option<Client>,
}

#[derive(Default)]
struct Console {
    text: String,
    /// (end offset in `text`, arrival) per chunk read.
    chunks: Vec<(usize, Instant)>,
}

impl Console {
    /// When the byte at `offset` arrived.
    fn arrival(&self, offset: usize) -> Option<Instant> {
        self.chunks.iter().find(|(end, _)| *end > offset).map(|(_, t)| *t)
    }
}

impl Running {
    /// Spawns `vmm` on `sock` and connects to its API.
    fn spawn(vmm: Vmm<'_>, sock: &Path) -> Result<Self, String> {
        Self::serve(vmm.name(), &vmm.argv(sock), sock)
    }

    /// Spawns `argv`, which serves the API on `sock`, and connects to it.
    fn serve(name: &'static str, argv: &[String], sock: &Path) -> Result<Self, String> {
        let _ = std::fs::remove_file(sock);
        let mut me = Self::start(name, argv, Stdio::null())?;
        me.sock = Some(sock.to_path_buf());
        let deadline = me.spawned + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            if Instant::now() > deadline {
                return Err(format!("{}: the API socket never accepted", me.name));
            }
            if let Ok(Some(status)) = me.child.try_wait() {
                return Err(format!("{}: exited before serving its API: {status}", me.name));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        me.client = Some(Client::connect(sock).map_err(|e| format!("{}: {e}", me.name))?);
        Ok(me)
    }

    /// Spawns `argv` with its stdout read by a thread.
    fn start(name: &'static str, argv: &[String], stdin: Stdio) -> Result<Self, String> {
        let Some((program, args)) = argv.split_first() else {
            return Err("empty command".into());
        };
        let spawned = Instant::now();
        let mut child = Command::new(program)
            .args(args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {program}: {e}"))?;
        let console = Arc::new(Mutex::new(Console::default()));
        if let Some(mut out) = child.stdout.take() {
            let c = console.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = out.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let now = Instant::now();
                    if let Ok(mut c) = c.lock() {
                        c.text.push_str(&String::from_utf8_lossy(&buf[..n]));
                        let end = c.text.len();
                        c.chunks.push((end, now));
                    }
                }
            });
        }
        Ok(Self {
            name,
            child,
            sock: None,
            spawned,
            console,
            client: None,
        })
    }

    /// Sends a request that must succeed (2xx); returns its duration.
    fn call(&mut self, method: &str, path: &str, body: &str) -> Result<Duration, String> {
        let name = self.name;
        let client = self.client.as_mut().ok_or("not connected")?;
        let start = Instant::now();
        let reply = client
            .request(method, path, Some(body))
            .map_err(|e| format!("{name}: {method} {path}: {e}"))?;
        let took = start.elapsed();
        if !(200..300).contains(&reply.status) {
            return Err(format!(
                "{name}: {method} {path}: {} {}",
                reply.status, reply.body
            ));
        }
        Ok(took)
    }

    /// Waits for `needle` on the console; when its first byte arrived.
    fn wait_for(&mut self, needle: &str) -> Result<Instant, String> {
        self.wait_within(needle, WAIT)
    }

    /// Waits at most `limit` for `needle` on the console.
    fn wait_within(&mut self, needle: &str, limit: Duration) -> Result<Instant, String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(c) = self.console.lock() {
                if let Some(at) = c.text.find(needle).and_then(|pos| c.arrival(pos)) {
                    return Ok(at);
                }
            }
            if Instant::now() > deadline {
                return Err(format!("{}: the guest never printed {needle:?}", self.name));
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let said = self.console.lock().map(|c| c.text.clone()).unwrap_or_default();
                return Err(format!(
                    "{}: exited ({status}) before {needle:?}; its output:\n{said}",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.client = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(sock) = &self.sock {
            let _ = std::fs::remove_file(sock);
        }
    }
}

/// A directory removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load_body(state: &Path, mem: &Path) -> String {
    serde_json::json!({
        "snapshot_path": state.display().to_string(),
        "mem_backend": { "backend_type": "File", "backend_path": mem.display().to_string() },
        "resume_vm": true,
    })
    .to_string()
}

/// One run of one VMM: boot, snapshot, one restore, then the clones.
fn one_run(vmm: Vmm<'_>, dir: &Path, guest: &Path, plan: &Plan, side: &mut Side) -> Result<(), String> {
    let state = dir.join(format!("{}.state", vmm.name()));
    let mem = dir.join(format!("{}.mem", vmm.name()));
    let _ = std::fs::remove_file(&state);
    let _ = std::fs::remove_file(&mem);
    {
        let mut src = Running::spawn(vmm, &dir.join("src.sock"))?;
        src.call(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
        )?;
        let boot = serde_json::json!({
            "kernel_image_path": guest.display().to_string(),
            "boot_args": BOOT_ARGS,
        });
        src.call("PUT", "/boot-source", &boot.to_string())?;
        src.call("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#)?;
        let beat = src.wait_for(&format!("{HEARTBEAT}1"))?;
        std::thread::sleep(
            (beat + Duration::from_millis(plan.phase_ms)).saturating_duration_since(Instant::now()),
        );
        src.call("PATCH", "/vm", r#"{"state": "Paused"}"#)?;
        let create = serde_json::json!({
            "snapshot_type": "Full",
            "snapshot_path": state.display().to_string(),
            "mem_file_path": mem.display().to_string(),
        });
        side.create_us.push(
            src.call("PUT", "/snapshot/create", &create.to_string())?
                .as_secs_f64()
                * 1e6,
        );
    }
    let m = std::fs::metadata(&mem).map_err(|e| format!("{}: {e}", mem.display()))?;
    side.mem_bytes.push((m.blocks() * 512) as f64);
    side.mem_len.push(m.len() as f64);
    let s = std::fs::metadata(&state).map_err(|e| format!("{}: {e}", state.display()))?;
    side.state_bytes.push(s.len() as f64);

    let body = load_body(&state, &mem);
    {
        let mut dst = Running::spawn(vmm, &dir.join("dst.sock"))?;
        side.load_us
            .push(dst.call("PUT", "/snapshot/load", &body)?.as_secs_f64() * 1e6);
        side.running_us.push(dst.spawned.elapsed().as_secs_f64() * 1e6);
        side.restores += 1;
        match dst.wait_for(HEARTBEAT) {
            Ok(first) => side
                .first_byte_us
                .push(first.duration_since(dst.spawned).as_secs_f64() * 1e6),
            Err(e) => {
                eprintln!("flatlet-bench: restore failed: {e}");
                side.failed += 1;
            }
        }
    }

    let start = Instant::now();
    type Clone = Result<(Running, Instant, Result<Instant, String>), String>;
    let clones: Vec<Clone> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..plan.clones)
            .map(|i| {
                let body = &body;
                s.spawn(move || {
                    let mut c = Running::spawn(vmm, &dir.join(format!("clone{i}.sock")))?;
                    c.call("PUT", "/snapshot/load", body)?;
                    let running = Instant::now();
                    let at = c.wait_for(HEARTBEAT);
                    Ok((c, running, at))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a clone's thread panicked".into()))
            })
            .collect()
    });
    let (mut last, mut last_running) = (Some(start), start);
    for c in &clones {
        match c {
            Ok((_, running, at)) => {
                last_running = last_running.max(*running);
                match at {
                    Ok(at) => last = last.map(|l| l.max(*at)),
                    Err(e) => {
                        eprintln!("flatlet-bench: a clone failed: {e}");
                        side.failed += 1;
                        last = None;
                    }
                }
            }
            Err(e) => return Err(format!("clones: {e}")),
        }
    }
    side.restores += clones.len();
    side.clones_running_us
        .push(last_running.duration_since(start).as_secs_f64() * 1e6);
    side.clones_us
        .extend(last.map(|l| l.duration_since(start).as_secs_f64() * 1e6));
    drop(clones);
    let _ = std::fs::remove_file(&state);
    let _ = std::fs::remove_file(&mem);
    Ok(())
}

/// Runs the benchmark.
pub fn run(plan: &Plan) -> Result<Figures, String> {
    let dir = Scratch(std::env::temp_dir().join(format!("flatlet-bench-snap-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).map_err(|e| format!("{}: {e}", dir.0.display()))?;
    let guest = dir.0.join("guest.elf");
    let status = Command::new(&plan.flatlet)
        .args(["guest-image", "--out"])
        .arg(&guest)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("{}: {e}", plan.flatlet.display()))?;
    if !status.success() {
        return Err(format!("{} guest-image failed: {status}", plan.flatlet.display()));
    }
    let fc = plan
        .firecracker
        .as_ref()
        .map(|p| Firecracker::prepare(p, &plan.flatlet, 1))
        .transpose()?;
    let mut vmms = vec![Vmm::Flatlet(&plan.flatlet)];
    vmms.extend(fc.as_ref().map(Vmm::Firecracker));
    let mut sides = vec![Side::default(); vmms.len()];
    for run in 0..plan.runs.max(1) {
        for (vmm, side) in vmms.iter().zip(sides.iter_mut()) {
            eprintln!(
                "flatlet-bench: run {} of {}: {}",
                run + 1,
                plan.runs.max(1),
                vmm.name()
            );
            one_run(*vmm, &dir.0, &guest, plan, side)?;
        }
    }
    let linux = plan
        .linux
        .as_ref()
        .map(|l| linux_runs(&plan.flatlet, l, plan.runs, &dir.0))
        .transpose()?;
    let mut sides = sides.into_iter();
    Ok(Figures {
        linux,
        flatlet: sides.next().unwrap_or_default(),
        firecracker: sides.next(),
        runs: plan.runs.max(1),
        clones: plan.clones,
        phase_ms: plan.phase_ms,
    })
}

/// How a figure is shown.
#[derive(Clone, Copy)]
enum Unit {
    Ms,
    Bytes,
}

fn show(v: Option<f64>, unit: Unit) -> String {
    match (v, unit) {
        (None, _) => "-".into(),
        (Some(us), Unit::Ms) => format!("{:.2} ms", us / 1000.0),
        (Some(b), Unit::Bytes) if b >= f64::from(1u32 << 20) => {
            format!("{:.1} MiB", b / f64::from(1u32 << 20))
        }
        (Some(b), Unit::Bytes) => format!("{:.1} KiB", b / 1024.0),
    }
}

/// The table: medians, and with Firecracker the ratios against the
/// issue's targets.
pub fn table(f: &Figures) -> String {
    type Pick = fn(&Side) -> &Vec<f64>;
    let rows: [(&str, Pick, Unit, Option<f64>); 9] = [
        (
            "Full create (PUT /snapshot/create)",
            |s| &s.create_us,
            Unit::Ms,
            Some(0.1),
        ),
        (
            "memory file written (allocated)",
            |s| &s.mem_bytes,
            Unit::Bytes,
            None,
        ),
        ("memory file length", |s| &s.mem_len, Unit::Bytes, None),
        ("state file", |s| &s.state_bytes, Unit::Bytes, None),
        (
            "load (PUT /snapshot/load, resume)",
            |s| &s.load_us,
            Unit::Ms,
            Some(0.5),
        ),
        (
            "spawn -> load answered (running)",
            |s| &s.running_us,
            Unit::Ms,
            None,
        ),
        (
            "spawn -> 1st byte after resume",
            |s| &s.first_byte_us,
            Unit::Ms,
            None,
        ),
        (
            "N clones at once -> all running",
            |s| &s.clones_running_us,
            Unit::Ms,
            None,
        ),
        (
            "N clones at once -> all beating",
            |s| &s.clones_us,
            Unit::Ms,
            None,
        ),
    ];
    let failures = |s: &Side| format!("{} of {}", s.failed, s.restores);
    let median = |v: &Vec<f64>| Summary::of(v).map(|s| s.median);
    let mut out = format!(
        "Snapshots of the test guest (1 vCPU, 128 MiB, {BOOT_ARGS}), median of {} runs{}; \
         paused {} ms after heartbeat 1; {} clones\n",
        f.runs,
        if f.firecracker.is_some() {
            ", flatlet and Firecracker interleaved"
        } else {
            ""
        },
        f.phase_ms,
        f.clones
    );
    let _ = writeln!(
        out,
        "{:<36} {:>12} {:>12} {:>8} {:>14}",
        "figure", "flatlet", "firecracker", "ratio", "target"
    );
    for (name, pick, unit, target) in rows {
        let name = name.replace("N clones", &format!("{} clones", f.clones));
        let ours = median(pick(&f.flatlet));
        let theirs = f.firecracker.as_ref().and_then(|s| median(pick(s)));
        let ratio = ours.zip(theirs).map(|(a, b)| a / b);
        let verdict = match (target, ratio) {
            (Some(t), Some(r)) => format!("<= {t} {}", if r <= t { "met" } else { "missed" }),
            (Some(t), None) => format!("<= {t}"),
            (None, _) => "-".into(),
        };
        let _ = writeln!(
            out,
            "{name:<36} {:>12} {:>12} {:>8} {:>14}",
            show(ours, unit),
            show(theirs, unit),
            ratio.map_or_else(|| "-".into(), |r| format!("{r:.3}")),
            verdict
        );
    }
    let _ = writeln!(
        out,
        "{:<36} {:>12} {:>12}",
        "restored guests that failed",
        failures(&f.flatlet),
        f.firecracker.as_ref().map_or_else(|| "-".into(), failures)
    );
    if let Some(l) = &f.linux {
        let answer = median(&l.answer_us);
        let runc = median(&l.runc_us);
        let ratio = answer.zip(runc).map(|(a, b)| a / b);
        let _ = writeln!(
            out,
            "\nThe Linux guest (1 vCPU, 128 MiB), booted once in {:.1} s and snapshotted at its shell's `read`; \
             median of {} runs, interleaved with runc",
            l.boot_us / 1e6,
            l.answer_us.len()
        );
        let _ = writeln!(
            out,
            "{:<36} {:>12} {:>12} {:>8} {:>14}",
            "figure", "flatlet", "runc", "ratio", "target"
        );
        let _ = writeln!(
            out,
            "{:<36} {:>12} {:>12} {:>8} {:>14}",
            "restored shell answers / runc true",
            show(answer, Unit::Ms),
            show(runc, Unit::Ms),
            ratio.map_or_else(|| "-".into(), |r| format!("{r:.3}")),
            ratio.map_or_else(
                || "< 1".into(),
                |r| format!("< 1 {}", if r < 1.0 { "met" } else { "missed" })
            )
        );
        let _ = writeln!(
            out,
            "{:<36} {:>12}",
            "restored kernel echoes the line",
            show(median(&l.echo_us), Unit::Ms),
        );
    }
    out
}
