//! `PUT /mmds/config`, and `mmds-config` in a config file.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::stack::DEFAULT_IPV4;
use crate::store::MmdsVersion;

/// Errors in an MMDS configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MmdsConfigError {
    /// No interface listed.
    #[error("The list of network interfaces that allow MMDS requests is empty.")]
    NoInterfaces,
    /// An interface id that no configured interface has.
    #[error("The network interface {0:?} of the MMDS configuration does not exist.")]
    UnknownInterface(String),
    /// The address is not a usable link-local address.
    #[error("The MMDS IPv4 address {0} is not a valid link-local address (169.254.1.0 to 169.254.254.255).")]
    Address(Ipv4Addr),
}

/// The MMDS configuration (Firecracker's `MmdsConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    /// The guest-side protocol (`V1` by default).
    #[serde(default)]
    pub version: MmdsVersion,
    /// Ids of the network interfaces whose guest traffic may reach MMDS.
    pub network_interfaces: Vec<String>,
    /// The address MMDS answers at (169.254.169.254 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<Ipv4Addr>,
    /// Answer in IMDS text whatever the guest accepts.
    #[serde(default)]
    pub imds_compat: bool,
}

impl MmdsConfig {
    /// The address MMDS answers at.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4_address.unwrap_or(DEFAULT_IPV4)
    }

    /// Checks the configuration against the ids of the configured network
    /// interfaces.
    pub fn validate<'a>(
        &self,
        iface_ids: impl IntoIterator<Item = &'a str> + Clone,
    ) -> Result<(), MmdsConfigError> {
        let ip = self.ipv4();
        if !is_usable_link_local(ip) {
            return Err(MmdsConfigError::Address(ip));
        }
        if self.network_interfaces.is_empty() {
            return Err(MmdsConfigError::NoInterfaces);
        }
        for id in &self.network_interfaces {
            if !iface_ids.clone().into_iter().any(|known| known == id) {
                return Err(MmdsConfigError::UnknownInterface(id.clone()));
            }
        }
        Ok(())
    }

    /// The configuration as `GET /vm/config` shows it: the address is
    /// always given.
    pub fn shown(&self) -> Self {
        Self {
            ipv4_address: Some(self.ipv4()),
            ..self.clone()
        }
    }
}

/// 169.254.0.0/16 without its first and last /24, which RFC 3927 reserves.
fn is_usable_link_local(ip: Ipv4Addr) -> bool {
    matches!(ip.octets(), [169, 254, 1..=254, _])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_and_validation() {
        let c: MmdsConfig = serde_json::from_str(r#"{"network_interfaces": ["eth0"]}"#).unwrap();
        assert_eq!(c.version, MmdsVersion::V1);
        assert_eq!(c.ipv4(), DEFAULT_IPV4);
        assert!(!c.imds_compat);
        assert_eq!(c.validate(["eth0", "eth1"]), Ok(()));
        assert_eq!(
            c.validate(["eth1"]),
            Err(MmdsConfigError::UnknownInterface("eth0".into()))
        );
        let c: MmdsConfig = serde_json::from_str(
            r#"{"network_interfaces": [], "version": "V2", "ipv4_address": "169.254.170.2", "imds_compat": true}"#,
        )
        .unwrap();
        assert_eq!(c.version, MmdsVersion::V2);
        assert_eq!(c.validate(["eth0"]), Err(MmdsConfigError::NoInterfaces));
        for bad in ["169.254.0.1", "169.254.255.1", "10.0.0.1"] {
            let c = MmdsConfig {
                ipv4_address: Some(bad.parse().unwrap()),
                ..c.clone()
            };
            assert!(matches!(c.validate(["eth0"]), Err(MmdsConfigError::Address(_))));
        }
        assert!(serde_json::from_str::<MmdsConfig>(r#"{"version": "V1"}"#).is_err());
        assert!(serde_json::from_str::<MmdsConfig>(r#"{"network_interfaces": [], "x": 1}"#).is_err());
        assert!(
            serde_json::from_str::<MmdsConfig>(r#"{"network_interfaces": [], "version": "V3"}"#).is_err()
        );
        let shown = serde_json::to_value(
            serde_json::from_str::<MmdsConfig>(r#"{"network_interfaces": ["eth0"]}"#)
                .unwrap()
                .shown(),
        )
        .unwrap();
        assert_eq!(
            shown,
            serde_json::json!({"version": "V1", "network_interfaces": ["eth0"],
                               "ipv4_address": "169.254.169.254", "imds_compat": false})
        );
    }
}
