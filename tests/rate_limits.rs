//! Rate limiters and the entropy device through the real binary: the
//! built-in guest reads virtio-rng (limited and not), and drive and
//! interface limits are set by PUT and changed by PATCH on a running VM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::vmm::Vmm;
use common::{BOOT_LIMIT, TempDir, flatlet, kvm_or_skip, run};

/// Boots the test guest with `entropy` as the config file's entropy
/// object; returns the rng lines and how long the run took.
fn boot_with_entropy(dir: &TempDir, entropy: &str) -> (Vec<String>, Duration) {
    let guest = dir.path("guest.elf");
    std::fs::write(&guest, flatlet_guest::ELF).unwrap();
    let config = dir.path("vm.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "entropy": {entropy}}}"#,
            guest.display()
        ),
    )
    .unwrap();
    let mut cmd = flatlet();
    cmd.arg("--config-file").arg(&config).arg("--no-api");
    let t = Instant::now();
    let out = run(cmd, BOOT_LIMIT);
    let took = t.elapsed();
    out.check(out.code() == Some(0), "boots and resets");
    let lines: Vec<String> = out
        .console_lines()
        .into_iter()
        .filter(|l| l.starts_with("flatlet-guest: rng: "))
        .collect();
    out.check(lines.len() == 2, "two entropy reads");
    (lines, took)
}

#[test]
fn the_guest_reads_entropy() {
    if !kvm_or_skip("the_guest_reads_entropy") {
        return;
    }
    let dir = TempDir::new("entropy");
    let (lines, fast) = boot_with_entropy(&dir, "{}");
    let hex: Vec<&str> = lines
        .iter()
        .map(|l| l.trim_start_matches("flatlet-guest: rng: "))
        .collect();
    assert!(
        hex.iter()
            .all(|h| h.len() == 32 && *h != "00000000000000000000000000000000")
    );
    assert_ne!(hex[0], hex[1], "two reads, two values");
    // 16 bytes per 600 ms: the second read waits for the limiter's timer
    // (and is not lost).
    let (_, slow) = boot_with_entropy(
        &dir,
        r#"{"rate_limiter": {"bandwidth": {"size": 16, "refill_time": 600}}}"#,
    );
    assert!(
        slow >= Duration::from_millis(500) && slow > fast,
        "limited {slow:?}, unlimited {fast:?}"
    );
}

#[test]
fn limits_are_set_and_changed_through_the_api() {
    if !kvm_or_skip("limits_are_set_and_changed_through_the_api") {
        return;
    }
    let vmm = Vmm::start("limits");
    let img = vmm.dir.path("disk.img");
    std::fs::write(&img, vec![0u8; 64 * 1024]).unwrap();
    vmm.ok(
        "PUT",
        "/drives/d0",
        Some(&format!(
            r#"{{"drive_id": "d0", "path_on_host": "{}", "is_root_device": false,
                "rate_limiter": {{"bandwidth": {{"size": 1048576, "one_time_burst": 0, "refill_time": 100}},
                                  "ops": {{"size": 100, "refill_time": 1000}}}}}}"#,
            img.display()
        )),
    );
    vmm.fault(
        "PUT",
        "/drives/d1",
        Some(&format!(
            r#"{{"drive_id": "d1", "path_on_host": "{}", "is_root_device": false,
                "rate_limiter": {{"bandwidth": {{"size": 1}}}}}}"#,
            img.display()
        )),
        "refill_time",
    );
    vmm.ok(
        "PUT",
        "/entropy",
        Some(r#"{"rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}"#),
    );
    vmm.ok(
        "PUT",
        "/boot-source",
        Some(&vmm.boot_source("console=ttyS0 flatlet.stay")),
    );
    vmm.ok("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
    vmm.wait_console("flatlet-guest: rng: ", Duration::from_secs(30));
    vmm.wait_console("blk: ok", Duration::from_secs(30));
    vmm.fault("PUT", "/entropy", Some("{}"), "not supported after starting");
    // A running drive's limits change.
    vmm.ok(
        "PATCH",
        "/drives/d0",
        Some(r#"{"drive_id": "d0", "rate_limiter": {"bandwidth": {"size": 0, "refill_time": 0}}}"#),
    );
    let config: serde_json::Value = serde_json::from_str(&vmm.ok("GET", "/vm/config", None).body).unwrap();
    let limiter = &config["drives"][0]["rate_limiter"];
    assert_eq!(limiter["bandwidth"]["size"], 0, "{config}");
    assert_eq!(limiter["ops"]["size"], 100, "{config}");
    assert!(config["entropy"]["rate_limiter"]["ops"]["size"] == 10, "{config}");
}
