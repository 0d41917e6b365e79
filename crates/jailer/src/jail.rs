//! Building a jail and entering it.
//!
//! Outside (the jailer as started): check everything, make
//! `<base>/<exec name>/<id>/root`, copy the VMM in, make the device nodes
//! it needs, set up cgroups and resource limits, join the network
//! namespace. Then, in the process that becomes the VMM (a child, when a
//! new PID namespace or detaching is asked for): a new mount namespace,
//! `pivot_root` into the jail, no inherited files, no environment, the
//! target user and group, and `exec`.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::unistd::{Gid, Uid, chdir, chown, pivot_root, setgid, setgroups, setsid, setuid};

use crate::args::{JailArgs, Location};
use crate::cgroup::{self, CgroupError, Setting};

/// Default limit on open files.
const DEFAULT_NO_FILE: u64 = 2048;
/// Longest jail id.
const MAX_ID_LEN: usize = 64;

/// Device nodes the VMM needs: path in the jail, major, minor.
pub const DEVICES: [(&str, u64, u64); 3] = [
    ("dev/kvm", 10, 232),
    ("dev/net/tun", 10, 200),
    ("dev/urandom", 1, 9),
];

/// Errors of the jailer.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
    /// A jail with this id exists.
    #[error("a jail with id {id} already exists at {path} (clean it first: flatlet-jailer clean --id {id})")]
    Exists { id: String, path: String },
    /// A set-up step failed.
    #[error("{what}: {reason}")]
    Step { what: String, reason: String },
    /// cgroups.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// `clean` refused to remove a jail: removing it now would break or
    /// delete something that is not the jail's.
    #[error("not cleaning {path}: {reason}")]
    Refused { path: String, reason: String },
}

impl JailError {
    /// The jailer's exit code for this error: 2 for bad arguments, 1 for
    /// a failed set-up.
    pub fn exit_code(&self) -> u8 {
        match self {
            JailError::Invalid(_) | JailError::Exists { .. } | JailError::Refused { .. } => 2,
            JailError::Cgroup(CgroupError::Syntax(_) | CgroupError::Version(_)) => 2,
            _ => 1,
        }
    }
}

fn step<E: std::fmt::Display>(what: impl Into<String>) -> impl FnOnce(E) -> JailError {
    let what = what.into();
    move |e| JailError::Step {
        what,
        reason: e.to_string(),
    }
}

/// A resource limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Which resource.
    pub resource: Resource,
    /// Soft and hard limit.
    pub value: u64,
}

/// Parses `fsize=N` or `no-file=N`.
pub fn parse_limit(s: &str) -> Result<Limit, JailError> {
    let bad = || {
        JailError::Invalid(format!(
            "invalid --resource-limit {s:?}: expected fsize=N or no-file=N"
        ))
    };
    let (name, value) = s.split_once('=').ok_or_else(bad)?;
    let value: u64 = value.parse().map_err(|_| bad())?;
    let resource = match name {
        "fsize" => Resource::RLIMIT_FSIZE,
        "no-file" => Resource::RLIMIT_NOFILE,
        _ => return Err(bad()),
    };
    Ok(Limit { resource, value })
}

/// Checks a jail id: letters, digits and '-', 1 to 64 of them.
pub fn check_id(id: &str) -> Result<(), JailError> {
    if id.is_empty() || id.len() > MAX_ID_LEN || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(JailError::Invalid(format!(
            "invalid id {id:?}: use 1 to {MAX_ID_LEN} letters, digits or '-'"
        )));
    }
    Ok(())
}

/// Checks an exec name (the VMM binary's file name, which names the
/// directory that holds its jails): a plain file name, with no `/` and not
/// starting with `.` (so neither `.` nor `..`), not empty.
pub fn check_exec_name(name: &str) -> Result<(), JailError> {
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\0']) {
        return Err(JailError::Invalid(format!(
            "invalid exec name {name:?}: it must be a plain file name (not empty, no '/', \
             not starting with '.')"
        )));
    }
    Ok(())
}

