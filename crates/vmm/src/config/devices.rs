//! Block and network device configuration: Firecracker's `PUT /drives` and
//! `PUT /network-interfaces` bodies (also the `drives` and
//! `network-interfaces` of a config file), and flatlet's `--drive` and
//! `--net` options.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::rate_limit::RateLimiterConfig;

/// Most virtio devices a VM can have: one per I/O APIC pin from 5 to 23.
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// Longest Linux interface name.
const IFNAMSIZ: usize = 16;

/// Cache mode of a drive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// No flush: the guest's flushes are not honoured.
    #[default]
    Unsafe,
    /// Flushes become fdatasync of the image.
    Writeback,
}

/// The I/O engine (flatlet has the synchronous one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Blocking reads and writes on the VMM thread.
    #[default]
    Sync,
    /// io_uring (not in flatlet).
    Async,
}

/// `PUT /drives/{drive_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// The drive's id.
    pub drive_id: String,
    /// The image file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// Whether the guest boots from it (`root=/dev/vda`).
    pub is_root_device: bool,
    /// Root partition UUID (`root=PARTUUID=...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Read-only drive.
    #[serde(default)]
    pub is_read_only: bool,
    /// Cache mode.
    #[serde(default)]
    pub cache_type: CacheType,
    /// I/O engine.
    #[serde(default)]
    pub io_engine: IoEngine,
    /// Limits on the drive's bandwidth and operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// vhost-user socket (not in flatlet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The interface's id.
    pub iface_id: String,
    /// The TAP device on the host.
    pub host_dev_name: String,
    /// The guest's MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// MTU (not in flatlet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Limits on what the interface receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on what the interface sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

fn check_id(what: &'static str, id: &str) -> Result<(), ConfigError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::InvalidDevice(format!(
            "invalid {what} {id:?}: use 1 to 64 letters, digits, '_' or '-'"
        )))
    }
}

/// A partition UUID goes on the kernel command line (`root=PARTUUID=`):
/// only hex digits and dashes (a GPT UUID, or MBR's `SSSSSSSS-PP`), so
/// nothing else can ride along.
fn check_partuuid(uuid: &str) -> Result<(), ConfigError> {
    let ok = (1..=36).contains(&uuid.len()) && uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::InvalidDevice(format!(
            "invalid partuuid {uuid:?}: use a partition UUID (hex digits and '-', at most 36)"
        )))
    }
}

fn check_limiter(what: &str, v: Option<&RateLimiterConfig>) -> Result<(), ConfigError> {
    v.map_or(Ok(()), |r| r.validate(what))
}

impl DriveConfig {
    /// Checks the drive on its own (the set of drives is checked by
    /// [`validate_drives`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_id("drive_id", &self.drive_id)?;
        if self.socket.is_some() {
            return Err(ConfigError::Unsupported("vhost-user drives (socket)".into()));
        }
        if self.io_engine == IoEngine::Async {
            return Err(ConfigError::Unsupported("io_engine \"Async\"".into()));
        }
        check_limiter("rate_limiter", self.rate_limiter.as_ref())?;
        if let Some(uuid) = &self.partuuid {
            check_partuuid(uuid)?;
        }
        let path = self
            .path_on_host
            .as_deref()
            .filter(|p| !p.is_empty())
            .ok_or(ConfigError::EmptyPath("path_on_host"))?;
        super::files::open_checked(
            Path::new(path),
            !self.is_read_only,
            super::files::Accept::FileOrBlockDevice,
        )
        .map_err(|reason| ConfigError::Unreadable {
            what: "drive",
            path: path.into(),
            reason,
        })?;
        Ok(())
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        Path::new(self.path_on_host.as_deref().unwrap_or(""))
    }
}

/// Checks a set of drives: unique ids, at most one root device (in time
/// linear in their number).
pub fn validate_drives(drives: &[DriveConfig]) -> Result<(), ConfigError> {
    let mut ids = std::collections::HashSet::with_capacity(drives.len());
    for d in drives {
        if !ids.insert(d.drive_id.as_str()) {
            return Err(ConfigError::InvalidDevice(format!(
                "two drives have the id {:?}",
                d.drive_id
            )));
        }
    }
    if drives.iter().filter(|d| d.is_root_device).count() > 1 {
        return Err(ConfigError::InvalidDevice(
            "more than one drive is the root device".into(),
        ));
    }
    Ok(())
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || ConfigError::InvalidDevice(format!("invalid MAC address {s:?}"));
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

impl NetConfig {
    /// Checks the interface on its own.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_id("iface_id", &self.iface_id)?;
        if self.host_dev_name.is_empty()
            || self.host_dev_name.len() >= IFNAMSIZ
            || self.host_dev_name.contains(['/', ' ', '\0'])
        {
            return Err(ConfigError::InvalidDevice(format!(
                "invalid TAP name {:?}: 1 to 15 characters, no '/' or spaces",
                self.host_dev_name
            )));
        }
        if let Some(mac) = &self.guest_mac {
            let m = parse_mac(mac)?;
            if m[0] & 1 != 0 {
                return Err(ConfigError::InvalidDevice(format!(
                    "{mac} is a multicast address"
                )));
            }
        }
        if self.mtu.is_some() {
            return Err(ConfigError::Unsupported("mtu".into()));
        }
        check_limiter("rx_rate_limiter", self.rx_rate_limiter.as_ref())?;
        check_limiter("tx_rate_limiter", self.tx_rate_limiter.as_ref())
    }

    /// The guest MAC, if one is set (and valid).
    pub fn mac(&self) -> Option<[u8; 6]> {
        self.guest_mac.as_deref().and_then(|m| parse_mac(m).ok())
    }
}

