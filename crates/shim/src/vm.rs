//! One container's microVM: flatlet started through flatlet-jailer (its
//! own chroot, cgroup, unprivileged user, seccomp on), configured through
//! its API socket, with the agent's image as the read-only root drive, the
//! container's image as the second drive (`/dev/vdb` in the guest) and a
//! vsock device whose Unix socket the shim reaches the agent through.

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::chown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::config::Config;

/// The guest's vsock CID (one VM per flatlet: any value above 2).
const GUEST_CID: u32 = 3;
/// `PUT /snapshot/load` of a template, in the clone's jail.
const SNAPSHOT_LOAD: &str = r#"{"snapshot_path": "/template.state",
    "mem_backend": {"backend_type": "File", "backend_path": "/template.mem"}, "resume_vm": true}"#;
/// flatlet's threads besides its vCPUs (API, VMM, signal and helper
/// threads), with room to spare: its cgroup's `pids.max` is this plus the
/// vCPUs.
const VMM_THREADS: u32 = 16;
/// The jailer's exec-file name, the jail's directory name under the base.
const EXEC_NAME: &str = "flatlet";

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("starting {what}: {source}")]
    Spawn { what: String, source: std::io::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("flatlet's API socket did not accept a connection in {0:?} (see {1})")]
    NoApi(Duration, String),
    #[error("the VM ended during its set-up (see {0})")]
    Ended(String),
    #[error("flatlet's API refused {path}: {status} {body}")]
    Api { path: String, status: u16, body: String },
    #[error("flatlet's API: {0}")]
    Client(String),
    #[error("flatlet-jailer clean --id {id}: {output}")]
    Clean { id: String, output: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Io { what, source }
}

/// The jail id for a container: letters, digits and `-` (what the jailer
/// takes), unique per namespace and container id.
pub fn jail_id(namespace: &str, id: &str) -> String {
    let mut h = std::hash::DefaultHasher::new();
    (namespace, id).hash(&mut h);
    let readable: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    format!("{readable}-{:016x}", h.finish())
}

/// The directory the jailer makes for `jail_id`.
pub fn jail_root(config: &Config, jail_id: &str) -> PathBuf {
    config.jail_base.join(EXEC_NAME).join(jail_id).join("root")
}

/// A running VM.
pub struct Vm {
    jail_id: String,
    root: PathBuf,
    pid: u32,
    exit: Arc<(Mutex<Option<i32>>, Condvar)>,
    config: Config,
}

