//! The host side of vsock, Firecracker's way: a listener on `uds_path`
//! for host-initiated connections (`CONNECT <port>\n`, answered with
//! `OK <host-port>\n` once the guest accepts), and a Unix socket
//! connection to `<uds_path>_<port>` for each guest-initiated one.
//!
//! Every socket is non-blocking and watched on the VMM thread's event
//! loop only while there is something to do with it: a stream is read
//! only while its guest has credit and written only while it holds guest
//! data, so one slow peer (on either side) holds up only its own
//! connection. Connections waiting for a `CONNECT` line or for the guest's
//! answer are ended after [`CONNECT_TIMEOUT`].

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::connection::{Connection, RxOutcome, State, Verdict};
use super::packet::{HDR_LEN, HOST_CID, Header, Op, TYPE_STREAM, TxPacket, write_header};
use super::stats::VsockStats;
use crate::ratelimit::LogLimiter;
use crate::virtio::chain::Region;

/// Most connections at once (host- and guest-initiated, and host
/// connections still sending their `CONNECT` line).
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a host connection has to send its `CONNECT` line, and the
/// guest to answer a request.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long guest data may take to reach a host socket after the guest
/// closed the connection.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest `CONNECT` line read (`CONNECT 4294967295\n` is 19 bytes).
const MAX_LINE: usize = 32;
/// First host port given to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Most standalone packets (resets of unknown connections) waiting for
/// receive buffers; more are dropped and counted.
const MAX_CTRL: usize = 1024;
/// Most connections accepted in one wake-up.
const ACCEPT_BATCH: usize = 64;

/// Errors setting up the host side.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket: refusing to replace it")]
    NotASocket(String),
    /// Another process listens on the path.
    #[error("{0} is in use by another process")]
    InUse(String),
    /// Binding failed.
    #[error("cannot listen on {path}: {source}")]
    Bind { path: String, source: io::Error },
}

/// Listens on `path` without clobbering anything: a stale socket is
/// replaced, a live one or any other file is refused (the API socket's
/// rule).
pub fn bind(path: &Path) -> Result<UnixListener, MuxerError> {
    let shown = path.display().to_string();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(MuxerError::InUse(shown));
            }
            std::fs::remove_file(path).map_err(|source| MuxerError::Bind {
                path: shown.clone(),
                source,
            })?;
        }
        Ok(_) => return Err(MuxerError::NotASocket(shown)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(MuxerError::Bind { path: shown, source }),
    }
    let listener = UnixListener::bind(path).map_err(|source| MuxerError::Bind {
        path: shown.clone(),
        source,
    })?;
    set_nonblocking(&listener).map_err(|source| MuxerError::Bind { path: shown, source })?;
    Ok(listener)
}

/// O_NONBLOCK through fcntl (std's `set_nonblocking` on a socket is an
/// ioctl the seccomp policy need not allow).
fn set_nonblocking(fd: &impl std::os::fd::AsFd) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// How the muxer changes what the event loop watches.
pub trait Watch {
    /// Starts watching `fd` for `set`.
    fn add(&mut self, fd: RawFd, set: EventSet) -> bool;
    /// Changes what is watched on `fd`.
    fn modify(&mut self, fd: RawFd, set: EventSet) -> bool;
    /// Stops watching `fd`.
    fn remove(&mut self, fd: RawFd) -> bool;
}

impl Watch for EventOps<'_> {
    fn add(&mut self, fd: RawFd, set: EventSet) -> bool {
        EventOps::add(self, Events::new_raw(fd, set)).is_ok()
    }
    fn modify(&mut self, fd: RawFd, set: EventSet) -> bool {
        EventOps::modify(self, Events::new_raw(fd, set)).is_ok()
    }
    fn remove(&mut self, fd: RawFd) -> bool {
        EventOps::remove(self, Events::empty_raw(fd)).is_ok()
    }
}

/// A connection key: (host port, guest port).
type Key = (u32, u32);

/// A host connection that has not sent its `CONNECT` line yet.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

enum Owner {
    Pending,
    Conn(Key),
}

/// The host side of the device.
pub struct Muxer {
    uds_path: PathBuf,
    listener: UnixListener,
    listening: bool,
    guest_cid: u64,
    conns: HashMap<Key, Connection>,
    pending: HashMap<RawFd, PendingHost>,
    owners: HashMap<RawFd, Owner>,
    rxq: VecDeque<Key>,
    ctrl: VecDeque<Header>,
    next_port: u32,
    pub(super) stats: VsockStats,
    log: LogLimiter,
}

