//! Places the virtio devices: one 4 KiB MMIO window each after the boot
//! timer's page, one I/O APIC pin each from 5 on, and their
//! `virtio_mmio.device=<size>@<addr>:<irq>` entries on the kernel command
//! line. Drives come first (the root drive first of all, so that it is
//! `/dev/vda`), then network interfaces.
//!
//! Once the vCPUs run, a short-lived thread registers each queue's
//! notification register as an ioeventfd and each device's pin as an
//! irqfd. Until then the same eventfds are signalled through MMIO exits and
//! interrupts go through KVM_SIGNAL_MSI, so nothing waits for those KVM
//! calls (which cost milliseconds each on some nested hosts).

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use flatlet_devices::bus::{Bus, BusError, lock};
use flatlet_devices::irq::IrqLine;
use flatlet_devices::rate_limiter::RateLimiter;
use flatlet_devices::virtio::VirtioDevice;
use flatlet_devices::virtio::block::{self, Block};
use flatlet_devices::virtio::mmio::{MmioStats, MmioTransport, REG_QUEUE_NOTIFY};
use flatlet_devices::virtio::net::{Net, VNET_HDR_LEN};
use flatlet_devices::virtio::rng::Rng;
use flatlet_devices::virtio::vsock;
use kvm_ioctls::{IoEventAddress, VmFd};
use log::{debug, info, warn};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::config::VmConfig;
use crate::config::devices::{CacheType, DriveConfig};
use crate::config::rate_limit::RateLimiterConfig;
use crate::irqchip::{Irqchip, KvmMsiSink};
use crate::layout::{VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::sys;

/// The first I/O APIC pin for virtio devices (after the ISA ones flatlet
/// uses: 1 for the keyboard, 4 for COM1).
pub const FIRST_VIRTIO_IRQ: u32 = 5;

/// Errors creating the devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A drive's image cannot be opened.
    #[error("drive {id}: cannot open {path}: {reason}")]
    DriveOpen {
        id: String,
        path: String,
        reason: String,
    },
    /// A block device could not be made.
    #[error("drive {id}: {source}")]
    Block { id: String, source: block::BlockError },
    /// A TAP device cannot be opened.
    #[error("network interface {id}: cannot open TAP {tap}: {source}")]
    Tap {
        id: String,
        tap: String,
        source: std::io::Error,
    },
    /// A net device could not be made.
    #[error("network interface {id}: {source}")]
    Net {
        id: String,
        source: flatlet_devices::virtio::net::NetError,
    },
    /// Device placement.
    #[error("device placement: {0}")]
    Bus(#[from] BusError),
    /// A rate limiter's timer cannot be made.
    #[error("{id}: rate limiter: {source}")]
    RateLimiter { id: String, source: std::io::Error },
    /// The vsock device's socket cannot be set up.
    #[error("vsock: {0}")]
    VsockListen(#[from] vsock::MuxerError),
    /// The vsock device could not be made.
    #[error("{0}")]
    Vsock(#[from] vsock::VsockError),
}

/// The limiter `config` describes (one without buckets if None, so that
/// a `PATCH` can set limits later), for the device `id`.
fn limiter(id: &str, config: Option<&RateLimiterConfig>) -> Result<RateLimiter, DeviceError> {
    RateLimiterConfig::build(config).map_err(|source| DeviceError::RateLimiter {
        id: id.to_string(),
        source,
    })
}

/// A placed virtio device.
#[derive(Clone)]
pub struct VirtioSlot {
    /// The drive or interface id.
    pub id: String,
    /// Guest-physical base of its MMIO window.
    pub addr: u64,
    /// Its I/O APIC pin (GSI).
    pub irq: u32,
    /// The device.
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// The block device, for drive updates (None for other devices).
    pub block: Option<Arc<Mutex<Block>>>,
    /// The net device, for interface updates (None for other devices).
    pub net: Option<Arc<Mutex<Net>>>,
    /// What the driver got wrong at the transport.
    pub mmio: Arc<MmioStats>,
    /// The transport (for snapshots).
    pub transport: Arc<Mutex<MmioTransport>>,
}

impl VirtioSlot {
    /// The device's counters and its transport's, for metrics.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut c = lock(&self.device).counters();
        c.extend(self.mmio.counters());
        c
    }
}

/// The placed devices and what the kernel command line needs for them.
pub struct VirtioDevices {
    /// The devices, in placement order.
    pub slots: Vec<VirtioSlot>,
    /// Command-line entries: one `virtio_mmio.device=` per device, and
    /// `root=` for a root drive.
    pub cmdline: Vec<String>,
}

/// Opens a drive's image, writable unless the drive is read-only.
/// The same check as the configuration's (`PUT` and `PATCH /drives` take
/// the same files): a regular file or block device, opened without
/// blocking.
fn open_image(id: &str, path: &Path, read_only: bool) -> Result<File, DeviceError> {
    crate::config::files::open_checked(path, !read_only, crate::config::files::Accept::FileOrBlockDevice)
        .map_err(|reason| DeviceError::DriveOpen {
            id: id.to_string(),
            path: path.display().to_string(),
            reason,
        })
}

fn open_drive(d: &DriveConfig) -> Result<Arc<Mutex<Block>>, DeviceError> {
    let path = d.path();
    let file = open_image(&d.drive_id, path, d.is_read_only)?;
    let cache = match d.cache_type {
        CacheType::Unsafe => block::CacheType::Unsafe,
        CacheType::Writeback => block::CacheType::Writeback,
    };
    let mut dev =
        Block::new(file, d.is_read_only, cache, &d.drive_id).map_err(|source| DeviceError::Block {
            id: d.drive_id.clone(),
            source,
        })?;
    dev.set_rate_limiter(limiter(&d.drive_id, d.rate_limiter.as_ref())?);
    debug!(
        "drive {}: {} ({} sectors{})",
        d.drive_id,
        path.display(),
        dev.sectors(),
        if d.is_read_only { ", read-only" } else { "" }
    );
    Ok(Arc::new(Mutex::new(dev)))
}

/// Creates the configured devices and places them on `mmio`.
pub fn attach(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    chip: &Irqchip,
) -> Result<VirtioDevices, DeviceError> {
    let mut drives: Vec<&DriveConfig> = config.drives.iter().collect();
    // The root drive first: it becomes /dev/vda.
    drives.sort_by_key(|d| !d.is_root_device);
    // (id, device, the device again if it is a drive)
    type Created = (
        String,
        Arc<Mutex<dyn VirtioDevice>>,
        Option<Arc<Mutex<Block>>>,
        Option<Arc<Mutex<Net>>>,
    );
    let mut devices: Vec<Created> = Vec::new();
    let mut cmdline = Vec::new();
    for d in &drives {
        let block = open_drive(d)?;
        devices.push((d.drive_id.clone(), block.clone(), Some(block), None));
        if d.is_root_device {
            let mode = if d.is_read_only { "ro" } else { "rw" };
            match &d.partuuid {
                Some(uuid) => cmdline.push(format!("root=PARTUUID={uuid} {mode}")),
                None => cmdline.push(format!("root=/dev/vda {mode}")),
            }
        }
    }
    for n in &config.nets {
        let tap =
            sys::open_tap(&n.host_dev_name, VNET_HDR_LEN as i32).map_err(|source| DeviceError::Tap {
                id: n.iface_id.clone(),
                tap: n.host_dev_name.clone(),
                source,
            })?;
        let mut dev = Net::new(Box::new(tap), n.mac(), &n.iface_id).map_err(|source| DeviceError::Net {
            id: n.iface_id.clone(),
            source,
        })?;
        dev.set_rate_limiters(
            limiter(&n.iface_id, n.rx_rate_limiter.as_ref())?,
            limiter(&n.iface_id, n.tx_rate_limiter.as_ref())?,
        );
        let net = Arc::new(Mutex::new(dev));
        devices.push((n.iface_id.clone(), net.clone(), None, Some(net)));
    }
    if let Some(e) = &config.entropy {
        let id = "entropy";
        let source = Box::new(sys::getrandom_fill);
        let rng = Rng::new(source, Some(limiter(id, e.rate_limiter.as_ref())?)).map_err(|source| {
            DeviceError::RateLimiter {
                id: id.to_string(),
                source,
            }
        })?;
        devices.push((id.to_string(), Arc::new(Mutex::new(rng)), None, None));
    }
    if let Some(v) = &config.vsock {
        let path = std::path::PathBuf::from(&v.uds_path);
        let listener = vsock::bind(&path)?;
        let dev = vsock::Vsock::new(u64::from(v.guest_cid), path, listener)?;
        debug!("vsock: guest CID {}, host sockets at {}", v.guest_cid, v.uds_path);
        devices.push(("vsock".to_string(), Arc::new(Mutex::new(dev)), None, None));
    }

    let mut slots = Vec::new();
    for (i, (id, device, block, net)) in devices.into_iter().enumerate() {
        let addr = VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE;
        let irq = FIRST_VIRTIO_IRQ + i as u32;
        let transport = MmioTransport::new(
            device.clone(),
            mem.clone(),
            IrqLine::new(chip.controller.clone(), irq as usize),
        );
        let mmio_stats = transport.stats();
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), addr, VIRTIO_MMIO_SIZE)?;
        cmdline.push(format!("virtio_mmio.device=4K@{addr:#x}:{irq}"));
        slots.push(VirtioSlot {
            id,
            addr,
            irq,
            device,
            block,
            net,
            mmio: mmio_stats,
            transport,
        });
    }
    // Keep root= after the devices, as Firecracker does.
    cmdline.sort_by_key(|e| e.starts_with("root="));
    Ok(VirtioDevices { slots, cmdline })
}

