//! Snapshots: a paused VM's state saved to a file, and restored.
//!
//! Each device describes its own state as a plain serde struct next to its
//! model in `flatlet-devices`; this module adds what only KVM knows (vCPU
//! registers, LAPIC, the VM clock) and writes everything as one versioned,
//! checksummed file ([`format`]).

pub mod format;
pub mod memory;
pub mod state;
pub mod vcpu;

use std::path::PathBuf;

use serde::Deserialize;

/// `snapshot_type` of `PUT /snapshot/create`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum SnapshotType {
    /// All guest memory (sparse: touched pages only).
    #[default]
    Full,
    /// Pages changed since the last snapshot, into the existing memory
    /// file (needs `track_dirty_pages`).
    Diff,
}

/// The body of `PUT /snapshot/create`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Full or Diff.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    /// Where the state file goes.
    pub snapshot_path: PathBuf,
    /// Where the memory file goes.
    pub mem_file_path: PathBuf,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// Only `File`.
    pub backend_type: MemBackendType,
    /// The memory file.
    pub backend_path: PathBuf,
}

/// Memory backend kinds (`Uffd` is not supported).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum MemBackendType {
    /// A memory file, mapped privately.
    File,
}

/// The body of `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The state file.
    pub snapshot_path: PathBuf,
    /// The memory backend.
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    /// Deprecated form of `mem_backend` File.
    #[serde(default)]
    pub mem_file_path: Option<PathBuf>,
    /// Run the VM at once (else it stays paused).
    #[serde(default)]
    pub resume_vm: bool,
    /// Dirty-page tracking, for Diff snapshots of the restored VM.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Deprecated name of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Other TAPs for the snapshot's interfaces (a clone's own network).
    #[serde(default)]
    pub network_overrides: Vec<state::NetworkOverride>,
    /// Another Unix socket for the vsock device (a clone's own).
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
    /// Advance the guest's clock by the wall-clock time since the snapshot
    /// (`KVM_CLOCK_REALTIME`), instead of resuming it where it stopped.
    #[serde(default)]
    pub clock_realtime: bool,
    /// Huge pages of the restored memory: `Snapshot` (the default: as
    /// saved), `None` or `Transparent` (`2M` needs a Uffd backend, which
    /// flatlet does not have).
    #[serde(default)]
    pub huge_pages: Option<LoadHugePages>,
}

/// `vsock_override` of `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The host socket of the restored vsock device.
    pub uds_path: String,
}

/// `huge_pages` of `PUT /snapshot/load`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum LoadHugePages {
    /// As the snapshot's VM had it.
    Snapshot,
    /// Normal pages.
    None,
    /// Transparent huge pages.
    Transparent,
    /// hugetlbfs: refused (Firecracker needs a Uffd backend for it).
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

impl SnapshotLoadParams {
    /// The memory file, from whichever field gives it (exactly one must).
    pub fn mem_path(&self) -> Result<&std::path::Path, &'static str> {
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(b), None) => Ok(&b.backend_path),
            (None, Some(p)) => Ok(p),
            (Some(_), Some(_)) => Err("Only one of mem_backend and mem_file_path may be given."),
            (None, None) => Err("Either mem_backend or mem_file_path is required."),
        }
    }
}

/// Creates (or truncates) `path` for writing, without blocking (a FIFO or
/// device must not hold up the VMM thread), refusing what is not a regular
/// file. (Reading goes through the configuration's checked open.)
pub fn create_regular(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}
