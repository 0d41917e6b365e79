//! The snapshot state file: a fixed header, then a postcard payload.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "FLATSNAP"
//!      8     2  format version (little endian)
//!     10     2  architecture (1 = x86_64)
//!     12     4  reserved, zero
//!     16     8  payload length in bytes
//!     24     8  CRC-64/XZ of the payload
//!     32     n  payload (postcard)
//! ```
//!
//! The file is untrusted input: the loader checks the size, magic,
//! version, architecture, length and checksum before it decodes anything,
//! and decoding errors (not panics) on whatever else is wrong.

use std::io::Read;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The first bytes of every flatlet snapshot state file.
pub const MAGIC: [u8; 8] = *b"FLATSNAP";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 2;
/// Architecture codes.
pub const ARCH_X86_64: u16 = 1;
/// The architecture of this build.
#[cfg(target_arch = "x86_64")]
pub const THIS_ARCH: u16 = ARCH_X86_64;
#[cfg(not(target_arch = "x86_64"))]
pub const THIS_ARCH: u16 = 0;
/// Header size in bytes.
pub const HEADER_LEN: usize = 32;
/// The largest state file the loader reads: device and vCPU state is a
/// few KiB per vCPU; anything this large is not a flatlet state file.
pub const MAX_STATE_FILE: u64 = 16 << 20;

const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// Errors writing or reading a state file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The file could not be read or written.
    #[error("snapshot state file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// It cannot be opened, or it is not a regular file (a FIFO, device or
    /// directory), checked as drives and kernels are.
    #[error("snapshot state file {path}: {reason}")]
    Open { path: String, reason: String },
    /// Larger than any state file flatlet writes.
    #[error("snapshot state file is {len} bytes, more than the {MAX_STATE_FILE} a state file can be")]
    TooLarge { len: u64 },
    /// Shorter than its header says.
    #[error("snapshot state file is truncated: {have} bytes, expected {want}")]
    Truncated { have: usize, want: usize },
    /// Longer than its header says.
    #[error("snapshot state file has {extra} bytes after its payload")]
    TrailingBytes { extra: usize },
    /// Not a flatlet state file at all.
    #[error("not a flatlet snapshot state file (bad magic)")]
    BadMagic,
    /// Written by a flatlet with another format.
    #[error("snapshot format version {found} is not supported (this flatlet reads version {FORMAT_VERSION})")]
    Version { found: u16 },
    /// Written on another architecture.
    #[error("snapshot was taken on another architecture (code {found}, this machine is {THIS_ARCH})")]
    Architecture { found: u16 },
    /// Reserved header bytes are not zero.
    #[error("snapshot state file header has non-zero reserved bytes (a newer or corrupt file)")]
    Reserved,
    /// The checksum does not match: the file is corrupt.
    #[error("snapshot state file is corrupt: checksum {found:#018x}, expected {expected:#018x}")]
    Checksum { found: u64, expected: u64 },
    /// The payload does not decode.
    #[error("snapshot state file payload does not decode: {0}")]
    Decode(postcard::Error),
    /// The state could not be encoded.
    #[error("encoding the snapshot state: {0}")]
    Encode(postcard::Error),
}

/// Encodes `state` as a complete state file.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, FormatError> {
    let payload = postcard::to_stdvec(state).map_err(FormatError::Encode)?;
    Ok(frame(&payload))
}

/// A complete state file around `payload`: the header (this format
/// version and architecture) and the payload's checksum. (Public for the
/// fuzz target, which builds files whose payload is its input.)
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&THIS_ARCH.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&CRC.checksum(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Checks a complete state file and decodes its payload.
pub fn decode<T: DeserializeOwned>(file: &[u8]) -> Result<T, FormatError> {
    let payload = verify(file)?;
    let (state, rest) = postcard::take_from_bytes(payload).map_err(FormatError::Decode)?;
    if !rest.is_empty() {
        return Err(FormatError::TrailingBytes { extra: rest.len() });
    }
    Ok(state)
}

/// Checks a complete state file's header and checksum; returns its
/// payload.
fn verify(file: &[u8]) -> Result<&[u8], FormatError> {
    if file.len() < HEADER_LEN {
        // Too short to say what it is: a bad magic if even that differs.
        if !MAGIC.starts_with(&file[..file.len().min(MAGIC.len())]) {
            return Err(FormatError::BadMagic);
        }
        return Err(FormatError::Truncated {
            have: file.len(),
            want: HEADER_LEN,
        });
    }
    if file[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = le_u16(file, 8);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { found: version });
    }
    let arch = le_u16(file, 10);
    if arch != THIS_ARCH {
        return Err(FormatError::Architecture { found: arch });
    }
    if file[12..16] != [0; 4] {
        return Err(FormatError::Reserved);
    }
    let len = le_u64(file, 16);
    let have = file.len() - HEADER_LEN;
    if len > have as u64 {
        return Err(FormatError::Truncated {
            have: file.len(),
            want: HEADER_LEN.saturating_add(usize::try_from(len).unwrap_or(usize::MAX)),
        });
    }
    let payload = &file[HEADER_LEN..HEADER_LEN + len as usize];
    if (len as usize) < have {
        return Err(FormatError::TrailingBytes {
            extra: have - len as usize,
        });
    }
    let expected = le_u64(file, 24);
    let found = CRC.checksum(payload);
    if found != expected {
        return Err(FormatError::Checksum { found, expected });
    }
    Ok(payload)
}

