//! The whole of a microVM's saved state: the payload of the state file.

use flatlet_devices::boot_timer::BootTimerState;
use flatlet_devices::i8042::I8042State;
use flatlet_devices::ioapic::IoApicState;
use flatlet_devices::serial::SerialDeviceState;
use kvm_bindings::kvm_clock_data;
use serde::{Deserialize, Serialize};

use super::vcpu::VcpuState;

/// Errors taking a snapshot of a VM.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// What flatlet cannot save yet.
    #[error("{0}")]
    Unsupported(&'static str),
    /// The vCPUs or KVM failed.
    #[error("saving the VM: {0}")]
    Save(String),
}

/// The machine's shape, checked against the memory file on restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    /// vCPUs.
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Whether SMT was on.
    pub smt: bool,
}

/// Devices outside KVM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    /// flatlet's I/O APIC (split irqchip).
    pub ioapic: IoApicState,
    /// COM1.
    pub serial: SerialDeviceState,
    /// The keyboard controller.
    pub i8042: I8042State,
    /// The boot timer.
    pub boot_timer: BootTimerState,
}

/// A microVM's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// Machine shape.
    pub machine: MachineState,
    /// The VM clock (`KVM_GET_CLOCK`).
    pub clock: kvm_clock_data,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Devices.
    pub devices: DeviceStates,
}

impl MicrovmState {
    /// Checks what the file claims before anything is built from it.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        let n = usize::from(self.machine.vcpu_count);
        if n == 0 || self.vcpus.len() != n {
            return Err(SnapshotError::Unsupported(
                "snapshot state: the vCPU states do not match the vCPU count",
            ));
        }
        if self
            .vcpus
            .iter()
            .enumerate()
            .any(|(i, v)| usize::from(v.index) != i)
        {
            return Err(SnapshotError::Unsupported(
                "snapshot state: vCPU states out of order",
            ));
        }
        if self.machine.mem_size_mib == 0 {
            return Err(SnapshotError::Unsupported("snapshot state: no guest memory"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::format;

    fn vcpu(index: u8) -> VcpuState {
        VcpuState {
            index,
            cpuid: vec![Default::default()],
            msrs: vec![(0x10, 42)],
            regs: Default::default(),
            sregs: Default::default(),
            debug_regs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            lapic: Default::default(),
            mp_state: Default::default(),
            events: Default::default(),
            tsc_khz: Some(2_000_000),
        }
    }

    fn state(vcpus: u8) -> MicrovmState {
        MicrovmState {
            machine: MachineState {
                vcpu_count: vcpus,
                mem_size_mib: 128,
                smt: false,
            },
            clock: Default::default(),
            vcpus: (0..vcpus).map(vcpu).collect(),
            devices: DeviceStates {
                ioapic: IoApicState {
                    id: 0,
                    select: 0,
                    redirection: vec![1 << 16; 24],
                    line: vec![false; 24],
                },
                serial: SerialDeviceState {
                    baud_divisor: [12, 0],
                    registers: [0; 7],
                    in_buffer: b"x".to_vec(),
                },
                i8042: I8042State {
                    status: 0x14,
                    control: 0x45,
                    output_port: 1,
                    pending: 0,
                    buffer: vec![],
                },
                boot_timer: BootTimerState::default(),
            },
        }
    }

    #[test]
    fn the_whole_state_round_trips_through_the_file_format() {
        let bytes = format::encode(&state(2)).unwrap();
        let back: MicrovmState = format::decode(&bytes).unwrap();
        back.validate().unwrap();
        assert_eq!(back.machine, state(2).machine);
        assert_eq!(back.devices, state(2).devices);
        assert_eq!(back.vcpus[1].msrs, vec![(0x10, 42)]);
        assert_eq!(back.vcpus[1].tsc_khz, Some(2_000_000));
    }

    #[test]
    fn validate_refuses_inconsistent_states() {
        let mut s = state(2);
        s.vcpus.pop();
        assert!(s.validate().is_err());
        let mut s = state(2);
        s.vcpus.swap(0, 1);
        assert!(s.validate().is_err());
        let mut s = state(1);
        s.machine.mem_size_mib = 0;
        assert!(s.validate().is_err());
    }
}