/// Checks the directory jails are made in: an absolute path with no `..`.
pub fn check_base_dir(base: &Path) -> Result<(), JailError> {
    if !base.is_absolute() {
        return Err(JailError::Invalid(format!(
            "--chroot-base-dir {} must be an absolute path",
            base.display()
        )));
    }
    if base.components().any(|c| c == Component::ParentDir) {
        return Err(JailError::Invalid(format!(
            "--chroot-base-dir {} must not contain '..'",
            base.display()
        )));
    }
    Ok(())
}

/// Where a jail is, checked: `<base>/<exec name>/<id>` and its cgroups.
/// Running and cleaning a jail both make one with [`Place::check`], so
/// that both accept exactly the same arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    /// The directory jails are made in.
    pub base: PathBuf,
    /// The VMM binary's file name.
    pub exec_name: String,
    /// The jail's id.
    pub id: String,
    /// cgroup version.
    pub cgroup_version: u8,
    /// The cgroup the jail's cgroup goes in.
    pub parent_cgroup: String,
}

impl Place {
    /// Checks a jail's location: the id, the exec name, the base
    /// directory, the cgroup version and the parent cgroup.
    pub fn check(loc: &Location, exec_name: &str) -> Result<Self, JailError> {
        check_id(&loc.id)?;
        check_exec_name(exec_name)?;
        check_base_dir(&loc.chroot_base_dir)?;
        if loc.cgroup_version != 1 && loc.cgroup_version != 2 {
            return Err(JailError::Invalid(format!(
                "--cgroup-version {} must be 1 or 2",
                loc.cgroup_version
            )));
        }
        let parent_cgroup = loc.parent_cgroup.clone().unwrap_or_else(|| exec_name.to_string());
        if parent_cgroup.is_empty()
            || parent_cgroup
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(JailError::Invalid(format!(
                "invalid --parent-cgroup {parent_cgroup:?}"
            )));
        }
        Ok(Self {
            base: loc.chroot_base_dir.clone(),
            exec_name: exec_name.to_string(),
            id: loc.id.clone(),
            cgroup_version: loc.cgroup_version,
            parent_cgroup,
        })
    }

    /// `<base>/<exec name>`: the directory that holds this VMM's jails.
    pub fn exec_dir(&self) -> PathBuf {
        self.base.join(&self.exec_name)
    }

    /// `<base>/<exec name>/<id>`: the jail.
    pub fn dir(&self) -> PathBuf {
        self.exec_dir().join(&self.id)
    }
}

/// A checked jail.
#[derive(Clone, Debug)]
pub struct Jail {
    /// Where it is.
    pub place: Place,
    /// The VMM binary outside.
    pub exec_file: PathBuf,
    /// `<base>/<exec name>/<id>`.
    pub dir: PathBuf,
    /// `<dir>/root`: the VMM's `/`.
    pub root: PathBuf,
    /// Target user and group.
    pub uid: Uid,
    /// Target group.
    pub gid: Gid,
    /// cgroup settings.
    pub cgroups: Vec<Setting>,
    /// Resource limits.
    pub limits: Vec<Limit>,
    /// Network namespace to join.
    pub netns: Option<PathBuf>,
    /// Run as PID 1 of a new PID namespace.
    pub new_pid_ns: bool,
    /// Detach.
    pub daemonize: bool,
    /// The VMM's arguments.
    pub vmm_args: Vec<String>,
    /// When the jailer started, for the VMM's start-time flags.
    pub start: StartTimes,
}

/// The environment variable that carries the jailer's [`StartTimes`] to
/// the child that becomes the VMM (a new PID namespace, or detaching).
pub const START_ENV: &str = "FLATLET_JAILER_START";

/// Firecracker's jailer contract: the VMM is started with `--id <id>
/// --start-time-us <t> --start-time-cpu-us <t> --parent-cpu-time-us <t>`
/// before the user's arguments, so that its boot time and start-up
/// metrics count from the jailer's start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartTimes {
    /// The jailer's start, in microseconds of `CLOCK_MONOTONIC`.
    pub wall_us: u64,
    /// This process's CPU time at that start (it goes on across `exec`).
    pub cpu_us: u64,
    /// CPU time a parent jailer process spent before this one.
    pub parent_cpu_us: u64,
}

