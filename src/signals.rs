//! SIGINT, SIGTERM and SIGHUP end the VM cleanly: each signal writes to a
//! socket the event loop watches (signal-hook's self-pipe).

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use flatlet_vmm::exit::{ExitSignal, VmExit};
use log::{info, warn};
use vmm_sys_util::epoll::EventSet;

const SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Watches the stop signals.
pub struct SignalWatch {
    sockets: Vec<(i32, UnixStream)>,
    stop: Arc<ExitSignal>,
}

impl SignalWatch {
    /// Installs the handlers; a signal then reports a stop to `stop`.
    pub fn install(stop: Arc<ExitSignal>) -> std::io::Result<Self> {
        let mut sockets = Vec::new();
        for sig in SIGNALS {
            let (rx, tx) = UnixStream::pair()?;
            rx.set_nonblocking(true)?;
            signal_hook::low_level::pipe::register(sig, tx)?;
            sockets.push((sig, rx));
        }
        Ok(Self { sockets, stop })
    }
}

impl MutEventSubscriber for SignalWatch {
    fn process(&mut self, events: Events, _: &mut EventOps) {
        for (sig, sock) in &mut self.sockets {
            if std::os::fd::AsRawFd::as_raw_fd(sock) == events.fd() {
                let mut buf = [0u8; 16];
                while matches!(sock.read(&mut buf), Ok(n) if n > 0) {}
                info!("received signal {sig}: stopping");
                self.stop.report(VmExit::Signal(*sig));
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (_, sock) in &self.sockets {
            if let Err(e) = ops.add(Events::new(sock, EventSet::IN)) {
                warn!("cannot watch signals: {e}");
            }
        }
    }
}
