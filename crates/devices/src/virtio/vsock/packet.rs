//! vsock packets: the 44-byte header (`virtio_vsock_hdr`), and the checks
//! a packet from the driver passes before the muxer sees it.
//!
//! A transmit chain is device-readable only: the header, then `len`
//! bytes of payload, in any split across descriptors. A receive chain is
//! device-writable only and holds at least a header. Everything else (a
//! short header, a `len` the chain does not hold or beyond the largest
//! packet, a control packet with a payload) is a [`PacketError`]; payload
//! bytes are never copied out of guest memory here, only located.

use std::io;

use virtio_queue::Queue;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, ReadVolatile, VolatileMemoryError, WriteVolatile};

use crate::virtio::chain::{ChainError, Layout, Region, descriptors, gather, scatter, skip, total};

/// Size of the packet header.
pub const HDR_LEN: usize = 44;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Stream sockets, the only type flatlet offers.
pub const TYPE_STREAM: u16 = 1;
/// Largest payload a packet may carry (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// `VIRTIO_VSOCK_SHUTDOWN_RCV`: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_SEND`: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// Packet operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Connection request.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Reset.
    Rst = 3,
    /// No more sending and/or receiving.
    Shutdown = 4,
    /// Data.
    Rw = 5,
    /// Credit information.
    CreditUpdate = 6,
    /// A request for credit information.
    CreditRequest = 7,
}

impl Op {
    /// The operation of a header's `op` field, if it is one.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// `virtio_vsock_hdr`, little endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub kind: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags (shutdown flags).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has taken out of its receive buffer.
    pub fwd_cnt: u32,
}

