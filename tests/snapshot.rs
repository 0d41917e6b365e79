//! Snapshots through the real binary: `PUT /snapshot/create` on a paused
//! test guest writes a valid state file and a sparse memory file; a new
//! flatlet loads it and goes on where it stopped (heartbeat 3, not a new
//! boot), with its drive and NIC (on another TAP) working; 8 clones run at
//! once from one snapshot; and the state errors Firecracker gives.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use common::vmm::Vmm;
use common::{NetNs, can_do_tap_tests, kvm_or_skip};

/// Pauses `vmm` and takes a Full snapshot into its directory; returns the
/// state and memory files.
fn pause_and_snapshot(vmm: &Vmm) -> (PathBuf, PathBuf) {
    let state = vmm.sock.with_file_name("vm.state");
    let mem = vmm.sock.with_file_name("vm.mem");
    vmm.ok("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    vmm.ok(
        "PUT",
        "/snapshot/create",
        Some(&format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            state.display(),
            mem.display()
        )),
    );
    (state, mem)
}

/// Boots the test guest (`flatlet.stay`), snapshots it after heartbeat
/// `beat` and ends it; returns the ended flatlet (its directory holds the
/// files until it is dropped), the state and the memory file.
fn snapshot_after_heartbeat(tag: &str, beat: usize) -> (Vmm, PathBuf, PathBuf) {
    let mut src = Vmm::start(tag);
    src.put_boot("console=ttyS0 flatlet.stay");
    src.instance_start();
    src.wait_console(
        &format!("flatlet-guest: heartbeat {beat}"),
        Duration::from_secs(30),
    );
    let (state, mem) = pause_and_snapshot(&src);
    src.child.kill().unwrap();
    src.child.wait().unwrap();
    (src, state, mem)
}

/// A `PUT /snapshot/load` body; `extra` is more JSON fields.
fn load_body(state: &std::path::Path, mem: &std::path::Path, extra: &str) -> String {
    format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}{extra}}}"#,
        state.display(),
        mem.display()
    )
}

#[test]
fn a_restored_vm_keeps_its_drive_and_its_nic_on_another_tap() {
    if !can_do_tap_tests("a_restored_vm_keeps_its_drive_and_its_nic_on_another_tap") {
        return;
    }
    // The source's TAP and the clone's are in two namespaces: a datagram
    // in the second can only come from the restored VM.
    let ns_a = NetNs::new("snapa", "fltapa").expect("namespace and TAP");
    let ns_b = NetNs::new("snapb", "fltapb").expect("namespace and TAP");
    let socket = ns_b.udp_socket(7777);
    let mut src = Vmm::start_in_netns("snapshot-dev-src", &ns_a.name);
    let drive = src.sock.with_file_name("disk.img");
    let mut image = vec![0u8; 1 << 20];
    image[..4].copy_from_slice(b"DISK");
    std::fs::write(&drive, &image).unwrap();
    src.put_boot("console=ttyS0 flatlet.stay flatlet.beatio");
    src.put_drive("data", &drive);
    src.ok(
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth0", "host_dev_name": "fltapa", "guest_mac": "06:00:0a:00:02:0f"}"#),
    );
    src.instance_start();
    src.wait_console("flatlet-guest: net: heartbeat 2 sent", Duration::from_secs(30));
    let (state, mem) = pause_and_snapshot(&src);
    src.child.kill().unwrap();
    src.child.wait().unwrap();
    let written = std::fs::read(&drive).unwrap();
    assert_eq!(&written[512..534], b"flatlet-guest-was-here", "the boot's write");

    // An override of an interface the snapshot does not have is refused.
    let dst = Vmm::start_in_netns("snapshot-dev-dst", &ns_b.name);
    dst.fault(
        "PUT",
        "/snapshot/load",
        Some(&load_body(
            &state,
            &mem,
            r#", "network_overrides": [{"iface_id": "eth9", "host_dev_name": "fltapb"}]"#,
        )),
        "no such interface",
    );
    dst.ok(
        "PUT",
        "/snapshot/load",
        Some(&load_body(
            &state,
            &mem,
            r#", "resume_vm": true, "network_overrides": [{"iface_id": "eth0", "host_dev_name": "fltapb"}]"#,
        )),
    );
    dst.wait_console("flatlet-guest: net: heartbeat 3 sent", Duration::from_secs(30));
    let console = dst.console.lock().unwrap().clone();
    assert!(
        console.contains("flatlet-guest: blk: heartbeat 3 read: flatlet-guest-was-here"),
        "the restored drive reads what was written before the snapshot: {console}"
    );
    assert!(
        !console.contains("boot complete"),
        "a restore, not a boot: {console}"
    );
    let mut buf = [0u8; 256];
    let (n, from) = socket
        .recv_from(&mut buf)
        .expect("a datagram on the override TAP");
    assert_eq!(&buf[..n], b"hello from flatlet");
    assert_eq!(from.to_string(), "10.0.2.15:7777");
    let config: serde_json::Value = serde_json::from_str(&dst.ok("GET", "/vm/config", None).body).unwrap();
    assert_eq!(config["network-interfaces"][0]["host_dev_name"], "fltapb");
    assert_eq!(config["drives"][0]["drive_id"], "data");
}

