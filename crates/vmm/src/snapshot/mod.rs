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
