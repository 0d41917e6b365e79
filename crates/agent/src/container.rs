//! Containers and their processes: what the agent knows, behind one lock.
//!
//! A container is a root file system mounted at a slot directory of the
//! agent's (read-only) image, `/containers/<n>`, with `/proc`, `/sys`,
//! `/dev` and a devpts of its own at `/dev/pts` mounted in it (its
//! processes' terminals come from there). Its processes are children of
//! the agent (each through the exec helper); one reaper thread collects
//! every child's exit status, so a process is spawned under the lock and
//! its pid recorded before the reaper can see it.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use flatlet_agent_protocol::{ProcessSpec, Rootfs, Stream};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use socket2::Socket;

use crate::helper;
use crate::pty::{self, Terminal};

/// Slot directories in the agent's image (tools/build-agent-image makes them).
pub const SLOTS: usize = 16;
const SLOT_DIR: &str = "/containers";
/// Processes per container, exec'd ones included.
const MAX_PROCESSES: usize = 1024;
/// Exit statuses of children nobody asked about (orphans re-parented to us).
const MAX_ORPHANS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("container {0} exists")]
    Exists(String),
    #[error("no container {0}")]
    NoContainer(String),
    #[error("no process {exec_id:?} in container {container_id}")]
    NoProcess { container_id: String, exec_id: String },
    #[error("process {0:?} was started already")]
    Started(String),
    #[error("the {0:?} stream of that process is attached already")]
    Attached(Stream),
    #[error("no free slot: {SLOTS} containers at most")]
    NoSlot,
    #[error("{MAX_PROCESSES} processes at most per container")]
    TooManyProcesses,
    #[error("an empty argument list")]
    NoArgs,
    #[error("process {0:?} has a terminal, which is its stdout: no stderr stream may be attached")]
    TerminalStderr(String),
    #[error("process {0:?} has no terminal")]
    NoTerminal(String),
    #[error("process {0:?} has not started")]
    NotStarted(String),
    #[error("{what}: {source}")]
    Sys { what: String, source: nix::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> ContainerError {
    let what = what.into();
    move |source| ContainerError::Sys { what, source }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerError {
    let what = what.into();
    move |source| ContainerError::Io { what, source }
}

#[derive(Default)]
struct Process {
    pid: Option<i32>,
    stdin: Option<Socket>,
    stdout: Option<Socket>,
    stderr: Option<Socket>,
    /// The agent's own handle on the stdin stream, for `CloseStdin`.
    stdin_kept: Option<Socket>,
    /// Started with a terminal.
    tty: bool,
    /// Its terminal while it runs (dropped at its exit: the output relay
    /// then finishes).
    terminal: Option<Terminal>,
    exit: Option<i32>,
}

struct Container {
    slot: usize,
    dir: PathBuf,
    processes: HashMap<String, Process>,
}

#[derive(Default)]
struct Inner {
    containers: HashMap<String, Container>,
    used_slots: [bool; SLOTS],
    orphans: VecDeque<(i32, i32)>,
}

/// Everything the agent knows; shared by the connection threads and the reaper.
#[derive(Default)]
pub struct State {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A thread that panicked holding the lock left the maps as they
        // were between two statements: still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mounts the container's root file system and what goes in it.
    pub fn create(&self, id: &str, rootfs: &Rootfs) -> Result<(), ContainerError> {
        let mut inner = self.lock();
        if inner.containers.contains_key(id) {
            return Err(ContainerError::Exists(id.to_string()));
        }
        let slot = inner
            .used_slots
            .iter()
            .position(|u| !u)
            .ok_or(ContainerError::NoSlot)?;
        let dir = Path::new(SLOT_DIR).join(slot.to_string());
        mount_container(&dir, rootfs)?;
        inner.used_slots[slot] = true;
        inner.containers.insert(
            id.to_string(),
            Container {
                slot,
                dir,
                processes: HashMap::new(),
            },
        );
        Ok(())
    }

    /// Keeps `sock` as a stream of a process that has not started.
    pub fn attach(
        &self,
        id: &str,
        exec_id: &str,
        stream: Stream,
        sock: Socket,
    ) -> Result<(), ContainerError> {
        let mut inner = self.lock();
        let c = inner
            .containers
            .get_mut(id)
            .ok_or_else(|| ContainerError::NoContainer(id.to_string()))?;
        if !c.processes.contains_key(exec_id) && c.processes.len() >= MAX_PROCESSES {
            return Err(ContainerError::TooManyProcesses);
        }
        let p = c.processes.entry(exec_id.to_string()).or_default();
        if p.pid.is_some() {
            return Err(ContainerError::Started(exec_id.to_string()));
        }
        let slot = match stream {
            Stream::Stdin => &mut p.stdin,
            Stream::Stdout => &mut p.stdout,
            Stream::Stderr => &mut p.stderr,
        };
        if slot.is_some() {
            return Err(ContainerError::Attached(stream));
        }
        *slot = Some(sock);
        Ok(())
    }

    /// Starts a process in the container, with the streams attached to it
    /// (the others are /dev/null), or, with `terminal`, on a new terminal
    /// of the container that the agent relays to stdin and stdout.
    /// Returns its pid.
    pub fn start(&self, id: &str, exec_id: &str, spec: &ProcessSpec) -> Result<u32, ContainerError> {
        if spec.args.is_empty() {
            return Err(ContainerError::NoArgs);
        }
        let json = serde_json::to_string(spec).map_err(|e| io("the spec")(e.into()))?;
        let mut inner = self.lock();
        let c = inner
            .containers
            .get_mut(id)
            .ok_or_else(|| ContainerError::NoContainer(id.to_string()))?;
        let dir = c.dir.clone();
        if !c.processes.contains_key(exec_id) && c.processes.len() >= MAX_PROCESSES {
            return Err(ContainerError::TooManyProcesses);
        }
        let p = c.processes.entry(exec_id.to_string()).or_default();
        if p.pid.is_some() {
            return Err(ContainerError::Started(exec_id.to_string()));
        }
        let stdio = |s: Option<Socket>| {
            s.map_or_else(Stdio::null, |s| {
                Stdio::from(File::from(std::os::fd::OwnedFd::from(s)))
            })
        };
        let stdin_kept = match &p.stdin {
            Some(s) => Some(s.try_clone().map_err(io("keeping stdin"))?),
            None => None,
        };
        let (streams, terminal) = if spec.terminal {
            if p.stderr.is_some() {
                return Err(ContainerError::TerminalStderr(exec_id.to_string()));
            }
            let ptmx = dir.join("dev/ptmx");
            let (master, slave) =
                pty::open_pair(&ptmx).map_err(sys(format!("a terminal from {}", ptmx.display())))?;
            let dup = |f: &File| f.try_clone().map(Stdio::from).map_err(io("the terminal"));
            let streams = [dup(&slave)?, dup(&slave)?, Stdio::from(slave)];
            // The relays run before the process: nothing fails after it started.
            let terminal = Terminal::start(master, p.stdin.take(), p.stdout.take())
                .map_err(io("the terminal's relays"))?;
            (streams, Some(terminal))
        } else {
            let streams = [p.stdin.take(), p.stdout.take(), p.stderr.take()].map(stdio);
            (streams, None)
        };
        let [stdin, stdout, stderr] = streams;
        let child = Command::new("/proc/self/exe")
            .arg(helper::FLAG)
            .arg(&dir)
            .arg(json)
            .env_clear()
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(io("starting the exec helper"))?;
        // The Child is not waited for here: the reaper collects it.
        let pid = child.id();
        p.pid = Some(pid as i32);
        p.stdin_kept = stdin_kept;
        p.tty = spec.terminal;
        p.terminal = terminal;
        // The reaper may be waiting for a first child.
        self.changed.notify_all();
        Ok(pid)
    }

    /// Sends `signal` to the process, or to every live process of the
    /// container (each process's group: what it started too).
    pub fn signal(&self, id: &str, exec_id: &str, signal: i32, all: bool) -> Result<(), ContainerError> {
        let sig = Signal::try_from(signal).map_err(sys(format!("signal {signal}")))?;
        let inner = self.lock();
        let c = inner
            .containers
            .get(id)
            .ok_or_else(|| ContainerError::NoContainer(id.to_string()))?;
        if all {
            for p in c.processes.values() {
                if let (Some(pid), None) = (p.pid, p.exit) {
                    let _ = killpg(Pid::from_raw(pid), sig).or_else(|_| kill(Pid::from_raw(pid), sig));
                }
            }
            return Ok(());
        }
        let p = process(c, id, exec_id)?;
        match (p.pid, p.exit) {
            (Some(pid), None) => kill(Pid::from_raw(pid), sig).map_err(sys(format!("kill {pid}"))),
            (Some(_), Some(_)) => Ok(()),
            (None, _) => Err(ContainerError::NoProcess {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
            }),
        }
    }

    /// Blocks until the process has exited; its status.
    pub fn wait(&self, id: &str, exec_id: &str) -> Result<i32, ContainerError> {
        let mut inner = self.lock();
        loop {
            let c = inner
                .containers
                .get(id)
                .ok_or_else(|| ContainerError::NoContainer(id.to_string()))?;
            let p = process(c, id, exec_id)?;
            if let Some(status) = p.exit {
                return Ok(status);
            }
            inner = self.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Lets go of the process's stdin (a stream not yet handed to a
    /// process is closed: end-of-file from the start).
    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ContainerError> {
        let mut inner = self.lock();
        let c = inner
            .containers
            .get_mut(id)
            .ok_or_else(|| ContainerError::NoContainer(id.to_string()))?;
        let p = c
            .processes
            .get_mut(exec_id)
            .ok_or_else(|| ContainerError::NoProcess {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
            })?;
        // Not shutdown(SHUT_RD): that would discard what the host sent
        // and the process has not read yet. The process reads end-of-file
        // once the host has closed its end and the data is consumed.
        p.stdin = None;
        p.stdin_kept = None;
        Ok(())
    }

    /// A new window size for the process's terminal (nothing once it has
    /// exited: a resize may cross the exit).
    pub fn resize(&self, id: &str, exec_id: &str, rows: u16, cols: u16) -> Result<(), ContainerError> {
        let inner = self.lock();
        let c = inner
            .containers
            .get(id)
            .ok_or_else(|| ContainerError::NoContainer(id.to_string()))?;
        let p = process(c, id, exec_id)?;
        if p.pid.is_none() {
            return Err(ContainerError::NotStarted(exec_id.to_string()));
        }
        if !p.tty {
            return Err(ContainerError::NoTerminal(exec_id.to_string()));
        }
        match &p.terminal {
            Some(t) => t
                .resize(rows, cols)
                .map_err(sys(format!("setting the terminal's size to {rows}x{cols}"))),
            None => Ok(()),
        }
    }

    /// The pids whose root is the container's.
    pub fn pids(&self, id: &str) -> Result<Vec<u32>, ContainerError> {
        let dir = {
            let inner = self.lock();
            inner
                .containers
                .get(id)
                .ok_or_else(|| ContainerError::NoContainer(id.to_string()))?
                .dir
                .clone()
        };
        Ok(pids_in(&dir))
    }

    /// Kills what is left of the container, unmounts it, forgets it.
    pub fn delete(&self, id: &str) -> Result<(), ContainerError> {
        let dir = {
            let inner = self.lock();
            inner
                .containers
                .get(id)
                .ok_or_else(|| ContainerError::NoContainer(id.to_string()))?
                .dir
                .clone()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = pids_in(&dir);
            if left.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in left {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for sub in MOUNTED {
            let _ = umount2(&dir.join(sub), MntFlags::MNT_DETACH);
        }
        let mut inner = self.lock();
        if let Some(c) = inner.containers.remove(id) {
            inner.used_slots[c.slot] = false;
        }
        self.changed.notify_all();
        Ok(())
    }

    /// Records a child's exit (from the reaper).
    fn exited(&self, pid: i32, status: i32) {
        let mut inner = self.lock();
        let found = inner
            .containers
            .values_mut()
            .flat_map(|c| c.processes.values_mut())
            .find(|p| p.pid == Some(pid));
        match found {
            Some(p) => {
                p.exit = Some(status);
                p.stdin_kept = None;
                p.terminal = None;
            }
            None => {
                if inner.orphans.len() >= MAX_ORPHANS {
                    inner.orphans.pop_front();
                }
                inner.orphans.push_back((pid, status));
            }
        }
        self.changed.notify_all();
    }

    /// Collects every child's exit status, forever (the reaper thread).
    pub fn reap(&self) {
        loop {
            match waitpid(None::<Pid>, None) {
                Ok(WaitStatus::Exited(pid, code)) => self.exited(pid.as_raw(), code),
                Ok(WaitStatus::Signaled(pid, sig, _)) => self.exited(pid.as_raw(), 128 + sig as i32),
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(nix::Error::ECHILD) => self.await_child(),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// No children: sleeps until `start` has made one. Polling waitpid
    /// instead (every 50 ms) kept the guest kernel busy, with its timer
    /// tick running, from boot to the first process: emulated ring-0 work
    /// on nested hosts.
    fn await_child(&self) {
        let live = |i: &Inner| {
            i.containers
                .values()
                .flat_map(|c| c.processes.values())
                .any(|p| p.pid.is_some() && p.exit.is_none())
        };
        let inner = self.lock();
        if live(&inner) {
            // Started but not yet a child (cannot happen): no busy loop.
            drop(inner);
            std::thread::sleep(Duration::from_millis(50));
            return;
        }
        drop(self.changed.wait_while(inner, |i| !live(i)));
    }
}

fn process<'a>(c: &'a Container, id: &str, exec_id: &str) -> Result<&'a Process, ContainerError> {
    c.processes.get(exec_id).ok_or_else(|| ContainerError::NoProcess {
        container_id: id.to_string(),
        exec_id: exec_id.to_string(),
    })
}

fn mount_container(dir: &Path, rootfs: &Rootfs) -> Result<(), ContainerError> {
    let mut flags = MsFlags::empty();
    if rootfs.readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(
        Some(rootfs.device.as_str()),
        dir,
        Some(rootfs.fstype.as_str()),
        flags,
        None::<&str>,
    )
    .map_err(sys(format!(
        "mounting {} ({}) on {}",
        rootfs.device,
        rootfs.fstype,
        dir.display()
    )))?;
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    for (fstype, sub, flags, data) in [
        ("proc", "proc", nosuid, None),
        ("sysfs", "sys", nosuid | MsFlags::MS_RDONLY, None),
        ("devtmpfs", "dev", MsFlags::MS_NOSUID, None),
        // The container's own terminals (runc's options): its /dev/ptmx
        // (devtmpfs's) opens the devpts mounted beside it, here.
        (
            "devpts",
            "dev/pts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ),
    ] {
        let target = dir.join(sub);
        // /dev/pts is in the devtmpfs, which is writable.
        if !rootfs.readonly || fstype == "devpts" {
            let _ = std::fs::create_dir_all(&target);
        }
        if let Err(e) = mount(Some(fstype), &target, Some(fstype), flags, data) {
            for undo in MOUNTED {
                let _ = umount2(&dir.join(undo), MntFlags::MNT_DETACH);
            }
            return Err(sys(format!("mounting {fstype} on {}", target.display()))(e));
        }
    }
    Ok(())
}

/// What `mount_container` mounts in a container's directory (and the
/// directory itself, `""`), in the order to unmount it.
const MOUNTED: [&str; 5] = ["dev/pts", "dev", "sys", "proc", ""];

/// Processes whose root directory is `dir`.
fn pids_in(dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/root")).is_ok_and(|r| r == dir))
        .collect();
    pids.sort_unstable();
    pids
}
