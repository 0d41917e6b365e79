//! Firecracker drop-in: flatlet takes Firecracker's binary flags with
//! their meaning, and works under the name `firecracker`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::vmm::Vmm;
use common::{TempDir, flatlet, kvm_or_skip, run};

#[test]
fn informational_and_refused_flags() {
    let out = run(with(&["--version"]), Duration::from_secs(10));
    out.check(out.code() == Some(0), "--version");
    assert!(out.stdout.starts_with("flatlet v") && out.stdout.contains("Firecracker API v1.17.0-dev"));
    // Snapshots: the format this flatlet writes, and a file's.
    let out = run(with(&["--snapshot-version"]), Duration::from_secs(10));
    out.check(
        out.code() == Some(0) && out.stdout.trim() == "v2",
        "--snapshot-version",
    );
    let dir = TempDir::new("describe");
    let good = dir.path("state");
    std::fs::write(&good, flatlet_vmm::snapshot::format::encode(&42u32).unwrap()).unwrap();
    let out = run(
        with(&["--describe-snapshot", good.to_str().unwrap()]),
        Duration::from_secs(10),
    );
    out.check(
        out.code() == Some(0) && out.stdout.trim() == "v2",
        "--describe-snapshot",
    );
    let mut bytes = std::fs::read(&good).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&good, bytes).unwrap();
    for (args, needle) in [
        (&["--describe-snapshot", good.to_str().unwrap()][..], "corrupt"),
        (&["--describe-snapshot", "/nonexistent"][..], "/nonexistent"),
        (&["--metadata", "/m.json"][..], "/m.json"),
        (&["--seccomp-filter", "/f.bpf"][..], "--seccomp-filter"),
        (&["--id", "bad_id"][..], "'_'"),
        (&["--id", &"a".repeat(65)][..], "1 to 64"),
        (&["--level", "loud"][..], "invalid log level"),
        (&["--no-api"][..], "--config-file"),
    ] {
        let out = run(with(args), Duration::from_secs(10));
        out.check(out.code() == Some(2), &format!("{args:?} exits with 2"));
        out.check(out.stderr.contains(needle), &format!("{args:?} names {needle}"));
    }
}

fn with(args: &[&str]) -> std::process::Command {
    let mut c = flatlet();
    c.args(args);
    c
}

#[test]
fn every_accepted_flag_together_has_its_effect() {
    if !kvm_or_skip("every_accepted_flag_together_has_its_effect") {
        return;
    }
    let dir = TempDir::new("fc-flags");
    let log = dir.path("fc.log");
    let metrics = dir.path("metrics.json");
    let (log_s, metrics_s) = (log.display().to_string(), metrics.display().to_string());
    let vmm = Vmm::start_with(
        "fc-flags",
        &[
            "--id",
            "fc-compat-1",
            "--level",
            "dEbUg",
            "--log-path",
            &log_s,
            "--show-level",
            "--show-log-origin",
            "--module",
            "flatlet",
            "--metrics-path",
            &metrics_s,
            "--boot-timer",
            "--no-seccomp",
            "--enable-pci",
            "--mmds-size-limit",
            "4096",
            "--http-api-max-payload-size",
            "1000",
            "--start-time-us",
            "1",
            "--start-time-cpu-us",
            "0",
            "--parent-cpu-time-us",
            "5",
        ],
        &[],
    );
    let info: serde_json::Value = serde_json::from_str(&vmm.ok("GET", "/", None).body).unwrap();
    assert_eq!(info["id"], "fc-compat-1");
    // GET with a body, and FlushMetrics before start, as Firecracker.
    assert_eq!(vmm.call("GET", "/version", Some("{}")).status, 400);
    vmm.fault(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
        "before starting",
    );
    // The payload limit.
    let big = format!(r#"{{"log_path": "{}"}}"#, "x".repeat(2000));
    assert_eq!(vmm.call("PUT", "/logger", Some(&big)).status, 400);
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
    // The start-up time counts from --start-time-us (boot of this host).
    assert!(
        line["api_server"]["process_startup_time_us"].as_u64().unwrap() > 1_000_000,
        "{line}"
    );
    assert!(
        line["put_api_requests"]["actions_count"].as_u64().unwrap() >= 1,
        "{line}"
    );
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("DEBUG"), "level shown, debug on: {log_text}");
    assert!(log_text.contains(".rs:"), "origin shown: {log_text}");
    assert!(log_text.contains("--enable-pci"), "{log_text}");
    let boot = log_text.lines().find(|l| l.contains("Guest-boot-time")).unwrap();
    let us = flatlet_devices::boot_timer::parse_boot_time_us(boot).unwrap();
    assert!(us > 1_000_000, "counts from --start-time-us: {boot}");
    let config: serde_json::Value = serde_json::from_str(&vmm.ok("GET", "/vm/config", None).body).unwrap();
    assert_eq!(config["metrics"]["metrics_path"], metrics_s);
    vmm.ok("PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#));
}

#[test]
fn runs_under_the_name_firecracker() {
    let dir = TempDir::new("fc-name");
    let link = dir.path("firecracker");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_flatlet"), &link).unwrap();
    let mut version = std::process::Command::new(&link);
    version.arg("--version");
    let out = run(version, Duration::from_secs(10));
    out.check(
        out.code() == Some(0) && out.stdout.contains("Firecracker API"),
        "--version as firecracker",
    );
    let out = run(
        {
            let mut c = std::process::Command::new(&link);
            c.args(["--no-api", "--config-file", "/nonexistent.json"]);
            c
        },
        Duration::from_secs(10),
    );
    out.check(
        out.code() == Some(2) && out.stderr.contains("nonexistent.json"),
        "errors as flatlet's",
    );
}
