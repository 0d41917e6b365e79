//! A net device with MMDS on it: crafted frames through the transmit
//! queue reach the MMDS stack (not the TAP), and its answers come back
//! through the receive queue, as a guest sees them. No TAP, no KVM.

use std::net::Ipv4Addr;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use flatlet_mmds::{DEFAULT_IPV4, Mmds, MmdsStack};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr,
    IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::test_utils::{DATA_BASE, QUEUE_BASE, activation, add_chain, memory, mock, used};

const GUEST_MAC: [u8; 6] = [0x06, 0, 0xac, 0x10, 0, 2];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const MMDS_MAC: [u8; 6] = flatlet_mmds::stack::MMDS_MAC;

/// MMDS as the VMM attaches it, with the real clock.
struct Detour(MmdsStack);

impl FrameDetour for Detour {
    fn detour_tx(&mut self, frame: &[u8]) -> bool {
        self.0.detour_tx(frame, Instant::now())
    }
    fn next_rx_frame(&mut self, buf: &mut [u8]) -> Option<usize> {
        self.0.next_rx_frame(buf, Instant::now())
    }
    fn has_pending(&self) -> bool {
        self.0.has_pending()
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("mmds_rx_frames", self.0.counters().rx_frames)]
    }
}

struct Rig {
    mem: &'static GuestMemoryMmap,
    rx: MockSplitQueue<'static, GuestMemoryMmap>,
    tx: MockSplitQueue<'static, GuestMemoryMmap>,
    dev: Net,
    tap: UnixDatagram,
    next_tx: u16,
    next_rx: u16,
}

fn rig() -> Rig {
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(memory()));
    let (ours, tap) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    tap.set_nonblocking(true).unwrap();
    let mut dev = Net::new(Box::new(ours), Some(GUEST_MAC), "eth0").unwrap();
    let mut store = Mmds::default();
    store
        .put(serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-1"}}}))
        .unwrap();
    let stack = MmdsStack::new(DEFAULT_IPV4, Arc::new(Mutex::new(store)));
    dev.set_detour(Box::new(Detour(stack)));
    let rx = mock(mem, QUEUE_BASE[0], 16);
    let tx = mock(mem, QUEUE_BASE[1], 16);
    let (act, _sink) = activation(mem, &[&rx, &tx]);
    dev.activate(act).unwrap();
    Rig {
        mem,
        rx,
        tx,
        dev,
        tap,
        next_tx: 0,
        next_rx: 0,
    }
}

impl Rig {
    /// The guest transmits `eth` (an Ethernet frame) with a header.
    fn transmit(&mut self, eth: &[u8]) {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(eth);
        let at = DATA_BASE + u64::from(self.next_tx) * 0x1000;
        self.mem.write_slice(&f, GuestAddress(at)).unwrap();
        add_chain(&self.tx, self.next_tx, &[(at, f.len() as u32, false)]);
        self.next_tx += 1;
        assert_eq!(self.dev.process_tx(), 1);
    }

    /// The guest offers one receive buffer, and the device fills it (or
    /// not): the Ethernet frame it got.
    fn receive(&mut self) -> Option<Vec<u8>> {
        let at = DATA_BASE + 0x40000 + u64::from(self.next_rx) * 0x1000;
        add_chain(&self.rx, self.next_rx, &[(at, 2048, true)]);
        self.dev.process_rx();
        let (_, len, idx) = used(self.mem, &self.rx, u64::from(self.next_rx));
        if idx <= self.next_rx {
            return None;
        }
        self.next_rx += 1;
        let mut got = vec![0u8; len as usize];
        self.mem.read_slice(&mut got, GuestAddress(at)).unwrap();
        assert_eq!(&got[..NUM_BUFFERS], &[0; NUM_BUFFERS], "a clean header");
        Some(got[VNET_HDR_LEN..].to_vec())
    }
}

fn ethernet(dst: [u8; 6], ethertype: EthernetProtocol, payload_len: usize) -> (Vec<u8>, usize) {
    let mut buf = vec![0u8; 14 + payload_len];
    EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress(dst),
        ethertype,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut buf));
    (buf, 14)
}

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(GUEST_MAC),
        source_protocol_addr: GUEST_IP,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let (mut buf, at) = ethernet([0xff; 6], EthernetProtocol::Arp, arp.buffer_len());
    arp.emit(&mut ArpPacket::new_unchecked(&mut buf[at..]));
    buf
}

