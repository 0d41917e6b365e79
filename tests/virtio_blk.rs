//! virtio-blk end to end: the test guest reads sector 0 of a drive, writes a
//! marker into sector 1, and flushes; a read-only drive refuses writes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use common::{BOOT_LIMIT, TempDir, flatlet, kvm_or_skip, run};

const SECTOR0: [u8; 16] = [
    0xde, 0xad, 0xbe, 0xef, 0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xfe, 0xff,
];
const MARKER: &[u8] = b"flatlet-guest-was-here";

/// A 64 KiB image: SECTOR0 at the start, then 0x5a everywhere.
fn make_image(path: &Path) -> Vec<u8> {
    let mut bytes = vec![0x5au8; 64 * 1024];
    bytes[..16].copy_from_slice(&SECTOR0);
    std::fs::write(path, &bytes).unwrap();
    bytes
}

fn hex_line() -> String {
    let hex: Vec<String> = SECTOR0.iter().map(|b| format!("{b:02x}")).collect();
    format!("flatlet-guest: blk: sector 0: {}", hex.join(" "))
}

#[test]
fn guest_reads_sector_0_and_writes_sector_1() {
    if !kvm_or_skip("guest_reads_sector_0_and_writes_sector_1") {
        return;
    }
    let dir = TempDir::new("blk");
    let img = dir.path("disk.img");
    let before = make_image(&img);
    let mut cmd = flatlet();
    cmd.args(["run", "--drive"])
        .arg(format!("{},cache=writeback", img.display()));
    let out = run(cmd, BOOT_LIMIT);
    out.check(out.code() == Some(0), "exit 0");
    let lines = out.console_lines();
    out.check(lines.contains(&hex_line()), "the hex of sector 0");
    out.check(lines.contains(&"flatlet-guest: blk: ok".to_string()), "blk: ok");
    let after = std::fs::read(&img).unwrap();
    assert_eq!(
        &after[512..512 + MARKER.len()],
        MARKER,
        "the marker is in sector 1"
    );
    assert_eq!(
        &after[512 + MARKER.len()..1024],
        &before[512 + MARKER.len()..1024],
        "rest of sector 1 kept"
    );
    assert_eq!(&after[..512], &before[..512], "sector 0 unchanged");
    assert_eq!(&after[1024..], &before[1024..], "nothing else changed");
}

#[test]
fn read_only_drive_keeps_the_file_unchanged() {
    if !kvm_or_skip("read_only_drive_keeps_the_file_unchanged") {
        return;
    }
    let dir = TempDir::new("blk-ro");
    let img = dir.path("disk.img");
    let before = make_image(&img);
    // A polite guest sees VIRTIO_BLK_F_RO and does not write.
    let mut cmd = flatlet();
    cmd.args(["run", "--drive"]).arg(format!("{},ro", img.display()));
    let out = run(cmd, BOOT_LIMIT);
    out.check(out.code() == Some(0), "exit 0");
    out.check(out.console_lines().contains(&hex_line()), "reads still work");
    out.check(
        out.stdout.contains("blk: read-only drive, not writing"),
        "the guest saw RO",
    );
    // A guest that writes anyway gets an error status.
    let mut cmd = flatlet();
    cmd.args([
        "run",
        "--cmdline",
        "console=ttyS0 flatlet.blkwrite=force",
        "--drive",
    ])
    .arg(format!("{},ro", img.display()));
    let out = run(cmd, BOOT_LIMIT);
    out.check(out.code() == Some(0), "exit 0");
    out.check(
        out.stdout.contains("blk: write refused: status 1"),
        "VIRTIO_BLK_S_IOERR",
    );
    out.check(
        out.stderr.contains("write to a read-only drive refused"),
        "the VMM says why",
    );
    assert_eq!(std::fs::read(&img).unwrap(), before, "no write reached the file");
}

#[test]
fn root_drive_goes_first_on_the_command_line() {
    if !kvm_or_skip("root_drive_goes_first_on_the_command_line") {
        return;
    }
    let dir = TempDir::new("blk-root");
    let data = dir.path("data.img");
    let root = dir.path("root.img");
    std::fs::write(&data, vec![0u8; 4096]).unwrap();
    make_image(&root);
    let mut cmd = flatlet();
    cmd.args(["run", "--drive"])
        .arg(data.display().to_string())
        .arg("--drive")
        .arg(format!("{},root,ro", root.display()));
    let out = run(cmd, BOOT_LIMIT);
    out.check(out.code() == Some(0), "exit 0");
    out.check(
        out.stdout.contains(
            "virtio_mmio.device=4K@0xc0001000:5 virtio_mmio.device=4K@0xc0002000:6 root=/dev/vda ro",
        ),
        "two devices, then root=/dev/vda ro",
    );
    // The first device is the root drive: the guest reads its sector 0.
    out.check(
        out.console_lines().contains(&hex_line()),
        "the root drive is the first device",
    );
}
