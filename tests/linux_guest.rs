//! The Linux guest end to end: the kernel and root file system that
//! tools/build-linux-guest makes boot to their init, which writes a file on
//! the root drive (found afterwards in the image), sends a datagram
//! through virtio-net to a socket in a network namespace this test creates,
//! and exchanges a line over virtio-vsock with a host listener. Then, in
//! user space and waiting for a line on its console, the guest is
//! snapshotted and restored in a new flatlet, where it reads the line we
//! type, sends it as a datagram, and ends.
//!
//! Slow: one to two minutes on nested hosts, where guest ring-0 code is
//! emulated; it is the only test that boots Linux. `tools/test` builds the
//! guest (cached) and passes its paths in FLATLET_LINUX_KERNEL and
//! FLATLET_LINUX_ROOTFS.
//!
//! On nested PVM hosts (the development and CI machines) the guest needs
//! what resources/guest/README.md lists: flatlet's command-line flags and
//! recoveries, which the test checks, and the guest kernel's patch for
//! system calls, without which init dies on its first one.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{NetNs, TempDir, can_do_tap_tests, host_is_pvm};

const TEST: &str = "linux_boots_writes_its_root_drive_and_sends_a_datagram";

fn boot_limit() -> Duration {
    let secs = std::env::var("FLATLET_LINUX_BOOT_LIMIT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    Duration::from_secs(secs)
}

/// A file's contents in an ext4 image, read with debugfs (no mount).
fn read_from_image(image: &std::path::Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn linux_boots_writes_its_root_drive_and_sends_a_datagram() {
    let (Ok(kernel), Ok(rootfs)) = (
        std::env::var("FLATLET_LINUX_KERNEL"),
        std::env::var("FLATLET_LINUX_ROOTFS"),
    ) else {
        common::skip(
            TEST,
            "FLATLET_LINUX_KERNEL and FLATLET_LINUX_ROOTFS are not set \
             (tools/test sets them from tools/build-linux-guest)",
        );
        return;
    };
    if !can_do_tap_tests(TEST) {
        return;
    }
    let dir = TempDir::new("linux");
    let image = dir.path("rootfs.ext4");
    std::fs::copy(&rootfs, &image).expect("copy the root file system image");
    assert_eq!(
        read_from_image(&image, "/marker"),
        "",
        "a fresh image has no marker"
    );

    let ns = NetNs::new("linux", "fllinux0").expect("network namespace and TAP");
    let socket = ns.udp_socket(7777);
    // The entropy device, and MMDS on the NIC with a value to fetch.
    let config = dir.path("devices.json");
    // vsock: the guest connects to host port 5001, which flatlet forwards
    // to a listener at `<uds>_5001`; it answers the guest's line with one.
    let uds = dir.path("v.sock");
    let vsock_listener = UnixListener::bind(dir.path("v.sock_5001")).unwrap();
    let (vsock_tx, vsock_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (s, _) = vsock_listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        (&s).write_all(b"hello-from-host\n").unwrap();
        let _ = vsock_tx.send(line);
    });
    let metadata = dir.path("metadata.json");
    std::fs::write(
        &metadata,
        r#"{"latest": {"meta-data": {"hostname": "flatlet-linux-vm"}}}"#,
    )
    .unwrap();
    // Every device in one configuration, served with the API so that the
    // booted guest can be paused and snapshotted once it is in user space.
    let command = "echo flatlet-linux-was-here >/marker&&sync\
                   &&udp-send 10.0.2.1 7777 hello-from-linux\
                   &&echo hwrng:$(head -c16 /dev/hwrng|od -An -tx1)\
                   &&ip r a 169.254.169.254 dev eth0\
                   &&echo mmds:$(wget -qO- http://169.254.169.254/latest/meta-data/hostname)\
                   &&vsock-send 5001 hello-from-linux&&cat /proc/uptime\
                   &&echo ready-$((6*7))&&read l&&cat /proc/uptime&&udp-send 10.0.2.1 7777 $l";
    std::fs::write(
        &config,
        serde_json::json!({
            // Few words: Linux passes init at most 32 arguments.
            "boot-source": {"kernel_image_path": kernel, "boot_args": format!("console=ttyS0 reboot=k panic=1 -- {command}")},
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
            "drives": [{"drive_id": "rootfs", "path_on_host": image, "is_root_device": true, "is_read_only": false}],
            "network-interfaces": [{"iface_id": "net0", "host_dev_name": "fllinux0", "guest_mac": "06:00:0a:00:02:0f"}],
            "vsock": {"guest_cid": 3, "uds_path": uds},
            "entropy": {},
            "mmds-config": {"network_interfaces": ["net0"]},
        })
        .to_string(),
    )
    .unwrap();
    let sock = dir.path("api.sock");
    let start = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(env!("CARGO_BIN_EXE_flatlet"))
        .arg("--metadata")
        .arg(&metadata)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = common::vmm::collect(child.stdout.take().unwrap());
    let stderr = common::vmm::collect(child.stderr.take().unwrap());
    let deadline = start + boot_limit();
    // (Not a word of the command: the kernel prints its command line.)
    while !stdout.lock().unwrap().contains("ready-42") {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!(
                "the guest never got ready\n--- stdout:\n{}\n--- stderr:\n{}",
                stdout.lock().unwrap(),
                stderr.lock().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let wall = start.elapsed();
    // In user space, waiting for a line on its console: snapshot it.
    let api = |method: &str, path: &str, body: &str| {
        let r = flatlet_api::client::request(&sock, method, path, Some(body)).unwrap();
        assert!(r.status < 300, "{method} {path}: {r:?}");
    };
    let state = dir.path("linux.state");
    let mem = dir.path("linux.mem");
    api("PATCH", "/vm", r#"{"state": "Paused"}"#);
    api(
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            state.display(),
            mem.display()
        ),
    );
    child.kill().unwrap();
    let out = common::Output {
        status: child.wait().unwrap(),
        stdout: stdout.lock().unwrap().clone(),
        stderr: stderr.lock().unwrap().clone(),
    };
    let console = out.stdout.replace('\r', "");
    for (line, what) in [
        ("virtio_blk virtio0: [vda]", "the root drive was found"),
        ("EXT4-fs (vda): mounted filesystem", "the root drive was mounted"),
        (
            "virtio-mmio: Registering device virtio-mmio.1",
            "the NIC was found",
        ),
        ("smp: Brought up 1 node, 2 CPUs", "the second vCPU came up"),
        (
            "smpboot: Max logical packages: 1",
            "CPUID described both vCPUs as one package",
        ),
        ("Run /sbin/init as init process", "the kernel started init"),
    ] {
        out.check(console.contains(line), what);
    }
    eprintln!("{TEST}: {:.1} s from start to user space", wall.as_secs_f64());
    if host_is_pvm() {
        out.check(
            out.stderr
                .contains("nested host: adding to the Linux command line: noxsave"),
            "flatlet added the nested-host flags",
        );
        out.check(
            out.stderr.contains("`int3`; recovered: int3"),
            "flatlet recovered from the alternatives self-test's int3",
        );
        out.check(
            out.stderr.contains("`fwait`; recovered: fwait"),
            "flatlet reproduced fwait (fpu__drop, at the first exec)",
        );
    }
    out.check(out.stdout.contains("flatlet-init: up, root on /dev/"), "init ran");
    out.check(
        out.stdout
            .contains("flatlet-init: running: echo flatlet-linux-was-here >/marker&&sync&&udp-send"),
        "init ran the command after `--`, and only that",
    );
    // 16 bytes from virtio-rng, not all zero.
    let hwrng = console
        .lines()
        .find_map(|l| l.strip_prefix("hwrng: "))
        .unwrap_or_default()
        .split_whitespace()
        .filter(|b| b.len() == 2)
        .count();
    out.check(
        hwrng == 16 && !console.contains("hwrng: 00 00 00 00 00 00 00 00"),
        "the guest read /dev/hwrng",
    );
    out.check(
        console.contains("mmds:flatlet-linux-vm"),
        "the guest fetched its MMDS value with wget",
    );
    out.check(
        console.contains("vsock-send: got hello-from-host"),
        "the guest read the host's line over vsock",
    );
    let boot_line = out
        .stderr
        .lines()
        .find(|l| l.contains("Guest-boot-time"))
        .unwrap_or("no Guest-boot-time line");
    eprintln!("{TEST}: {boot_line}");

    let mut buf = [0u8; 256];
    let (n, from) = socket.recv_from(&mut buf).expect("the datagram arrived");
    assert_eq!(&buf[..n], b"hello-from-linux");
    assert_eq!(from.ip().to_string(), "10.0.2.15");
    let line = vsock_rx
        .recv_timeout(Duration::from_secs(1))
        .expect("the guest connected over vsock");
    assert_eq!(line, "hello-from-linux\n");
    assert_eq!(
        read_from_image(&image, "/marker"),
        "flatlet-linux-was-here\n",
        "the guest's write reached the image"
    );

    // Restored in a new flatlet, the guest goes on in user space where it
    // stopped: it reads the line we type, its clock has moved on, and its
    // NIC works.
    let restore_start = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(env!("CARGO_BIN_EXE_flatlet"))
        .arg("run")
        .arg("--snapshot")
        .arg(&state)
        .arg("--mem")
        .arg(&mem)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = common::vmm::collect(child.stdout.take().unwrap());
    let stderr = common::vmm::collect(child.stderr.take().unwrap());
    stdin.write_all(b"typed-after-restore\n").unwrap();
    let deadline = Instant::now() + boot_limit();
    let mut answered = None;
    let status = loop {
        if answered.is_none() && stdout.lock().unwrap().contains("typed-after-restore") {
            answered = Some(restore_start.elapsed());
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "the restored guest did not finish\n--- stdout:\n{}\n--- stderr:\n{}",
                stdout.lock().unwrap(),
                stderr.lock().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let restored = common::Output {
        status,
        stdout: stdout.lock().unwrap().replace('\r', ""),
        stderr: stderr.lock().unwrap().clone(),
    };
    eprintln!(
        "{TEST}: restored: the console echoed the typed line {:.0} ms after spawn; exit after {:.1} s",
        answered.unwrap_or_default().as_secs_f64() * 1000.0,
        restore_start.elapsed().as_secs_f64()
    );
    restored.check(restored.code() == Some(0), "exit 0 (the restored guest reset)");
    restored.check(
        restored.stdout.contains("flatlet-init: exit status 0"),
        "the rest of the command succeeded after the restore",
    );
    restored.check(
        !restored.stdout.contains("Linux version"),
        "a restore, not a boot",
    );
    let uptime = |text: &str| -> Vec<f64> {
        // /proc/uptime's lines: two numbers, nothing else.
        text.lines()
            .filter_map(|l| {
                let w: Vec<f64> = l.split_whitespace().filter_map(|w| w.parse().ok()).collect();
                (w.len() == 2 && l.split_whitespace().count() == 2).then(|| w[0])
            })
            .collect()
    };
    let before = uptime(&console).last().copied().unwrap_or_default();
    let after = uptime(&restored.stdout).first().copied().unwrap_or_default();
    restored.check(
        after > before && before > 0.0,
        &format!("the guest's clock moved on: uptime {before} at the snapshot, {after} after"),
    );
    let (n, _) = socket.recv_from(&mut buf).expect("a datagram after the restore");
    assert_eq!(&buf[..n], b"typed-after-restore");
}