fn tcp(control: TcpControl, seq: u32, ack: Option<u32>, payload: &[u8]) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: 40000,
        dst_port: 80,
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: 65535,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let ip = Ipv4Repr {
        src_addr: GUEST_IP,
        dst_addr: DEFAULT_IPV4,
        next_header: IpProtocol::Tcp,
        payload_len: repr.buffer_len(),
        hop_limit: 64,
    };
    let (mut buf, at) = ethernet(MMDS_MAC, EthernetProtocol::Ipv4, 20 + repr.buffer_len());
    let caps = ChecksumCapabilities::default();
    let mut packet = Ipv4Packet::new_unchecked(&mut buf[at..]);
    ip.emit(&mut packet, &caps);
    repr.emit(
        &mut TcpPacket::new_unchecked(packet.payload_mut()),
        &IpAddress::Ipv4(GUEST_IP),
        &IpAddress::Ipv4(DEFAULT_IPV4),
        &caps,
    );
    buf
}

/// The TCP segment in a frame MMDS sent: (control, seq, ack, payload).
fn segment(frame: &[u8]) -> (TcpControl, u32, Option<u32>, Vec<u8>) {
    let eth = EthernetFrame::new_checked(frame).unwrap();
    assert_eq!(eth.dst_addr(), EthernetAddress(GUEST_MAC));
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    let t = TcpPacket::new_checked(ip.payload()).unwrap();
    let r = TcpRepr::parse(
        &t,
        &IpAddress::Ipv4(DEFAULT_IPV4),
        &IpAddress::Ipv4(GUEST_IP),
        &ChecksumCapabilities::default(),
    )
    .unwrap();
    (
        r.control,
        r.seq_number.0 as u32,
        r.ack_number.map(|a| a.0 as u32),
        r.payload.to_vec(),
    )
}

#[test]
fn mmds_answers_through_the_queues_and_the_tap_sees_nothing_of_it() {
    let mut r = rig();
    // ARP for MMDS: answered by MMDS.
    r.transmit(&arp_request(DEFAULT_IPV4));
    let reply = r.receive().expect("an ARP reply");
    let eth = EthernetFrame::new_checked(&reply[..]).unwrap();
    assert_eq!(eth.src_addr(), EthernetAddress(MMDS_MAC));
    let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).unwrap()).unwrap();
    assert!(matches!(
        arp,
        ArpRepr::EthernetIpv4 { operation: ArpOperation::Reply, source_protocol_addr, .. }
            if source_protocol_addr == DEFAULT_IPV4
    ));
    // A handshake and an HTTP GET.
    r.transmit(&tcp(TcpControl::Syn, 100, None, &[]));
    let (control, seq, ack, _) = segment(&r.receive().expect("a SYN-ACK"));
    assert_eq!((control, ack), (TcpControl::Syn, Some(101)));
    let server = seq.wrapping_add(1);
    r.transmit(&tcp(TcpControl::None, 101, Some(server), &[]));
    let get = b"GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n";
    r.transmit(&tcp(TcpControl::Psh, 101, Some(server), get));
    // The acknowledgement and the response (one or more segments).
    let mut payload = Vec::new();
    while let Some(frame) = r.receive() {
        let (_, _, ack, data) = segment(&frame);
        assert_eq!(ack, Some(101 + get.len() as u32));
        payload.extend_from_slice(&data);
    }
    let text = String::from_utf8(payload).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nami-1"), "{text}");
    // None of it reached the TAP; other traffic still does.
    let mut buf = [0u8; 2048];
    assert!(r.tap.recv(&mut buf).is_err());
    r.transmit(&arp_request(Ipv4Addr::new(10, 0, 2, 1)));
    let n = r.tap.recv(&mut buf).expect("ARP for the gateway goes to the TAP");
    assert_eq!(
        &buf[VNET_HDR_LEN..n],
        &arp_request(Ipv4Addr::new(10, 0, 2, 1))[..]
    );
    assert_eq!(r.dev.stats().tx_frames, 1);
    let counters = r.dev.counters();
    assert!(counters.contains(&("mmds_rx_frames", 4)), "{counters:?}");
}

#[test]
fn mmds_frames_wait_for_guest_buffers() {
    let mut r = rig();
    r.transmit(&arp_request(DEFAULT_IPV4));
    // No receive buffer yet: the reply waits in MMDS; the TX event's
    // receive pass found no buffer.
    assert!(r.dev.detour_pending() || r.dev.rx_len > 0);
    assert!(r.receive().is_some(), "delivered once a buffer comes");
    assert!(!r.dev.detour_pending());
}
