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
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::unistd::{Gid, Uid, chdir, chown, pivot_root, setgid, setgroups, setsid, setuid};

use crate::args::JailArgs;
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
}

impl JailError {
    /// The jailer's exit code for this error: 2 for bad arguments, 1 for
    /// a failed set-up.
    pub fn exit_code(&self) -> u8 {
        match self {
            JailError::Invalid(_) | JailError::Exists { .. } => 2,
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

/// A checked jail.
#[derive(Clone, Debug)]
pub struct Jail {
    /// The id.
    pub id: String,
    /// The VMM binary outside.
    pub exec_file: PathBuf,
    /// Its file name (also its path in the jail, from `/`).
    pub exec_name: String,
    /// `<base>/<exec name>/<id>`.
    pub dir: PathBuf,
    /// `<dir>/root`: the VMM's `/`.
    pub root: PathBuf,
    /// Target user and group.
    pub uid: Uid,
    /// Target group.
    pub gid: Gid,
    /// cgroup version.
    pub cgroup_version: u8,
    /// Parent cgroup.
    pub parent_cgroup: String,
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
}

impl Jail {
    /// Checks the arguments.
    pub fn from_args(a: &JailArgs) -> Result<Self, JailError> {
        let loc = &a.location;
        check_id(&loc.id)?;
        if !loc.chroot_base_dir.is_absolute() {
            return Err(JailError::Invalid(format!(
                "--chroot-base-dir {} must be an absolute path",
                loc.chroot_base_dir.display()
            )));
        }
        if loc.cgroup_version != 1 && loc.cgroup_version != 2 {
            return Err(JailError::Invalid(format!(
                "--cgroup-version {} must be 1 or 2",
                loc.cgroup_version
            )));
        }
        let meta = fs::metadata(&a.exec_file)
            .map_err(|e| JailError::Invalid(format!("--exec-file {}: {e}", a.exec_file.display())))?;
        if !meta.is_file() {
            return Err(JailError::Invalid(format!(
                "--exec-file {} is not a regular file",
                a.exec_file.display()
            )));
        }
        let exec_name = a
            .exec_file
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty() && !n.starts_with('.'))
            .ok_or_else(|| {
                JailError::Invalid(format!(
                    "--exec-file {} has no usable name",
                    a.exec_file.display()
                ))
            })?
            .to_string();
        if let Some(ns) = &a.netns {
            fs::metadata(ns).map_err(|e| JailError::Invalid(format!("--netns {}: {e}", ns.display())))?;
        }
        let parent_cgroup = loc.parent_cgroup.clone().unwrap_or_else(|| exec_name.clone());
        if parent_cgroup.is_empty()
            || parent_cgroup
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(JailError::Invalid(format!(
                "invalid --parent-cgroup {parent_cgroup:?}"
            )));
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
        let dir = loc.chroot_base_dir.join(&exec_name).join(&loc.id);
        Ok(Self {
            id: loc.id.clone(),
            exec_file: a.exec_file.clone(),
            root: dir.join("root"),
            dir,
            exec_name,
            uid: Uid::from_raw(a.uid),
            gid: Gid::from_raw(a.gid),
            cgroup_version: loc.cgroup_version,
            parent_cgroup,
            cgroups,
            limits,
            netns: a.netns.clone(),
            new_pid_ns: a.new_pid_ns,
            daemonize: a.daemonize,
            vmm_args: a.vmm_args.clone(),
        })
    }

    /// Where the PID of a VMM in a new PID namespace is written.
    pub fn pid_file(&self) -> PathBuf {
        self.root.join(format!("{}.pid", self.exec_name))
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
                        id: self.id.clone(),
                        path: self.dir.display().to_string(),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 3 => attempts += 1,
                Err(e) => return Err(step(format!("creating {}", self.dir.display()))(e)),
            }
        }
        fs::create_dir(&self.root).map_err(step(format!("creating {}", self.root.display())))?;
        let target = self.root.join(&self.exec_name);
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
            self.cgroup_version,
            &self.parent_cgroup,
            &self.id,
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

        let path = CString::new(format!("/{}", self.exec_name)).map_err(step("exec path"))?;
        let mut argv = vec![CString::new(self.exec_name.clone()).map_err(step("argv"))?];
        for a in &self.vmm_args {
            argv.push(CString::new(a.as_str()).map_err(step("argv"))?);
        }
        let env: [CString; 0] = [];
        nix::unistd::execve(&path, &argv, &env).map_err(step(format!("exec /{}", self.exec_name)))
    }
}

/// Removes a jail: its directory tree and cgroups. Returns what it removed.
pub fn clean(
    base: &Path,
    exec_name: &str,
    id: &str,
    cgroup_version: u8,
    parent: &str,
) -> Result<Vec<PathBuf>, JailError> {
    check_id(id)?;
    let dir = base.join(exec_name).join(id);
    let mut removed = Vec::new();
    if dir.exists() {
        // A VMM that exited in its jail can leave its root bind mount
        // behind only in its own (gone) namespace; here it is a directory.
        fs::remove_dir_all(&dir).map_err(step(format!("removing {}", dir.display())))?;
        removed.push(dir.clone());
        for p in [base.join(exec_name), base.to_path_buf()] {
            if fs::remove_dir(&p).is_ok() {
                removed.push(p);
            }
        }
    }
    removed.extend(cgroup::remove(
        Path::new(cgroup::CGROUP_ROOT),
        cgroup_version,
        parent,
        id,
    ));
    Ok(removed)
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