/// Registers, in the background, each queue's notify register as an
/// ioeventfd and each device's pin as an irqfd (the latter with flatlet's
/// I/O APIC only).
pub fn register_fast_paths(
    vm: Arc<VmFd>,
    slots: Vec<VirtioSlot>,
    sink: Option<Arc<KvmMsiSink>>,
) -> Option<JoinHandle<()>> {
    if slots.is_empty() {
        return None;
    }
    let spawned = std::thread::Builder::new()
        .name("fl_fastpath".into())
        .spawn(move || {
            crate::thread::mask_stop_signals();
            let start = Instant::now();
            let (mut ioeventfds, mut irqfds) = (0, 0);
            for slot in &slots {
                let evts: Vec<EventFd> = lock(&slot.device)
                    .queue_events()
                    .iter()
                    .filter_map(|e| e.try_clone().ok())
                    .collect();
                for (i, evt) in evts.iter().enumerate() {
                    let addr = IoEventAddress::Mmio(slot.addr + REG_QUEUE_NOTIFY);
                    match vm.register_ioevent(evt, &addr, i as u32) {
                        Ok(()) => ioeventfds += 1,
                        Err(e) => warn!("{}: ioeventfd for queue {i}: {e}", slot.id),
                    }
                }
                let Some(sink) = &sink else { continue };
                let evt = match EventFd::new(EFD_NONBLOCK) {
                    Ok(e) => e,
                    Err(e) => {
                        warn!("{}: irqfd: {e}", slot.id);
                        continue;
                    }
                };
                match vm.register_irqfd(&evt, slot.irq) {
                    Ok(()) => {
                        sink.attach_irqfd(slot.irq as usize, evt);
                        irqfds += 1;
                    }
                    Err(e) => warn!("{}: irqfd on GSI {}: {e}", slot.id, slot.irq),
                }
            }
            info!(
                "virtio fast paths: {ioeventfds} ioeventfds and {irqfds} irqfds registered in {} us",
                start.elapsed().as_micros()
            );
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            warn!("cannot start the fast-path thread (MMIO exits will do): {e}");
            None
        }
    }
}

/// Opens the new image of a drive (`PATCH /drives`), read-only if the
/// drive is.
pub fn reopen_drive(block: &Mutex<Block>, id: &str, path: &str) -> Result<(), DeviceError> {
    let read_only = lock(block).read_only();
    let file = open_image(id, Path::new(path), read_only)?;
    lock(block)
        .replace_image(file)
        .map_err(|source| DeviceError::Block {
            id: id.to_string(),
            source,
        })
}
