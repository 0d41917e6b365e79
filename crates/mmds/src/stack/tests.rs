//! The stack fed crafted frames, as a guest would send them, and the
//! frames it answers with, checked field by field.

use super::*;
use serde_json::json;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{ArpOperation, EthernetRepr, IpAddress, Ipv4Repr, TcpControl, TcpRepr, TcpSeqNumber};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const ANY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];

fn store(version: MmdsVersion) -> Arc<Mutex<Mmds>> {
    let mut m = Mmds::default();
    m.put(json!({"latest": {"meta-data": {"ami-id": "ami-12345678", "big": "x".repeat(20000)}}}))
        .unwrap();
    m.configure(version, false);
    Arc::new(Mutex::new(m))
}

use crate::store::MmdsVersion;

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(GUEST_MAC),
        source_protocol_addr: GUEST_IP,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let mut buf = vec![0; 14 + arp.buffer_len()];
    let mut eth = EthernetFrame::new_unchecked(&mut buf);
    EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut eth);
    arp.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
    buf
}

fn ip_frame(
    dst_mac: [u8; 6],
    dst: Ipv4Addr,
    proto: IpProtocol,
    payload_len: usize,
    fill: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let ip = Ipv4Repr {
        src_addr: GUEST_IP,
        dst_addr: dst,
        next_header: proto,
        payload_len,
        hop_limit: 64,
    };
    let mut buf = vec![0; 14 + 20 + payload_len];
    let mut eth = EthernetFrame::new_unchecked(&mut buf);
    EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress(dst_mac),
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut eth);
    let mut packet = Ipv4Packet::new_unchecked(eth.payload_mut());
    ip.emit(&mut packet, &ChecksumCapabilities::default());
    fill(packet.payload_mut());
    buf
}

/// A TCP segment the guest sends.
struct Seg<'a> {
    port: u16,
    control: TcpControl,
    seq: u32,
    ack: Option<u32>,
    payload: &'a [u8],
}

fn tcp_frame(dst: Ipv4Addr, s: &Seg<'_>) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: s.port,
        dst_port: PORT,
        control: s.control,
        seq_number: TcpSeqNumber(s.seq as i32),
        ack_number: s.ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: 65535,
        window_scale: None,
        max_seg_size: (s.control == TcpControl::Syn).then_some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: s.payload,
    };
    ip_frame(MMDS_MAC, dst, IpProtocol::Tcp, repr.buffer_len(), |buf| {
        repr.emit(
            &mut TcpPacket::new_unchecked(buf),
            &IpAddress::Ipv4(GUEST_IP),
            &IpAddress::Ipv4(dst),
            &ChecksumCapabilities::default(),
        );
    })
}

/// A TCP segment MMDS sent, checked on the way.
#[derive(Debug)]
struct Reply {
    control: TcpControl,
    seq: u32,
    ack: Option<u32>,
    payload: Vec<u8>,
    dst_port: u16,
}

fn parse_tcp(frame: &[u8], mmds_ip: Ipv4Addr) -> Reply {
    let eth = EthernetFrame::new_checked(frame).unwrap();
    assert_eq!(eth.src_addr(), EthernetAddress(MMDS_MAC));
    assert_eq!(eth.dst_addr(), EthernetAddress(GUEST_MAC));
    assert_eq!(eth.ethertype(), EthernetProtocol::Ipv4);
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert!(ip.verify_checksum());
    assert_eq!((ip.src_addr(), ip.dst_addr()), (mmds_ip, GUEST_IP));
    let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
    let repr = TcpRepr::parse(
        &tcp,
        &IpAddress::Ipv4(mmds_ip),
        &IpAddress::Ipv4(GUEST_IP),
        &ChecksumCapabilities::default(),
    )
    .unwrap();
    assert_eq!(repr.src_port, PORT);
    Reply {
        control: repr.control,
        seq: repr.seq_number.0 as u32,
        ack: repr.ack_number.map(|a| a.0 as u32),
        payload: repr.payload.to_vec(),
        dst_port: repr.dst_port,
    }
}

