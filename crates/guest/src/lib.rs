//! The built-in test guest of flatlet.
//!
//! A tiny x86-64 kernel, written in C and assembly under `guest/` and built
//! by `build.rs` with the host's C compiler, that boots through the Linux
//! 64-bit boot protocol like a `vmlinux`: any VMM that boots an ELF kernel
//! can boot it. It prints a banner on the 8250 serial console, starts every
//! vCPU the MP table lists (each prints its APIC ID), writes 123 to the
//! boot-timer page at 0xc000_0000, acts on its command line, and resets
//! through the i8042.
//!
//! Command-line options it understands:
//! - `flatlet.int3`: execute `int3` and print a line from its #BP handler;
//! - `flatlet.crash=emul`: execute `lock cmpxchg16b`, which the instruction
//!   emulator of nested (PVM) hosts cannot run;
//! - `flatlet.crash=triple`: triple fault.

/// The guest kernel, an ELF64 executable linked at 1 MiB.
pub const ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/flatlet-guest.elf"));

/// Lines the guest prints, for tests and tools that read its console.
pub mod lines {
    /// The first line: the guest is running.
    pub const BANNER: &str = "flatlet-guest: booting";
    /// Printed by each vCPU, followed by its APIC ID and ` up`.
    pub const CPU_UP_PREFIX: &str = "flatlet-guest: cpu ";
    /// Printed once every vCPU has been started.
    pub const BOOT_COMPLETE_PREFIX: &str = "flatlet-guest: boot complete";
    /// The last line before the i8042 reset.
    pub const RESETTING: &str = "flatlet-guest: resetting";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_is_an_x86_64_elf_executable() {
        assert_eq!(&ELF[..4], b"\x7fELF");
        assert_eq!(ELF[4], 2, "ELFCLASS64");
        assert_eq!(ELF[5], 1, "little endian");
        assert_eq!(u16::from_le_bytes([ELF[16], ELF[17]]), 2, "ET_EXEC");
        assert_eq!(u16::from_le_bytes([ELF[18], ELF[19]]), 62, "EM_X86_64");
        let entry = u64::from_le_bytes(ELF[24..32].try_into().unwrap());
        assert!(entry >= 0x10_0000, "entry {entry:#x} is below 1 MiB");
    }
}
