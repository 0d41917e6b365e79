//! VM configuration: the Firecracker-compatible JSON shapes of the API and
//! of `--config-file`, and their validation.
//!
//! Every body is a serde struct with `deny_unknown_fields` (Firecracker
//! rejects unknown fields too) and is validated before anything is built.

pub mod devices;
pub mod files;
pub mod rate_limit;
pub mod vsock;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::irqchip::IrqchipMode;
use crate::layout::CMDLINE_MAX_SIZE;

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 32;
/// Least guest memory, in MiB: low memory, the kernel at 1 MiB and room
/// for it to run.
pub const MIN_MEM_MIB: usize = 8;
/// Default vCPU count (Firecracker's).
pub const DEFAULT_VCPUS: u8 = 1;
/// Default memory size in MiB (Firecracker's).
pub const DEFAULT_MEM_MIB: usize = 128;

/// Errors in a configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// vCPU count out of range.
    #[error("invalid vCPU count {0}: it must be between 1 and {MAX_VCPUS}")]
    VcpuCount(u64),
    /// SMT asks for pairs of threads.
    #[error("with smt enabled the vCPU count must be 1 or even, not {0}")]
    SmtVcpuCount(u8),
    /// Memory below the minimum.
    #[error("guest memory of {0} MiB is too small: the minimum is {MIN_MEM_MIB} MiB")]
    MemoryTooSmall(usize),
    /// Memory above what the host has.
    #[error("guest memory of {requested} MiB is more than this host has ({host} MiB)")]
    MemoryTooLarge { requested: usize, host: usize },
    /// A Firecracker feature flatlet does not implement.
    #[error("{0} is not supported by flatlet")]
    Unsupported(String),
    /// Kernel command line too long.
    #[error("kernel command line is {len} bytes long: the limit is {max} bytes")]
    CmdlineTooLong { len: usize, max: usize },
    /// Kernel command line contains a byte the kernel cannot take.
    #[error("kernel command line contains a newline, NUL, another control byte or a non-ASCII byte")]
    CmdlineInvalid,
    /// No boot source configured.
    #[error("no kernel is configured (set a boot source first)")]
    MissingBootSource,
    /// A path is empty.
    #[error("{0} is empty")]
    EmptyPath(&'static str),
    /// A device is misconfigured.
    #[error("{0}")]
    InvalidDevice(String),
    /// A file cannot be read.
    #[error("cannot read {what} {path}: {reason}")]
    Unreadable {
        what: &'static str,
        path: String,
        reason: String,
    },
    /// The config file could not be read or parsed.
    #[error("config file {path}: {reason}")]
    File { path: String, reason: String },
}

/// Huge page backing of guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// Normal pages.
    #[default]
    None,
    /// Transparent huge pages.
    Transparent,
    /// Explicit 2 MiB hugetlbfs pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// `PUT /machine-config`, and `machine-config` in a config file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs (1 to 32).
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: usize,
    /// Simultaneous multithreading (two threads per core in the topology).
    #[serde(default)]
    pub smt: bool,
    /// Dirty page tracking (for snapshots; flatlet has none).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Huge page backing.
    #[serde(default)]
    pub huge_pages: HugePages,
    /// Deprecated CPU template; only `None` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// flatlet's own: the interrupt controller and timer (`split`, the
    /// default; `full`; `full-pit`). Shown only when not the default.
    #[serde(default, skip_serializing_if = "IrqchipMode::is_default")]
    pub irqchip: IrqchipMode,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: DEFAULT_VCPUS,
            mem_size_mib: DEFAULT_MEM_MIB,
            smt: false,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
            cpu_template: None,
            irqchip: IrqchipMode::Split,
        }
    }
}

/// `PATCH /machine-config`: any subset of the fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// New vCPU count.
    pub vcpu_count: Option<u8>,
    /// New memory size.
    pub mem_size_mib: Option<usize>,
    /// New SMT setting.
    pub smt: Option<bool>,
    /// New dirty tracking setting.
    pub track_dirty_pages: Option<bool>,
    /// New huge page setting.
    pub huge_pages: Option<HugePages>,
    /// New CPU template.
    pub cpu_template: Option<String>,
    /// New interrupt controller mode.
    pub irqchip: Option<IrqchipMode>,
}

