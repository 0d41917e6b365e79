//! The `flatlet` binary: command line, console, signals, exit codes. The
//! machine itself is in the `flatlet-vmm` crate.

mod cli;
mod console;
mod signals;

use std::fmt::Display;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use flatlet_vmm::config::devices::{
    parse_drive_option, parse_net_option, validate_count, validate_drives, validate_nets,
};
use flatlet_vmm::config::{BootSource, ConfigError, ConfigFile, HostLimits, Kernel, MachineConfig};
use flatlet_vmm::controller::{Controller, ControllerError, Request, StartTime};
use flatlet_vmm::exit::{EXIT_BAD_CONFIG, EXIT_ERROR};
use flatlet_vmm::host::HostKind;
use flatlet_vmm::logger::LoggerConfig;
use flatlet_vmm::metrics::{MetricsConfig, Startup};
use flatlet_vmm::runtime::{ConsoleInput, Runtime};
use flatlet_vmm::snapshot::state::NetworkOverride;
use flatlet_vmm::snapshot::{MemBackend, MemBackendType, SnapshotLoadParams, VsockOverride};
use log::{debug, error, info};

use cli::{Cli, Command, CommonArgs, FirecrackerArgs, RunArgs};

/// An error that ends flatlet: printed once, then the exit code.
struct Failure {
    code: i32,
    message: String,
}

impl Failure {
    fn new(code: i32, message: impl Display) -> Self {
        Self {
            code,
            message: message.to_string(),
        }
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::new(EXIT_BAD_CONFIG, e)
    }
}

impl From<ControllerError> for Failure {
    fn from(e: ControllerError) -> Self {
        Failure::new(e.exit_code(), e)
    }
}

fn main() -> ExitCode {
    // First, before any thread exists: the allocator must stay within
    // every thread's seccomp filter (see the function).
    flatlet_vmm::sys::single_malloc_arena();
    let cli = Cli::parse();
    if let Some(code) = informational(&cli.fc) {
        return ExitCode::from(code);
    }
    flatlet_vmm::logger::init(cli.common.level.into());
    if let Err(f) = firecracker_flags(&cli) {
        error!("{}", f.message);
        return ExitCode::from(f.code as u8);
    }
    if cli.common.no_seccomp {
        flatlet_vmm::seccomp::disable();
    }
    let result = match &cli.command {
        Some(Command::Run(args)) => run(args, &cli.common, &cli.fc),
        Some(Command::GuestImage { out }) => guest_image(out),
        Some(Command::Api {
            sock,
            method,
            path,
            body,
        }) => api_request(sock, method, path, body.as_deref()),
        None => match (&cli.config_file, cli.no_api) {
            (Some(path), true) => run(&RunArgs::from_config_file(path), &cli.common, &cli.fc),
            // --no-api requires --config-file (clap checks it).
            _ => {
                let sock = cli
                    .api_sock
                    .clone()
                    .unwrap_or_else(|| cli::DEFAULT_API_SOCK.into());
                serve_api(&sock, cli.config_file.as_deref(), &cli)
            }
        },
    };
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(f) => {
            error!("{}", f.message);
            ExitCode::from(f.code as u8)
        }
    }
}

/// `--version`, `--snapshot-version`, `--describe-snapshot`: print and
/// exit, before anything else (as Firecracker does).
fn informational(fc: &FirecrackerArgs) -> Option<u8> {
    if fc.version {
        println!(
            "flatlet v{}\nFirecracker API v{}\n",
            flatlet_vmm::controller::VERSION,
            flatlet_vmm::controller::FIRECRACKER_API_VERSION
        );
        return Some(0);
    }
    let format = flatlet_vmm::snapshot::format::FORMAT_VERSION;
    if fc.snapshot_version {
        println!("v{format}");
        return Some(0);
    }
    if let Some(path) = &fc.describe_snapshot {
        return match flatlet_vmm::snapshot::format::describe(path) {
            Ok(version) => {
                println!("v{version}");
                Some(0)
            }
            Err(e) => {
                eprintln!("flatlet: --describe-snapshot: {e}");
                Some(EXIT_BAD_CONFIG as u8)
            }
        };
    }
    None
}

