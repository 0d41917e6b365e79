//! What KVM knows of a vCPU, saved and restored on the vCPU's own thread
//! while it is paused.

use kvm_bindings::{
    CpuId, Msrs, kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// The most CPUID entries flatlet saves (KVM's own limit).
const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;
/// `KVM_MAX_MSR_ENTRIES`: the most MSRs one `KVM_GET_MSRS` takes.
const MAX_MSR_ENTRIES: usize = 256;

/// Errors saving or restoring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM call failed.
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// KVM took fewer MSRs than the state holds.
    #[error("KVM refused MSR {index:#x} of the snapshot")]
    MsrRefused { index: u32 },
    /// The state holds more entries than KVM takes.
    #[error("the snapshot holds {count} {what}, more than KVM takes ({max})")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
}

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { what, source }
}

/// One vCPU's state, as KVM describes it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU index (and APIC ID).
    pub index: u8,
    /// Its CPUID, as it was set.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MSRs, as (index, value), in the order they are restored.
    pub msrs: Vec<(u32, u64)>,
    /// General registers.
    pub regs: kvm_regs,
    /// Special registers.
    pub sregs: kvm_sregs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// FPU, SSE and extended state (legacy 4 KiB `KVM_GET_XSAVE` area).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub events: kvm_vcpu_events,
    /// The TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// MSR ranges that are vCPU state worth saving (architectural, SYSCALL,
/// MTRR/PAT, KVM paravirtual); the rest of what KVM lists is either
/// read-only, host state, or not kept by KVM per vCPU.
const SAVED_MSR_RANGES: &[(u32, u32)] = &[
    (0x10, 0x10),               // TSC
    (0x1b, 0x1b),               // APIC base
    (0x3b, 0x3b),               // TSC adjust
    (0x48, 0x48),               // SPEC_CTRL
    (0x10a, 0x10a),             // ARCH_CAPABILITIES
    (0x174, 0x176),             // SYSENTER
    (0x1a0, 0x1a0),             // MISC_ENABLE
    (0x200, 0x2ff),             // MTRRs, PAT, MTRR_DEF_TYPE
    (0x6e0, 0x6e0),             // TSC deadline (after TSC)
    (0xc000_0080, 0xc000_0084), // EFER, STAR, LSTAR, CSTAR, SFMASK
    (0xc000_0100, 0xc000_0103), // FS/GS base, KERNEL_GS_BASE, TSC_AUX
    (0x4b56_4d00, 0x4b56_4dff), // KVM paravirtual (kvmclock, async PF, steal time, ...)
    (0x11, 0x12),               // old KVM paravirtual (wall clock, system time)
];

/// Whether MSR `index` is saved in a snapshot.
pub fn msr_is_saved(index: u32) -> bool {
    // IA32_MCG_CTL is listed by KVM but not writable by the guest's VMM.
    SAVED_MSR_RANGES
        .iter()
        .any(|&(lo, hi)| (lo..=hi).contains(&index))
}

/// The MSRs a snapshot saves: those KVM lists as saveable, filtered by
/// [`msr_is_saved`], with TSC before TSC-deadline (restore order).
pub fn saved_msr_indices(kvm_fd: &Kvm) -> Result<Vec<u32>, VcpuStateError> {
    let list = kvm_fd
        .get_msr_index_list()
        .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut indices: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|&i| msr_is_saved(i))
        .collect();
    indices.sort_unstable();
    indices.dedup();
    Ok(indices)
}

/// Reads the MSRs in `indices`; an MSR KVM refuses to read is left out
/// (some are listed but not readable on every host).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, VcpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest: Vec<u32> = indices.to_vec();
    while !rest.is_empty() {
        let chunk: Vec<kvm_msr_entry> = rest
            .iter()
            .take(MAX_MSR_ENTRIES)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&chunk).map_err(|_| VcpuStateError::TooMany {
            what: "MSRs",
            count: chunk.len(),
            max: MAX_MSR_ENTRIES,
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
        // KVM stops at the first MSR it cannot read: skip that one.
        let consumed = (read + 1).min(chunk.len());
        if read < chunk.len() {
            log::debug!(
                "snapshot: KVM cannot read MSR {:#x}; not saved",
                chunk[read].index
            );
        }
        rest.drain(..consumed);
    }
    Ok(out)
}

