//! The agent as PID 1: mounts what the kernel did not, tells flatlet it is
//! up (the boot-timer write), starts the reaper and serves the shim on
//! vsock. Each connection gets a thread. A `Shutdown` request syncs and
//! resets the machine (`reboot=k`: through the i8042), which ends the VM.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use flatlet_agent_protocol::AGENT_PORT;
use nix::mount::{MsFlags, mount};
use nix::sys::reboot::{RebootMode, reboot};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::container::State;
use crate::server::{Outcome, serve};

/// Any CID: the guest's own, whatever flatlet gave it.
const VMADDR_CID_ANY: u32 = u32::MAX;
/// Firecracker's (and flatlet's) boot-timer page.
const BOOT_TIMER: u64 = 0xc000_0000;

#[derive(Debug, thiserror::Error)]
enum InitError {
    #[error("listening on vsock port {AGENT_PORT}: {0}")]
    Listen(std::io::Error),
}

pub fn main() -> i32 {
    if std::process::id() != 1 {
        eprintln!("flatlet-agent: not PID 1; serving anyway (a test?)");
    }
    mount_basics();
    boot_timer();
    let state = Arc::new(State::default());
    let reaper = Arc::clone(&state);
    std::thread::spawn(move || reaper.reap());
    match listen() {
        Ok(listener) => accept_loop(&listener, &state),
        Err(e) => eprintln!("flatlet-agent: {e}"),
    }
    power_off();
    1
}

fn mount_basics() {
    for (fstype, target, check) in [
        ("devtmpfs", "/dev", "/dev/null"),
        ("proc", "/proc", "/proc/self"),
        ("sysfs", "/sys", "/sys/kernel"),
    ] {
        if std::path::Path::new(check).exists() {
            continue;
        }
        if let Err(e) = mount(
            Some(fstype),
            target,
            Some(fstype),
            MsFlags::MS_NOSUID,
            None::<&str>,
        ) {
            eprintln!("flatlet-agent: mounting {fstype} on {target}: {e}");
        }
    }
}

/// Writes 123 to the boot-timer page through /dev/mem: flatlet logs
/// `Guest-boot-time`. Without /dev/mem (another VMM), nothing.
fn boot_timer() {
    if let Ok(mem) = std::fs::OpenOptions::new().write(true).open("/dev/mem") {
        let _ = mem.write_at(&[123], BOOT_TIMER);
    }
}

fn listen() -> Result<Socket, InitError> {
    let sock = Socket::new(Domain::VSOCK, Type::STREAM, None).map_err(InitError::Listen)?;
    sock.bind(&SockAddr::vsock(VMADDR_CID_ANY, AGENT_PORT))
        .map_err(InitError::Listen)?;
    sock.listen(64).map_err(InitError::Listen)?;
    eprintln!("flatlet-agent: listening on vsock port {AGENT_PORT}");
    Ok(sock)
}

fn accept_loop(listener: &Socket, state: &Arc<State>) {
    loop {
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) => {
                eprintln!("flatlet-agent: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let state = Arc::clone(state);
        std::thread::spawn(move || match serve(conn, &state) {
            Ok(Outcome::Shutdown) => power_off(),
            Ok(Outcome::Done) => {}
            Err(e) => eprintln!("flatlet-agent: connection: {e}"),
        });
    }
}

fn power_off() {
    nix::unistd::sync();
    let Err(e) = reboot(RebootMode::RB_AUTOBOOT);
    eprintln!("flatlet-agent: reboot: {e}");
}
