//! One stream connection between a guest port and a host Unix socket:
//! its state, its credit in each direction, and the bytes it holds.
//!
//! Host to guest, bytes go straight from the Unix socket into the
//! guest's receive buffers, and only while the guest has credit for them
//! (`buf_alloc - (sent - fwd_cnt)` as the guest last said): nothing is
//! buffered on the host, and a guest that stops reading stops flatlet
//! reading that socket, and only that one. Guest to host, bytes go
//! straight from guest memory to the socket; what the socket does not
//! take waits in `out`, which never holds more than the [`CONN_BUF`]
//! bytes of credit flatlet gave the guest (a guest that sends more is
//! reset).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::packet::{
    HDR_LEN, Header, MAX_PAYLOAD, Op, SHUTDOWN_RCV, SHUTDOWN_SEND, TxPacket, copy_out, read_into, truncate,
    write_from,
};
use crate::virtio::chain::{Region, scatter, skip, total};

/// The receive buffer flatlet gives each connection (`buf_alloc`): the
/// most guest data it holds for a host socket that does not read.
pub const CONN_BUF: u32 = 64 * 1024;

const P_REQUEST: u8 = 1;
const P_RESPONSE: u8 = 2;
const P_CREDIT: u8 = 4;
const P_SHUTDOWN: u8 = 8;
const P_RST: u8 = 16;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: the request goes (or went) to the guest, whose
    /// answer is awaited.
    Connecting,
    /// Data flows.
    Established,
    /// The guest shut down both directions: what it sent is being
    /// written to the host, then the connection is reset.
    Closing,
}

/// What handling a packet from the guest leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The connection goes on.
    Keep,
    /// The connection ends; `rst` says whether the guest is told.
    Kill { rst: bool },
}

/// What a connection puts in a receive buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxOutcome {
    /// A packet with this header (its payload is in place).
    Packet(Header),
    /// A packet, after which the connection ends (an RST).
    Last(Header),
    /// Nothing to send now.
    Nothing,
    /// The host socket failed: the connection ends with an RST.
    Failed,
}

/// A connection.
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// The host's port.
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    /// Its state.
    pub state: State,
    /// When it ends if nothing happens first.
    pub deadline: Option<Instant>,
    /// What epoll watches on the stream (None: not registered).
    pub watched: Option<EventSet>,
    /// Whether it is in the muxer's receive queue.
    pub in_rxq: bool,
    // Host to guest.
    sent: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    preface: Vec<u8>,
    readable: bool,
    host_eof: bool,
    // Guest to host.
    received: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    fwd_cnt_told: Wrapping<u32>,
    out: VecDeque<u8>,
    out_uncounted: usize,
    guest_shut_send: bool,
    guest_shut_rcv: bool,
    host_write_shut: bool,
    pending: u8,
}