impl MachineConfig {
    /// Applies a partial update.
    pub fn apply(&self, u: &MachineConfigUpdate) -> Self {
        Self {
            vcpu_count: u.vcpu_count.unwrap_or(self.vcpu_count),
            mem_size_mib: u.mem_size_mib.unwrap_or(self.mem_size_mib),
            smt: u.smt.unwrap_or(self.smt),
            track_dirty_pages: u.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            huge_pages: u.huge_pages.unwrap_or(self.huge_pages),
            cpu_template: u.cpu_template.clone().or_else(|| self.cpu_template.clone()),
            irqchip: u.irqchip.unwrap_or(self.irqchip),
        }
    }

    /// Checks the values against flatlet's limits and the host's memory.
    pub fn validate(&self, host: &HostLimits) -> Result<(), ConfigError> {
        if self.vcpu_count == 0 || self.vcpu_count > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(self.vcpu_count.into()));
        }
        if self.smt && self.vcpu_count > 1 && self.vcpu_count % 2 != 0 {
            return Err(ConfigError::SmtVcpuCount(self.vcpu_count));
        }
        if self.mem_size_mib < MIN_MEM_MIB {
            return Err(ConfigError::MemoryTooSmall(self.mem_size_mib));
        }
        if self.mem_size_mib > host.mem_mib {
            return Err(ConfigError::MemoryTooLarge {
                requested: self.mem_size_mib,
                host: host.mem_mib,
            });
        }
        if self.huge_pages == HugePages::Hugetlbfs2M {
            return Err(ConfigError::Unsupported("huge_pages \"2M\"".into()));
        }
        match self.cpu_template.as_deref() {
            None | Some("None") => Ok(()),
            Some(t) => Err(ConfigError::Unsupported(format!("cpu_template {t:?}"))),
        }
    }
}

/// `PUT /boot-source`, and `boot-source` in a config file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    /// Path of the kernel (ELF vmlinux or bzImage).
    pub kernel_image_path: String,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Path of an initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// Where the kernel comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// A file on the host.
    Path(PathBuf),
    /// An image built into flatlet (the test guest).
    Builtin(&'static [u8]),
}

/// A validated boot source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootSource {
    /// The kernel.
    pub kernel: Kernel,
    /// The command line as given (flatlet appends its own device entries).
    pub boot_args: Option<String>,
    /// The initrd.
    pub initrd: Option<PathBuf>,
}

impl From<&BootSourceConfig> for BootSource {
    /// The boot source a body describes, unchecked ([`BootSource::validate`]
    /// checks it).
    fn from(c: &BootSourceConfig) -> Self {
        Self {
            kernel: Kernel::Path(PathBuf::from(&c.kernel_image_path)),
            boot_args: c.boot_args.clone(),
            initrd: c.initrd_path.as_ref().map(PathBuf::from),
        }
    }
}

/// What flatlet shows for the built-in guest where a path is expected.
pub const BUILTIN_KERNEL_NAME: &str = "<built-in test guest>";

impl BootSource {
    /// Validates an API or config-file boot source.
    pub fn from_config(c: &BootSourceConfig) -> Result<Self, ConfigError> {
        let source = Self::from(c);
        source.validate()?;
        Ok(source)
    }

