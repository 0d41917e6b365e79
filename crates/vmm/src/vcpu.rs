//! vCPU threads: one per vCPU, each running `KVM_RUN` and dispatching the
//! exits it gets to the port and MMIO buses. Nothing slow happens here:
//! device work that takes time belongs to the VMM thread.
//!
//! A thread configures its own vCPU (in parallel with the others), reports
//! back, and waits for `Run`. The VMM thread controls it with commands and
//! a kick: a real-time signal whose handler sets `immediate_exit`, so a
//! kick that arrives just before `KVM_RUN` is not lost.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use flatlet_devices::bus::{Bus, lock};
use flatlet_devices::ioapic::IoApic;
use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd};
use log::{debug, info, warn};
use vmm_sys_util::signal::Killable;

use crate::arch::{msr, regs};
use crate::emulation::{FailedInstruction, Recovery, RecoveryError, bitness, instruction_bytes};
use crate::exit::{ExitSignal, VmExit};
use crate::metrics::ExitCounters;
use crate::snapshot::vcpu::VcpuState;
use crate::sys::{self, RunningVcpu};

/// `KVM_SYSTEM_EVENT_SHUTDOWN`, `_RESET` and `_CRASH`.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
const SYSTEM_EVENT_CRASH: u32 = 3;
/// LAPIC local vector table entries for LINT0 and LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// The buses and interrupt controller the vCPUs share.
pub struct MachineIo {
    /// Port I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// flatlet's I/O APIC (split irqchip), for EOI exits.
    pub ioapic: Option<Arc<Mutex<IoApic>>>,
    /// Exit counters, for metrics.
    pub exits: ExitCounters,
}

impl MachineIo {
    fn pio_in(&self, port: u16, data: &mut [u8]) {
        ExitCounters::bump(&self.exits.io_in);
        if !self.pio.read(u64::from(port), data) {
            // Nothing there: the bus floats high.
            data.fill(0xff);
            debug!("vcpu: in from unassigned port {port:#x}");
        }
    }

    fn pio_out(&self, port: u16, data: &[u8]) {
        ExitCounters::bump(&self.exits.io_out);
        if !self.pio.write(u64::from(port), data) {
            debug!("vcpu: out to unassigned port {port:#x}");
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        ExitCounters::bump(&self.exits.mmio_read);
        if !self.mmio.read(addr, data) {
            data.fill(0xff);
            debug!("vcpu: MMIO read of unassigned address {addr:#x}");
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        ExitCounters::bump(&self.exits.mmio_write);
        if !self.mmio.write(addr, data) {
            debug!("vcpu: MMIO write to unassigned address {addr:#x}");
        }
    }
}

/// What the VMM thread asks of a vCPU thread.
#[derive(Clone, Debug)]
pub enum VcpuCommand {
    /// Start running (after configuration).
    Run,
    /// Stop entering the guest until `Resume`.
    Pause,
    /// Go on after `Pause`.
    Resume,
    /// End the thread.
    Stop,
    /// While paused: read the vCPU's state (with these MSRs) and send it
    /// back on `reply`.
    Save {
        /// The MSR indices to save.
        msrs: Arc<Vec<u32>>,
        /// Where the state (or why it could not be read) goes.
        reply: Sender<Result<Box<VcpuState>, String>>,
    },
}

/// What a vCPU thread reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuEvent {
    /// Configuration finished (or failed, with the reason).
    Configured(u8, Result<(), String>),
    /// Paused.
    Paused(u8),
    /// Running again.
    Resumed(u8),
    /// The thread is ending.
    Stopped(u8),
}

/// How a vCPU starts.
pub struct VcpuSetup {
    /// Index (and APIC ID).
    pub index: u8,
    /// Its CPUID.
    pub cpuid: CpuId,
    /// For the boot vCPU: the kernel entry point.
    pub boot_entry: Option<u64>,
    /// When restoring a snapshot: the saved state, set instead of the
    /// boot state, and the VM's `KVM_CAP_XSAVE2` size.
    pub restore: Option<(Box<VcpuState>, i32)>,
}

/// What a vCPU thread works with.
pub struct VcpuContext {
    /// Buses.
    pub io: Arc<MachineIo>,
    /// Where to report the end of the VM.
    pub exit: Arc<ExitSignal>,
    /// Commands from the VMM thread.
    pub commands: Receiver<VcpuCommand>,
    /// Reports to the VMM thread.
    pub events: Sender<VcpuEvent>,
    /// The kick signal number.
    pub kick_signal: i32,
}

/// The VMM thread's handle on a vCPU thread.
///
/// Dropping it stops the thread and waits (boundedly) for it to end, so
/// that no vCPU thread outlives the VM it runs.
pub struct VcpuHandle {
    index: u8,
    commands: Sender<VcpuCommand>,
    thread: Option<JoinHandle<()>>,
    kick_signal: i32,
}

impl VcpuHandle {
    /// Starts the thread of a created vCPU.
    pub fn spawn(
        fd: VcpuFd,
        setup: VcpuSetup,
        ctx: VcpuContext,
        commands: Sender<VcpuCommand>,
    ) -> std::io::Result<Self> {
        let index = setup.index;
        let kick_signal = ctx.kick_signal;
        let thread = std::thread::Builder::new()
            .name(format!("fl_vcpu{index}"))
            .spawn(move || vcpu_thread(fd, setup, ctx))?;
        Ok(Self {
            index,
            commands,
            thread: Some(thread),
            kick_signal,
        })
    }