impl Vm {
    /// Starts flatlet in its jail with `rootfs` as the container's drive;
    /// the console goes to `console`. Returns once the guest is started.
    /// With `template` (a directory holding `template.state` and
    /// `template.mem`, see `crate::template`), the VM is restored from that
    /// snapshot instead of booted; its drive paths and vsock socket are the
    /// same paths inside this VM's own jail.
    pub fn start(
        config: &Config,
        jail_id: &str,
        rootfs: &Path,
        console: &Path,
        template: Option<&Path>,
    ) -> Result<Self, VmError> {
        let root = jail_root(config, jail_id);
        let log = File::create(console).map_err(io(format!("creating {}", console.display())))?;
        let log2 = log.try_clone().map_err(io("the console log"))?;
        let child = Command::new(&config.jailer)
            .args(location_args(config, jail_id))
            .arg("--exec-file")
            .arg(&config.flatlet)
            .arg("--uid")
            .arg(config.uid.to_string())
            .arg("--gid")
            .arg(config.gid.to_string())
            .arg("--cgroup")
            .arg(format!("pids.max={}", u32::from(config.vcpus) + VMM_THREADS))
            .args(config.cgroups.iter().flat_map(|c| ["--cgroup", c.as_str()]))
            .args(["--", "--api-sock", "/api.sock"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|source| VmError::Spawn {
                what: config.jailer.display().to_string(),
                source,
            })?;
        let vm = Self {
            jail_id: jail_id.to_string(),
            root,
            pid: child.id(),
            exit: Arc::new((Mutex::new(None), Condvar::new())),
            config: config.clone(),
        };
        vm.watch(child);
        let shown = console.display().to_string();
        if let Err(e) = vm.configure(config, rootfs, &shown, template) {
            let _ = vm.stop();
            return Err(e);
        }
        Ok(vm)
    }

    /// A thread owns the child and records how it ended.
    fn watch(&self, mut child: Child) {
        let exit = Arc::clone(&self.exit);
        std::thread::spawn(move || {
            let code = child.wait().map(|s| s.code().unwrap_or(-1)).unwrap_or(-1);
            let (lock, cond) = &*exit;
            *lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(code);
            cond.notify_all();
        });
    }

    fn configure(
        &self,
        config: &Config,
        rootfs: &Path,
        console: &str,
        template: Option<&Path>,
    ) -> Result<(), VmError> {
        let api = self.root.join("api.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        // Until it accepts a connection: the socket file exists from
        // flatlet's bind, a moment before its listen.
        while UnixStream::connect(&api).is_err() {
            if !self.alive() {
                return Err(VmError::Ended(console.to_string()));
            }
            if Instant::now() > deadline {
                return Err(VmError::NoApi(Duration::from_secs(10), console.to_string()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        link_or_copy(&config.agent_image, &self.root.join("agent.ext4"))?;
        let disk = self.root.join("rootfs.ext4");
        link_or_copy(rootfs, &disk)?;
        chown(&disk, Some(config.uid), Some(config.gid)).map_err(io(format!("chown {}", disk.display())))?;
        // Also for a restore: the saved configuration names the kernel.
        link_or_copy(&config.kernel, &self.root.join("vmlinux"))?;
        if let Some(dir) = template {
            for f in ["template.state", "template.mem"] {
                link_or_copy(&dir.join(f), &self.root.join(f))?;
            }
            return self.api("PUT", "/snapshot/load", SNAPSHOT_LOAD);
        }
        let put = |path: &str, body: String| self.api("PUT", path, &body);
        put(
            "/machine-config",
            format!(
                r#"{{"vcpu_count": {}, "mem_size_mib": {}}}"#,
                config.vcpus, config.mem_mib
            ),
        )?;
        let args = serde_json::to_string(&config.boot_args).map_err(|e| VmError::Client(e.to_string()))?;
        put(
            "/boot-source",
            format!(r#"{{"kernel_image_path": "/vmlinux", "boot_args": {args}}}"#),
        )?;
        put(
            "/drives/agent",
            r#"{"drive_id": "agent", "path_on_host": "/agent.ext4", "is_root_device": true, "is_read_only": true}"#.into(),
        )?;
        put(
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": false, "is_read_only": false}"#
                .into(),
        )?;
        put(
            "/vsock",
            format!(r#"{{"guest_cid": {GUEST_CID}, "uds_path": "/v.sock"}}"#),
        )?;
        put("/actions", r#"{"action_type": "InstanceStart"}"#.into())
    }

    /// One API request that must succeed.
    fn api(&self, method: &str, path: &str, body: &str) -> Result<(), VmError> {
        let (status, reply) = api_call(&self.root.join("api.sock"), method, path, body)
            .map_err(|e| VmError::Client(format!("{method} {path}: {e}")))?;
        if status / 100 != 2 {
            return Err(VmError::Api {
                path: path.to_string(),
                status,
                body: reply,
            });
        }
        Ok(())
    }

    /// Pauses the VM and writes a Full snapshot of it into `dir`
    /// (`template.state`, `template.mem`, owned by the jail's user).
    pub fn snapshot_to(&self, dir: &Path) -> Result<(), VmError> {
        self.api("PATCH", "/vm", r#"{"state": "Paused"}"#)?;
        self.api(
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_type": "Full", "snapshot_path": "/template.state", "mem_file_path": "/template.mem"}"#,
        )?;
        for f in ["template.state", "template.mem"] {
            std::fs::rename(self.root.join(f), dir.join(f))
                .map_err(io(format!("moving {f} to {}", dir.display())))?;
        }
        Ok(())
    }

    /// flatlet's pid on the host (the jailer execs it).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The vsock Unix socket, as the host sees it.
    pub fn vsock(&self) -> PathBuf {
        self.root.join("v.sock")
    }

    /// Whether flatlet is still running.
    pub fn alive(&self) -> bool {
        self.exit.0.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }

    /// Waits up to `timeout` for flatlet to end; its exit code.
    pub fn wait_exit(&self, timeout: Duration) -> Option<i32> {
        let (lock, cond) = &*self.exit;
        let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = cond
            .wait_timeout_while(guard, timeout, |e| e.is_none())
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }

    /// Ends flatlet (SIGTERM ends the VM cleanly; SIGKILL after 5 s) and
    /// removes its jail and cgroups.
    pub fn stop(&self) -> Result<(), VmError> {
        if self.alive() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
            if self.wait_exit(Duration::from_secs(5)).is_none() {
                let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
                self.wait_exit(Duration::from_secs(5));
            }
        }
        clean_jail(&self.config, &self.jail_id)
    }
}

/// After a shim died: ends the VMM it left, if `pid` is still that jail's
/// flatlet (a pid file outlives its process, and pids are reused), then
/// removes the jail and its cgroups once the VMM is gone.
pub fn clean_after_shim(config: &Config, jail_id: &str, pid: Option<i32>) -> Result<(), VmError> {
    if let Some(pid) = pid.filter(|p| *p > 0 && is_vmm_of(*p, jail_id)) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_vmm_of(pid, jail_id) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // The jailer refuses while anything still runs in the jail.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match clean_jail(config, jail_id) {
            Err(e) if Instant::now() < deadline => {
                log::debug!("{e}; again");
                std::thread::sleep(Duration::from_millis(100));
            }
            done => return done,
        }
    }
}

/// Whether `pid` is a live `flatlet --id <jail_id>`.
fn is_vmm_of(pid: i32, jail_id: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| cmdline_is_vmm_of(&c, jail_id))
}

/// Whether a `/proc/<pid>/cmdline` is the jailer's exec of flatlet for
/// `jail_id` (a zombie's is empty).
fn cmdline_is_vmm_of(cmdline: &[u8], jail_id: &str) -> bool {
    let mut args = cmdline.split(|b| *b == 0);
    args.next() == Some(EXEC_NAME.as_bytes())
        && args.next() == Some(b"--id".as_slice())
        && args.next() == Some(jail_id.as_bytes())
}

/// Where a jail is, as the jailer takes it both to make the jail and to
/// clean it: the same values for both, or the clean misses its cgroups.
fn location_args(config: &Config, jail_id: &str) -> [std::ffi::OsString; 8] {
    [
        "--id".into(),
        jail_id.into(),
        "--chroot-base-dir".into(),
        config.jail_base.clone().into(),
        "--parent-cgroup".into(),
        config.parent_cgroup.clone().into(),
        "--cgroup-version".into(),
        config.cgroup_version.to_string().into(),
    ]
}

/// `flatlet-jailer clean`: the jail directory and its cgroups (nothing if
/// there is no jail).
pub fn clean_jail(config: &Config, jail_id: &str) -> Result<(), VmError> {
    if !config.jail_base.join(EXEC_NAME).join(jail_id).exists() {
        return Ok(());
    }
    let out = Command::new(&config.jailer)
        .arg("clean")
        .args(location_args(config, jail_id))
        .output()
        .map_err(|source| VmError::Spawn {
            what: config.jailer.display().to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(VmError::Clean {
            id: jail_id.to_string(),
            output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// One request on flatlet's API socket (HTTP/1.1, `Connection: close`):
/// the status code and the body.
fn api_call(sock: &Path, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not HTTP: {reply:?}"))
        })?;
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn link_or_copy(from: &Path, to: &Path) -> Result<(), VmError> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(io(format!("copying {} to {}", from.display(), to.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_live_flatlet_of_that_jail_is_its_vmm() {
        let id = "t1-0123456789abcdef";
        assert!(cmdline_is_vmm_of(
            b"flatlet\0--id\0t1-0123456789abcdef\0--api-sock\0/api.sock\0",
            id
        ));
        for other in [
            b"".as_slice(),
            b"flatlet\0--id\0t1-0123456789abcdef0\0",
            b"flatlet\0--id\0t2-0123456789abcdef\0",
            b"sleep\0--id\0t1-0123456789abcdef\0",
            b"flatlet\0--api-sock\0/api.sock\0",
        ] {
            assert!(!cmdline_is_vmm_of(other, id), "{other:?}");
        }
        assert!(!is_vmm_of(std::process::id() as i32, id), "the test itself");
    }

    #[test]
    fn jail_ids_are_what_the_jailer_takes_and_differ_per_namespace() {
        let a = jail_id("default", "t1");
        let b = jail_id("k8s.io", "t1");
        let long = jail_id("default", &"x.y_z".repeat(30));
        for id in [&a, &b, &long] {
            assert!(id.len() <= 64, "{id}");
            assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{id}");
        }
        assert_ne!(a, b);
        assert_eq!(a, jail_id("default", "t1"), "stable");
    }
}
