//! Building a VM from its configuration, and the running VM.
//!
//! The build order follows what KVM requires (irqchip before vCPUs, CPUID
//! before the first `KVM_RUN`) and keeps the costly kernel calls few: on
//! nested hosts each KVM call that synchronises the VM costs milliseconds.

use std::io::Write;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flatlet_devices::boot_timer::{BOOT_TIMER_ADDR, BOOT_TIMER_SIZE, BootTimer, StartTime};
use flatlet_devices::bus::{Bus, BusError, lock};
use flatlet_devices::i8042::{I8042, I8042_PORT, I8042_PORT_LEN, KBD_IRQ};
use flatlet_devices::ioapic::{IOAPIC_BASE, IOAPIC_SIZE};
use flatlet_devices::irq::IrqLine;
use flatlet_devices::serial::{COM_PORT_LEN, COM1_IRQ, COM1_PORT, Serial};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm, VmFd};
use log::{debug, info, warn};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::arch::bootparams::{BootParamsError, ZeroPage, e820_map};
use crate::arch::cpuid::{self, CpuidParams};
use crate::arch::mptable::{self, MptableError};
use crate::arch::regs::{self, RegsError};
use crate::config::{ConfigError, VmConfig};
use crate::device_manager::{self, DeviceError, VirtioSlot};
use crate::exit::{EXIT_BAD_CONFIG, EXIT_ERROR, EXIT_KVM, ExitSignal, VmExit};
use crate::host::HostKind;
use crate::irqchip::IrqchipMode;
use crate::irqchip::{self, IrqchipError};
use crate::layout::KVM_TSS_ADDRESS;
use crate::loader::{self, LoaderError};
use crate::memory::{self, MemoryError};
use crate::snapshot::state::{
    DeviceStates, KernelIrqchipState, MachineState, MicrovmState, SnapshotError, VirtioDeviceState,
};
use crate::snapshot::vcpu::{VcpuState, saved_msr_indices};
use crate::sys;
use crate::vcpu::{MachineIo, VcpuCommand, VcpuContext, VcpuEvent, VcpuHandle, VcpuSetup};

/// How long the VMM waits for vCPU threads to answer a command.
const VCPU_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// No usable /dev/kvm.
    #[error("cannot open /dev/kvm: {0} (is KVM available, and may this user use it?)")]
    KvmOpen(kvm_ioctls::Error),
    /// A KVM capability flatlet needs is missing.
    #[error("KVM on this host lacks {0}")]
    KvmCapability(String),
    /// A KVM call failed.
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// More vCPUs than KVM allows here.
    #[error("this host's KVM allows at most {max} vCPUs, not {requested}")]
    TooManyVcpus { requested: u8, max: usize },
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The interrupt controller.
    #[error(transparent)]
    Irqchip(#[from] IrqchipError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel, initrd or command line.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// The zero page.
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    /// The MP table.
    #[error(transparent)]
    Mptable(#[from] MptableError),
    /// Boot page tables and GDT.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// Device placement.
    #[error("device placement: {0}")]
    Bus(#[from] BusError),
    /// A virtio device.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A thread or eventfd could not be created.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    /// A snapshot's state could not be restored.
    #[error("restoring the snapshot: {0}")]
    Restore(String),
    /// A vCPU could not be configured.
    #[error("configuring vCPU {cpu}: {reason}")]
    VcpuConfig { cpu: u8, reason: String },
}

impl BuildError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            BuildError::KvmOpen(_)
            | BuildError::KvmCapability(_)
            | BuildError::Kvm { .. }
            | BuildError::Irqchip(_)
            | BuildError::VcpuConfig { .. } => EXIT_KVM,
            BuildError::TooManyVcpus { .. }
            | BuildError::Config(_)
            | BuildError::Restore(_)
            | BuildError::Loader(_)
            | BuildError::Device(DeviceError::DriveOpen { .. } | DeviceError::Tap { .. }) => EXIT_BAD_CONFIG,
            _ => EXIT_ERROR,
        }
    }
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> BuildError {
    move |source| BuildError::Io { what, source }
}

