//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use flatlet_vmm::irqchip::IrqchipMode;

const EXIT_CODES: &str = "\
Exit codes:
  0    the guest reset or shut down the machine
  1    flatlet failed (an I/O error or a bug)
  2    bad command line, configuration or input files
  3    KVM is missing or refused an operation
  4    the guest crashed (triple fault, an instruction this host cannot
       emulate, an exit flatlet cannot handle)
  128+N  stopped by signal N (130 also when leaving the console with Ctrl-A x)";

/// flatlet: a lightweight KVM microVM monitor.
#[derive(Debug, Parser)]
#[command(name = "flatlet", version, about, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Configure (and start) the microVM from a Firecracker-style JSON file.
    #[arg(long, value_name = "PATH", global = false)]
    pub config_file: Option<PathBuf>,

    /// Serve Firecracker's REST API on this Unix socket (no VM until
    /// configured and started through it, or by --config-file).
    #[arg(long, value_name = "PATH", conflicts_with = "no_api")]
    pub api_sock: Option<PathBuf>,

    /// Run without an API socket (needs --config-file).
    #[arg(long, requires = "config_file")]
    pub no_api: bool,

    /// Largest API request body, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = flatlet_api::server::DEFAULT_MAX_PAYLOAD)]
    pub http_api_max_payload_size: usize,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// Options of every command that runs a VM.
#[derive(Debug, Args, Clone)]
pub struct CommonArgs {
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "info", global = true)]
    pub log_level: log::LevelFilter,

    /// Instance id, shown by the API.
    #[arg(long, default_value = "anonymous-instance", global = true)]
    pub id: String,

    /// Do not install seccomp filters (for debugging only).
    #[arg(long, global = true)]
    pub no_seccomp: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a microVM (the built-in test guest unless --kernel is given).
    #[command(after_help = EXIT_CODES)]
    Run(RunArgs),
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
}
