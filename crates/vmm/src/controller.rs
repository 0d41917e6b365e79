//! The controller: the VM's state machine. The CLI, a config file and the
//! API all turn into the same [`Request`]s, handled here by one `match` on
//! (state, request).

use std::io::Write;
use std::sync::{Arc, Mutex};

use flatlet_mmds::{Mmds, MmdsConfig, MmdsConfigError, StoreError};
use log::info;
use serde::Serialize;

use crate::config::devices::{self, DriveConfig, DriveUpdate, NetConfig, NetUpdate};
use crate::config::rate_limit::{EntropyConfig, RateLimiterConfig};
use crate::config::vsock::VsockConfig;
use crate::config::{BootSource, ConfigError, HostLimits, MachineConfig, MachineConfigUpdate, VmConfig};
use crate::exit::{EXIT_BAD_CONFIG, EXIT_ERROR, VmExit};
use crate::host::HostKind;
use crate::logger::{self, LoggerConfig};
use crate::metrics::{
    DeviceCounters, Latencies, MetricsConfig, MetricsSink, RequestCounters, Snapshot, Startup, device_kind,
};
use crate::mmds::{self, SharedMmds};
use crate::vm::{self, BuildContext, BuildError, Vm};

pub use flatlet_devices::boot_timer::StartTime;

/// flatlet's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The version of Firecracker's API whose behaviour flatlet follows (its
/// OpenAPI file's `info.version`), reported by `GET /version` as
/// `firecracker_version`.
pub const FIRECRACKER_API_VERSION: &str = "1.17.0-dev";

/// Something asked of the VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /drives/{id}`: adds a drive, or replaces the one with its id.
    PutDrive(DriveConfig),
    /// `PUT /network-interfaces/{id}`: adds or replaces an interface.
    PutNetworkInterface(NetConfig),
    /// `InstanceStart`.
    Start,
    /// `PATCH /vm` Paused.
    Pause,
    /// `PATCH /vm` Resumed.
    Resume,
    /// `SendCtrlAltDel`.
    SendCtrlAltDel,
    /// `GET /vm/config`.
    GetVmConfig,
    /// `GET /version`.
    GetVersion,
    /// `PATCH /drives/{id}` (after start).
    PatchDrive(DriveUpdate),
    /// `PATCH /network-interfaces/{id}` (after start).
    PatchNetworkInterface(NetUpdate),
    /// `PUT /logger`.
    PutLogger(LoggerConfig),
    /// `PUT /metrics`.
    PutMetrics(MetricsConfig),
    /// `FlushMetrics`.
    FlushMetrics,
    /// `PUT /entropy`: adds the entropy device.
    PutEntropy(EntropyConfig),
    /// `GET /mmds`.
    GetMmds,
    /// `PUT /snapshot/create`.
    CreateSnapshot(crate::snapshot::SnapshotCreateParams),
    /// `PUT /snapshot/load`.
    LoadSnapshot(crate::snapshot::SnapshotLoadParams),
    /// `PUT /mmds`: replaces the MMDS contents (also `--metadata`).
    PutMmds(serde_json::Value),
    /// `PATCH /mmds`: a JSON merge patch of the MMDS contents.
    PatchMmds(serde_json::Value),
    /// `PUT /mmds/config`.
    PutMmdsConfig(MmdsConfig),
    /// `PUT /vsock`: adds (or replaces) the vsock device.
    PutVsock(VsockConfig),
}

/// `GET /` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InstanceInfo {
    /// The VMM's name.
    pub app_name: String,
    /// The instance id.
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    /// The VMM's version.
    pub vmm_version: String,
}

/// `GET /vm/config` body (Firecracker's `FullVmConfiguration`, for the
/// parts flatlet has).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FullVmConfig {
    /// The boot source.
    #[serde(rename = "boot-source", skip_serializing_if = "Option::is_none")]
    pub boot_source: Option<crate::config::BootSourceConfig>,
    /// The machine.
    #[serde(rename = "machine-config")]
    pub machine_config: MachineConfig,
    /// Block devices.
    pub drives: Vec<DriveConfig>,
    /// Network interfaces.
    #[serde(rename = "network-interfaces")]
    pub network_interfaces: Vec<NetConfig>,
    /// The logger, if configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logger: Option<LoggerConfig>,
    /// The metrics, if configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    /// The entropy device, if configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyConfig>,
    /// MMDS, if configured (its address always shown).
    #[serde(rename = "mmds-config", skip_serializing_if = "Option::is_none")]
    pub mmds_config: Option<MmdsConfig>,
    /// The vsock device, if configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
}

