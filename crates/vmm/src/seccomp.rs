//! seccomp filters: each of flatlet's threads allows only the system calls
//! (and, for `ioctl`, the requests) it needs, and a forbidden call kills
//! the process. The policy is `resources/seccomp/x86_64.json`, in
//! seccompiler's JSON form, compiled when flatlet starts.
//!
//! Threads inherit their creator's filter: vCPU threads (and the fast-path
//! thread) are made by the VMM thread, so the VMM policy also allows what
//! vCPU threads do, and a vCPU thread adds its own, narrower filter on top.
//!
//! Once the VM is built the VMM thread adds the runtime filter
//! (`vmm_run`) on top of its own: it makes no more threads, KVM objects,
//! devices or filters, so none of those calls stay open to it, and it may
//! open files only with the exact flags of the runtime requests (`PATCH
//! /drives`, `PUT /logger`, `PUT /metrics`).

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{BpfProgram, sock_filter};

/// The policy, as shipped.
pub const POLICY_JSON: &str = include_str!("../../../resources/seccomp/x86_64.json");

static ENABLED: AtomicBool = AtomicBool::new(true);
static FILTERS: OnceLock<Result<HashMap<String, BpfProgram>, String>> = OnceLock::new();

/// Which filter a thread gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The VMM thread (event loop, controller, device queues).
    Vmm,
    /// The API thread.
    Api,
    /// A vCPU thread.
    Vcpu,
    /// The VMM thread once the VM is built (added on top of `Vmm`).
    VmmRuntime,
}

impl ThreadKind {
    /// The filter's name in the policy.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::VmmRuntime => "vmm_run",
        }
    }
}

/// Errors of seccomp set-up.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The policy does not compile.
    #[error("the seccomp policy does not compile: {0}")]
    Compile(String),
    /// The policy lacks a thread's filter.
    #[error("the seccomp policy has no filter {0:?}")]
    Missing(&'static str),
    /// The kernel refused the filter.
    #[error("cannot install the {0} seccomp filter: {1}")]
    Install(&'static str, String),
}

/// Turns filtering off (`--no-seccomp`, for debugging).
pub fn disable() {
    ENABLED.store(false, Ordering::SeqCst);
}

/// Whether filters are installed.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// The policy, compiled to BPF by build.rs.
const COMPILED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_filters.bin"));
/// The filters in COMPILED, in order.
const ORDER: [ThreadKind; 4] = [
    ThreadKind::Vmm,
    ThreadKind::Api,
    ThreadKind::Vcpu,
    ThreadKind::VmmRuntime,
];

/// Reads the filters build.rs compiled.
fn decode(mut bytes: &[u8]) -> Result<HashMap<String, BpfProgram>, String> {
    let mut take = |n: usize| -> Result<&[u8], String> {
        if bytes.len() < n {
            return Err("the compiled seccomp filters are truncated".into());
        }
        let (head, rest) = bytes.split_at(n);
        bytes = rest;
        Ok(head)
    };
    let mut map = HashMap::new();
    for kind in ORDER {
        let c = take(4)?;
        let count = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize;
        let mut prog = Vec::with_capacity(count);
        for _ in 0..count {
            let i = take(8)?;
            prog.push(sock_filter {
                code: u16::from_le_bytes([i[0], i[1]]),
                jt: i[2],
                jf: i[3],
                k: u32::from_le_bytes([i[4], i[5], i[6], i[7]]),
            });
        }
        map.insert(kind.name().to_string(), prog);
    }
    if !bytes.is_empty() {
        return Err("the compiled seccomp filters have trailing bytes".into());
    }
    Ok(map)
}

fn filters() -> Result<&'static HashMap<String, BpfProgram>, SeccompError> {
    FILTERS
        .get_or_init(|| decode(COMPILED))
        .as_ref()
        .map_err(|e| SeccompError::Compile(e.clone()))
}

/// Loads the filters (once), so that a thread installing its filter later
/// does no work but the installation.
pub fn prepare() -> Result<(), SeccompError> {
    if enabled() { filters().map(|_| ()) } else { Ok(()) }
}

