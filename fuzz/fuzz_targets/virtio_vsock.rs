//! virtio-vsock's packet path: a hostile guest's packets (any header,
//! any length against any chain, split across pieces) go through
//! `packet::parse_tx` to `Muxer::on_guest_packet`, while host programs
//! connect to the `uds_path` listener, send `CONNECT` lines or garbage,
//! write, read, stop reading, shut down and close, and listeners on
//! `<uds_path>_<port>` take (or leave) guest-initiated connections; the
//! receive path fills guest buffers of any size, the clock jumps past
//! deadlines, and the driver resets the device. A real epoll stands in
//! for the event loop.
//!
//! Checked: nothing panics; every packet put in a receive buffer fits it,
//! is addressed host to guest with a known operation, and carries a
//! payload only as data within the 64 KiB limit; the muxer never adds a
//! descriptor it already watches nor changes or removes one it does not
//! (epoll would refuse: a connection could stall); and after a reset no
//! connection and no watched descriptor is left.
#![no_main]

mod common;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::Input;
use flatlet_devices::virtio::chain::Region;
use flatlet_devices::virtio::vsock::muxer::{MAX_CONNECTIONS, Muxer, Watch, bind};
use flatlet_devices::virtio::vsock::packet::{
    HDR_LEN, HOST_CID, Header, MAX_PAYLOAD, Op, TYPE_STREAM, parse_tx,
};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

const MEM: usize = 0x4_0000;
/// Where a guest packet is written, and a receive buffer laid out.
const TX_AREA: u64 = 0x1_0000;
const RX_AREA: u64 = 0x2_0000;
/// Host-side listeners for guest-initiated connections: `<uds>_<port>`.
const HOST_PORTS: [u32; 2] = [5000, 5001];
/// Guest ports host programs ask for.
const GUEST_PORTS: [u32; 4] = [1024, 1025, 52, 5000];
/// The muxer's first host port for host-initiated connections.
const FIRST_LOCAL: u32 = 1 << 30;
const MAX_STREAMS: usize = 24;
const MAX_CONNECTS: usize = 64;

/// The real epoll, and what the muxer asked it to watch.
struct EpollWatch {
    epoll: Epoll,
    watched: HashMap<RawFd, EventSet>,
}

impl Watch for EpollWatch {
    fn add(&mut self, fd: RawFd, set: EventSet) -> bool {
        assert!(!self.watched.contains_key(&fd), "fd {fd} added twice");
        self.watched.insert(fd, set);
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(set, fd as u64))
            .is_ok()
    }
    fn modify(&mut self, fd: RawFd, set: EventSet) -> bool {
        assert!(self.watched.contains_key(&fd), "fd {fd} modified unwatched");
        self.watched.insert(fd, set);
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(set, fd as u64))
            .is_ok()
    }
    fn remove(&mut self, fd: RawFd) -> bool {
        assert!(self.watched.remove(&fd).is_some(), "fd {fd} removed unwatched");
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
            .is_ok()
    }
}

/// The directory for this process's sockets. Also ignores SIGPIPE, as
/// flatlet does (Rust's runtime does it before `main`, which a fuzz
/// target has not): a write to a closed socket is then an error.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // SAFETY: sets a signal's disposition to ignore; no handler runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let d = std::env::temp_dir().join(format!("flatlet-fuzz-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// Splits `[addr, addr + len)` into up to three pieces where the input says.
fn split(inp: &mut Input, addr: u64, len: usize) -> Vec<Region> {
    let pieces = 1 + usize::from(inp.u8() % 3);
    let mut out = Vec::new();
    let (mut at, mut left) = (addr, len);
    for i in 0..pieces {
        let n = if i + 1 == pieces || left == 0 {
            left
        } else {
            usize::from(inp.u16()) % (left + 1)
        };
        out.push((GuestAddress(at), n));
        at += n as u64;
        left -= n;
        if left == 0 {
            break;
        }
    }
    out
}

