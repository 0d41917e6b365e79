//! Relays between containerd's FIFOs and the agent's stream connections.
//! stdout and stderr: guest to FIFO until the guest closes; stdin: FIFO to
//! guest until containerd closes its end (or `close_io`), then end-of-file
//! for the process.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

/// Copies `from` into `to` until end-of-file, with plain reads and writes.
/// Not `std::io::copy`: between a socket and a FIFO it splices, and a
/// splice from a socket into a pipe holds the pipe's lock while it waits
/// for data, so that the FIFO's reader (ctr) cannot read what is in it
/// until more comes: a prompt, or a terminal's output before the process
/// reads, was never seen.
fn pump(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => to.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

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
                    if let Err(e) = pump(&mut stream, &mut fifo) {
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
                if let Err(e) = pump(&mut fifo, &mut stream) {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::fs::File;
    use std::io::Read;

    use nix::sys::stat::Mode;
    use nix::unistd::mkfifo;

    #[test]
    fn output_reaches_the_fifo_while_the_stream_stays_open() {
        let dir = std::env::temp_dir().join(format!("flatlet-shim-stdio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("stdout");
        mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
        let (guest, host) = UnixStream::pair().unwrap();
        let mut outputs = Outputs::default();
        outputs.relay_out(host, fifo.to_string_lossy().into_owned());
        // containerd's (ctr's) end: a reader that stays.
        let (tx, rx) = channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let mut f = File::open(&path).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while !got.ends_with(b"prompt> ") {
                match f.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let _ = tx.send(got);
        });
        // A process that prints a prompt and waits: the stream stays open.
        (&guest).write_all(b"prompt> ").unwrap();
        let got = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the prompt reached the FIFO's reader while the stream stayed open");
        assert_eq!(got, b"prompt> ");
        drop(guest);
        outputs.finish(Duration::from_secs(10));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
