//! virtio-vsock with mock queues and real Unix sockets on the host side;
//! the event loop is played by hand (a recording [`Watch`]).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::connection::CONN_BUF;
use super::packet::*;
use super::*;
use crate::virtio::test_utils::{Part, irq, memory};
use virtio_queue::desc::split::Descriptor;

const CID: u64 = 42;
const QSIZE: u16 = 256;
const BASES: [u64; 3] = [0x1_0000, 0x2_0000, 0x3_0000];
const TX_DATA: u64 = 0x10_0000;
const RX_DATA: u64 = 0x40_0000;
const RX_BUF: u32 = 4096;

/// A split queue laid out by hand: descriptor table, available ring and
/// used ring each in their own page range.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
}

impl Ring {
    fn at(base: u64) -> Self {
        Self {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
        }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(self.desc as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail as u32), Some(0));
        q.set_used_ring_address(Some(self.used as u32), Some(0));
        q.set_ready(true);
        q
    }
}

/// Makes a chain of `parts` available, its descriptors from `start` on.
fn add_chain(mem: &GuestMemoryMmap, ring: &Ring, start: u16, parts: &[Part]) {
    for (i, &(addr, len, writable)) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let flags = u16::from(!last) | if writable { 2 } else { 0 };
        let next = if last { 0 } else { start + i as u16 + 1 };
        let d = Descriptor::new(addr, len, flags, next);
        mem.write_obj(d, GuestAddress(ring.desc + 16 * u64::from(start + i as u16)))
            .unwrap();
    }
    let idx: u16 = mem.read_obj(GuestAddress(ring.avail + 2)).unwrap();
    let slot = GuestAddress(ring.avail + 4 + 2 * u64::from(idx % QSIZE));
    mem.write_obj(start, slot).unwrap();
    mem.write_obj(idx.wrapping_add(1), GuestAddress(ring.avail + 2))
        .unwrap();
}

/// What the event loop watches, by descriptor.
#[derive(Default)]
struct Recorder(HashMap<RawFd, EventSet>);

impl Watch for Recorder {
    fn add(&mut self, fd: RawFd, set: EventSet) -> bool {
        self.0.insert(fd, set).is_none()
    }
    fn modify(&mut self, fd: RawFd, set: EventSet) -> bool {
        self.0.insert(fd, set).is_some()
    }
    fn remove(&mut self, fd: RawFd) -> bool {
        // As epoll: a file must be unwatched before it is closed.
        assert!(
            std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_ok(),
            "descriptor {fd} closed before it was unwatched"
        );
        self.0.remove(&fd).is_some()
    }
}

struct Rig {
    mem: &'static GuestMemoryMmap,
    q: [Ring; 3],
    dev: Vsock,
    w: Recorder,
    dir: PathBuf,
    uds: PathBuf,
    next_desc: [u16; 3],
    rx_seen: u16,
    rx_addr: HashMap<u32, u64>,
    tx_slot: u64,
}

/// A received packet: header and payload.
type Pkt = (Header, Vec<u8>);

fn tempdir() -> PathBuf {
    let t = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/flatlet-vsock-").unwrap();
    let p = t.as_path().to_path_buf();
    std::mem::forget(t);
    p
}

fn rig() -> Rig {
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(memory()));
    let dir = tempdir();
    let uds = dir.join("v.sock");
    let listener = bind(&uds).unwrap();
    let mut dev = Vsock::new(CID, uds.clone(), listener).unwrap();
    let q = BASES.map(Ring::at);
    let (line, _sink) = irq();
    dev.activate(Activation {
        mem: mem.clone(),
        queues: q.iter().map(Ring::queue).collect(),
        interrupt: VirtioInterrupt::new(std::sync::Arc::new(Default::default()), line),
        acked_features: F_VERSION_1,
    })
    .unwrap();
    let mut w = Recorder::default();
    let kick = dev.kick.as_raw_fd();
    dev.handle(kick, EventSet::IN, &mut w);
    Rig {
        mem,
        q,
        dev,
        w,
        dir,
        uds,
        next_desc: [0; 3],
        rx_seen: 0,
        rx_addr: HashMap::new(),
        tx_slot: 0,
    }
}

