//! The jailer's command line, following Firecracker's jailer.

use std::path::PathBuf;

use clap::{Args, Parser};

/// flatlet-jailer: runs flatlet (or another VMM binary) in a jail: a
/// chroot of its own, a new mount namespace (and optionally PID and
/// network namespaces), cgroups, resource limits, no inherited files or
/// environment, and the given user and group instead of root.
///
/// `flatlet-jailer clean --id ID` removes a jail after its VM has exited.
#[derive(Debug, Parser)]
#[command(name = "flatlet-jailer", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub jail: JailArgs,
}

/// `flatlet-jailer clean`: removes a jail (its directory and cgroups) after
/// its VM has exited. The arguments are checked as for running a jail; a
/// jail whose VMM still runs is refused.
#[derive(Debug, Parser)]
#[command(name = "flatlet-jailer clean", version)]
pub struct CleanCli {
    #[command(flatten)]
    pub clean: CleanArgs,
}

/// Where a jail lives; shared by running and cleaning.
#[derive(Debug, Args, Clone)]
pub struct Location {
    /// The jail's id: letters, digits and '-', at most 64.
    #[arg(long)]
    pub id: String,

    /// The directory jails are made in.
    #[arg(long, value_name = "DIR", default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,

    /// cgroup version: 1 (per-controller hierarchies) or 2 (unified).
    #[arg(long, value_name = "1|2", default_value_t = 1)]
    pub cgroup_version: u8,

    /// The cgroup the jail's cgroup goes in (default: the exec file's name).
    #[arg(long, value_name = "NAME")]
    pub parent_cgroup: Option<String>,
}

#[derive(Debug, Args, Clone)]
pub struct JailArgs {
    #[command(flatten)]
    pub location: Location,

    /// The VMM binary to copy into the jail and run.
    #[arg(long, value_name = "PATH")]
    pub exec_file: PathBuf,

    /// User the VMM runs as.
    #[arg(long)]
    pub uid: u32,

    /// Group the VMM runs as.
    #[arg(long)]
    pub gid: u32,

    /// A network namespace to join (e.g. /var/run/netns/NAME).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,

    /// Run the VMM as PID 1 of a new PID namespace; its PID (as the host
    /// sees it) goes to `<jail>/<exec file name>.pid`.
    #[arg(long)]
    pub new_pid_ns: bool,

    /// Detach: a new session, stdio on /dev/null, and the jailer returns.
    #[arg(long)]
    pub daemonize: bool,

    /// A cgroup file and the value to write in it, e.g.
    /// `cpu.cfs_quota_us=50000`. Repeatable.
    #[arg(long = "cgroup", value_name = "FILE=VALUE")]
    pub cgroups: Vec<String>,

    /// A resource limit: `fsize=BYTES` or `no-file=N` (default no-file=2048). Repeatable.
    #[arg(long = "resource-limit", value_name = "RESOURCE=N")]
    pub resource_limits: Vec<String>,

    /// Arguments for the VMM (after `--`).
    #[arg(last = true)]
    pub vmm_args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CleanArgs {
    #[command(flatten)]
    pub location: Location,

    /// The exec file's name, as given when jailing (its directory holds the
    /// jails): a plain file name, not a path.
    #[arg(long, value_name = "NAME", default_value = "flatlet")]
    pub exec_name: String,
}
