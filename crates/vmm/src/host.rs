//! What kind of KVM host flatlet runs on.
//!
//! On a host with hardware virtualization (VMX or SVM) guest code runs
//! natively. On a PVM host (the `kvm_pvm` module: a nested, pagetable-based
//! KVM without VMX/SVM) guest ring-0 code runs in KVM's instruction
//! emulator: a thousand times slower, and some instructions (int3, xsave,
//! cmpxchg16b, popcnt, fwait) fail there.

use std::fmt;
use std::path::Path;

/// The kind of KVM host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// Intel VMX (`kvm_intel`); `nested` when the host is itself a VM.
    Vmx { nested: bool },
    /// AMD SVM (`kvm_amd`).
    Svm { nested: bool },
    /// PVM (`kvm_pvm`): nested, no hardware virtualization, guest ring 0
    /// emulated.
    Pvm,
    /// Not recognised.
    Unknown,
}

impl HostKind {
    /// Looks at the loaded KVM modules and the CPU.
    pub fn detect() -> Self {
        Self::from_probe(|m| Path::new("/sys/module").join(m).exists(), running_in_a_vm())
    }

    fn from_probe(module_loaded: impl Fn(&str) -> bool, nested: bool) -> Self {
        if module_loaded("kvm_pvm") {
            HostKind::Pvm
        } else if module_loaded("kvm_intel") {
            HostKind::Vmx { nested }
        } else if module_loaded("kvm_amd") {
            HostKind::Svm { nested }
        } else {
            HostKind::Unknown
        }
    }

    /// Whether guest ring-0 code runs in KVM's instruction emulator.
    pub fn emulates_guest_kernel(&self) -> bool {
        matches!(self, HostKind::Pvm)
    }
}

impl fmt::Display for HostKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nested = |n: &bool| if *n { ", nested" } else { "" };
        match self {
            HostKind::Vmx { nested: n } => write!(f, "hardware virtualization (Intel VMX{})", nested(n)),
            HostKind::Svm { nested: n } => write!(f, "hardware virtualization (AMD SVM{})", nested(n)),
            HostKind::Pvm => write!(
                f,
                "PVM (kvm_pvm: nested, no VMX/SVM): guest ring-0 code runs in KVM's instruction \
                 emulator, about 1000x slower than native, and some instructions fail there"
            ),
            HostKind::Unknown => write!(f, "unrecognised (no kvm_intel, kvm_amd or kvm_pvm module)"),
        }
    }
}

/// The CPUID hypervisor bit: this host is itself a guest.
fn running_in_a_vm() -> bool {
    std::arch::x86_64::__cpuid(1).ecx & (1 << 31) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_decides_the_kind() {
        assert_eq!(
            HostKind::from_probe(|m| m == "kvm_pvm" || m == "kvm_intel", true),
            HostKind::Pvm
        );
        assert_eq!(
            HostKind::from_probe(|m| m == "kvm_intel", false),
            HostKind::Vmx { nested: false }
        );
        assert_eq!(
            HostKind::from_probe(|m| m == "kvm_amd", true),
            HostKind::Svm { nested: true }
        );
        assert_eq!(HostKind::from_probe(|_| false, false), HostKind::Unknown);
        assert!(HostKind::Pvm.emulates_guest_kernel());
        assert!(!HostKind::Vmx { nested: true }.emulates_guest_kernel());
        assert!(HostKind::Pvm.to_string().contains("emulator"));
    }
}
