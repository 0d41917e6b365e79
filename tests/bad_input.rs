//! Every kind of bad input gives a clear error and its exit code, and
//! never a panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{TempDir, flatlet, run};

const LIMIT: Duration = Duration::from_secs(30);

/// Runs flatlet with `args`, and checks the exit code and that stderr
/// says `needle` (and nothing panicked).
fn expect_error(args: &[&str], code: i32, needle: &str) {
    let mut cmd = flatlet();
    cmd.args(args);
    let out = run(cmd, LIMIT);
    out.check(out.code() == Some(code), &format!("{args:?}: exit code {code}"));
    out.check(
        out.stderr.contains(needle),
        &format!("{args:?}: stderr mentions {needle:?}"),
    );
    out.check(!out.stderr.contains("panicked"), "no panic");
    out.check(out.stdout.is_empty(), "no guest ran");
}

#[test]
fn missing_or_unreadable_kernel() {
    expect_error(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        2,
        "cannot read kernel /nonexistent/vmlinux",
    );
    expect_error(&["run", "--kernel", "/"], 2, "not a regular file");
    expect_error(
        &["run", "--initrd", "/nonexistent/initrd"],
        2,
        "cannot read initrd",
    );
}

#[test]
fn files_that_are_not_kernels() {
    let dir = TempDir::new("notkernel");
    let text = dir.path("notes.txt");
    std::fs::write(&text, "hello, I am not a kernel\n").unwrap();
    let empty = dir.path("empty");
    std::fs::write(&empty, "").unwrap();
    // A 32-bit ELF.
    let elf32 = dir.path("elf32");
    let mut b = vec![0u8; 64];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 1;
    std::fs::write(&elf32, &b).unwrap();
    if !common::kvm_or_skip("files_that_are_not_kernels") {
        return;
    }
    expect_error(&["run", "--kernel", text.to_str().unwrap()], 2, "is not a kernel");
    expect_error(
        &["run", "--kernel", empty.to_str().unwrap()],
        2,
        "is not a kernel",
    );
    expect_error(
        &["run", "--kernel", elf32.to_str().unwrap()],
        2,
        "not an x86-64 kernel",
    );
}

#[test]
fn vcpu_count_limits() {
    expect_error(&["run", "--vcpus", "0"], 2, "invalid vCPU count 0");
    expect_error(&["run", "--vcpus", "33"], 2, "invalid vCPU count 33");
    expect_error(&["run", "--vcpus", "100000"], 2, "invalid vCPU count 100000");
    expect_error(&["run", "--vcpus", "two"], 2, "invalid value 'two'");
}

#[test]
fn memory_limits() {
    expect_error(&["run", "--mem-mib", "4"], 2, "too small");
    expect_error(&["run", "--mem-mib", "0"], 2, "too small");
    expect_error(&["run", "--mem-mib", "100000000"], 2, "more than this host has");
}

#[test]
fn command_line_over_the_limit() {
    let long = format!("console=ttyS0 {}", "x".repeat(2100));
    expect_error(&["run", "--cmdline", &long], 2, "the limit is 2047 bytes");
}

#[test]
fn bad_config_files() {
    let dir = TempDir::new("badconfig");
    let cases = [
        ("syntax.json", "{ not json", "config file"),
        (
            "unknown.json",
            r#"{"boot-source": {"kernel_image_path": "/k"}, "gpu": {}}"#,
            "unknown field `gpu`",
        ),
        (
            "nokernel.json",
            r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}"#,
            "boot-source",
        ),
        (
            "balloon.json",
            r#"{"boot-source": {"kernel_image_path": "/k"}, "balloon": {}}"#,
            "\"balloon\" is not supported",
        ),
        (
            "badfield.json",
            r#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "x": 1}}"#,
            "unknown field `x`",
        ),
    ];
    for (name, text, needle) in cases {
        let p = dir.path(name);
        std::fs::write(&p, text).unwrap();
        expect_error(&["run", "--config-file", p.to_str().unwrap()], 2, needle);
    }
    expect_error(
        &["run", "--config-file", "/nonexistent.json"],
        2,
        "/nonexistent.json",
    );
    expect_error(&["--no-api"], 2, "--config-file");
}

#[test]
fn usage_errors() {
    expect_error(&["run", "--bogus"], 2, "unexpected argument");
    expect_error(&["run", "--irqchip", "pic"], 2, "unknown irqchip");
    // No arguments: as Firecracker, the API on its default socket
    // (tests/fc_compat.rs).
}

#[test]
fn guest_image_to_an_unwritable_place() {
    expect_error(
        &["guest-image", "--out", "/nonexistent/dir/guest.elf"],
        1,
        "cannot write",
    );
}

#[test]
fn help_lists_the_exit_codes() {
    let mut cmd = flatlet();
    cmd.args(["run", "--help"]);
    let out = run(cmd, LIMIT);
    out.check(out.code() == Some(0), "help exits 0");
    for needle in [
        "--kernel",
        "--vcpus",
        "--mem-mib",
        "--cmdline",
        "--config-file",
        "Exit codes",
        "guest crashed",
    ] {
        out.check(out.stdout.contains(needle), needle);
    }
}

#[test]
fn bad_drives() {
    expect_error(
        &["run", "--drive", "/nonexistent.img"],
        2,
        "cannot read drive /nonexistent.img",
    );
    expect_error(
        &["run", "--drive", "/etc/hostname,rw"],
        2,
        "unknown --drive option \"rw\"",
    );
    let dir = TempDir::new("drives");
    let a = dir.path("a.img");
    let b = dir.path("b.img");
    std::fs::write(&a, [0u8; 512]).unwrap();
    std::fs::write(&b, [0u8; 512]).unwrap();
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    expect_error(
        &[
            "run",
            "--drive",
            &format!("{a},root"),
            "--drive",
            &format!("{b},root"),
        ],
        2,
        "more than one drive is the root device",
    );
    expect_error(
        &[
            "run",
            "--drive",
            &format!("{a},id=x"),
            "--drive",
            &format!("{b},id=x"),
        ],
        2,
        "two drives have the id",
    );
    // A drive in a config file, with a Firecracker feature flatlet lacks.
    let cfg = dir.path("vm.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "/bin/true"}},
                "drives": [{{"drive_id": "d", "path_on_host": "{a}", "is_root_device": false, "io_engine": "Async"}}]}}"#
        ),
    )
    .unwrap();
    expect_error(
        &["run", "--config-file", cfg.to_str().unwrap()],
        2,
        "io_engine \"Async\" is not supported",
    );
}