fn hdr(op: Op, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        kind: TYPE_STREAM,
        op: op as u16,
        buf_alloc: 1 << 20,
        ..Header::default()
    }
}

impl Rig {
    fn desc(&mut self, q: usize, n: u16) -> u16 {
        let d = self.next_desc[q];
        self.next_desc[q] = (d + n) % QSIZE;
        if self.next_desc[q] < d {
            self.next_desc[q] = n;
            return 0;
        }
        d
    }

    /// The guest sends a raw chain.
    fn send_raw(&mut self, parts: &[(u64, u32, bool)]) {
        let d = self.desc(TX, parts.len() as u16);
        add_chain(self.mem, &self.q[TX], d, parts);
        self.dev.process_tx(&mut self.w);
        self.dev.process_rx(&mut self.w);
    }

    /// The guest sends a packet (header and payload in one buffer).
    fn send(&mut self, h: Header, payload: &[u8]) {
        let addr = TX_DATA + (self.tx_slot % 32) * 0x1_1000;
        self.tx_slot += 1;
        let h = Header {
            len: payload.len() as u32,
            ..h
        };
        self.mem.write_slice(&h.to_bytes(), GuestAddress(addr)).unwrap();
        self.mem
            .write_slice(payload, GuestAddress(addr + HDR_LEN as u64))
            .unwrap();
        self.send_raw(&[(addr, (HDR_LEN + payload.len()) as u32, false)]);
    }

    /// The guest posts `n` receive buffers of `size`.
    fn post_rx_sized(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let d = self.desc(RX, 1);
            assert!(size <= 0x2000);
            let addr = RX_DATA + u64::from(d) * 0x2000;
            self.rx_addr.insert(u32::from(d), addr);
            add_chain(self.mem, &self.q[RX], d, &[(addr, size, true)]);
        }
        self.dev.process_rx(&mut self.w);
    }

    fn post_rx(&mut self, n: usize) {
        self.post_rx_sized(n, RX_BUF);
    }

    /// Packets the device put in the receive queue since the last call.
    fn received(&mut self) -> Vec<Pkt> {
        let used = self.q[RX].used;
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        let mut out = Vec::new();
        while self.rx_seen != idx {
            let i = u64::from(self.rx_seen % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(used + 4 + 8 * i)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(used + 8 + 8 * i)).unwrap();
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let Some(&addr) = self.rx_addr.get(&id) else {
                panic!("used id {id} len {len} was never posted: {:?}", self.dev.stats())
            };
            let mut raw = [0u8; HDR_LEN];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let h = Header::parse(&raw);
            assert_eq!(
                len as usize,
                HDR_LEN + h.len as usize,
                "used length of {h:?} (id {id}, entry {}, used idx {idx}): {:?}",
                self.rx_seen,
                self.dev.stats()
            );
            let mut payload = vec![0u8; h.len as usize];
            self.mem
                .read_slice(&mut payload, GuestAddress(addr + HDR_LEN as u64))
                .unwrap();
            out.push((h, payload));
        }
        out
    }

    /// The event loop reports every watched socket as ready, a few
    /// rounds (the device copes with wake-ups that find nothing).
    fn poll(&mut self) {
        for _ in 0..4 {
            let watched: Vec<(RawFd, EventSet)> = self.w.0.iter().map(|(&fd, &set)| (fd, set)).collect();
            for (fd, set) in watched {
                if self.w.0.contains_key(&fd) {
                    self.dev.handle(fd, set, &mut self.w);
                }
            }
        }
    }

    fn stats(&self) -> VsockStats {
        self.dev.stats()
    }

    /// A guest connection to host port `port`, through a listener at
    /// `<uds>_<port>`; returns the host's end.
    fn guest_connect(&mut self, listener: &UnixListener, guest_port: u32, port: u32) -> UnixStream {
        self.send(hdr(Op::Request, guest_port, port), &[]);
        let (s, _) = listener.accept().unwrap();
        let got = self.received();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0.op, Op::Response as u16);
        assert_eq!((got[0].0.src_port, got[0].0.dst_port), (port, guest_port));
        s
    }
}

