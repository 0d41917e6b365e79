//! MMDS in the VMM: the data store the controller owns (shared with the
//! net devices that serve it), and the stacks it puts on the listed
//! interfaces when the VM starts.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use flatlet_devices::virtio::net::FrameDetour;
use flatlet_mmds::{Mmds, MmdsStack};
use log::info;

use crate::config::{ConfigError, files};
use crate::vm::Vm;

pub use flatlet_mmds::{DEFAULT_SIZE_LIMIT, MmdsConfig};

/// The data store, shared between the controller and the net devices.
pub type SharedMmds = Arc<Mutex<Mmds>>;

/// Locks the data store (a panic elsewhere leaves it usable: every
/// change to it is made whole or not at all).
pub fn lock(mmds: &SharedMmds) -> MutexGuard<'_, Mmds> {
    mmds.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An MMDS stack as a net device's frame detour, on the monotonic clock.
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
        let c = self.0.counters();
        vec![
            ("mmds_rx_frames", c.rx_frames),
            ("mmds_rx_dropped", c.rx_dropped),
            ("mmds_tx_frames", c.tx_frames),
            ("mmds_tx_dropped", c.tx_dropped),
            ("mmds_connections", c.connections),
            ("mmds_syn_refused", c.syn_refused),
            ("mmds_timed_out", c.timed_out),
            ("mmds_requests", c.http.requests),
            ("mmds_bad_requests", c.http.bad_requests),
            ("mmds_rx_no_token", c.http.no_token),
            ("mmds_rx_invalid_token", c.http.invalid_token),
            ("mmds_tokens", c.http.tokens),
        ]
    }
}

/// Puts an MMDS stack on each interface `config` lists.
pub fn attach(vm: &Vm, config: &MmdsConfig, mmds: &SharedMmds) {
    for slot in &vm.virtio {
        let Some(net) = &slot.net else { continue };
        if config.network_interfaces.contains(&slot.id) {
            let stack = MmdsStack::new(config.ipv4(), mmds.clone());
            flatlet_devices::bus::lock(net).set_detour(Box::new(Detour(stack)));
            info!("network interface {}: MMDS at {}", slot.id, config.ipv4());
        }
    }
}

/// Reads a `--metadata` file: JSON for the data store. A file larger than
/// `max_bytes` is refused before it is parsed.
pub fn read_metadata(path: &std::path::Path, max_bytes: u64) -> Result<serde_json::Value, ConfigError> {
    let err = |reason: String| ConfigError::File {
        path: path.display().to_string(),
        reason,
    };
    let file = files::open_checked(path, false, files::Accept::RegularFile).map_err(err)?;
    let mut text = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, max_bytes + 1), &mut text)
        .map_err(|e| err(e.to_string()))?;
    if text.len() as u64 > max_bytes {
        return Err(err(format!("the file is larger than {max_bytes} bytes")));
    }
    serde_json::from_slice(&text).map_err(|e| err(format!("not valid JSON: {e}")))
}

/// How large a `--metadata` file may be for a data store of `limit`
/// bytes (its JSON may be indented): four times that, and at least 1 MiB.
pub fn metadata_file_limit(limit: usize) -> u64 {
    (limit as u64)
        .saturating_mul(4)
        .max(crate::config::MAX_CONFIG_FILE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_files() {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        std::fs::write(f.as_path(), br#"{"latest": {"meta-data": {"ami-id": "ami-1"}}}"#).unwrap();
        let v = read_metadata(f.as_path(), 1000).unwrap();
        assert_eq!(v["latest"]["meta-data"]["ami-id"], "ami-1");
        assert!(
            read_metadata(f.as_path(), 10)
                .unwrap_err()
                .to_string()
                .contains("larger than 10 bytes")
        );
        std::fs::write(f.as_path(), b"{").unwrap();
        assert!(
            read_metadata(f.as_path(), 1000)
                .unwrap_err()
                .to_string()
                .contains("not valid JSON")
        );
        assert!(read_metadata(std::path::Path::new("/"), 1000).is_err());
        assert_eq!(metadata_file_limit(51200), 1 << 20);
        assert_eq!(metadata_file_limit(1 << 20), 4 << 20);
    }
}