    /// Sends a command and kicks the thread out of the guest.
    pub fn command(&self, cmd: VcpuCommand) {
        let kick = !matches!(cmd, VcpuCommand::Run);
        if self.commands.send(cmd).is_err() {
            // The thread has already ended.
            return;
        }
        if kick {
            let Some(thread) = &self.thread else { return };
            if let Err(e) = thread.kill(self.kick_signal) {
                debug!("vcpu {}: kick failed: {e}", self.index);
            }
        }
    }

    /// Index of this vCPU.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Whether the thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the thread to end.
    pub fn join(mut self) {
        self.join_thread();
    }

    fn join_thread(&mut self) {
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                warn!("vcpu {}: thread panicked", self.index);
            }
        }
    }
}

/// How long a dropped handle waits for its thread to end.
const DROP_JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if self.thread.is_none() {
            return;
        }
        self.command(VcpuCommand::Stop);
        let deadline = std::time::Instant::now() + DROP_JOIN_TIMEOUT;
        while !self.is_finished() {
            if std::time::Instant::now() > deadline {
                // Joining would block the VMM thread for good; the thread
                // is left to end with the process.
                warn!("vcpu {}: thread did not stop; left behind", self.index);
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.join_thread();
    }
}

/// Sets up a vCPU: CPUID, MSRs, FPU, LAPIC LINT pins, and for the boot
/// vCPU the long-mode registers of the boot protocol.
pub fn configure(fd: &VcpuFd, setup: &VcpuSetup) -> Result<(), String> {
    if let Some((state, xsave2_size)) = &setup.restore {
        return state
            .restore(fd, *xsave2_size)
            .map_err(|e| format!("restoring the snapshot's state: {e}"));
    }
    let e = |what: &str, err: kvm_ioctls::Error| format!("{what}: {err}");
    fd.set_cpuid2(&setup.cpuid)
        .map_err(|err| e("KVM_SET_CPUID2", err))?;
    let msrs = msr::boot_msrs().map_err(|err| format!("MSR list: {err:?}"))?;
    let set = fd.set_msrs(&msrs).map_err(|err| e("KVM_SET_MSRS", err))?;
    if set != msrs.as_slice().len() {
        let failed = msrs.as_slice()[set].index;
        return Err(format!("KVM_SET_MSRS: KVM refused MSR {failed:#x}"));
    }
    fd.set_fpu(&regs::boot_fpu())
        .map_err(|err| e("KVM_SET_FPU", err))?;
    set_lint(fd).map_err(|err| e("KVM_SET_LAPIC", err))?;
    if let Some(entry) = setup.boot_entry {
        let sregs = fd.get_sregs().map_err(|err| e("KVM_GET_SREGS", err))?;
        fd.set_sregs(&regs::boot_sregs(sregs))
            .map_err(|err| e("KVM_SET_SREGS", err))?;
        fd.set_regs(&regs::boot_regs(entry))
            .map_err(|err| e("KVM_SET_REGS", err))?;
    }
    Ok(())
}

/// LINT0 as ExtINT and LINT1 as NMI, as firmware leaves them.
fn set_lint(fd: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut lapic = fd.get_lapic()?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as std::os::raw::c_char;
        }
    }
    fd.set_lapic(&lapic)
}

