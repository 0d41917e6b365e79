//! The guest-facing network side of MMDS: Ethernet, ARP, IPv4 and TCP
//! from smoltcp, HTTP from [`crate::http`].
//!
//! A net device hands every frame the guest transmits to
//! [`MmdsStack::detour_tx`]; frames for the MMDS address (ARP for it,
//! IPv4 to it) are consumed there and never reach the TAP. Frames MMDS
//! sends to the guest wait in a bounded queue that the device drains with
//! [`MmdsStack::next_rx_frame`] before it reads the TAP.
//!
//! Nothing blocks and nothing runs on its own: the stack moves when the
//! device calls it, with the time passed in. The guest is hostile: at
//! most [`MAX_CONNECTIONS`] connections (a SYN past them gets a reset and
//! is counted), a handshake that does not complete or a connection that
//! goes quiet is dropped after a timeout, a request is at most
//! [`MAX_REQUEST_BYTES`](crate::http::MAX_REQUEST_BYTES), and at most
//! [`MAX_QUEUED_FRAMES`] frames wait for the guest. Memory for the stack
//! is taken on the first frame for MMDS, not before.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IpCidr,
    IpProtocol, Ipv4Packet, TcpPacket,
};

use crate::http::{self, HttpCounters, MAX_REQUEST_BYTES, Served};
use crate::store::Mmds;

/// The MAC address MMDS answers from (Firecracker's).
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
/// The default MMDS address.
pub const DEFAULT_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The TCP port MMDS serves.
pub const PORT: u16 = 80;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Frames waiting for the guest at most; a reply past them is dropped
/// (and counted), TCP data waits in its socket instead.
pub const MAX_QUEUED_FRAMES: usize = 64;
/// Largest Ethernet frame (without FCS) MMDS takes or sends.
pub const MAX_FRAME: usize = 1514;
/// A handshake not complete after this long is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection with no traffic for this long is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const SOCKET_RX_BYTES: usize = 4096;
const SOCKET_TX_BYTES: usize = 8192;

/// Counters of the network side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackCounters {
    /// Frames from the guest MMDS took.
    pub rx_frames: u64,
    /// Frames for the MMDS address that MMDS dropped: not TCP, malformed,
    /// or too large.
    pub rx_dropped: u64,
    /// Frames given to the guest.
    pub tx_frames: u64,
    /// Frames for the guest dropped because too many were waiting.
    pub tx_dropped: u64,
    /// Connections accepted.
    pub connections: u64,
    /// SYNs that found every connection taken (answered with a reset).
    pub syn_refused: u64,
    /// Connections dropped for a handshake or an idle timeout.
    pub timed_out: u64,
    /// What the HTTP side saw.
    pub http: HttpCounters,
}

/// The frames between smoltcp and the net device.
struct Link {
    inbound: Vec<u8>,
    has_inbound: bool,
    outbound: VecDeque<Vec<u8>>,
    dropped: u64,
}

struct RxToken<'a>(&'a [u8]);

struct TxToken<'a> {
    outbound: &'a mut VecDeque<Vec<u8>>,
    dropped: &'a mut u64,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        if self.outbound.len() < MAX_QUEUED_FRAMES {
            self.outbound.push_back(frame);
        } else {
            *self.dropped += 1;
        }
        r
    }
}