/// What a build needs besides the configuration.
pub struct BuildContext {
    /// The host kind (decides the nested-host workarounds).
    pub host: HostKind,
    /// Where guest console output goes.
    pub serial_out: Box<dyn Write + Send>,
    /// The kick signal of vCPU threads (its handler must be installed).
    pub kick_signal: i32,
    /// Where the boot time counts from (`--start-time-us`); the start of
    /// the build when not given.
    pub start: Option<StartTime>,
    /// When loading a snapshot: its state and memory, instead of a boot.
    pub restore: Option<RestoreSource>,
}

/// What a VM is restored from.
pub struct RestoreSource {
    /// The saved state (validated).
    pub state: MicrovmState,
    /// The guest memory, mapped from the memory file.
    pub memory: GuestMemoryMmap,
    /// Whether the vCPUs start paused (they run no guest instruction
    /// until resumed).
    pub paused: bool,
    /// Advance the guest clock by the wall-clock time since the snapshot.
    pub clock_realtime: bool,
}

/// A running (or paused) VM.
///
/// Field order is drop order: vCPU threads first, then devices, the KVM
/// file descriptors, and last the guest memory they map.
pub struct Vm {
    vcpus: Vec<VcpuHandle>,
    vcpu_events: Receiver<VcpuEvent>,
    /// Where the end of the VM is reported.
    pub exit: Arc<ExitSignal>,
    /// The console UART.
    pub serial: Arc<Mutex<Serial>>,
    /// Readable when the UART can take more input.
    pub serial_input_ready: EventFd,
    /// The keyboard controller.
    pub i8042: Arc<Mutex<I8042>>,
    boot_timer: Arc<Mutex<BootTimer>>,
    /// The virtio devices.
    pub virtio: Vec<VirtioSlot>,
    io: Arc<MachineIo>,
    vm_fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    kvm: Kvm,
    irqchip: IrqchipMode,
    /// The command line the guest got.
    pub cmdline: String,
}

/// Times the build steps, for the debug log.
struct Steps {
    last: Instant,
}

impl Steps {
    fn mark(&mut self, what: &str) {
        let now = Instant::now();
        debug!("build: {what} took {} us", (now - self.last).as_micros());
        self.last = now;
    }
}

