//! Helpers shared by the integration tests: running the built binaries
//! with a deadline, and skipping (loudly) where the machine lacks what a
//! test needs.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

pub mod vmm;

use std::io::Read;
use std::net::UdpSocket;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `flatlet` binary under test.
pub fn flatlet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flatlet"))
}

/// What a finished process left.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The exit code (None when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Guest console lines, without the serial line's carriage returns.
    pub fn console_lines(&self) -> Vec<String> {
        self.stdout
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect()
    }

    /// Panics with everything the process printed when `cond` is false.
    pub fn check(&self, cond: bool, what: &str) {
        assert!(
            cond,
            "{what}\n--- exit: {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.status, self.stdout, self.stderr
        );
    }
}

/// Runs `cmd` with stdin from /dev/null, killing it after `limit`.
pub fn run(mut cmd: Command, limit: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn the binary under test");
    wait(child, limit)
}

/// Waits for `child` at most `limit`, then kills it and fails.
pub fn wait(mut child: Child, limit: Duration) -> Output {
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let status = child.wait().expect("reap the child");
            let stdout = out_thread.join().unwrap_or_default();
            let stderr = err_thread.join().unwrap_or_default();
            panic!("timed out after {limit:?} ({status:?})\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
    }
}

/// Whether host prerequisites are required (CI sets
/// `FLATLET_REQUIRE_HOST=1`): then a missing one fails the test.
pub fn host_required() -> bool {
    std::env::var("FLATLET_REQUIRE_HOST").is_ok_and(|v| v == "1")
}

/// Reports that `test` cannot run here. Under `FLATLET_REQUIRE_HOST=1`
/// that is a failure; elsewhere a skip, printed where cargo's output
/// capture does not hide it (libtest captures only the print macros).
pub fn skip(test: &str, why: &str) {
    if host_required() {
        panic!("{test}: {why} (FLATLET_REQUIRE_HOST=1: a missing prerequisite is a failure)");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// Whether /dev/kvm can be used; reports a skip when not.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            skip(test, &format!("/dev/kvm is not usable here ({e})"));
            false
        }
    }
}

/// Whether this host's KVM emulates guest ring-0 code (a PVM host).
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// A fresh temporary directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p = std::env::temp_dir().join(format!("flatlet-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The default deadline of one test-guest boot (generous: machines are
/// shared and slow guest code is emulated here).
pub const BOOT_LIMIT: Duration = Duration::from_secs(60);

/// A network namespace with a TAP device in it, removed on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    fn ip(args: &[&str]) -> Result<(), String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Creates the namespace and `tap` (10.0.2.1/24, up) inside it.
    pub fn new(tag: &str, tap: &str) -> Result<Self, String> {
        let name = format!("flatlet-{tag}-{}", std::process::id());
        Self::ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        let n = ns.name.as_str();
        Self::ip(&["-n", n, "link", "set", "lo", "up"])?;
        Self::ip(&["-n", n, "tuntap", "add", "dev", tap, "mode", "tap"])?;
        Self::ip(&["-n", n, "addr", "add", "10.0.2.1/24", "dev", tap])?;
        Self::ip(&["-n", n, "link", "set", tap, "up"])?;
        Ok(ns)
    }

    /// A UDP socket bound in the namespace (made on a thread that joined it).
    pub fn udp_socket(&self, port: u16) -> UdpSocket {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let s = UdpSocket::bind(("0.0.0.0", port)).unwrap();
            s.set_broadcast(true).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s
        })
        .join()
        .unwrap()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Self::ip(&["netns", "delete", &self.name]);
    }
}

/// Whether TAP tests can run here (KVM, root, /dev/net/tun, iproute2);
/// prints why a test is skipped when not.
pub fn can_do_tap_tests(test: &str) -> bool {
    if !kvm_or_skip(test) {
        return false;
    }
    if !nix::unistd::geteuid().is_root() {
        skip(test, "needs root to create a network namespace and a TAP device");
        return false;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        skip(test, "/dev/net/tun is missing (modprobe tun)");
        return false;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        skip(test, "the ip command (iproute2) is missing");
        return false;
    }
    true
}
