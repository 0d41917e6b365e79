//! The whole of a microVM's saved state: the payload of the state file.

use flatlet_devices::boot_timer::BootTimerState;
use flatlet_devices::i8042::I8042State;
use flatlet_devices::ioapic::IoApicState;
use flatlet_devices::serial::SerialDeviceState;
use flatlet_devices::virtio::mmio::TransportState;
use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use serde::{Deserialize, Serialize};

use super::vcpu::VcpuState;
use crate::config::devices::{DriveConfig, NetConfig, validate_count, validate_drives, validate_nets};
use crate::config::rate_limit::EntropyConfig;
use crate::config::vsock::VsockConfig;
use crate::config::{ConfigError, MachineConfig, VmConfig};

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

/// KVM's in-kernel interrupt controllers (and PIT), with the full irqchip.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KernelIrqchipState {
    /// The master PIC, the slave PIC and the I/O APIC (chip ids 0, 1, 2).
    pub chips: Vec<kvm_irqchip>,
    /// The PIT, with `full-pit`.
    pub pit: Option<kvm_pit_state2>,
}

/// Devices outside KVM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    /// flatlet's I/O APIC (split irqchip; None with KVM's).
    pub ioapic: Option<IoApicState>,
    /// COM1.
    pub serial: SerialDeviceState,
    /// The keyboard controller.
    pub i8042: I8042State,
    /// The boot timer.
    pub boot_timer: BootTimerState,
    /// The virtio devices, in placement order.
    pub virtio: Vec<VirtioDeviceState>,
}

/// One virtio device: where it was placed and its transport's state. The
/// device itself is made again from the saved configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    /// The drive or interface id.
    pub id: String,
    /// Guest-physical base of its MMIO window.
    pub addr: u64,
    /// Its I/O APIC pin.
    pub irq: u32,
    /// Registers and queues.
    pub transport: TransportState,
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
    /// KVM's interrupt controllers, with the full irqchip.
    pub kernel_irqchip: Option<KernelIrqchipState>,
    /// The devices' configuration (drives, network interfaces, vsock,
    /// entropy, MMDS), as JSON: the configuration's own serde form, with
    /// its own checks on restore.
    pub config: String,
}

/// The configuration a restored VM's devices are made from: the
/// configuration's own serde form, saved as JSON (see
/// [`MicrovmState::config`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedConfig {
    /// The machine (its shape is also in [`MachineState`]).
    pub machine: MachineConfig,
    /// Block devices.
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// Network interfaces.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// The entropy device.
    #[serde(default)]
    pub entropy: Option<EntropyConfig>,
    /// MMDS.
    #[serde(default)]
    pub mmds: Option<flatlet_mmds::MmdsConfig>,
    /// The vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
}

/// `network_overrides` of `PUT /snapshot/load`: another TAP for an
/// interface of the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface, by its id in the snapshot.
    pub iface_id: String,
    /// The TAP the restored interface uses.
    pub host_dev_name: String,
}

impl SavedConfig {
    /// What a VM built from `config` saves.
    pub fn of(config: &VmConfig) -> Self {
        Self {
            machine: config.machine.clone(),
            drives: config.drives.clone(),
            nets: config.nets.clone(),
            entropy: config.entropy,
            mmds: config.mmds.clone(),
            vsock: config.vsock.clone(),
        }
    }

    /// Parses the saved JSON and checks it as a configuration is checked
    /// (the file is untrusted).
    pub fn parse(json: &str) -> Result<Self, ConfigError> {
        let saved: Self = serde_json::from_str(json)
            .map_err(|e| ConfigError::InvalidDevice(format!("snapshot state: device configuration: {e}")))?;
        validate_count(saved.drives.len(), saved.nets.len())?;
        for d in &saved.drives {
            d.validate()?;
        }
        validate_drives(&saved.drives)?;
        for n in &saved.nets {
            n.validate()?;
        }
        validate_nets(&saved.nets)?;
        if let Some(e) = &saved.entropy {
            e.validate()?;
        }
        if let Some(v) = &saved.vsock {
            v.validate()?;
        }
        if let Some(m) = &saved.mmds {
            m.validate(saved.nets.iter().map(|n| n.iface_id.as_str()))
                .map_err(|e| ConfigError::InvalidDevice(format!("snapshot state: MMDS: {e}")))?;
        }
        Ok(saved)
    }

    /// Points interfaces at other TAPs; an override of an interface the
    /// snapshot does not have is an error.
    pub fn override_networks(&mut self, overrides: &[NetworkOverride]) -> Result<(), ConfigError> {
        for o in overrides {
            let Some(n) = self.nets.iter_mut().find(|n| n.iface_id == o.iface_id) else {
                return Err(ConfigError::InvalidDevice(format!(
                    "network override for {:?}: the snapshot has no such interface",
                    o.iface_id
                )));
            };
            n.host_dev_name = o.host_dev_name.clone();
            n.validate()?;
        }
        validate_nets(&self.nets)
    }

    /// Points the vsock device at another Unix socket; an error if the
    /// snapshot has no vsock device.
    pub fn override_vsock(&mut self, uds_path: &str) -> Result<(), ConfigError> {
        let Some(v) = self.vsock.as_mut() else {
            return Err(ConfigError::InvalidDevice(
                "vsock override: the snapshot has no vsock device".into(),
            ));
        };
        v.uds_path = uds_path.to_string();
        v.validate()
    }

    /// Sets the devices of `config` (a fresh one) to the saved ones.
    pub fn apply(self, config: &mut VmConfig) {
        config.drives = self.drives;
        config.nets = self.nets;
        config.entropy = self.entropy;
        config.mmds = self.mmds;
        config.vsock = self.vsock;
    }
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
        // One interrupt controller: flatlet's I/O APIC or KVM's three chips.
        let kernel_ok = self
            .kernel_irqchip
            .as_ref()
            .is_none_or(|k| k.chips.iter().map(|c| c.chip_id).eq(0..3));
        if self.devices.ioapic.is_some() == self.kernel_irqchip.is_some() || !kernel_ok {
            return Err(SnapshotError::Unsupported(
                "snapshot state: the interrupt controller state is inconsistent",
            ));
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
                ioapic: Some(IoApicState {
                    id: 0,
                    select: 0,
                    redirection: vec![1 << 16; 24],
                    line: vec![false; 24],
                }),
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
                virtio: vec![],
            },
            kernel_irqchip: None,
            config: "{}".into(),
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
