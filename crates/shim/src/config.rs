//! The shim's configuration: where flatlet, the jailer, the guest kernel
//! and the agent image are, and the VM's size. A JSON file,
//! `/etc/flatlet/shim.json` (or `FLATLET_SHIM_CONFIG`); every key has a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The default configuration file.
pub const DEFAULT_PATH: &str = "/etc/flatlet/shim.json";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: String, source: serde_json::Error },
    #[error("{path}: {what}")]
    Invalid { path: String, what: String },
}

/// What `/etc/flatlet/shim.json` holds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The flatlet binary (copied into each jail by the jailer).
    pub flatlet: PathBuf,
    /// The flatlet-jailer binary.
    pub jailer: PathBuf,
    /// The guest kernel (tools/build-linux-guest).
    pub kernel: PathBuf,
    /// The agent's image (tools/build-agent-image).
    pub agent_image: PathBuf,
    /// Extra kernel command-line words.
    pub boot_args: String,
    /// vCPUs per VM.
    pub vcpus: u8,
    /// Memory per VM, MiB.
    pub mem_mib: u32,
    /// How long the agent may take to answer after the VM starts (a
    /// Linux boot on a nested host takes minutes).
    pub boot_timeout_secs: u64,
    /// The jailer's chroot base (jails go in `<base>/flatlet/<id>`).
    pub jail_base: PathBuf,
    /// The cgroup each VM's cgroup goes in (the jailer's
    /// `--parent-cgroup`), under every controller it uses.
    pub parent_cgroup: String,
    /// The host's cgroup version for the jailer: 1 (a controller per
    /// hierarchy) or 2 (unified).
    pub cgroup_version: u8,
    /// cgroup settings for each VM (`FILE=VALUE`, the jailer's
    /// `--cgroup`), e.g. `memory.limit_in_bytes=335544320`; every VM also
    /// gets `pids.max` (its vCPUs and a few more threads: the VMM never
    /// forks).
    pub cgroups: Vec<String>,
    /// Per-container files: `<state_dir>/<namespace>/<id>`.
    pub state_dir: PathBuf,
    /// The user and group flatlet runs as in its jail.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// Restore each container's VM from a template snapshot (booted once)
    /// instead of booting it.
    pub template: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            flatlet: "/usr/local/bin/flatlet".into(),
            jailer: "/usr/local/bin/flatlet-jailer".into(),
            kernel: "/var/lib/flatlet/vmlinux".into(),
            agent_image: "/var/lib/flatlet/agent.ext4".into(),
            boot_args: "console=ttyS0 reboot=k panic=1".into(),
            vcpus: 1,
            mem_mib: 256,
            boot_timeout_secs: 900,
            jail_base: "/var/lib/flatlet-shim/jail".into(),
            parent_cgroup: "flatlet".into(),
            cgroup_version: 1,
            cgroups: Vec::new(),
            state_dir: "/var/lib/flatlet-shim/state".into(),
            uid: 65534,
            gid: 65534,
            template: true,
        }
    }
}

impl Config {
    /// Reads the configuration file (`FLATLET_SHIM_CONFIG` or the default);
    /// a missing default file means the defaults.
    pub fn load() -> Result<Self, ConfigError> {
        match std::env::var_os("FLATLET_SHIM_CONFIG") {
            Some(p) => Self::from_file(Path::new(&p)),
            None if Path::new(DEFAULT_PATH).exists() => Self::from_file(Path::new(DEFAULT_PATH)),
            None => Ok(Self::default()),
        }
    }

    /// Reads and checks one file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let config: Self = serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: shown.clone(),
            source,
        })?;
        config
            .validate()
            .map_err(|what| ConfigError::Invalid { path: shown, what })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.vcpus == 0 || self.vcpus > 32 {
            return Err(format!("vcpus {} is not 1 to 32", self.vcpus));
        }
        if self.mem_mib < 64 {
            return Err(format!("mem_mib {} is under 64", self.mem_mib));
        }
        let cgroup = Path::new(&self.parent_cgroup);
        if self.parent_cgroup.is_empty()
            || !cgroup
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            return Err(format!(
                "parent_cgroup {:?} must be a relative path without . or ..",
                self.parent_cgroup
            ));
        }
        if !matches!(self.cgroup_version, 1 | 2) {
            return Err(format!("cgroup_version {} is not 1 or 2", self.cgroup_version));
        }
        for (name, p) in [("jail_base", &self.jail_base), ("state_dir", &self.state_dir)] {
            if !p.is_absolute() {
                return Err(format!("{name} must be an absolute path"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_partial_file_keeps_the_other_defaults_and_bad_values_are_refused() {
        let dir = std::env::temp_dir().join(format!("flatlet-shim-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("shim.json");
        std::fs::write(&f, r#"{"mem_mib": 512, "kernel": "/k"}"#).unwrap();
        let c = Config::from_file(&f).unwrap();
        assert_eq!((c.mem_mib, c.vcpus), (512, 1));
        assert_eq!(c.kernel, PathBuf::from("/k"));
        for bad in [
            r#"{"mem_mib": 8}"#,
            r#"{"vcpus": 0}"#,
            r#"{"state_dir": "rel"}"#,
            r#"{"parent_cgroup": "../escape"}"#,
            r#"{"parent_cgroup": "/abs"}"#,
            r#"{"parent_cgroup": ""}"#,
            r#"{"cgroup_version": 3}"#,
            r#"{"nope": 1}"#,
        ] {
            std::fs::write(&f, bad).unwrap();
            assert!(Config::from_file(&f).is_err(), "{bad}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