/// Builds and starts a VM.
pub fn build(config: &VmConfig, ctx: BuildContext) -> Result<Vm, BuildError> {
    let build_start = Instant::now();
    let start = ctx.start.unwrap_or_else(StartTime::now);
    let mut steps = Steps { last: build_start };
    let machine = &config.machine;
    let mut restore = ctx.restore;
    let boot = match &restore {
        Some(_) => None,
        None => Some(config.boot.as_ref().ok_or(ConfigError::MissingBootSource)?),
    };
    let cpus = machine.vcpu_count;

    let kvm = Kvm::new().map_err(BuildError::KvmOpen)?;
    if !irqchip::supported(&kvm, config.machine.irqchip) {
        return Err(BuildError::KvmCapability(format!(
            "the {} irqchip",
            config.machine.irqchip
        )));
    }
    let max = kvm.get_max_vcpus();
    if usize::from(cpus) > max {
        return Err(BuildError::TooManyVcpus { requested: cpus, max });
    }
    let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    steps.mark("KVM_CREATE_VM");
    if matches!(ctx.host, HostKind::Vmx { .. }) {
        // VMX needs a TSS area to run real-mode code (APs start there).
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    }
    let chip = irqchip::create(&vm_fd, config.machine.irqchip, mptable::ioapic_id(cpus))?;
    steps.mark("irqchip");

    let memory = match restore.as_mut() {
        Some(r) => std::mem::take(&mut r.memory),
        None => memory::create(machine.mem_size_mib)?,
    };
    if machine.huge_pages == crate::config::HugePages::Transparent {
        memory::advise_huge_pages(&memory)?;
    }
    let map_memory = || {
        sys::map_guest_memory(&vm_fd, &memory, machine.track_dirty_pages)
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))
    };
    // A restored vCPU's state may refer to guest memory (kvmclock), so
    // that memory goes in first. A booting VM's goes in while its vCPU
    // threads configure themselves: on the nested hosts the call waits
    // for an SRCU grace period, 0.2-1 ms of the launch (issue 16).
    if restore.is_some() {
        map_memory()?;
        steps.mark("guest memory");
    }

    let exit = Arc::new(ExitSignal::new().map_err(io_err("exit eventfd"))?);
    let serial_input_ready = EventFd::new(EFD_NONBLOCK).map_err(io_err("serial eventfd"))?;
    let serial_irq = IrqLine::new(chip.controller.clone(), COM1_IRQ);
    let serial_ready = Some(serial_input_ready.try_clone().map_err(io_err("serial eventfd"))?);
    let serial = Arc::new(Mutex::new(match &restore {
        Some(r) => Serial::from_state(serial_irq, ctx.serial_out, serial_ready, &r.state.devices.serial)
            .map_err(|e| BuildError::Restore(e.to_string()))?,
        None => Serial::new(serial_irq, ctx.serial_out, serial_ready),
    }));
    // The reset is reported from the vCPU thread that writes it, so that
    // it wins over whatever that vCPU would run into next.
    let reset_exit = exit.clone();
    let i8042 = Arc::new(Mutex::new(I8042::new(
        Box::new(move || reset_exit.report(VmExit::Reset)),
        IrqLine::new(chip.controller.clone(), KBD_IRQ),
    )));
    let boot_timer = Arc::new(Mutex::new(BootTimer::new(start)));
    if let Some(r) = &restore {
        restore_devices(r, &vm_fd, chip.ioapic.as_ref(), &i8042, &boot_timer)?;
    }
    let mut pio = Bus::new();
    pio.insert(serial.clone(), COM1_PORT, COM_PORT_LEN)?;
    pio.insert(i8042.clone(), I8042_PORT, I8042_PORT_LEN)?;
    let mut mmio = Bus::new();
    mmio.insert(boot_timer.clone(), BOOT_TIMER_ADDR, BOOT_TIMER_SIZE)?;
    if let Some(ioapic) = &chip.ioapic {
        mmio.insert(ioapic.clone(), IOAPIC_BASE, IOAPIC_SIZE)?;
    }
    let virtio = device_manager::attach(config, &memory, &mut mmio, &chip)?;
    if let Some(r) = &restore {
        restore_virtio(&r.state.devices.virtio, &virtio.slots)?;
    }
    let io = Arc::new(MachineIo {
        pio,
        mmio,
        ioapic: chip.ioapic.clone(),
        exits: Default::default(),
    });
    steps.mark("devices");

    let (entry, cmdline) = match boot {
        Some(boot) => load_boot(config, boot, &memory, &virtio.cmdline, ctx.host)?,
        None => (0, String::new()),
    };
    steps.mark("kernel and boot tables");

    let (vcpus, vcpu_events) = start_vcpus(
        VcpuStart {
            kvm: &kvm,
            vm_fd: &vm_fd,
            config,
            host: ctx.host,
            io: &io,
            exit: &exit,
            kick_signal: ctx.kick_signal,
            entry,
            paused: restore.as_ref().is_some_and(|r| r.paused),
            meanwhile: boot
                .is_some()
                .then_some(&map_memory as &dyn Fn() -> Result<(), BuildError>),
            restore: restore.map(|r| r.state.vcpus),
        },
        &mut steps,
    )?;
    device_manager::register_fast_paths(vm_fd.clone(), virtio.slots.clone(), chip.msi_sink.clone());
    info!(
        "VM {}: {cpus} vCPU(s), {} MiB, {} irqchip, {} virtio device(s), kernel {}, entry {:#x}",
        if boot.is_some() {
            "started"
        } else {
            "restored from a snapshot"
        },
        machine.mem_size_mib,
        config.machine.irqchip,
        virtio.slots.len(),
        match boot.map(|b| &b.kernel) {
            Some(crate::config::Kernel::Path(p)) => p.display().to_string(),
            Some(crate::config::Kernel::Builtin(_)) => crate::config::BUILTIN_KERNEL_NAME.into(),
            None => "(snapshot)".into(),
        },
        entry
    );
    debug!("guest command line: {cmdline}");
    Ok(Vm {
        vcpus,
        vcpu_events,
        exit,
        serial,
        serial_input_ready,
        i8042,
        boot_timer,
        virtio: virtio.slots,
        io,
        vm_fd,
        memory,
        kvm,
        irqchip: config.machine.irqchip,
        cmdline,
    })
}