fn clock_us(clock: nix::time::ClockId) -> u64 {
    nix::time::clock_gettime(clock)
        .map(|t| std::time::Duration::from(t).as_micros() as u64)
        .unwrap_or(0)
}

impl StartTimes {
    /// Now, or what the parent jailer passed in [`START_ENV`]
    /// (`<wall_us>,<parent_cpu_us>`: this process's CPU time then counts
    /// from 0).
    pub fn now() -> Self {
        let inherited = std::env::var(START_ENV).ok().and_then(|v| {
            let (wall, parent) = v.split_once(',')?;
            Some(Self {
                wall_us: wall.parse().ok()?,
                cpu_us: 0,
                parent_cpu_us: parent.parse().ok()?,
            })
        });
        inherited.unwrap_or_else(|| Self {
            wall_us: clock_us(nix::time::ClockId::CLOCK_MONOTONIC),
            cpu_us: clock_us(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID),
            parent_cpu_us: 0,
        })
    }

    /// What a child process is given in [`START_ENV`]: the start, and the
    /// CPU time spent so far.
    pub fn for_child(&self) -> String {
        let spent = clock_us(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(self.cpu_us);
        format!("{},{}", self.wall_us, spent + self.parent_cpu_us)
    }

    /// The VMM's arguments before the user's.
    pub fn vmm_flags(&self, id: &str) -> Vec<String> {
        vec![
            "--id".into(),
            id.into(),
            "--start-time-us".into(),
            self.wall_us.to_string(),
            "--start-time-cpu-us".into(),
            self.cpu_us.to_string(),
            "--parent-cpu-time-us".into(),
            self.parent_cpu_us.to_string(),
        ]
    }
}

impl Jail {
    /// Checks the arguments (the location with [`Place::check`], as `clean`
    /// does).
    pub fn from_args(a: &JailArgs) -> Result<Self, JailError> {
        let exec_name = a.exec_file.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            JailError::Invalid(format!(
                "--exec-file {} has no usable name",
                a.exec_file.display()
            ))
        })?;
        let place = Place::check(&a.location, exec_name)?;
        let meta = fs::metadata(&a.exec_file)
            .map_err(|e| JailError::Invalid(format!("--exec-file {}: {e}", a.exec_file.display())))?;
        if !meta.is_file() {
            return Err(JailError::Invalid(format!(
                "--exec-file {} is not a regular file",
                a.exec_file.display()
            )));
        }
        if let Some(ns) = &a.netns {
            fs::metadata(ns).map_err(|e| JailError::Invalid(format!("--netns {}: {e}", ns.display())))?;
        }
        let cgroups = a
            .cgroups
            .iter()
            .map(|s| Setting::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let mut limits = vec![Limit {
            resource: Resource::RLIMIT_NOFILE,
            value: DEFAULT_NO_FILE,
        }];
        for s in &a.resource_limits {
            let l = parse_limit(s)?;
            limits.retain(|x| x.resource != l.resource);
            limits.push(l);
        }
        let dir = place.dir();
        Ok(Self {
            place,
            exec_file: a.exec_file.clone(),
            root: dir.join("root"),
            dir,
            uid: Uid::from_raw(a.uid),
            gid: Gid::from_raw(a.gid),
            cgroups,
            limits,
            netns: a.netns.clone(),
            new_pid_ns: a.new_pid_ns,
            daemonize: a.daemonize,
            vmm_args: a.vmm_args.clone(),
            start: StartTimes::now(),
        })
    }