fn u32_at(b: &[u8; HDR_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; HDR_LEN], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

impl Header {
    /// Decodes a header.
    pub fn parse(b: &[u8; HDR_LEN]) -> Self {
        Self {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            kind: u16::from_le_bytes([b[28], b[29]]),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The operation, if the `op` field names one.
    pub fn operation(&self) -> Option<Op> {
        Op::from_u16(self.op)
    }
}

/// What is wrong with a chain the driver gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The chain itself is malformed.
    #[error("{0}")]
    Chain(#[from] ChainError),
    /// A transmit chain with device-writable buffers, or a receive chain
    /// with device-readable ones.
    #[error("descriptor in the wrong direction for this queue")]
    Direction,
    /// Fewer bytes than a header.
    #[error("chain of {0} bytes is shorter than a packet header")]
    Short(usize),
    /// A payload length the chain does not hold.
    #[error("header says {len} payload bytes, the chain holds {room}")]
    Length { len: u32, room: usize },
    /// A payload longer than any packet may be.
    #[error("payload of {0} bytes is over the limit of {MAX_PAYLOAD}")]
    TooLong(u32),
    /// A control packet with a payload.
    #[error("operation {op} carries {len} payload bytes")]
    ControlPayload { op: u16, len: u32 },
    /// Guest memory could not be read.
    #[error("guest memory cannot be read")]
    Memory,
}

/// A packet the driver sent: its header, and where its `len` payload
/// bytes lie in guest memory.
#[derive(Debug)]
pub struct TxPacket {
    /// The header.
    pub hdr: Header,
    /// The payload (exactly `hdr.len` bytes), checked to lie in guest memory.
    pub payload: Vec<Region>,
}

/// The first `n` bytes of the regions.
pub fn truncate(regions: &[Region], mut n: usize) -> Vec<Region> {
    let mut out = Vec::new();
    for &(addr, len) in regions {
        if n == 0 {
            break;
        }
        let take = len.min(n);
        out.push((addr, take));
        n -= take;
    }
    out
}

/// Decodes and checks the transmit chain at `head`.
pub fn read_tx(mem: &GuestMemoryMmap, queue: &Queue, head: u16) -> Result<TxPacket, PacketError> {
    let layout = Layout::of(mem, &descriptors(mem, queue, head)?)?;
    if !layout.writable.is_empty() {
        return Err(PacketError::Direction);
    }
    parse_tx(mem, &layout.readable)
}

/// Decodes and checks a packet held in `readable` (checked regions).
pub fn parse_tx(mem: &GuestMemoryMmap, readable: &[Region]) -> Result<TxPacket, PacketError> {
    let room = total(readable);
    if room < HDR_LEN {
        return Err(PacketError::Short(room));
    }
    let mut raw = [0u8; HDR_LEN];
    gather(mem, readable, &mut raw).map_err(|_| PacketError::Memory)?;
    let hdr = Header::parse(&raw);
    if hdr.len > MAX_PAYLOAD {
        return Err(PacketError::TooLong(hdr.len));
    }
    if hdr.len > 0 && hdr.op != Op::Rw as u16 {
        return Err(PacketError::ControlPayload {
            op: hdr.op,
            len: hdr.len,
        });
    }
    let rest = skip(readable, HDR_LEN);
    if total(&rest) < hdr.len as usize {
        return Err(PacketError::Length {
            len: hdr.len,
            room: room - HDR_LEN,
        });
    }
    Ok(TxPacket {
        hdr,
        payload: truncate(&rest, hdr.len as usize),
    })
}

/// The device-writable regions of the receive chain at `head`, which
/// hold at least a header.
pub fn rx_buffer(mem: &GuestMemoryMmap, queue: &Queue, head: u16) -> Result<Vec<Region>, PacketError> {
    let layout = Layout::of(mem, &descriptors(mem, queue, head)?)?;
    if !layout.readable.is_empty() {
        return Err(PacketError::Direction);
    }
    let room = total(&layout.writable);
    if room < HDR_LEN {
        return Err(PacketError::Short(room));
    }
    Ok(layout.writable)
}

/// Writes a header at the start of a receive buffer.
pub fn write_header(mem: &GuestMemoryMmap, regions: &[Region], hdr: &Header) -> Result<(), PacketError> {
    scatter(mem, regions, &hdr.to_bytes()).map_err(|_| PacketError::Memory)
}

fn io_error(e: VolatileMemoryError) -> io::Error {
    match e {
        VolatileMemoryError::IOError(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

fn mem_error(e: vm_memory::GuestMemoryError) -> io::Error {
    io::Error::other(e.to_string())
}

/// Reads from `src` straight into the regions (one read per piece of
/// guest memory, stopping at the first short one). Returns the bytes
/// read; `Ok(0)` is the end of the stream, and `WouldBlock` is returned
/// only when nothing was read.
pub fn read_into<R: ReadVolatile>(
    mem: &GuestMemoryMmap,
    regions: &[Region],
    src: &mut R,
) -> io::Result<usize> {
    let mut done = 0;
    for &(addr, len) in regions {
        for slice in mem.get_slices(addr, len) {
            let mut slice = slice.map_err(mem_error)?;
            let want = slice.len();
            let n = match src.read_volatile(&mut slice) {
                Ok(n) => n,
                Err(e) if done > 0 => {
                    let e = io_error(e);
                    if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                        return Ok(done);
                    }
                    return Err(e);
                }
                Err(e) => return Err(io_error(e)),
            };
            done += n;
            if n < want {
                return Ok(done);
            }
        }
    }
    Ok(done)
}

/// Writes the regions to `dst` (one write per piece of guest memory,
/// stopping at the first short one). Returns the bytes written;
/// `WouldBlock` is returned only when nothing was written.
pub fn write_from<W: WriteVolatile>(
    mem: &GuestMemoryMmap,
    regions: &[Region],
    dst: &mut W,
) -> io::Result<usize> {
    let mut done = 0;
    for &(addr, len) in regions {
        for slice in mem.get_slices(addr, len) {
            let slice = slice.map_err(mem_error)?;
            let want = slice.len();
            let n = match dst.write_volatile(&slice) {
                Ok(n) => n,
                Err(e) if done > 0 => {
                    let e = io_error(e);
                    if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                        return Ok(done);
                    }
                    return Err(e);
                }
                Err(e) => return Err(io_error(e)),
            };
            done += n;
            if n < want {
                return Ok(done);
            }
        }
    }
    Ok(done)
}

/// Copies the regions into `out` (appending).
pub fn copy_out(mem: &GuestMemoryMmap, regions: &[Region], out: &mut Vec<u8>) -> Result<(), PacketError> {
    let start = out.len();
    out.resize(start + total(regions), 0);
    gather(mem, regions, &mut out[start..]).map_err(|_| PacketError::Memory)
}