impl VcpuState {
    /// Reads a paused vCPU's state. `msrs` comes from
    /// [`saved_msr_indices`].
    pub fn save(index: u8, fd: &VcpuFd, msrs: &[u32]) -> Result<Self, VcpuStateError> {
        // Events and MP state first: reading them does not change them,
        // and they describe the vCPU as it stopped.
        let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
        let events = fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
        let cpuid = fd.get_cpuid2(MAX_CPUID_ENTRIES).map_err(kvm("KVM_GET_CPUID2"))?;
        Ok(Self {
            index,
            cpuid: cpuid.as_slice().to_vec(),
            regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            debug_regs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            xsave: fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            lapic: fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            msrs: read_msrs(fd, msrs)?,
            mp_state,
            events,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Sets a fresh vCPU to this state (before its first `KVM_RUN`).
    /// `xsave2_size` is the VM's `KVM_CAP_XSAVE2` (see [`crate::sys::set_xsave`]).
    pub fn restore(&self, fd: &VcpuFd, xsave2_size: i32) -> Result<(), VcpuStateError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| VcpuStateError::TooMany {
            what: "CPUID entries",
            count: self.cpuid.len(),
            max: MAX_CPUID_ENTRIES,
        })?;
        fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        if let Some(khz) = self.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                // A host with another TSC rate: scale the guest's, where
                // KVM can; the guest's clock stays right either way
                // (kvmclock), only its TSC rate differs.
                if let Err(e) = fd.set_tsc_khz(khz) {
                    log::warn!("snapshot: cannot set the guest TSC to {khz} kHz: {e}");
                }
            }
        }
        fd.set_mp_state(self.mp_state).map_err(kvm("KVM_SET_MP_STATE"))?;
        fd.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        crate::sys::set_xsave(fd, &self.xsave, xsave2_size).map_err(kvm("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        // The LAPIC before the MSRs: TSC-deadline needs the LAPIC's mode.
        fd.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        self.restore_msrs(fd)?;
        fd.set_vcpu_events(&self.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    fn restore_msrs(&self, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        for chunk in self.msrs.chunks(MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany {
                what: "MSRs",
                count: entries.len(),
                max: MAX_MSR_ENTRIES,
            })?;
            let set = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
            if set < entries.len() {
                return Err(VcpuStateError::MsrRefused {
                    index: entries[set].index,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msr_filter_keeps_state_and_drops_the_rest() {
        for saved in [0x10, 0x1b, 0x6e0, 0xc000_0080, 0xc000_0102, 0x4b56_4d01, 0x277] {
            assert!(msr_is_saved(saved), "{saved:#x}");
        }
        for dropped in [
            0x17a, /* MCG_STATUS */
            0x17b, /* MCG_CTL */
            0xc001_0015,
            0x8b,
        ] {
            assert!(!msr_is_saved(dropped), "{dropped:#x}");
        }
    }

    /// Saves a vCPU with distinctive registers, restores the state into a
    /// vCPU of another VM, and reads it back.
    #[test]
    fn state_round_trips_through_kvm() {
        let Ok(kvm_fd) = Kvm::new() else {
            eprintln!("no /dev/kvm: skipped");
            return;
        };
        let vm = kvm_fd.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let fd = vm.create_vcpu(0).unwrap();
        let cpuid = kvm_fd
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        fd.set_cpuid2(&cpuid).unwrap();
        let mut regs = fd.get_regs().unwrap();
        regs.rax = 0x1234_5678_9abc_def0;
        regs.r15 = 0x0f0f;
        regs.rip = 0x1000;
        fd.set_regs(&regs).unwrap();
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index: 0xc000_0102,
            data: 0xdead_b000,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(fd.set_msrs(&one).unwrap(), 1);
        let indices = saved_msr_indices(&kvm_fd).unwrap();
        assert!(indices.contains(&0xc000_0102));
        let state = VcpuState::save(0, &fd, &indices).unwrap();
        assert!(state.msrs.contains(&(0xc000_0102, 0xdead_b000)));

        // Through the file format and back.
        let bytes = super::super::format::encode(&state).unwrap();
        let state: VcpuState = super::super::format::decode(&bytes).unwrap();

        let vm2 = kvm_fd.create_vm().unwrap();
        vm2.create_irq_chip().unwrap();
        let fd2 = vm2.create_vcpu(0).unwrap();
        let xsave2 = vm2.check_extension_int(kvm_ioctls::Cap::Xsave2);
        state.restore(&fd2, xsave2).unwrap();
        let back = fd2.get_regs().unwrap();
        assert_eq!(back.rax, 0x1234_5678_9abc_def0);
        assert_eq!(back.r15, 0x0f0f);
        assert_eq!(back.rip, 0x1000);
        one.as_mut_slice()[0].data = 0;
        assert_eq!(fd2.get_msrs(&mut one).unwrap(), 1);
        assert_eq!(one.as_slice()[0].data, 0xdead_b000);
    }
}
