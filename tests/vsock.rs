//! virtio-vsock end to end with the built-in guest: host programs reach
//! its echo service through `CONNECT <port>`, and its connect mode reaches
//! a host listener at `<uds_path>_<port>`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::vmm::collect;
use common::{BOOT_LIMIT, TempDir, flatlet, kvm_or_skip, run};

const ECHO_PORT: u32 = 5000;

/// A guest running the echo service.
struct EchoVm {
    child: Child,
    uds: PathBuf,
    console: Arc<Mutex<String>>,
    log: Arc<Mutex<String>>,
    _dir: TempDir,
}

impl EchoVm {
    fn start(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let uds = dir.path("v.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_flatlet"))
            .args(["run", "--vsock"])
            .arg(format!("cid=3,uds={}", uds.display()))
            .args([
                "--cmdline",
                &format!("console=ttyS0 flatlet.stay flatlet.vsock=echo:{ECHO_PORT}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let console = collect(child.stdout.take().unwrap());
        let log = collect(child.stderr.take().unwrap());
        let vm = EchoVm {
            child,
            uds,
            console,
            log,
            _dir: dir,
        };
        vm.wait_console(&format!("vsock: echo on port {ECHO_PORT}"));
        vm
    }

    fn wait_console(&self, needle: &str) {
        let deadline = Instant::now() + BOOT_LIMIT;
        while !self.console.lock().unwrap().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the console:\n{}\n--- log:\n{}",
                self.console.lock().unwrap(),
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A connection to guest `port`, after the `OK` line (or None if the
    /// guest refused: the stream ended without one).
    fn try_connect(&self, port: u32) -> Option<UnixStream> {
        let mut s = UnixStream::connect(&self.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        loop {
            match s.read(&mut b) {
                // Closed (a reset when the guest refused before reading).
                Ok(0) => return None,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("reading the OK line: {e}"),
                Ok(_) if b[0] == b'\n' => break,
                Ok(_) => line.push(b[0]),
            }
        }
        let line = String::from_utf8(line).unwrap();
        assert!(line.starts_with("OK "), "{line:?}");
        let _: u32 = line[3..].parse().unwrap();
        Some(s)
    }

    fn connect(&self) -> UnixStream {
        self.try_connect(ECHO_PORT)
            .unwrap_or_else(|| panic!("refused:\n{}", self.log.lock().unwrap()))
    }
}

impl Drop for EchoVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` bytes of a pattern particular to `seed`.
fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Sends `data` on `s` from another thread while reading the echo;
/// returns what came back.
fn echo(s: UnixStream, data: Vec<u8>) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let n = data.len();
    let writer = std::thread::spawn(move || w.write_all(&data).unwrap());
    let mut got = vec![0u8; n];
    let mut r = s;
    r.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    got
}

#[test]
fn one_mib_echoed_intact() {
    if !kvm_or_skip("one_mib_echoed_intact") {
        return;
    }
    let vm = EchoVm::start("vsock-echo");
    let data = pattern(1, 1 << 20);
    let sum = fnv(&data);
    let s = vm.connect();
    let t = Instant::now();
    let got = echo(s, data);
    let took = t.elapsed();
    assert_eq!(fnv(&got), sum, "checksum of the echo");
    eprintln!(
        "vsock: 1 MiB echoed in {} ms ({:.1} MiB/s each way)",
        took.as_millis(),
        1.0 / took.as_secs_f64()
    );
}

#[test]
fn thirty_two_connections_at_once() {
    if !kvm_or_skip("thirty_two_connections_at_once") {
        return;
    }
    let vm = EchoVm::start("vsock-32");
    let streams: Vec<UnixStream> = (0..32).map(|_| vm.connect()).collect();
    let workers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            std::thread::spawn(move || {
                let data = pattern(100 + i as u64, 64 * 1024);
                let got = echo(s, data.clone());
                assert!(got == data, "connection {i}: the echo differs");
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    // Many in turn, after those.
    for i in 0..20u64 {
        let data = pattern(1000 + i, 3000);
        assert_eq!(echo(vm.connect(), data.clone()), data);
    }
}

#[test]
fn a_refused_port_closes_the_host_connection() {
    if !kvm_or_skip("a_refused_port_closes_the_host_connection") {
        return;
    }
    let vm = EchoVm::start("vsock-refused");
    assert!(
        vm.try_connect(ECHO_PORT + 1).is_none(),
        "no OK for a port nobody listens on"
    );
    // A line that is not CONNECT is closed too.
    let mut s = UnixStream::connect(&vm.uds).unwrap();
    s.write_all(b"HELLO\n").unwrap();
    let mut b = [0u8; 8];
    assert_eq!(s.read(&mut b).unwrap(), 0);
    // The service is still there.
    assert_eq!(echo(vm.connect(), b"still here".to_vec()), b"still here");
}

#[test]
fn the_host_closing_mid_stream_leaves_the_guest_serving() {
    if !kvm_or_skip("the_host_closing_mid_stream_leaves_the_guest_serving") {
        return;
    }
    let vm = EchoVm::start("vsock-close");
    for i in 0..8 {
        let mut s = vm.connect();
        // Half a megabyte, never read: the host goes away mid-stream.
        let _ = s.write_all(&pattern(i, 256 * 1024));
        drop(s);
    }
    let data = pattern(99, 100_000);
    assert_eq!(echo(vm.connect(), data.clone()), data);
}

#[test]
fn a_reader_that_stops_for_a_second_loses_nothing() {
    if !kvm_or_skip("a_reader_that_stops_for_a_second_loses_nothing") {
        return;
    }
    let vm = EchoVm::start("vsock-slow");
    let s = vm.connect();
    let data = pattern(7, 2 << 20);
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent).unwrap());
    let mut r = s;
    let mut got = vec![0u8; data.len()];
    r.read_exact(&mut got[..64 * 1024]).unwrap();
    // The reader stops; the writer fills every buffer on the way, and
    // flow control holds them.
    std::thread::sleep(Duration::from_secs(1));
    // Meanwhile other connections are served.
    assert_eq!(echo(vm.connect(), b"not held up".to_vec()), b"not held up");
    r.read_exact(&mut got[64 * 1024..]).unwrap();
    writer.join().unwrap();
    assert!(got == data, "the stream differs after the pause");
}

#[test]
fn the_guest_connects_to_a_host_listener() {
    if !kvm_or_skip("the_guest_connects_to_a_host_listener") {
        return;
    }
    let dir = TempDir::new("vsock-connect");
    let uds = dir.path("v.sock");
    let listener = UnixListener::bind(format!("{}_5001", uds.display())).unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        (&s).write_all(b"pong from the host\n").unwrap();
        line
    });
    let mut cmd = flatlet();
    cmd.args(["run", "--vsock"])
        .arg(format!("cid=7,uds={}", uds.display()))
        .args(["--cmdline", "console=ttyS0 flatlet.vsock=connect:5001"]);
    let out = run(cmd, BOOT_LIMIT);
    out.check(out.code() == Some(0), "exit 0");
    out.check(
        out.stdout
            .contains("flatlet-guest: vsock: got pong from the host"),
        "the guest read the host's line",
    );
    assert_eq!(server.join().unwrap(), "hello from flatlet vsock\n");
    // No listener: the guest is refused and goes on.
    let mut cmd = flatlet();
    cmd.args(["run", "--vsock"])
        .arg(format!("cid=7,uds={}", uds.display()))
        .args(["--cmdline", "console=ttyS0 flatlet.vsock=connect:5002"]);
    let out = run(cmd, BOOT_LIMIT);
    out.check(out.code() == Some(0), "exit 0");
    out.check(
        out.stdout.contains("vsock: connect refused: port 5002"),
        "refused",
    );
}

#[test]
fn configuration_checks_and_no_clobbering() {
    let dir = TempDir::new("vsock-config");
    let file = dir.path("precious");
    std::fs::write(&file, b"keep me").unwrap();
    let mut cmd = flatlet();
    cmd.args(["run", "--vsock"])
        .arg(format!("cid=3,uds={}", file.display()));
    let out = run(cmd, BOOT_LIMIT);
    out.check(out.code() != Some(0), "refused");
    out.check(out.stderr.contains("not a socket"), "says why");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    for bad in ["cid=2,uds=/tmp/x", "cid=3", "uds=/tmp/x", "cid=3,uds=/tmp/x,y=1"] {
        let mut cmd = flatlet();
        cmd.args(["run", "--vsock", bad]);
        let out = run(cmd, BOOT_LIMIT);
        out.check(out.code() == Some(2), bad);
    }
}

#[test]
fn put_vsock_and_vm_config() {
    if !kvm_or_skip("put_vsock_and_vm_config") {
        return;
    }
    let vm = common::vmm::Vmm::start("vsock-api");
    let uds = vm.dir.path("v.sock");
    vm.fault(
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid": 2, "uds_path": "/tmp/x"}"#),
        "guest_cid",
    );
    let body = format!(
        r#"{{"vsock_id": "vsock0", "guest_cid": 5, "uds_path": "{}"}}"#,
        uds.display()
    );
    vm.ok("PUT", "/vsock", Some(&body));
    let config = vm.ok("GET", "/vm/config", None);
    let v: serde_json::Value = serde_json::from_str(&config.body).unwrap();
    assert_eq!(v["vsock"]["guest_cid"], 5);
    assert_eq!(v["vsock"]["uds_path"], uds.display().to_string());
    let boot = vm.boot_source("console=ttyS0 flatlet.stay flatlet.vsock=echo:5000");
    vm.ok("PUT", "/boot-source", Some(&boot));
    vm.ok("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
    vm.wait_console("vsock: echo on port 5000", BOOT_LIMIT);
    let echo_vm = EchoVm {
        child: Command::new("true").spawn().unwrap(),
        uds,
        console: vm.console.clone(),
        log: vm.log.clone(),
        _dir: TempDir::new("vsock-api-unused"),
    };
    assert_eq!(echo(echo_vm.connect(), b"via the API".to_vec()), b"via the API");
    vm.fault("PUT", "/vsock", Some(&body), "not supported after starting");
}
