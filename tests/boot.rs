//! Boots of the built-in test guest through the real binary: vCPUs, the
//! boot-timer line, the command line, the config file, exit codes, and
//! the recovery from nested-host emulation failures.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{BOOT_LIMIT, TempDir, flatlet, host_is_pvm, kvm_or_skip, run};
use flatlet_devices::boot_timer::parse_boot_time_us;

#[test]
fn boots_with_1_2_and_4_vcpus() {
    if !kvm_or_skip("boots_with_1_2_and_4_vcpus") {
        return;
    }
    for n in [1u32, 2, 4] {
        let mut cmd = flatlet();
        cmd.args(["run", "--vcpus", &n.to_string()]);
        let out = run(cmd, BOOT_LIMIT);
        out.check(out.code() == Some(0), &format!("{n} vCPUs: exit code 0"));
        let lines = out.console_lines();
        out.check(
            lines.first().map(String::as_str) == Some("flatlet-guest: booting"),
            "banner first",
        );
        for id in 0..n {
            let want = format!("flatlet-guest: cpu {id} up");
            out.check(lines.contains(&want), &format!("line {want:?}"));
        }
        out.check(
            lines.contains(&format!("flatlet-guest: boot complete, {n} of {n} cpus up")),
            "all vCPUs counted",
        );
        out.check(
            lines.last().map(String::as_str) == Some("flatlet-guest: resetting"),
            "reset last",
        );
        let t = parse_boot_time_us(&out.stderr);
        out.check(t.is_some_and(|us| us > 0), "a Guest-boot-time line with a time");
    }
}

#[test]
fn guest_reads_its_command_line() {
    if !kvm_or_skip("guest_reads_its_command_line") {
        return;
    }
    let mut cmd = flatlet();
    cmd.args(["run", "--cmdline", "console=ttyS0 hello=world"]);
    let out = run(cmd, BOOT_LIMIT);
    out.check(out.code() == Some(0), "exit 0");
    out.check(
        out.console_lines()
            .contains(&"flatlet-guest: cmdline: console=ttyS0 hello=world".to_string()),
        "the guest echoes the command line it got",
    );
}

#[test]
fn guest_image_boots_from_a_file_and_a_config_file() {
    if !kvm_or_skip("guest_image_boots_from_a_file_and_a_config_file") {
        return;
    }
    let dir = TempDir::new("image");
    let image = dir.path("guest.elf");
    let mut cmd = flatlet();
    cmd.args(["guest-image", "--out"]).arg(&image);
    let out = run(cmd, BOOT_LIMIT);
    out.check(out.code() == Some(0), "guest-image succeeds");
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF");

    let mut cmd = flatlet();
    cmd.args(["run", "--kernel"]).arg(&image);
    let out = run(cmd, BOOT_LIMIT);
    out.check(out.code() == Some(0), "boots the written image");
    out.check(
        out.console_lines()
            .contains(&"flatlet-guest: cpu 0 up".to_string()),
        "it ran",
    );

    let config = dir.path("vm.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0 from=file"}},
                "drives": [],
                "machine-config": {{"vcpu_count": 2, "mem_size_mib": 64, "smt": false}}}}"#,
            image.display()
        ),
    )
    .unwrap();
    for args in [vec!["run", "--config-file"], vec!["--no-api", "--config-file"]] {
        let mut cmd = flatlet();
        cmd.args(&args).arg(&config);
        let out = run(cmd, BOOT_LIMIT);
        out.check(out.code() == Some(0), &format!("{args:?}: exit 0"));
        let lines = out.console_lines();
        out.check(
            lines.contains(&"flatlet-guest: cpu 1 up".to_string()),
            "two vCPUs from the file",
        );
        out.check(
            lines.contains(&"flatlet-guest: cmdline: console=ttyS0 from=file".to_string()),
            "boot_args from the file",
        );
    }
}

#[test]
fn int3_is_recovered_and_the_guest_handler_runs() {
    if !kvm_or_skip("int3_is_recovered_and_the_guest_handler_runs") {
        return;
    }
    let mut cmd = flatlet();
    cmd.args(["run", "--cmdline", "console=ttyS0 flatlet.int3"]);
    let out = run(cmd, BOOT_LIMIT);
    out.check(out.code() == Some(0), "exit 0");
    let lines = out.console_lines();
    out.check(
        lines.contains(&"flatlet-guest: int3 handled, resuming".to_string()),
        "#BP handler ran",
    );
    out.check(
        lines.contains(&"flatlet-guest: after int3".to_string()),
        "execution went on after int3",
    );
    if host_is_pvm() {
        out.check(
            out.stderr.contains("recovered: int3"),
            "the VMM says it recovered int3",
        );
    }
}

