//! What busy operators and attackers did to flatlet, each a regression
//! test: API load that crashed it, files that block (FIFOs) or are not
//! files, a socket path that was not a socket, huge config files, too many
//! connections, a pause that fails, and text that must not reach the
//! kernel command line.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::vmm::Vmm;
use common::{TempDir, flatlet, kvm_or_skip, run};

/// How long a refusal may take (generous; it is immediate, but machines
/// are shared). A FIFO open would block until the test's deadline.
const PROMPT: Duration = Duration::from_secs(5);

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

/// One raw HTTP request on its own connection; the reply's head line.
fn raw_request(sock: &Path, method: &str, path: &str, body: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
fn api_load_does_not_kill_flatlet() {
    // Two concurrent maximum-size bodies, or 20 idle connections opened and
    // closed, killed flatlet with SIGSYS (its allocator left the filter).
    if !kvm_or_skip("api_load_does_not_kill_flatlet") {
        return;
    }
    let mut vmm = Vmm::start("load");
    for _ in 0..3 {
        let idle: Vec<UnixStream> = (0..20).map(|_| UnixStream::connect(&vmm.sock).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(50));
        drop(idle);
        let body = {
            let mut b = br#"{"vcpu_count": 1, "mem_size_mib": 128}"#.to_vec();
            b.resize(51_200, b' ');
            b
        };
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let sock = vmm.sock.clone();
                let body = body.clone();
                std::thread::spawn(move || raw_request(&sock, "PUT", "/machine-config", &body))
            })
            .collect();
        for t in threads {
            let head = t.join().unwrap();
            assert!(head.contains("204"), "{head}");
        }
    }
    assert!(
        vmm.child.try_wait().unwrap().is_none(),
        "flatlet died: {}",
        vmm.log.lock().unwrap()
    );
    vmm.ok("GET", "/", None);
}