/// Sets the restored devices (and the VM clock) to their saved state.
fn restore_devices(
    r: &RestoreSource,
    vm_fd: &VmFd,
    ioapic: Option<&Arc<Mutex<flatlet_devices::ioapic::IoApic>>>,
    i8042: &Arc<Mutex<I8042>>,
    boot_timer: &Arc<Mutex<BootTimer>>,
) -> Result<(), BuildError> {
    let restore_err = |e: String| BuildError::Restore(e);
    let state = &r.state;
    match (ioapic, &state.devices.ioapic, &state.kernel_irqchip) {
        (Some(ioapic), Some(saved), None) => lock(ioapic)
            .restore(saved)
            .map_err(|e| restore_err(e.to_string()))?,
        (None, None, Some(kernel)) => restore_kernel_irqchip(vm_fd, kernel)?,
        _ => {
            return Err(restore_err(
                "the snapshot's interrupt controller is not the configured one".into(),
            ));
        }
    }
    lock(i8042)
        .restore(&state.devices.i8042)
        .map_err(|e| restore_err(e.to_string()))?;
    lock(boot_timer).restore(&state.devices.boot_timer);
    let mut clock = state.clock;
    // Only the time itself (the flags KVM_GET_CLOCK reports are not all
    // ones KVM_SET_CLOCK takes), and with clock_realtime the wall-clock
    // time it was taken at, so that KVM adds the time since.
    clock.flags = 0;
    if r.clock_realtime {
        if state.clock.flags & kvm_bindings::KVM_CLOCK_REALTIME == 0 {
            return Err(restore_err(
                "clock_realtime: the snapshot's host did not give its clock's wall-clock time".into(),
            ));
        }
        clock.flags = kvm_bindings::KVM_CLOCK_REALTIME;
    }
    vm_fd.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))
}