impl phy::Device for Link {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: SmolInstant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        if !self.has_inbound {
            return None;
        }
        self.has_inbound = false;
        Some((
            RxToken(&self.inbound),
            TxToken {
                outbound: &mut self.outbound,
                dropped: &mut self.dropped,
            },
        ))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<TxToken<'_>> {
        // A full queue holds TCP back (it sends later) instead of losing data.
        (self.outbound.len() < MAX_QUEUED_FRAMES).then_some(TxToken {
            outbound: &mut self.outbound,
            dropped: &mut self.dropped,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps
    }
}

/// One connection slot: a smoltcp socket and the HTTP exchange on it.
struct Conn {
    handle: SocketHandle,
    request: Vec<u8>,
    response: Vec<u8>,
    sent: usize,
    close_after: bool,
    in_use: bool,
    opened: Instant,
    last_seen: Instant,
    state: tcp::State,
}

/// The smoltcp side, made on the first frame for MMDS.
struct Inner {
    iface: Interface,
    sockets: SocketSet<'static>,
    link: Link,
    conns: Vec<Conn>,
    epoch: Instant,
}

/// What a frame from the guest is to MMDS.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    /// ARP about the MMDS address.
    Arp,
    /// TCP to the MMDS address (a SYN opens a connection).
    Tcp { syn: bool },
    /// Something else to the MMDS address: taken and dropped.
    Drop,
}

/// MMDS on one network interface.
pub struct MmdsStack {
    mmds: Arc<Mutex<Mmds>>,
    ip: Ipv4Addr,
    inner: Option<Box<Inner>>,
    counters: StackCounters,
}

impl std::fmt::Debug for MmdsStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmdsStack")
            .field("ip", &self.ip)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl MmdsStack {
    /// MMDS at `ip`, serving `mmds`.
    pub fn new(ip: Ipv4Addr, mmds: Arc<Mutex<Mmds>>) -> Self {
        Self {
            mmds,
            ip,
            inner: None,
            counters: StackCounters::default(),
        }
    }

    /// The address MMDS answers for.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The counters.
    pub fn counters(&self) -> StackCounters {
        let mut c = self.counters;
        if let Some(inner) = &self.inner {
            c.tx_dropped += inner.link.dropped;
        }
        c
    }

    /// Takes `frame` (an Ethernet frame the guest transmits) if it is
    /// for MMDS: ARP about the MMDS address or IPv4 to it. Returns
    /// whether it was taken; a frame not taken goes on as before.
    pub fn detour_tx(&mut self, frame: &[u8], now: Instant) -> bool {
        let Some(kind) = classify(frame, self.ip) else {
            return false;
        };
        self.counters.rx_frames += 1;
        let syn = match kind {
            Kind::Drop => {
                self.counters.rx_dropped += 1;
                return true;
            }
            _ if frame.len() > MAX_FRAME => {
                self.counters.rx_dropped += 1;
                return true;
            }
            Kind::Tcp { syn } => syn,
            Kind::Arp => false,
        };
        let ip = self.ip;
        let inner = self.inner.get_or_insert_with(|| Inner::new(ip, now));
        if syn && !inner.has_listener(now) {
            self.counters.syn_refused += 1;
        }
        let link = &mut inner.link;
        link.inbound.clear();
        link.inbound.extend_from_slice(frame);
        if kind != Kind::Arp {
            // As Firecracker does, IPv4 to the MMDS address is taken
            // whatever MAC the guest sent it to.
            link.inbound[..6].copy_from_slice(&MMDS_MAC);
        }
        link.has_inbound = true;
        inner.pump(now, &self.mmds, &mut self.counters);
        true
    }

    /// Writes the next frame MMDS has for the guest into `buf`; returns
    /// its length, or `None` if there is none (or `buf` is too small: the
    /// frame is then dropped and counted).
    pub fn next_rx_frame(&mut self, buf: &mut [u8], now: Instant) -> Option<usize> {
        let inner = self.inner.as_mut()?;
        if inner.link.outbound.is_empty() {
            inner.pump(now, &self.mmds, &mut self.counters);
        }
        let frame = inner.link.outbound.pop_front()?;
        if frame.len() > buf.len() {
            self.counters.tx_dropped += 1;
            return None;
        }
        buf[..frame.len()].copy_from_slice(&frame);
        self.counters.tx_frames += 1;
        Some(frame.len())
    }

    /// Whether frames wait for the guest.
    pub fn has_pending(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| !i.link.outbound.is_empty())
    }

    /// When MMDS next has something to do without a frame from the guest
    /// (a retransmission, a timeout), if ever.
    pub fn poll_at(&mut self, now: Instant) -> Option<Instant> {
        let inner = self.inner.as_mut()?;
        let at = inner.iface.poll_at(inner.smol_now(now), &inner.sockets)?;
        let micros = u64::try_from(at.total_micros()).unwrap_or(0);
        Some(inner.epoch + Duration::from_micros(micros))
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.inner
            .as_ref()
            .map_or(0, |i| i.conns.iter().filter(|c| c.in_use).count())
    }
}

