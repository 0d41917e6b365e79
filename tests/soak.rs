//! A bounded soak: 16 microVMs running the test guest (`flatlet.stay`),
//! each hammered by an API client (`GET /`, `PUT /logger`, pause and
//! resume, idle connections opening and closing) for `FLATLET_SOAK_SECS`
//! seconds (default 40, at most 120). None may die, and each flatlet's
//! file descriptors and RSS must stay flat between the first and the last
//! quarter of the run. The figures are printed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::kvm_or_skip;
use common::vmm::Vmm;

const VMS: usize = 16;

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One client's loop against one flatlet, until `stop`.
fn hammer(vmm: &Vmm, stop: &AtomicBool, requests: &AtomicU64) {
    let log = vmm.dir.path("flatlet.log");
    let logger = format!(r#"{{"log_path": "{}", "level": "Info"}}"#, log.display());
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        vmm.ok("GET", "/", None);
        vmm.ok("PUT", "/logger", Some(&logger));
        if round % 4 == 0 {
            vmm.ok("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
            vmm.ok("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
        }
        let idle: Vec<UnixStream> = (0..4)
            .filter_map(|_| UnixStream::connect(&vmm.sock).ok())
            .collect();
        drop(idle);
        requests.fetch_add(if round % 4 == 0 { 4 } else { 2 }, Ordering::Relaxed);
    }
}

#[test]
fn sixteen_vms_under_api_load_stay_up_and_flat() {
    if !kvm_or_skip("sixteen_vms_under_api_load_stay_up_and_flat") {
        return;
    }
    let secs: u64 = std::env::var("FLATLET_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40)
        .clamp(8, 120);
    let vmms: Vec<Arc<Vmm>> = (0..VMS)
        .map(|i| {
            let vmm = Vmm::start(&format!("soak{i}"));
            vmm.ok(
                "PUT",
                "/machine-config",
                Some(r#"{"vcpu_count": 1, "mem_size_mib": 32}"#),
            );
            vmm.ok(
                "PUT",
                "/boot-source",
                Some(&vmm.boot_source("console=ttyS0 flatlet.stay")),
            );
            vmm.ok("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
            Arc::new(vmm)
        })
        .collect();
    for vmm in &vmms {
        vmm.wait_console("heartbeat", Duration::from_secs(60));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = vmms
        .iter()
        .map(|vmm| {
            let (vmm, stop, requests) = (vmm.clone(), stop.clone(), requests.clone());
            std::thread::spawn(move || hammer(&vmm, &stop, &requests))
        })
        .collect();
    let started = Instant::now();
    let sample = || -> Vec<(usize, u64)> {
        vmms.iter()
            .map(|v| (fds(v.child.id()), rss_kib(v.child.id())))
            .collect()
    };
    std::thread::sleep(Duration::from_secs(secs / 4));
    let early = sample();
    std::thread::sleep(Duration::from_secs(secs - secs / 4));
    let late = sample();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let elapsed = started.elapsed();
    let mut vmms: Vec<Vmm> = vmms.into_iter().map(|v| Arc::into_inner(v).unwrap()).collect();
    for (i, vmm) in vmms.iter_mut().enumerate() {
        assert!(
            vmm.child.try_wait().unwrap().is_none(),
            "VM {i} died: {}",
            vmm.log.lock().unwrap()
        );
    }
    let (fd0, fd1): (usize, usize) = (
        early.iter().map(|s| s.0).max().unwrap(),
        late.iter().map(|s| s.0).max().unwrap(),
    );
    let rss_growth: Vec<i64> = early
        .iter()
        .zip(&late)
        .map(|(a, b)| b.1 as i64 - a.1 as i64)
        .collect();
    let worst_growth = *rss_growth.iter().max().unwrap();
    let total = requests.load(Ordering::Relaxed);
    let _ = writeln!(
        std::io::stderr(),
        "soak: {VMS} VMs, {:.0} s, {total} requests ({:.0}/s); descriptors, most of any flatlet: {fd0} early, {fd1} late; \
         RSS early {}..{} KiB, late {}..{} KiB, largest growth {worst_growth} KiB",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        early.iter().map(|s| s.1).min().unwrap(),
        early.iter().map(|s| s.1).max().unwrap(),
        late.iter().map(|s| s.1).min().unwrap(),
        late.iter().map(|s| s.1).max().unwrap(),
    );
    assert!(
        total > VMS as u64 * 10,
        "the clients barely ran: {total} requests"
    );
    // Idle connections close as their client does; a few may be in
    // flight when sampled.
    assert!(fd1 <= fd0 + 8, "descriptors grew: {fd0} -> {fd1}");
    assert!(worst_growth < 1024, "RSS grew by {worst_growth} KiB in a VM");
    for vmm in &vmms {
        vmm.ok("GET", "/", None);
    }
}