/// Firecracker's flags that configure the process: the logger (as `PUT
/// /logger` would), and the flags flatlet accepts or refuses by name.
fn firecracker_flags(cli: &Cli) -> Result<(), Failure> {
    let c = &cli.common;
    if c.log_path.is_some() || c.show_level || c.show_log_origin || c.module.is_some() {
        flatlet_vmm::logger::configure(&LoggerConfig {
            log_path: c.log_path.clone(),
            level: None,
            show_level: c.show_level.then_some(true),
            show_log_origin: c.show_log_origin.then_some(true),
            module: c.module.clone(),
        })?;
    }
    let fc = &cli.fc;
    if fc.seccomp_filter.is_some() {
        return Err(Failure::new(
            EXIT_BAD_CONFIG,
            "--seccomp-filter: flatlet does not load custom seccomp filters (Firecracker's compiled BPF \
             format); it installs its own per-thread filters (resources/seccomp/x86_64.json), or none with \
             --no-seccomp",
        ));
    }
    if fc.enable_pci {
        info!(
            "--enable-pci: flatlet's devices are virtio-mmio, announced on the kernel command line \
             (virtio_mmio.device=); a kernel built for Firecracker finds them either way"
        );
    }
    if fc.boot_timer {
        debug!("--boot-timer: flatlet always has its boot timer");
    }
    Ok(())
}

impl RunArgs {
    fn from_config_file(path: &Path) -> Self {
        Self {
            kernel: None,
            initrd: None,
            cmdline: None,
            vcpus: None,
            mem_mib: None,
            drives: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            config_file: Some(path.to_path_buf()),
            irqchip: None,
            snapshot: None,
            mem: None,
            net_overrides: Vec::new(),
            vsock_override: None,
        }
    }
}

fn guest_image(out: &Path) -> Result<i32, Failure> {
    std::fs::write(out, flatlet_guest::ELF)
        .map_err(|e| Failure::new(EXIT_ERROR, format!("cannot write {}: {e}", out.display())))?;
    info!(
        "wrote the test guest ({} bytes) to {}",
        flatlet_guest::ELF.len(),
        out.display()
    );
    Ok(0)
}

/// `--snapshot STATE --mem FILE [--net-override ID=TAP]...`: the load
/// request, resuming the VM at once.
fn snapshot_request(state: &Path, args: &RunArgs) -> Result<Request, Failure> {
    let mem = args
        .mem
        .clone()
        .ok_or_else(|| Failure::new(EXIT_BAD_CONFIG, "--snapshot needs --mem"))?;
    let mut network_overrides = Vec::new();
    for spec in &args.net_overrides {
        let Some((iface_id, tap)) = spec.split_once('=') else {
            return Err(Failure::new(
                EXIT_BAD_CONFIG,
                format!("--net-override {spec:?}: expected IFACE_ID=TAP"),
            ));
        };
        network_overrides.push(NetworkOverride {
            iface_id: iface_id.to_string(),
            host_dev_name: tap.to_string(),
        });
    }
    Ok(Request::LoadSnapshot(SnapshotLoadParams {
        snapshot_path: state.to_path_buf(),
        mem_backend: Some(MemBackend {
            backend_type: MemBackendType::File,
            backend_path: mem,
        }),
        mem_file_path: None,
        resume_vm: true,
        track_dirty_pages: false,
        enable_diff_snapshots: false,
        network_overrides,
        vsock_override: args
            .vsock_override
            .clone()
            .map(|uds_path| VsockOverride { uds_path }),
        clock_realtime: false,
        huge_pages: None,
    }))
}

