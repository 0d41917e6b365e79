//! Device models of flatlet.
//!
//! Nothing here talks to KVM: the VMM wires these models to the vCPUs'
//! exits and to KVM's interrupt delivery, and every model is unit-tested
//! without `/dev/kvm`. Guest input (register writes, addresses, lengths)
//! is untrusted: a model ignores what it does not understand and never
//! panics on it.

pub mod boot_timer;
pub mod bus;
pub mod i8042;
pub mod ioapic;
pub mod irq;
pub mod rate_limiter;
pub mod ratelimit;
pub mod serial;
pub mod timer;
pub mod virtio;