    /// Warnings about a jail that is legal but unwise: the VMM running as
    /// root's user or group gives a guest that escapes into it much of the
    /// host, jail or not.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.uid.is_root() {
            w.push(
                "--uid 0: the VMM will run as root; a guest that escapes into it gets root's powers".into(),
            );
        }
        if self.gid.as_raw() == 0 {
            w.push(
                "--gid 0: the VMM will run in group 0 (root), with that group's access to host files".into(),
            );
        }
        w
    }

    /// Where the PID of a VMM in a new PID namespace is written.
    pub fn pid_file(&self) -> PathBuf {
        self.root.join(format!("{}.pid", self.place.exec_name))
    }

    /// Everything done from outside the jail, in the jailer's process: the
    /// directory tree, the VMM binary, device nodes, cgroups (with this
    /// process in them), resource limits, the network namespace.
    pub fn prepare(&self) -> Result<(), JailError> {
        let parent = self.dir.parent().unwrap_or(Path::new("/"));
        // `clean` of another jail removes the parents when they are empty;
        // if that happens between the two steps, make them again.
        let mut attempts = 0;
        loop {
            fs::create_dir_all(parent).map_err(step(format!("creating {}", parent.display())))?;
            match fs::create_dir(&self.dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(JailError::Exists {
                        id: self.place.id.clone(),
                        path: self.dir.display().to_string(),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 3 => attempts += 1,
                Err(e) => return Err(step(format!("creating {}", self.dir.display()))(e)),
            }
        }
        fs::create_dir(&self.root).map_err(step(format!("creating {}", self.root.display())))?;
        let target = self.root.join(&self.place.exec_name);
        // A copy, not a link: the host's binary must not be reachable.
        fs::copy(&self.exec_file, &target).map_err(step(format!("copying {}", self.exec_file.display())))?;
        fs::set_permissions(&target, fs::Permissions::from_mode(0o750))
            .map_err(step("chmod of the VMM binary"))?;
        self.make_devices()?;
        for p in [&self.root, &target] {
            chown(p, Some(self.uid), Some(self.gid)).map_err(step(format!("chown {}", p.display())))?;
        }
        cgroup::setup(
            Path::new(cgroup::CGROUP_ROOT),
            self.place.cgroup_version,
            &self.place.parent_cgroup,
            &self.place.id,
            &self.cgroups,
            std::process::id(),
        )?;
        for l in &self.limits {
            setrlimit(l.resource, l.value, l.value).map_err(step(format!("setrlimit {:?}", l.resource)))?;
        }
        if let Some(ns) = &self.netns {
            let f = fs::File::open(ns).map_err(step(format!("opening {}", ns.display())))?;
            setns(f, CloneFlags::CLONE_NEWNET)
                .map_err(step(format!("joining network namespace {}", ns.display())))?;
        }
        Ok(())
    }

    fn make_devices(&self) -> Result<(), JailError> {
        for (path, major, minor) in DEVICES {
            let node = self.root.join(path);
            if let Some(d) = node.parent() {
                fs::create_dir_all(d).map_err(step(format!("creating {}", d.display())))?;
            }
            mknod(
                &node,
                SFlag::S_IFCHR,
                Mode::S_IRUSR | Mode::S_IWUSR,
                makedev(major, minor),
            )
            .map_err(step(format!("mknod {}", node.display())))?;
            chown(&node, Some(self.uid), Some(self.gid))
                .map_err(step(format!("chown {}", node.display())))?;
        }
        Ok(())
    }

    /// Everything done in the process that becomes the VMM: the mount
    /// namespace and `pivot_root`, detaching, the descriptors, the user,
    /// and `exec`. Returns only on failure.
    pub fn enter_and_exec(&self) -> JailError {
        match self.enter() {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    fn enter(&self) -> Result<std::convert::Infallible, JailError> {
        // Needed after the root changes.
        let devnull = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(step("opening /dev/null"))?;
        unshare(CloneFlags::CLONE_NEWNS).map_err(step("new mount namespace"))?;
        // Nothing this namespace mounts propagates back to the host.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(step("making / a slave mount"))?;
        // pivot_root needs the new root to be a mount point.
        mount(
            Some(&self.root),
            &self.root,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(step("bind-mounting the jail root"))?;
        chdir(&self.root).map_err(step("chdir into the jail"))?;
        fs::create_dir("old_root").map_err(step("creating old_root"))?;
        pivot_root(".", "old_root").map_err(step("pivot_root"))?;
        chdir("/").map_err(step("chdir /"))?;
        umount2("/old_root", MntFlags::MNT_DETACH).map_err(step("unmounting the old root"))?;
        fs::remove_dir("/old_root").map_err(step("removing old_root"))?;

        if self.daemonize {
            setsid().map_err(step("setsid"))?;
            nix::unistd::dup2_stdin(&devnull).map_err(step("stdin to /dev/null"))?;
            nix::unistd::dup2_stdout(&devnull).map_err(step("stdout to /dev/null"))?;
            nix::unistd::dup2_stderr(&devnull).map_err(step("stderr to /dev/null"))?;
        }
        drop(devnull);
        flatlet_vmm::sys::cloexec_inherited_fds().map_err(step("closing inherited files"))?;
        setgroups(&[self.gid]).map_err(step("setgroups"))?;
        setgid(self.gid).map_err(step("setgid"))?;
        setuid(self.uid).map_err(step("setuid"))?;

        let path = CString::new(format!("/{}", self.place.exec_name)).map_err(step("exec path"))?;
        let mut argv = vec![CString::new(self.place.exec_name.clone()).map_err(step("argv"))?];
        for a in self.start.vmm_flags(&self.place.id).iter().chain(&self.vmm_args) {
            argv.push(CString::new(a.as_str()).map_err(step("argv"))?);
        }
        let env: [CString; 0] = [];
        nix::unistd::execve(&path, &argv, &env).map_err(step(format!("exec /{}", self.place.exec_name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["a", "vm-1", "ABC-def-123", &"x".repeat(64)] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "../x", "a/b", "vm_1", "é", &"x".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn exec_names() {
        for ok in ["flatlet", "firecracker-v1.2", "a b"] {
            assert!(check_exec_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "../x", "/abs/dir", "a/b", "x/", ".hidden", "a\0b"] {
            assert!(check_exec_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn base_dirs() {
        for ok in ["/", "/srv/jailer", "/srv/./jailer/", "/srv/..jailer"] {
            assert!(check_base_dir(Path::new(ok)).is_ok(), "{ok}");
        }
        for bad in ["", "relative/dir", "./srv", "/srv/../etc", "/srv/jailer/.."] {
            assert!(check_base_dir(Path::new(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn places() {
        let loc = |id: &str, base: &str, parent: Option<&str>| Location {
            id: id.into(),
            chroot_base_dir: base.into(),
            cgroup_version: 1,
            parent_cgroup: parent.map(String::from),
        };
        let p = Place::check(&loc("vm-1", "/srv/jailer", None), "flatlet").unwrap();
        assert_eq!(p.dir(), Path::new("/srv/jailer/flatlet/vm-1"));
        assert_eq!(p.parent_cgroup, "flatlet");
        for (l, exec) in [
            (loc("../x", "/srv", None), "flatlet"),
            (loc("vm", "/srv", None), "/abs/dir"),
            (loc("vm", "/srv", None), "../x"),
            (loc("vm", "srv", None), "flatlet"),
            (loc("vm", "/srv/..", None), "flatlet"),
            (loc("vm", "/srv", Some("../up")), "flatlet"),
            (loc("vm", "/srv", Some("")), "flatlet"),
        ] {
            assert!(Place::check(&l, exec).is_err(), "{l:?} {exec:?}");
        }
        let mut v3 = loc("vm", "/srv", None);
        v3.cgroup_version = 3;
        assert!(Place::check(&v3, "flatlet").is_err());
    }

    #[test]
    fn limits() {
        assert_eq!(
            parse_limit("fsize=1024").unwrap(),
            Limit {
                resource: Resource::RLIMIT_FSIZE,
                value: 1024
            }
        );
        assert_eq!(
            parse_limit("no-file=64").unwrap().resource,
            Resource::RLIMIT_NOFILE
        );
        for bad in ["fsize", "fsize=x", "cpu=1", "no-file=-1", "=5"] {
            assert!(parse_limit(bad).is_err(), "{bad}");
        }
    }
}