    /// Checks the command line, and that the kernel and initrd are
    /// readable files (what they contain is checked when the VM is built).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(args) = &self.boot_args {
            validate_cmdline(args)?;
        }
        if let Kernel::Path(p) = &self.kernel {
            if p.as_os_str().is_empty() {
                return Err(ConfigError::EmptyPath("kernel_image_path"));
            }
            check_readable_file("kernel", p)?;
        }
        if let Some(p) = &self.initrd {
            if p.as_os_str().is_empty() {
                return Err(ConfigError::EmptyPath("initrd_path"));
            }
            check_readable_file("initrd", p)?;
        }
        Ok(())
    }

    /// The configuration shape, for `GET /vm/config`.
    pub fn to_config(&self) -> BootSourceConfig {
        BootSourceConfig {
            kernel_image_path: match &self.kernel {
                Kernel::Path(p) => p.display().to_string(),
                Kernel::Builtin(_) => BUILTIN_KERNEL_NAME.to_string(),
            },
            boot_args: self.boot_args.clone(),
            initrd_path: self.initrd.as_ref().map(|p| p.display().to_string()),
        }
    }
}

/// Checks that `path` is a regular file this process can read.
fn check_readable_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let err = |reason: String| ConfigError::Unreadable {
        what,
        path: path.display().to_string(),
        reason,
    };
    files::open_checked(path, false, files::Accept::RegularFile)
        .map(drop)
        .map_err(err)
}

/// Checks a kernel command line: printable ASCII (and tabs) that fits,
/// with its NUL, in the kernel's buffer. A newline or another control
/// byte is refused: the kernel would take it as a separator the user did
/// not see.
pub fn validate_cmdline(args: &str) -> Result<(), ConfigError> {
    if !args
        .bytes()
        .all(|b| b == b'\t' || (b.is_ascii() && !b.is_ascii_control()))
    {
        return Err(ConfigError::CmdlineInvalid);
    }
    if args.len() >= CMDLINE_MAX_SIZE {
        return Err(ConfigError::CmdlineTooLong {
            len: args.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    Ok(())
}

/// What the host can give.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostLimits {
    /// Host memory (MemTotal) in MiB.
    pub mem_mib: usize,
}

impl HostLimits {
    /// Reads the host's limits from /proc.
    pub fn probe() -> Self {
        let mem_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| parse_mem_total_kib(&s))
            .map(|kib| kib / 1024)
            .unwrap_or(usize::MAX);
        Self { mem_mib }
    }
}

fn parse_mem_total_kib(meminfo: &str) -> Option<usize> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Everything a VM is built from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmConfig {
    /// vCPUs and memory.
    pub machine: MachineConfig,
    /// The kernel.
    pub boot: Option<BootSource>,
    /// Block devices, in the order they were added.
    pub drives: Vec<devices::DriveConfig>,
    /// Network interfaces, in the order they were added.
    pub nets: Vec<devices::NetConfig>,
    /// The entropy device, if any.
    pub entropy: Option<rate_limit::EntropyConfig>,
    /// Which interfaces serve MMDS, and how, if any do.
    pub mmds: Option<flatlet_mmds::MmdsConfig>,
    /// The vsock device, if any.
    pub vsock: Option<vsock::VsockConfig>,
}

/// Largest config file flatlet reads (1 MiB: a full VM takes a few KiB).
pub const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;

/// Firecracker's `--config-file` JSON. Keys of Firecracker features that
/// flatlet does not implement are recognised and refused by name.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    /// The kernel.
    pub boot_source: BootSourceConfig,
    /// Machine configuration (defaults apply when absent).
    #[serde(default)]
    pub machine_config: Option<MachineConfig>,
    /// Block devices.
    #[serde(default)]
    pub drives: Vec<devices::DriveConfig>,
    /// Network interfaces.
    #[serde(default)]
    pub network_interfaces: Vec<devices::NetConfig>,
    #[serde(default)]
    cpu_config: Option<serde_json::Value>,
    #[serde(default)]
    balloon: Option<serde_json::Value>,
    /// The vsock device.
    #[serde(default)]
    pub vsock: Option<vsock::VsockConfig>,
    /// The logger, configured as `PUT /logger` does.
    #[serde(default)]
    pub logger: Option<crate::logger::LoggerConfig>,
    /// The metrics file, configured as `PUT /metrics` does.
    #[serde(default)]
    pub metrics: Option<crate::metrics::MetricsConfig>,
    /// MMDS, configured as `PUT /mmds/config` does (its contents come
    /// from `--metadata`).
    #[serde(default)]
    pub mmds_config: Option<flatlet_mmds::MmdsConfig>,
    /// The entropy device, configured as `PUT /entropy` does.
    #[serde(default)]
    pub entropy: Option<rate_limit::EntropyConfig>,
    #[serde(default)]
    pmem: Option<serde_json::Value>,
    #[serde(default)]
    memory_hotplug: Option<serde_json::Value>,
}