impl Connection {
    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            state,
            deadline: None,
            watched: None,
            in_rxq: false,
            sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            preface: Vec::new(),
            readable: false,
            host_eof: false,
            received: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            out: VecDeque::new(),
            out_uncounted: 0,
            guest_shut_send: false,
            guest_shut_rcv: false,
            host_write_shut: false,
            pending: 0,
        }
    }

    /// A host-initiated connection to guest port `peer_port`: the request
    /// is sent to the guest; `preface` holds bytes the host sent after its
    /// `CONNECT` line.
    pub fn host_initiated(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        preface: Vec<u8>,
        deadline: Instant,
    ) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, State::Connecting);
        c.pending = P_REQUEST;
        c.preface = preface;
        c.deadline = Some(deadline);
        c
    }

    /// A guest-initiated connection, its host socket connected: the
    /// response is sent to the guest.
    pub fn guest_initiated(stream: UnixStream, local_port: u32, peer_port: u32, hdr: &Header) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, State::Established);
        c.pending = P_RESPONSE;
        c.update_peer(hdr);
        c
    }

    /// Takes the guest's credit information from a header.
    pub fn update_peer(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Bytes the guest can take now. A guest whose counters make no
    /// sense gets nothing.
    pub fn credit(&self) -> u32 {
        let in_flight = (self.sent - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes flatlet holds (received, not yet written to the host).
    pub fn held(&self) -> u32 {
        (self.received - self.fwd_cnt).0
    }

    /// Whether the muxer should ask the guest to wait no longer: an RST
    /// is due and the connection is otherwise dead.
    pub fn is_resetting(&self) -> bool {
        self.pending & P_RST != 0
    }

    /// Events to watch on the stream.
    pub fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.state == State::Connecting || self.is_resetting() {
            return set;
        }
        if self.state == State::Established
            && !self.readable
            && !self.host_eof
            && !self.guest_shut_rcv
            && self.credit() > 0
        {
            set |= EventSet::IN;
        }
        if !self.out.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Whether the guest's view of flatlet's free space is low enough,
    /// and flatlet has made room since, that a credit update is worth a
    /// packet.
    fn credit_update_due(&self) -> bool {
        self.fwd_cnt != self.fwd_cnt_told && (self.received - self.fwd_cnt_told).0 >= CONN_BUF / 2
    }

    /// Whether the connection has something for the guest.
    pub fn has_rx_work(&self) -> bool {
        if self.pending & (P_REQUEST | P_RESPONSE | P_RST | P_SHUTDOWN | P_CREDIT) != 0 {
            return true;
        }
        if self.credit_update_due() {
            return true;
        }
        self.state == State::Established
            && !self.guest_shut_rcv
            && self.credit() > 0
            && (!self.preface.is_empty() || (self.readable && !self.host_eof))
    }

    /// The stream is readable (epoll said so).
    pub fn set_readable(&mut self) {
        self.readable = true;
    }

    /// Queues an RST for the guest; the connection ends once it is sent.
    pub fn reset_soon(&mut self) {
        self.pending = P_RST;
    }

    /// The guest's `RESPONSE` to a host-initiated request: the host gets
    /// `OK <port>\n` before any data.
    pub fn established(&mut self) {
        self.state = State::Established;
        self.deadline = None;
        let line = format!("OK {}\n", self.local_port);
        self.out_uncounted = line.len();
        self.out.extend(line.as_bytes());
    }

    /// Handles a packet from the guest on this (established or closing)
    /// connection.
    pub fn on_guest(&mut self, mem: &GuestMemoryMmap, pkt: &TxPacket, now: Instant) -> Verdict {
        self.update_peer(&pkt.hdr);
        match pkt.hdr.operation() {
            Some(Op::Rw) => self.take_data(mem, &pkt.payload),
            Some(Op::CreditUpdate) => Verdict::Keep,
            Some(Op::CreditRequest) => {
                self.pending |= P_CREDIT;
                Verdict::Keep
            }
            Some(Op::Shutdown) => {
                self.guest_shut_rcv |= pkt.hdr.flags & SHUTDOWN_RCV != 0;
                self.guest_shut_send |= pkt.hdr.flags & SHUTDOWN_SEND != 0;
                self.after_write(now)
            }
            Some(Op::Rst) => {
                // Whatever the host socket takes right now, it gets.
                let _ = self.flush();
                Verdict::Kill { rst: false }
            }
            // A second request or response on a live connection, or an
            // unknown operation.
            _ => Verdict::Kill { rst: true },
        }
    }

    fn take_data(&mut self, mem: &GuestMemoryMmap, payload: &[Region]) -> Verdict {
        let len = total(payload);
        if self.guest_shut_send || self.state != State::Established {
            return Verdict::Kill { rst: true };
        }
        if len as u64 + u64::from(self.held()) > u64::from(CONN_BUF) {
            // More than the credit flatlet gave.
            return Verdict::Kill { rst: true };
        }
        let mut written = 0;
        if self.out.is_empty() && !self.host_write_shut {
            match write_from(mem, payload, &mut self.stream) {
                Ok(n) => written = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Verdict::Kill { rst: true },
            }
        }
        if written < len {
            let mut rest = Vec::new();
            if copy_out(mem, &skip(payload, written), &mut rest).is_err() {
                return Verdict::Kill { rst: true };
            }
            self.out.extend(rest);
        }
        self.received += Wrapping(len as u32);
        self.fwd_cnt += Wrapping(written as u32);
        Verdict::Keep
    }

    /// Writes what waits for the host socket. Returns the bytes of guest
    /// data written.
    pub fn flush(&mut self) -> io::Result<usize> {
        let mut data = 0;
        while !self.out.is_empty() {
            let (a, _) = self.out.as_slices();
            let n = match self.stream.write(a) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.out.drain(..n);
            let uncounted = n.min(self.out_uncounted);
            self.out_uncounted -= uncounted;
            data += n - uncounted;
        }
        self.fwd_cnt += Wrapping(data as u32);
        if self.out.is_empty() && self.out.capacity() > 4096 {
            self.out.shrink_to(0);
        }
        Ok(data)
    }

    /// The stream can be written: flushes, then does what the guest's
    /// shutdowns ask once everything is written.
    pub fn on_writable(&mut self, now: Instant) -> Verdict {
        if self.flush().is_err() {
            return Verdict::Kill { rst: true };
        }
        self.after_write(now)
    }

    fn after_write(&mut self, now: Instant) -> Verdict {
        if !self.out.is_empty() {
            if self.guest_shut_send && self.guest_shut_rcv && self.deadline.is_none() {
                self.state = State::Closing;
                self.deadline = Some(now + super::muxer::SHUTDOWN_TIMEOUT);
            }
            return Verdict::Keep;
        }
        if self.guest_shut_send && self.guest_shut_rcv {
            return Verdict::Kill { rst: true };
        }
        if self.guest_shut_send && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Verdict::Keep
    }

    /// Fills the receive buffer `regions` with the next packet for the
    /// guest; `base` carries the addresses.
    pub fn next_rx(&mut self, mem: &GuestMemoryMmap, regions: &[Region], base: Header) -> RxOutcome {
        let mut hdr = Header {
            src_port: self.local_port,
            dst_port: self.peer_port,
            buf_alloc: CONN_BUF,
            fwd_cnt: self.fwd_cnt.0,
            ..base
        };
        if self.pending & P_RST != 0 {
            hdr.op = Op::Rst as u16;
            return RxOutcome::Last(hdr);
        }
        let op = if self.pending & P_REQUEST != 0 {
            self.pending &= !P_REQUEST;
            Some(Op::Request)
        } else if self.pending & P_RESPONSE != 0 {
            self.pending &= !P_RESPONSE;
            Some(Op::Response)
        } else {
            None
        };
        if let Some(op) = op {
            hdr.op = op as u16;
            return self.told(hdr);
        }
        match self.data(mem, regions) {
            Ok(0) => {}
            Ok(n) => {
                hdr.op = Op::Rw as u16;
                hdr.len = n as u32;
                self.sent += Wrapping(n as u32);
                return self.told(hdr);
            }
            Err(_) => return RxOutcome::Failed,
        }
        if self.pending & P_SHUTDOWN != 0 {
            self.pending &= !P_SHUTDOWN;
            hdr.op = Op::Shutdown as u16;
            hdr.flags = SHUTDOWN_SEND;
            return self.told(hdr);
        }
        if self.pending & P_CREDIT != 0 || self.credit_update_due() {
            hdr.op = Op::CreditUpdate as u16;
            return self.told(hdr);
        }
        RxOutcome::Nothing
    }

    fn told(&mut self, hdr: Header) -> RxOutcome {
        self.fwd_cnt_told = Wrapping(hdr.fwd_cnt);
        self.pending &= !P_CREDIT;
        RxOutcome::Packet(hdr)
    }

    /// Moves host bytes into the payload part of `regions`, within the
    /// guest's credit. Returns how many (0: none now).
    fn data(&mut self, mem: &GuestMemoryMmap, regions: &[Region]) -> io::Result<usize> {
        if self.state != State::Established || self.guest_shut_rcv {
            return Ok(0);
        }
        let room = total(regions).saturating_sub(HDR_LEN);
        let max = (self.credit() as usize).min(room).min(MAX_PAYLOAD as usize);
        if max == 0 {
            return Ok(0);
        }
        let payload = truncate(&skip(regions, HDR_LEN), max);
        if !self.preface.is_empty() {
            let n = max.min(self.preface.len());
            scatter(mem, &payload, &self.preface[..n]).map_err(|e| io::Error::other(e.to_string()))?;
            self.preface.drain(..n);
            return Ok(n);
        }
        if !self.readable || self.host_eof {
            return Ok(0);
        }
        match read_into(mem, &payload, &mut self.stream) {
            Ok(0) => {
                self.readable = false;
                self.host_eof = true;
                self.pending |= P_SHUTDOWN;
                Ok(0)
            }
            Ok(n) => {
                if n < max {
                    // Most likely drained: epoll says when there is more.
                    self.readable = false;
                }
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                self.readable = false;
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }
}