/// `PATCH /drives/{drive_id}`: a new image for a running drive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    /// The drive's id.
    pub drive_id: String,
    /// The new image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// Limits on the drive's bandwidth and operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl DriveUpdate {
    /// Checks what can be checked without the drive.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_id("drive_id", &self.drive_id)?;
        check_limiter("rate_limiter", self.rate_limiter.as_ref())?;
        if self.path_on_host.as_deref() == Some("") {
            return Err(ConfigError::EmptyPath("path_on_host"));
        }
        Ok(())
    }
}

/// `PATCH /network-interfaces/{iface_id}`: rate limiters only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetUpdate {
    /// The interface's id.
    pub iface_id: String,
    /// Limits on what the interface receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on what the interface sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

impl NetUpdate {
    /// Checks the update.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_id("iface_id", &self.iface_id)?;
        check_limiter("rx_rate_limiter", self.rx_rate_limiter.as_ref())?;
        check_limiter("tx_rate_limiter", self.tx_rate_limiter.as_ref())
    }
}

/// Checks a set of interfaces: unique ids and TAP names.
pub fn validate_nets(nets: &[NetConfig]) -> Result<(), ConfigError> {
    let mut ids = std::collections::HashSet::with_capacity(nets.len());
    let mut taps = std::collections::HashSet::with_capacity(nets.len());
    for n in nets {
        if !ids.insert(n.iface_id.as_str()) {
            return Err(ConfigError::InvalidDevice(format!(
                "two interfaces have the id {:?}",
                n.iface_id
            )));
        }
        if !taps.insert(n.host_dev_name.as_str()) {
            return Err(ConfigError::InvalidDevice(format!(
                "two interfaces use the TAP {:?}",
                n.host_dev_name
            )));
        }
    }
    Ok(())
}

/// Checks the total device count.
pub fn validate_count(drives: usize, nets: usize) -> Result<(), ConfigError> {
    if drives.saturating_add(nets) > MAX_VIRTIO_DEVICES {
        return Err(ConfigError::InvalidDevice(format!(
            "too many devices: {drives} drives and {nets} network interfaces make {} virtio \
             devices, and a microVM has at most {MAX_VIRTIO_DEVICES}",
            drives.saturating_add(nets)
        )));
    }
    Ok(())
}

/// Parses `--drive PATH[,ro][,root][,id=ID][,cache=unsafe|writeback]`;
/// `index` names drives without an id (`drive0`, `drive1`, ...).
pub fn parse_drive_option(s: &str, index: usize) -> Result<DriveConfig, ConfigError> {
    let mut parts = s.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or(ConfigError::EmptyPath("--drive"))?;
    let mut d = DriveConfig {
        drive_id: format!("drive{index}"),
        path_on_host: Some(path.to_string()),
        is_root_device: false,
        partuuid: None,
        is_read_only: false,
        cache_type: CacheType::Unsafe,
        io_engine: IoEngine::Sync,
        rate_limiter: None,
        socket: None,
    };
    for p in parts {
        match p.split_once('=') {
            None if p == "ro" => d.is_read_only = true,
            None if p == "root" => d.is_root_device = true,
            Some(("id", id)) => d.drive_id = id.to_string(),
            Some(("cache", "unsafe")) => d.cache_type = CacheType::Unsafe,
            Some(("cache", "writeback")) => d.cache_type = CacheType::Writeback,
            _ => {
                return Err(ConfigError::InvalidDevice(format!(
                    "unknown --drive option {p:?} (expected ro, root, id=ID, cache=unsafe|writeback)"
                )));
            }
        }
    }
    Ok(d)
}

