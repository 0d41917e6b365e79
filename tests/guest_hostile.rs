//! A guest that misbehaves, or a host side nobody serves, must not stall
//! flatlet: a chatty guest whose console (stdout) nobody reads loses
//! output (counted), while the API answers and a SIGTERM ends flatlet.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TempDir, kvm_or_skip};
use flatlet_api::client::Reply;

/// flatlet serving its API, its stdout a pipe that is never read.
struct Unread {
    child: Child,
    sock: PathBuf,
    log: Arc<Mutex<String>>,
    /// Held open, never read: the pipe fills up.
    stdout: Option<std::process::ChildStdout>,
}

impl Unread {
    fn start(dir: &TempDir) -> Self {
        let sock = dir.path("api.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_flatlet"))
            .arg("--api-sock")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take();
        let log = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                l.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "the API socket never came up");
            std::thread::sleep(Duration::from_millis(5));
        }
        Unread {
            child,
            sock,
            log,
            stdout,
        }
    }

    /// A request that must be answered, with a 2xx, within `limit` (a
    /// stalled flatlet fails the test, rather than hang it).
    fn ok(&self, method: &str, path: &str, body: Option<&str>, limit: Duration) -> Reply {
        let (tx, rx) = std::sync::mpsc::channel();
        let (sock, m, p, b) = (
            self.sock.clone(),
            method.to_string(),
            path.to_string(),
            body.map(str::to_string),
        );
        std::thread::spawn(move || {
            let _ = tx.send(flatlet_api::client::request(&sock, &m, &p, b.as_deref()));
        });
        let r = match rx.recv_timeout(limit) {
            Ok(r) => r.unwrap(),
            Err(_) => panic!(
                "{method} {path}: no answer within {limit:?}\nlog:\n{}",
                self.log.lock().unwrap()
            ),
        };
        assert!(
            (200..300).contains(&r.status),
            "{method} {path}: {r:?}\nlog:\n{}",
            self.log.lock().unwrap()
        );
        r
    }
}

impl Unread {
    /// Sends SIGTERM; fails unless flatlet exits within `limit`.
    fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < limit,
                "flatlet did not exit on SIGTERM\nlog:\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last line of the metrics file, flushed now.
fn metrics(vmm: &Unread, path: &Path) -> serde_json::Value {
    vmm.ok(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
        Duration::from_secs(5),
    );
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

#[test]
fn a_console_nobody_reads_stalls_nothing() {
    if !kvm_or_skip("a_console_nobody_reads_stalls_nothing") {
        return;
    }
    let dir = TempDir::new("unread-console");
    let guest = dir.path("guest.elf");
    std::fs::write(&guest, flatlet_guest::ELF).unwrap();
    let metrics_path = dir.path("metrics.json");
    let mut vmm = Unread::start(&dir);
    let quick = Duration::from_secs(5);
    vmm.ok(
        "PUT",
        "/metrics",
        Some(&format!(r#"{{"metrics_path": "{}"}}"#, metrics_path.display())),
        quick,
    );
    vmm.ok(
        "PUT",
        "/boot-source",
        Some(&format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 flatlet.flood"}}"#,
            guest.display()
        )),
        quick,
    );
    vmm.ok(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        quick,
    );
    // The guest prints until the pipe and flatlet's buffer are full, and
    // then some: output is being dropped.
    let deadline = Instant::now() + Duration::from_secs(90);
    let missed = loop {
        let m = metrics(&vmm, &metrics_path);
        let missed = m["uart"]["missed_write_count"].as_u64().unwrap_or(0);
        if missed > 0 {
            break missed;
        }
        assert!(
            Instant::now() < deadline,
            "no console output was dropped: {m}\nlog:\n{}",
            vmm.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    // Still dropping: the guest goes on (its vCPU is not stuck). Counters
    // are changes since the previous line, as in Firecracker.
    std::thread::sleep(Duration::from_millis(500));
    let m = metrics(&vmm, &metrics_path);
    let later = m["uart"]["missed_write_count"].as_u64().unwrap();
    assert!(later > 0, "the guest stopped: {missed} then {later} more");
    // Every byte the guest wrote is counted, the dropped ones too (all of
    // them while nobody reads).
    assert!(m["uart"]["write_count"].as_u64().unwrap() >= later, "{m}");
    // The API answers, and the vCPU obeys pause and resume.
    let r = vmm.ok("GET", "/", None, quick);
    assert!(r.body.contains("Running"), "{r:?}");
    vmm.ok("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), quick);
    vmm.ok("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), quick);
    // A SIGTERM ends flatlet promptly.
    let status = vmm.terminate(Duration::from_secs(10));
    assert_eq!(status.code(), Some(128 + 15), "{}", vmm.log.lock().unwrap());
    // What went through is the guest's console, from its start.
    let mut out = vmm.stdout.take().unwrap();
    let mut head = [0u8; 64];
    out.read_exact(&mut head).unwrap();
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("flatlet-guest: booting"), "{head}");
}
