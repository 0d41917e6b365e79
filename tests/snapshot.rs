//! Snapshots through the real binary: `PUT /snapshot/create` on a paused
//! test guest writes a valid state file and a sparse memory file, and the
//! state errors Firecracker gives.
//!
//! Loading (`PUT /snapshot/load`) is not served yet: the next step adds it
//! and the heartbeat-3-after-restore test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::kvm_or_skip;
use common::vmm::Vmm;

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
    vmm.ok(
        "PUT",
        "/boot-source",
        Some(&vmm.boot_source("console=ttyS0 flatlet.stay")),
    );
    vmm.ok("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
    vmm.wait_console("flatlet-guest: heartbeat 2", Duration::from_secs(30));
    vmm.fault("PUT", "/snapshot/create", Some(&body), "pause it first");
    vmm.ok("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    vmm.fault(
        "PUT",
        "/snapshot/create",
        Some(&body.replace("Full", "Diff")),
        "Diff snapshots are not supported yet",
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
    src.ok(
        "PUT",
        "/boot-source",
        Some(&src.boot_source("console=ttyS0 flatlet.stay")),
    );
    src.ok("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
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
    let paused_load = load.replace(r#", "resume_vm": true"#, "");
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
    vmm.fault(
        "PUT",
        "/snapshot/load",
        Some(&load.replace("}", r#", "track_dirty_pages": true}"#)),
        "not supported yet",
    );
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
