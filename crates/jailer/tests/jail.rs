//! The jailer through its binary, as root: a jailed flatlet boots the test
//! guest; inside, it runs as UID:GID in its own root, with the limits and
//! cgroup values asked for; a second jail of the same id is refused; bad
//! flags fail clearly; clean-up leaves nothing behind, removes nothing but
//! the jail, and refuses a jail whose VMM still runs.
//!
//! Tests that need root, /dev/kvm or the flatlet binary say SKIPPED on
//! stderr when one is missing, or fail when FLATLET_REQUIRE_HOST=1 (CI).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
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

/// Whether CI asked for a host with everything the tests need.
fn host_required() -> bool {
    std::env::var_os("FLATLET_REQUIRE_HOST").is_some_and(|v| v == "1")
}

/// A test that cannot run here: a failure when the host must have what it
/// lacks (FLATLET_REQUIRE_HOST=1 and `required`), else a SKIPPED line that
/// cargo test shows. libtest captures the print!/eprint! macros only, so
/// this writes to stderr directly.
fn skip(test: &str, why: &str, required: bool) {
    assert!(
        !(required && host_required()),
        "{test}: FLATLET_REQUIRE_HOST=1 but {why}"
    );
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// Whether this process is root; says why not when it is not.
fn is_root(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        skip(test, "the jailer needs root", true);
    }
    root
}

/// Whether the jail tests can run here; says why not when they cannot.
fn can_jail(test: &str) -> Option<PathBuf> {
    if !is_root(test) {
        return None;
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        skip(test, "/dev/kvm is not usable", true);
        return None;
    }
    let f = flatlet();
    if f.is_none() {
        skip(
            test,
            "build flatlet first (cargo test --workspace builds it)",
            true,
        );
    }
    f
}

/// A jail id no other run of these tests uses at the same time (their
/// cgroups are shared: `<parent>/<id>`).
fn unique(tag: &str) -> String {
    format!("{tag}-{}", std::process::id())
}

/// A base directory for jails, removed (with its jails) on drop.
struct Base(PathBuf);

impl Base {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("flatlet-jails-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Base(p)
    }

