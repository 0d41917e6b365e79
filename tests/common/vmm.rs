//! A flatlet serving its API, driven as a client would, with its console
//! and log collected as they come.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flatlet_api::client::Reply;

use super::TempDir;

/// A flatlet serving its API, with its console collected as it comes.
pub struct Vmm {
    pub child: Child,
    pub sock: PathBuf,
    pub console: Arc<Mutex<String>>,
    pub log: Arc<Mutex<String>>,
    pub dir: TempDir,
    pub guest: PathBuf,
}

pub fn collect<R: Read + Send + 'static>(mut r: R) -> Arc<Mutex<String>> {
    let out = Arc::new(Mutex::new(String::new()));
    let o = out.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            o.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    out
}

impl Vmm {
    pub fn start(tag: &str) -> Self {
        Self::start_with(tag, &[], &[])
    }

    /// Starts flatlet with `--api-sock` and `args`, and `env` set.
    pub fn start_with(tag: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::launch(tag, Command::new(env!("CARGO_BIN_EXE_flatlet")), args, env)
    }

    /// Starts flatlet in the network namespace `netns` (its TAPs are
    /// there).
    pub fn start_in_netns(tag: &str, netns: &str) -> Self {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, env!("CARGO_BIN_EXE_flatlet")]);
        Self::launch(tag, cmd, &[], &[])
    }

    fn launch(tag: &str, mut cmd: Command, args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = TempDir::new(tag);
        let sock = dir.path("api.sock");
        let guest = dir.path("guest.elf");
        std::fs::write(&guest, flatlet_guest::ELF).unwrap();
        let mut child = cmd
            .arg("--api-sock")
            .arg(&sock)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let console = collect(child.stdout.take().unwrap());
        let log = collect(child.stderr.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "the API socket never came up");
            std::thread::sleep(Duration::from_millis(5));
        }
        Vmm {
            child,
            sock,
            console,
            log,
            dir,
            guest,
        }
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        flatlet_api::client::request(&self.sock, method, path, body).unwrap()
    }

    pub fn ok(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        let r = self.call(method, path, body);
        assert!(
            (200..300).contains(&r.status),
            "{method} {path}: {r:?}\nlog:\n{}",
            self.log.lock().unwrap()
        );
        r
    }

    pub fn fault(&self, method: &str, path: &str, body: Option<&str>, needle: &str) {
        let r = self.call(method, path, body);
        assert_eq!(r.status, 400, "{method} {path}: {r:?}");
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        let msg = v["fault_message"].as_str().unwrap();
        assert!(msg.contains(needle), "{method} {path}: {msg:?} lacks {needle:?}");
    }

    /// `PUT /boot-source`: the test guest with `args`.
    pub fn put_boot(&self, args: &str) {
        self.ok("PUT", "/boot-source", Some(&self.boot_source(args)));
    }

    /// `InstanceStart`.
    pub fn instance_start(&self) {
        self.ok("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
    }

    /// `PUT /drives/<id>`: a writable, non-root drive on `path`.
    pub fn put_drive(&self, id: &str, path: &std::path::Path) {
        self.ok(
            "PUT",
            &format!("/drives/{id}"),
            Some(&format!(
                r#"{{"drive_id": "{id}", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}"#,
                path.display()
            )),
        );
    }

    pub fn boot_source(&self, args: &str) -> String {
        format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "{args}"}}"#,
            self.guest.display()
        )
    }

    pub fn wait_console(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.console.lock().unwrap().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "console never showed {needle:?}:\n{}\nlog:\n{}",
                self.console.lock().unwrap(),
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn heartbeats(&self) -> usize {
        self.console
            .lock()
            .unwrap()
            .matches("flatlet-guest: heartbeat ")
            .count()
    }

    /// Waits for the process to end; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("flatlet did not exit; log:\n{}", self.log.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