impl Muxer {
    /// A muxer around a bound listener.
    pub fn new(uds_path: PathBuf, listener: UnixListener, guest_cid: u64) -> Self {
        Self {
            log: LogLimiter::new(format!("vsock {}", uds_path.display())),
            uds_path,
            listener,
            listening: false,
            guest_cid,
            conns: HashMap::new(),
            pending: HashMap::new(),
            owners: HashMap::new(),
            rxq: VecDeque::new(),
            ctrl: VecDeque::new(),
            next_port: FIRST_LOCAL_PORT,
            stats: VsockStats::default(),
        }
    }

    /// The listener's descriptor.
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Live connections (established or not), and host connections still
    /// sending their `CONNECT` line.
    pub fn connection_count(&self) -> usize {
        self.conns.len() + self.pending.len()
    }

    /// Starts taking host connections (the driver is ready).
    pub fn start(&mut self, w: &mut dyn Watch) {
        if !self.listening && w.add(self.listener.as_raw_fd(), EventSet::IN) {
            self.listening = true;
        }
    }

    /// Ends every connection and stops taking new ones (the driver reset
    /// the device).
    pub fn stop(&mut self, w: &mut dyn Watch) {
        if self.listening {
            w.remove(self.listener.as_raw_fd());
            self.listening = false;
        }
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.kill(k, false, w);
        }
        for (fd, p) in std::mem::take(&mut self.pending) {
            // Unwatched before it is closed: epoll forgets closed files.
            w.remove(fd);
            self.owners.remove(&fd);
            drop(p);
        }
        self.rxq.clear();
        self.ctrl.clear();
    }

    /// Whether something has a deadline (the device then runs a timer).
    pub fn has_deadlines(&self) -> bool {
        !self.pending.is_empty() || self.conns.values().any(|c| c.deadline.is_some())
    }

    /// Ends what is past its deadline.
    pub fn expire(&mut self, now: Instant, w: &mut dyn Watch) {
        let late: Vec<RawFd> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in late {
            self.drop_pending(fd, w);
            self.stats.connect_timeouts += 1;
        }
        let late: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for k in late {
            if self.conns.get(&k).is_some_and(|c| c.state == State::Connecting) {
                self.stats.connect_timeouts += 1;
            }
            self.kill(k, true, w);
        }
    }

    fn drop_pending(&mut self, fd: RawFd, w: &mut dyn Watch) {
        if let Some(p) = self.pending.remove(&fd) {
            // Unwatched before it is closed: epoll forgets closed files.
            w.remove(fd);
            self.owners.remove(&fd);
            drop(p);
        }
    }

    /// Handles readiness of a descriptor the muxer owns. Returns false if
    /// it is not one of its own.
    pub fn on_event(&mut self, fd: RawFd, set: EventSet, now: Instant, w: &mut dyn Watch) -> bool {
        if fd == self.listener.as_raw_fd() {
            self.accept(now, w);
            return true;
        }
        match self.owners.get(&fd) {
            Some(Owner::Pending) => self.read_connect_line(fd, now, w),
            Some(Owner::Conn(k)) => {
                let k = *k;
                self.on_stream(k, set, now, w);
            }
            None => return false,
        }
        true
    }

    fn accept(&mut self, now: Instant, w: &mut dyn Watch) {
        for _ in 0..ACCEPT_BATCH {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.stats.muxer_event_fails += 1;
                    self.log.warn(format_args!("accept: {e}"));
                    return;
                }
            };
            if self.connection_count() >= MAX_CONNECTIONS {
                // Closed at once: the host sees its connection end.
                self.stats.conns_refused += 1;
                self.log.warn(format_args!(
                    "{MAX_CONNECTIONS} connections: a host connection is refused"
                ));
                continue;
            }
            if set_nonblocking(&stream).is_err() {
                self.stats.muxer_event_fails += 1;
                continue;
            }
            let fd = stream.as_raw_fd();
            if !w.add(fd, EventSet::IN) {
                self.stats.muxer_event_fails += 1;
                continue;
            }
            self.owners.insert(fd, Owner::Pending);
            self.pending.insert(
                fd,
                PendingHost {
                    stream,
                    line: Vec::new(),
                    deadline: now + CONNECT_TIMEOUT,
                },
            );
        }
    }

    fn read_connect_line(&mut self, fd: RawFd, now: Instant, w: &mut dyn Watch) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut buf = [0u8; MAX_LINE];
        let room = MAX_LINE - p.line.len();
        match p.stream.read(&mut buf[..room]) {
            Ok(0) => return self.drop_pending(fd, w),
            Ok(n) => p.line.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                return;
            }
            Err(_) => return self.drop_pending(fd, w),
        }
        let Some(end) = p.line.iter().position(|&b| b == b'\n') else {
            if p.line.len() >= MAX_LINE {
                self.stats.bad_connect_lines += 1;
                self.drop_pending(fd, w);
            }
            return;
        };
        let Some(port) = parse_connect(&p.line[..end]) else {
            self.stats.bad_connect_lines += 1;
            return self.drop_pending(fd, w);
        };
        let Some(p) = self.pending.remove(&fd) else { return };
        let preface = p.line[end + 1..].to_vec();
        let Some(local) = self.free_local_port(port) else {
            w.remove(fd);
            self.owners.remove(&fd);
            return;
        };
        let conn = Connection::host_initiated(p.stream, local, port, preface, now + CONNECT_TIMEOUT);
        let key = (local, port);
        // Watched for nothing while the guest decides.
        w.remove(fd);
        self.owners.insert(fd, Owner::Conn(key));
        self.conns.insert(key, conn);
        self.stats.conns_added += 1;
        self.sync(key, w);
    }

    fn free_local_port(&mut self, peer: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(p, peer)) {
                return Some(p);
            }
        }
        None
    }

    fn on_stream(&mut self, k: Key, set: EventSet, now: Instant, w: &mut dyn Watch) {
        let Some(c) = self.conns.get_mut(&k) else { return };
        let watched = c.watched.unwrap_or(EventSet::empty());
        let trouble = set.intersects(EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP);
        if watched.contains(EventSet::IN) && (set.contains(EventSet::IN) || trouble) {
            c.set_readable();
        }
        if watched.contains(EventSet::OUT) && (set.contains(EventSet::OUT) || trouble) {
            let before = c.held();
            let verdict = c.on_writable(now);
            if c.held() < before {
                self.stats.tx_flushed_bytes += u64::from(before - c.held());
            }
            if let Verdict::Kill { rst } = verdict {
                self.stats.tx_flush_fails += u64::from(rst);
                return self.kill(k, rst, w);
            }
        }
        self.sync(k, w);
    }

    /// Brings the epoll registration and the receive queue in line with
    /// the connection's state.
    fn sync(&mut self, k: Key, w: &mut dyn Watch) {
        let Some(c) = self.conns.get_mut(&k) else { return };
        let want = c.interest();
        let fd = c.stream.as_raw_fd();
        let ok = match (c.watched, want.is_empty()) {
            (None, true) => true,
            (None, false) => w.add(fd, want),
            (Some(_), true) => w.remove(fd),
            (Some(cur), false) if cur == want => true,
            (Some(_), false) => w.modify(fd, want),
        };
        if ok {
            c.watched = (!want.is_empty()).then_some(want);
        } else {
            self.stats.conn_event_fails += 1;
        }
        if !c.in_rxq && c.has_rx_work() {
            c.in_rxq = true;
            self.rxq.push_back(k);
        }
    }

    /// Ends a connection, telling the guest with an RST if `rst`.
    fn kill(&mut self, k: Key, rst: bool, w: &mut dyn Watch) {
        let Some(c) = self.conns.remove(&k) else { return };
        let fd = c.stream.as_raw_fd();
        if c.watched.is_some() {
            w.remove(fd);
        }
        self.owners.remove(&fd);
        self.stats.conns_removed += 1;
        if rst {
            self.stats.conns_killed += 1;
            self.queue_rst(k.0, k.1);
        }
    }

    fn queue_rst(&mut self, local: u32, peer: u32) {
        if self.ctrl.len() >= MAX_CTRL {
            self.stats.ctrl_dropped += 1;
            return;
        }
        self.ctrl.push_back(Header {
            src_port: local,
            dst_port: peer,
            op: Op::Rst as u16,
            ..self.base_header()
        });
    }

    fn base_header(&self) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            kind: TYPE_STREAM,
            ..Header::default()
        }
    }

    /// Handles a packet the guest sent.
    pub fn on_guest_packet(
        &mut self,
        mem: &GuestMemoryMmap,
        pkt: &TxPacket,
        now: Instant,
        w: &mut dyn Watch,
    ) {
        let h = &pkt.hdr;
        if h.src_cid != self.guest_cid {
            self.stats.bad_packets += 1;
            self.log.warn(format_args!(
                "packet from CID {} dropped (the guest is {})",
                h.src_cid, self.guest_cid
            ));
            return;
        }
        let op = h.operation();
        if h.dst_cid != HOST_CID || h.kind != TYPE_STREAM || op.is_none() {
            self.stats.bad_packets += 1;
            self.log.warn(format_args!(
                "packet to CID {} type {} op {} reset",
                h.dst_cid, h.kind, h.op
            ));
            if op != Some(Op::Rst) {
                self.queue_rst(h.dst_port, h.src_port);
            }
            return;
        }
        let k = (h.dst_port, h.src_port);
        let Some(c) = self.conns.get_mut(&k) else {
            match op {
                Some(Op::Request) => self.guest_connect(h, w),
                Some(Op::Rst) => {}
                _ => self.queue_rst(h.dst_port, h.src_port),
            }
            return;
        };
        let verdict = if c.state == State::Connecting {
            c.update_peer(h);
            match op {
                Some(Op::Response) => {
                    c.established();
                    Verdict::Keep
                }
                Some(Op::Rst) => Verdict::Kill { rst: false },
                _ => Verdict::Kill { rst: true },
            }
        } else {
            let before = c.held();
            let v = c.on_guest(mem, pkt, now);
            if op == Some(Op::Rw) {
                self.stats.tx_bytes_count += u64::from(h.len);
                if c.held() > before {
                    self.stats.tx_buffered_bytes += u64::from(c.held() - before);
                }
            }
            v
        };
        match verdict {
            Verdict::Keep => self.sync(k, w),
            Verdict::Kill { rst } => {
                if rst && op != Some(Op::Shutdown) {
                    self.stats.tx_write_fails += 1;
                }
                self.kill(k, rst, w);
            }
        }
    }

    /// A guest connect to host port `dst_port`: a connection to
    /// `<uds_path>_<port>`, or an RST.
    fn guest_connect(&mut self, h: &Header, w: &mut dyn Watch) {
        if self.connection_count() >= MAX_CONNECTIONS {
            self.stats.conns_refused += 1;
            return self.queue_rst(h.dst_port, h.src_port);
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", h.dst_port));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                let k = (h.dst_port, h.src_port);
                let fd = stream.as_raw_fd();
                self.conns
                    .insert(k, Connection::guest_initiated(stream, h.dst_port, h.src_port, h));
                self.owners.insert(fd, Owner::Conn(k));
                self.stats.conns_added += 1;
                self.sync(k, w);
            }
            Err(e) => {
                self.stats.conns_refused += 1;
                self.log.debug(format_args!(
                    "guest connect to port {}: {}: {e}",
                    h.dst_port,
                    Path::new(&path).display()
                ));
                self.queue_rst(h.dst_port, h.src_port);
            }
        }
    }

    /// Whether the muxer has something for the guest.
    pub fn has_rx_work(&self) -> bool {
        !self.ctrl.is_empty() || !self.rxq.is_empty()
    }

    /// Fills one receive buffer. Returns the bytes written into it, or
    /// None if there was nothing to send (the buffer is then unused).
    pub fn fill_rx(&mut self, mem: &GuestMemoryMmap, regions: &[Region], w: &mut dyn Watch) -> Option<usize> {
        if let Some(h) = self.ctrl.pop_front() {
            return match write_header(mem, regions, &h) {
                Ok(()) => Some(self.count_rx(&h)),
                Err(_) => None,
            };
        }
        // Each connection queued now is asked once: one with nothing for
        // this buffer (a buffer with no room past the header, say) is
        // queued again for the next, not asked again here.
        for _ in 0..self.rxq.len() {
            let Some(k) = self.rxq.pop_front() else { break };
            let base = self.base_header();
            let Some(c) = self.conns.get_mut(&k) else { continue };
            c.in_rxq = false;
            let outcome = c.next_rx(mem, regions, base);
            let (hdr, last) = match outcome {
                RxOutcome::Packet(h) => (h, false),
                RxOutcome::Last(h) => (h, true),
                RxOutcome::Nothing => {
                    self.sync(k, w);
                    continue;
                }
                RxOutcome::Failed => {
                    self.stats.rx_read_fails += 1;
                    self.kill(k, true, w);
                    continue;
                }
            };
            if write_header(mem, regions, &hdr).is_err() {
                self.stats.bad_packets += 1;
            }
            if last {
                self.kill(k, false, w);
                self.stats.conns_killed += 1;
            } else {
                self.sync(k, w);
            }
            return Some(self.count_rx(&hdr));
        }
        None
    }

    fn count_rx(&mut self, h: &Header) -> usize {
        self.stats.rx_packets_count += 1;
        self.stats.rx_bytes_count += u64::from(h.len);
        HDR_LEN + h.len as usize
    }
}

/// Parses `CONNECT <port>`.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let rest = line.strip_prefix(b"CONNECT ")?;
    if rest.is_empty() || rest.len() > 10 || !rest.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(rest).ok()?.parse().ok()
}

/// Connects to a Unix socket without blocking: a listener whose backlog
/// is full refuses (`EAGAIN`) instead of holding up the VMM thread.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let fd: OwnedFd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 4294967296"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"connect 5",
            b"CONNECT 5 6",
            b"CONNECT 0x10",
            b"",
        ] {
            assert_eq!(parse_connect(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
