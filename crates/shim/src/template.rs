//! Fast start: a template VM, booted once, snapshotted when its agent first
//! answers, restored for each container.
//!
//! The template boots with a placeholder as its second drive: an empty
//! sparse file of [`DISK_SIZE`] bytes at `/rootfs.ext4` in its jail. A
//! clone's jail holds the container's image at that same path, made at that
//! same size (the guest saw the placeholder's capacity), and its own
//! `/v.sock`: restoring the snapshot in the clone's jail is all it takes,
//! and the agent mounts the container's image when asked (it never touched
//! the placeholder). A root file system that does not fit in `DISK_SIZE`
//! (with room to write) boots a VM of its own instead.
//!
//! Templates live in `<state_dir>/templates/<key>`, the key made of the
//! kernel, agent image, flatlet binary and VM size; one shim builds a
//! template while the others wait on its lock.

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::agent::Agent;
use crate::config::Config;
use crate::vm::{Vm, clean_jail};

/// The container drive's size in every template and clone (sparse).
pub const DISK_SIZE: u64 = 1 << 30;

/// Where the template for `config` lives.
pub fn dir(config: &Config) -> PathBuf {
    let mut h = std::hash::DefaultHasher::new();
    for p in [&config.kernel, &config.agent_image, &config.flatlet] {
        p.hash(&mut h);
        if let Ok(m) = std::fs::metadata(p) {
            (m.len(), m.mtime(), m.mtime_nsec(), m.ino()).hash(&mut h);
        }
    }
    (config.vcpus, config.mem_mib, &config.boot_args, DISK_SIZE).hash(&mut h);
    config
        .state_dir
        .join("templates")
        .join(format!("{:016x}", h.finish()))
}

/// The template's directory, built first if there is none (minutes on a
/// nested host: a Linux boot).
pub fn ensure(config: &Config) -> Result<PathBuf, String> {
    let dir = dir(config);
    let ready = dir.join("ready");
    if ready.exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let lock = File::create(dir.join(".lock")).map_err(|e| format!("the template lock: {e}"))?;
    let _lock =
        Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, e)| format!("locking the template: {e}"))?;
    if ready.exists() {
        return Ok(dir);
    }
    let start = Instant::now();
    build(config, &dir)?;
    std::fs::write(&ready, format!("{}\n", start.elapsed().as_millis()))
        .map_err(|e| format!("marking the template ready: {e}"))?;
    log::info!(
        "template {} built in {} ms",
        dir.display(),
        start.elapsed().as_millis()
    );
    Ok(dir)
}

fn build(config: &Config, dir: &Path) -> Result<(), String> {
    let placeholder = dir.join("placeholder.ext4");
    File::create(&placeholder)
        .and_then(|f| f.set_len(DISK_SIZE))
        .map_err(|e| format!("the placeholder drive: {e}"))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let jail = format!("template-{name}");
    clean_jail(config, &jail).map_err(|e| e.to_string())?;
    let console = dir.join("console.log");
    let vm = Vm::start(config, &jail, &placeholder, &console, None).map_err(|e| e.to_string())?;
    let result = Agent::new(&vm.vsock())
        .wait_ready(Duration::from_secs(config.boot_timeout_secs), || vm.alive())
        .map_err(|e| format!("the template's agent: {e} (console: {})", console.display()))
        .and_then(|_| vm.snapshot_to(dir).map_err(|e| e.to_string()));
    let stopped = vm.stop();
    let _ = std::fs::remove_file(&placeholder);
    result?;
    stopped.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_key_follows_the_inputs() {
        let a = Config::default();
        let mut b = Config::default();
        assert_eq!(dir(&a), dir(&b));
        b.mem_mib = 512;
        assert_ne!(dir(&a), dir(&b));
        assert!(dir(&a).starts_with(a.state_dir.join("templates")));
    }
}
