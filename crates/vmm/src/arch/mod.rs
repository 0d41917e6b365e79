//! x86-64 machine set-up: what the Linux 64-bit boot protocol and the MP
//! specification ask of the firmware, done by the VMM.

pub mod bootparams;
pub mod cpuid;
pub mod mptable;
pub mod msr;
pub mod regs;
