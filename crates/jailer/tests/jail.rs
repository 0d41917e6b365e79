//! The jailer through its binary, as root: a jailed flatlet boots the test
//! guest; inside, it runs as UID:GID in its own root, with the limits and
//! cgroup values asked for; a second jail of the same id is refused; bad
//! flags fail clearly; clean-up leaves nothing behind.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const UID: u32 = 4321;
const GID: u32 = 4322;

fn jailer() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flatlet-jailer"))
}

/// The flatlet binary next to the jailer (the workspace's tests build it).
fn flatlet() -> Option<PathBuf> {
    let p = jailer().with_file_name("flatlet");
    p.exists().then_some(p)
}

/// Whether the jail tests can run here; says why not when they cannot.
fn can_jail(test: &str) -> Option<PathBuf> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED {test}: the jailer needs root");
        return None;
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("SKIPPED {test}: /dev/kvm is not usable");
        return None;
    }
    let f = flatlet();
    if f.is_none() {
        eprintln!("SKIPPED {test}: build flatlet first (cargo test --workspace builds it)");
    }
    f
}

/// A base directory for jails, removed (with its jails) on drop.
struct Base(PathBuf);

impl Base {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("flatlet-jails-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Base(p)
    }
}

impl Drop for Base {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn jail_cmd(base: &Path, id: &str, flatlet: &Path, extra: &[&str], vmm_args: &[&str]) -> Command {
    let mut c = Command::new(jailer());
    c.args(["--id", id, "--uid", &UID.to_string(), "--gid", &GID.to_string()])
        .arg("--exec-file")
        .arg(flatlet)
        .arg("--chroot-base-dir")
        .arg(base)
        .args(extra)
        .arg("--")
        .args(vmm_args);
    c
}

fn clean(base: &Path, id: &str, extra: &[&str]) -> Output {
    Command::new(jailer())
        .args(["clean", "--id", id])
        .arg("--chroot-base-dir")
        .arg(base)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn jailed_flatlet_boots_the_test_guest() {
    let Some(fl) = can_jail("jailed_flatlet_boots_the_test_guest") else {
        return;
    };
    let base = Base::new("boot");
    let out = jail_cmd(&base.0, "boot-1", &fl, &[], &["run", "--vcpus", "2"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("flatlet-guest: boot complete, 2 of 2 cpus up"),
        "{stdout}"
    );
    let root = base.0.join("flatlet/boot-1/root");
    let binary = std::fs::metadata(root.join("flatlet")).unwrap();
    assert_eq!((binary.uid(), binary.gid()), (UID, GID));
    assert_ne!(
        binary.ino(),
        std::fs::metadata(&fl).unwrap().ino(),
        "a copy, not a link"
    );
    let kvm = std::fs::metadata(root.join("dev/kvm")).unwrap();
    assert_eq!((kvm.uid(), kvm.rdev()), (UID, nix::sys::stat::makedev(10, 232)));

    // The same id again is refused, and the jail is left alone.
    let again = jail_cmd(&base.0, "boot-1", &fl, &[], &["run"]).output().unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    assert!(root.join("flatlet").exists());

    let c = clean(&base.0, "boot-1", &[]);
    assert!(c.status.success());
    assert!(!base.0.join("flatlet/boot-1").exists());
}

fn wait_for(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.is_empty() {
                return s;
            }
        }
        assert!(Instant::now() < deadline, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn proc_field(pid: &str, file: &str, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("{key} in /proc/{pid}/{file}"))
        .to_string()
}

#[test]
fn inside_the_jail() {
    let Some(fl) = can_jail("inside_the_jail") else {
        return;
    };
    let base = Base::new("inside");
    let ns = format!("flatlet-jail-{}", std::process::id());
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .unwrap()
            .success()
    );
    let netns = format!("/var/run/netns/{ns}");
    let mut child = jail_cmd(
        &base.0,
        "inside-1",
        &fl,
        &[
            "--new-pid-ns",
            "--netns",
            &netns,
            "--cgroup",
            "pids.max=77",
            "--cgroup",
            "cpu.shares=512",
            "--resource-limit",
            "no-file=123",
            "--resource-limit",
            "fsize=1048576",
        ],
        &["run", "--cmdline", "console=ttyS0 flatlet.stay"],
    )
    .env("SECRET_TOKEN", "must-not-leak")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let root = base.0.join("flatlet/inside-1/root");
    let pid = wait_for(&root.join("flatlet.pid")).trim().to_string();
    // Give it time to pivot and exec.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().ends_with("/flatlet"))
        .unwrap_or(false)
    {
        assert!(Instant::now() < deadline, "the VMM never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));

    assert_eq!(
        proc_field(&pid, "status", "Uid:"),
        format!("Uid:\t{UID}\t{UID}\t{UID}\t{UID}")
    );
    assert_eq!(
        proc_field(&pid, "status", "Gid:"),
        format!("Gid:\t{GID}\t{GID}\t{GID}\t{GID}")
    );
    assert_eq!(
        proc_field(&pid, "status", "Groups:").trim(),
        format!("Groups:\t{GID}")
    );
    assert!(
        proc_field(&pid, "status", "NSpid:").ends_with("\t1"),
        "PID 1 of its namespace"
    );
    assert!(proc_field(&pid, "limits", "Max open files").contains("123"));
    assert!(proc_field(&pid, "limits", "Max file size").contains("1048576"));
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environ.is_empty(),
        "environment cleared: {:?}",
        String::from_utf8_lossy(&environ)
    );
    // Only stdio and flatlet's own descriptors: nothing the jailer had.
    let mut seen: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec!["dev", "flatlet", "flatlet.pid"],
        "the jail's files, nothing else"
    );
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroups.contains(":pids:/flatlet/inside-1"), "{cgroups}");
    assert_eq!(
        std::fs::read_to_string("/sys/fs/cgroup/pids/flatlet/inside-1/pids.max")
            .unwrap()
            .trim(),
        "77"
    );
    assert_eq!(
        std::fs::read_to_string("/sys/fs/cgroup/cpu/flatlet/inside-1/cpu.shares")
            .unwrap()
            .trim(),
        "512"
    );
    let vmm_net = std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino();
    assert_eq!(
        vmm_net,
        std::fs::metadata(&netns).unwrap().ino(),
        "in the network namespace"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid.parse().unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 15), "the jailer reports the VMM's end");
    let _ = Command::new("ip").args(["netns", "delete", &ns]).status();

