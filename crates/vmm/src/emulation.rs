//! KVM emulation failures, and the ones flatlet can recover from.
//!
//! On nested PVM hosts guest ring-0 code runs in KVM's instruction
//! emulator, which cannot execute some instructions. KVM then exits with
//! `KVM_EXIT_INTERNAL_ERROR`/`KVM_INTERNAL_ERROR_EMULATION` and the
//! instruction's bytes. Where the instruction's effect can be reproduced
//! exactly, flatlet does so and lets the guest go on:
//!
//! - `int3` (0xcc): a trap raising #BP with RIP after the instruction; the
//!   VMM advances RIP by one and injects vector 3.
//!
//! Anything else ends the VM with an error naming the RIP and the bytes.

use std::fmt;

use kvm_ioctls::VcpuFd;

use crate::sys::InternalError;

/// `KVM_INTERNAL_ERROR_EMULATION`.
pub const SUBERROR_EMULATION: u32 = 1;
/// `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`.
const FLAG_INSTRUCTION_BYTES: u64 = 1;
const BP_VECTOR: u8 = 3;
const INT3: u8 = 0xcc;

/// The instruction KVM could not emulate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedInstruction {
    /// Where.
    pub rip: u64,
    /// Its bytes, as KVM reported them (possibly empty).
    pub bytes: Vec<u8>,
}

impl fmt::Display for FailedInstruction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RIP {:#x}, instruction bytes [", self.rip)?;
        for (i, b) in self.bytes.iter().enumerate() {
            write!(f, "{}{b:02x}", if i == 0 { "" } else { " " })?;
        }
        write!(f, "]")
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
    /// Inject #BP after an `int3`.
    Int3,
}

impl Recovery {
    /// The recovery for an instruction, if there is one.
    pub fn for_instruction(bytes: &[u8]) -> Option<Self> {
        match bytes.first() {
            Some(&INT3) => Some(Recovery::Int3),
            _ => None,
        }
    }

    /// Does what the instruction would have done.
    pub fn apply(self, vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
        match self {
            Recovery::Int3 => {
                let mut regs = vcpu.get_regs()?;
                regs.rip = regs.rip.wrapping_add(1);
                vcpu.set_regs(&regs)?;
                let mut events = vcpu.get_vcpu_events()?;
                events.exception.injected = 1;
                events.exception.nr = BP_VECTOR;
                events.exception.has_error_code = 0;
                events.exception.error_code = 0;
                vcpu.set_vcpu_events(&events)
            }
        }
    }
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recovery::Int3 => f.write_str("int3 (injected #BP)"),
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
    fn only_int3_is_recovered() {
        assert_eq!(Recovery::for_instruction(&[0xcc]), Some(Recovery::Int3));
        assert_eq!(Recovery::for_instruction(&[0xf0, 0x48, 0x0f, 0xc7]), None);
        assert_eq!(Recovery::for_instruction(&[]), None);
    }

    #[test]
    fn failure_names_rip_and_bytes() {
        let f = FailedInstruction {
            rip: 0x100935,
            bytes: vec![0xf0, 0x48, 0x0f],
        };
        assert_eq!(f.to_string(), "RIP 0x100935, instruction bytes [f0 48 0f]");
    }
}