#[test]
fn eight_clones_of_one_snapshot_run_at_once() {
    if !kvm_or_skip("eight_clones_of_one_snapshot_run_at_once") {
        return;
    }
    let (_src, state, mem) = snapshot_after_heartbeat("snapshot-clones-src", 1);
    let clones: Vec<Vmm> = (0..8)
        .map(|i| Vmm::start(&format!("snapshot-clone{i}")))
        .collect();
    let body = load_body(&state, &mem, r#", "resume_vm": true"#);
    std::thread::scope(|s| {
        for c in &clones {
            let body = &body;
            s.spawn(move || c.ok("PUT", "/snapshot/load", Some(body)));
        }
    });
    for c in &clones {
        c.wait_console("flatlet-guest: heartbeat 3", Duration::from_secs(60));
        assert!(!c.console.lock().unwrap().contains("heartbeat 1"));
    }
}

#[test]
fn create_a_full_snapshot_of_the_paused_test_guest() {
    if !kvm_or_skip("create_a_full_snapshot_of_the_paused_test_guest") {
        return;
    }
    let vmm = Vmm::start("snapshot-create");
    let state = vmm.sock.with_file_name("vm.state");
    let mem = vmm.sock.with_file_name("vm.mem");
    let body = format!(
        r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        state.display(),
        mem.display()
    );
    vmm.fault("PUT", "/snapshot/create", Some(&body), "");
    vmm.ok(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 64}"#),
    );
    vmm.put_boot("console=ttyS0 flatlet.stay");
    vmm.instance_start();
    vmm.wait_console("flatlet-guest: heartbeat 2", Duration::from_secs(30));
    vmm.fault("PUT", "/snapshot/create", Some(&body), "pause it first");
    vmm.ok("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    vmm.fault(
        "PUT",
        "/snapshot/create",
        Some(&body.replace("Full", "Diff")),
        "need dirty page tracking",
    );
    // A FIFO at the path is refused at once, not waited on.
    let fifo = vmm.sock.with_file_name("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let to_fifo = body.replace(&state.display().to_string(), &fifo.display().to_string());
    vmm.fault("PUT", "/snapshot/create", Some(&to_fifo), "snapshot file");
    assert_eq!(vmm.ok("PUT", "/snapshot/create", Some(&body)).status, 204);

    let file = std::fs::read(&state).unwrap();
    assert_eq!(&file[..8], b"FLATSNAP");
    let meta = std::fs::metadata(&mem).unwrap();
    assert_eq!(meta.len(), 64 << 20, "the memory file has the VM's size");
    let allocated = meta.blocks() * 512;
    assert!(
        allocated < 16 << 20,
        "the memory file is sparse: {allocated} bytes allocated of 64 MiB"
    );

    // The VM goes on after the snapshot.
    let at = vmm.heartbeats();
    vmm.ok("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while vmm.heartbeats() <= at {
        assert!(std::time::Instant::now() < deadline, "no heartbeat after resume");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_loaded_snapshot_goes_on_where_it_stopped() {
    if !kvm_or_skip("a_loaded_snapshot_goes_on_where_it_stopped") {
        return;
    }
    let mut src = Vmm::start("snapshot-src");
    let state = src.sock.with_file_name("vm.state");
    let mem = src.sock.with_file_name("vm.mem");
    src.ok(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
    );
    src.put_boot("console=ttyS0 flatlet.stay");
    src.instance_start();
    src.wait_console("flatlet-guest: heartbeat 2", Duration::from_secs(30));
    src.ok("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(src.heartbeats(), 2, "paused right after heartbeat 2");
    src.ok(
        "PUT",
        "/snapshot/create",
        Some(&format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            state.display(),
            mem.display()
        )),
    );
    // The source ends; its directory (with the snapshot) stays until the
    // end of the test.
    src.child.kill().unwrap();
    src.child.wait().unwrap();

    let dst = Vmm::start("snapshot-dst");
    let load = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
        state.display(),
        mem.display()
    );
    let mem_before = std::fs::read(&mem).unwrap();
    // A clone from the same files at the same time: its writes are its own.
    let clone = Vmm::start("snapshot-clone");
    assert_eq!(dst.ok("PUT", "/snapshot/load", Some(&load)).status, 204);
    // Without resume_vm, the clone stays paused until resumed.
    // (And its clock moves on by the wall-clock time since the snapshot.)
    let paused_load = load.replace(r#", "resume_vm": true"#, r#", "clock_realtime": true"#);
    assert_eq!(clone.ok("PUT", "/snapshot/load", Some(&paused_load)).status, 204);
    let info: serde_json::Value = serde_json::from_str(&clone.ok("GET", "/", None).body).unwrap();
    assert_eq!(info["state"], "Paused");
    dst.wait_console("flatlet-guest: heartbeat 3", Duration::from_secs(30));
    assert_eq!(
        clone.heartbeats(),
        0,
        "no heartbeat while the loaded clone is paused"
    );
    clone.ok("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    clone.wait_console("flatlet-guest: heartbeat 4", Duration::from_secs(30));
    assert!(
        std::fs::read(&mem).unwrap() == mem_before,
        "the memory file is unchanged by the restored guests"
    );
    let console = dst.console.lock().unwrap().clone();
    assert!(
        !console.contains("heartbeat 1"),
        "a new boot, not a restore: {console}"
    );
    assert!(
        !console.contains("boot complete"),
        "a new boot, not a restore: {console}"
    );
    // Load after loading (or configuring) is refused.
    dst.fault("PUT", "/snapshot/load", Some(&load), "fresh flatlet");
    // The restored guest's reset ends the restored VM, as a booted one's.
    let mut dst = dst;
    dst.ok("PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#));
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(0));
    let console = dst.console.lock().unwrap().clone();
    assert!(console.contains("ctrl-alt-del, resetting"), "{console}");
}

#[test]
fn bad_snapshot_files_are_refused_cleanly() {
    if !kvm_or_skip("bad_snapshot_files_are_refused_cleanly") {
        return;
    }
    let vmm = Vmm::start("snapshot-bad");
    let state = vmm.sock.with_file_name("bad.state");
    let mem = vmm.sock.with_file_name("bad.mem");
    std::fs::write(&mem, vec![0u8; 4096]).unwrap();
    let load = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        state.display(),
        mem.display()
    );
    std::fs::write(&state, b"not a snapshot at all, but long enough for a header").unwrap();
    vmm.fault("PUT", "/snapshot/load", Some(&load), "bad magic");
    let fifo = vmm.sock.with_file_name("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    vmm.fault(
        "PUT",
        "/snapshot/load",
        Some(&load.replace(&state.display().to_string(), &fifo.display().to_string())),
        "not a regular file",
    );
    std::fs::write(&state, b"FLATSNAP").unwrap();
    vmm.fault("PUT", "/snapshot/load", Some(&load), "truncated");
    let both = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}}}"#,
        state.display(),
        mem.display(),
        mem.display()
    );
    vmm.fault("PUT", "/snapshot/load", Some(&both), "Only one of");
    // Still fresh: a boot works after the refusals.
    let info: serde_json::Value = serde_json::from_str(&vmm.ok("GET", "/", None).body).unwrap();
    assert_eq!(info["state"], "Not started");
}