    /// A new one, made.
    fn made(tag: &str) -> Self {
        let b = Self::new(tag);
        std::fs::create_dir_all(&b.0).unwrap();
        b
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

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A directory holding a file that must survive whatever the test does.
fn victim(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let precious = dir.join("precious");
    std::fs::write(&precious, "keep me").unwrap();
    precious
}

/// `clean` refused (exit 2) with `needle` in its message, and `survivor`
/// is still there.
fn assert_refused(out: &Output, needle: &str, survivor: &Path) {
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(out).contains(needle), "{:?} lacks {needle:?}", stderr(out));
    assert!(survivor.exists(), "{} was deleted", survivor.display());
}

#[test]
fn jailed_flatlet_boots_the_test_guest() {
    let Some(fl) = can_jail("jailed_flatlet_boots_the_test_guest") else {
        return;
    };
    let base = Base::new("boot");
    let boot_1 = unique("boot");
    let out = jail_cmd(&base.0, &boot_1, &fl, &[], &["run", "--vcpus", "2"])
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
    let root = base.0.join(format!("flatlet/{boot_1}/root"));
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
    let again = jail_cmd(&base.0, &boot_1, &fl, &[], &["run"]).output().unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    assert!(root.join("flatlet").exists());

    let c = clean(&base.0, &boot_1, &[]);
    assert!(c.status.success());
    assert!(!base.0.join(format!("flatlet/{boot_1}")).exists());
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
    let inside_1 = unique("inside");
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
        &inside_1,
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
    let root = base.0.join(format!("flatlet/{inside_1}/root"));
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
    assert!(
        cgroups.contains(&format!(":pids:/flatlet/{inside_1}")),
        "{cgroups}"
    );
    assert_eq!(
        std::fs::read_to_string(format!("/sys/fs/cgroup/pids/flatlet/{inside_1}/pids.max"))
            .unwrap()
            .trim(),
        "77"
    );
    assert_eq!(
        std::fs::read_to_string(format!("/sys/fs/cgroup/cpu/flatlet/{inside_1}/cpu.shares"))
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

    let c = clean(&base.0, &inside_1, &[]);
    assert!(c.status.success(), "{c:?}");
    for left in [
        base.0.join(format!("flatlet/{inside_1}")),
        PathBuf::from(format!("/sys/fs/cgroup/pids/flatlet/{inside_1}")),
        PathBuf::from(format!("/sys/fs/cgroup/cpu/flatlet/{inside_1}")),
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
    let daemon_1 = unique("daemon");
    let start = Instant::now();
    let out = jail_cmd(
        &base.0,
        &daemon_1,
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
    let pid = wait_for(&base.0.join(format!("flatlet/{daemon_1}/root/flatlet.pid")))
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
    assert!(clean(&base.0, &daemon_1, &[]).status.success());
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
        // Not a failure even under FLATLET_REQUIRE_HOST=1: which
        // controllers the v2 hierarchy has is the host's cgroup layout
        // (on a hybrid host, those bound to v1 hierarchies are missing from
        // it: here it has only hugetlb), which tools/setup-test-host does
        // not arrange and could not without remounting the host's cgroups.
        skip(
            "cgroup_v2",
            "no pids or hugetlb controller in the v2 hierarchy",
            false,
        );
        return;
    };
    let base = Base::new("v2");
    let v2_1 = unique("v2");
    let arg = format!("{}={}", setting.0, setting.1);
    let out = jail_cmd(
        &base.0,
        &v2_1,
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
    let dir = root.join(format!("flatlet/{v2_1}"));
    assert_eq!(
        std::fs::read_to_string(dir.join(setting.0)).unwrap().trim(),
        setting.1
    );
    assert!(clean(&base.0, &v2_1, &["--cgroup-version", "2"]).status.success());
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
        (
            vec!["--chroot-base-dir".into(), format!("{}/x/..", base.0.display())],
            "must not contain '..'",
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

#[test]
fn clean_refuses_an_exec_name_that_is_a_path() {
    let outside = Base::new("abs-outside");
    let precious = victim(&outside.0.join("victim"));
    let base = Base::made("abs");
    let out = clean(&base.0, "victim", &["--exec-name", outside.0.to_str().unwrap()]);
    assert_refused(&out, "invalid exec name", &precious);
    assert!(base.0.is_dir());
}

#[test]
fn clean_refuses_an_exec_name_with_dot_dot() {
    let top = Base::made("dotdot");
    let precious = victim(&top.0.join("x/victim"));
    let base = top.0.join("base");
    std::fs::create_dir(&base).unwrap();
    for name in ["../x", "..", "."] {
        let out = clean(&base, "victim", &["--exec-name", name]);
        assert_refused(&out, "invalid exec name", &precious);
    }
}

#[test]
fn clean_refuses_a_relative_or_dot_dot_base_dir() {
    let top = Base::made("relative");
    let precious = victim(&top.0.join("rel/flatlet/victim/root"));
    let out = Command::new(jailer())
        .args(["clean", "--id", "victim", "--chroot-base-dir", "rel"])
        .current_dir(&top.0)
        .output()
        .unwrap();
    assert_refused(&out, "must be an absolute path", &precious);
    // The same jail through an absolute path that climbs.
    let climbing = top.0.join("other/../rel");
    std::fs::create_dir(top.0.join("other")).unwrap();
    let out = clean(&climbing, "victim", &[]);
    assert_refused(&out, "must not contain '..'", &precious);
}

#[test]
fn clean_never_removes_the_base_dir() {
    let base = Base::made("keep-base");
    let keep_1 = unique("keep-1");
    let keep_2 = unique("keep-2");
    for id in [&keep_1, &keep_2] {
        std::fs::create_dir_all(base.0.join("flatlet").join(id).join("root/dev")).unwrap();
    }
    let out = clean(&base.0, &keep_1, &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(!base.0.join(format!("flatlet/{keep_1}")).exists());
    assert!(
        base.0.join(format!("flatlet/{keep_2}/root")).is_dir(),
        "another jail stays"
    );
    let out = clean(&base.0, &keep_2, &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(!base.0.join("flatlet").exists(), "left empty: removed");
    assert!(base.0.is_dir(), "the base directory stays");
}

#[test]
fn clean_refuses_what_is_not_a_jail() {
    let base = Base::made("not-a-jail");
    let precious = victim(&base.0.join("flatlet/home"));
    let out = clean(&base.0, "home", &[]);
    assert_refused(&out, "is it a jail?", &precious);
    let outside = Base::new("not-a-jail-outside");
    let precious = victim(&outside.0.join("root"));
    std::os::unix::fs::symlink(&outside.0, base.0.join("flatlet/linked")).unwrap();
    let out = clean(&base.0, "linked", &[]);
    assert_refused(&out, "symbolic link", &precious);
}

/// Removes a bind mount when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn clean_refuses_a_jail_with_a_mount_inside() {
    const TEST: &str = "clean_refuses_a_jail_with_a_mount_inside";
    if !is_root(TEST) {
        return;
    }
    let outside = Base::new("mount-outside");
    let precious = victim(&outside.0);
    let base = Base::made("mount");
    let mnt_1 = unique("mnt");
    let drive = base.0.join(format!("flatlet/{mnt_1}/root/drives"));
    std::fs::create_dir_all(&drive).unwrap();
    nix::mount::mount(
        Some(&outside.0),
        &drive,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let mounted = Mounted(drive.clone());
    let out = clean(&base.0, &mnt_1, &[]);
    assert_refused(&out, "mounted inside", &precious);
    drop(mounted);
    let out = clean(&base.0, &mnt_1, &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(!base.0.join(format!("flatlet/{mnt_1}")).exists());
    assert!(precious.exists());
}

/// A VMM a test started, killed when dropped (by a failed assertion too),
/// so that no test leaves one behind.
enum Vmm {
    /// A child of the test (reaped, so its PID cannot be reused meanwhile).
    Child(std::process::Child),
    /// A detached one, by PID; `None` once killed.
    Detached(Option<i32>),
}

impl Vmm {
    fn kill(&mut self) {
        match self {
            Vmm::Child(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Vmm::Detached(pid) => {
                if let Some(pid) = pid.take() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    wait_until("the detached VMM never went", || {
                        !Path::new(&format!("/proc/{pid}")).exists()
                    });
                }
            }
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn clean_refuses_while_the_vmm_runs() {
    let Some(fl) = can_jail("clean_refuses_while_the_vmm_runs") else {
        return;
    };
    let base = Base::new("running");
    let run_1 = unique("run-1");
    let run_2 = unique("run-2");

    // In the jailer's process, no cgroup, no PID file: found by its root.
    let child = jail_cmd(&base.0, &run_1, &fl, &[], &["--api-sock", "/api.sock"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid_1 = child.id();
    let mut vmm_1 = Vmm::Child(child);
    let dir = base.0.join(format!("flatlet/{run_1}"));
    wait_until("the VMM never made its socket", || {
        dir.join("root/api.sock").exists()
    });
    let out = clean(&base.0, &run_1, &[]);
    assert_refused(
        &out,
        &format!("still running (pid {pid_1})"),
        &dir.join("root/flatlet"),
    );
    assert!(dir.join("root/api.sock").exists() && dir.join("root/dev/kvm").exists());

    // Detached, in a new PID namespace and a cgroup.
    let mut extra = vec!["--daemonize", "--new-pid-ns"];
    let pids = Path::new("/sys/fs/cgroup/pids");
    if pids.is_dir() {
        extra.extend(["--cgroup", "pids.max=100"]);
    }
    let out = jail_cmd(&base.0, &run_2, &fl, &extra, &["--api-sock", "/api.sock"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let dir2 = base.0.join(format!("flatlet/{run_2}"));
    let pid_2 = wait_for(&dir2.join("root/flatlet.pid")).trim().to_string();
    let mut vmm_2 = Vmm::Detached(Some(pid_2.parse().unwrap()));
    wait_until("the detached VMM never made its socket", || {
        dir2.join("root/api.sock").exists()
    });
    let out = clean(&base.0, &run_2, &[]);
    assert_refused(
        &out,
        &format!("still running (pid {pid_2})"),
        &dir2.join("root/flatlet"),
    );

    // Once they are gone, both go.
    vmm_1.kill();
    vmm_2.kill();
    for id in [&run_1, &run_2] {
        let out = clean(&base.0, id, &[]);
        assert!(out.status.success(), "{out:?}");
    }
    assert!(!dir.exists() && !dir2.exists());
    assert!(!pids.join(format!("flatlet/{run_2}")).exists());
}

/// A file the kernel cannot execute.
fn not_a_vmm(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let f = dir.join("not-a-vmm");
    std::fs::write(&f, "this is not a program\n").unwrap();
    f
}

#[test]
fn clean_removes_a_jail_whose_exec_failed() {
    if !is_root("clean_removes_a_jail_whose_exec_failed") {
        return;
    }
    let files = Base::new("exec-failed-files");
    let exec = not_a_vmm(&files.0);
    let base = Base::new("exec-failed");
    let fail_1 = unique("fail");
    let mut extra = vec![];
    let pids = Path::new("/sys/fs/cgroup/pids");
    if pids.is_dir() {
        extra.extend(["--cgroup", "pids.max=10"]);
    }
    let out = jail_cmd(&base.0, &fail_1, &exec, &extra, &[])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("exec /not-a-vmm"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
    let dir = base.0.join(format!("not-a-vmm/{fail_1}"));
    assert!(dir.join("root/not-a-vmm").exists(), "the jail was made");

    let out = clean(&base.0, &fail_1, &["--exec-name", "not-a-vmm"]);
    assert!(out.status.success(), "{out:?}");
    assert!(!dir.exists());
    assert!(!pids.join(format!("not-a-vmm/{fail_1}")).exists());
    assert!(base.0.is_dir());
}

#[test]
fn warns_when_the_vmm_would_run_as_root() {
    if !is_root("warns_when_the_vmm_would_run_as_root") {
        return;
    }
    let files = Base::new("as-root-files");
    let exec = not_a_vmm(&files.0);
    let base = Base::new("as-root");
    let root_1 = unique("root");
    let out = Command::new(jailer())
        .args(["--id", &root_1, "--uid", "0", "--gid", "0"])
        .arg("--exec-file")
        .arg(&exec)
        .arg("--chroot-base-dir")
        .arg(&base.0)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(err.contains("flatlet-jailer: warning: --uid 0"), "{err}");
    assert!(err.contains("flatlet-jailer: warning: --gid 0"), "{err}");
    let out = clean(&base.0, &root_1, &["--exec-name", "not-a-vmm"]);
    assert!(out.status.success(), "{out:?}");
}

/// Firecracker's jailer contract: the VMM gets `--id <id> --start-time-us
/// <t> --start-time-cpu-us <t> --parent-cpu-time-us <t>` before the
/// user's arguments. A static stub VMM records its argv inside the jail.
#[test]
fn the_vmm_gets_firecrackers_start_flags_first() {
    let test = "the_vmm_gets_firecrackers_start_flags_first";
    if !is_root(test) {
        return;
    }
    let base = Base::made("contract");
    let src = base.0.join("stub.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\nint main(int c, char **v) { FILE *f = fopen(\"/argv.txt\", \"w\");\n\
         if (!f) return 3; for (int i = 0; i < c; i++) fprintf(f, \"%s\\n\", v[i]); return fclose(f) ? 4 : 0; }\n",
    )
    .unwrap();
    std::fs::create_dir_all(base.0.join("bin")).unwrap();
    let stub = base.0.join("bin/stub");
    let cc = Command::new("cc")
        .arg("-static")
        .arg("-o")
        .arg(&stub)
        .arg(&src)
        .output();
    if !cc.as_ref().is_ok_and(|o| o.status.success()) {
        skip(test, "no C compiler that links statically", true);
        return;
    }
    for (tag, extra) in [("plain", &[][..]), ("pidns", &["--new-pid-ns"][..])] {
        let id = unique(&format!("contract-{tag}"));
        let before = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
        let before_us = Duration::from(before).as_micros() as u64;
        let out = jail_cmd(
            &base.0,
            &id,
            &stub,
            extra,
            &["--api-sock", "/api.sock", "--no-seccomp"],
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
        assert_eq!(out.status.code(), Some(0), "{tag}: {}", stderr(&out));
        let argv = std::fs::read_to_string(base.0.join(format!("stub/{id}/root/argv.txt"))).unwrap();
        let argv: Vec<&str> = argv.lines().collect();
        assert_eq!(argv.len(), 12, "{argv:?}");
        assert_eq!(argv[0], "stub");
        assert_eq!(&argv[1..3], &["--id", id.as_str()]);
        assert_eq!(argv[3], "--start-time-us");
        let start: u64 = argv[4].parse().unwrap();
        assert!(
            start >= before_us && start < before_us + 10_000_000,
            "{start} vs {before_us}"
        );
        assert_eq!(argv[5], "--start-time-cpu-us");
        let cpu: u64 = argv[6].parse().unwrap();
        assert_eq!(argv[7], "--parent-cpu-time-us");
        let parent: u64 = argv[8].parse().unwrap();
        if tag == "pidns" {
            // The VMM is a new process: its CPU time counts from 0, and
            // the jailer's goes in --parent-cpu-time-us.
            assert_eq!(cpu, 0);
            assert!(parent > 0, "{argv:?}");
        } else {
            assert_eq!(parent, 0);
        }
        assert_eq!(&argv[9..], &["--api-sock", "/api.sock", "--no-seccomp"]);
        assert!(clean(&base.0, &id, &["--exec-name", "stub"]).status.success());
    }
}