/// The requests that configure and start the VM `args` describe.
fn run_requests(args: &RunArgs) -> Result<Vec<Request>, Failure> {
    if let Some(state) = &args.snapshot {
        return Ok(vec![snapshot_request(state, args)?]);
    }
    let mut machine = MachineConfig::default();
    let mut drives = Vec::new();
    let mut nets = Vec::new();
    let mut boot = BootSource {
        kernel: Kernel::Builtin(flatlet_guest::ELF),
        boot_args: None,
        initrd: None,
    };
    // The logger and metrics first, so that they see the rest.
    let mut settings = Vec::new();
    let mut entropy = None;
    let mut mmds = None;
    let mut vsock = None;
    if let Some(path) = &args.config_file {
        let file = ConfigFile::load(path)?;
        settings.extend(file.logger.map(Request::PutLogger));
        settings.extend(file.metrics.map(Request::PutMetrics));
        boot = BootSource::from_config(&file.boot_source)?;
        if let Some(m) = file.machine_config {
            machine = m;
        }
        drives = file.drives;
        nets = file.network_interfaces;
        entropy = file.entropy;
        mmds = file.mmds_config;
        vsock = file.vsock;
    }
    if let Some(spec) = &args.vsock {
        vsock = Some(flatlet_vmm::config::vsock::parse_vsock_option(spec)?);
    }
    // Limits first, so that a huge file is refused at once, by its count.
    validate_count(drives.len() + args.drives.len(), nets.len() + args.nets.len())?;
    for spec in &args.drives {
        drives.push(parse_drive_option(spec, drives.len())?);
    }
    for spec in &args.nets {
        nets.push(parse_net_option(spec, nets.len())?);
    }
    // Requests replace a device of the same id (as Firecracker's PUT does);
    // on one command line or in one file, a repeated id is a mistake.
    validate_drives(&drives)?;
    validate_nets(&nets)?;
    if let Some(kernel) = &args.kernel {
        boot.kernel = Kernel::Path(kernel.clone());
    }
    if let Some(initrd) = &args.initrd {
        boot.initrd = Some(initrd.clone());
    }
    if let Some(cmdline) = &args.cmdline {
        boot.boot_args = Some(cmdline.clone());
    }
    if let Some(v) = args.vcpus {
        machine.vcpu_count = u8::try_from(v).map_err(|_| ConfigError::VcpuCount(v))?;
    }
    if let Some(mib) = args.mem_mib {
        machine.mem_size_mib = mib;
    }
    if let Some(mode) = args.irqchip {
        machine.irqchip = mode;
    }
    let mut requests = settings;
    requests.extend([Request::PutMachineConfig(machine), Request::PutBootSource(boot)]);
    requests.extend(drives.into_iter().map(Request::PutDrive));
    requests.extend(nets.into_iter().map(Request::PutNetworkInterface));
    requests.extend(entropy.map(Request::PutEntropy));
    requests.extend(vsock.map(Request::PutVsock));
    // After the interfaces it names.
    requests.extend(mmds.map(Request::PutMmdsConfig));
    requests.push(Request::Start);
    Ok(requests)
}

/// A runtime with its controller, console and signal handling.
fn runtime(common: &CommonArgs, fc: &FirecrackerArgs) -> Result<Runtime, Failure> {
    flatlet_vmm::seccomp::prepare().map_err(|e| Failure::new(EXIT_ERROR, e))?;
    let host = HostKind::detect();
    info!("KVM host: {host}");
    let kick = vmm_sys_util::signal::SIGRTMIN();
    flatlet_vmm::sys::install_kick_handler(kick)
        .map_err(|e| Failure::new(EXIT_ERROR, format!("cannot install the vCPU kick handler: {e}")))?;
    let mut controller = Controller::new(
        common.id.clone(),
        host,
        HostLimits::probe(),
        Box::new(console::output),
        kick,
    );
    controller.set_mmds_size_limit(mmds_size_limit(fc));
    if let Some(us) = fc.start_time_us {
        let start = StartTime::given(us, fc.start_time_cpu_us, fc.parent_cpu_time_us.unwrap_or(0));
        controller.set_start(start);
        controller.set_startup(Startup {
            wall_us: start.wall_elapsed().as_micros() as u64,
            cpu_us: start.cpu_elapsed().as_micros() as u64,
        });
    }
    let input = console::input().map(|f| Box::new(f) as Box<dyn ConsoleInput>);
    let mut rt = Runtime::new(controller, input).map_err(|e| Failure::new(EXIT_ERROR, e))?;
    let signals = signals::SignalWatch::install(rt.stop_handle())
        .map_err(|e| Failure::new(EXIT_ERROR, format!("cannot install signal handlers: {e}")))?;
    rt.add_subscriber(Box::new(signals));
    Ok(rt)
}

