//! containerd end to end: a private containerd (Debian's package, with its
//! own root, state and socket) runs containers with
//! `--runtime io.containerd.flatlet.v2`, each in a flatlet microVM booted
//! from the project's Linux guest kernel with flatlet-agent as PID 1.
//!
//! Slow: the first container boots Linux (a minute or more on nested
//! hosts) and leaves the shim's template; every later one is restored from
//! it (seconds). In order: `ctr run --rm` (stdout, stderr, stdin, exit
//! status), a second from the template, a detached container (`ctr task
//! exec`, `ps`, `kill`), four at once, a VM killed under its container, a
//! kernel that does not boot and an agent that never answers; after each,
//! nothing of it is left. Needs root, /dev/kvm, containerd and ctr
//! (tools/setup-test-host installs them) and the guest kernel
//! (FLATLET_LINUX_KERNEL, set by tools/test); skipped without them, failed
//! under FLATLET_REQUIRE_HOST=1. `FLATLET_SKIP_LINUX=1` skips it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const RUNTIME: &str = "io.containerd.flatlet.v2";
const IMAGE: &str = "docker.io/flatlet/busybox:latest";

#[path = "containerd/terminal.rs"]
mod terminal;

fn skip(why: &str) {
    if std::env::var("FLATLET_REQUIRE_HOST").is_ok_and(|v| v == "1")
        && std::env::var("FLATLET_SKIP_LINUX").is_err()
    {
        panic!("containerd test: {why}");
    }
    eprintln!("SKIPPED containerd_runs_containers_in_flatlet_vms: {why}");
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// containerd with its own directories, stopped and cleaned up on drop.
struct Containerd {
    dir: PathBuf,
    child: Child,
}

impl Containerd {
    fn start(dir: &Path, bin_dir: &Path, shim_config: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{d}/containerd.sock\"\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .env("FLATLET_SHIM_CONFIG", shim_config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd");
        let c = Self {
            dir: dir.to_path_buf(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: see {}",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        // A hung VM fails the test instead of holding it (and CI) forever.
        let mut cmd = Command::new("timeout");
        cmd.args(["--kill-after=10", "900", "ctr"])
            .arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .args(args);
        cmd
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).stdin(Stdio::null()).output().unwrap()
    }

    /// `ctr run -d` of a container that sleeps for an hour (`--null-io`:
    /// a detached ctr exits, and nobody would read the FIFOs).
    fn run_detached(&self, id: &str) {
        let out = self.ctr(&[
            "run",
            "-d",
            "--null-io",
            "--runtime",
            RUNTIME,
            IMAGE,
            id,
            "sleep",
            "3600",
        ]);
        assert!(out.status.success(), "ctr run -d {id}: {}", text(&out.stderr));
    }

    /// `ctr args` with `input` on stdin; output, exit code, wall time.
    fn ctr_with_input(&self, args: &[&str], input: &[u8]) -> (Output, Duration) {
        let start = Instant::now();
        let mut child = self
            .ctr_cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        (out, start.elapsed())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Whatever containerd left mounted in its own directories.
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            for m in mounts.lines().filter_map(|l| l.split(' ').nth(1)) {
                if m.starts_with(&*self.dir.to_string_lossy()) {
                    let _ = Command::new("umount").arg("-l").arg(m).status();
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Nothing of a container is left: jails, per-container files, VMMs (the
/// template, in `<state_dir>/templates`, stays for the next container).
fn assert_nothing_left(jail_base: &Path, state_dir: &Path) {
    let jails: Vec<_> = std::fs::read_dir(jail_base.join("flatlet"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(jails.is_empty(), "jails left: {jails:?}");
    let files: Vec<_> = std::fs::read_dir(state_dir.join("default"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(files.is_empty(), "per-container files left: {files:?}");
    // flatlet in a jail runs as `flatlet --id <jail id> ...`. Only this
    // run's count (another run of this test, or the benchmark, may be
    // running on the host): those in its own parent cgroup.
    let ps = Command::new("pgrep")
        .args(["-f", "^flatlet --id "])
        .output()
        .unwrap();
    let parent = format!("/{}/", cgroup_parent(jail_base));
    let ours: Vec<String> = text(&ps.stdout)
        .lines()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.contains(&parent))
        })
        .map(str::to_owned)
        .collect();
    assert!(ours.is_empty(), "processes left: {ours:?}");
    let cgroups: Vec<_> = cgroup_dirs(jail_base)
        .into_iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .filter(|e| e.path().is_dir())
        .map(|e| e.path())
        .collect();
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
}

/// The cgroup this run's VMs go in (the shim's `parent_cgroup`): named
/// after the run's directory, which holds `jail_base`.
fn cgroup_parent(jail_base: &Path) -> String {
    jail_base
        .parent()
        .and_then(|d| d.file_name())
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// That cgroup under every hierarchy that has it.
fn cgroup_dirs(jail_base: &Path) -> Vec<PathBuf> {
    let parent = cgroup_parent(jail_base);
    let mut dirs = vec![Path::new("/sys/fs/cgroup").join(&parent)];
    for e in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        dirs.push(e.path().join(&parent));
    }
    dirs.into_iter().filter(|d| d.is_dir()).collect()
}

#[test]
fn containerd_runs_containers_in_flatlet_vms() {
    if std::env::var("FLATLET_SKIP_LINUX").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED containerd_runs_containers_in_flatlet_vms: FLATLET_SKIP_LINUX=1");
        return;
    }
    if !nix_is_root() {
        return skip("not root");
    }
    if !Path::new("/dev/kvm").exists() {
        return skip("no /dev/kvm");
    }
    if !have("containerd") || !have("ctr") {
        return skip("no containerd or ctr (tools/setup-test-host installs them)");
    }
    let Ok(kernel) = std::env::var("FLATLET_LINUX_KERNEL") else {
        return skip("FLATLET_LINUX_KERNEL is not set (tools/test sets it from tools/build-linux-guest)");
    };
    let shim = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-flatlet-v2"));
    let bin_dir = shim.parent().unwrap().to_path_buf();
    for b in ["flatlet", "flatlet-jailer", "flatlet-agent"] {
        if !bin_dir.join(b).exists() {
            return skip(&format!(
                "no {b} next to the shim (cargo build --workspace builds it)"
            ));
        }
    }
    let work = std::env::temp_dir().join(format!("flatlet-containerd-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();

    // The agent's image, from this build's agent.
    let out = Command::new(repo().join("tools/build-agent-image"))
        .env("FLATLET_AGENT", bin_dir.join("flatlet-agent"))
        .output()
        .unwrap();
    assert!(out.status.success(), "build-agent-image: {}", text(&out.stderr));
    let agent_image = text(&out.stdout).lines().last().unwrap().to_string();

    // The shim's own directories, so that "nothing left" is checkable.
    let jail_base = work.join("jail");
    let state_dir = work.join("state");
    let shim_config = work.join("shim.json");
    let config = serde_json::json!({
        "flatlet": bin_dir.join("flatlet"), "jailer": bin_dir.join("flatlet-jailer"),
        "kernel": kernel, "agent_image": agent_image,
        "jail_base": jail_base, "state_dir": state_dir,
        "parent_cgroup": cgroup_parent(&jail_base),
    });
    std::fs::write(&shim_config, config.to_string()).unwrap();

    let ctd = Containerd::start(&work.join("containerd"), &bin_dir, &shim_config);
    let tar = work.join("busybox-oci.tar");
    let out = Command::new(repo().join("tools/build-oci-image"))
        .arg(&tar)
        .output()
        .unwrap();
    assert!(out.status.success(), "build-oci-image: {}", text(&out.stderr));
    let out = ctd.ctr(&["image", "import", &tar.to_string_lossy()]);
    assert!(out.status.success(), "ctr image import: {}", text(&out.stderr));

    // runc, for comparison, in the same run.
    let (out, runc) = ctd.ctr_with_input(&["run", "--rm", IMAGE, "runc-1", "true"], b"");
    assert!(out.status.success(), "runc: {}", text(&out.stderr));

    // One boot: stdout, stderr, stdin and the exit status.
    let (out, took) = ctd.ctr_with_input(
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "t1",
            "sh",
            "-c",
            "echo hello; read line; echo \"stdin: $line\"; echo to-stderr >&2; exit 3",
        ],
        b"from-the-host\n",
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    eprintln!(
        "containerd: ctr run --rm with flatlet took {:.1} s (runc: {} ms); stdout {stdout:?}, stderr {stderr:?}",
        took.as_secs_f64(),
        runc.as_millis()
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "the container's exit status; stderr: {stderr}"
    );
    assert!(stdout.contains("hello\n"), "echo hello: {stdout:?}");
    assert!(
        stdout.contains("stdin: from-the-host\n"),
        "stdin reached the process: {stdout:?}"
    );
    assert!(stderr.contains("to-stderr"), "stderr: {stderr:?}");
    let out = ctd.ctr(&["containers", "ls", "-q"]);
    assert_eq!(text(&out.stdout).trim(), "", "ctr run --rm removed the container");
    assert_nothing_left(&jail_base, &state_dir);

    // The template the first container left: the next one is restored
    // from it, not booted.
    let (out, warm) = ctd.ctr_with_input(
        &["run", "--rm", "--runtime", RUNTIME, IMAGE, "t3", "echo", "hello"],
        b"",
    );
    eprintln!(
        "containerd: a second ctr run --rm (from the template) took {:.1} s",
        warm.as_secs_f64()
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\n");
    assert_nothing_left(&jail_base, &state_dir);

    terminal::terminal_container(&ctd, &jail_base, &state_dir);
    detached_container(&ctd, &jail_base, &state_dir);
    four_at_once(&ctd, &jail_base, &state_dir);
    vm_killed_under_its_container(&ctd, &jail_base, &state_dir);
    // The shim reads its configuration at each create: bad ones, then back.
    let with = |changes: serde_json::Value| {
        let mut c = config.clone();
        for (k, v) in changes.as_object().unwrap() {
            c[k] = v.clone();
        }
        std::fs::write(&shim_config, c.to_string()).unwrap();
    };
    let not_a_kernel = work.join("not-a-kernel");
    std::fs::write(&not_a_kernel, "not a kernel\n").unwrap();
    with(serde_json::json!({"kernel": not_a_kernel}));
    failed_start(&ctd, "b1", "kernel", &jail_base, &state_dir);
    // A boot (no template) that the agent cannot answer within 2 s.
    with(serde_json::json!({"template": false, "boot_timeout_secs": 2}));
    failed_start(&ctd, "b2", "did not answer within 2s", &jail_base, &state_dir);
    with(serde_json::json!({}));
    shim_killed_under_its_container(&ctd, &jail_base, &state_dir);
    drop(ctd);
    for d in cgroup_dirs(&jail_base) {
        let _ = std::fs::remove_dir(d);
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// A long-running container (from the template): an exec in it, ps, kill.
fn detached_container(ctd: &Containerd, jail_base: &Path, state_dir: &Path) {
    ctd.run_detached("t2");
    let (out, _) = ctd.ctr_with_input(
        &[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "t2",
            "sh",
            "-c",
            "echo exec-ok; exit 5",
        ],
        b"",
    );
    assert_eq!(
        out.status.code(),
        Some(5),
        "the exec's exit status: {}",
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("exec-ok"), "{}", text(&out.stdout));
    let out = ctd.ctr(&["task", "ps", "t2"]);
    assert!(
        out.status.success() && text(&out.stdout).lines().count() >= 2,
        "ctr task ps: {}",
        text(&out.stdout)
    );
    // SIGTERM, ctr's default: sleep ends with 128 + 15, which `ctr task
    // rm` reports.
    let out = ctd.ctr(&["task", "kill", "t2"]);
    assert!(out.status.success(), "ctr task kill: {}", text(&out.stderr));
    wait_stopped(ctd, "t2");
    let out = ctd.ctr(&["task", "rm", "t2"]);
    assert!(
        out.status.success() && text(&out.stderr).contains("exit code 143"),
        "ctr task rm: {}",
        text(&out.stderr)
    );
    assert!(ctd.ctr(&["containers", "rm", "t2"]).status.success());
    assert_nothing_left(jail_base, state_dir);
    assert_no_shims(ctd);
}

/// Waits (a minute at most) for `ctr task ls` to show `id` stopped.
fn wait_stopped(ctd: &Containerd, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ls = text(&ctd.ctr(&["task", "ls"]).stdout);
        if ls
            .lines()
            .any(|l| l.starts_with(&format!("{id} ")) && l.contains("STOPPED"))
        {
            return;
        }
        assert!(Instant::now() < deadline, "{id} did not stop: {ls}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// No shim of this containerd is left (they end a moment after `ctr`).
fn assert_no_shims(ctd: &Containerd) {
    let pattern = format!(
        "containerd-shim-flatlet-v2 .*{}",
        ctd.dir.join("containerd.sock").display()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ps = Command::new("pgrep").args(["-f", &pattern]).output().unwrap();
        let left = text(&ps.stdout);
        if left.trim().is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "shims left: {left}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Four containers at once, each in its own VM from the template: each
/// gets its own output and exit status.
fn four_at_once(ctd: &Containerd, jail_base: &Path, state_dir: &Path) {
    let results: Vec<(Output, Duration)> = std::thread::scope(|s| {
        let runs: Vec<_> = (1..=4)
            .map(|i| {
                s.spawn(move || {
                    let id = format!("t1{i}");
                    let script = format!("echo container-{i}; exit {i}");
                    ctd.ctr_with_input(
                        &[
                            "run",
                            "--rm",
                            "--runtime",
                            RUNTIME,
                            IMAGE,
                            &id,
                            "sh",
                            "-c",
                            &script,
                        ],
                        b"",
                    )
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (i, (out, took)) in (1..=4).zip(&results) {
        eprintln!(
            "containerd: container {i} of 4 at once took {:.1} s",
            took.as_secs_f64()
        );
        assert_eq!(out.status.code(), Some(i), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), format!("container-{i}\n"));
    }
    assert_nothing_left(jail_base, state_dir);
    assert_no_shims(ctd);
}

/// The VM of a running container dies (SIGKILL to flatlet, as a crash of
/// the VMM or the host's OOM killer would): the task ends with 255, the
/// shim says why in containerd's log, and `ctr task rm` / `ctr rm` leave
/// nothing behind.
fn vm_killed_under_its_container(ctd: &Containerd, jail_base: &Path, state_dir: &Path) {
    ctd.run_detached("t5");
    let ls = text(&ctd.ctr(&["task", "ls"]).stdout);
    let pid: i32 = ls
        .lines()
        .find(|l| l.starts_with("t5 "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("t5's pid in {ls}"));
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "flatlet", "the task's pid is its VMM");
    // In its own cgroup under this run's parent, with a pids limit.
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let line = cgroup
        .lines()
        .find(|l| l.contains(&format!("/{}/", cgroup_parent(jail_base))))
        .unwrap_or_else(|| panic!("the VMM is not in this run's cgroup: {cgroup}"));
    let path = line.splitn(3, ':').nth(2).unwrap();
    let pids_max = ["/sys/fs/cgroup/pids", "/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .find_map(|h| std::fs::read_to_string(format!("{h}{path}/pids.max")).ok());
    assert!(
        pids_max.is_some_and(|m| m.trim().parse::<u32>().is_ok()),
        "pids.max of {path}"
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_stopped(ctd, "t5");
    let out = ctd.ctr(&["task", "rm", "t5"]);
    assert!(
        out.status.success() && text(&out.stderr).contains("exit code 255"),
        "ctr task rm: {}",
        text(&out.stderr)
    );
    let log = std::fs::read_to_string(ctd.dir.join("containerd.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("t5: lost process") && l.contains("VM ended")),
        "the shim's log says the VM ended"
    );
    assert!(ctd.ctr(&["containers", "rm", "t5"]).status.success());
    assert_nothing_left(jail_base, state_dir);
    assert_no_shims(ctd);
}

/// The shim of a running container is killed: containerd runs the shim's
/// `delete` for it, which ends the VM and removes its jail, cgroups and
/// files.
fn shim_killed_under_its_container(ctd: &Containerd, jail_base: &Path, state_dir: &Path) {
    ctd.run_detached("t6");
    let pattern = format!(
        "containerd-shim-flatlet-v2 .*-id t6 .*{}",
        ctd.dir.join("containerd.sock").display()
    );
    let ps = Command::new("pkill")
        .args(["-KILL", "-f", &pattern])
        .status()
        .unwrap();
    assert!(ps.success(), "no shim matched {pattern}");
    // containerd notices the dead shim, runs its `delete` and forgets the task.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ls = text(&ctd.ctr(&["task", "ls"]).stdout);
        if !ls.lines().any(|l| l.starts_with("t6 ")) {
            break;
        }
        assert!(Instant::now() < deadline, "t6 is still a task: {ls}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The task leaves containerd's list as its cleanup starts: give the
    // shim's `delete` time to end the VM and remove the jail.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir(jail_base.join("flatlet")).is_ok_and(|mut d| d.next().is_some())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ctd.ctr(&["containers", "rm", "t6"]).status.success());
    assert_nothing_left(jail_base, state_dir);
    assert_no_shims(ctd);
}

/// A container whose VM cannot start: `ctr run` fails with `why` in its
/// error, and nothing is left.
fn failed_start(ctd: &Containerd, id: &str, why: &str, jail_base: &Path, state_dir: &Path) {
    let (out, took) = ctd.ctr_with_input(&["run", "--rm", "--runtime", RUNTIME, IMAGE, id, "true"], b"");
    let stderr = text(&out.stderr);
    eprintln!(
        "containerd: {id} failed in {:.1} s: {}",
        took.as_secs_f64(),
        stderr.trim()
    );
    assert!(!out.status.success(), "{id} ran");
    assert!(stderr.contains(why), "{id}: {why:?} in {stderr:?}");
    let out = ctd.ctr(&["containers", "ls", "-q"]);
    assert_eq!(text(&out.stdout).trim(), "", "ctr run --rm removed {id}");
    assert_nothing_left(jail_base, state_dir);
    assert_no_shims(ctd);
}

fn nix_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
