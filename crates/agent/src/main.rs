//! flatlet-agent: PID 1 of the guest that containerd-shim-flatlet-v2
//! starts. It serves the protocol of `flatlet-agent-protocol` on vsock
//! port 1024: mounts each container's root file system from a virtio
//! block device, starts its processes there (chroot, user, environment,
//! working directory from the OCI spec), with their standard streams on
//! vsock connections the shim opened, reports exit statuses and delivers
//! signals.
//!
//! The same binary, run as `flatlet-agent --exec-helper ROOT JSON`, is the
//! short-lived step between the agent and a container's process: it
//! enters the container's root, takes its user and execs the process.

mod container;
mod helper;
mod init;
mod pty;
mod server;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // As PID 1, Linux hands the agent every word of its command line it
    // does not know (`noxsave` on nested hosts): only the helper's own
    // first argument selects the helper.
    let code = if args.get(1).map(String::as_str) == Some(helper::FLAG) {
        helper::main(&args[2..])
    } else {
        init::main()
    };
    std::process::exit(code);
}
