//! Builds the test guest (C and assembly under `guest/`) into a static ELF
//! with the host's C compiler, for `src/lib.rs` to embed.

// A build script reports failure by panicking, with the reason.
#![allow(clippy::expect_used, clippy::panic)]

use std::env;
use std::path::PathBuf;
use std::process::Command;

const SOURCES: &[&str] = &[
    "entry.S",
    "main.c",
    "options.c",
    "stay.c",
    "virtio.c",
    "vsock.c",
    "console.c",
    "lib.c",
];
const HEADERS: &[&str] = &["guest.h", "guest_main.h", "link.ld"];

/// Flags that keep the guest to general-purpose instructions: ring 0 runs
/// under an instruction emulator on nested hosts, which lacks SSE, xsave,
/// cmpxchg16b and popcnt.
const CFLAGS: &[&str] = &[
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-ffreestanding",
    "-fno-builtin",
    "-fno-tree-loop-distribute-patterns",
    "-fno-stack-protector",
    "-fno-pic",
    "-fno-pie",
    "-fno-asynchronous-unwind-tables",
    "-fno-zero-initialized-in-bss",
    "-fcf-protection=none",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-march=x86-64",
    "-mcmodel=small",
    "--param=min-pagesize=0",
];

fn main() {
    let src =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("guest");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cc = env::var("FLATLET_GUEST_CC").unwrap_or_else(|_| "cc".to_string());

    for f in SOURCES.iter().chain(HEADERS) {
        println!("cargo:rerun-if-changed=guest/{f}");
    }
    println!("cargo:rerun-if-env-changed=FLATLET_GUEST_CC");

    let elf = out.join("flatlet-guest.elf");
    let mut cmd = Command::new(&cc);
    cmd.args(CFLAGS)
        .args(["-nostdlib", "-static", "-no-pie"])
        .arg(format!("-Wl,-T,{}", src.join("link.ld").display()))
        .args([
            "-Wl,--build-id=none",
            "-Wl,-z,noexecstack",
            "-Wl,-z,max-page-size=4096",
        ])
        .arg("-o")
        .arg(&elf)
        .args(SOURCES.iter().map(|f| src.join(f)));
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}` to build the test guest: {e}"));
    assert!(status.success(), "building the test guest failed: {cmd:?}");
}
