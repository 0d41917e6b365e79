//! `flatlet-jailer`: wraps the VMM in a jail, so that a guest which escapes
//! into the VMM process finds itself in a small, unprivileged box.
//!
//! Exit codes: the VMM's own once it runs (the jailer execs it); before
//! that, 2 for bad arguments (or an existing jail of the same id) and 1 for
//! a set-up step that failed. `clean`: 0 when done, 2 for bad arguments or
//! a jail it refuses to remove (its VMM still runs, something is mounted
//! in it, it is not a jail), 1 for a removal that failed.

mod args;
mod cgroup;
mod clean;
mod jail;

use std::process::{Command, ExitCode};

use clap::Parser;
use nix::sched::{CloneFlags, unshare};

use args::{CleanCli, Cli};
use jail::{Jail, JailError, Place};

/// Set in the child that becomes the VMM when the jailer must fork (a new
/// PID namespace, or detaching).
const STAGE_ENV: &str = "FLATLET_JAILER_CHILD";

fn fail(e: &JailError) -> ExitCode {
    eprintln!("flatlet-jailer: error: {e}");
    ExitCode::from(e.exit_code())
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("clean") {
        let c = CleanCli::parse_from(std::env::args().skip(1)).clean;
        // The same checks as for running a jail: the same place, or none.
        return match Place::check(&c.location, &c.exec_name).and_then(|p| clean::clean(&p)) {
            Ok(removed) => {
                for p in removed {
                    println!("removed {}", p.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        };
    }
    match Jail::from_args(&Cli::parse().jail) {
        Ok(j) => run(&j),
        Err(e) => fail(&e),
    }
}

fn run(j: &Jail) -> ExitCode {
    if std::env::var_os(STAGE_ENV).is_some() {
        // The child that becomes the VMM: the jail is ready.
        return fail(&j.enter_and_exec());
    }
    for w in j.warnings() {
        eprintln!("flatlet-jailer: warning: {w}");
    }
    if let Err(e) = j.prepare() {
        // Leave nothing half-made behind (unless the jail was someone
        // else's: an existing jail is not ours to remove).
        if !matches!(e, JailError::Exists { .. }) {
            let _ = clean::clean(&j.place);
        }
        return fail(&e);
    }
    if !j.new_pid_ns && !j.daemonize {
        return fail(&j.enter_and_exec());
    }
    if j.new_pid_ns {
        if let Err(e) = unshare(CloneFlags::CLONE_NEWPID) {
            return fail(&JailError::Step {
                what: "new PID namespace".into(),
                reason: e.to_string(),
            });
        }
    }
    // The child (PID 1 of the new namespace, or the process that detaches)
    // runs this same program, which sees STAGE_ENV and enters the jail.
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            return fail(&JailError::Step {
                what: "finding the jailer's own binary".into(),
                reason: e.to_string(),
            });
        }
    };
    let mut child = match Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(STAGE_ENV, "1")
        .env(jail::START_ENV, j.start.for_child())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return fail(&JailError::Step {
                what: "starting the VMM's process".into(),
                reason: e.to_string(),
            });
        }
    };
    if j.new_pid_ns {
        if let Err(e) = std::fs::write(j.pid_file(), child.id().to_string()) {
            eprintln!("flatlet-jailer: cannot write {}: {e}", j.pid_file().display());
        }
    }
    if j.daemonize {
        return ExitCode::SUCCESS;
    }
    match child.wait() {
        Ok(status) => match (
            status.code(),
            std::os::unix::process::ExitStatusExt::signal(&status),
        ) {
            (Some(c), _) => ExitCode::from(c as u8),
            (None, Some(sig)) => ExitCode::from((128 + sig) as u8),
            (None, None) => ExitCode::FAILURE,
        },
        Err(e) => {
            eprintln!("flatlet-jailer: waiting for the VMM: {e}");
            ExitCode::FAILURE
        }
    }
}