/// Sets KVM's PICs, I/O APIC and PIT to their saved state (KVM checks
/// what it is given; a PIT is only set if the VM has one).
fn restore_kernel_irqchip(vm_fd: &VmFd, kernel: &KernelIrqchipState) -> Result<(), BuildError> {
    for chip in &kernel.chips {
        vm_fd.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
    }
    if let Some(pit) = &kernel.pit {
        vm_fd.set_pit2(pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    }
    Ok(())
}

/// Sets each virtio transport (and so its device) to its saved state. The
/// devices were made from the saved configuration, so they must be the
/// saved ones, in the same places.
fn restore_virtio(saved: &[VirtioDeviceState], slots: &[VirtioSlot]) -> Result<(), BuildError> {
    if saved.len() != slots.len() {
        return Err(BuildError::Restore(format!(
            "the snapshot has {} virtio device states for {} configured devices",
            saved.len(),
            slots.len()
        )));
    }
    for (s, slot) in saved.iter().zip(slots) {
        if (s.id.as_str(), s.addr, s.irq) != (slot.id.as_str(), slot.addr, slot.irq) {
            return Err(BuildError::Restore(format!(
                "virtio device {:?} at {:#x} (pin {}) in the snapshot, {:?} at {:#x} (pin {}) configured",
                s.id, s.addr, s.irq, slot.id, slot.addr, slot.irq
            )));
        }
        lock(&slot.transport)
            .restore(&s.transport)
            .map_err(|e| BuildError::Restore(format!("virtio device {:?}: {e}", s.id)))?;
    }
    Ok(())
}

/// Loads the kernel, initrd and command line and writes the boot tables;
/// returns the entry point and the command line.
fn load_boot(
    config: &VmConfig,
    boot: &crate::config::BootSource,
    memory: &GuestMemoryMmap,
    virtio_cmdline: &[String],
    host: HostKind,
) -> Result<(u64, String), BuildError> {
    let cpus = config.machine.vcpu_count;
    let mem_bytes = (config.machine.mem_size_mib as u64) << 20;
    let memory = memory.clone();
    let kernel = loader::load_kernel(&memory, &boot.kernel)?;
    let initrd = match &boot.initrd {
        Some(path) => Some(loader::load_initrd(
            &memory,
            path,
            &kernel,
            memory::low_ram_end(mem_bytes),
        )?),
        None => None,
    };
    let mut extra = virtio_cmdline.to_vec();
    if let Some(flags) = host.linux_guest_flags() {
        if loader::is_linux(&memory, &kernel) {
            info!("nested host: adding to the Linux command line: {flags}");
            extra.push(flags);
        }
    }
    let cmdline = loader::build_cmdline(boot, &extra)?;
    debug!("guest command line: {cmdline}");
    let cmdline_size = loader::write_cmdline(&memory, &cmdline)?;
    ZeroPage {
        setup_header: kernel.setup_header,
        cmdline_size,
        initrd,
        e820: e820_map(&memory::ram_regions(mem_bytes)),
    }
    .write(&memory)?;
    mptable::write(&memory, cpus)?;
    regs::write_boot_tables(&memory)?;
    Ok((kernel.entry, cmdline))
}

/// What starting the vCPUs needs.
struct VcpuStart<'a> {
    kvm: &'a Kvm,
    vm_fd: &'a VmFd,
    config: &'a VmConfig,
    host: HostKind,
    io: &'a Arc<MachineIo>,
    exit: &'a Arc<ExitSignal>,
    kick_signal: i32,
    entry: u64,
    /// When restoring: each vCPU's saved state, in index order.
    restore: Option<Vec<VcpuState>>,
    /// Work for the VMM thread while the vCPU threads configure.
    meanwhile: Option<&'a dyn Fn() -> Result<(), BuildError>>,
    /// Start paused.
    paused: bool,
}

/// Creates the vCPUs, lets each thread configure its own in parallel, and
/// once all are ready lets them run.
fn start_vcpus(
    s: VcpuStart<'_>,
    steps: &mut Steps,
) -> Result<(Vec<VcpuHandle>, Receiver<VcpuEvent>), BuildError> {
    let cpus = s.config.machine.vcpu_count;
    let base_cpuid = s
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let tsc_deadline = s.kvm.check_extension(Cap::TscDeadlineTimer);
    let mut fds = Vec::with_capacity(usize::from(cpus));
    for i in 0..cpus {
        fds.push(
            s.vm_fd
                .create_vcpu(u64::from(i))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?,
        );
    }
    let tsc_khz = fds.first().and_then(|fd| fd.get_tsc_khz().ok());
    steps.mark("KVM_CREATE_VCPU");

    let xsave2_size = s.vm_fd.check_extension_int(Cap::Xsave2);
    let mut saved = s.restore.map(|v| v.into_iter());
    let (events_tx, events_rx) = mpsc::channel();
    let mut handles = Vec::with_capacity(usize::from(cpus));
    for (index, fd) in (0..cpus).zip(fds) {
        let mut cpuid = base_cpuid.clone();
        cpuid::shape(
            &mut cpuid,
            &CpuidParams {
                apic_id: index,
                cpu_count: cpus,
                smt: s.config.machine.smt,
                tsc_deadline,
                tsc_khz,
                mask_for_emulator: s.host.emulates_guest_kernel(),
            },
        );
        let (tx, rx) = mpsc::channel();
        let setup = VcpuSetup {
            index,
            cpuid,
            boot_entry: (index == 0).then_some(s.entry),
            restore: saved
                .as_mut()
                .and_then(Iterator::next)
                .map(|state| (Box::new(state), xsave2_size)),
        };
        let ctx = VcpuContext {
            io: s.io.clone(),
            exit: s.exit.clone(),
            commands: rx,
            events: events_tx.clone(),
            kick_signal: s.kick_signal,
        };
        match VcpuHandle::spawn(fd, setup, ctx, tx) {
            Ok(h) => handles.push(h),
            Err(e) => {
                stop_all(&handles, &events_rx);
                return Err(BuildError::Io {
                    what: "spawning a vCPU thread",
                    source: e,
                });
            }
        }
    }
    steps.mark("vCPU threads started");
    if let Some(work) = s.meanwhile {
        if let Err(e) = work() {
            stop_all(&handles, &events_rx);
            return Err(e);
        }
        steps.mark("guest memory (while vCPUs configure)");
    }
    // Every thread reports its configuration; the first failure stops all.
    let mut ready = 0;
    while ready < handles.len() {
        match events_rx.recv_timeout(VCPU_ANSWER_TIMEOUT) {
            Ok(VcpuEvent::Configured(_, Ok(()))) => ready += 1,
            Ok(VcpuEvent::Configured(cpu, Err(reason))) => {
                stop_all(&handles, &events_rx);
                return Err(BuildError::VcpuConfig { cpu, reason });
            }
            Ok(_) => {}
            Err(_) => {
                stop_all(&handles, &events_rx);
                return Err(BuildError::VcpuConfig {
                    cpu: ready as u8,
                    reason: "no answer from the vCPU thread".into(),
                });
            }
        }
    }
    steps.mark("vCPU configuration");
    for h in &handles {
        if s.paused {
            h.command(VcpuCommand::Pause);
        }
        h.command(VcpuCommand::Run);
    }
    Ok((handles, events_rx))
}

