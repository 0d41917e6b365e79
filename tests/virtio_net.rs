//! virtio-net end to end: the test guest sends a UDP datagram through a TAP
//! device in a network namespace this test creates; a socket in that
//! namespace receives it. No traffic leaves the namespace.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::UdpSocket;
use std::os::fd::AsFd;
use std::process::Command;
use std::time::Duration;

use common::{BOOT_LIMIT, flatlet, kvm_or_skip, run};

/// A network namespace with a TAP device in it, removed on drop.
struct NetNs {
    name: String,
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
    fn new(tag: &str, tap: &str) -> Result<Self, String> {
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
    fn udp_socket(&self, port: u16) -> UdpSocket {
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

fn can_do_tap_tests(test: &str) -> bool {
    if !kvm_or_skip(test) {
        return false;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED {test}: needs root to create a network namespace and a TAP device");
        return false;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIPPED {test}: /dev/net/tun is missing (modprobe tun)");
        return false;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        eprintln!("SKIPPED {test}: the ip command (iproute2) is missing");
        return false;
    }
    true
}

#[test]
fn guest_datagram_reaches_a_socket_in_the_namespace() {
    if !can_do_tap_tests("guest_datagram_reaches_a_socket_in_the_namespace") {
        return;
    }
    let ns = NetNs::new("net", "fltap0").expect("network namespace and TAP");
    let socket = ns.udp_socket(7777);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(env!("CARGO_BIN_EXE_flatlet"))
        .args(["run", "--net", "fltap0,mac=06:00:0a:00:02:0f"]);
    let out = run(cmd, BOOT_LIMIT);
    out.check(out.code() == Some(0), "exit 0");
    out.check(out.stdout.contains("flatlet-guest: net: ok"), "the guest sent it");
    let mut buf = [0u8; 256];
    let (n, from) = socket.recv_from(&mut buf).expect("the datagram arrived");
    assert_eq!(&buf[..n], b"hello from flatlet");
    assert_eq!(from.to_string(), "10.0.2.15:7777");
}

#[test]
fn missing_tap_name_and_bad_mac_are_config_errors() {
    let mut cmd = flatlet();
    cmd.args(["run", "--net", "a-name-far-too-long-for-linux"]);
    let out = run(cmd, BOOT_LIMIT);
    out.check(out.code() == Some(2), "exit 2");
    out.check(out.stderr.contains("invalid TAP name"), "says why");
    let mut cmd = flatlet();
    cmd.args(["run", "--net", "tap0,mac=zz:00:00:00:00:00"]);
    let out = run(cmd, BOOT_LIMIT);
    out.check(out.code() == Some(2), "exit 2");
    out.check(out.stderr.contains("invalid MAC address"), "says why");
}