/// A guest with an MMDS stack on its interface, and a clock.
struct Guest {
    stack: MmdsStack,
    now: Instant,
    ip: Ipv4Addr,
}

impl Guest {
    fn new(version: MmdsVersion) -> Self {
        Self::at(DEFAULT_IPV4, store(version))
    }

    fn at(ip: Ipv4Addr, mmds: Arc<Mutex<Mmds>>) -> Self {
        Self {
            stack: MmdsStack::new(ip, mmds),
            now: Instant::now(),
            ip,
        }
    }

    fn send(&mut self, frame: &[u8]) -> bool {
        self.stack.detour_tx(frame, self.now)
    }

    fn frames(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0; MAX_FRAME];
        while let Some(n) = self.stack.next_rx_frame(&mut buf, self.now) {
            out.push(buf[..n].to_vec());
        }
        out
    }

    fn segs(&mut self) -> Vec<Reply> {
        let ip = self.ip;
        self.frames().iter().map(|f| parse_tcp(f, ip)).collect()
    }

    fn tcp(&mut self, s: &Seg<'_>) -> Vec<Reply> {
        let frame = tcp_frame(self.ip, s);
        assert!(self.send(&frame), "TCP to MMDS is taken");
        self.segs()
    }

    /// Learns MMDS's MAC, as a guest's first ARP does.
    fn arp(&mut self) {
        assert!(self.send(&arp_request(self.ip)));
        assert_eq!(self.frames().len(), 1);
    }
}

/// An open connection from the guest's side.
struct Conn {
    port: u16,
    seq: u32,
    ack: u32,
}

impl Guest {
    fn connect(&mut self, port: u16) -> Conn {
        let segs = self.tcp(&Seg {
            port,
            control: TcpControl::Syn,
            seq: 1000,
            ack: None,
            payload: &[],
        });
        assert_eq!(segs.len(), 1, "{segs:?}");
        let syn_ack = &segs[0];
        assert_eq!(syn_ack.control, TcpControl::Syn);
        assert_eq!(syn_ack.ack, Some(1001));
        assert_eq!(syn_ack.dst_port, port);
        let conn = Conn {
            port,
            seq: 1001,
            ack: syn_ack.seq.wrapping_add(1),
        };
        let segs = self.tcp(&Seg {
            port,
            control: TcpControl::None,
            seq: conn.seq,
            ack: Some(conn.ack),
            payload: &[],
        });
        assert!(segs.is_empty(), "nothing answers a bare ACK: {segs:?}");
        conn
    }

    /// Sends `data` and collects MMDS's answer until it has sent
    /// `Content-Length` bytes of body (acknowledging as a guest does).
    fn exchange(&mut self, c: &mut Conn, data: &[u8]) -> String {
        let mut segs = self.tcp(&Seg {
            port: c.port,
            control: TcpControl::Psh,
            seq: c.seq,
            ack: Some(c.ack),
            payload: data,
        });
        c.seq = c.seq.wrapping_add(data.len() as u32);
        let mut got = Vec::new();
        for _ in 0..200 {
            for s in &segs {
                assert_eq!(s.ack, Some(c.seq), "MMDS acknowledges the request");
                if !s.payload.is_empty() {
                    assert_eq!(s.seq, c.ack, "in order");
                    c.ack = c.ack.wrapping_add(s.payload.len() as u32);
                    got.extend_from_slice(&s.payload);
                }
                if s.control == TcpControl::Fin {
                    c.ack = c.ack.wrapping_add(1);
                }
            }
            if response_complete(&got) {
                break;
            }
            segs = self.tcp(&Seg {
                port: c.port,
                control: TcpControl::None,
                seq: c.seq,
                ack: Some(c.ack),
                payload: &[],
            });
        }
        String::from_utf8(got).unwrap()
    }
}