fn port_listener(r: &Rig, port: u32) -> UnixListener {
    let mut p = r.uds.clone().into_os_string();
    p.push(format!("_{port}"));
    UnixListener::bind(p).unwrap()
}

#[test]
fn header_round_trip_and_config_space() {
    let h = Header {
        src_cid: 0x1122_3344_5566_7788,
        dst_cid: 2,
        src_port: 7,
        dst_port: 9,
        len: 100,
        kind: 1,
        op: 5,
        flags: 3,
        buf_alloc: 65536,
        fwd_cnt: 12345,
    };
    assert_eq!(Header::parse(&h.to_bytes()), h);
    assert_eq!(&h.to_bytes()[..8], &0x1122_3344_5566_7788u64.to_le_bytes());
    let r = rig();
    let mut cid = [0u8; 8];
    r.dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), CID);
    assert_eq!(r.dev.device_type(), 19);
    assert_eq!(r.dev.queue_max_sizes().len(), 3);
}

#[test]
fn malformed_chains_are_returned_counted_and_never_answered_with_data() {
    let mut r = rig();
    r.post_rx(8);
    // Shorter than a header.
    r.send_raw(&[(TX_DATA, 20, false)]);
    // A device-writable part.
    r.send_raw(&[(TX_DATA, 44, false), (TX_DATA + 0x1000, 16, true)]);
    // len beyond the chain.
    let h = Header {
        len: 100,
        ..hdr(Op::Rw, 1, 2)
    };
    r.mem.write_slice(&h.to_bytes(), GuestAddress(TX_DATA)).unwrap();
    r.send_raw(&[(TX_DATA, 44 + 50, false)]);
    // len beyond any packet.
    let h = Header {
        len: MAX_PAYLOAD + 1,
        ..hdr(Op::Rw, 1, 2)
    };
    r.mem.write_slice(&h.to_bytes(), GuestAddress(TX_DATA)).unwrap();
    r.send_raw(&[(TX_DATA, 44 + MAX_PAYLOAD + 1, false)]);
    // A control packet with a payload.
    let h = Header {
        len: 4,
        ..hdr(Op::Request, 1, 2)
    };
    r.mem.write_slice(&h.to_bytes(), GuestAddress(TX_DATA)).unwrap();
    r.send_raw(&[(TX_DATA, 48, false)]);
    // Outside guest memory.
    r.send_raw(&[(crate::virtio::test_utils::MEM_SIZE - 10, 44, false)]);
    let s = r.stats();
    assert_eq!(s.tx_packets_count, 6);
    assert_eq!(s.bad_packets + s.invalid_chains, 6, "{s:?}");
    assert!(r.received().is_empty(), "nothing is answered");
    assert_eq!(r.dev.connection_count(), 0);
    // Every chain was returned.
    let used = r.q[TX].used;
    let idx: u16 = r.mem.read_obj(GuestAddress(used + 2)).unwrap();
    assert_eq!(idx, 6);
}