fn vcpu_thread(fd: VcpuFd, setup: VcpuSetup, ctx: VcpuContext) {
    let index = setup.index;
    crate::thread::mask_stop_signals();
    // Before anything the guest controls.
    if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
        let _ = ctx.events.send(VcpuEvent::Configured(index, Err(e.to_string())));
        let _ = ctx.events.send(VcpuEvent::Stopped(index));
        return;
    }
    let mut vcpu = RunningVcpu::register(fd);
    let configured = configure(vcpu.fd(), &setup);
    let ok = configured.is_ok();
    let _ = ctx.events.send(VcpuEvent::Configured(index, configured));
    drop(setup);
    if ok {
        match wait_for_run(index, &ctx) {
            // Paused before the first instruction (a snapshot loaded
            // without resume_vm): wait there for Resume.
            Some(true) if !handle_commands(index, vcpu.fd(), &ctx, true) => {}
            Some(_) => run(index, &mut vcpu, &ctx),
            None => {}
        }
    }
    let _ = ctx.events.send(VcpuEvent::Stopped(index));
}

/// Waits for the first `Run`: Some(whether a `Pause` came before it and
/// holds), None if told to stop instead.
fn wait_for_run(index: u8, ctx: &VcpuContext) -> Option<bool> {
    let mut paused = false;
    loop {
        match ctx.commands.recv() {
            Ok(VcpuCommand::Run) => return Some(paused),
            Ok(VcpuCommand::Stop) | Err(_) => return None,
            Ok(VcpuCommand::Pause) => {
                paused = true;
                let _ = ctx.events.send(VcpuEvent::Paused(index));
            }
            Ok(VcpuCommand::Resume) => {
                paused = false;
                let _ = ctx.events.send(VcpuEvent::Resumed(index));
            }
            Ok(VcpuCommand::Save { reply, .. }) => {
                let _ = reply.send(Err(format!("vCPU {index} has not started")));
            }
        }
    }
}

/// Handles pending commands after a kick (or, `paused`, from a pause
/// until the resume); false when the thread must end.
fn handle_commands(index: u8, fd: &VcpuFd, ctx: &VcpuContext, paused: bool) -> bool {
    let mut paused = paused;
    loop {
        let cmd = if paused {
            ctx.commands.recv().ok()
        } else {
            match ctx.commands.try_recv() {
                Ok(c) => Some(c),
                Err(std::sync::mpsc::TryRecvError::Empty) => return true,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
            }
        };
        match cmd {
            None | Some(VcpuCommand::Stop) => return false,
            // Each command is answered, whatever the state: after a pause
            // that failed on another vCPU, the VMM thread resumes all.
            Some(VcpuCommand::Pause) => {
                if failpoint_deaf_to_pause(index) {
                    continue;
                }
                paused = true;
                let _ = ctx.events.send(VcpuEvent::Paused(index));
            }
            Some(VcpuCommand::Resume) => {
                paused = false;
                let _ = ctx.events.send(VcpuEvent::Resumed(index));
            }
            Some(VcpuCommand::Save { msrs, reply }) => {
                let state = if paused {
                    VcpuState::save(index, fd, &msrs)
                        .map(Box::new)
                        .map_err(|e| format!("vCPU {index}: {e}"))
                } else {
                    Err(format!("vCPU {index} is not paused"))
                };
                let _ = reply.send(state);
            }
            Some(VcpuCommand::Run) => {}
        }
    }
}

/// Test builds only: `FLATLET_FAILPOINT=vcpu0-deaf-to-pause` makes vCPU 0
/// ignore pause commands, so that tests can make a pause fail.
fn failpoint_deaf_to_pause(index: u8) -> bool {
    cfg!(debug_assertions)
        && index == 0
        && std::env::var("FLATLET_FAILPOINT").is_ok_and(|v| v == "vcpu0-deaf-to-pause")
}

/// What to do after an exit.
enum Next {
    Continue,
    End(VmExit),
    InternalError,
}

fn run(index: u8, vcpu: &mut RunningVcpu, ctx: &VcpuContext) {
    let mut logged_recoveries = Vec::new();
    loop {
        let next = match vcpu.fd().run() {
            Ok(exit) => dispatch(index, exit, &ctx.io),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.fd().set_kvm_immediate_exit(0);
                if handle_commands(index, vcpu.fd(), ctx, false) {
                    Next::Continue
                } else {
                    return;
                }
            }
            Err(e) => Next::End(VmExit::Kvm {
                cpu: index,
                error: format!("KVM_RUN: {e}"),
            }),
        };
        let next = match next {
            Next::InternalError => internal_error(index, vcpu, &mut logged_recoveries, &ctx.io.exits),
            other => other,
        };
        if let Next::End(exit) = next {
            ctx.exit.report(exit);
        }
        // Whatever ended the VM (this exit, or the guest's reset through
        // the i8042 it just handled), this vCPU runs no further guest
        // instruction: the VMM thread ends the VM; wait for its Stop.
        if ctx.exit.is_reported() {
            while let Ok(cmd) = ctx.commands.recv() {
                if matches!(cmd, VcpuCommand::Stop) {
                    break;
                }
            }
            return;
        }
    }
}

