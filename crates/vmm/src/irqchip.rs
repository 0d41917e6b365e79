//! The interrupt controller and timer of a VM: the one place where that
//! choice is made.
//!
//! - `split` (the default): KVM's split irqchip. The local APICs (and their
//!   timers) are in KVM; the I/O APIC is flatlet's, its pins delivered as
//!   MSIs. No PIT: the guest times with the LAPIC timer and the TSC, whose
//!   frequencies CPUID leaf 0x4000_0010 gives it. On the nested host these
//!   machines run, creating this costs nothing measurable.
//! - `full`: KVM's in-kernel PIC, I/O APIC and local APICs (~10 ms more per
//!   launch on the nested host).
//! - `full-pit`: as `full`, plus KVM's in-kernel PIT (~15 ms more again),
//!   for guests that insist on a PIT.
//!
//! The measurements behind the default are in the README.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use flatlet_devices::bus::lock;
use flatlet_devices::ioapic::{IoApic, MsiMessage, MsiSink, NUM_PINS};
use flatlet_devices::irq::InterruptController;
use kvm_bindings::{
    KVM_IRQ_ROUTING_MSI, KVM_PIT_SPEAKER_DUMMY, KvmIrqRouting, kvm_enable_cap, kvm_irq_routing_entry,
    kvm_msi, kvm_pit_config,
};
use kvm_ioctls::{Cap, VmFd};
use log::warn;
use vmm_sys_util::eventfd::EventFd;

/// Which interrupt controller and timer a VM gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum IrqchipMode {
    /// Split irqchip, I/O APIC in flatlet, no PIT.
    #[default]
    #[serde(rename = "split")]
    Split,
    /// KVM's full in-kernel irqchip.
    #[serde(rename = "full")]
    Full,
    /// KVM's full irqchip and PIT.
    #[serde(rename = "full-pit")]
    FullWithPit,
}

impl IrqchipMode {
    /// Whether this is the default (left out of `GET /machine-config`, so
    /// that the body stays Firecracker's).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl FromStr for IrqchipMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "split" => Ok(Self::Split),
            "full" => Ok(Self::Full),
            "full-pit" => Ok(Self::FullWithPit),
            other => Err(format!(
                "unknown irqchip {other:?} (expected split, full or full-pit)"
            )),
        }
    }
}

impl fmt::Display for IrqchipMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Split => "split",
            Self::Full => "full",
            Self::FullWithPit => "full-pit",
        })
    }
}

/// Errors creating the interrupt controller.
#[derive(Debug, thiserror::Error)]
pub enum IrqchipError {
    /// KVM refused.
    #[error("cannot create the {mode} irqchip: {source}")]
    Create {
        mode: IrqchipMode,
        source: kvm_ioctls::Error,
    },
}

/// The interrupt controller of a built VM.
pub struct Irqchip {
    /// Where devices send their interrupts.
    pub controller: Arc<dyn InterruptController>,
    /// flatlet's I/O APIC, for the MMIO bus and EOI exits (split only).
    pub ioapic: Option<Arc<Mutex<IoApic>>>,
    /// Where irqfds are attached (split only).
    pub msi_sink: Option<Arc<KvmMsiSink>>,
}

/// Creates the interrupt controller of `vm`. Call before creating vCPUs.
pub fn create(vm: &Arc<VmFd>, mode: IrqchipMode, ioapic_id: u8) -> Result<Irqchip, IrqchipError> {
    let err = |source| IrqchipError::Create { mode, source };
    match mode {
        IrqchipMode::Split => {
            let mut cap = kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_SPLIT_IRQCHIP,
                ..Default::default()
            };
            cap.args[0] = NUM_PINS as u64;
            vm.enable_cap(&cap).map_err(err)?;
            let sink = Arc::new(KvmMsiSink::new(vm.clone()));
            let ioapic = Arc::new(Mutex::new(IoApic::new(ioapic_id, sink.clone())));
            Ok(Irqchip {
                controller: ioapic.clone(),
                ioapic: Some(ioapic),
                msi_sink: Some(sink),
            })
        }
        IrqchipMode::Full | IrqchipMode::FullWithPit => {
            vm.create_irq_chip().map_err(err)?;
            if mode == IrqchipMode::FullWithPit {
                let pit = kvm_pit_config {
                    flags: KVM_PIT_SPEAKER_DUMMY,
                    ..Default::default()
                };
                vm.create_pit2(pit).map_err(err)?;
            }
            Ok(Irqchip {
                controller: Arc::new(KvmIrqLines { vm: vm.clone() }),
                ioapic: None,
                msi_sink: None,
            })
        }
    }
}

/// Whether KVM can run `mode` here.
pub fn supported(kvm: &kvm_ioctls::Kvm, mode: IrqchipMode) -> bool {
    match mode {
        IrqchipMode::Split => kvm.check_extension(Cap::SplitIrqchip),
        IrqchipMode::Full => kvm.check_extension(Cap::Irqchip),
        IrqchipMode::FullWithPit => kvm.check_extension(Cap::Irqchip) && kvm.check_extension(Cap::Pit2),
    }
}

