//! The vsock device: Firecracker's `PUT /vsock` body (also the `vsock`
//! of a config file), and flatlet's `--vsock cid=N,uds=PATH`.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The smallest CID a guest may have (0 to 2 are reserved).
pub const MIN_GUEST_CID: u32 = 3;
/// Longest `uds_path`: a Unix socket path holds 107 bytes, and guest
/// connections use `<uds_path>_<port>` (up to 11 more).
pub const MAX_UDS_PATH: usize = 107 - 11;

/// `PUT /vsock`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Deprecated by Firecracker; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    /// The guest's CID.
    pub guest_cid: u32,
    /// Where flatlet listens for host connections.
    pub uds_path: String,
}

impl VsockConfig {
    /// Checks the CID and the path (the path's file is checked when the
    /// device is built: an existing file that is not a socket is refused).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.guest_cid < MIN_GUEST_CID {
            return Err(ConfigError::InvalidDevice(format!(
                "invalid guest_cid {}: it must be {MIN_GUEST_CID} or more",
                self.guest_cid
            )));
        }
        if self.uds_path.is_empty() {
            return Err(ConfigError::EmptyPath("uds_path"));
        }
        if self.uds_path.len() > MAX_UDS_PATH || self.uds_path.contains('\0') {
            return Err(ConfigError::InvalidDevice(format!(
                "invalid uds_path {:?}: at most {MAX_UDS_PATH} bytes, no NUL",
                self.uds_path
            )));
        }
        Ok(())
    }
}

/// Parses `--vsock cid=N,uds=PATH`.
pub fn parse_vsock_option(s: &str) -> Result<VsockConfig, ConfigError> {
    let mut cid = None;
    let mut uds = None;
    for p in s.split(',') {
        match p.split_once('=') {
            Some(("cid", v)) => {
                cid = Some(
                    v.parse::<u32>()
                        .map_err(|_| ConfigError::InvalidDevice(format!("invalid --vsock cid {v:?}")))?,
                )
            }
            Some(("uds", v)) => uds = Some(v.to_string()),
            _ => {
                return Err(ConfigError::InvalidDevice(format!(
                    "unknown --vsock option {p:?} (expected cid=N,uds=PATH)"
                )));
            }
        }
    }
    let (Some(guest_cid), Some(uds_path)) = (cid, uds) else {
        return Err(ConfigError::InvalidDevice(
            "--vsock needs cid=N and uds=PATH".into(),
        ));
    };
    let c = VsockConfig {
        vsock_id: None,
        guest_cid,
        uds_path,
    };
    c.validate()?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_body_and_checks() {
        let c: VsockConfig =
            serde_json::from_str(r#"{"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "/tmp/v.sock"}"#)
                .unwrap();
        c.validate().unwrap();
        assert_eq!(c.vsock_id.as_deref(), Some("vsock0"));
        let c: VsockConfig = serde_json::from_str(r#"{"guest_cid": 52, "uds_path": "/v"}"#).unwrap();
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({"guest_cid": 52, "uds_path": "/v"})
        );
        assert!(
            serde_json::from_str::<VsockConfig>(r#"{"guest_cid": 3, "uds_path": "/v", "x": 1}"#).is_err()
        );
        assert!(serde_json::from_str::<VsockConfig>(r#"{"guest_cid": 3}"#).is_err());
        for bad in [
            r#"{"guest_cid": 2, "uds_path": "/v"}"#,
            r#"{"guest_cid": 3, "uds_path": ""}"#,
        ] {
            let c: VsockConfig = serde_json::from_str(bad).unwrap();
            assert!(c.validate().is_err(), "{bad}");
        }
        let long = VsockConfig {
            vsock_id: None,
            guest_cid: 3,
            uds_path: "/".repeat(MAX_UDS_PATH + 1),
        };
        assert!(long.validate().is_err());
    }

    #[test]
    fn option_parsing() {
        let c = parse_vsock_option("cid=7,uds=/tmp/v.sock").unwrap();
        assert_eq!((c.guest_cid, c.uds_path.as_str()), (7, "/tmp/v.sock"));
        for bad in [
            "cid=7",
            "uds=/v",
            "cid=x,uds=/v",
            "cid=1,uds=/v",
            "cid=3,uds=/v,port=4",
        ] {
            assert!(parse_vsock_option(bad).is_err(), "{bad}");
        }
    }
}
