//! Compiles the seccomp policy (`resources/seccomp/x86_64.json`) to BPF at
//! build time, so that flatlet does not parse JSON at every start.
//!
//! Each program is then reshaped into a binary search on the syscall number
//! (see build/bpf_tree.rs: installing a linear filter costs Linux time in
//! proportion to its length, on every thread's start).
//!
//! Output: `seccomp_filters.bin` in OUT_DIR: for each filter, in the order
//! vmm, api, vcpu, vmm_run: a u32 instruction count, then each instruction as
//! code (u16), jt (u8), jf (u8), k (u32), little endian.

// A build script reports failure by panicking, with the reason.
#![allow(clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

#[path = "build/bpf_tree.rs"]
mod bpf_tree;

const FILTERS: [&str; 4] = ["vmm", "api", "vcpu", "vmm_run"];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let policy = manifest.join("../../resources/seccomp/x86_64.json");
    println!("cargo:rerun-if-changed={}", policy.display());
    println!("cargo:rerun-if-changed=build/bpf_tree.rs");
    let json = std::fs::read(&policy).unwrap_or_else(|e| panic!("{}: {e}", policy.display()));
    let mut filters = seccompiler::compile_from_json(json.as_slice(), seccompiler::TargetArch::x86_64)
        .unwrap_or_else(|e| panic!("{}: {e}", policy.display()));
    let mut out = Vec::new();
    for name in FILTERS {
        let prog = filters
            .remove(name)
            .unwrap_or_else(|| panic!("{}: no filter {name:?}", policy.display()));
        let prog = bpf_tree::reshape(&prog).unwrap_or_else(|e| panic!("filter {name:?}: {e}"));
        out.extend_from_slice(&(prog.len() as u32).to_le_bytes());
        for insn in prog {
            out.extend_from_slice(&insn.code.to_le_bytes());
            out.push(insn.jt);
            out.push(insn.jf);
            out.extend_from_slice(&insn.k.to_le_bytes());
        }
    }
    assert!(
        filters.is_empty(),
        "the policy has filters flatlet does not use: {:?}",
        filters.keys()
    );
    let dest =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("seccomp_filters.bin");
    std::fs::write(&dest, out).unwrap_or_else(|e| panic!("{}: {e}", dest.display()));
}