fn response_complete(raw: &[u8]) -> bool {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    body.len() >= len
}

fn body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").unwrap().1
}

#[test]
fn arp_request_gets_a_reply() {
    let mut g = Guest::new(MmdsVersion::V1);
    assert!(g.send(&arp_request(DEFAULT_IPV4)));
    let frames = g.frames();
    assert_eq!(frames.len(), 1);
    let eth = EthernetFrame::new_checked(&frames[0][..]).unwrap();
    assert_eq!(eth.dst_addr(), EthernetAddress(GUEST_MAC));
    assert_eq!(eth.src_addr(), EthernetAddress(MMDS_MAC));
    assert_eq!(eth.ethertype(), EthernetProtocol::Arp);
    let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).unwrap()).unwrap();
    assert_eq!(
        arp,
        ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: EthernetAddress(MMDS_MAC),
            source_protocol_addr: DEFAULT_IPV4,
            target_hardware_addr: EthernetAddress(GUEST_MAC),
            target_protocol_addr: GUEST_IP,
        }
    );
    assert!(!g.stack.has_pending());
    assert_eq!(g.stack.counters().tx_frames, 1);
}

#[test]
fn frames_not_for_mmds_pass() {
    let mut g = Guest::new(MmdsVersion::V1);
    // ARP for another address, IPv4 elsewhere, garbage, a runt: not taken.
    assert!(!g.send(&arp_request(Ipv4Addr::new(10, 0, 0, 1))));
    let elsewhere = Seg {
        port: 5000,
        control: TcpControl::Syn,
        seq: 1,
        ack: None,
        payload: &[],
    };
    assert!(!g.send(&tcp_frame(Ipv4Addr::new(10, 0, 0, 1), &elsewhere)));
    assert!(!g.send(&[0xff; 10]));
    assert!(!g.send(&[]));
    // UDP to MMDS is taken and dropped, as are bad checksums.
    let udp = ip_frame(MMDS_MAC, DEFAULT_IPV4, IpProtocol::Udp, 8, |_| {});
    assert!(g.send(&udp));
    let mut bad = tcp_frame(DEFAULT_IPV4, &elsewhere);
    bad[14 + 10] ^= 0xff; // the IPv4 header checksum
    assert!(g.send(&bad));
    assert!(g.frames().is_empty());
    let c = g.stack.counters();
    assert_eq!((c.rx_frames, c.rx_dropped), (2, 2));
    // Nothing was even set up for frames that were not MMDS's.
    assert!(g.stack.inner.is_none());
}

#[test]
fn v1_get_over_tcp() {
    let mut g = Guest::new(MmdsVersion::V1);
    g.arp();
    let mut c = g.connect(40000);
    let resp = g.exchange(
        &mut c,
        b"GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    assert!(resp.contains("Content-Type: text/plain\r\n"));
    assert_eq!(body(&resp), "ami-12345678");
    // Keep-alive: a second request on the same connection, in JSON.
    let resp = g.exchange(
        &mut c,
        b"GET /latest/meta-data/ami-id HTTP/1.1\r\nAccept: application/json\r\n\r\n",
    );
    assert_eq!(body(&resp), "\"ami-12345678\"");
    // A large value takes many segments, paced by the guest's ACKs.
    let resp = g.exchange(&mut c, b"GET /latest/meta-data/big HTTP/1.1\r\n\r\n");
    assert_eq!(body(&resp).len(), 20000);
    assert_eq!(g.stack.counters().connections, 1);
    assert_eq!(g.stack.counters().http.requests, 3);
}

#[test]
fn v2_token_then_get_and_a_bad_token() {
    let mut g = Guest::new(MmdsVersion::V2);
    g.arp();
    let mut c = g.connect(40001);
    let resp = g.exchange(&mut c, b"GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 401 "), "{resp}");
    let resp = g.exchange(
        &mut c,
        b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
    assert!(resp.contains("X-metadata-token-ttl-seconds: 5\r\n"));
    let token = body(&resp).to_string();
    let get = format!("GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n");
    let resp = g.exchange(&mut c, get.as_bytes());
    assert_eq!(body(&resp), "ami-12345678");
    let resp = g.exchange(&mut c, b"GET /latest HTTP/1.1\r\nX-metadata-token: AAAA\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 401 "), "{resp}");
    // The token expires with the clock.
    g.now += Duration::from_secs(6);
    let resp = g.exchange(&mut c, get.as_bytes());
    assert!(resp.starts_with("HTTP/1.1 401 "), "{resp}");
    let h = g.stack.counters().http;
    assert_eq!((h.no_token, h.invalid_token, h.tokens), (1, 2, 1));
}

