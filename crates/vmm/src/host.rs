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
    /// Looks at the loaded KVM modules and, where `/sys` is out of reach
    /// (in a jail), at the CPU: KVM without VMX or SVM is PVM.
    pub fn detect() -> Self {
        let cpu = cpu_virtualization();
        let sys = Path::new("/sys/module");
        if sys.exists() {
            Self::from_probe(|m| sys.join(m).exists(), cpu)
        } else {
            Self::from_cpu(cpu)
        }
    }

    fn from_probe(module_loaded: impl Fn(&str) -> bool, cpu: CpuVirt) -> Self {
        if module_loaded("kvm_pvm") {
            HostKind::Pvm
        } else if module_loaded("kvm_intel") {
            HostKind::Vmx {
                nested: cpu.hypervisor,
            }
        } else if module_loaded("kvm_amd") {
            HostKind::Svm {
                nested: cpu.hypervisor,
            }
        } else {
            HostKind::Unknown
        }
    }

    fn from_cpu(cpu: CpuVirt) -> Self {
        match (cpu.vmx, cpu.svm) {
            (true, _) => HostKind::Vmx {
                nested: cpu.hypervisor,
            },
            (_, true) => HostKind::Svm {
                nested: cpu.hypervisor,
            },
            // /dev/kvm works (flatlet checks) yet the CPU has neither.
            _ => HostKind::Pvm,
        }
    }

    /// Whether guest ring-0 code runs in KVM's instruction emulator.
    pub fn emulates_guest_kernel(&self) -> bool {
        matches!(self, HostKind::Pvm)
    }

    /// Flags a Linux guest needs on its command line on this host, if any.
    /// On PVM: keep Linux off the instructions KVM's emulator cannot run
    /// (CPUID masking does not reach the guest for all of them), and off
    /// work that only costs time when ring 0 is emulated (see
    /// resources/guest/README.md for each).
    pub fn linux_guest_flags(&self) -> Option<String> {
        self.emulates_guest_kernel().then(|| {
            format!(
                "noxsave clearcpuid={} mitigations=off",
                crate::arch::cpuid::EMULATOR_CLEARCPUID
            )
        })
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

/// What the host CPU says about virtualization.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CpuVirt {
    vmx: bool,
    svm: bool,
    /// The CPUID hypervisor bit: this host is itself a guest.
    hypervisor: bool,
}

fn cpu_virtualization() -> CpuVirt {
    let leaf1 = std::arch::x86_64::__cpuid(1);
    let ext = std::arch::x86_64::__cpuid(0x8000_0001);
    CpuVirt {
        vmx: leaf1.ecx & (1 << 5) != 0,
        svm: ext.ecx & (1 << 2) != 0,
        hypervisor: leaf1.ecx & (1 << 31) != 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_decides_the_kind() {
        let bare = CpuVirt::default();
        let nested = CpuVirt {
            hypervisor: true,
            ..bare
        };
        assert_eq!(
            HostKind::from_probe(|m| m == "kvm_pvm" || m == "kvm_intel", nested),
            HostKind::Pvm
        );
        assert_eq!(
            HostKind::from_probe(|m| m == "kvm_intel", bare),
            HostKind::Vmx { nested: false }
        );
        assert_eq!(
            HostKind::from_probe(|m| m == "kvm_amd", nested),
            HostKind::Svm { nested: true }
        );
        assert_eq!(HostKind::from_probe(|_| false, bare), HostKind::Unknown);
        assert!(HostKind::Pvm.emulates_guest_kernel());
        assert!(!HostKind::Vmx { nested: true }.emulates_guest_kernel());
        assert!(HostKind::Pvm.to_string().contains("emulator"));
    }

    #[test]
    fn without_sys_the_cpu_decides() {
        let vmx = CpuVirt {
            vmx: true,
            svm: false,
            hypervisor: false,
        };
        assert_eq!(HostKind::from_cpu(vmx), HostKind::Vmx { nested: false });
        let svm = CpuVirt {
            svm: true,
            hypervisor: true,
            ..Default::default()
        };
        assert_eq!(HostKind::from_cpu(svm), HostKind::Svm { nested: true });
        assert_eq!(HostKind::from_cpu(CpuVirt::default()), HostKind::Pvm);
    }
}
