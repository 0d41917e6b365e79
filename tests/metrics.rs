//! Metrics end to end: a boot with a drive and a NIC moves the block and
//! net counters it should (Firecracker's names, in `block`, `net` and the
//! per-device `block_<id>`, `net_<id>` groups), and leaves the error
//! counters at 0. The NIC's TAP is in a network namespace this test
//! creates; no traffic leaves it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::vmm::{Vmm, collect};
use common::{NetNs, TempDir, can_do_tap_tests};
use serde_json::Value;

/// Every line of the metrics file, parsed.
fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// A counter summed over every line (each line holds the changes since
/// the line before, as Firecracker's do).
fn total(lines: &[Value], group: &str, name: &str) -> u64 {
    lines.iter().map(|l| l[group][name].as_u64().unwrap_or(0)).sum()
}

/// Starts flatlet inside the namespace, serving its API.
fn start_in(ns: &NetNs, dir: TempDir, args: &[&str]) -> Vmm {
    let sock = dir.path("api.sock");
    let guest = dir.path("guest.elf");
    std::fs::write(&guest, flatlet_guest::ELF).unwrap();
    // `ip netns exec` execs flatlet: the child is flatlet itself.
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(env!("CARGO_BIN_EXE_flatlet"))
        .arg("--api-sock")
        .arg(&sock)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let console = collect(child.stdout.take().unwrap());
    let log = collect(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "the API socket never came up: {}",
            log.lock().unwrap()
        );
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

#[test]
fn a_boot_with_a_drive_and_a_nic_moves_their_counters() {
    if !can_do_tap_tests("a_boot_with_a_drive_and_a_nic_moves_their_counters") {
        return;
    }
    let ns = NetNs::new("metrics", "flmtap0").expect("network namespace and TAP");
    let socket = ns.udp_socket(7777);
    let dir = TempDir::new("metrics");
    let image = dir.path("data.img");
    std::fs::write(&image, vec![0x5au8; 1 << 20]).unwrap();
    let metrics = dir.path("metrics.json");
    let metrics_s = metrics.display().to_string();
    let mut vmm = start_in(&ns, dir, &["--metrics-path", &metrics_s]);

    // FlushMetrics before InstanceStart is refused, as in Firecracker.
    vmm.fault(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
        "before starting",
    );

    vmm.ok(
        "PUT",
        "/boot-source",
        Some(&vmm.boot_source("console=ttyS0 flatlet.stay")),
    );
    let drive = format!(
        r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false,
            "is_read_only": false, "cache_type": "Writeback"}}"#,
        image.display()
    );
    vmm.ok("PUT", "/drives/data", Some(&drive));
    vmm.ok(
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth0", "host_dev_name": "flmtap0", "guest_mac": "06:00:0a:00:02:0f"}"#),
    );
    vmm.ok("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
    vmm.wait_console("staying", Duration::from_secs(60));
    let console = vmm.console.lock().unwrap().clone();
    assert!(
        console.contains("flatlet-guest: blk: ok") && console.contains("flatlet-guest: net: ok"),
        "{console}"
    );
    // The guest's datagram reached the namespace.
    let mut buf = [0u8; 256];
    let (n, _) = socket.recv_from(&mut buf).expect("the guest's datagram");
    assert_eq!(&buf[..n], b"hello from flatlet");
    vmm.ok("PUT", "/actions", Some(r#"{"action_type": "FlushMetrics"}"#));

    // A broadcast from the namespace to the guest (which posted two
    // receive buffers): the receive counters move too. Other frames the
    // namespace's kernel sends (IPv6 neighbour discovery) may add to them.
    socket.send_to(b"hello guest", "10.0.2.255:7777").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let all = loop {
        vmm.ok("PUT", "/actions", Some(r#"{"action_type": "FlushMetrics"}"#));
        let all = lines(&metrics);
        if total(&all, "net_eth0", "rx_count") > 0 {
            break all;
        }
        assert!(Instant::now() < deadline, "no frame received: {all:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let last = all.last().unwrap();
    let t = |group: &str, name: &str| total(&all, group, name);

    // The guest read sectors 0 and 1, wrote sector 1 and flushed, one
    // request per queue notification (and activation wakes the queue
    // once, which may merge with the first notification).
    for group in ["block", "block_data"] {
        assert_eq!(t(group, "read_count"), 2, "{group}: {last}");
        assert_eq!(t(group, "read_bytes"), 1024, "{group}: {last}");
        assert_eq!(t(group, "write_count"), 1, "{group}: {last}");
        assert_eq!(t(group, "write_bytes"), 512, "{group}: {last}");
        assert_eq!(t(group, "flush_count"), 1, "{group}: {last}");
        let events = t(group, "queue_event_count");
        assert!(
            (4..=5).contains(&events),
            "{group}.queue_event_count {events}: {last}"
        );
        for zero in [
            "execute_fails",
            "activate_fails",
            "mmio_invalid_access_count",
            "mmio_invalid_notify_count",
            "mmio_invalid_queue_config_count",
            "mmio_invalid_status_count",
            "invalid_reqs_count",
            "invalid_avail_idx_count",
            "indirect_desc_count",
            "invalid_chain_count",
            "oversized_req_count",
            "rate_limiter_throttled_events",
        ] {
            assert_eq!(t(group, zero), 0, "{group}.{zero}: {last}");
        }
    }
    // It sent one 60-byte frame (after the 12-byte virtio-net header).
    for group in ["net", "net_eth0"] {
        assert_eq!(t(group, "tx_count"), 1, "{group}: {last}");
        assert_eq!(t(group, "tx_packets_count"), 1, "{group}: {last}");
        assert_eq!(t(group, "tx_bytes_count"), 60, "{group}: {last}");
        assert_eq!(t(group, "tx_queue_event_count"), 1, "{group}: {last}");
        assert!(t(group, "rx_queue_event_count") >= 1, "{group}: {last}");
        assert!(t(group, "rx_tap_event_count") >= 1, "{group}: {last}");
        let rx = t(group, "rx_count");
        // At least our broadcast; the host's own IPv6 chatter on a new TAP
        // (router solicitations, MLD) may add frames, more of them when
        // the machine is slow.
        assert!(rx >= 1, "{group}.rx_count {rx}: {last}");
        assert_eq!(t(group, "rx_packets_count"), rx, "{group}: {last}");
        // Our broadcast is 14 + 20 + 8 + 11 = 53 bytes; each frame at least 42.
        assert!(t(group, "rx_bytes_count") >= 42 * rx, "{group}: {last}");
        for zero in [
            "tx_rate_limiter_throttled",
            "activate_fails",
            "mmio_invalid_access_count",
            "mmio_invalid_notify_count",
            "mmio_invalid_queue_config_count",
            "mmio_invalid_status_count",
            "rx_rate_limiter_throttled",
            "dropped",
            "invalid_avail_idx_count",
            "indirect_desc_count",
        ] {
            assert_eq!(t(group, zero), 0, "{group}.{zero}: {last}");
        }
    }
    // The rest of the line: the requests made (one refused: the early
    // FlushMetrics), and nothing gone wrong.
    assert_eq!(t("put_api_requests", "drive_count"), 1, "{last}");
    assert_eq!(t("put_api_requests", "network_count"), 1, "{last}");
    assert_eq!(t("put_api_requests", "boot_source_count"), 1, "{last}");
    assert!(t("put_api_requests", "actions_count") >= 3, "{last}");
    assert_eq!(t("put_api_requests", "actions_fails"), 1, "{last}");
    assert_eq!(t("api_server", "errors"), 1, "{last}");
    assert!(t("vcpu", "exit_mmio_write") > 0, "{last}");
    assert!(t("uart", "write_count") > 0, "{last}");
    for (group, name) in [
        ("vmm", "panic_count"),
        ("seccomp", "num_faults"),
        ("logger", "missed_metrics_count"),
        ("logger", "metrics_fails"),
        ("uart", "missed_write_count"),
    ] {
        assert_eq!(t(group, name), 0, "{group}.{name}: {last}");
    }
    // Lines hold changes: the lines after the first one (written once the
    // guest was done with its drive) saw no new block request.
    assert!(all[0]["block_data"]["read_count"].as_u64() == Some(2), "{all:?}");
    let blk_after_boot: u64 = all[1..]
        .iter()
        .map(|l| l["block_data"]["read_count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(blk_after_boot, 0, "{all:?}");

    vmm.ok("PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#));
    assert_eq!(vmm.wait_exit(Duration::from_secs(30)), Some(0));
    // As Firecracker, a last line when the VM ends: the guest's reset
    // through the i8042 (a port write) is in it.
    let at_exit = lines(&metrics);
    assert_eq!(at_exit.len(), all.len() + 1, "{at_exit:?}");
    let end = at_exit.last().unwrap();
    assert!(end["vcpu"]["exit_io_out"].as_u64().unwrap() > 0, "{end}");
    assert_eq!(end["block_data"]["read_count"], 0, "{end}");
}