#[test]
fn guest_closes_and_server_closes() {
    let mut g = Guest::new(MmdsVersion::V1);
    g.arp();
    // The guest closes: MMDS acknowledges and closes its side.
    let c = g.connect(40002);
    let segs = g.tcp(&Seg {
        port: c.port,
        control: TcpControl::Fin,
        seq: c.seq,
        ack: Some(c.ack),
        payload: &[],
    });
    assert!(!segs.is_empty());
    assert!(segs.iter().all(|s| s.ack == Some(c.seq + 1)));
    let fin = segs
        .iter()
        .find(|s| s.control == TcpControl::Fin)
        .expect("MMDS closes too");
    let segs = g.tcp(&Seg {
        port: c.port,
        control: TcpControl::None,
        seq: c.seq + 1,
        ack: Some(fin.seq + 1),
        payload: &[],
    });
    assert!(segs.is_empty());
    assert_eq!(g.stack.open_connections(), 0, "the slot listens again");

    // `Connection: close`: MMDS answers, then sends its FIN.
    let mut c = g.connect(40003);
    let resp = g.exchange(&mut c, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(resp.contains("Connection: close\r\n"));
    // The guest closes its side (MMDS's FIN is counted in `c.ack`).
    let segs = g.tcp(&Seg {
        port: c.port,
        control: TcpControl::Fin,
        seq: c.seq,
        ack: Some(c.ack),
        payload: &[],
    });
    assert!(segs.iter().all(|s| s.ack == Some(c.seq + 1)), "{segs:?}");
    assert_eq!(g.stack.open_connections(), 0);
    // A segment on a closed connection gets a reset.
    let segs = g.tcp(&Seg {
        port: c.port,
        control: TcpControl::Psh,
        seq: c.seq + 1,
        ack: Some(c.ack),
        payload: b"GET / HTTP/1.1\r\n\r\n",
    });
    assert!(segs.iter().all(|s| s.control == TcpControl::Rst), "{segs:?}");
    assert_eq!(g.stack.open_connections(), 0);
}

#[test]
fn syn_flood_stays_bounded() {
    let mut g = Guest::new(MmdsVersion::V1);
    g.arp();
    for port in 0..1000u16 {
        let _ = g.tcp(&Seg {
            port: 10000 + port,
            control: TcpControl::Syn,
            seq: 1,
            ack: None,
            payload: &[],
        });
    }
    let c = g.stack.counters();
    assert_eq!(g.stack.open_connections(), MAX_CONNECTIONS);
    assert_eq!(c.connections, MAX_CONNECTIONS as u64);
    assert_eq!(c.syn_refused, 1000 - MAX_CONNECTIONS as u64);
    // Frames for the guest never pile up past the bound, even unread.
    for port in 0..200u16 {
        let frame = tcp_frame(
            DEFAULT_IPV4,
            &Seg {
                port: 20000 + port,
                control: TcpControl::Syn,
                seq: 1,
                ack: None,
                payload: &[],
            },
        );
        assert!(g.send(&frame));
    }
    assert!(g.stack.inner.as_ref().unwrap().link.outbound.len() <= MAX_QUEUED_FRAMES);
    assert!(g.stack.counters().tx_dropped > 0);
    // Half-open connections time out, and a real client gets in again.
    g.now += HANDSHAKE_TIMEOUT;
    let _ = g.frames();
    let mut c = g.connect(40004);
    assert!(g.stack.counters().timed_out >= MAX_CONNECTIONS as u64);
    let resp = g.exchange(&mut c, b"GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n");
    assert_eq!(body(&resp), "ami-12345678");
}

#[test]
fn oversized_and_idle_connections_end() {
    let mut g = Guest::new(MmdsVersion::V1);
    g.arp();
    let mut c = g.connect(40005);
    // Headers that never end: refused with a 400, and the connection closes.
    let chunk = vec![b'a'; 1000];
    let mut resp = g.exchange(&mut c, b"GET / HTTP/1.1\r\nX: ");
    assert!(resp.is_empty());
    for _ in 0..5 {
        resp = g.exchange(&mut c, &chunk);
        if !resp.is_empty() {
            break;
        }
    }
    assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
    assert_eq!(g.stack.counters().http.bad_requests, 1);
    // An idle connection is dropped after the timeout, with a reset.
    let _ = g.connect(40006);
    assert_eq!(g.stack.open_connections(), 2);
    g.now += IDLE_TIMEOUT;
    let _ = g.send(&arp_request(DEFAULT_IPV4));
    let frames = g.frames();
    assert!(frames.iter().any(|f| {
        EthernetFrame::new_checked(&f[..]).unwrap().ethertype() == EthernetProtocol::Ipv4
            && parse_tcp(f, DEFAULT_IPV4).control == TcpControl::Rst
    }));
    assert_eq!(g.stack.open_connections(), 0);
    assert!(g.stack.counters().timed_out >= 1);
}

#[test]
fn other_address_and_any_destination_mac() {
    let ip = Ipv4Addr::new(169, 254, 170, 2);
    let mut g = Guest::at(ip, store(MmdsVersion::V1));
    // The default address is not MMDS's here.
    assert!(!g.send(&arp_request(DEFAULT_IPV4)));
    // No ARP first: the guest sends to a gateway's MAC. MMDS takes the
    // frame, asks who the guest is, and answers once it knows.
    let syn = Seg {
        port: 40007,
        control: TcpControl::Syn,
        seq: 1000,
        ack: None,
        payload: &[],
    };
    let mut frame = tcp_frame(ip, &syn);
    frame[..6].copy_from_slice(&ANY_MAC);
    assert!(g.send(&frame));
    let frames = g.frames();
    assert_eq!(frames.len(), 1);
    let eth = EthernetFrame::new_checked(&frames[0][..]).unwrap();
    assert_eq!(
        eth.ethertype(),
        EthernetProtocol::Arp,
        "MMDS asks for the guest's MAC"
    );
    // The guest's ARP reply (to MMDS's address) is taken too.
    let reply = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: EthernetAddress(GUEST_MAC),
        source_protocol_addr: GUEST_IP,
        target_hardware_addr: EthernetAddress(MMDS_MAC),
        target_protocol_addr: ip,
    };
    let mut buf = vec![0; 14 + reply.buffer_len()];
    let mut e = EthernetFrame::new_unchecked(&mut buf);
    EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress(MMDS_MAC),
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut e);
    reply.emit(&mut ArpPacket::new_unchecked(e.payload_mut()));
    assert!(g.send(&buf));
    // The guest retransmits its SYN; now MMDS answers.
    g.now += Duration::from_secs(1);
    let segs = g.tcp(&syn);
    assert!(
        segs.iter()
            .any(|s| s.control == TcpControl::Syn && s.ack == Some(1001)),
        "{segs:?}"
    );
}
