//! virtio-net with mock queues and a datagram socket standing in for the
//! TAP (it keeps frame boundaries, as a TAP does).

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::ioapic::tests::RecordingSink;
use crate::virtio::test_utils::{DATA_BASE, MEM_SIZE, QUEUE_BASE, activation, add_chain, memory, mock, used};

const MAC: [u8; 6] = [0x06, 0, 0xac, 0x10, 0, 2];

struct Rig {
    mem: &'static GuestMemoryMmap,
    rx: MockSplitQueue<'static, GuestMemoryMmap>,
    tx: MockSplitQueue<'static, GuestMemoryMmap>,
    dev: Net,
    peer: UnixDatagram,
    sink: Arc<RecordingSink>,
}

fn rig() -> Rig {
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(memory()));
    let (ours, peer) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    peer.set_nonblocking(true).unwrap();
    let mut dev = Net::new(Box::new(ours), Some(MAC), "eth0").unwrap();
    let rx = mock(mem, QUEUE_BASE[0], 16);
    let tx = mock(mem, QUEUE_BASE[1], 16);
    let (act, sink) = activation(mem, &[&rx, &tx]);
    dev.activate(act).unwrap();
    Rig {
        mem,
        rx,
        tx,
        dev,
        peer,
        sink,
    }
}

/// A frame with a virtio-net header: `hdr` header bytes then `payload`.
fn frame(hdr: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![hdr; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(payload);
    f
}

fn recv(peer: &UnixDatagram) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; MAX_FRAME];
    peer.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

#[test]
fn mac_in_config_space_and_features() {
    let r = rig();
    let mut mac = [0u8; 6];
    r.dev.read_config(0, &mut mac);
    assert_eq!(mac, MAC);
    assert_eq!(r.dev.features(), F_VERSION_1 | F_MAC);
    let (ours, _peer) = UnixDatagram::pair().unwrap();
    let no_mac = Net::new(Box::new(ours), None, "eth1").unwrap();
    assert_eq!(no_mac.features(), F_VERSION_1);
}

