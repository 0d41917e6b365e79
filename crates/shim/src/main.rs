//! containerd-shim-flatlet-v2: containerd's runtime v2 shim for flatlet.
//! Each container runs in its own flatlet microVM (started through
//! flatlet-jailer), whose PID 1 is flatlet-agent; the shim talks to it
//! over vsock with the protocol of `flatlet-agent-protocol`.
//!
//! containerd starts it as `containerd-shim-flatlet-v2 -namespace NS -id ID
//! -address ADDR start|delete` (the `containerd-shim` crate handles the
//! command line, the ttrpc server and events); the runtime name is
//! `io.containerd.flatlet.v2`.

mod agent;
mod config;
mod image;
mod service;
mod spec;
mod stdio;
mod template;
mod vm;

fn main() {
    let config = containerd_shim::Config {
        // The shim waits for its own children (flatlet, mkfs): the crate's
        // reaper would take their exit statuses first.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<service::Service>("io.containerd.flatlet.v2", Some(config));
}