fn guest_header(inp: &mut Input, cid: u64) -> Header {
    let sel = inp.u8();
    let src_cid = if sel < 240 { cid } else { inp.u64() };
    let sel = inp.u8();
    let dst_cid = if sel < 240 { HOST_CID } else { inp.u64() };
    let src_port = match inp.u8() % 8 {
        7 => inp.u32(),
        i => GUEST_PORTS[usize::from(i) % GUEST_PORTS.len()],
    };
    let dst_port = match inp.u8() % 4 {
        0 | 1 => FIRST_LOCAL + u32::from(inp.u8() % 8),
        2 => HOST_PORTS[usize::from(inp.u8()) % HOST_PORTS.len()],
        _ => inp.u32(),
    };
    let kind = if inp.u8() < 250 {
        TYPE_STREAM
    } else {
        u16::from(inp.u8())
    };
    let op = u16::from(inp.u8() % 9);
    let flags = match inp.u8() {
        f @ 0..=250 => u32::from(f % 4),
        _ => inp.u32(),
    };
    let buf_alloc = match inp.u8() % 5 {
        0 => 0,
        1 => 4096,
        2 => 64 * 1024,
        3 => 256 * 1024,
        _ => inp.u32(),
    };
    let fwd_cnt = match inp.u8() % 3 {
        0 => 0,
        1 => u32::from(inp.u16()),
        _ => inp.u32(),
    };
    let len = if op == Op::Rw as u16 {
        match inp.u8() % 8 {
            7 => inp.u32(),
            _ => u32::from(inp.u16()) % (MAX_PAYLOAD + 2),
        }
    } else if inp.u8() < 250 {
        0
    } else {
        u32::from(inp.u16())
    };
    Header {
        src_cid,
        dst_cid,
        src_port,
        dst_port,
        len,
        kind,
        op,
        flags,
        buf_alloc,
        fwd_cnt,
    }
}