#[test]
fn fwait_is_reproduced_and_the_guest_goes_on() {
    if !kvm_or_skip("fwait_is_reproduced_and_the_guest_goes_on") {
        return;
    }
    let mut cmd = flatlet();
    cmd.args(["run", "--cmdline", "console=ttyS0 flatlet.fwait"]);
    let out = run(cmd, BOOT_LIMIT);
    out.check(out.code() == Some(0), "exit 0 (under the seccomp filters)");
    out.check(
        out.console_lines()
            .contains(&"flatlet-guest: after fwait".to_string()),
        "execution went on after fwait",
    );
    if host_is_pvm() {
        out.check(
            out.stderr.contains("`fwait`; recovered: fwait"),
            "the VMM says it reproduced fwait",
        );
    }
}

/// The probe behind the Linux guest's patch (resources/guest/patches): a
/// `syscall` from ring 3 must enter the kernel in ring 0. Nested PVM hosts
/// leave it in ring 3; there the test reports what it saw.
#[test]
fn syscall_from_ring_3_enters_ring_0() {
    const TEST: &str = "syscall_from_ring_3_enters_ring_0";
    if !kvm_or_skip(TEST) {
        return;
    }
    let mut cmd = flatlet();
    cmd.args(["run", "--cmdline", "console=ttyS0 flatlet.syscall"]);
    let out = run(cmd, BOOT_LIMIT);
    out.check(out.code() == Some(0), "exit 0");
    let lines = out.console_lines();
    let report = lines
        .iter()
        .find(|l| l.starts_with("flatlet-guest: syscall entry ran in ring "));
    out.check(report.is_some(), "the syscall entry ran and reported its ring");
    let in_ring_0 = lines.contains(&"flatlet-guest: syscall: ok".to_string());
    if host_is_pvm() && !in_ring_0 {
        out.check(
            lines.contains(&"flatlet-guest: syscall did not reach ring 0, resetting".to_string()),
            "the probe reset from ring 3",
        );
        // A skip on purpose (not a missing prerequisite), so printed where
        // cargo's capture does not hide it, and never a failure.
        let _ = std::io::Write::write_fmt(
            &mut std::io::stderr(),
            format_args!(
                "SKIPPED {TEST}: on this nested PVM host `syscall` leaves the guest in user mode \
             ({}); the Linux guest carries a patch for it\n",
                report.map_or("", |l| l.as_str())
            ),
        );
        return;
    }
    out.check(
        in_ring_0,
        "the entry ran in ring 0 with the kernel's CS and returned",
    );
}

#[test]
fn unemulatable_instruction_ends_the_vm_with_rip_and_bytes() {
    if !kvm_or_skip("unemulatable_instruction_ends_the_vm_with_rip_and_bytes") {
        return;
    }
    let mut cmd = flatlet();
    cmd.args(["run", "--cmdline", "console=ttyS0 flatlet.crash=emul"]);
    let out = run(cmd, BOOT_LIMIT);
    if host_is_pvm() {
        out.check(out.code() == Some(4), "guest crash exit code");
        out.check(out.stderr.contains("KVM cannot emulate"), "names the failure");
        out.check(out.stderr.contains("RIP 0x"), "names the RIP");
        out.check(
            out.stderr.contains("[f0 48 0f c7"),
            "shows the bytes of lock cmpxchg16b",
        );
    } else {
        // Hardware virtualization runs the instruction natively.
        out.check(out.code() == Some(0), "exit 0 on a hardware host");
        out.check(out.stdout.contains("ran natively"), "the guest went on");
    }
}

#[test]
fn triple_fault_is_a_guest_crash() {
    if !kvm_or_skip("triple_fault_is_a_guest_crash") {
        return;
    }
    let mut cmd = flatlet();
    cmd.args(["run", "--cmdline", "console=ttyS0 flatlet.crash=triple"]);
    let out = run(cmd, BOOT_LIMIT);
    out.check(out.code() == Some(4), "guest crash exit code");
    out.check(out.stderr.contains("triple fault"), "says triple fault");
    out.check(
        out.stdout
            .contains("flatlet-guest: panic: triple fault requested"),
        "guest said why",
    );
}

#[test]
fn each_irqchip_mode_boots_smp() {
    if !kvm_or_skip("each_irqchip_mode_boots_smp") {
        return;
    }
    for mode in ["split", "full", "full-pit"] {
        let mut cmd = flatlet();
        cmd.args(["run", "--vcpus", "2", "--irqchip", mode]);
        let out = run(cmd, BOOT_LIMIT);
        out.check(out.code() == Some(0), &format!("{mode}: exit 0"));
        out.check(
            out.stdout.contains("boot complete, 2 of 2 cpus up"),
            &format!("{mode}: SMP"),
        );
    }
}