impl Inner {
    fn new(ip: Ipv4Addr, now: Instant) -> Box<Self> {
        let mut link = Link {
            inbound: Vec::with_capacity(MAX_FRAME),
            has_inbound: false,
            outbound: VecDeque::new(),
            dropped: 0,
        };
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(MMDS_MAC)));
        // Initial sequence numbers; a weak seed only makes them guessable.
        config.random_seed = getrandom::u64().unwrap_or(0x6d6d_6473);
        let mut iface = Interface::new(config, &mut link, SmolInstant::ZERO);
        // The guest may use any address: the whole IPv4 space is "on link"
        // (ARP about the MMDS address fills the neighbour cache).
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(ip.into(), 0));
        });
        let mut sockets = SocketSet::new(Vec::with_capacity(MAX_CONNECTIONS));
        let conns = (0..MAX_CONNECTIONS)
            .map(|_| {
                let mut socket = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; SOCKET_RX_BYTES]),
                    tcp::SocketBuffer::new(vec![0; SOCKET_TX_BYTES]),
                );
                // Nothing wakes the stack but the guest's frames: answer at once.
                socket.set_ack_delay(None);
                socket.set_nagle_enabled(false);
                let _ = socket.listen(PORT);
                Conn {
                    handle: sockets.add(socket),
                    request: Vec::new(),
                    response: Vec::new(),
                    sent: 0,
                    close_after: false,
                    in_use: false,
                    opened: now,
                    last_seen: now,
                    state: tcp::State::Listen,
                }
            })
            .collect();
        Box::new(Self {
            iface,
            sockets,
            link,
            conns,
            epoch: now,
        })
    }

    fn smol_now(&self, now: Instant) -> SmolInstant {
        let micros = now.saturating_duration_since(self.epoch).as_micros();
        SmolInstant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    /// Whether a socket listens (after recycling those that are done).
    fn has_listener(&mut self, now: Instant) -> bool {
        let mut dummy = StackCounters::default();
        for i in 0..self.conns.len() {
            self.recycle(i, now, &mut dummy);
        }
        self.conns
            .iter()
            .any(|c| self.sockets.get::<tcp::Socket>(c.handle).is_listening())
    }

    /// Runs smoltcp and the HTTP exchanges until nothing moves.
    fn pump(&mut self, now: Instant, mmds: &Mutex<Mmds>, counters: &mut StackCounters) {
        let smol_now = self.smol_now(now);
        for _ in 0..8 {
            let _ = self.iface.poll(smol_now, &mut self.link, &mut self.sockets);
            let mut moved = false;
            for i in 0..self.conns.len() {
                moved |= self.service(i, now, mmds, counters);
            }
            if !moved {
                break;
            }
        }
    }

    /// Returns a slot whose connection has ended to listening, and drops
    /// connections past their timeouts.
    fn recycle(&mut self, i: usize, now: Instant, counters: &mut StackCounters) {
        let conn = &mut self.conns[i];
        let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
        let state = socket.state();
        if state != conn.state {
            conn.state = state;
            conn.last_seen = now;
        }
        if !conn.in_use {
            if state != tcp::State::Listen {
                conn.in_use = true;
                conn.opened = now;
                conn.last_seen = now;
                counters.connections += 1;
            }
            return;
        }
        let handshake_late = state == tcp::State::SynReceived
            && now.saturating_duration_since(conn.opened) >= HANDSHAKE_TIMEOUT;
        let idle = now.saturating_duration_since(conn.last_seen) >= IDLE_TIMEOUT;
        if (handshake_late || idle) && socket.is_open() {
            counters.timed_out += 1;
            socket.abort();
        }
        // Done (an abort's reset sent), or in TIME-WAIT: the slot listens
        // again (smoltcp's TIME-WAIT would hold it for seconds; the
        // guest's side is done).
        if !socket.is_open() && (state == tcp::State::TimeWait || socket.remote_endpoint().is_none()) {
            socket.abort();
            let _ = socket.listen(PORT);
            conn.in_use = false;
            conn.state = tcp::State::Listen;
            conn.request = Vec::new();
            conn.response = Vec::new();
            conn.sent = 0;
            conn.close_after = false;
        }
    }

    /// Moves one connection's HTTP exchange along; returns whether
    /// anything happened.
    fn service(&mut self, i: usize, now: Instant, mmds: &Mutex<Mmds>, counters: &mut StackCounters) -> bool {
        self.recycle(i, now, counters);
        let conn = &mut self.conns[i];
        if !conn.in_use {
            return false;
        }
        let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
        let mut moved = false;
        // Read what fits in the request buffer; more waits in the socket
        // (its window closes), and a full buffer with no request is an
        // error.
        while socket.can_recv() && conn.request.len() < MAX_REQUEST_BYTES {
            let mut chunk = [0u8; 1024];
            let room = (MAX_REQUEST_BYTES - conn.request.len()).min(chunk.len());
            match socket.recv_slice(&mut chunk[..room]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    conn.request.extend_from_slice(&chunk[..n]);
                    conn.last_seen = now;
                    moved = true;
                }
            }
        }
        loop {
            if conn.sent < conn.response.len() {
                match socket.send_slice(&conn.response[conn.sent..]) {
                    Ok(n) if n > 0 => {
                        conn.sent += n;
                        conn.last_seen = now;
                        moved = true;
                    }
                    _ => {}
                }
                if conn.sent < conn.response.len() {
                    break;
                }
                conn.response = Vec::new();
                conn.sent = 0;
                if conn.close_after {
                    socket.close();
                    break;
                }
            }
            if conn.close_after || conn.request.is_empty() {
                break;
            }
            let served = {
                let mut store = mmds.lock().unwrap_or_else(PoisonError::into_inner);
                http::serve(&conn.request, &mut store, now, &mut counters.http)
            };
            match served {
                Served::Incomplete => break,
                Served::Answered {
                    consumed,
                    response,
                    close,
                } => {
                    conn.request.drain(..consumed);
                    conn.response = response;
                    conn.close_after = close;
                    if close {
                        conn.request = Vec::new();
                    }
                    moved = true;
                }
            }
        }
        // The guest closed its side and nothing is left to answer.
        if socket.state() == tcp::State::CloseWait && conn.response.is_empty() && !conn.close_after {
            socket.close();
            moved = true;
        }
        moved
    }
}

/// Whether (and how) `frame` is for MMDS at `ip`.
fn classify(frame: &[u8], ip: Ipv4Addr) -> Option<Kind> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    match eth.ethertype() {
        EthernetProtocol::Arp => {
            let arp = ArpPacket::new_checked(eth.payload()).ok()?;
            match ArpRepr::parse(&arp).ok()? {
                ArpRepr::EthernetIpv4 {
                    target_protocol_addr, ..
                } if target_protocol_addr == ip => Some(Kind::Arp),
                _ => None,
            }
        }
        EthernetProtocol::Ipv4 => {
            let packet = Ipv4Packet::new_checked(eth.payload()).ok()?;
            if packet.dst_addr() != ip {
                return None;
            }
            if packet.next_header() != IpProtocol::Tcp || !packet.verify_checksum() {
                return Some(Kind::Drop);
            }
            match TcpPacket::new_checked(packet.payload()) {
                Ok(tcp) => Some(Kind::Tcp {
                    syn: tcp.syn() && !tcp.ack(),
                }),
                Err(_) => Some(Kind::Drop),
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