#[test]
fn flatlet_run_restores_a_snapshot_from_the_command_line() {
    if !kvm_or_skip("flatlet_run_restores_a_snapshot_from_the_command_line") {
        return;
    }
    let (_src, state, mem) = snapshot_after_heartbeat("snapshot-cli-src", 2);

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flatlet"))
        .arg("run")
        .arg("--snapshot")
        .arg(&state)
        .arg("--mem")
        .arg(&mem)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let console = common::vmm::collect(child.stdout.take().unwrap());
    let log = common::vmm::collect(child.stderr.take().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !console.lock().unwrap().contains("flatlet-guest: heartbeat 3") {
        assert!(
            std::time::Instant::now() < deadline,
            "no heartbeat 3 on the console: {}\nlog: {}",
            console.lock().unwrap(),
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143));
    assert!(!console.lock().unwrap().contains("heartbeat 1"));

    // A bad state file, or options that describe another VM, are refused.
    let bad = state.with_file_name("bad.state");
    std::fs::write(&bad, b"FLATSNAP").unwrap();
    let mut cmd = common::flatlet();
    cmd.arg("run").arg("--snapshot").arg(&bad).arg("--mem").arg(&mem);
    let out = common::run(cmd, Duration::from_secs(10));
    out.check(out.code() == Some(2), "exit 2 for a truncated state file");
    out.check(out.stderr.contains("truncated"), "says why");
    let mut cmd = common::flatlet();
    cmd.arg("run")
        .arg("--snapshot")
        .arg(&state)
        .arg("--mem")
        .arg(&mem);
    cmd.args(["--vcpus", "2"]);
    let out = common::run(cmd, Duration::from_secs(10));
    out.check(out.code() == Some(2), "exit 2 for --vcpus with --snapshot");
}

/// The bytes of memory the last snapshot wrote, from flatlet's log.
fn memory_written(vmm: &Vmm) -> u64 {
    let log = vmm.log.lock().unwrap().clone();
    log.lines()
        .rev()
        .find_map(|l| {
            let at = l.find("memory ")?;
            l[at + 7..].strip_suffix(" bytes written")?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no snapshot line in the log:\n{log}"))
}

#[test]
fn two_diffs_on_one_base_restore_to_the_state_of_the_last() {
    if !kvm_or_skip("two_diffs_on_one_base_restore_to_the_state_of_the_last") {
        return;
    }
    let mut src = Vmm::start("snapshot-diff-src");
    let mem = src.sock.with_file_name("vm.mem");
    src.ok(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": true}"#),
    );
    src.put_boot("console=ttyS0 flatlet.stay");
    src.instance_start();
    let mut states = Vec::new();
    for (n, kind) in [(1, "Full"), (2, "Diff"), (3, "Diff")] {
        src.wait_console(&format!("flatlet-guest: heartbeat {n}"), Duration::from_secs(30));
        src.ok("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
        let state = src.sock.with_file_name(format!("vm{n}.state"));
        src.ok(
            "PUT",
            "/snapshot/create",
            Some(&format!(
                r#"{{"snapshot_type": "{kind}", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
                state.display(),
                mem.display()
            )),
        );
        states.push((state, memory_written(&src)));
        assert_eq!(src.heartbeats(), n, "paused right after heartbeat {n}");
        src.ok("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    }
    src.child.kill().unwrap();
    src.child.wait().unwrap();
    let (full, diff) = (states[0].1, states[2].1);
    eprintln!(
        "memory written: Full {full} bytes, Diffs {} and {diff} bytes",
        states[1].1
    );
    assert!(
        diff > 0 && diff < full / 4,
        "a Diff writes what changed ({diff} bytes), far less than the Full ({full} bytes)"
    );
    // The file now holds the memory of the last Diff: its state goes on
    // from heartbeat 3.
    let dst = Vmm::start("snapshot-diff-dst");
    dst.ok(
        "PUT",
        "/snapshot/load",
        Some(&load_body(&states[2].0, &mem, r#", "resume_vm": true"#)),
    );
    dst.wait_console("flatlet-guest: heartbeat 4", Duration::from_secs(30));
    let console = dst.console.lock().unwrap().clone();
    assert!(!console.contains("heartbeat 2"), "{console}");
    assert!(!console.contains("heartbeat 3"), "{console}");
    // A Diff needs tracking: a VM loaded without it cannot take one.
    dst.ok("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    dst.fault(
        "PUT",
        "/snapshot/create",
        Some(&format!(
            r#"{{"snapshot_type": "Diff", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            dst.sock.with_file_name("x.state").display(),
            mem.display()
        )),
        "need dirty page tracking",
    );
}

/// A vsock connection to `port` through the host socket `uds`, past the
/// `OK` line.
fn vsock_connect(uds: &std::path::Path, port: u32) -> std::os::unix::net::UnixStream {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(&s).read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "{line:?}");
    s
}

fn echo_line(s: &mut std::os::unix::net::UnixStream, text: &str) {
    use std::io::{Read, Write};
    s.write_all(text.as_bytes()).unwrap();
    let mut got = vec![0u8; text.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(String::from_utf8(got).unwrap(), text);
}

#[test]
fn a_restored_vsock_device_serves_new_connections_on_its_override_socket() {
    if !kvm_or_skip("a_restored_vsock_device_serves_new_connections_on_its_override_socket") {
        return;
    }
    let mut src = Vmm::start("snapshot-vsock-src");
    let uds = src.sock.with_file_name("v.sock");
    src.ok(
        "PUT",
        "/vsock",
        Some(&format!(r#"{{"guest_cid": 3, "uds_path": "{}"}}"#, uds.display())),
    );
    src.put_boot("console=ttyS0 flatlet.stay flatlet.vsock=echo:5000");
    src.instance_start();
    src.wait_console("vsock: echo on port 5000", Duration::from_secs(30));
    // A connection open across the snapshot: it ends with the source.
    let mut before = vsock_connect(&uds, 5000);
    echo_line(&mut before, "before the snapshot\n");
    let (state, mem) = pause_and_snapshot(&src);
    src.child.kill().unwrap();
    src.child.wait().unwrap();

    let dst = Vmm::start("snapshot-vsock-dst");
    let new_uds = dst.sock.with_file_name("clone.sock");
    dst.fault(
        "PUT",
        "/snapshot/load",
        Some(&load_body(&state, &mem, r#", "huge_pages": "2M""#)),
        "Uffd",
    );
    dst.ok(
        "PUT",
        "/snapshot/load",
        Some(&load_body(
            &state,
            &mem,
            &format!(
                r#", "resume_vm": true, "vsock_override": {{"uds_path": "{}"}}"#,
                new_uds.display()
            ),
        )),
    );
    // The device tells the driver its old connections are gone (the new
    // flatlet's first host port is the old connection's: without the
    // reset, the guest would take the new connection for the old one).
    dst.wait_console("vsock: transport reset", Duration::from_secs(10));
    let mut after = vsock_connect(&new_uds, 5000);
    echo_line(&mut after, "after the restore\n");
    let config: serde_json::Value = serde_json::from_str(&dst.ok("GET", "/vm/config", None).body).unwrap();
    assert_eq!(config["vsock"]["uds_path"], new_uds.display().to_string());
}

#[test]
fn a_placeholder_drive_is_pointed_at_another_image_after_restore() {
    if !kvm_or_skip("a_placeholder_drive_is_pointed_at_another_image_after_restore") {
        return;
    }
    // A template VM with a placeholder drive (what a container runtime
    // keeps), restored and then given the real image with PATCH /drives.
    let mut src = Vmm::start("snapshot-placeholder-src");
    let placeholder = src.sock.with_file_name("placeholder.img");
    std::fs::write(&placeholder, vec![0u8; 64 << 10]).unwrap();
    src.put_boot("console=ttyS0 flatlet.stay flatlet.beatio");
    src.put_drive("work", &placeholder);
    src.instance_start();
    src.wait_console(
        "flatlet-guest: blk: heartbeat 1 read: flatlet-guest-was-here",
        Duration::from_secs(30),
    );
    let (state, mem) = pause_and_snapshot(&src);
    src.child.kill().unwrap();
    src.child.wait().unwrap();

    let dst = Vmm::start("snapshot-placeholder-dst");
    let real = dst.sock.with_file_name("real.img");
    let mut image = vec![0u8; 1 << 20];
    image[512..534].copy_from_slice(b"the-containers-rootfs!");
    std::fs::write(&real, &image).unwrap();
    dst.ok("PUT", "/snapshot/load", Some(&load_body(&state, &mem, "")));
    dst.ok(
        "PATCH",
        "/drives/work",
        Some(&format!(
            r#"{{"drive_id": "work", "path_on_host": "{}"}}"#,
            real.display()
        )),
    );
    dst.ok("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    dst.wait_console("read: the-containers-rootfs!", Duration::from_secs(30));
    let console = dst.console.lock().unwrap().clone();
    assert!(
        !console.contains("read: flatlet-guest-was-here"),
        "no read of the placeholder after the restore: {console}"
    );
}

#[test]
fn vms_on_kvms_irqchip_are_saved_and_restored_too() {
    if !kvm_or_skip("vms_on_kvms_irqchip_are_saved_and_restored_too") {
        return;
    }
    for mode in ["full", "full-pit"] {
        let mut src = Vmm::start(&format!("snapshot-{mode}-src"));
        src.ok(
            "PUT",
            "/machine-config",
            Some(&format!(
                r#"{{"vcpu_count": 2, "mem_size_mib": 64, "irqchip": "{mode}"}}"#
            )),
        );
        src.put_boot("console=ttyS0 flatlet.stay");
        src.instance_start();
        src.wait_console("flatlet-guest: heartbeat 2", Duration::from_secs(30));
        let (state, mem) = pause_and_snapshot(&src);
        src.child.kill().unwrap();
        src.child.wait().unwrap();
        let dst = Vmm::start(&format!("snapshot-{mode}-dst"));
        dst.ok(
            "PUT",
            "/snapshot/load",
            Some(&load_body(&state, &mem, r#", "resume_vm": true"#)),
        );
        dst.wait_console("flatlet-guest: heartbeat 3", Duration::from_secs(30));
        let config: serde_json::Value =
            serde_json::from_str(&dst.ok("GET", "/vm/config", None).body).unwrap();
        assert_eq!(config["machine-config"]["irqchip"], mode);
        // Its timer interrupts go on (KVM's local APIC, restored), and the
        // keyboard's reaches it through KVM's restored I/O APIC.
        dst.wait_console("flatlet-guest: heartbeat 4", Duration::from_secs(30));
        let mut dst = dst;
        dst.ok("PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#));
        let code = dst.wait_exit(Duration::from_secs(10));
        assert_eq!(code, Some(0), "{mode}: {}", dst.console.lock().unwrap());
    }
}

/// The numbers of the complete `flood N` lines on a console.
fn flood_numbers(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| {
            l.strip_prefix("flatlet-guest: flood ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn a_flooding_guest_is_snapshotted_while_clients_hammer_the_api() {
    if !kvm_or_skip("a_flooding_guest_is_snapshotted_while_clients_hammer_the_api") {
        return;
    }
    let mut src = Vmm::start("snapshot-flood-src");
    src.put_boot("console=ttyS0 flatlet.flood");
    src.instance_start();
    src.wait_console("flatlet-guest: flood 100 ", Duration::from_secs(30));
    src.ok("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    let state = src.sock.with_file_name("vm.state");
    let mem = src.sock.with_file_name("vm.mem");
    let body = |state: &std::path::Path| {
        format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            state.display(),
            mem.display()
        )
    };
    // A path the host cannot write: refused, and the VM is left paused,
    // ready for another try.
    let nowhere = src.sock.with_file_name("no/such/dir/../vm.state");
    src.fault("PUT", "/snapshot/create", Some(&body(&nowhere)), "snapshot file");
    let info: serde_json::Value = serde_json::from_str(&src.ok("GET", "/", None).body).unwrap();
    assert_eq!(info["state"], "Paused");
    // Eight clients keep the API busy while the snapshot is written.
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let clients: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let mut answered = 0u32;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        assert_eq!(src.call("GET", "/", None).status, 200);
                        answered += 1;
                    }
                    answered
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(src.ok("PUT", "/snapshot/create", Some(&body(&state))).status, 204);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for c in clients {
            assert!(c.join().unwrap() > 0, "every client was answered");
        }
    });
    let before = *flood_numbers(&src.console.lock().unwrap()).last().unwrap();
    src.child.kill().unwrap();
    src.child.wait().unwrap();

    // The restored guest floods on from where it was, not from 1.
    let dst = Vmm::start("snapshot-flood-dst");
    dst.ok(
        "PUT",
        "/snapshot/load",
        Some(&load_body(&state, &mem, r#", "resume_vm": true"#)),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let after = loop {
        if let Some(n) = flood_numbers(&dst.console.lock().unwrap()).first() {
            break *n;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the restored guest printed nothing"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        after >= before,
        "flood {after} after the restore, {before} before"
    );
    assert!(!dst.console.lock().unwrap().contains("booting"));
}