#[test]
fn transmits_a_frame_with_offload_fields_cleared() {
    let r = rig();
    let mut r = r;
    // The guest fills the header with junk offload flags.
    let f = frame(0x5a, b"hello from flatlet");
    r.mem.write_slice(&f, GuestAddress(DATA_BASE)).unwrap();
    // Header and frame in two descriptors.
    add_chain(
        &r.tx,
        0,
        &[
            (DATA_BASE, 12, false),
            (DATA_BASE + 12, (f.len() - 12) as u32, false),
        ],
    );
    assert_eq!(r.dev.process_tx(), 1);
    let got = recv(&r.peer).expect("a frame reached the TAP");
    assert_eq!(&got[..VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
    assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
    assert_eq!(used(r.mem, &r.tx, 0), (0, 0, 1));
    assert_eq!(r.sink.sent.lock().unwrap().len(), 1);
    assert_eq!(r.dev.stats().tx_frames, 1);
}

#[test]
fn malformed_transmit_chains_are_dropped() {
    let mut r = rig();
    let f = frame(0, b"x");
    r.mem.write_slice(&f, GuestAddress(DATA_BASE)).unwrap();
    // Device-writable part: wrong direction.
    add_chain(
        &r.tx,
        0,
        &[(DATA_BASE, f.len() as u32, false), (DATA_BASE + 0x1000, 64, true)],
    );
    // Too short to be a frame.
    add_chain(&r.tx, 2, &[(DATA_BASE, 8, false)]);
    // Outside guest memory.
    add_chain(&r.tx, 3, &[(MEM_SIZE - 10, 100, false)]);
    // Larger than any frame.
    add_chain(&r.tx, 4, &[(DATA_BASE, MAX_FRAME as u32 + 1, false)]);
    assert_eq!(r.dev.process_tx(), 4, "every chain is returned");
    assert!(recv(&r.peer).is_none(), "nothing reached the TAP");
    assert_eq!(r.dev.stats().dropped, 4);
    assert_eq!(used(r.mem, &r.tx, 0).2, 4);
}

#[test]
fn receives_into_guest_buffers_with_num_buffers_set() {
    let mut r = rig();
    add_chain(&r.rx, 0, &[(DATA_BASE, 2048, true)]);
    let f = frame(0, b"ping");
    r.peer.send(&f).unwrap();
    assert!(!r.dev.process_rx(), "nothing left waiting");
    let (id, len, idx) = used(r.mem, &r.rx, 0);
    assert_eq!((id, len as usize, idx), (0, f.len(), 1));
    let mut got = vec![0u8; f.len()];
    r.mem.read_slice(&mut got, GuestAddress(DATA_BASE)).unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
    assert_eq!(r.sink.sent.lock().unwrap().len(), 1);
}

#[test]
fn full_receive_queue_loses_and_duplicates_nothing() {
    let mut r = rig();
    let frames: Vec<Vec<u8>> = (0..3u8).map(|i| frame(0, &[i; 40])).collect();
    for f in &frames {
        r.peer.send(f).unwrap();
    }
    assert!(r.dev.process_rx(), "no buffers: the first frame waits");
    assert_eq!(r.dev.stats().rx_deferred, 1);
    // Buffers come back one at a time; each takes the next frame in order.
    for (i, f) in frames.iter().enumerate() {
        let buf = DATA_BASE + 0x1_0000 * i as u64;
        add_chain(&r.rx, i as u16, &[(buf, 2048, true)]);
        let waiting = r.dev.process_rx();
        assert_eq!(
            waiting,
            i < 2,
            "frame {i}: the next one waits until the last buffer"
        );
        let (id, len, idx) = used(r.mem, &r.rx, i as u64);
        assert_eq!((id as usize, len as usize, idx as usize), (i, f.len(), i + 1));
        let mut got = vec![0u8; f.len()];
        r.mem.read_slice(&mut got, GuestAddress(buf)).unwrap();
        assert_eq!(
            &got[VNET_HDR_LEN..],
            &f[VNET_HDR_LEN..],
            "frame {i} intact and in order"
        );
    }
    assert!(!r.dev.process_rx());
    assert_eq!(r.dev.stats().rx_frames, 3);
    assert_eq!(r.dev.stats().dropped, 0);
}

#[test]
fn bad_receive_buffers() {
    let mut r = rig();
    // A chain outside memory is returned empty and the frame goes to the
    // next buffer.
    add_chain(&r.rx, 0, &[(MEM_SIZE - 100, 2048, true)]);
    add_chain(&r.rx, 1, &[(DATA_BASE, 2048, true)]);
    let f = frame(0, b"data");
    r.peer.send(&f).unwrap();
    assert!(!r.dev.process_rx());
    assert_eq!(used(r.mem, &r.rx, 0), (0, 0, 2));
    assert_eq!(used(r.mem, &r.rx, 1).1 as usize, f.len());
    // A buffer too small for the frame: the frame is dropped, not split.
    add_chain(&r.rx, 2, &[(DATA_BASE, 20, true)]);
    r.peer.send(&f).unwrap();
    assert!(!r.dev.process_rx());
    assert_eq!(used(r.mem, &r.rx, 2), (2, 0, 3));
    assert_eq!(r.dev.stats().dropped, 2);
}

#[test]
fn frames_shorter_than_the_header_are_dropped() {
    let mut r = rig();
    add_chain(&r.rx, 0, &[(DATA_BASE, 2048, true)]);
    r.peer.send(&[1, 2, 3]).unwrap();
    assert!(!r.dev.process_rx());
    assert_eq!(used(r.mem, &r.rx, 0).2, 0, "the buffer was not used");
    assert_eq!(r.dev.stats().dropped, 1);
}

#[test]
fn indirect_chains_are_dropped_not_followed() {
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    let mut r = rig();
    let f = frame(0, b"through an indirect table");
    r.mem.write_slice(&f, GuestAddress(DATA_BASE)).unwrap();
    // A well-formed frame, behind an indirect descriptor.
    let table = GuestAddress(DATA_BASE + 0x8000);
    r.mem
        .write_obj(Descriptor::new(DATA_BASE, f.len() as u32, 0, 0), table)
        .unwrap();
    let head = RawDescriptor::from(Descriptor::new(table.0, 16, 4, 0));
    r.tx.add_desc_chains(&[head], 0).unwrap();
    assert_eq!(r.dev.process_tx(), 1, "the chain is returned");
    assert!(recv(&r.peer).is_none(), "nothing reached the TAP");
    let s = r.dev.stats();
    assert_eq!((s.indirect, s.dropped, s.tx_frames), (1, 1, 0));
    // Receive buffers likewise.
    r.rx.add_desc_chains(&[head], 0).unwrap();
    r.peer.send(&frame(0, b"to the guest")).unwrap();
    r.dev.process_rx();
    assert_eq!(r.dev.stats().indirect, 2);
    assert_eq!(r.dev.stats().rx_frames, 0);
}

#[test]
fn a_bad_available_index_is_counted_and_moves_nothing() {
    let mut r = rig();
    let f = frame(0, b"x");
    r.mem.write_slice(&f, GuestAddress(DATA_BASE)).unwrap();
    add_chain(&r.tx, 0, &[(DATA_BASE, f.len() as u32, false)]);
    r.tx.avail().idx().store(500u16.to_le());
    for _ in 0..100 {
        assert_eq!(r.dev.process_tx(), 0);
    }
    assert_eq!(r.dev.stats().invalid_avail_idx, 100);
    assert!(recv(&r.peer).is_none());
}

/// Makes the chain at descriptor `head` available again (the mock's own
/// add_desc_chains does not wrap around the ring).
fn avail_again(mem: &GuestMemoryMmap, m: &MockSplitQueue<'_, GuestMemoryMmap>, head: u16) {
    let avail = m.avail_addr().0;
    let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
    mem.write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(idx % 16)))
        .unwrap();
    mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
        .unwrap();
}

