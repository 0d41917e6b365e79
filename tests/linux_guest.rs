//! The Linux guest end to end: the kernel and root file system that
//! tools/build-linux-guest makes boot to their init, which writes a file on
//! the root drive (found afterwards in the image), sends a datagram
//! through virtio-net to a socket in a network namespace this test creates,
//! and exchanges a line over virtio-vsock with a host listener.
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

use common::{NetNs, TempDir, can_do_tap_tests, host_is_pvm, run};

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
    std::fs::write(
        &config,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{kernel}"}}, "entropy": {{}},
                "mmds-config": {{"network_interfaces": ["net0"]}}}}"#
        ),
    )
    .unwrap();
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
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(env!("CARGO_BIN_EXE_flatlet"))
        .arg("--metadata")
        .arg(&metadata)
        .args(["run", "--kernel", &kernel, "--mem-mib", "256", "--vcpus", "2"])
        .arg("--config-file")
        .arg(&config)
        .arg("--drive")
        .arg(format!("{},root", image.display()))
        .args(["--net", "fllinux0,mac=06:00:0a:00:02:0f"])
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()))
        .args([
            "--cmdline",
            // Few words: Linux passes init at most 32 arguments.
            "console=ttyS0 reboot=k panic=1 -- echo flatlet-linux-was-here >/marker&&sync\
             &&udp-send 10.0.2.1 7777 hello-from-linux\
             &&echo hwrng:$(head -c16 /dev/hwrng|od -An -tx1)\
             &&ip r a 169.254.169.254 dev eth0\
             &&echo mmds:$(wget -qO- http://169.254.169.254/latest/meta-data/hostname)\
             &&vsock-send 5001 hello-from-linux",
        ]);
    let start = Instant::now();
    let out = run(cmd, boot_limit());
    let wall = start.elapsed();
    out.check(out.code() == Some(0), "exit 0 (the guest reset)");
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
    eprintln!("{TEST}: {:.1} s from start to exit", wall.as_secs_f64());
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
    out.check(
        out.stdout.contains("flatlet-init: exit status 0"),
        "the command succeeded",
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
}
