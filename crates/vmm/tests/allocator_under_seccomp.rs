//! The allocator under every thread's seccomp filter: threads of each kind
//! make glibc's malloc grow and give memory back, many times over, and the
//! process must not be killed.
//!
//! glibc trimmed per-thread heaps by opening
//! `/proc/sys/vm/overcommit_memory`, which no filter allows: two large API
//! requests at once killed flatlet with SIGSYS. `single_malloc_arena`
//! (called first thing in flatlet's main) keeps every thread on the main
//! arena. Set `FLATLET_ALLOC_TEST_UNFIXED=1` to watch the test fail without
//! it.
//!
//! No libtest harness: the set-up must come before any other thread, and
//! libtest runs each test on a thread of its own.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use flatlet_vmm::seccomp::{ThreadKind, install};

const CHILD: &str = "FLATLET_ALLOC_TEST_CHILD";

/// Threads of each kind, under their filters, churn the allocator.
fn churn() -> ! {
    if std::env::var_os("FLATLET_ALLOC_TEST_UNFIXED").is_none() {
        assert!(flatlet_vmm::sys::single_malloc_arena());
    }
    let threads: Vec<_> = [ThreadKind::Vcpu, ThreadKind::Api, ThreadKind::Vmm]
        .into_iter()
        .cycle()
        .take(6)
        .map(|kind| {
            std::thread::spawn(move || {
                install(kind).unwrap();
                let mut seed = 0x9e37_79b9_u32 ^ kind as u32;
                for round in 0..200usize {
                    // Blocks of many sizes, under and over the mmap
                    // threshold, kept and freed out of order: the heap
                    // grows, then is trimmed.
                    let mut kept: Vec<Vec<u8>> = Vec::new();
                    for _ in 0..64 {
                        seed ^= seed << 13;
                        seed ^= seed >> 17;
                        seed ^= seed << 5;
                        let size = 1 + (seed as usize % (256 << 10));
                        kept.push(vec![round as u8; size]);
                        if seed % 3 == 0 && !kept.is_empty() {
                            let at = seed as usize % kept.len();
                            kept.swap_remove(at);
                        }
                    }
                    std::hint::black_box(&kept);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    std::process::exit(0)
}

fn main() {
    if std::env::var_os(CHILD).is_some() {
        churn();
    }
    // Several children: which thread trims first varies from run to run.
    let mut failed = 0;
    for _ in 0..5 {
        let status = Command::new(std::env::current_exe().unwrap())
            .env(CHILD, "1")
            .status()
            .unwrap();
        if status.code() != Some(0) {
            eprintln!(
                "allocator churn under the filters: {status:?} (signal {:?})",
                status.signal()
            );
            failed += 1;
        }
    }
    println!(
        "test allocator_under_seccomp ... {}",
        if failed == 0 { "ok" } else { "FAILED" }
    );
    println!("{} passed, {failed} failed", 5 - failed);
    if failed > 0 {
        std::process::exit(1);
    }
}
