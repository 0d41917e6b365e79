//! KVM emulation failures, and the ones flatlet can recover from.
//!
//! On nested PVM hosts guest ring-0 code runs in KVM's instruction
//! emulator, which cannot execute some instructions. KVM then exits with
//! `KVM_EXIT_INTERNAL_ERROR`/`KVM_INTERNAL_ERROR_EMULATION` and the
//! instruction's bytes, which flatlet decodes (iced-x86, in the vCPU's
//! current mode). Where the instruction's effect can be reproduced exactly,
//! flatlet does so and lets the guest go on:
//!
//! - `int3`: a trap raising #BP with RIP after the instruction; the VMM
//!   advances RIP and injects vector 3. (Linux runs one at boot, in its
//!   alternatives self-test, and uses them to patch live code.)
//! - `fwait`: raises #NM if CR0.TS and CR0.MP are set, #MF if an unmasked x87
//!   exception is pending (FSW.ES) and CR0.NE is set, and otherwise does
//!   nothing; the VMM checks the same state and does the same. (Linux runs
//!   one when it drops a task's FPU state.) A pending exception with CR0.NE
//!   clear would be signalled on the legacy FERR# pin, which flatlet does
//!   not have: that case ends the VM.
//!
//! Anything else ends the VM with an error naming the RIP, the bytes and the
//! decoded instruction.

use std::fmt;

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, Mnemonic};
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;

use crate::sys::InternalError;

/// `KVM_INTERNAL_ERROR_EMULATION`.
pub const SUBERROR_EMULATION: u32 = 1;
/// `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`.
const FLAG_INSTRUCTION_BYTES: u64 = 1;
const NM_VECTOR: u8 = 7;
const BP_VECTOR: u8 = 3;
const MF_VECTOR: u8 = 16;
const CR0_MP: u64 = 1 << 1;
const CR0_TS: u64 = 1 << 3;
const CR0_NE: u64 = 1 << 5;
/// FSW's error summary: an unmasked x87 exception is pending.
const FSW_ES: u16 = 1 << 7;

/// The code size of the vCPU's current mode: 64, 32 or 16.
pub fn bitness(sregs: &kvm_sregs) -> u32 {
    if sregs.cs.l != 0 {
        64
    } else if sregs.cs.db != 0 {
        32
    } else {
        16
    }
}

/// Decodes the first instruction of `bytes`, if they hold a valid one.
fn decode(bytes: &[u8], bitness: u32, rip: u64) -> Option<Instruction> {
    let mut decoder = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    (!insn.is_invalid()).then_some(insn)
}

/// The instruction KVM could not emulate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedInstruction {
    /// Where.
    pub rip: u64,
    /// Its bytes, as KVM reported them (possibly empty).
    pub bytes: Vec<u8>,
    /// The vCPU's code size when it ran them (64, 32 or 16).
    pub bitness: u32,
}

impl FailedInstruction {
    /// The instruction, disassembled (Intel syntax), if the bytes hold one.
    pub fn disassembly(&self) -> Option<String> {
        let insn = decode(&self.bytes, self.bitness, self.rip)?;
        let mut text = String::new();
        IntelFormatter::new().format(&insn, &mut text);
        Some(text)
    }
}

impl fmt::Display for FailedInstruction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RIP {:#x}, instruction bytes [", self.rip)?;
        for (i, b) in self.bytes.iter().enumerate() {
            write!(f, "{}{b:02x}", if i == 0 { "" } else { " " })?;
        }
        write!(f, "]")?;
        if let Some(text) = self.disassembly() {
            write!(f, ": `{text}`")?;
        }
        Ok(())
    }
}

/// The instruction bytes of an emulation failure, if KVM gave them.
pub fn instruction_bytes(err: &InternalError) -> Option<Vec<u8>> {
    if err.suberror != SUBERROR_EMULATION || err.ndata < 2 || err.data[0] & FLAG_INSTRUCTION_BYTES == 0 {
        return None;
    }
    // data[1..] holds `__u8 insn_size; __u8 insn_bytes[15]`.
    let raw: Vec<u8> = err.data[1..3].iter().flat_map(|w| w.to_le_bytes()).collect();
    let len = usize::from(raw[0]).min(15);
    Some(raw[1..1 + len].to_vec())
}