/// Parses `--net TAP[,mac=MAC][,id=ID]`.
pub fn parse_net_option(s: &str, index: usize) -> Result<NetConfig, ConfigError> {
    let mut parts = s.split(',');
    let tap = parts.next().unwrap_or_default();
    let mut n = NetConfig {
        iface_id: format!("net{index}"),
        host_dev_name: tap.to_string(),
        guest_mac: None,
        mtu: None,
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    };
    for p in parts {
        match p.split_once('=') {
            Some(("mac", mac)) => n.guest_mac = Some(mac.to_string()),
            Some(("id", id)) => n.iface_id = id.to_string(),
            _ => {
                return Err(ConfigError::InvalidDevice(format!(
                    "unknown --net option {p:?} (expected mac=MAC, id=ID)"
                )));
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_option_parsing() {
        let d = parse_drive_option("/img,ro,root,id=rootfs,cache=writeback", 3).unwrap();
        assert_eq!(d.path_on_host.as_deref(), Some("/img"));
        assert!(d.is_read_only && d.is_root_device);
        assert_eq!(d.drive_id, "rootfs");
        assert_eq!(d.cache_type, CacheType::Writeback);
        assert_eq!(parse_drive_option("/img", 2).unwrap().drive_id, "drive2");
        assert!(parse_drive_option("/img,rw", 0).is_err());
        assert!(parse_drive_option("", 0).is_err());
    }

    #[test]
    fn net_option_parsing() {
        let n = parse_net_option("tap0,mac=06:00:ac:10:00:02,id=eth0", 0).unwrap();
        assert_eq!(n.host_dev_name, "tap0");
        assert_eq!(n.mac(), Some([6, 0, 0xac, 0x10, 0, 2]));
        assert_eq!(n.iface_id, "eth0");
        assert!(parse_net_option("tap0,speed=10", 0).is_err());
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("ff:00:0a:Bc:12:34").unwrap(),
            [0xff, 0, 0x0a, 0xbc, 0x12, 0x34]
        );
        for bad in [
            "",
            "ff:00",
            "ff:00:0a:bc:12:34:56",
            "gg:00:0a:bc:12:34",
            "f:00:0a:bc:12:345",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn drive_validation() {
        let img = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let mut d = parse_drive_option(img.as_path().to_str().unwrap(), 0).unwrap();
        d.validate().unwrap();
        d.io_engine = IoEngine::Async;
        assert!(matches!(d.validate(), Err(ConfigError::Unsupported(_))));
        d.io_engine = IoEngine::Sync;
        d.rate_limiter = serde_json::from_str(r#"{"bandwidth": {"size": 1, "refill_time": 1}}"#).unwrap();
        d.validate().unwrap();
        d.rate_limiter = None;
        d.validate().unwrap();
        d.drive_id = "bad id".into();
        assert!(d.validate().is_err());
        let missing = parse_drive_option("/nonexistent.img", 0).unwrap();
        assert!(matches!(missing.validate(), Err(ConfigError::Unreadable { .. })));
        let dir = parse_drive_option("/", 0).unwrap();
        assert!(dir.validate().is_err());

        let a = parse_drive_option("/a,root", 0).unwrap();
        let b = parse_drive_option("/b,root", 1).unwrap();
        assert!(validate_drives(&[a.clone(), b.clone()]).is_err(), "two roots");
        let b2 = DriveConfig {
            drive_id: "drive0".into(),
            is_root_device: false,
            ..b
        };
        assert!(validate_drives(&[a, b2]).is_err(), "duplicate id");
    }

    #[test]
    fn net_validation() {
        let ok = parse_net_option("tap0", 0).unwrap();
        ok.validate().unwrap();
        for bad in ["", "a/b", "name-that-is-too-long"] {
            assert!(parse_net_option(bad, 0).unwrap().validate().is_err(), "{bad:?}");
        }
        let multicast = parse_net_option("tap0,mac=01:00:00:00:00:01", 0).unwrap();
        assert!(multicast.validate().is_err());
        let dup_tap = parse_net_option("tap0", 1).unwrap();
        assert!(validate_nets(&[ok, dup_tap]).is_err());
        assert!(validate_count(10, 9).is_ok());
        assert!(validate_count(10, 10).is_err());
    }

    #[test]
    fn firecracker_json_shapes() {
        let d: DriveConfig = serde_json::from_str(
            r#"{"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": true,
                "is_read_only": false, "cache_type": "Writeback", "io_engine": "Sync", "rate_limiter": null}"#,
        )
        .unwrap();
        assert_eq!(d.cache_type, CacheType::Writeback);
        assert!(
            serde_json::from_str::<DriveConfig>(r#"{"drive_id": "x", "is_root_device": false, "y": 1}"#)
                .is_err()
        );
        assert!(
            serde_json::from_str::<DriveConfig>(r#"{"drive_id": "x"}"#).is_err(),
            "is_root_device is required"
        );
        let n: NetConfig = serde_json::from_str(
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01"}"#,
        )
        .unwrap();
        assert_eq!(n.mac(), Some([6, 0, 0, 0, 0, 1]));
        assert!(serde_json::from_str::<NetConfig>(r#"{"iface_id": "eth0"}"#).is_err());
    }
}