/// Delivers the I/O APIC's MSIs: through the pin's irqfd once one is
/// registered (and KVM holds the route for the pin's current message),
/// through KVM_SIGNAL_MSI before that. KVM gets GSI routes only for pins
/// that need them: pins with an irqfd, and level-triggered pins (so that
/// KVM reports the guest's EOIs for them, KVM_EXIT_IOAPIC_EOI).
pub struct KvmMsiSink {
    vm: Arc<VmFd>,
    state: Mutex<SinkState>,
}

#[derive(Default)]
struct SinkState {
    /// The message of each unmasked pin.
    routes: [Option<MsiMessage>; NUM_PINS],
    irqfds: [Option<EventFd>; NUM_PINS],
    /// The routes KVM has.
    installed: Vec<(u32, MsiMessage)>,
}

impl KvmMsiSink {
    fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            state: Mutex::new(SinkState::default()),
        }
    }

    /// Delivers pin `pin` through `evt` (already registered with KVM as
    /// the irqfd of GSI `pin`) from now on.
    pub fn attach_irqfd(&self, pin: usize, evt: EventFd) {
        if pin >= NUM_PINS {
            return;
        }
        let mut st = lock(&self.state);
        st.irqfds[pin] = Some(evt);
        self.sync_routes(&mut st);
    }

    /// Gives KVM the routes it needs, if they changed.
    fn sync_routes(&self, st: &mut SinkState) {
        let wanted: Vec<(u32, MsiMessage)> = st
            .routes
            .iter()
            .enumerate()
            .filter_map(|(pin, m)| {
                let m = (*m)?;
                let level = m.data & MSI_DATA_LEVEL_TRIGGER != 0;
                (level || st.irqfds[pin].is_some()).then_some((pin as u32, m))
            })
            .collect();
        if wanted == st.installed {
            return;
        }
        let entries: Vec<kvm_irq_routing_entry> = wanted.iter().map(|&(gsi, m)| msi_route(gsi, m)).collect();
        match KvmIrqRouting::from_entries(&entries) {
            Ok(table) => match self.vm.set_gsi_routing(&table) {
                Ok(()) => st.installed = wanted,
                Err(e) => warn!("irqchip: cannot set GSI routes: {e}"),
            },
            Err(e) => warn!("irqchip: cannot build GSI routes: {e:?}"),
        }
    }
}

const MSI_DATA_LEVEL_TRIGGER: u32 = 1 << 15;

impl MsiSink for KvmMsiSink {
    fn send(&self, pin: usize, msg: MsiMessage) -> std::io::Result<()> {
        {
            let st = lock(&self.state);
            let routed = st
                .installed
                .iter()
                .any(|&(gsi, m)| gsi as usize == pin && m == msg);
            if let (true, Some(evt)) = (routed, st.irqfds.get(pin).and_then(Option::as_ref)) {
                return evt.write(1);
            }
        }
        let msi = kvm_msi {
            address_lo: msg.address as u32,
            address_hi: (msg.address >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        self.vm.signal_msi(msi).map(|_| ()).map_err(std::io::Error::from)
    }

    fn route_changed(&self, pin: usize, route: Option<MsiMessage>) {
        if pin >= NUM_PINS {
            return;
        }
        let mut st = lock(&self.state);
        st.routes[pin] = route;
        // Edge-triggered pins without an irqfd need no route: the common
        // case at boot (Linux on the MP table's ISA IRQs) never pays for
        // KVM_SET_GSI_ROUTING.
        self.sync_routes(&mut st);
    }
}

fn msi_route(gsi: u32, m: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = m.address as u32;
    e.u.msi.address_hi = (m.address >> 32) as u32;
    e.u.msi.data = m.data;
    e
}

/// Interrupts through KVM's in-kernel I/O APIC (full irqchip).
struct KvmIrqLines {
    vm: Arc<VmFd>,
}

impl InterruptController for KvmIrqLines {
    fn pulse(&self, pin: usize) {
        if let Err(e) = self
            .vm
            .set_irq_line(pin as u32, true)
            .and_then(|_| self.vm.set_irq_line(pin as u32, false))
        {
            warn!("irqchip: cannot pulse IRQ {pin}: {e}");
        }
    }

    fn set_level(&self, pin: usize, asserted: bool) {
        if let Err(e) = self.vm.set_irq_line(pin as u32, asserted) {
            warn!("irqchip: cannot set IRQ {pin}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for m in [IrqchipMode::Split, IrqchipMode::Full, IrqchipMode::FullWithPit] {
            assert_eq!(m.to_string().parse::<IrqchipMode>(), Ok(m));
        }
        assert!("pic".parse::<IrqchipMode>().is_err());
        assert_eq!(IrqchipMode::default(), IrqchipMode::Split);
    }
}