/// A recovery flatlet knows how to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Inject #BP after an `int3` of `len` bytes.
    Int3 { len: u8 },
    /// Do what an `fwait` of `len` bytes does.
    Fwait { len: u8 },
}

/// What an `fwait` does, given CR0 and the x87 status word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FwaitOutcome {
    /// Nothing: go on after it.
    Continue,
    /// A fault with this vector (RIP stays on the instruction).
    Fault(u8),
    /// A pending exception reported through FERR# (CR0.NE clear).
    Ferr,
}

fn fwait_outcome(cr0: u64, fsw: u16) -> FwaitOutcome {
    if cr0 & CR0_TS != 0 && cr0 & CR0_MP != 0 {
        FwaitOutcome::Fault(NM_VECTOR)
    } else if fsw & FSW_ES != 0 {
        if cr0 & CR0_NE != 0 {
            FwaitOutcome::Fault(MF_VECTOR)
        } else {
            FwaitOutcome::Ferr
        }
    } else {
        FwaitOutcome::Continue
    }
}

/// Why a recovery could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// A KVM call failed.
    #[error("{0}")]
    Kvm(#[from] kvm_ioctls::Error),
    /// The instruction's effect is one flatlet cannot reproduce.
    #[error("{0}")]
    Unsupported(&'static str),
}

fn inject(vcpu: &VcpuFd, vector: u8) -> Result<(), kvm_ioctls::Error> {
    let mut events = vcpu.get_vcpu_events()?;
    events.exception.injected = 1;
    events.exception.nr = vector;
    events.exception.has_error_code = 0;
    events.exception.error_code = 0;
    vcpu.set_vcpu_events(&events)
}

fn skip(vcpu: &VcpuFd, mut regs: kvm_regs, len: u8) -> Result<(), kvm_ioctls::Error> {
    regs.rip = regs.rip.wrapping_add(u64::from(len));
    vcpu.set_regs(&regs)
}

impl Recovery {
    /// The recovery for an instruction, if there is one.
    pub fn for_instruction(bytes: &[u8], bitness: u32) -> Option<Self> {
        let insn = decode(bytes, bitness, 0)?;
        let len = u8::try_from(insn.len()).ok()?;
        match insn.mnemonic() {
            Mnemonic::Int3 => Some(Recovery::Int3 { len }),
            Mnemonic::Wait => Some(Recovery::Fwait { len }),
            _ => None,
        }
    }

    /// Does what the instruction would have done; `regs` and `sregs` are
    /// the vCPU's, as read after the failure.
    pub fn apply(self, vcpu: &VcpuFd, regs: kvm_regs, sregs: &kvm_sregs) -> Result<(), RecoveryError> {
        match self {
            Recovery::Int3 { len } => {
                skip(vcpu, regs, len)?;
                inject(vcpu, BP_VECTOR)?;
            }
            Recovery::Fwait { len } => match fwait_outcome(sregs.cr0, vcpu.get_fpu()?.fsw) {
                FwaitOutcome::Continue => skip(vcpu, regs, len)?,
                FwaitOutcome::Fault(vector) => inject(vcpu, vector)?,
                FwaitOutcome::Ferr => {
                    return Err(RecoveryError::Unsupported(
                        "fwait with an x87 exception pending and CR0.NE clear (FERR#)",
                    ));
                }
            },
        }
        Ok(())
    }

    /// A short name, for logs and counters.
    pub fn name(self) -> &'static str {
        match self {
            Recovery::Int3 { .. } => "int3",
            Recovery::Fwait { .. } => "fwait",
        }
    }
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recovery::Int3 { .. } => f.write_str("int3 (injected #BP)"),
            Recovery::Fwait { .. } => {
                f.write_str("fwait (x87 state checked: no exception pending, or #NM/#MF injected)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(bytes: &[u8], flags: u64) -> InternalError {
        let mut raw = [0u8; 16];
        raw[0] = bytes.len() as u8;
        raw[1..1 + bytes.len()].copy_from_slice(bytes);
        let mut data = [0u64; 16];
        data[0] = flags;
        data[1] = u64::from_le_bytes(raw[..8].try_into().unwrap());
        data[2] = u64::from_le_bytes(raw[8..].try_into().unwrap());
        InternalError {
            suberror: SUBERROR_EMULATION,
            ndata: 4,
            data,
        }
    }

    #[test]
    fn decodes_instruction_bytes() {
        let cmpxchg16b = [0xf0, 0x48, 0x0f, 0xc7, 0x0d, 0x62, 0xbf, 0x04, 0x00];
        assert_eq!(
            instruction_bytes(&failure(&cmpxchg16b, 1)),
            Some(cmpxchg16b.to_vec())
        );
        let fifteen = [0x66; 15];
        assert_eq!(instruction_bytes(&failure(&fifteen, 1)), Some(fifteen.to_vec()));
        assert_eq!(instruction_bytes(&failure(&[0xcc], 0)), None, "no bytes flag");
        let mut other = failure(&[0xcc], 1);
        other.suberror = 2;
        assert_eq!(instruction_bytes(&other), None);
        // A size KVM could never report is clamped, not trusted.
        let mut bad = failure(&[0xcc], 1);
        bad.data[1] = 0xff;
        assert_eq!(instruction_bytes(&bad).map(|b| b.len()), Some(15));
    }

    #[test]
    fn int3_and_fwait_are_recovered() {
        for bits in [64, 32, 16] {
            assert_eq!(
                Recovery::for_instruction(&[0xcc], bits),
                Some(Recovery::Int3 { len: 1 })
            );
            assert_eq!(
                Recovery::for_instruction(&[0x9b], bits),
                Some(Recovery::Fwait { len: 1 })
            );
        }
        // Trailing bytes (KVM reports up to 15) are the next instructions.
        assert_eq!(
            Recovery::for_instruction(&[0xcc, 0x0f, 0x0b], 64),
            Some(Recovery::Int3 { len: 1 })
        );
        // `int 3` (cd 03) is another instruction, with other semantics.
        assert_eq!(Recovery::for_instruction(&[0xcd, 0x03], 64), None);
        // cmpxchg16b, xsave, popcnt: no recovery.
        let cmpxchg16b = [0xf0, 0x48, 0x0f, 0xc7, 0x0d, 0x62, 0xbf, 0x04, 0x00];
        assert_eq!(Recovery::for_instruction(&cmpxchg16b, 64), None);
        assert_eq!(Recovery::for_instruction(&[0x0f, 0xae, 0x27], 64), None);
        assert_eq!(
            Recovery::for_instruction(&[0xf3, 0x48, 0x0f, 0xb8, 0xc7], 64),
            None
        );
        // Truncated or invalid bytes: none.
        assert_eq!(Recovery::for_instruction(&[], 64), None);
        assert_eq!(Recovery::for_instruction(&[0xf0, 0x48, 0x0f], 64), None);
    }

    #[test]
    fn fwait_does_what_the_cpu_does() {
        assert_eq!(fwait_outcome(CR0_NE, 0), FwaitOutcome::Continue);
        // TS alone does not fault on fwait; TS with MP does.
        assert_eq!(fwait_outcome(CR0_NE | CR0_TS, 0), FwaitOutcome::Continue);
        assert_eq!(
            fwait_outcome(CR0_NE | CR0_TS | CR0_MP, FSW_ES),
            FwaitOutcome::Fault(NM_VECTOR)
        );
        assert_eq!(fwait_outcome(CR0_NE, FSW_ES), FwaitOutcome::Fault(MF_VECTOR));
        assert_eq!(fwait_outcome(0, FSW_ES), FwaitOutcome::Ferr);
        // Other status bits (a masked exception's flag) raise nothing.
        assert_eq!(fwait_outcome(CR0_NE, 0x0001), FwaitOutcome::Continue);
    }

    #[test]
    fn failure_names_rip_bytes_and_instruction() {
        let f = FailedInstruction {
            rip: 0x100935,
            bytes: vec![0xf0, 0x48, 0x0f, 0xc7, 0x0d, 0x62, 0xbf, 0x04, 0x00],
            bitness: 64,
        };
        assert_eq!(
            f.to_string(),
            "RIP 0x100935, instruction bytes [f0 48 0f c7 0d 62 bf 04 00]: `lock cmpxchg16b [14C8A0h]`"
        );
        let truncated = FailedInstruction {
            rip: 0x10,
            bytes: vec![0xf0, 0x48, 0x0f],
            bitness: 64,
        };
        assert_eq!(truncated.to_string(), "RIP 0x10, instruction bytes [f0 48 0f]");
    }
}
