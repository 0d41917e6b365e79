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
    /// Pages dirtied since the last snapshot (not supported yet).
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