#[test]
fn bad_addresses_and_operations_get_resets_wrong_source_is_dropped() {
    let mut r = rig();
    r.post_rx(8);
    // Not from the guest's CID: dropped silently.
    r.send(
        Header {
            src_cid: 99,
            ..hdr(Op::Request, 1, 2)
        },
        &[],
    );
    assert!(r.received().is_empty());
    // To another CID, a datagram type, an unknown operation: RST.
    r.send(
        Header {
            dst_cid: 7,
            ..hdr(Op::Request, 1, 2)
        },
        &[],
    );
    r.send(
        Header {
            kind: 2,
            ..hdr(Op::Request, 1, 2)
        },
        &[],
    );
    let mut bogus = hdr(Op::Request, 1, 2);
    bogus.op = 99;
    r.send(bogus, &[]);
    // Data for a connection that does not exist: RST. An RST for one: nothing.
    r.send(hdr(Op::Rw, 5, 6), b"data");
    r.send(hdr(Op::Rst, 5, 6), &[]);
    let got = r.received();
    assert_eq!(got.len(), 4, "{got:?}");
    for (h, p) in &got {
        assert_eq!(h.op, Op::Rst as u16);
        assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, CID));
        assert!(p.is_empty());
    }
    assert_eq!((got[3].0.src_port, got[3].0.dst_port), (6, 5));
    assert_eq!(r.stats().bad_packets, 4);
}

#[test]
fn guest_connect_without_a_listener_is_reset() {
    let mut r = rig();
    r.post_rx(2);
    r.send(hdr(Op::Request, 1234, 5000), &[]);
    let got = r.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, Op::Rst as u16);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (5000, 1234));
    assert_eq!(r.stats().conns_refused, 1);
    assert_eq!(r.dev.connection_count(), 0);
}

#[test]
fn guest_connect_then_data_both_ways() {
    let mut r = rig();
    let l = port_listener(&r, 5000);
    r.post_rx(4);
    let mut host = r.guest_connect(&l, 1234, 5000);
    r.send(hdr(Op::Rw, 1234, 5000), b"hello host\n");
    let mut buf = [0u8; 11];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host\n");
    host.write_all(b"hello guest").unwrap();
    r.poll();
    let got = r.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0.op, Op::Rw as u16);
    assert_eq!(got[0].1, b"hello guest");
    assert_eq!(got[0].0.buf_alloc, CONN_BUF);
    assert_eq!(got[0].0.fwd_cnt, 11, "the host forwarded 11 bytes");
    assert_eq!(r.stats().rx_bytes_count, 11);
    assert_eq!(r.stats().tx_bytes_count, 11);
}

/// Found by the fuzz target: a receive buffer with room for a header
/// only, while a connection had host data, kept the VMM thread asking
/// that connection again and again.
#[test]
fn a_header_only_receive_buffer_does_not_stall_the_device() {
    let mut r = rig();
    let l = port_listener(&r, 5000);
    r.post_rx(1);
    let mut host = r.guest_connect(&l, 1234, 5000);
    host.write_all(b"hello guest").unwrap();
    r.post_rx_sized(1, HDR_LEN as u32);
    r.poll();
    assert!(r.received().is_empty(), "no room for data: the buffer waits");
    // A control packet fits it; then data flows into a real buffer.
    r.send(hdr(Op::CreditRequest, 1234, 5000), &[]);
    let got = r.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0.op, Op::CreditUpdate as u16);
    r.post_rx(1);
    r.poll();
    let got = r.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1, b"hello guest");
}

#[test]
fn host_connect_line_request_response_ok() {
    let mut r = rig();
    r.post_rx(4);
    let mut host = UnixStream::connect(&r.uds).unwrap();
    r.poll();
    host.write_all(b"CONNECT 52\nearly").unwrap();
    r.poll();
    let got = r.received();
    assert_eq!(got.len(), 1, "{got:?}");
    let req = got[0].0;
    assert_eq!(req.op, Op::Request as u16);
    assert_eq!(req.dst_port, 52);
    assert!(req.src_port >= 1 << 30);
    // The guest accepts.
    r.send(hdr(Op::Response, 52, req.src_port), &[]);
    r.poll();
    let mut line = vec![0u8; format!("OK {}\n", req.src_port).len()];
    host.read_exact(&mut line).unwrap();
    assert_eq!(String::from_utf8(line).unwrap(), format!("OK {}\n", req.src_port));
    // What the host sent after its line reaches the guest first.
    let got = r.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, b"early");
    host.write_all(b" and late").unwrap();
    r.poll();
    assert_eq!(r.received()[0].1, b" and late");
}

