//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use flatlet_vmm::irqchip::IrqchipMode;
use flatlet_vmm::logger::Level;

/// The API socket when none is given (Firecracker's).
pub const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";

const EXIT_CODES: &str = "\
Exit codes:
  0    the guest reset or shut down the machine
  1    flatlet failed (an I/O error or a bug)
  2    bad command line, configuration or input files
  3    KVM is missing or refused an operation
  4    the guest crashed (triple fault, an instruction this host cannot
       emulate, an exit flatlet cannot handle)
  128+N  stopped by signal N (130 also when leaving the console with Ctrl-A x)";

/// flatlet: a lightweight KVM microVM monitor. Without a command it is a
/// drop-in for Firecracker's binary: it takes Firecracker's flags and
/// serves its API (on /run/firecracker.socket unless --api-sock or
/// --no-api says otherwise).
#[derive(Debug, Parser)]
#[command(name = "flatlet", about, after_help = EXIT_CODES, disable_version_flag = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Configure (and start) the microVM from a Firecracker-style JSON file.
    #[arg(long, value_name = "PATH", global = false)]
    pub config_file: Option<PathBuf>,

    /// Serve Firecracker's REST API on this Unix socket (no VM until
    /// configured and started through it, or by --config-file). Default:
    /// /run/firecracker.socket.
    #[arg(long, value_name = "PATH", conflicts_with = "no_api")]
    pub api_sock: Option<PathBuf>,

    /// Run without an API socket (needs --config-file).
    #[arg(long, requires = "config_file")]
    pub no_api: bool,

    /// Largest API request body, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = flatlet_api::server::DEFAULT_MAX_PAYLOAD)]
    pub http_api_max_payload_size: usize,

    #[command(flatten)]
    pub fc: FirecrackerArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// Firecracker's flags that only the API/config-file mode has.
#[derive(Debug, Args, Clone)]
pub struct FirecrackerArgs {
    /// Print the version (flatlet's, and the Firecracker API version it
    /// follows) and exit.
    #[arg(long)]
    pub version: bool,

    /// Print the snapshot data format version. flatlet has no snapshots
    /// yet: says so and exits with 2.
    #[arg(long)]
    pub snapshot_version: bool,

    /// Print the data format version of a snapshot file. flatlet has no
    /// snapshots yet: says so and exits with 2.
    #[arg(long, value_name = "PATH")]
    pub describe_snapshot: Option<PathBuf>,

    /// Firecracker's boot-timer device. flatlet always has it (the
    /// `Guest-boot-time` line): accepted.
    #[arg(long)]
    pub boot_timer: bool,

    /// A custom seccomp filter (Firecracker's compiled BPF file): refused,
    /// flatlet installs its own filters (or none, with --no-seccomp).
    #[arg(long, value_name = "PATH", conflicts_with = "no_seccomp")]
    pub seccomp_filter: Option<PathBuf>,

    /// Size limit of the MMDS data store, in bytes of JSON (default
    /// 51200).
    #[arg(long, value_name = "BYTES")]
    pub mmds_size_limit: Option<u64>,

    /// A JSON file of MMDS contents: seeds the data store, as `PUT /mmds`.
    #[arg(long, value_name = "PATH")]
    pub metadata: Option<PathBuf>,

    /// Configure metrics at start, as `PUT /metrics` with this path does.
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<String>,

    /// When the process (or the jailer that started it) started, in
    /// microseconds of CLOCK_MONOTONIC: the boot-time line and the
    /// start-up metrics count from it.
    #[arg(long, value_name = "US")]
    pub start_time_us: Option<u64>,

    /// This process's CPU time at that start, in microseconds.
    #[arg(long, value_name = "US")]
    pub start_time_cpu_us: Option<u64>,

    /// CPU time the parent (the jailer) spent before, in microseconds.
    #[arg(long, value_name = "US")]
    pub parent_cpu_time_us: Option<u64>,

    /// Firecracker's PCI transport. flatlet's devices are virtio-mmio,
    /// announced on the kernel command line, which a kernel built for
    /// Firecracker finds either way: accepted (and logged).
    #[arg(long)]
    pub enable_pci: bool,
}

/// Options of every command that runs a VM.
#[derive(Debug, Args, Clone)]
pub struct CommonArgs {
    /// Log level, in any case: Error, Warning (Warn), Info, Debug, Trace
    /// or Off. `--log-level` is flatlet's older name.
    #[arg(
        long = "level",
        visible_alias = "log-level",
        value_name = "LEVEL",
        default_value = "info",
        global = true
    )]
    pub level: Level,

    /// Append the log to this file (or FIFO), as `PUT /logger` does.
    #[arg(long, value_name = "PATH", global = true)]
    pub log_path: Option<String>,

    /// Show each line's level.
    #[arg(long, global = true)]
    pub show_level: bool,

    /// Show each line's source file and line.
    #[arg(long, global = true)]
    pub show_log_origin: bool,

    /// Log only from modules whose path starts with this.
    #[arg(long, value_name = "MODULE", global = true)]
    pub module: Option<String>,

    /// Instance id, shown by the API: 1 to 64 characters, alphanumeric
    /// or '-' (as Firecracker checks it).
    #[arg(long, default_value = "anonymous-instance", value_parser = parse_id, global = true)]
    pub id: String,

    /// Do not install seccomp filters (for debugging only).
    #[arg(long, global = true)]
    pub no_seccomp: bool,
}

