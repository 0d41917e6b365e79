//! Relays between containerd's FIFOs and the agent's stream connections.
//! stdout and stderr: guest to FIFO until the guest closes; stdin: FIFO to
//! guest until containerd closes its end (or `close_io`), then end-of-file
//! for the process.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

/// The output relays of one process; `finish` waits for them to drain.
#[derive(Default)]
pub struct Outputs {
    done: Vec<Receiver<()>>,
}

impl Outputs {
    /// Copies `stream` into the FIFO at `path`.
    pub fn relay_out(&mut self, mut stream: UnixStream, path: String) {
        let (tx, rx) = channel();
        self.done.push(rx);
        std::thread::spawn(move || {
            // Read-write: opening never waits for a reader, and containerd's
            // reader sees end-of-file once this is closed.
            match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(mut fifo) => {
                    if let Err(e) = std::io::copy(&mut stream, &mut fifo) {
                        log::debug!("relay to {path}: {e}");
                    }
                    let _ = fifo.flush();
                }
                Err(e) => log::warn!("opening {path}: {e}"),
            }
            let _ = tx.send(());
        });
    }

    /// Waits up to `timeout` for every output to end.
    pub fn finish(self, timeout: Duration) {
        for rx in self.done {
            let _ = rx.recv_timeout(timeout);
        }
    }
}

/// The stdin relay of one process.
pub struct Input {
    handle: UnixStream,
    done: Receiver<()>,
}

impl Input {
    /// containerd is done with stdin: the relay forwards what is left in
    /// the FIFO and ends; one that is still blocked after `grace` (a
    /// writer that keeps the FIFO open) has its stream closed.
    pub fn close(self, grace: Duration) {
        std::thread::spawn(move || {
            if self.done.recv_timeout(grace).is_err() {
                let _ = self.handle.shutdown(Shutdown::Write);
            }
        });
    }
}

/// Copies the FIFO at `path` into `stream`, then ends the process's input
/// (the guest reads end-of-file after the data).
pub fn relay_in(stream: UnixStream, path: String) -> Option<Input> {
    let handle = stream.try_clone().ok()?;
    let (tx, done) = channel();
    std::thread::spawn(move || {
        let mut stream = stream;
        match OpenOptions::new().read(true).open(&path) {
            Ok(mut fifo) => {
                if let Err(e) = std::io::copy(&mut fifo, &mut stream) {
                    log::debug!("relay from {path}: {e}");
                }
            }
            Err(e) => log::warn!("opening {path}: {e}"),
        }
        let _ = stream.shutdown(Shutdown::Write);
        let _ = tx.send(());
    });
    Some(Input { handle, done })
}