fn dispatch(index: u8, exit: VcpuExit<'_>, io: &MachineIo) -> Next {
    match exit {
        VcpuExit::IoIn(port, data) => io.pio_in(port, data),
        VcpuExit::IoOut(port, data) => io.pio_out(port, data),
        VcpuExit::MmioRead(addr, data) => io.mmio_read(addr, data),
        VcpuExit::MmioWrite(addr, data) => io.mmio_write(addr, data),
        VcpuExit::IoapicEoi(vector) => {
            if let Some(ioapic) = &io.ioapic {
                lock(ioapic).end_of_interrupt(vector);
            }
        }
        // With an in-kernel LAPIC, KVM handles HLT itself; without one a
        // HLT exit just returns to the guest.
        VcpuExit::Hlt => {}
        VcpuExit::Shutdown => return Next::End(VmExit::TripleFault { cpu: index }),
        VcpuExit::SystemEvent(kind, _) => {
            return Next::End(match kind {
                SYSTEM_EVENT_SHUTDOWN | SYSTEM_EVENT_RESET => VmExit::Shutdown { cpu: index },
                SYSTEM_EVENT_CRASH => VmExit::Unhandled {
                    cpu: index,
                    what: "the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)".into(),
                },
                other => VmExit::Unhandled {
                    cpu: index,
                    what: format!("system event {other}"),
                },
            });
        }
        VcpuExit::FailEntry(reason, _) => return Next::End(VmExit::FailEntry { cpu: index, reason }),
        VcpuExit::InternalError => return Next::InternalError,
        other => {
            return Next::End(VmExit::Unhandled {
                cpu: index,
                what: format!("{other:?}"),
            });
        }
    }
    Next::Continue
}

/// An internal error: recover from what can be recovered, else end.
/// `logged` holds the names of the recoveries already logged at info level
/// on this vCPU (each kind once; the rest at debug level).
fn internal_error(
    index: u8,
    vcpu: &mut RunningVcpu,
    logged: &mut Vec<&'static str>,
    counters: &ExitCounters,
) -> Next {
    let err = sys::internal_error(vcpu.fd());
    let Some(bytes) = instruction_bytes(&err) else {
        return Next::End(VmExit::InternalError {
            cpu: index,
            suberror: err.suberror,
        });
    };
    // Read once: the error names the RIP, and a recovery moves it.
    let regs = vcpu.fd().get_regs();
    let rip = regs.as_ref().map_or(0, |r| r.rip);
    let sregs = match vcpu.fd().get_sregs() {
        Ok(s) => s,
        Err(e) => {
            return Next::End(VmExit::Kvm {
                cpu: index,
                error: format!("reading the registers after an emulation failure at RIP {rip:#x}: {e}"),
            });
        }
    };
    let instruction = FailedInstruction {
        rip,
        bytes,
        bitness: bitness(&sregs),
    };
    match Recovery::for_instruction(&instruction.bytes, instruction.bitness) {
        Some(recovery) => match regs
            .map_err(RecoveryError::from)
            .and_then(|regs| recovery.apply(vcpu.fd(), regs, &sregs))
        {
            Ok(()) => {
                ExitCounters::bump(&counters.recoveries);
                if logged.contains(&recovery.name()) {
                    debug!("vcpu {index}: recovered {recovery} at RIP {rip:#x}");
                } else {
                    logged.push(recovery.name());
                    info!(
                        "vcpu {index}: KVM could not emulate {instruction}; recovered: {recovery} \
                         (further {} recoveries are logged at debug level)",
                        recovery.name()
                    );
                }
                Next::Continue
            }
            Err(e) => Next::End(VmExit::Kvm {
                cpu: index,
                error: format!("recovering from {instruction}: {e}"),
            }),
        },
        None => Next::End(VmExit::EmulationFailure {
            cpu: index,
            instruction,
        }),
    }
}
