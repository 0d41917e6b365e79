//! virtio-net transmit on made-up guest memory.
#![no_main]

mod common;

use std::os::unix::net::UnixDatagram;

use flatlet_devices::virtio::VirtioDevice;
use flatlet_devices::virtio::net::{MAX_FRAME, Net, VNET_HDR_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (ours, peer) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    peer.set_nonblocking(true).unwrap();
    let mut dev = Net::new(Box::new(ours), None, "fuzz").unwrap();
    let mem = common::memory(data);
    dev.activate(common::activation(&mem, 2)).unwrap();
    dev.process_tx();
    // Whatever reached the backend is a whole frame with a clean header.
    let mut buf = vec![0u8; MAX_FRAME + 1];
    while let Ok(n) = peer.recv(&mut buf) {
        assert!(n >= VNET_HDR_LEN + 14 && n <= MAX_FRAME);
        assert!(buf[..VNET_HDR_LEN].iter().all(|b| *b == 0));
    }
});