/// Stops every vCPU thread and waits (boundedly) until they have ended.
fn stop_all(handles: &[VcpuHandle], events: &Receiver<VcpuEvent>) {
    for h in handles {
        h.command(VcpuCommand::Stop);
    }
    let deadline = Instant::now() + VCPU_ANSWER_TIMEOUT;
    while handles.iter().any(|h| !h.is_finished()) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            warn!("some vCPU threads did not stop in time");
            return;
        }
        // Stopped events arrive as threads end; other events are stale.
        let _ = events.recv_timeout(left.min(Duration::from_millis(10)));
    }
}

impl Vm {
    /// Sends `cmd` to every vCPU and waits until each has answered with the
    /// event `expect` makes for it.
    fn command_all(&self, cmd: VcpuCommand, expect: fn(u8) -> VcpuEvent) -> Result<(), String> {
        // Answers to an earlier command that timed out must not count.
        while self.vcpu_events.try_recv().is_ok() {}
        for h in &self.vcpus {
            h.command(cmd.clone());
        }
        let mut waiting: Vec<u8> = self.vcpus.iter().map(VcpuHandle::index).collect();
        let deadline = Instant::now() + VCPU_ANSWER_TIMEOUT;
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.vcpu_events.recv_timeout(left) {
                Ok(ev) => waiting.retain(|i| expect(*i) != ev),
                Err(_) => return Err(format!("vCPUs {waiting:?} did not answer {cmd:?}")),
            }
        }
        Ok(())
    }

    /// Stops the vCPUs from entering the guest.
    pub fn pause(&self) -> Result<(), String> {
        self.command_all(VcpuCommand::Pause, VcpuEvent::Paused)
    }

    /// Reads every paused vCPU's state, on each vCPU's own thread.
    pub fn save_vcpus(&self) -> Result<Vec<VcpuState>, String> {
        let msrs = Arc::new(saved_msr_indices(&self.kvm).map_err(|e| e.to_string())?);
        let mut replies = Vec::with_capacity(self.vcpus.len());
        for h in &self.vcpus {
            let (reply, rx) = mpsc::channel();
            h.command(VcpuCommand::Save {
                msrs: msrs.clone(),
                reply,
            });
            replies.push((h.index(), rx));
        }
        let deadline = Instant::now() + VCPU_ANSWER_TIMEOUT;
        let mut states = Vec::with_capacity(replies.len());
        for (index, rx) in replies {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(state) => states.push(*state?),
                Err(_) => return Err(format!("vCPU {index} did not answer the save")),
            }
        }
        Ok(states)
    }

    /// The state of a paused VM, for a snapshot; `config` is the
    /// devices' configuration, as JSON.
    pub fn save_state(&self, machine: MachineState, config: String) -> Result<MicrovmState, SnapshotError> {
        let kernel_irqchip = match &self.io.ioapic {
            Some(_) => None,
            None => Some(self.save_kernel_irqchip().map_err(SnapshotError::Save)?),
        };
        let vcpus = self.save_vcpus().map_err(SnapshotError::Save)?;
        let clock = self.save_clock().map_err(SnapshotError::Save)?;
        Ok(MicrovmState {
            machine,
            clock,
            vcpus,
            devices: DeviceStates {
                ioapic: self.io.ioapic.as_ref().map(|i| lock(i).state()),
                serial: lock(&self.serial).state(),
                i8042: lock(&self.i8042).state(),
                boot_timer: lock(&self.boot_timer).state(),
                virtio: self
                    .virtio
                    .iter()
                    .map(|s| VirtioDeviceState {
                        id: s.id.clone(),
                        addr: s.addr,
                        irq: s.irq,
                        transport: lock(&s.transport).state(),
                    })
                    .collect(),
            },
            kernel_irqchip,
            config,
        })
    }

    /// KVM's PICs and I/O APIC, and its PIT if the VM has one.
    fn save_kernel_irqchip(&self) -> Result<KernelIrqchipState, String> {
        let mut chips = Vec::with_capacity(3);
        for chip_id in 0..3 {
            let mut chip = kvm_bindings::kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.vm_fd
                .get_irqchip(&mut chip)
                .map_err(|e| format!("KVM_GET_IRQCHIP ({chip_id}): {e}"))?;
            chips.push(chip);
        }
        let pit = match self.irqchip {
            IrqchipMode::FullWithPit => {
                Some(self.vm_fd.get_pit2().map_err(|e| format!("KVM_GET_PIT2: {e}"))?)
            }
            _ => None,
        };
        Ok(KernelIrqchipState { chips, pit })
    }

    /// The pages the guest wrote since the last call (or since it
    /// started), one bitmap per memory region, 64 pages a word
    /// (`KVM_GET_DIRTY_LOG`, which also clears the log). Only with
    /// `track_dirty_pages`.
    pub fn take_dirty_log(&self) -> Result<Vec<Vec<u64>>, String> {
        self.memory
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                self.vm_fd
                    .get_dirty_log(slot as u32, region.len() as usize)
                    .map_err(|e| format!("KVM_GET_DIRTY_LOG (slot {slot}): {e}"))
            })
            .collect()
    }

    /// The VM's clock (kvmclock's base), for a snapshot.
    pub fn save_clock(&self) -> Result<kvm_bindings::kvm_clock_data, String> {
        self.vm_fd.get_clock().map_err(|e| format!("KVM_GET_CLOCK: {e}"))
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) -> Result<(), String> {
        self.command_all(VcpuCommand::Resume, VcpuEvent::Resumed)
    }

    /// Ends every vCPU thread.
    pub fn stop(self) {
        stop_all(&self.vcpus, &self.vcpu_events);
        for h in self.vcpus.into_iter().filter(VcpuHandle::is_finished) {
            h.join();
        }
    }

    /// Why the VM ended, if it has.
    pub fn exit_reason(&self) -> Option<VmExit> {
        self.exit.get()
    }

    /// Presses Ctrl-Alt-Del on the guest's keyboard.
    pub fn send_ctrl_alt_del(&self) -> Result<(), String> {
        lock(&self.i8042)
            .trigger_ctrl_alt_del()
            .map_err(|e| e.to_string())
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Guest memory the VM has touched, in bytes.
    pub fn touched_memory(&self) -> u64 {
        sys::resident_bytes(&self.memory)
    }

    /// The vCPU exit counters.
    pub fn exit_counters(&self) -> &crate::metrics::ExitCounters {
        &self.io.exits
    }

    /// The boot time the guest signalled, if it did.
    pub fn boot_time(&self) -> Option<Duration> {
        lock(&self.boot_timer).boot_time()
    }
}