fn run(args: &RunArgs, common: &CommonArgs, fc: &FirecrackerArgs) -> Result<i32, Failure> {
    let mut requests = metrics_flag(fc);
    requests.extend(metadata_flag(fc)?);
    requests.extend(run_requests(args)?);
    let mut rt = runtime(common, fc)?;
    filter_vmm_thread()?;
    for req in requests {
        rt.handle(req)?;
    }
    run_to_exit(rt)
}

/// `--metadata`: the request that seeds the MMDS data store.
fn metadata_flag(fc: &FirecrackerArgs) -> Result<Vec<Request>, Failure> {
    let Some(path) = &fc.metadata else {
        return Ok(Vec::new());
    };
    let limit = mmds_size_limit(fc);
    let value = flatlet_vmm::mmds::read_metadata(path, flatlet_vmm::mmds::metadata_file_limit(limit))?;
    Ok(vec![Request::PutMmds(value)])
}

/// `--mmds-size-limit`, or Firecracker's default.
fn mmds_size_limit(fc: &FirecrackerArgs) -> usize {
    fc.mmds_size_limit
        .map_or(flatlet_vmm::mmds::DEFAULT_SIZE_LIMIT, |l| {
            usize::try_from(l).unwrap_or(usize::MAX)
        })
}

/// `--metrics-path`: the request that sets it up.
fn metrics_flag(fc: &FirecrackerArgs) -> Vec<Request> {
    fc.metrics_path
        .iter()
        .map(|p| {
            Request::PutMetrics(MetricsConfig {
                metrics_path: p.clone(),
                emit_id: None,
                properties: None,
            })
        })
        .collect()
}

/// Installs the VMM thread's seccomp filter: before any request (and so
/// anything a client or guest controls) is handled.
fn filter_vmm_thread() -> Result<(), Failure> {
    flatlet_vmm::seccomp::install(flatlet_vmm::seccomp::ThreadKind::Vmm)
        .map_err(|e| Failure::new(EXIT_ERROR, e))
}

/// Runs the event loop until the VM (or flatlet) ends.
fn run_to_exit(mut rt: Runtime) -> Result<i32, Failure> {
    let _raw = console::RawTerminal::enter();
    let exit = rt.run().map_err(|e| Failure::new(EXIT_ERROR, e))?;
    if exit.is_clean() {
        Ok(exit.exit_code())
    } else {
        Err(Failure::new(exit.exit_code(), exit))
    }
}

/// `--api-sock`: serves the API, and boots the config file's VM if given.
fn serve_api(sock: &Path, config: Option<&Path>, cli: &Cli) -> Result<i32, Failure> {
    let mut requests = metrics_flag(&cli.fc);
    requests.extend(metadata_flag(&cli.fc)?);
    if let Some(p) = config {
        requests.extend(run_requests(&RunArgs::from_config_file(p))?);
    }
    let mut rt = runtime(&cli.common, &cli.fc)?;
    let listener = flatlet_api::server::bind(sock).map_err(|e| Failure::new(EXIT_BAD_CONFIG, e))?;
    let _socket = flatlet_api::server::SocketFile(sock.to_path_buf());
    let sender = rt.api_sender().map_err(|e| Failure::new(EXIT_ERROR, e))?;
    let api = flatlet_api::server::spawn(listener, sender, cli.http_api_max_payload_size)
        .map_err(|e| Failure::new(EXIT_ERROR, e))?;
    filter_vmm_thread()?;
    api.wait_ready().map_err(|e| Failure::new(EXIT_ERROR, e))?;
    info!("API server listening on {}", sock.display());
    for req in requests {
        rt.handle(req)?;
    }
    run_to_exit(rt)
}

/// `flatlet api`: one request, its answer on stdout.
fn api_request(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Result<i32, Failure> {
    let reply =
        flatlet_api::client::request(sock, method, path, body).map_err(|e| Failure::new(EXIT_ERROR, e))?;
    println!("{}", reply.status);
    if !reply.body.is_empty() {
        println!("{}", reply.body);
    }
    Ok(if (200..300).contains(&reply.status) { 0 } else { 1 })
}