/// An instance id, checked as Firecracker checks it.
fn parse_id(id: &str) -> Result<String, String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!("it is {} bytes long: an id has 1 to 64", id.len()));
    }
    match id.chars().position(|c| !(c == '-' || c.is_alphanumeric())) {
        Some(i) => Err(format!(
            "character {} ({:?}) is neither alphanumeric nor '-'",
            i + 1,
            id.chars().nth(i).unwrap_or('?')
        )),
        None => Ok(id.to_string()),
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a microVM (the built-in test guest unless --kernel is given).
    #[command(after_help = EXIT_CODES)]
    Run(Box<RunArgs>),
    /// Write the built-in test guest kernel (an ELF) to a file.
    GuestImage {
        /// Where to write it.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
    /// Send one request to a running flatlet's API socket and print the
    /// answer, e.g. `flatlet api --sock /tmp/fl.sock put /machine-config
    /// '{"vcpu_count": 2, "mem_size_mib": 256}'`.
    Api {
        /// The API socket.
        #[arg(long, value_name = "PATH")]
        sock: PathBuf,
        /// get, put or patch.
        method: String,
        /// The path, e.g. /machine-config.
        path: String,
        /// The JSON body.
        body: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest kernel: an ELF vmlinux or a bzImage. Default: the built-in
    /// test guest.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line. Default: `console=ttyS0` for the test guest, a
    /// Firecracker-like line with a serial console for Linux.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub cmdline: Option<String>,

    /// Number of vCPUs (1-32). Default: 1.
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u64>,

    /// Guest memory in MiB. Default: 128.
    #[arg(long, value_name = "N")]
    pub mem_mib: Option<usize>,

    /// A virtio block device backed by a raw image: `PATH[,ro][,root][,id=ID][,cache=unsafe|writeback]`.
    /// `root` boots from it (adds `root=/dev/vda` to the command line). Repeatable.
    #[arg(long = "drive", value_name = "SPEC")]
    pub drives: Vec<String>,

    /// A virtio network device on an existing TAP device: `TAP[,mac=MAC][,id=ID]`. Repeatable.
    #[arg(long = "net", value_name = "SPEC")]
    pub nets: Vec<String>,

    /// A virtio-vsock device: `cid=N,uds=PATH` (guest CID 3 or more; host
    /// programs connect to PATH and send `CONNECT <port>`, guest connects
    /// to port P reach `PATH_P`).
    #[arg(long, value_name = "SPEC")]
    pub vsock: Option<String>,

    /// Read the VM's configuration from a Firecracker-style JSON file;
    /// the options above override it.
    #[arg(long, value_name = "PATH")]
    pub config_file: Option<PathBuf>,

    /// Interrupt controller and timer: split (I/O APIC in flatlet, no
    /// PIT; the fastest to create), full (KVM's in-kernel irqchip) or
    /// full-pit (and KVM's PIT). Also `irqchip` in the machine
    /// configuration (config file, API). Default: split.
    #[arg(long, value_name = "MODE")]
    pub irqchip: Option<IrqchipMode>,

    /// Restore a snapshot instead of booting: its state file (from `PUT
    /// /snapshot/create`). Needs --mem; the machine and its devices come
    /// from the snapshot, so the options that describe a VM do not apply.
    #[arg(
        long,
        value_name = "PATH",
        requires = "mem",
        conflicts_with_all = ["kernel", "initrd", "cmdline", "vcpus", "mem_mib", "drives", "nets", "vsock", "config_file", "irqchip"]
    )]
    pub snapshot: Option<PathBuf>,

    /// The snapshot's memory file (mapped privately: the file is not
    /// changed, and several VMs can restore from it at once).
    #[arg(long, value_name = "PATH", requires = "snapshot")]
    pub mem: Option<PathBuf>,

    /// With --snapshot: another TAP for one of the snapshot's network
    /// interfaces, `IFACE_ID=TAP`. Repeatable.
    #[arg(long = "net-override", value_name = "IFACE_ID=TAP", requires = "snapshot")]
    pub net_overrides: Vec<String>,

    /// With --snapshot: another Unix socket for the snapshot's vsock
    /// device (each clone needs its own).
    #[arg(long, value_name = "PATH", requires = "snapshot")]
    pub vsock_override: Option<String>,
}