#[test]
fn host_connect_refused_by_the_guest_closes_the_stream() {
    let mut r = rig();
    r.post_rx(4);
    let mut host = UnixStream::connect(&r.uds).unwrap();
    r.poll();
    host.write_all(b"CONNECT 99\n").unwrap();
    r.poll();
    let req = r.received()[0].0;
    r.send(hdr(Op::Rst, 99, req.src_port), &[]);
    let mut buf = [0u8; 8];
    assert_eq!(host.read(&mut buf).unwrap(), 0, "closed, no OK");
    assert_eq!(r.dev.connection_count(), 0);
}

#[test]
fn bad_lines_and_silent_hosts_are_dropped() {
    let mut r = rig();
    let mut bad = UnixStream::connect(&r.uds).unwrap();
    let mut silent = UnixStream::connect(&r.uds).unwrap();
    r.poll();
    bad.write_all(b"HELLO 5\n").unwrap();
    r.poll();
    let mut buf = [0u8; 8];
    assert_eq!(bad.read(&mut buf).unwrap(), 0);
    assert_eq!(r.stats().bad_connect_lines, 1);
    assert_eq!(r.dev.connection_count(), 1);
    assert!(r.dev.muxer.has_deadlines());
    // The guest never answers a request either.
    r.post_rx(2);
    let mut host = UnixStream::connect(&r.uds).unwrap();
    r.poll();
    host.write_all(b"CONNECT 7\n").unwrap();
    r.poll();
    assert_eq!(r.received().len(), 1);
    r.dev
        .muxer
        .expire(Instant::now() + Duration::from_secs(3), &mut r.w);
    assert_eq!(silent.read(&mut buf).unwrap(), 0);
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    assert_eq!(r.dev.connection_count(), 0);
    assert_eq!(r.stats().connect_timeouts, 2);
    assert!(!r.dev.muxer.has_deadlines());
    assert!(
        r.w.0.len() <= 5,
        "only the listener and device events stay watched"
    );
}

#[test]
fn host_bytes_wait_for_guest_credit() {
    let mut r = rig();
    let l = port_listener(&r, 6000);
    r.post_rx(8);
    // The guest's buffer holds 10 bytes.
    r.send(
        Header {
            buf_alloc: 10,
            ..hdr(Op::Request, 1, 6000)
        },
        &[],
    );
    let (mut host, _) = l.accept().unwrap();
    assert_eq!(r.received()[0].0.op, Op::Response as u16);
    host.write_all(&[7u8; 100]).unwrap();
    r.poll();
    let got = r.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.len(), 10, "no more than the credit");
    // Not reading: the socket is not watched for input.
    let listener = r.dev.muxer.listener_fd();
    assert!(
        r.w.0
            .iter()
            .all(|(&fd, set)| fd == listener || !set.contains(EventSet::IN)),
        "a socket the guest has no credit for is not watched for input"
    );
    r.poll();
    assert!(r.received().is_empty());
    // The guest consumed 4 bytes.
    r.send(
        Header {
            buf_alloc: 10,
            fwd_cnt: 4,
            ..hdr(Op::CreditUpdate, 1, 6000)
        },
        &[],
    );
    r.poll();
    let got = r.received();
    assert_eq!(got.iter().map(|p| p.1.len()).sum::<usize>(), 4);
}

