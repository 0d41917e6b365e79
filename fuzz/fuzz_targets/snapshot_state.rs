//! The snapshot state file as an attacker writes it. Two ways in: the
//! input as a whole file (header, checksum and all), and the input as the
//! payload of a well-framed file, so that the fuzzer reaches the decoder
//! and the checks behind it without forging checksums. Whatever decodes
//! goes through every check a load makes before it builds anything: the
//! state's own validation, the saved device configuration, and each saved
//! virtio transport restored onto a real transport and device. Nothing may
//! panic, and a refused transport must be left reset.
#![no_main]

mod common;

use std::sync::{Arc, Mutex};

use flatlet_devices::virtio::VirtioDevice;
use flatlet_devices::virtio::mmio::MmioTransport;
use flatlet_devices::virtio::rng::Rng;
use flatlet_vmm::snapshot::format;
use flatlet_vmm::snapshot::state::{MicrovmState, SavedConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let file = if mode & 1 == 0 { rest.to_vec() } else { format::frame(rest) };
    let Ok(state) = format::decode::<MicrovmState>(&file) else { return };
    let _ = state.validate();
    let _ = SavedConfig::parse(&state.config);
    let mem = common::memory(&[]);
    for saved in &state.devices.virtio {
        let rng: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(
            Rng::new(Box::new(|b: &mut [u8]| Ok(b.fill(7))), None).unwrap(),
        ));
        let mut t = MmioTransport::new(rng.clone(), mem.clone(), common::irq_line());
        // As saved, and as if of the device's type (to reach the checks
        // after the type's).
        let mut as_rng = saved.transport.clone();
        as_rng.device_type = 4;
        for s in [&saved.transport, &as_rng] {
            if t.restore(s).is_err() {
                assert_eq!(t.status(), 0, "a refused restore leaves the transport reset");
                assert!(rng.lock().unwrap().queue_states().is_none());
            }
        }
    }
});
