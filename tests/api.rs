//! The REST API through the real binary: configuration and start of the
//! test guest, state errors, pause and resume, bad and hostile clients,
//! the OpenAPI document, and the socket's removal when flatlet exits.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::kvm_or_skip;
use common::vmm::Vmm;
use flatlet_api::client::Client;

#[test]
fn configure_and_start_the_test_guest() {
    if !kvm_or_skip("configure_and_start_the_test_guest") {
        return;
    }
    let mut vmm = Vmm::start("api-start");
    let info: serde_json::Value = serde_json::from_str(&vmm.ok("GET", "/", None).body).unwrap();
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["id"], "anonymous-instance");
    let defaults: serde_json::Value =
        serde_json::from_str(&vmm.ok("GET", "/machine-config", None).body).unwrap();
    assert_eq!(
        (defaults["vcpu_count"].as_u64(), defaults["mem_size_mib"].as_u64()),
        (Some(1), Some(128))
    );
    assert_eq!(
        vmm.ok(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 64}"#)
        )
        .status,
        204
    );
    assert_eq!(
        vmm.ok("PATCH", "/machine-config", Some(r#"{"mem_size_mib": 96}"#))
            .status,
        204
    );
    vmm.ok(
        "PUT",
        "/boot-source",
        Some(&vmm.boot_source("console=ttyS0 via=api")),
    );
    let config: serde_json::Value = serde_json::from_str(&vmm.ok("GET", "/vm/config", None).body).unwrap();
    assert_eq!(config["machine-config"]["mem_size_mib"], 96);
    assert_eq!(config["boot-source"]["boot_args"], "console=ttyS0 via=api");
    let version: serde_json::Value = serde_json::from_str(&vmm.ok("GET", "/version", None).body).unwrap();
    assert!(version["firecracker_version"].is_string());
    assert_eq!(
        vmm.ok("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#))
            .status,
        204
    );
    vmm.wait_console(
        "flatlet-guest: boot complete, 2 of 2 cpus up",
        Duration::from_secs(30),
    );
    vmm.wait_console("cmdline: console=ttyS0 via=api", Duration::from_secs(30));
    // The guest resets: flatlet exits 0 and removes its socket.
    assert_eq!(vmm.wait_exit(Duration::from_secs(30)), Some(0));
    assert!(!vmm.sock.exists(), "socket removed");
}

#[test]
fn requests_not_allowed_in_the_current_state() {
    if !kvm_or_skip("requests_not_allowed_in_the_current_state") {
        return;
    }
    let mut vmm = Vmm::start("api-state");
    vmm.fault(
        "PATCH",
        "/vm",
        Some(r#"{"state": "Paused"}"#),
        "not supported before starting",
    );
    vmm.fault(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
        "before starting",
    );
    vmm.fault(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        "no kernel is configured",
    );
    vmm.fault(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/nonexistent"}"#),
        "cannot read kernel",
    );
    vmm.fault(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 0, "mem_size_mib": 64}"#),
        "invalid vCPU count",
    );
    // As Firecracker: FlushMetrics is an action on a running VM.
    vmm.fault(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
        "not supported before starting",
    );
    vmm.ok(
        "PUT",
        "/boot-source",
        Some(&vmm.boot_source("console=ttyS0 flatlet.stay")),
    );
    vmm.ok("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
    vmm.fault(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        "allowed once",
    );
    vmm.fault(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
        "after starting",
    );
    vmm.fault(
        "PUT",
        "/boot-source",
        Some(&vmm.boot_source("x")),
        "after starting",
    );
    vmm.fault(
        "PATCH",
        "/drives/none",
        Some(r#"{"drive_id": "none"}"#),
        "no drive has the id",
    );
    let info: serde_json::Value = serde_json::from_str(&vmm.ok("GET", "/", None).body).unwrap();
    assert_eq!(info["state"], "Running");
    vmm.wait_console("staying", Duration::from_secs(30));
    vmm.ok("PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#));
    vmm.wait_console("ctrl-alt-del, resetting", Duration::from_secs(30));
    assert_eq!(vmm.wait_exit(Duration::from_secs(30)), Some(0));
    assert!(!vmm.sock.exists());
}

#[test]
fn pause_stops_the_guest_and_resume_goes_on() {
    if !kvm_or_skip("pause_stops_the_guest_and_resume_goes_on") {
        return;
    }
    let vmm = Vmm::start("api-pause");
    vmm.ok(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 64}"#),
    );
    vmm.ok(
        "PUT",
        "/boot-source",
        Some(&vmm.boot_source("console=ttyS0 flatlet.stay")),
    );
    vmm.ok("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
    vmm.wait_console("flatlet-guest: heartbeat 1", Duration::from_secs(30));
    vmm.ok("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    let info: serde_json::Value = serde_json::from_str(&vmm.ok("GET", "/", None).body).unwrap();
    assert_eq!(info["state"], "Paused");
    let paused_at = vmm.heartbeats();
    std::thread::sleep(Duration::from_millis(3000));
    assert_eq!(vmm.heartbeats(), paused_at, "no heartbeat while paused");
    vmm.ok("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    let deadline = Instant::now() + Duration::from_secs(10);
    while vmm.heartbeats() < paused_at + 2 {
        assert!(Instant::now() < deadline, "heartbeats did not come back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn metrics_and_logger() {
    if !kvm_or_skip("metrics_and_logger") {
        return;
    }
    let mut vmm = Vmm::start("api-metrics");
    let metrics = vmm.sock.with_file_name("metrics.json");
    let logfile = vmm.sock.with_file_name("flatlet.log");
    vmm.ok(
        "PUT",
        "/metrics",
        Some(&format!(r#"{{"metrics_path": "{}"}}"#, metrics.display())),
    );
    vmm.fault(
        "PUT",
        "/metrics",
        Some(&format!(r#"{{"metrics_path": "{}"}}"#, metrics.display())),
        "already",
    );
    vmm.ok(
        "PUT",
        "/logger",
        Some(&format!(
            r#"{{"log_path": "{}", "level": "Info", "show_level": true}}"#,
            logfile.display()
        )),
    );
    vmm.ok(
        "PUT",
        "/boot-source",
        Some(&vmm.boot_source("console=ttyS0 flatlet.stay")),
    );
    vmm.ok("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
    vmm.wait_console("staying", Duration::from_secs(30));
    vmm.ok("PUT", "/actions", Some(r#"{"action_type": "FlushMetrics"}"#));
    let text = std::fs::read_to_string(&metrics).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(line["vcpu"]["exit_io_out"].as_u64().unwrap() > 0, "{line}");
    assert!(line["api_server"]["requests"].as_u64().unwrap() >= 5, "{line}");
    assert!(line["guest_boot_time_us"].as_u64().unwrap() > 0, "{line}");
    let log = std::fs::read_to_string(&logfile).unwrap();
    assert!(log.contains("Guest-boot-time"), "the log went to the file: {log}");
    vmm.ok("PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#));
    assert_eq!(vmm.wait_exit(Duration::from_secs(30)), Some(0));
}

/// Sends raw bytes on a fresh connection; returns what came back (until
/// the server closes or 2 s pass).
fn raw(sock: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.windows(4).any(|w| w == b"\r\n\r\n") && out.ends_with(b"}") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn bad_and_hostile_clients() {
    let vmm = Vmm::start("api-bad");
    vmm.fault(
        "GET",
        "/nonexistent",
        None,
        "Invalid request method and/or path: GET /nonexistent",
    );
    vmm.fault(
        "DELETE",
        "/machine-config",
        None,
        "Invalid request method and/or path",
    );
    vmm.fault(
        "POST",
        "/actions",
        Some("{}"),
        "Invalid request method and/or path",
    );
    vmm.fault(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "x": 1}"#),
        "unknown field `x`",
    );
    vmm.fault("PUT", "/machine-config", Some("{ not json"), "not valid");
    vmm.fault("PUT", "/machine-config", None, "empty");
    vmm.fault(
        "PUT",
        "/drives/a",
        Some(r#"{"drive_id": "b", "path_on_host": "/x", "is_root_device": false}"#),
        "does not match",
    );
    let big = format!(r#"{{"kernel_image_path": "{}"}}"#, "k".repeat(60_000));
    vmm.fault(
        "PUT",
        "/boot-source",
        Some(&big),
        "larger than the limit of 51200",
    );
    // Not HTTP at all.
    let answer = raw(&vmm.sock, b"HELLO THERE\r\n\r\n");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer:?}"
    );
    // A chunked body over the limit.
    let mut chunked = b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..20 {
        chunked.extend_from_slice(b"1000\r\n");
        chunked.extend_from_slice(&[b'a'; 0x1000]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert!(raw(&vmm.sock, &chunked).contains("larger than the limit"));
    // A slow client that never finishes its headers, and one that leaves
    // halfway through a body, hold up nobody.
    let mut slow = UnixStream::connect(&vmm.sock).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    {
        let mut gone = UnixStream::connect(&vmm.sock).unwrap();
        gone.write_all(b"PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"vcpu")
            .unwrap();
    }
    let start = Instant::now();
    assert_eq!(vmm.ok("GET", "/", None).status, 200);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "served while others dawdle"
    );
    // Many clients in a row, and many requests on one connection.
    for _ in 0..200 {
        assert_eq!(vmm.call("GET", "/", None).status, 200);
    }
    let mut c = Client::connect(&vmm.sock).unwrap();
    for _ in 0..200 {
        assert_eq!(c.request("GET", "/machine-config", None).unwrap().status, 200);
    }
    drop(slow);
    // Still well after all that.
    let info: serde_json::Value = serde_json::from_str(&vmm.ok("GET", "/", None).body).unwrap();
    assert_eq!(info["state"], "Not started");
}

#[test]
fn socket_is_removed_when_flatlet_is_stopped() {
    let mut vmm = Vmm::start("api-sigterm");
    assert!(vmm.sock.exists());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(vmm.wait_exit(Duration::from_secs(10)), Some(128 + 15));
    assert!(!vmm.sock.exists());
    // A live socket cannot be taken over; a stale file is replaced.
    std::fs::write(&vmm.sock, b"").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flatlet"))
        .arg("--api-sock")
        .arg("/nonexistent-dir/api.sock")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot create the API socket"));
}

#[test]
fn openapi_lists_exactly_the_routes_served() {
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/resources/openapi.json")).unwrap(),
    )
    .unwrap();
    let mut listed: Vec<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(|m| (m.to_uppercase(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    listed.sort();
    let mut routes: Vec<(String, String)> = flatlet_api::routes::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    routes.sort();
    assert_eq!(
        listed, routes,
        "resources/openapi.json and the router's table differ"
    );

    // Against the live server: every listed route is served, and nothing
    // else is (including Firecracker's routes flatlet does not have).
    let vmm = Vmm::start("api-openapi");
    let not_found = "Invalid request method and/or path";
    let mut paths: Vec<String> = routes.iter().map(|(_, p)| p.clone()).collect();
    paths.extend(
        [
            "/balloon",
            "/snapshot/create",
            "/snapshot/load",
            "/vsock",
            "/entropy",
            "/cpu-config",
            "/serial",
        ]
        .map(String::from),
    );
    paths.dedup();
    for path in &paths {
        let concrete = path.replace("{drive_id}", "d0").replace("{iface_id}", "n0");
        for method in ["GET", "PUT", "PATCH", "DELETE", "POST"] {
            // A GET has no body (one with a body is refused before routing).
            let body = if method == "GET" { None } else { Some("{}") };
            let r = vmm.call(method, &concrete, body);
            let served = !r.body.contains(not_found);
            let listed = routes.contains(&(method.to_string(), path.clone()));
            assert_eq!(
                served, listed,
                "{method} {path}: served={served}, listed={listed} ({r:?})"
            );
        }
    }
}
