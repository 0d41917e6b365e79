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
