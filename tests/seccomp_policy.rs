//! The seccomp policy against what flatlet really calls: workloads run
//! under strace with the filters on (a call the policy forbids would kill
//! flatlet), and every system call (and ioctl request) each thread makes
//! after its filter is in must be one its policy allows, while every rule
//! of the policy must be used by the workloads or be marked `rare:` with
//! the reason it is not.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{TempDir, kvm_or_skip};

/// (filter name, syscall) and (filter name, syscall, checked argument)
/// seen: the request of `ioctl`, the flags of `openat`.
#[derive(Default)]
struct Seen {
    calls: BTreeSet<(String, String)>,
    args: BTreeSet<(String, String, u64)>,
}

/// Which argument the policy checks for a call, if any.
fn checked_arg(call: &str) -> Option<usize> {
    match call {
        "ioctl" => Some(1),
        "openat" => Some(2),
        "socket" => Some(0),
        _ => None,
    }
}

/// Reads an strace log (`-f -X raw --decode-pids=comm`) into what each
/// filter saw: a thread's calls after its own `seccomp()` count for its
/// filter (vcpu or api), calls before it for the filter it inherited (the
/// VMM's, for threads the VMM thread made), and the main thread's calls
/// after its `seccomp()` for the VMM's.
fn analyse(log: &str, seen: &mut Seen) {
    let mut names: BTreeMap<&str, &str> = BTreeMap::new();
    let mut lines: Vec<(&str, &str)> = Vec::new();
    for l in log.lines() {
        let Some((tid, rest)) = l.split_once('<') else {
            continue;
        };
        let Some((comm, call)) = rest.split_once("> ") else {
            continue;
        };
        names.insert(tid, comm);
        lines.push((tid, call));
    }
    let main_tid = lines.first().map(|(t, _)| *t).unwrap_or_default();
    let mut installs: BTreeMap<&str, usize> = BTreeMap::new();
    // The main thread's second filter: the runtime one, once the VM is
    // built.
    let mut runtime_from = usize::MAX;
    for (i, (tid, call)) in lines.iter().enumerate() {
        if call.starts_with("seccomp(") {
            if installs.contains_key(tid) && *tid == main_tid {
                runtime_from = runtime_from.min(i);
            }
            installs.entry(tid).or_insert(i);
        }
    }
    for (i, (tid, call)) in lines.iter().enumerate() {
        if call.starts_with("<...") || call.starts_with("+++") || call.starts_with("---") {
            continue;
        }
        let Some(name) = call
            .split('(')
            .next()
            .filter(|n| n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        else {
            continue;
        };
        let comm = names[tid];
        let own = installs.get(tid).is_some_and(|&at| i > at);
        let filter = if comm.starts_with("fl_vcpu") {
            if own { "vcpu" } else { "vmm" }
        } else if comm == "fl_api" {
            if own { "api" } else { continue }
        } else if comm == "fl_fastpath" || (*tid == main_tid && own) {
            "vmm"
        } else {
            continue;
        };
        // The seccomp() call itself is made before the filter is in (the
        // runtime one under the VMM's filter).
        if name == "seccomp" && i == runtime_from {
            seen.calls.insert(("vmm".to_string(), name.to_string()));
            continue;
        }
        if name == "seccomp" && !comm.starts_with("fl_vcpu") {
            continue;
        }
        // A vCPU thread's own filter sits on the VMM's, which it
        // inherited: its calls pass through both.
        // Likewise the main thread's runtime filter, on top of the VMM's.
        let filters: &[&str] = if filter == "vcpu" {
            &["vcpu", "vmm"]
        } else if *tid == main_tid && i > runtime_from {
            &["vmm_run", "vmm"]
        } else {
            &[filter]
        };
        for f in filters {
            seen.calls.insert((f.to_string(), name.to_string()));
            if let Some(index) = checked_arg(name) {
                // `ioctl(fd, 0xae80, ...` (or `0xae80 <unfinished ...>`).
                let args = call.split_once('(').map_or("", |(_, a)| a);
                let arg = args.split(", ").nth(index).unwrap_or("");
                let req = arg
                    .split(|c: char| !(c.is_ascii_hexdigit() || c == 'x'))
                    .next()
                    .unwrap_or("");
                let n = req
                    .strip_prefix("0x")
                    .map(|h| u64::from_str_radix(h, 16))
                    .unwrap_or_else(|| req.parse());
                if let Ok(n) = n {
                    seen.args.insert((f.to_string(), name.to_string(), n));
                }
            }
        }
    }
}

fn strace_available() -> bool {
    Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn traced(log: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("strace");
    c.args(["-f", "-qq", "-X", "raw", "--decode-pids=comm", "-o"])
        .arg(log)
        .arg(env!("CARGO_BIN_EXE_flatlet"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn flatlet_api(sock: &Path, method: &str, path: &str, body: &str) {
    let r = flatlet_api::client::request(sock, method, path, Some(body)).unwrap();
    assert!(r.status < 300, "{method} {path}: {r:?}");
}

/// What made the allocator leave the filters: many connections at once
/// with maximum-size bodies, and idle connections that open and close.
fn api_stress(sock: &Path) {
    for _ in 0..3 {
        let idle: Vec<std::os::unix::net::UnixStream> = (0..20)
            .map(|_| std::os::unix::net::UnixStream::connect(sock).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        drop(idle);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let sock = sock.to_path_buf();
                std::thread::spawn(move || {
                    let mut body = r#"{"state": "Resumed"}"#.to_string();
                    body.push_str(&" ".repeat(51_200 - body.len()));
                    let r = flatlet_api::client::request(&sock, "PATCH", "/vm", Some(&body)).unwrap();
                    assert_eq!(r.status, 204, "{r:?}");
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}

/// Runs the workloads; returns the strace logs.
fn workloads(dir: &TempDir) -> Vec<String> {
    let img = dir.path("disk.img");
    std::fs::write(&img, vec![0u8; 64 * 1024]).unwrap();
    let guest = dir.path("guest.elf");
    std::fs::write(&guest, flatlet_guest::ELF).unwrap();
    let mut logs = Vec::new();
    // A TAP in a namespace of the test's own, for virtio-net.
    let ns = format!("flatlet-sc-{}", std::process::id());
    let ip = |args: &[&str]| Command::new("ip").args(args).status().is_ok_and(|s| s.success());
    let have_tap = ip(&["netns", "add", &ns])
        && ip(&["-n", &ns, "tuntap", "add", "dev", "sctap0", "mode", "tap"])
        && ip(&["-n", &ns, "link", "set", "sctap0", "up"]);
    assert!(have_tap, "network namespace and TAP for the net workload");
    let net_log = dir.path("net.log");
    let st = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "strace",
            "-f",
            "-qq",
            "-X",
            "raw",
            "--decode-pids=comm",
            "-o",
        ])
        .arg(&net_log)
        .arg(env!("CARGO_BIN_EXE_flatlet"))
        .args(["run", "--net", "sctap0,mac=06:00:00:00:00:01"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    let _ = ip(&["netns", "delete", &ns]);
    assert_eq!(st.code(), Some(0), "virtio-net under the filters");
    logs.push(std::fs::read_to_string(&net_log).unwrap());

    let mut run = |name: &str, args: Vec<String>| {
        let log = dir.path(name);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let st = traced(&log, &args).status().unwrap();
        logs.push(std::fs::read_to_string(&log).unwrap());
        st
    };
    let drive = format!("{},cache=writeback", img.display());
    let st = run(
        "boot.log",
        vec![
            "run",
            "--vcpus",
            "2",
            "--drive",
            &drive,
            "--cmdline",
            "console=ttyS0 flatlet.int3 flatlet.fwait",
        ]
        .into_iter()
        .map(String::from)
        .collect(),
    );
    assert_eq!(st.code(), Some(0), "boot with a drive under the filters");
    let st = run(
        "crash.log",
        ["run", "--cmdline", "console=ttyS0 flatlet.crash=emul"]
            .map(String::from)
            .to_vec(),
    );
    assert!(
        st.code().is_some(),
        "a guest crash is an exit, not a kill: {st:?}"
    );
    for mode in ["full", "full-pit"] {
        let st = run(
            &format!("{mode}.log"),
            ["run", "--vcpus", "2", "--irqchip", mode]
                .map(String::from)
                .to_vec(),
        );
        assert_eq!(st.code(), Some(0), "{mode} irqchip under the filters");
    }

    // vsock: the guest connects to a host listener, which first makes a
    // host-initiated connection of its own (the guest refuses it).
    let uds = dir.path("v.sock");
    let listener = std::os::unix::net::UnixListener::bind(format!("{}_5001", uds.display())).unwrap();
    let uds_host = uds.clone();
    let host = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let (s, _) = listener.accept().unwrap();
        let mut c = std::os::unix::net::UnixStream::connect(&uds_host).unwrap();
        c.write_all(b"CONNECT 5000\n").unwrap();
        let mut end = Vec::new();
        let _ = std::io::Read::read_to_end(&mut c, &mut end);
        let mut line = String::new();
        std::io::BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        (&s).write_all(b"ok\n").unwrap();
        line
    });
    let st = run(
        "vsock.log",
        vec![
            "run".to_string(),
            "--vsock".to_string(),
            format!("cid=3,uds={}", uds.display()),
            "--cmdline".to_string(),
            "console=ttyS0 flatlet.vsock=connect:5001".to_string(),
        ],
    );
    assert_eq!(st.code(), Some(0), "vsock under the filters");
    assert_eq!(host.join().unwrap(), "hello from flatlet vsock\n");

    // The API, with a guest that stays, pause/resume, metrics, a drive
    // swap, bad requests, and the end through Ctrl-Alt-Del.
    let sock = dir.path("api.sock");
    let api_log = dir.path("api.log");
    let mut child = traced(&api_log, &["--api-sock", sock.to_str().unwrap()])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while flatlet_api::client::request(&sock, "GET", "/", None).is_err() {
        assert!(std::time::Instant::now() < deadline, "API never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let metrics = dir.path("metrics.json");
    flatlet_api(
        &sock,
        "PUT",
        "/metrics",
        &format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()),
    );
    let logfile = dir.path("flatlet.log");
    flatlet_api(
        &sock,
        "PUT",
        "/logger",
        &format!(r#"{{"log_path": "{}"}}"#, logfile.display()),
    );
    flatlet_api(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 64}"#,
    );
    flatlet_api(
        &sock,
        "PUT",
        "/drives/d0",
        &format!(
            r#"{{"drive_id": "d0", "path_on_host": "{}", "is_root_device": false}}"#,
            img.display()
        ),
    );
    flatlet_api(
        &sock,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 flatlet.stay"}}"#,
            guest.display()
        ),
    );
    let ro_img = dir.path("ro.img");
    std::fs::write(&ro_img, vec![0u8; 64 * 1024]).unwrap();
    flatlet_api(
        &sock,
        "PUT",
        "/drives/d1",
        &format!(
            r#"{{"drive_id": "d1", "path_on_host": "{}", "is_root_device": false, "is_read_only": true}}"#,
            ro_img.display()
        ),
    );
    // The entropy device, limited so that its second read waits for the
    // limiter's timer.
    flatlet_api(
        &sock,
        "PUT",
        "/entropy",
        r#"{"rate_limiter": {"bandwidth": {"size": 16, "refill_time": 100}}}"#,
    );
    flatlet_api(&sock, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    std::thread::sleep(Duration::from_millis(1500));
    // The running VM's requests, under the runtime filter.
    flatlet_api(
        &sock,
        "PUT",
        "/logger",
        &format!(
            r#"{{"log_path": "{}", "level": "Debug"}}"#,
            dir.path("flatlet2.log").display()
        ),
    );
    flatlet_api(
        &sock,
        "PATCH",
        "/drives/d1",
        &format!(r#"{{"drive_id": "d1", "path_on_host": "{}"}}"#, ro_img.display()),
    );
    api_stress(&sock);
    flatlet_api(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    flatlet_api(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    flatlet_api(&sock, "PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    flatlet_api(
        &sock,
        "PATCH",
        "/drives/d0",
        &format!(r#"{{"drive_id": "d0", "path_on_host": "{}"}}"#, img.display()),
    );
    let bad = flatlet_api::client::request(&sock, "GET", "/nowhere", None).unwrap();
    assert_eq!(bad.status, 400);
    flatlet_api(&sock, "PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(0), "the API session under the filters");
    logs.push(std::fs::read_to_string(&api_log).unwrap());

    // vCPUs under heavy port I/O (a guest flooding its console) and MMIO
    // (a drive the guest writes), on two vCPUs, stopped by SIGTERM.
    let flood_log = dir.path("flood.log");
    let mut child = traced(
        &flood_log,
        &[
            "run",
            "--vcpus",
            "2",
            "--drive",
            &drive,
            "--cmdline",
            "console=ttyS0 flatlet.blkwrite flatlet.flood",
        ],
    )
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(3000));
    let log = std::fs::read_to_string(&flood_log).unwrap();
    let pid: i32 = log.split('<').next().unwrap().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    let st = child.wait().unwrap();
    assert!(st.code().is_some(), "stopped, not killed: {st:?}");
    logs.push(std::fs::read_to_string(&flood_log).unwrap());

    // SIGTERM to a running guest (to flatlet, not to strace: flatlet's
    // PID heads the log).
    let stay_log = dir.path("stay.log");
    let mut child = traced(&stay_log, &["run", "--cmdline", "console=ttyS0 flatlet.stay"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2000));
    let log = std::fs::read_to_string(&stay_log).unwrap();
    let pid: i32 = log.split('<').next().unwrap().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    let st = child.wait().unwrap();
    assert!(st.code().is_some(), "stopped, not killed: {st:?}");
    logs.push(std::fs::read_to_string(&stay_log).unwrap());
    // The split irqchip (flatlet's I/O APIC), and KVM's with its PIT.
    logs.extend(snapshot_workload(dir, &guest, "split"));
    logs.extend(snapshot_workload(dir, &guest, "full-pit"));
    logs
}

/// Starts a traced flatlet serving the API on `sock`; returns it and its
/// PID (the head of its strace log).
fn traced_api(log: &Path, sock: &Path) -> std::process::Child {
    let child = traced(log, &["--api-sock", sock.to_str().unwrap()])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while flatlet_api::client::request(sock, "GET", "/", None).is_err() {
        assert!(std::time::Instant::now() < deadline, "API never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Stops the traced flatlet whose strace log is `log` with SIGTERM.
fn stop_traced(log: &Path, mut child: std::process::Child) -> String {
    let head = std::fs::read_to_string(log).unwrap();
    let pid: i32 = head.split('<').next().unwrap().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    let st = child.wait().unwrap();
    assert!(st.code().is_some(), "stopped, not killed: {st:?}");
    std::fs::read_to_string(log).unwrap()
}

/// A snapshot of a paused guest with a drive, an entropy device and a
/// vsock device, and its load (and run) in a new flatlet.
fn snapshot_workload(dir: &TempDir, guest: &Path, irqchip: &str) -> Vec<String> {
    let state = dir.path(&format!("{irqchip}-snap.state"));
    let mem = dir.path(&format!("{irqchip}-snap.mem"));
    let src_sock = dir.path(&format!("{irqchip}-snapsrc.sock"));
    let src_log = dir.path(&format!("{irqchip}-snapsrc.log"));
    let drive = dir.path(&format!("{irqchip}-snap.img"));
    std::fs::write(&drive, vec![0u8; 1 << 20]).unwrap();
    let child = traced_api(&src_log, &src_sock);
    flatlet_api(
        &src_sock,
        "PUT",
        "/drives/d",
        &format!(
            r#"{{"drive_id": "d", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}"#,
            drive.display()
        ),
    );
    flatlet_api(&src_sock, "PUT", "/entropy", "{}");
    flatlet_api(
        &src_sock,
        "PUT",
        "/machine-config",
        &format!(
            r#"{{"vcpu_count": 1, "mem_size_mib": 128, "track_dirty_pages": true, "irqchip": "{irqchip}"}}"#
        ),
    );
    flatlet_api(
        &src_sock,
        "PUT",
        "/vsock",
        &format!(
            r#"{{"guest_cid": 3, "uds_path": "{}"}}"#,
            dir.path(&format!("{irqchip}-snap.vsock")).display()
        ),
    );
    flatlet_api(
        &src_sock,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 flatlet.stay flatlet.beatio"}}"#,
            guest.display()
        ),
    );
    flatlet_api(
        &src_sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    // A Full snapshot, then a Diff on top after the guest ran a little more.
    for kind in ["Full", "Diff"] {
        std::thread::sleep(Duration::from_millis(1300));
        flatlet_api(&src_sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
        flatlet_api(
            &src_sock,
            "PUT",
            "/snapshot/create",
            &format!(
                r#"{{"snapshot_type": "{kind}", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
                state.display(),
                mem.display()
            ),
        );
        flatlet_api(&src_sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    }
    flatlet_api(&src_sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let mut logs = vec![stop_traced(&src_log, child)];
    let dst_sock = dir.path(&format!("{irqchip}-snapdst.sock"));
    let dst_log = dir.path(&format!("{irqchip}-snapdst.log"));
    let child = traced_api(&dst_log, &dst_sock);
    flatlet_api(
        &dst_sock,
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
            state.display(),
            mem.display()
        ),
    );
    std::thread::sleep(Duration::from_millis(1500));
    logs.push(stop_traced(&dst_log, child));
    logs
}

#[test]
fn policy_matches_what_flatlet_calls() {
    if !kvm_or_skip("policy_matches_what_flatlet_calls") {
        return;
    }
    if !strace_available() {
        common::skip("policy_matches_what_flatlet_calls", "strace is not installed");
        return;
    }
    let dir = TempDir::new("seccomp");
    let mut seen = Seen::default();
    for log in workloads(&dir) {
        assert!(
            !log.contains("killed by SIGSYS"),
            "a filter killed flatlet:\n{log}"
        );
        analyse(&log, &mut seen);
    }
    let policy: serde_json::Value = serde_json::from_str(flatlet_vmm::seccomp::POLICY_JSON).unwrap();
    let mut problems = Vec::new();
    for filter in ["vmm", "api", "vcpu", "vmm_run"] {
        let rules = policy[filter]["filter"].as_array().unwrap();
        let allowed_calls: BTreeSet<&str> = rules.iter().map(|r| r["syscall"].as_str().unwrap()).collect();
        let allowed_args: BTreeSet<(&str, u64)> = rules
            .iter()
            .filter_map(|r| Some((r["syscall"].as_str()?, r["args"].as_array()?)))
            .flat_map(|(call, a)| a.iter().map(move |c| (call, c["val"].as_u64().unwrap())))
            .collect();
        // Calls the policy checks an argument of, for this filter.
        let checked: BTreeSet<&str> = allowed_args.iter().map(|(c, _)| *c).collect();
        for (f, call) in &seen.calls {
            if f == filter && !allowed_calls.contains(call.as_str()) {
                problems.push(format!("{filter}: calls {call}, which its policy does not allow"));
            }
        }
        for (f, call, arg) in &seen.args {
            if f == filter
                && checked.contains(call.as_str())
                && !allowed_args.contains(&(call.as_str(), *arg))
            {
                problems.push(format!(
                    "{filter}: {call} with {arg:#x}, which its policy does not allow"
                ));
            }
        }
        for r in rules {
            let call = r["syscall"].as_str().unwrap();
            let rare = r["comment"].as_str().is_some_and(|c| c.starts_with("rare:"));
            let used = match r["args"].as_array() {
                Some(args) => args.iter().all(|c| {
                    seen.args
                        .contains(&(filter.to_string(), call.to_string(), c["val"].as_u64().unwrap()))
                }),
                None => seen.calls.contains(&(filter.to_string(), call.to_string())),
            };
            if !used && !rare {
                problems.push(format!(
                    "{filter}: rule {r} is never used by the workloads and not marked rare:"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