/// Checks what the muxer put in a receive buffer.
fn check_rx(mem: &GuestMemoryMmap, regions: &[Region], n: usize, cid: u64) {
    let room: usize = regions.iter().map(|r| r.1).sum();
    assert!(n >= HDR_LEN && n <= room, "{n} bytes in a buffer of {room}");
    let mut raw = [0u8; HDR_LEN];
    let mut got = 0;
    for &(addr, len) in regions {
        let take = len.min(HDR_LEN - got);
        mem.read_slice(&mut raw[got..got + take], addr).unwrap();
        got += take;
        if got == HDR_LEN {
            break;
        }
    }
    let h = Header::parse(&raw);
    assert_eq!(
        (h.src_cid, h.dst_cid, h.kind),
        (HOST_CID, cid, TYPE_STREAM),
        "{h:?}"
    );
    assert!(h.operation().is_some(), "{h:?}");
    assert_eq!(n, HDR_LEN + h.len as usize, "{h:?}");
    assert!(h.len <= MAX_PAYLOAD);
    if h.len > 0 {
        assert_eq!(h.op, Op::Rw as u16, "{h:?}");
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let cid = 3 + u64::from(inp.u8() % 4);
    let uds = dir().join("v.sock");
    let listener = bind(&uds).unwrap();
    let mut host_listeners = Vec::new();
    for port in HOST_PORTS {
        let mut p = uds.clone().into_os_string();
        p.push(format!("_{port}"));
        let _ = std::fs::remove_file(&p);
        let l = UnixListener::bind(&p).unwrap();
        l.set_nonblocking(true).unwrap();
        host_listeners.push(l);
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut w = EpollWatch {
        epoll: Epoll::new().unwrap(),
        watched: HashMap::new(),
    };
    let mut mux = Muxer::new(uds.clone(), listener, cid);
    mux.start(&mut w);
    let mut now = Instant::now();
    // Host programs: ones that connected to `uds`, and ones a listener
    // accepted.
    let mut streams: Vec<UnixStream> = Vec::new();
    let mut connects = 0;
    let mut buf = vec![0u8; 256 * 1024];

    while !inp.is_empty() {
        match inp.u8() % 12 {
            // The guest sends a packet.
            0..=2 => {
                let h = guest_header(&mut inp, cid);
                let payload_room = match inp.u8() % 8 {
                    0 => usize::from(inp.u16()),
                    _ => (h.len as usize).min(MAX_PAYLOAD as usize + 1),
                };
                let short = inp.u8() >= 250;
                let bytes = if short {
                    let n = usize::from(inp.u8()) % HDR_LEN;
                    h.to_bytes()[..n].to_vec()
                } else {
                    let mut b = h.to_bytes().to_vec();
                    b.extend(pattern(payload_room, inp.u8()));
                    b
                };
                mem.write_slice(&bytes, GuestAddress(TX_AREA)).unwrap();
                let regions = split(&mut inp, TX_AREA, bytes.len());
                match parse_tx(&mem, &regions) {
                    Ok(pkt) => {
                        assert_eq!(pkt.hdr, h);
                        assert_eq!(pkt.payload.iter().map(|r| r.1).sum::<usize>(), h.len as usize);
                        mux.on_guest_packet(&mem, &pkt, now, &mut w);
                    }
                    Err(_) => {
                        // Refused: a well-formed packet never is.
                        assert!(
                            short
                                || h.len > MAX_PAYLOAD
                                || (h.len > 0 && h.op != Op::Rw as u16)
                                || (h.len as usize) > payload_room
                        );
                    }
                }
            }
            // A host program connects.
            3 => {
                // Bounded: a connect blocks once the listener's backlog
                // is full of connections the muxer has not accepted.
                if streams.len() < MAX_STREAMS && connects < MAX_CONNECTS {
                    connects += 1;
                    if let Ok(s) = UnixStream::connect(&uds) {
                        s.set_nonblocking(true).unwrap();
                        streams.push(s);
                    }
                }
            }
            // A host program writes: a CONNECT line, garbage, or data.
            4 => {
                let i = usize::from(inp.u8());
                let what = inp.u8();
                let bytes = match what % 4 {
                    0 => format!(
                        "CONNECT {}\n",
                        GUEST_PORTS[usize::from(what / 4) % GUEST_PORTS.len()]
                    )
                    .into_bytes(),
                    1 => {
                        let n = usize::from(inp.u8());
                        inp.bytes(n).to_vec()
                    }
                    _ => pattern(usize::from(inp.u8()) * 1024 + usize::from(what), what),
                };
                if let Some(s) = streams.get_mut(i % MAX_STREAMS) {
                    let _ = s.write(&bytes);
                }
            }
            // A host program reads what there is.
            5 => {
                let i = usize::from(inp.u8());
                let max = 1 + usize::from(inp.u8()) * 1024;
                if let Some(s) = streams.get_mut(i % MAX_STREAMS) {
                    match s.read(&mut buf[..max]) {
                        Ok(_) => {}
                        Err(e) => assert!(e.kind() != ErrorKind::InvalidInput),
                    }
                }
            }
            // A host program shuts down a direction, or closes.
            6 => {
                let i = usize::from(inp.u8()) % MAX_STREAMS;
                let how = inp.u8() % 4;
                if i < streams.len() {
                    match how {
                        0 => drop(streams.swap_remove(i)),
                        1 => _ = streams[i].shutdown(Shutdown::Write),
                        2 => _ = streams[i].shutdown(Shutdown::Read),
                        _ => _ = streams[i].shutdown(Shutdown::Both),
                    }
                }
            }
            // The listeners for guest-initiated connections take them.
            7 => {
                let l = &host_listeners[usize::from(inp.u8()) % HOST_PORTS.len()];
                while let Ok((s, _)) = l.accept() {
                    s.set_nonblocking(true).unwrap();
                    if streams.len() < MAX_STREAMS {
                        streams.push(s);
                    }
                }
            }
            // The event loop runs.
            8 => {
                let rounds = 1 + inp.u8() % 4;
                for _ in 0..rounds {
                    let mut events = [EpollEvent::default(); 32];
                    let n = w.epoll.wait(0, &mut events).unwrap();
                    for e in &events[..n] {
                        let fd = e.fd();
                        if w.watched.contains_key(&fd) {
                            mux.on_event(fd, e.event_set(), now, &mut w);
                        }
                    }
                }
            }
            // The guest gives receive buffers.
            9 => {
                let count = 1 + inp.u8() % 8;
                let room = HDR_LEN
                    + match inp.u8() % 4 {
                        0 => usize::from(inp.u8()),
                        1 => 4096 - HDR_LEN,
                        2 => usize::from(inp.u16()),
                        _ => 64 * 1024,
                    };
                for _ in 0..count {
                    let regions = split(&mut inp, RX_AREA, room);
                    match mux.fill_rx(&mem, &regions, &mut w) {
                        Some(n) => check_rx(&mem, &regions, n, cid),
                        None => break,
                    }
                }
            }
            // Time passes.
            10 => {
                now += Duration::from_millis(u64::from(inp.u8()) * 20);
                mux.expire(now, &mut w);
            }
            // The driver resets the device, and maybe comes back.
            _ => {
                mux.stop(&mut w);
                assert_eq!(mux.connection_count(), 0);
                assert!(w.watched.is_empty(), "left watched: {:?}", w.watched);
                assert!(!mux.has_rx_work());
                if inp.u8() & 1 == 0 {
                    mux.start(&mut w);
                }
            }
        }
        assert!(mux.connection_count() <= MAX_CONNECTIONS);
    }
    mux.stop(&mut w);
    assert_eq!(mux.connection_count(), 0);
    assert!(w.watched.is_empty(), "left watched: {:?}", w.watched);
});