/// What a request returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// Done, nothing to say.
    Empty,
    /// Instance information.
    InstanceInfo(InstanceInfo),
    /// Machine configuration.
    MachineConfig(MachineConfig),
    /// Full configuration.
    VmConfig(Box<FullVmConfig>),
    /// The VMM's version.
    Version(String),
    /// The MMDS contents.
    Mmds(serde_json::Value),
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The request is not allowed in the current state.
    #[error("{0}")]
    State(&'static str),
    /// The VM could not be built.
    #[error("cannot start the microVM: {0}")]
    Build(#[from] BuildError),
    /// vCPUs did not do as asked.
    #[error("{0}")]
    Vcpu(String),
    /// A host I/O operation failed.
    #[error("{0}")]
    Io(String),
    /// The MMDS data store refused a change.
    #[error("MMDS: {0}")]
    Mmds(#[from] StoreError),
    /// An invalid MMDS configuration.
    #[error(transparent)]
    MmdsConfig(#[from] MmdsConfigError),
    /// A snapshot's files cannot be loaded (bad input: exit 2, 400).
    #[error("Cannot load the snapshot: {0}")]
    Snapshot(String),
}

impl ControllerError {
    /// The process exit code when this error ends flatlet.
    pub fn exit_code(&self) -> i32 {
        match self {
            ControllerError::Config(_)
            | ControllerError::State(_)
            | ControllerError::Mmds(_)
            | ControllerError::MmdsConfig(_)
            | ControllerError::Snapshot(_) => EXIT_BAD_CONFIG,
            ControllerError::Build(e) => e.exit_code(),
            ControllerError::Vcpu(_) | ControllerError::Io(_) => EXIT_ERROR,
        }
    }

    /// The HTTP status of this error (Firecracker's 413 for MMDS contents
    /// over the limit, 400 for the rest).
    pub fn http_status(&self) -> u16 {
        match self {
            ControllerError::Mmds(StoreError::TooLarge { .. }) => 413,
            _ => 400,
        }
    }
}

const NOT_AFTER_START: &str = "The requested operation is not supported after starting the microVM.";
const NOT_BEFORE_START: &str = "The requested operation is not supported before starting the microVM.";
const EXITED: &str = "The microVM has exited.";

enum State {
    NotStarted,
    Running(Vm),
    Paused(Vm),
    Exited,
}

/// The controller.
pub struct Controller {
    id: String,
    config: VmConfig,
    state: State,
    host: HostKind,
    limits: HostLimits,
    serial_out: ConsoleFactory,
    kick_signal: i32,
    metrics: Option<MetricsSink>,
    counters: RequestCounters,
    /// Where the boot time counts from, if the caller gave it.
    start: Option<StartTime>,
    startup: Startup,
    latencies: Latencies,
    /// The logger settings given so far (for `GET /vm/config`).
    logger: Option<LoggerConfig>,
    /// The MMDS data store (the net devices serving it share it).
    mmds: SharedMmds,
}

/// Makes the writer guest console output goes to.
pub type ConsoleFactory = Box<dyn Fn() -> Box<dyn Write + Send> + Send>;

impl Controller {
    /// A controller for instance `id`, with no VM yet.
    pub fn new(
        id: String,
        host: HostKind,
        limits: HostLimits,
        serial_out: ConsoleFactory,
        kick_signal: i32,
    ) -> Self {
        Self {
            id,
            config: VmConfig::default(),
            state: State::NotStarted,
            host,
            limits,
            serial_out,
            kick_signal,
            metrics: None,
            counters: RequestCounters::default(),
            start: None,
            startup: Startup::default(),
            latencies: Latencies::default(),
            logger: None,
            mmds: Arc::new(Mutex::new(Mmds::default())),
        }
    }

    /// Bounds the MMDS data store to `limit` bytes of JSON
    /// (`--mmds-size-limit`).
    pub fn set_mmds_size_limit(&mut self, limit: usize) {
        mmds::lock(&self.mmds).set_limit(limit);
    }

    /// Makes the boot time count from `start` (Firecracker's
    /// `--start-time-us`) instead of the start of the VM build.
    pub fn set_start(&mut self, start: StartTime) {
        self.start = Some(start);
    }

    /// Records the process's start-up times (for metrics).
    pub fn set_startup(&mut self, startup: Startup) {
        self.startup = startup;
    }

    /// The running (or paused) VM.
    pub fn vm(&self) -> Option<&Vm> {
        match &self.state {
            State::Running(vm) | State::Paused(vm) => Some(vm),
            _ => None,
        }
    }

    fn state_name(&self) -> &'static str {
        match self.state {
            State::NotStarted => "Not started",
            State::Running(_) => "Running",
            State::Paused(_) => "Paused",
            State::Exited => "Exited",
        }
    }

    /// Handles one request.
    pub fn handle(&mut self, req: Request) -> Result<Response, ControllerError> {
        self.counters.requests += 1;
        let metric = api_metric(&req);
        let result = self.dispatch(req);
        if result.is_err() {
            self.counters.errors += 1;
        }
        if let Some((group, name)) = metric {
            self.counters.count(group, name, result.is_err());
        }
        result
    }

    fn dispatch(&mut self, req: Request) -> Result<Response, ControllerError> {
        match (&self.state, req) {
            (_, Request::GetInstanceInfo) => Ok(Response::InstanceInfo(InstanceInfo {
                app_name: "flatlet".into(),
                id: self.id.clone(),
                state: self.state_name().into(),
                vmm_version: VERSION.into(),
            })),
            (_, Request::GetMachineConfig) => Ok(Response::MachineConfig(self.config.machine.clone())),
            (_, Request::GetVersion) => Ok(Response::Version(VERSION.into())),
            (_, Request::PutLogger(c)) => {
                logger::configure(&c)?;
                self.logger = Some(merge_logger(self.logger.take(), c));
                Ok(Response::Empty)
            }
            (_, Request::PutMetrics(c)) => {
                if self.metrics.is_some() {
                    return Err(ControllerError::State(
                        "The metrics system is already initialized.",
                    ));
                }
                self.metrics = Some(MetricsSink::open(&c)?);
                Ok(Response::Empty)
            }
            // As Firecracker: an action on a running VM, that does
            // nothing when no metrics file is set.
            (State::NotStarted, Request::FlushMetrics) => Err(ControllerError::State(NOT_BEFORE_START)),
            (_, Request::FlushMetrics) if self.metrics.is_none() => Ok(Response::Empty),
            (_, Request::FlushMetrics) => self.flush_metrics(),
            (_, Request::GetVmConfig) => Ok(Response::VmConfig(Box::new(FullVmConfig {
                boot_source: self.config.boot.as_ref().map(BootSource::to_config),
                machine_config: self.config.machine.clone(),
                drives: self.config.drives.clone(),
                network_interfaces: self.config.nets.clone(),
                logger: self.logger.clone(),
                metrics: self.metrics.as_ref().map(|m| m.config().clone()),
                entropy: self.config.entropy,
                mmds_config: self.config.mmds.as_ref().map(MmdsConfig::shown),
                vsock: self.config.vsock.clone(),
            }))),
            // The data store, in any state (as Firecracker).
            (_, Request::GetMmds) => Ok(Response::Mmds(mmds::lock(&self.mmds).contents())),
            (_, Request::PutMmds(value)) => {
                mmds::lock(&self.mmds).put(value)?;
                Ok(Response::Empty)
            }
            (_, Request::PatchMmds(patch)) => {
                mmds::lock(&self.mmds).patch(&patch)?;
                Ok(Response::Empty)
            }
            (State::NotStarted, Request::PutMachineConfig(m)) => {
                m.validate(&self.limits)?;
                self.config.machine = m;
                Ok(Response::Empty)
            }
            (State::NotStarted, Request::PatchMachineConfig(u)) => {
                let m = self.config.machine.apply(&u);
                m.validate(&self.limits)?;
                self.config.machine = m;
                Ok(Response::Empty)
            }
            (State::NotStarted, Request::PutBootSource(b)) => {
                b.validate()?;
                self.config.boot = Some(b);
                Ok(Response::Empty)
            }
            (State::NotStarted, Request::PutDrive(d)) => {
                d.validate()?;
                let mut drives = self.config.drives.clone();
                upsert(&mut drives, d, |a, b| a.drive_id == b.drive_id);
                devices::validate_drives(&drives)?;
                devices::validate_count(drives.len(), self.config.nets.len())?;
                self.config.drives = drives;
                Ok(Response::Empty)
            }
            (State::NotStarted, Request::PutNetworkInterface(n)) => {
                n.validate()?;
                let mut nets = self.config.nets.clone();
                upsert(&mut nets, n, |a, b| a.iface_id == b.iface_id);
                devices::validate_nets(&nets)?;
                devices::validate_count(self.config.drives.len(), nets.len())?;
                self.config.nets = nets;
                Ok(Response::Empty)
            }
            (State::NotStarted, Request::PutMmdsConfig(c)) => {
                c.validate(self.config.nets.iter().map(|n| n.iface_id.as_str()))?;
                mmds::lock(&self.mmds).configure(c.version, c.imds_compat);
                self.config.mmds = Some(c);
                Ok(Response::Empty)
            }
            (State::NotStarted, Request::PutEntropy(e)) => {
                e.validate()?;
                devices::validate_count(self.config.drives.len() + 1, self.config.nets.len())?;
                self.config.entropy = Some(e);
                Ok(Response::Empty)
            }
            (State::NotStarted, Request::PutVsock(v)) => {
                v.validate()?;
                let others = self.config.drives.len() + usize::from(self.config.entropy.is_some());
                devices::validate_count(others + 1, self.config.nets.len())?;
                self.config.vsock = Some(v);
                Ok(Response::Empty)
            }
            (State::NotStarted, Request::Start) => self.start(),
            (
                State::NotStarted,
                Request::Pause
                | Request::Resume
                | Request::SendCtrlAltDel
                | Request::PatchDrive(_)
                | Request::PatchNetworkInterface(_),
            ) => Err(ControllerError::State(NOT_BEFORE_START)),
            (State::Exited, _) => Err(ControllerError::State(EXITED)),
            (
                _,
                Request::PutMachineConfig(_)
                | Request::PatchMachineConfig(_)
                | Request::PutBootSource(_)
                | Request::PutDrive(_)
                | Request::PutNetworkInterface(_)
                | Request::PutEntropy(_)
                | Request::PutVsock(_)
                | Request::PutMmdsConfig(_),
            ) => Err(ControllerError::State(NOT_AFTER_START)),
            (_, Request::Start) => Err(ControllerError::State(
                "The microVM is already running: InstanceStart is allowed once.",
            )),
            (State::Running(vm) | State::Paused(vm), Request::SendCtrlAltDel) => {
                vm.send_ctrl_alt_del().map_err(ControllerError::Vcpu)?;
                Ok(Response::Empty)
            }
            (State::Running(vm) | State::Paused(vm), Request::PatchDrive(u)) => {
                u.validate()?;
                let mut drives = vm.virtio.iter().filter(|s| s.id == u.drive_id);
                let Some(block) = drives.find_map(|s| s.block.as_ref()) else {
                    return Err(
                        ConfigError::InvalidDevice(format!("no drive has the id {:?}", u.drive_id)).into(),
                    );
                };
                if let Some(r) = &u.rate_limiter {
                    let (bandwidth, ops) = r.updates();
                    flatlet_devices::bus::lock(block).update_rate_limiter(bandwidth, ops);
                    if let Some(d) = self.config.drives.iter_mut().find(|d| d.drive_id == u.drive_id) {
                        d.rate_limiter = Some(RateLimiterConfig::patched(d.rate_limiter.as_ref(), r));
                    }
                    info!("drive {}: rate limiter updated", u.drive_id);
                }
                if let Some(path) = &u.path_on_host {
                    crate::device_manager::reopen_drive(block, &u.drive_id, path)
                        .map_err(|e| ConfigError::InvalidDevice(e.to_string()))?;
                    if let Some(d) = self.config.drives.iter_mut().find(|d| d.drive_id == u.drive_id) {
                        d.path_on_host = Some(path.clone());
                    }
                    info!("drive {}: now backed by {path}", u.drive_id);
                }
                Ok(Response::Empty)
            }
            (State::Running(vm) | State::Paused(vm), Request::PatchNetworkInterface(u)) => {
                u.validate()?;
                let net = vm
                    .virtio
                    .iter()
                    .filter(|s| s.id == u.iface_id)
                    .find_map(|s| s.net.as_ref());
                let (Some(net), Some(config)) = (
                    net,
                    self.config.nets.iter_mut().find(|n| n.iface_id == u.iface_id),
                ) else {
                    return Err(ConfigError::InvalidDevice(format!(
                        "no network interface has the id {:?}",
                        u.iface_id
                    ))
                    .into());
                };
                let none = RateLimiterConfig::default();
                let rx = u.rx_rate_limiter.as_ref().unwrap_or(&none);
                let tx = u.tx_rate_limiter.as_ref().unwrap_or(&none);
                flatlet_devices::bus::lock(net).update_rate_limiters(rx.updates(), tx.updates());
                // As for drives: a limiter the PATCH leaves out stays as it
                // was in GET /vm/config (absent, not `{}`).
                for (given, shown) in [
                    (&u.rx_rate_limiter, &mut config.rx_rate_limiter),
                    (&u.tx_rate_limiter, &mut config.tx_rate_limiter),
                ] {
                    if let Some(r) = given {
                        *shown = Some(RateLimiterConfig::patched(shown.as_ref(), r));
                    }
                }
                info!("network interface {}: rate limiters updated", u.iface_id);
                Ok(Response::Empty)
            }
            (State::NotStarted, Request::LoadSnapshot(p)) => self.load_snapshot(&p),
            (_, Request::LoadSnapshot(_)) => Err(ControllerError::State(
                "Loading a snapshot is only allowed on a fresh flatlet, before the microVM starts.",
            )),
            (State::NotStarted, Request::CreateSnapshot(_)) => Err(ControllerError::State(NOT_BEFORE_START)),
            (State::Running(_), Request::CreateSnapshot(_)) => Err(ControllerError::State(
                "Cannot create a snapshot while the microVM is running: pause it first (PATCH /vm Paused).",
            )),
            (State::Paused(_), Request::CreateSnapshot(p)) => self.create_snapshot(&p),
            (State::Running(_) | State::Paused(_), Request::Pause) => self.pause(),
            (State::Running(_) | State::Paused(_), Request::Resume) => self.resume(),
        }
    }

    fn start(&mut self) -> Result<Response, ControllerError> {
        self.config.machine.validate(&self.limits)?;
        let ctx = BuildContext {
            host: self.host,
            serial_out: (self.serial_out)(),
            kick_signal: self.kick_signal,
            start: self.start,
            restore: None,
        };
        let vm = vm::build(&self.config, ctx)?;
        self.attach_mmds(&vm, &self.config);
        self.state = State::Running(vm);
        Ok(Response::Empty)
    }

    /// Puts MMDS on the interfaces `config` names (with the version it
    /// gives: a loaded VM's configuration never went through `PUT
    /// /mmds/config`), before the event loop runs again, so before any
    /// frame is moved.
    fn attach_mmds(&self, vm: &Vm, config: &VmConfig) {
        if let Some(c) = &config.mmds {
            mmds::lock(&self.mmds).configure(c.version, c.imds_compat);
            mmds::attach(vm, c, &self.mmds);
        }
    }

    fn load_snapshot(
        &mut self,
        p: &crate::snapshot::SnapshotLoadParams,
    ) -> Result<Response, ControllerError> {
        use crate::config::HugePages;
        use crate::snapshot::{
            LoadHugePages, format, memory,
            state::{MicrovmState, SavedConfig},
        };
        let c = &self.config;
        if c.boot.is_some()
            || !c.drives.is_empty()
            || !c.nets.is_empty()
            || c.vsock.is_some()
            || c.entropy.is_some()
        {
            return Err(ControllerError::State(
                "Loading a snapshot is not allowed after configuring the microVM (boot source or devices set).",
            ));
        }
        let mem_path = p.mem_path().map_err(ControllerError::State)?;
        if p.huge_pages == Some(LoadHugePages::Hugetlbfs2M) {
            return Err(ControllerError::State(
                "huge_pages \"2M\" needs a Uffd memory backend, which flatlet does not have.",
            ));
        }
        let t = std::time::Instant::now();
        let state: MicrovmState =
            format::read(&p.snapshot_path).map_err(|e| ControllerError::Snapshot(e.to_string()))?;
        state
            .validate()
            .map_err(|e| ControllerError::Snapshot(e.to_string()))?;
        let mut saved =
            SavedConfig::parse(&state.config).map_err(|e| ControllerError::Snapshot(e.to_string()))?;
        saved
            .override_networks(&p.network_overrides)
            .map_err(|e| ControllerError::Snapshot(e.to_string()))?;
        if let Some(v) = &p.vsock_override {
            saved
                .override_vsock(&v.uds_path)
                .map_err(|e| ControllerError::Snapshot(e.to_string()))?;
        }
        let mut config = self.config.clone();
        config.machine.huge_pages = match p.huge_pages {
            Some(LoadHugePages::None) => HugePages::None,
            Some(LoadHugePages::Transparent) => HugePages::Transparent,
            // (2M was refused above.)
            _ => saved.machine.huge_pages,
        };
        config.machine.track_dirty_pages = p.track_dirty_pages || p.enable_diff_snapshots;
        config.machine.irqchip = saved.machine.irqchip;
        saved.apply(&mut config);
        config.machine.vcpu_count = state.machine.vcpu_count;
        config.machine.mem_size_mib = state.machine.mem_size_mib as usize;
        config.machine.smt = state.machine.smt;
        // The file's machine within this host's limits, as a configured one.
        config.machine.validate(&self.limits)?;
        let memory = memory::map_private(mem_path, state.machine.mem_size_mib)
            .map_err(|e| ControllerError::Snapshot(e.to_string()))?;
        let ctx = BuildContext {
            host: self.host,
            serial_out: (self.serial_out)(),
            kick_signal: self.kick_signal,
            start: self.start,
            restore: Some(vm::RestoreSource {
                state,
                memory,
                paused: !p.resume_vm,
                clock_realtime: p.clock_realtime,
            }),
        };
        let vm = vm::build(&config, ctx)?;
        self.attach_mmds(&vm, &config);
        self.config = config;
        info!("snapshot loaded in {} us", t.elapsed().as_micros());
        // Without resume_vm the vCPUs were started paused: they have run
        // no guest instruction.
        self.state = if p.resume_vm {
            State::Running(vm)
        } else {
            State::Paused(vm)
        };
        Ok(Response::Empty)
    }

    fn create_snapshot(
        &mut self,
        p: &crate::snapshot::SnapshotCreateParams,
    ) -> Result<Response, ControllerError> {
        use crate::snapshot::{SnapshotType, format, memory, state::MachineState};
        let State::Paused(vm) = &self.state else {
            return Err(ControllerError::State(
                "Cannot create a snapshot: the microVM is not paused.",
            ));
        };
        if p.snapshot_type == SnapshotType::Diff && !self.config.machine.track_dirty_pages {
            return Err(ControllerError::State(
                "Diff snapshots need dirty page tracking: set track_dirty_pages in the machine configuration (or when loading the snapshot).",
            ));
        }
        let t = std::time::Instant::now();
        let machine = MachineState {
            vcpu_count: self.config.machine.vcpu_count,
            mem_size_mib: self.config.machine.mem_size_mib as u64,
            smt: self.config.machine.smt,
        };
        let config = serde_json::to_string(&crate::snapshot::state::SavedConfig::of(&self.config))
            .map_err(|e| ControllerError::Io(format!("Cannot create the snapshot: {e}")))?;
        let state = vm
            .save_state(machine, config)
            .map_err(|e| ControllerError::Io(format!("Cannot create the snapshot: {e}")))?;
        let bytes = format::encode(&state).map_err(|e| ControllerError::Io(e.to_string()))?;
        crate::snapshot::create_regular(&p.snapshot_path)
            .and_then(|mut f| f.write_all(&bytes))
            .map_err(|e| ControllerError::Io(format!("snapshot file {}: {e}", p.snapshot_path.display())))?;
        let mem_err =
            |e: String| ControllerError::Io(format!("memory file {}: {e}", p.mem_file_path.display()));
        // The pages the guest wrote since the last snapshot; read (and
        // cleared) for a Full one too, so that the next Diff starts here.
        let dirty = if self.config.machine.track_dirty_pages {
            vm.take_dirty_log().map_err(ControllerError::Io)?
        } else {
            Vec::new()
        };
        let (mem, mode) = match p.snapshot_type {
            SnapshotType::Full => (
                crate::snapshot::create_regular(&p.mem_file_path).map_err(|e| mem_err(e.to_string()))?,
                memory::WriteMode::Full,
            ),
            // Into the existing file, which must be the VM's.
            SnapshotType::Diff => (
                crate::config::files::open_checked(
                    &p.mem_file_path,
                    true,
                    crate::config::files::Accept::RegularFile,
                )
                .map_err(mem_err)?,
                memory::WriteMode::Diff { dirty: &dirty },
            ),
        };
        let written = memory::write_memory(vm.memory(), &mem, &p.mem_file_path, mode)
            .map_err(|e| ControllerError::Io(e.to_string()))?;
        info!(
            "{:?} snapshot created in {} us: state {} bytes, memory {written} bytes written",
            p.snapshot_type,
            t.elapsed().as_micros(),
            bytes.len()
        );
        Ok(Response::Empty)
    }

    fn pause(&mut self) -> Result<Response, ControllerError> {
        let State::Running(vm) = &self.state else {
            return Ok(Response::Empty);
        };
        let t = std::time::Instant::now();
        if let Err(e) = vm.pause() {
            return Err(self.undo_failed(VcpuCommandKind::Pause, e));
        }
        self.latencies.pause_vm = t.elapsed().as_micros() as u64;
        info!("VM paused");
        self.state = match std::mem::replace(&mut self.state, State::Exited) {
            State::Running(vm) => State::Paused(vm),
            other => other,
        };
        Ok(Response::Empty)
    }

    fn resume(&mut self) -> Result<Response, ControllerError> {
        let State::Paused(vm) = &self.state else {
            return Ok(Response::Empty);
        };
        let t = std::time::Instant::now();
        if let Err(e) = vm.resume() {
            return Err(self.undo_failed(VcpuCommandKind::Resume, e));
        }
        self.latencies.resume_vm = t.elapsed().as_micros() as u64;
        info!("VM resumed");
        self.state = match std::mem::replace(&mut self.state, State::Exited) {
            State::Paused(vm) => State::Running(vm),
            other => other,
        };
        Ok(Response::Empty)
    }

    /// After a pause or resume that not every vCPU carried out: a pause is
    /// undone (every vCPU resumed: the VM stays `Running`); when that
    /// fails too, or a resume failed, the VM is ended with the reason, and
    /// the event loop reports it and exits. Never a state nobody knows.
    fn undo_failed(&mut self, what: VcpuCommandKind, error: String) -> ControllerError {
        let vm = match &self.state {
            State::Running(vm) | State::Paused(vm) => vm,
            _ => return ControllerError::Vcpu(error),
        };
        log::warn!("{what:?} failed: {error}");
        if what == VcpuCommandKind::Pause {
            match vm.resume() {
                Ok(()) => {
                    return ControllerError::Vcpu(format!(
                        "Failed to pause the microVM ({error}); it goes on running."
                    ));
                }
                Err(e) => log::warn!("cannot resume after a failed pause: {e}"),
            }
        }
        vm.exit
            .report(VmExit::VcpusUnresponsive(format!("{what:?}: {error}")));
        ControllerError::Vcpu(format!(
            "Failed to {what:?} the microVM ({error}); it has been ended."
        ))
    }

    /// Writes a line of metrics, if a metrics file is set.
    pub fn flush_metrics(&mut self) -> Result<Response, ControllerError> {
        let Some(sink) = self.metrics.as_mut() else {
            return Err(ControllerError::State(
                "The metrics system is not initialized (PUT /metrics first).",
            ));
        };
        let vm = match &self.state {
            State::Running(vm) | State::Paused(vm) => Some(vm),
            _ => None,
        };
        let devices = vm
            .map(|vm| {
                vm.virtio
                    .iter()
                    .map(|s| {
                        // One lock at a time: the guard of a field's
                        // expression would live to the end of the literal.
                        let device_type = flatlet_devices::bus::lock(&s.device).device_type();
                        DeviceCounters {
                            kind: device_kind(device_type),
                            id: s.id.clone(),
                            counters: s.counters(),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let snapshot = Snapshot {
            id: &self.id,
            startup: self.startup,
            latencies: self.latencies,
            requests: &self.counters,
            exits: vm.map(Vm::exit_counters),
            devices,
            guest_boot_us: vm.and_then(Vm::boot_time).map(|d| d.as_micros()),
            uart: vm
                .map(|vm| flatlet_devices::bus::lock(&vm.serial).counters())
                .unwrap_or_default(),
        };
        sink.write(&snapshot)
            .map_err(|e| ControllerError::Io(format!("cannot write metrics: {e}")))?;
        Ok(Response::Empty)
    }

    /// Whether a metrics file is set.
    pub fn has_metrics(&self) -> bool {
        self.metrics.is_some()
    }

    /// If the VM has ended, stops its threads and returns why.
    pub fn poll_exit(&mut self) -> Option<VmExit> {
        let exit = self.vm()?.exit_reason()?;
        // A last line, as Firecracker writes when its VM stops, so that
        // nothing counted since the last flush is lost.
        if self.metrics.is_some() {
            if let Err(e) = self.flush_metrics() {
                log::warn!("{e}");
            }
        }
        if let State::Running(vm) | State::Paused(vm) = std::mem::replace(&mut self.state, State::Exited) {
            if exit.is_clean() {
                info!("VM ended: {exit}");
            }
            info!("guest memory touched: {} KiB", vm.touched_memory() / 1024);
            vm.stop();
        }
        Some(exit)
    }

    /// Ends the VM (if any) for `reason`; returns how it ended (an end the
    /// VM reported first wins).
    pub fn shut_down(&mut self, reason: VmExit) -> VmExit {
        if let Some(vm) = self.vm() {
            vm.exit.report(reason.clone());
        }
        self.poll_exit().unwrap_or(reason)
    }
}

/// The vCPU commands the API can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VcpuCommandKind {
    Pause,
    Resume,
}

/// Firecracker's metric group and counter name of a request.
fn api_metric(req: &Request) -> Option<(&'static str, &'static str)> {
    const GET: &str = "get_api_requests";
    const PUT: &str = "put_api_requests";
    const PATCH: &str = "patch_api_requests";
    Some(match req {
        Request::GetInstanceInfo => (GET, "instance_info"),
        Request::GetMachineConfig => (GET, "machine_cfg"),
        Request::GetVersion => (GET, "vmm_version"),
        Request::PutMachineConfig(_) => (PUT, "machine_cfg"),
        Request::PatchMachineConfig(_) => (PATCH, "machine_cfg"),
        Request::PutBootSource(_) => (PUT, "boot_source"),
        Request::PutDrive(_) => (PUT, "drive"),
        Request::PatchDrive(_) => (PATCH, "drive"),
        Request::PutNetworkInterface(_) => (PUT, "network"),
        Request::PatchNetworkInterface(_) => (PATCH, "network"),
        Request::Start | Request::SendCtrlAltDel | Request::FlushMetrics => (PUT, "actions"),
        Request::PutLogger(_) => (PUT, "logger"),
        Request::PutMetrics(_) => (PUT, "metrics"),
        Request::PutEntropy(_) => (PUT, "entropy"),
        Request::GetMmds => (GET, "mmds"),
        Request::PutMmds(_) | Request::PutMmdsConfig(_) => (PUT, "mmds"),
        Request::PatchMmds(_) => (PATCH, "mmds"),
        _ => return None,
    })
}

/// The logger settings after `new` is applied to `old` (fields `new`
/// leaves out keep their values).
fn merge_logger(old: Option<LoggerConfig>, new: LoggerConfig) -> LoggerConfig {
    let Some(old) = old else { return new };
    LoggerConfig {
        log_path: new.log_path.or(old.log_path),
        level: new.level.or(old.level),
        show_level: new.show_level.or(old.show_level),
        show_log_origin: new.show_log_origin.or(old.show_log_origin),
        module: new.module.or(old.module),
    }
}

/// Replaces the element `same` as `new`, or appends `new`.
fn upsert<T>(list: &mut Vec<T>, new: T, same: impl Fn(&T, &T) -> bool) {
    match list.iter_mut().find(|x| same(x, &new)) {
        Some(slot) => *slot = new,
        None => list.push(new),
    }
}