/// Reads and decodes a state file, refusing files larger than
/// [`MAX_STATE_FILE`] before reading them.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, FormatError> {
    decode(&read_bytes(path)?)
}

/// `--describe-snapshot`: the format version of the state file at `path`,
/// once its header and checksum are checked.
pub fn describe(path: &Path) -> Result<u16, FormatError> {
    verify(&read_bytes(path)?)?;
    Ok(FORMAT_VERSION)
}

/// A state file's bytes, bounded by [`MAX_STATE_FILE`] before reading.
fn read_bytes(path: &Path) -> Result<Vec<u8>, FormatError> {
    let io = |source| FormatError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = crate::config::files::open_checked(path, false, crate::config::files::Accept::RegularFile)
        .map_err(|reason| FormatError::Open {
            path: path.display().to_string(),
            reason,
        })?;
    let len = file.metadata().map_err(io)?.len();
    if len > MAX_STATE_FILE {
        return Err(FormatError::TooLarge { len });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(MAX_STATE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_STATE_FILE {
        return Err(FormatError::TooLarge {
            len: bytes.len() as u64,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        regs: Vec<u64>,
        flag: bool,
    }

    fn sample() -> Sample {
        Sample {
            name: "vcpu0".into(),
            regs: vec![1, 2, 0xffff_ffff_ffff_ffff],
            flag: true,
        }
    }

    fn file() -> Vec<u8> {
        encode(&sample()).unwrap()
    }

    #[test]
    fn round_trips() {
        let bytes = file();
        assert_eq!(&bytes[..8], b"FLATSNAP");
        assert_eq!(decode::<Sample>(&bytes).unwrap(), sample());
    }

    #[test]
    fn refuses_every_truncation_without_panicking() {
        let bytes = file();
        for cut in 0..bytes.len() {
            let err = decode::<Sample>(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(err, FormatError::Truncated { .. }),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn refuses_every_single_bit_flip_without_panicking() {
        let bytes = file();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[i] ^= 1 << bit;
                // Any error is right; accepting, or panicking, is not.
                assert!(
                    decode::<Sample>(&bad).is_err(),
                    "flip of bit {bit} of byte {i} accepted"
                );
            }
        }
    }

    #[test]
    fn a_corrupt_payload_is_a_checksum_error() {
        let mut bytes = file();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(FormatError::Checksum { .. })
        ));
    }

    #[test]
    fn refuses_a_foreign_version() {
        let mut bytes = file();
        // The version before this one (whose payload had no virtio or
        // KVM irqchip state) and one from the future.
        for other in [FORMAT_VERSION - 1, FORMAT_VERSION + 1] {
            bytes[8..10].copy_from_slice(&other.to_le_bytes());
            let err = decode::<Sample>(&bytes).unwrap_err();
            assert!(matches!(err, FormatError::Version { found } if found == other));
            assert!(
                err.to_string()
                    .contains(&format!("version {other} is not supported")),
                "{err}"
            );
        }
    }

    #[test]
    fn refuses_a_foreign_architecture() {
        let mut bytes = file();
        bytes[10..12].copy_from_slice(&7u16.to_le_bytes());
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(FormatError::Architecture { found: 7 })
        ));
    }

    #[test]
    fn refuses_other_files() {
        assert!(matches!(decode::<Sample>(b"\x7fELF"), Err(FormatError::BadMagic)));
        assert!(matches!(decode::<Sample>(&[0u8; 64]), Err(FormatError::BadMagic)));
    }

    #[test]
    fn refuses_trailing_bytes_and_huge_lengths() {
        let mut bytes = file();
        bytes.push(0);
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(FormatError::TrailingBytes { extra: 1 })
        ));
        let mut bytes = file();
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(FormatError::Truncated { .. })
        ));
    }

    #[test]
    fn a_valid_checksum_over_garbage_is_a_decode_error() {
        // A payload that passes the checksum but is not a `Sample`.
        let payload = [0xffu8; 5];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&THIS_ARCH.to_le_bytes());
        bytes.extend_from_slice(&[0; 4]);
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&CRC.checksum(&payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
        assert!(matches!(decode::<Sample>(&bytes), Err(FormatError::Decode(_))));
    }

    #[test]
    fn reads_files_and_refuses_huge_ones() {
        let dir = std::env::temp_dir().join(format!("flatlet-snapfmt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, file()).unwrap();
        assert_eq!(read::<Sample>(&good).unwrap(), sample());
        let huge = dir.join("huge");
        let f = std::fs::File::create(&huge).unwrap();
        f.set_len(MAX_STATE_FILE + 1).unwrap();
        assert!(matches!(read::<Sample>(&huge), Err(FormatError::TooLarge { .. })));
        assert!(matches!(read::<Sample>(&dir), Err(FormatError::Open { .. })));
        let missing = read::<Sample>(&dir.join("missing")).unwrap_err();
        assert!(missing.to_string().contains("missing"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