    let c = clean(&base.0, "inside-1", &[]);
    assert!(c.status.success(), "{c:?}");
    for left in [
        base.0.join("flatlet/inside-1"),
        PathBuf::from("/sys/fs/cgroup/pids/flatlet/inside-1"),
        PathBuf::from("/sys/fs/cgroup/cpu/flatlet/inside-1"),
    ] {
        assert!(!left.exists(), "{} left behind", left.display());
    }
}

#[test]
fn daemonized_jail_detaches() {
    let Some(fl) = can_jail("daemonized_jail_detaches") else {
        return;
    };
    let base = Base::new("daemon");
    let start = Instant::now();
    let out = jail_cmd(
        &base.0,
        "daemon-1",
        &fl,
        &["--daemonize", "--new-pid-ns"],
        &["run", "--cmdline", "console=ttyS0 flatlet.stay"],
    )
    .stdin(Stdio::null())
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "the jailer returned at once"
    );
    assert!(out.stdout.is_empty(), "the VMM's console is not ours any more");
    let pid = wait_for(&base.0.join("flatlet/daemon-1/root/flatlet.pid"))
        .trim()
        .to_string();
    std::thread::sleep(Duration::from_millis(300));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    assert_eq!(fields[3], pid, "a session of its own (sid == pid)");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/fd/1")).unwrap(),
        Path::new("/dev/null")
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid.parse().unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(clean(&base.0, "daemon-1", &[]).status.success());
}

#[test]
fn cgroup_v2() {
    let Some(fl) = can_jail("cgroup_v2") else { return };
    let unified = Path::new("/sys/fs/cgroup/unified");
    let root = if unified.join("cgroup.controllers").exists() {
        unified
    } else {
        Path::new("/sys/fs/cgroup")
    };
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let setting = if controllers.split_whitespace().any(|c| c == "pids") {
        ("pids.max", "55")
    } else if controllers.split_whitespace().any(|c| c == "hugetlb") {
        ("hugetlb.2MB.max", "0")
    } else {
        eprintln!("SKIPPED cgroup_v2: no pids or hugetlb controller in the v2 hierarchy");
        return;
    };
    let base = Base::new("v2");
    let arg = format!("{}={}", setting.0, setting.1);
    let out = jail_cmd(
        &base.0,
        "v2-1",
        &fl,
        &["--cgroup-version", "2", "--cgroup", &arg],
        &["run"],
    )
    .stdin(Stdio::null())
    .output()
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = root.join("flatlet/v2-1");
    assert_eq!(
        std::fs::read_to_string(dir.join(setting.0)).unwrap().trim(),
        setting.1
    );
    assert!(
        clean(&base.0, "v2-1", &["--cgroup-version", "2"])
            .status
            .success()
    );
    assert!(!dir.exists());
}

#[test]
fn bad_flags_fail_clearly() {
    let fl = flatlet().unwrap_or_else(|| PathBuf::from("/bin/true"));
    let base = Base::new("bad");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--id".into(), "bad id".into()], "invalid id"),
        (vec!["--id".into(), "x".repeat(65)], "invalid id"),
        (
            vec!["--exec-file".into(), "/nonexistent/flatlet".into()],
            "--exec-file /nonexistent/flatlet",
        ),
        (
            vec!["--chroot-base-dir".into(), "relative/dir".into()],
            "must be an absolute path",
        ),
        (vec!["--cgroup".into(), "../../x=1".into()], "invalid --cgroup"),
        (vec!["--cgroup-version".into(), "3".into()], "must be 1 or 2"),
        (
            vec!["--resource-limit".into(), "cpu=1".into()],
            "invalid --resource-limit",
        ),
        (
            vec!["--netns".into(), "/nonexistent/netns".into()],
            "--netns /nonexistent/netns",
        ),
        (
            vec!["--parent-cgroup".into(), "../up".into()],
            "invalid --parent-cgroup",
        ),
    ];
    for (override_args, needle) in cases {
        let mut flags: Vec<(String, String)> = vec![
            ("--id".into(), "ok-1".into()),
            ("--uid".into(), "1".into()),
            ("--gid".into(), "1".into()),
            ("--exec-file".into(), fl.display().to_string()),
            ("--chroot-base-dir".into(), base.0.display().to_string()),
        ];
        let (flag, value) = (override_args[0].clone(), override_args[1].clone());
        flags.retain(|(f, _)| *f != flag);
        flags.push((flag, value));
        let mut c = Command::new(jailer());
        for (f, v) in &flags {
            c.arg(f).arg(v);
        }
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{override_args:?}: {err}");
        assert!(
            err.contains(needle),
            "{override_args:?}: {err:?} lacks {needle:?}"
        );
        assert!(
            !base.0.join("flatlet/ok-1").exists(),
            "{override_args:?}: nothing was made"
        );
    }
    let out = Command::new(jailer()).args(["--id", "x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "missing --exec-file, --uid, --gid");
}