impl ConfigFile {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let err = |reason: String| ConfigError::File {
            path: path.display().to_string(),
            reason,
        };
        let file = files::open_checked(path, false, files::Accept::RegularFile).map_err(err)?;
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(file, MAX_CONFIG_FILE_BYTES + 1),
            &mut text,
        )
        .map_err(|e| err(e.to_string()))?;
        if text.len() as u64 > MAX_CONFIG_FILE_BYTES {
            return Err(err(format!(
                "the file is larger than {MAX_CONFIG_FILE_BYTES} bytes"
            )));
        }
        Self::parse(&text).map_err(|e| match e {
            ConfigError::File { reason, .. } => err(reason),
            other => other,
        })
    }

    /// Parses config-file JSON.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let file: Self = serde_json::from_str(text).map_err(|e| ConfigError::File {
            path: String::new(),
            reason: e.to_string(),
        })?;
        file.refuse_unsupported()?;
        Ok(file)
    }

    fn refuse_unsupported(&self) -> Result<(), ConfigError> {
        let present = [
            ("cpu-config", self.cpu_config.is_some()),
            ("balloon", self.balloon.is_some()),
            ("pmem", self.pmem.is_some()),
            ("memory-hotplug", self.memory_hotplug.is_some()),
        ];
        match present.iter().find(|(_, p)| *p) {
            Some((key, _)) => Err(ConfigError::Unsupported(format!("the config-file key \"{key}\""))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostLimits = HostLimits { mem_mib: 4096 };

    fn machine(vcpus: u8, mem: usize) -> MachineConfig {
        MachineConfig {
            vcpu_count: vcpus,
            mem_size_mib: mem,
            ..Default::default()
        }
    }

    #[test]
    fn machine_limits() {
        assert!(machine(1, 128).validate(&HOST).is_ok());
        assert!(machine(32, 4096).validate(&HOST).is_ok());
        assert_eq!(machine(0, 128).validate(&HOST), Err(ConfigError::VcpuCount(0)));
        assert_eq!(machine(33, 128).validate(&HOST), Err(ConfigError::VcpuCount(33)));
        assert_eq!(machine(1, 4).validate(&HOST), Err(ConfigError::MemoryTooSmall(4)));
        assert_eq!(
            machine(1, 4097).validate(&HOST),
            Err(ConfigError::MemoryTooLarge {
                requested: 4097,
                host: 4096
            })
        );
        let smt = MachineConfig {
            smt: true,
            ..machine(3, 128)
        };
        assert_eq!(smt.validate(&HOST), Err(ConfigError::SmtVcpuCount(3)));
        let dirty = MachineConfig {
            track_dirty_pages: true,
            ..machine(1, 128)
        };
        // Dirty-page tracking is supported (Diff snapshots).
        assert_eq!(dirty.validate(&HOST), Ok(()));
        let template = MachineConfig {
            cpu_template: Some("T2".into()),
            ..machine(1, 128)
        };
        assert!(matches!(
            template.validate(&HOST),
            Err(ConfigError::Unsupported(_))
        ));
    }

    #[test]
    fn machine_config_json_matches_firecracker() {
        let c: MachineConfig = serde_json::from_str(r#"{"vcpu_count": 2, "mem_size_mib": 256}"#).unwrap();
        assert_eq!(c, machine(2, 256));
        let json = serde_json::to_value(MachineConfig::default()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false,
                               "track_dirty_pages": false, "huge_pages": "None"})
        );
        let hp: MachineConfig =
            serde_json::from_str(r#"{"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "2M"}"#).unwrap();
        assert_eq!(hp.huge_pages, HugePages::Hugetlbfs2M);
        assert!(serde_json::from_str::<MachineConfig>(r#"{"vcpu_count": 1}"#).is_err());
        assert!(
            serde_json::from_str::<MachineConfig>(r#"{"vcpu_count": 1, "mem_size_mib": 1, "x": 1}"#).is_err(),
            "unknown fields are refused"
        );
        assert!(serde_json::from_str::<MachineConfig>(r#"{"vcpu_count": 300, "mem_size_mib": 1}"#).is_err());
    }

    #[test]
    fn patch_applies_only_given_fields() {
        let u: MachineConfigUpdate = serde_json::from_str(r#"{"mem_size_mib": 512}"#).unwrap();
        assert_eq!(machine(4, 128).apply(&u), machine(4, 512));
    }

    #[test]
    fn cmdline_limits() {
        assert!(validate_cmdline("console=ttyS0 reboot=k").is_ok());
        assert!(validate_cmdline(&"a".repeat(2047)).is_ok());
        assert_eq!(
            validate_cmdline(&"a".repeat(2048)),
            Err(ConfigError::CmdlineTooLong { len: 2048, max: 2047 })
        );
        assert_eq!(validate_cmdline("a\0b"), Err(ConfigError::CmdlineInvalid));
        assert_eq!(validate_cmdline("caf\u{e9}"), Err(ConfigError::CmdlineInvalid));
    }

    #[test]
    fn boot_source_from_config() {
        let kernel = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let path = kernel.as_path().display().to_string();
        let c: BootSourceConfig = serde_json::from_str(&format!(
            r#"{{"kernel_image_path": "{path}", "boot_args": "console=ttyS0"}}"#
        ))
        .unwrap();
        let b = BootSource::from_config(&c).unwrap();
        assert_eq!(b.kernel, Kernel::Path(path.clone().into()));
        assert_eq!(b.to_config(), c);
        let missing = BootSourceConfig {
            kernel_image_path: "/nonexistent/vmlinux".into(),
            ..c.clone()
        };
        assert!(matches!(
            BootSource::from_config(&missing),
            Err(ConfigError::Unreadable { what: "kernel", .. })
        ));
        let dir = BootSourceConfig {
            initrd_path: Some("/".into()),
            ..c.clone()
        };
        let e = BootSource::from_config(&dir).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot read initrd /: it is a directory, not a regular file"
        );
        let empty = BootSourceConfig {
            kernel_image_path: String::new(),
            boot_args: None,
            initrd_path: None,
        };
        assert_eq!(
            BootSource::from_config(&empty),
            Err(ConfigError::EmptyPath("kernel_image_path"))
        );
        assert!(serde_json::from_str::<BootSourceConfig>(r#"{"boot_args": "x"}"#).is_err());
    }

    #[test]
    fn config_file_shape() {
        let f = ConfigFile::parse(
            r#"{"boot-source": {"kernel_image_path": "/vmlinux", "boot_args": "console=ttyS0"},
                "drives": [],
                "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false}}"#,
        )
        .unwrap();
        assert_eq!(f.boot_source.kernel_image_path, "/vmlinux");
        assert_eq!(f.machine_config, Some(machine(2, 256)));

        // boot-source is required; unknown keys are refused.
        assert!(ConfigFile::parse(r#"{"drives": []}"#).is_err());
        assert!(ConfigFile::parse(r#"{"boot-source": {"kernel_image_path": "/k"}, "bogus": 1}"#).is_err());
        // Firecracker features flatlet lacks are named.
        let e =
            ConfigFile::parse(r#"{"boot-source": {"kernel_image_path": "/k"}, "balloon": {}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the config-file key \"balloon\" is not supported by flatlet"
        );
    }

    #[test]
    fn meminfo_parsing() {
        let s = "MemTotal:       24576000 kB\nMemFree:        1 kB\n";
        assert_eq!(parse_mem_total_kib(s), Some(24_576_000));
        assert_eq!(parse_mem_total_kib("nothing"), None);
    }
}