#[test]
fn a_guest_sending_beyond_its_credit_is_reset() {
    let mut r = rig();
    let l = port_listener(&r, 6001);
    r.post_rx(8);
    let host = r.guest_connect(&l, 1, 6001);
    // The host reads nothing: its socket fills, then flatlet holds up
    // to CONN_BUF bytes, then the guest is over its credit.
    let chunk = vec![0x5au8; 32 * 1024];
    let mut sent = 0usize;
    let mut reset = false;
    for _ in 0..64 {
        r.post_rx(1);
        r.send(hdr(Op::Rw, 1, 6001), &chunk);
        sent += chunk.len();
        if r.received().iter().any(|p| p.0.op == Op::Rst as u16) {
            reset = true;
            break;
        }
    }
    assert!(reset, "reset after {sent} bytes");
    assert_eq!(r.dev.connection_count(), 0);
    drop(host);
}

#[test]
fn a_slow_host_reader_loses_nothing_and_gets_credit_back() {
    let mut r = rig();
    let l = port_listener(&r, 6002);
    r.post_rx(16);
    let mut host = r.guest_connect(&l, 1, 6002);
    host.set_nonblocking(true).unwrap();
    let mut expected = Vec::new();
    let mut got = Vec::new();
    let mut fwd = 0u32;
    let mut sent = 0u32;
    let mut n = 0u8;
    let mut buf = vec![0u8; 65536];
    for round in 0..300 {
        // The guest sends within the credit it was given.
        let credit = CONN_BUF - (sent - fwd);
        if credit >= 8192 {
            let data: Vec<u8> = (0..8192).map(|i| n.wrapping_add(i as u8)).collect();
            n = n.wrapping_add(1);
            r.send(hdr(Op::Rw, 1, 6002), &data);
            expected.extend_from_slice(&data);
            sent += 8192;
        }
        // The host reads nothing for 100 rounds, then every fifth.
        if round >= 100 && round % 5 == 0 {
            while let Ok(k) = host.read(&mut buf) {
                if k == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..k]);
            }
        }
        r.poll();
        for (h, _) in r.received() {
            assert_ne!(h.op, Op::Rst as u16);
            fwd = h.fwd_cnt;
        }
        r.post_rx(1);
    }
    host.set_nonblocking(false).unwrap();
    while got.len() < expected.len() {
        r.poll();
        let k = host.read(&mut buf).unwrap();
        got.extend_from_slice(&buf[..k]);
    }
    assert_eq!(got, expected);
    let s = r.stats();
    assert!(
        s.tx_buffered_bytes > 0 && s.tx_flushed_bytes == s.tx_buffered_bytes,
        "{s:?}"
    );
}

#[test]
fn shutdowns_and_resets() {
    let mut r = rig();
    let l = port_listener(&r, 7000);
    r.post_rx(8);
    // The host closes: the guest hears SHUTDOWN (send).
    let host = r.guest_connect(&l, 1, 7000);
    drop(host);
    r.poll();
    let got = r.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0.op, Op::Shutdown as u16);
    assert_eq!(got[0].0.flags, SHUTDOWN_SEND);
    // The guest shuts down both ways: RST, connection gone.
    r.send(
        Header {
            flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
            ..hdr(Op::Shutdown, 1, 7000)
        },
        &[],
    );
    assert_eq!(r.received()[0].0.op, Op::Rst as u16);
    assert_eq!(r.dev.connection_count(), 0);
    // The guest shuts down sending only: the host reads the data, then EOF.
    let mut host = r.guest_connect(&l, 2, 7000);
    r.send(hdr(Op::Rw, 2, 7000), b"last words");
    r.send(
        Header {
            flags: SHUTDOWN_SEND,
            ..hdr(Op::Shutdown, 2, 7000)
        },
        &[],
    );
    let mut all = Vec::new();
    host.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"last words");
    assert_eq!(r.dev.connection_count(), 1, "the host may still send");
    // A guest RST ends it without an answer.
    r.send(hdr(Op::Rst, 2, 7000), &[]);
    assert!(r.received().is_empty());
    assert_eq!(r.dev.connection_count(), 0);
}

