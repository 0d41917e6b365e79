//! virtio-net end to end: the test guest sends a UDP datagram through a TAP
//! device in a network namespace this test creates; a socket in that
//! namespace receives it. No traffic leaves the namespace.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::{BOOT_LIMIT, NetNs, can_do_tap_tests, flatlet, run};

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
