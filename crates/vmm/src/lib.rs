//! The machine of flatlet: KVM, guest memory, vCPUs, boot, and the
//! controller that owns a VM's life.
//!
//! This is the only crate that talks to KVM, and every `unsafe` operation
//! of the workspace lives in one module of it, [`sys`].

pub mod arch;
pub mod config;
pub mod controller;
pub mod device_manager;
pub mod emulation;
pub mod exit;
pub mod host;
pub mod irqchip;
pub mod layout;
pub mod loader;
pub mod logger;
pub mod memory;
pub mod metrics;
pub mod mmds;
pub mod runtime;
pub mod seccomp;
pub mod snapshot;
pub mod sys;
pub mod thread;
pub mod vcpu;
pub mod vm;