/// Installs `kind`'s filter on the calling thread (unless disabled).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    if !enabled() {
        return Ok(());
    }
    let filter = filters()?
        .get(kind.name())
        .ok_or(SeccompError::Missing(kind.name()))?;
    seccompiler::apply_filter(filter).map_err(|e| SeccompError::Install(kind.name(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a classic BPF program on `data` (a `struct seccomp_data`), as
    /// the kernel would; only the instructions seccomp filters here use.
    /// Returns the action and the number of instructions run.
    fn run(prog: &[sock_filter], data: &[u8; 64]) -> Result<(u32, usize), String> {
        let mut a: u32 = 0;
        let mut pc = 0usize;
        for steps in 1.. {
            let i = prog.get(pc).ok_or(format!("pc {pc} past the end"))?;
            pc += 1;
            let skip = |cond: bool| usize::from(if cond { i.jt } else { i.jf });
            match i.code {
                0x20 => {
                    let at = i.k as usize;
                    let w = data.get(at..at + 4).ok_or(format!("load at {at}"))?;
                    a = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                }
                0x05 => pc += i.k as usize,
                0x15 => pc += skip(a == i.k),
                0x35 => pc += skip(a >= i.k),
                0x25 => pc += skip(a > i.k),
                0x45 => pc += skip(a & i.k != 0),
                0x54 => a &= i.k,
                0x06 => return Ok((i.k, steps)),
                code => return Err(format!("instruction {code:#x} at {}", pc - 1)),
            }
        }
        unreachable!("a BPF program only jumps forward")
    }

    #[test]
    fn the_built_filters_decide_as_the_policy() {
        // build.rs reshapes seccompiler's programs; they must still decide
        // every call as seccompiler's own program for the policy does.
        let built = filters().unwrap();
        let fresh =
            seccompiler::compile_from_json(POLICY_JSON.as_bytes(), seccompiler::TargetArch::x86_64).unwrap();
        for k in ORDER {
            let (ours, theirs) = (&built[k.name()], &fresh[k.name()]);
            // Every constant the program compares with, and its neighbours.
            let mut values = vec![0u32, 1, u32::MAX];
            for i in theirs.iter().filter(|i| i.code == 0x15) {
                values.extend([i.k, i.k.wrapping_add(1), i.k.wrapping_sub(1)]);
            }
            values.sort_unstable();
            values.dedup();
            let mut checked = 0u32;
            let mut check = |d: &[u8; 64], what: &dyn Fn() -> String| {
                let (a, b) = (run(ours, d).map(|r| r.0), run(theirs, d).map(|r| r.0));
                assert_eq!(a, b, "{}: {}", k.name(), what());
                checked += 1;
            };
            for arch in [0xc000_003e_u32, 0x4000_0003] {
                for nr in (0..512u32).chain([0x4000_0000, 0x4000_0010, u32::MAX]) {
                    let mut data = [0u8; 64];
                    data[..4].copy_from_slice(&nr.to_le_bytes());
                    data[4..8].copy_from_slice(&arch.to_le_bytes());
                    check(&data, &|| format!("nr {nr} arch {arch:#x}"));
                    // Where the number decides nothing alone, each argument
                    // word in turn takes each value.
                    if !values.contains(&nr) {
                        continue;
                    }
                    for word in (16..64).step_by(4) {
                        for &v in &values {
                            let mut d = data;
                            d[word..word + 4].copy_from_slice(&v.to_le_bytes());
                            check(&d, &|| format!("nr {nr} arch {arch:#x} word {word} = {v:#x}"));
                        }
                    }
                }
            }
            assert!(checked > 10_000);
            // The reshaping is what makes installation cheap: deciding a
            // call the policy does not list takes a few steps, not one per
            // listed syscall.
            let mut unlisted = [0u8; 64];
            unlisted[..4].copy_from_slice(&511u32.to_le_bytes());
            unlisted[4..8].copy_from_slice(&0xc000_003e_u32.to_le_bytes());
            let (ours_steps, theirs_steps) =
                (run(ours, &unlisted).unwrap().1, run(theirs, &unlisted).unwrap().1);
            assert!(
                ours_steps * 3 < theirs_steps,
                "{}: {ours_steps} vs {theirs_steps}",
                k.name()
            );
        }
        assert!(decode(&COMPILED[..COMPILED.len() - 1]).is_err(), "truncated");
    }

    #[test]
    fn the_vmm_policy_allows_what_vcpu_threads_do() {
        // vCPU threads inherit the VMM thread's filter: a call their own
        // filter allows but the VMM's does not still kills the process (as
        // KVM_GET_FPU did, in the fwait recovery, before this test).
        let policy: serde_json::Value = serde_json::from_str(POLICY_JSON).unwrap();
        // A rule without its comments (on the rule and on its arguments).
        fn bare(rule: &serde_json::Value) -> serde_json::Value {
            let mut rule = rule.clone();
            if let Some(r) = rule.as_object_mut() {
                r.remove("comment");
                for arg in r
                    .get_mut("args")
                    .and_then(|a| a.as_array_mut())
                    .into_iter()
                    .flatten()
                {
                    arg.as_object_mut().map(|a| a.remove("comment"));
                }
            }
            rule
        }
        let rules = |thread: &str| -> Vec<serde_json::Value> {
            policy[thread]["filter"]
                .as_array()
                .unwrap()
                .iter()
                .map(bare)
                .collect()
        };
        let vmm = rules("vmm");
        let vcpu = rules("vcpu");
        assert!(vcpu.len() > 10);
        for rule in &vcpu {
            assert!(
                vmm.contains(rule),
                "the vCPU rule {rule} is missing from the VMM policy"
            );
        }
    }

    #[test]
    fn allowed_calls_go_through() {
        // A vCPU thread writes eventfds and reads the process CPU time.
        let evt = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let theirs = evt.try_clone().unwrap();
        let ok = std::thread::spawn(move || {
            install(ThreadKind::Vcpu).unwrap();
            let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID);
            theirs.write(1).is_ok() && t.is_ok()
        })
        .join()
        .unwrap();
        assert!(ok);
        assert_eq!(evt.read().unwrap(), 1);
    }

    const CHILD: &str = "FLATLET_SECCOMP_TEST_CHILD";

    /// The child side: a thread installs the filter, then opens a socket,
    /// which no filter allows.
    fn forbidden_call_in_child(kind: &str) -> ! {
        let kind = kind.to_string();
        let _ = std::thread::spawn(move || match kind.as_str() {
            // The runtime filter, on the VMM's: no new thread, and no open
            // with flags other than the runtime requests'.
            "vmm_run_thread" | "vmm_run_open" => {
                install(ThreadKind::Vmm).unwrap();
                install(ThreadKind::VmmRuntime).unwrap();
                if kind == "vmm_run_thread" {
                    let _ = std::thread::spawn(|| ()).join();
                } else {
                    let _ = std::fs::File::open("/proc/self/status");
                }
            }
            _ => {
                install(match kind.as_str() {
                    "vcpu" => ThreadKind::Vcpu,
                    "api" => ThreadKind::Api,
                    _ => ThreadKind::Vmm,
                })
                .unwrap();
                let _ = std::net::UdpSocket::bind("127.0.0.1:0");
            }
        })
        .join();
        // Reached only if the filter let the call through.
        std::process::exit(42);
    }

    #[test]
    fn a_forbidden_call_kills_the_process() {
        if let Ok(kind) = std::env::var(CHILD) {
            forbidden_call_in_child(&kind);
        }
        use std::os::unix::process::ExitStatusExt;
        for kind in ["vcpu", "api", "vmm", "vmm_run_thread", "vmm_run_open"] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "seccomp::tests::a_forbidden_call_kills_the_process",
                    "--test-threads=1",
                ])
                .env(CHILD, kind)
                .output()
                .unwrap();
            assert_eq!(
                out.status.signal(),
                Some(libc::SIGSYS),
                "{kind}: {:?}",
                out.status
            );
        }
    }
}