fn manual_limiter(
    bw: Option<crate::rate_limiter::BucketConfig>,
    ops: Option<crate::rate_limiter::BucketConfig>,
    ns: &Arc<std::sync::atomic::AtomicU64>,
) -> RateLimiter {
    RateLimiter::with_clock(bw, ops, crate::rate_limiter::Clock::Manual(ns.clone())).unwrap()
}

#[test]
fn rate_limited_transmit_and_receive_keep_their_rates() {
    use crate::rate_limiter::BucketConfig;
    use std::sync::atomic::{AtomicU64, Ordering};
    let within = |got: u64, want: f64| (got as f64 - want).abs() <= want * 0.05;
    let ns = Arc::new(AtomicU64::new(1_000_000_000));
    let mut r = rig();
    // Transmit: 100 KB per 100 ms (1 MB/s) of 1000-byte frames; receive:
    // 200 frames per 100 ms (2000/s).
    let tx_bw = BucketConfig {
        size: 100_000,
        one_time_burst: 0,
        refill_time_ms: 100,
    };
    let rx_ops = BucketConfig {
        size: 200,
        one_time_burst: 0,
        refill_time_ms: 100,
    };
    r.dev.set_rate_limiters(
        manual_limiter(None, Some(rx_ops), &ns),
        manual_limiter(Some(tx_bw), None, &ns),
    );
    let f = frame(0, &[7u8; 1000 - 14]);
    r.mem.write_slice(&f, GuestAddress(DATA_BASE)).unwrap();
    add_chain(&r.tx, 0, &[(DATA_BASE, f.len() as u32, false)]);
    let end = ns.load(Ordering::Relaxed) + 2_000_000_000;
    let mut sent = 0u64;
    while ns.load(Ordering::Relaxed) < end {
        if r.dev.process_tx() == 1 {
            sent += 1;
            assert!(recv(&r.peer).is_some());
            avail_again(r.mem, &r.tx, 0);
            continue;
        }
        let l = r.dev.tx_limiter.as_mut().unwrap();
        assert!(l.is_blocked(), "held back by the limiter, not lost");
        let wait = l.wait_hint(1, 1000).max(std::time::Duration::from_micros(1));
        ns.fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
        l.on_timer();
    }
    assert!(within(sent * 1000, 2_000_000.0 + 100_000.0), "{sent} frames sent");
    assert!(r.dev.stats().tx_throttled > 0);
    // Receive, from a fresh start of the clock's count.
    let start = ns.load(Ordering::Relaxed);
    let end = start + 2_000_000_000;
    add_chain(&r.rx, 0, &[(DATA_BASE + 0x1_0000, 2048, true)]);
    let mut received = 0u64;
    let small = frame(0, b"ping");
    r.peer.send(&small).unwrap();
    while ns.load(Ordering::Relaxed) < end {
        let before = r.dev.stats().rx_frames;
        r.dev.process_rx();
        if r.dev.stats().rx_frames > before {
            received += 1;
            r.peer.send(&small).unwrap();
            avail_again(r.mem, &r.rx, 0);
            continue;
        }
        let l = r.dev.rx_limiter.as_mut().unwrap();
        assert!(l.is_blocked(), "the frame waits for the limiter");
        let wait = l.wait_hint(1, 4).max(std::time::Duration::from_micros(1));
        ns.fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
        l.on_timer();
    }
    assert!(within(received, 4000.0 + 200.0), "{received} frames received");
    // A PATCH: receive unlimited from now on.
    assert!(r.dev.update_rate_limiters(
        (BucketUpdate::Keep, BucketUpdate::Remove),
        (BucketUpdate::Keep, BucketUpdate::Keep)
    ));
    for _ in 0..500 {
        let before = r.dev.stats().rx_frames;
        r.dev.process_rx();
        assert_eq!(r.dev.stats().rx_frames, before + 1, "no limit after the update");
        r.peer.send(&small).unwrap();
        avail_again(r.mem, &r.rx, 0);
    }
}