#[test]
fn api_sock_replaces_only_a_stale_socket() {
    let dir = TempDir::new("sockpath");
    let file = dir.path("precious");
    std::fs::write(&file, b"keep me").unwrap();
    let subdir = dir.path("adir");
    std::fs::create_dir(&subdir).unwrap();
    std::fs::write(subdir.join("inside"), b"x").unwrap();
    let link = dir.path("link");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    for path in [&file, &subdir, &link] {
        let mut cmd = flatlet();
        cmd.arg("--api-sock").arg(path);
        let out = run(cmd, PROMPT);
        out.check(out.code() == Some(2), "refused with exit 2");
        out.check(out.stderr.contains("not a socket"), "says why");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    assert!(subdir.join("inside").exists());
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    // A stale socket (nobody listening) is replaced.
    if !kvm_or_skip("api_sock_replaces_only_a_stale_socket") {
        return;
    }
    let stale = dir.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let mut child = flatlet()
        .arg("--api-sock")
        .arg(&stale)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while flatlet_api::client::request(&stale, "GET", "/", None).is_err() {
        assert!(
            Instant::now() < deadline,
            "flatlet never served the replaced socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn special_files_are_refused_at_once_on_the_command_line() {
    let dir = TempDir::new("cli-fifo");
    let fifo = dir.path("fifo");
    mkfifo(&fifo);
    let fifo_s = fifo.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["run", "--kernel", fifo_s],
        vec!["run", "--initrd", fifo_s],
        vec!["run", "--drive", fifo_s],
        vec!["run", "--drive", "/dev/zero"],
        vec!["run", "--kernel", "/tmp"],
        vec!["--config-file", fifo_s, "--no-api"],
        vec!["--config-file", "/dev/zero", "--no-api"],
    ];
    for args in cases {
        let mut cmd = flatlet();
        cmd.args(&args);
        let t = Instant::now();
        let out = run(cmd, Duration::from_secs(30));
        out.check(out.code() == Some(2), &format!("{args:?}: exit 2"));
        out.check(t.elapsed() < PROMPT, &format!("{args:?}: at once"));
        out.check(
            out.stderr.contains("FIFO") || out.stderr.contains("device") || out.stderr.contains("directory"),
            &format!("{args:?}: says what the file is"),
        );
    }
}

#[test]
fn special_files_are_refused_at_once_through_the_api() {
    if !kvm_or_skip("special_files_are_refused_at_once_through_the_api") {
        return;
    }
    let mut vmm = Vmm::start("api-fifo");
    let fifo = vmm.dir.path("fifo");
    mkfifo(&fifo);
    let img = vmm.dir.path("disk.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let bad = [fifo.to_str().unwrap(), "/dev/zero", "/dev/null", "/tmp"];
    for p in bad {
        let t = Instant::now();
        vmm.fault(
            "PUT",
            "/boot-source",
            Some(&format!(r#"{{"kernel_image_path": "{p}"}}"#)),
            "not a regular file",
        );
        vmm.fault(
            "PUT",
            "/drives/d1",
            Some(&format!(
                r#"{{"drive_id": "d1", "path_on_host": "{p}", "is_root_device": false}}"#
            )),
            "not a regular file or a block device",
        );
        assert!(t.elapsed() < PROMPT, "{p}: at once");
    }
    // PATCH takes exactly what PUT takes.
    vmm.ok(
        "PUT",
        "/drives/d0",
        Some(&format!(
            r#"{{"drive_id": "d0", "path_on_host": "{}", "is_root_device": false}}"#,
            img.display()
        )),
    );
    vmm.ok(
        "PUT",
        "/boot-source",
        Some(&vmm.boot_source("console=ttyS0 flatlet.stay")),
    );
    vmm.ok("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
    for p in bad {
        let t = Instant::now();
        vmm.fault(
            "PATCH",
            "/drives/d0",
            Some(&format!(r#"{{"drive_id": "d0", "path_on_host": "{p}"}}"#)),
            "not a regular file or a block device",
        );
        assert!(t.elapsed() < PROMPT, "{p}: at once");
    }
    vmm.ok(
        "PATCH",
        "/drives/d0",
        Some(&format!(
            r#"{{"drive_id": "d0", "path_on_host": "{}"}}"#,
            img.display()
        )),
    );
    vmm.ok("GET", "/", None);
    let _ = vmm.child.kill();
}

#[test]
fn bad_text_is_refused_before_the_kernel_command_line() {
    let dir = TempDir::new("cmdline");
    let img = dir.path("disk.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let mut cmd = flatlet();
    cmd.args(["run", "--cmdline", "console=ttyS0\ninit=/bin/sh"]);
    let out = run(cmd, PROMPT);
    out.check(out.code() == Some(2), "a newline in --cmdline");
    let mut cmd = flatlet();
    cmd.args(["run", "--kernel"]).arg(dir.path("a\nb"));
    let out = run(cmd, PROMPT);
    out.check(
        out.code() == Some(2) && out.stderr.contains("newline"),
        "a newline in a path",
    );
    let config = dir.path("vm.json");
    let guest = dir.path("guest.elf");
    std::fs::write(&guest, flatlet_guest::ELF).unwrap();
    std::fs::write(
        &config,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "drives": [{{"drive_id": "r",
            "path_on_host": "{}", "is_root_device": true, "partuuid": "1234 init=/bin/sh"}}]}}"#,
            guest.display(),
            img.display()
        ),
    )
    .unwrap();
    let mut cmd = flatlet();
    cmd.arg("--config-file").arg(&config).arg("--no-api");
    let out = run(cmd, PROMPT);
    out.check(
        out.code() == Some(2) && out.stderr.contains("partuuid"),
        "a bad partuuid",
    );
}

#[test]
fn a_huge_config_file_is_refused_fast() {
    let dir = TempDir::new("bigconfig");
    let img = dir.path("disk.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    // 100,000 drives took 50 s to refuse, by the wrong count.
    let mut drives = String::new();
    for i in 0..100_000 {
        if i > 0 {
            drives.push(',');
        }
        drives.push_str(&format!(
            r#"{{"drive_id":"d{i}","path_on_host":"{}","is_root_device":false}}"#,
            img.display()
        ));
    }
    let text = format!(r#"{{"boot-source": {{"kernel_image_path": "x"}}, "drives": [{drives}]}}"#);
    let config = dir.path("many.json");
    std::fs::write(&config, &text).unwrap();
    let mut cmd = flatlet();
    cmd.arg("--config-file").arg(&config).arg("--no-api");
    let t = Instant::now();
    let out = run(cmd, Duration::from_secs(60));
    // Over the size bound (1 MiB) first.
    out.check(
        out.code() == Some(2) && out.stderr.contains("larger than"),
        "size bound",
    );
    assert!(t.elapsed() < PROMPT);
    // Under the size bound, the device count is checked first, and named.
    let few: Vec<String> = (0..5000)
        .map(|i| {
            format!(
                r#"{{"drive_id":"d{i}","path_on_host":"{}","is_root_device":false}}"#,
                img.display()
            )
        })
        .collect();
    let guest = dir.path("guest.elf");
    std::fs::write(&guest, flatlet_guest::ELF).unwrap();
    std::fs::write(
        &config,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "drives": [{}]}}"#,
            guest.display(),
            few.join(",")
        ),
    )
    .unwrap();
    let mut cmd = flatlet();
    cmd.arg("--config-file").arg(&config).arg("--no-api");
    let t = Instant::now();
    let out = run(cmd, Duration::from_secs(60));
    out.check(
        out.code() == Some(2) && out.stderr.contains("5000 drives"),
        "names the count",
    );
    assert!(t.elapsed() < PROMPT);
}

/// Raises this process's descriptor limit (the test opens thousands).
fn raise_nofile(want: u64) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let new = want.min(hard).max(soft);
    setrlimit(Resource::RLIMIT_NOFILE, new, hard).unwrap();
    new
}

#[test]
fn idle_connections_cannot_use_up_descriptors() {
    // 2,030 idle connections used up the jail's 2,048 descriptors: new
    // clients timed out and InstanceStart could not open /dev/kvm.
    if !kvm_or_skip("idle_connections_cannot_use_up_descriptors") {
        return;
    }
    if raise_nofile(6000) < 3000 {
        common::skip(
            "idle_connections_cannot_use_up_descriptors",
            "cannot raise RLIMIT_NOFILE to 3000",
        );
        return;
    }
    let mut vmm = Vmm::start_with("conns", &[], &[]);
    let pid = vmm.child.id();
    let mut idle = Vec::new();
    for _ in 0..2100 {
        idle.push(UnixStream::connect(&vmm.sock).unwrap());
    }
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    vmm.ok("GET", "/", None);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "a new client waited {:?}",
        t.elapsed()
    );
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    assert!(fds < 400, "flatlet holds {fds} descriptors");
    vmm.ok(
        "PUT",
        "/boot-source",
        Some(&vmm.boot_source("console=ttyS0 flatlet.stay")),
    );
    vmm.ok("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
    vmm.wait_console("heartbeat", Duration::from_secs(30));
    drop(idle);
    vmm.ok("GET", "/", None);
    let _ = vmm.child.kill();
}

#[test]
fn a_failed_pause_leaves_the_vm_running() {
    // A failed pause threw the VM away: its threads ran on, its end was
    // never seen, and a second InstanceStart was accepted.
    if !kvm_or_skip("a_failed_pause_leaves_the_vm_running") {
        return;
    }
    let mut vmm = Vmm::start_with("failpause", &[], &[("FLATLET_FAILPOINT", "vcpu0-deaf-to-pause")]);
    vmm.ok(
        "PUT",
        "/boot-source",
        Some(&vmm.boot_source("console=ttyS0 flatlet.stay")),
    );
    vmm.ok("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
    vmm.wait_console("heartbeat", Duration::from_secs(30));
    vmm.fault("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), "goes on running");
    let info: serde_json::Value = serde_json::from_str(&vmm.ok("GET", "/", None).body).unwrap();
    assert_eq!(info["state"], "Running");
    vmm.fault(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        "InstanceStart is allowed once",
    );
    let beats = vmm.heartbeats();
    let deadline = Instant::now() + Duration::from_secs(20);
    while vmm.heartbeats() <= beats {
        assert!(
            Instant::now() < deadline,
            "the guest stopped after the failed pause"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(vmm.wait_exit(Duration::from_secs(20)), Some(128 + 15));
}

#[test]
fn a_path_without_its_slash_is_not_served_as_root() {
    if !kvm_or_skip("a_path_without_its_slash_is_not_served_as_root") {
        return;
    }
    let vmm = Vmm::start("slash");
    let head = raw_request(&vmm.sock, "GET", "machine-config", b"");
    assert!(head.contains("400"), "{head}");
    let mut cmd = flatlet();
    cmd.args(["api", "--sock"])
        .arg(&vmm.sock)
        .args(["get", "machine-config"]);
    let out = run(cmd, PROMPT);
    out.check(
        out.code() != Some(0) && out.stderr.contains("start with '/'"),
        "refused by the client",
    );
}

#[test]
fn irqchip_is_part_of_the_machine_configuration() {
    // --irqchip bypassed the requests: the API and config file could not
    // choose it.
    if !kvm_or_skip("irqchip_is_part_of_the_machine_configuration") {
        return;
    }
    let dir = TempDir::new("irqchip");
    let guest = dir.path("guest.elf");
    std::fs::write(&guest, flatlet_guest::ELF).unwrap();
    let config = dir.path("vm.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64, "irqchip": "full"}}}}"#,
            guest.display()
        ),
    )
    .unwrap();
    let mut cmd = flatlet();
    cmd.arg("--config-file").arg(&config).arg("--no-api");
    let out = run(cmd, common::BOOT_LIMIT);
    out.check(
        out.code() == Some(0) && out.stderr.contains("full irqchip"),
        "the file's irqchip",
    );
    let vmm = Vmm::start("irqchip-api");
    let shown: serde_json::Value =
        serde_json::from_str(&vmm.ok("GET", "/machine-config", None).body).unwrap();
    assert!(
        shown.get("irqchip").is_none(),
        "the default stays out of Firecracker's body"
    );
    vmm.ok("PATCH", "/machine-config", Some(r#"{"irqchip": "full-pit"}"#));
    let shown: serde_json::Value =
        serde_json::from_str(&vmm.ok("GET", "/machine-config", None).body).unwrap();
    assert_eq!(shown["irqchip"], "full-pit");
    vmm.fault(
        "PATCH",
        "/machine-config",
        Some(r#"{"irqchip": "pic"}"#),
        "unknown variant",
    );
}
