//! How a VM ends, and the process exit codes flatlet documents for it.

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use flatlet_devices::bus::lock;
use vmm_sys_util::eventfd::EventFd;

use crate::emulation::FailedInstruction;

/// The guest reset or shut down: a clean end.
pub const EXIT_OK: i32 = 0;
/// flatlet failed (an I/O error, a bug): not the guest's doing.
pub const EXIT_ERROR: i32 = 1;
/// Bad command line, configuration or input files.
pub const EXIT_BAD_CONFIG: i32 = 2;
/// KVM is missing or refused an operation.
pub const EXIT_KVM: i32 = 3;
/// The guest crashed: triple fault, an instruction the host cannot
/// emulate, or an exit flatlet cannot handle.
pub const EXIT_GUEST_CRASH: i32 = 4;
/// Added to a signal number when a signal stopped flatlet (as shells do).
pub const EXIT_SIGNAL_BASE: i32 = 128;

/// Why a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine through the i8042.
    Reset,
    /// The guest asked KVM to shut down or reset (KVM_EXIT_SYSTEM_EVENT).
    Shutdown { cpu: u8 },
    /// A triple fault (KVM_EXIT_SHUTDOWN): a crashed guest kernel.
    TripleFault { cpu: u8 },
    /// KVM could not emulate a guest instruction, and flatlet cannot
    /// reproduce it.
    EmulationFailure { cpu: u8, instruction: FailedInstruction },
    /// Another KVM internal error.
    InternalError { cpu: u8, suberror: u32 },
    /// KVM could not enter the guest.
    FailEntry { cpu: u8, reason: u64 },
    /// A KVM call failed.
    Kvm { cpu: u8, error: String },
    /// An exit flatlet does not handle.
    Unhandled { cpu: u8, what: String },
    /// A signal asked flatlet to stop.
    Signal(i32),
    /// The user left the console (Ctrl-A x).
    ConsoleQuit,
    /// vCPU threads stopped answering the VMM thread (a pause or resume
    /// could not be carried out or undone): the VM is ended rather than
    /// left in a state nobody knows.
    VcpusUnresponsive(String),
    /// The VMM thread's runtime seccomp filter could not be installed:
    /// the VM does not run unfiltered.
    Seccomp(String),
}

impl VmExit {
    /// The process exit code for this end.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::Reset | VmExit::Shutdown { .. } => EXIT_OK,
            VmExit::FailEntry { .. } | VmExit::Kvm { .. } => EXIT_KVM,
            VmExit::TripleFault { .. }
            | VmExit::EmulationFailure { .. }
            | VmExit::InternalError { .. }
            | VmExit::Unhandled { .. } => EXIT_GUEST_CRASH,
            VmExit::Signal(n) => EXIT_SIGNAL_BASE + n,
            VmExit::ConsoleQuit => EXIT_SIGNAL_BASE + libc::SIGINT,
            VmExit::VcpusUnresponsive(_) | VmExit::Seccomp(_) => EXIT_ERROR,
        }
    }

    /// Whether this is a clean end.
    pub fn is_clean(&self) -> bool {
        self.exit_code() == EXIT_OK
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::Reset => write!(f, "the guest reset the machine (i8042)"),
            VmExit::Shutdown { cpu } => write!(f, "the guest shut down (vCPU {cpu})"),
            VmExit::TripleFault { cpu } => write!(f, "guest crash: triple fault on vCPU {cpu}"),
            VmExit::EmulationFailure { cpu, instruction } => write!(
                f,
                "guest crash: vCPU {cpu} ran an instruction KVM cannot emulate on this host \
                 ({instruction})"
            ),
            VmExit::InternalError { cpu, suberror } => {
                write!(f, "guest crash: KVM internal error {suberror} on vCPU {cpu}")
            }
            VmExit::FailEntry { cpu, reason } => {
                write!(
                    f,
                    "KVM could not enter the guest on vCPU {cpu} (hardware reason {reason:#x})"
                )
            }
            VmExit::Kvm { cpu, error } => write!(f, "KVM failed on vCPU {cpu}: {error}"),
            VmExit::Unhandled { cpu, what } => write!(f, "guest crash: unhandled exit on vCPU {cpu}: {what}"),
            VmExit::Signal(n) => write!(f, "stopped by signal {n}"),
            VmExit::ConsoleQuit => write!(f, "stopped from the console (Ctrl-A x)"),
            VmExit::Seccomp(e) => write!(f, "ended: {e}"),
            VmExit::VcpusUnresponsive(what) => {
                write!(f, "ended: the vCPU threads stopped answering ({what})")
            }
        }
    }
}

/// Where vCPU threads report the end of the VM: the first report wins,
/// and the eventfd wakes the VMM thread.
pub struct ExitSignal {
    reason: Mutex<Option<VmExit>>,
    /// Set with `reason`: a lock-free check for vCPU threads.
    reported: AtomicBool,
    /// Readable when a reason has been reported.
    pub evt: EventFd,
}

impl ExitSignal {
    /// A new, unsignalled exit.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            reported: AtomicBool::new(false),
            evt: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?,
        })
    }

    /// Reports an end. Later reports are ignored.
    pub fn report(&self, exit: VmExit) {
        let mut reason = lock(&self.reason);
        if reason.is_none() {
            *reason = Some(exit);
            self.reported.store(true, Ordering::Release);
            if let Err(e) = self.evt.write(1) {
                log::error!("cannot signal the end of the VM: {e}");
            }
        }
    }

    /// Whether an end has been reported.
    pub fn is_reported(&self) -> bool {
        self.reported.load(Ordering::Acquire)
    }

    /// The reported end, if any.
    pub fn get(&self) -> Option<VmExit> {
        lock(&self.reason).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_by_kind() {
        assert_eq!(VmExit::Reset.exit_code(), 0);
        assert_eq!(VmExit::Shutdown { cpu: 0 }.exit_code(), 0);
        assert_eq!(VmExit::TripleFault { cpu: 1 }.exit_code(), EXIT_GUEST_CRASH);
        assert_eq!(
            VmExit::Kvm {
                cpu: 0,
                error: "x".into()
            }
            .exit_code(),
            EXIT_KVM
        );
        assert_eq!(VmExit::Signal(15).exit_code(), 143);
    }

    #[test]
    fn first_report_wins() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.get(), None);
        assert!(!s.is_reported());
        s.report(VmExit::Reset);
        assert!(s.is_reported());
        s.report(VmExit::TripleFault { cpu: 0 });
        assert_eq!(s.get(), Some(VmExit::Reset));
        assert_eq!(s.evt.read().unwrap(), 1);
    }
}