#[test]
fn hundreds_of_connections_at_once() {
    let mut r = rig();
    let l = port_listener(&r, 8000);
    let mut hosts = Vec::new();
    for p in 0..300u32 {
        r.post_rx(1);
        hosts.push(r.guest_connect(&l, 10_000 + p, 8000));
    }
    assert_eq!(r.dev.connection_count(), 300);
    for (i, h) in hosts.iter_mut().enumerate() {
        h.write_all(format!("{i}").as_bytes()).unwrap();
    }
    r.post_rx(250);
    r.poll();
    let mut got = r.received();
    r.post_rx(60);
    r.poll();
    got.extend(r.received());
    assert_eq!(got.len(), 300);
    for (h, p) in got {
        assert_eq!(String::from_utf8(p).unwrap(), format!("{}", h.dst_port - 10_000));
    }
}

#[test]
fn the_connection_limit_holds() {
    let mut r = rig();
    let l = port_listener(&r, 8001);
    l.set_nonblocking(true).unwrap();
    let mut hosts = Vec::new();
    r.post_rx(250);
    for p in 0..MAX_CONNECTIONS as u32 + 5 {
        r.send(hdr(Op::Request, p, 8001), &[]);
        while let Ok((s, _)) = l.accept() {
            hosts.push(s);
        }
        if p % 200 == 0 {
            r.received();
            r.post_rx(200);
        }
    }
    assert_eq!(r.dev.connection_count(), MAX_CONNECTIONS, "{:?}", r.stats());
    assert_eq!(r.stats().conns_refused, 5);
}

#[test]
fn a_driver_reset_ends_every_connection() {
    let mut r = rig();
    let l = port_listener(&r, 9000);
    r.post_rx(4);
    let mut host = r.guest_connect(&l, 1, 9000);
    r.dev.reset();
    let kick = r.dev.kick.as_raw_fd();
    r.dev.handle(kick, EventSet::IN, &mut r.w);
    let mut buf = [0u8; 4];
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    assert_eq!(r.dev.connection_count(), 0);
    assert!(
        r.w.0.is_empty(),
        "nothing of the device's stays watched: {:?}",
        r.w.0
    );
    let _ = std::fs::remove_dir_all(&r.dir);
}

#[test]
fn bind_does_not_clobber() {
    let dir = tempdir();
    let file = dir.join("file");
    std::fs::write(&file, b"keep").unwrap();
    assert!(matches!(bind(&file), Err(MuxerError::NotASocket(_))));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    let s = dir.join("s");
    let live = bind(&s).unwrap();
    assert!(matches!(bind(&s), Err(MuxerError::InUse(_))));
    drop(live);
    bind(&s).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_restore_tells_the_driver_its_connections_are_gone() {
    let mut r = rig();
    // No event buffer yet: nothing to deliver it in.
    assert!(!r.dev.transport_reset());
    let ev = &r.q[EV];
    let at = RX_DATA + 0x10_0000;
    r.mem.write_obj(0xffff_ffffu32, GuestAddress(at)).unwrap();
    add_chain(r.mem, ev, 0, &[(at, 8, true)]);
    // A device-readable event buffer is refused, and returned empty.
    add_chain(r.mem, ev, 1, &[(at + 0x100, 8, false)]);
    assert!(r.dev.transport_reset());
    assert_eq!(
        r.mem.read_obj::<u32>(GuestAddress(at)).unwrap(),
        0,
        "TRANSPORT_RESET"
    );
    let used_idx: u16 = r.mem.read_obj(GuestAddress(ev.used + 2)).unwrap();
    let used_len: u32 = r.mem.read_obj(GuestAddress(ev.used + 8)).unwrap();
    assert_eq!((used_idx, used_len), (1, 4));
    assert!(!r.dev.transport_reset());
    let used_idx: u16 = r.mem.read_obj(GuestAddress(ev.used + 2)).unwrap();
    let used_len: u32 = r.mem.read_obj(GuestAddress(ev.used + 16)).unwrap();
    assert_eq!((used_idx, used_len), (2, 0));
    assert_eq!(r.dev.stats().invalid_chains, 1);
}
