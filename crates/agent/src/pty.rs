//! Pseudo-terminals for processes started with `terminal`.
//!
//! The pair comes from the container's own devpts (its `/dev/ptmx`, which
//! the kernel resolves to the devpts mounted at the `pts` beside it), so
//! the process finds its terminal at `/dev/pts/N` of its container. The
//! process gets the slave as stdin, stdout and stderr; the agent keeps the
//! master and relays between it and the process's vsock streams: stdin
//! into the terminal, the terminal's output to stdout (a terminal has no
//! separate stderr).
//!
//! The output relay ends when every holder of the slave has closed it
//! (the master reads `EIO` once the last byte is read), and, once the
//! process has exited, also when nothing more comes for [`DRAIN_IDLE`] (a
//! child left holding the terminal) or after [`DRAIN_MAX`]: the stdout
//! stream then gets its end-of-file, so that the host's relay ends with
//! the process. The stdin relay ends with the host's end of stdin, or
//! with the output relay.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::libc;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::stat::Mode;
use nix::unistd::pipe2;
use socket2::Socket;

/// Once the process has exited: how long the output relay waits for more.
pub const DRAIN_IDLE: Duration = Duration::from_secs(1);
/// Once the process has exited: how long the output relay goes on at most.
pub const DRAIN_MAX: Duration = Duration::from_secs(5);

/// A new pseudo-terminal of the multiplexer at `ptmx`: its master and its
/// slave, both close-on-exec, the slave unlocked.
pub fn open_pair(ptmx: &Path) -> nix::Result<(File, File)> {
    let master = open(
        ptmx,
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one c_int through the pointer, which points
    // at a live local; the descriptor is open.
    Errno::result(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) })?;
    // The slave through the master (TIOCGPTPEER), not by its path: the
    // path is the container's, which the agent does not see at /dev/pts.
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes its flags by value and returns a new
    // descriptor or -1; the descriptor is open.
    let slave = Errno::result(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) })?;
    // SAFETY: the kernel just returned `slave` to us: a new descriptor
    // that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    Ok((File::from(master), File::from(slave)))
}

/// Sets the terminal's window size (on the master or the slave); the
/// process group in the foreground gets SIGWINCH.
pub fn set_size(tty: BorrowedFd<'_>, rows: u16, cols: u16) -> nix::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize through the pointer, which
    // points at a live local; the descriptor is borrowed, so open.
    Errno::result(unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &size) }).map(drop)
}

/// Makes `tty` the controlling terminal of the caller, which must lead a
/// session that has none (after `setsid`).
pub fn make_controlling(tty: BorrowedFd<'_>) -> nix::Result<()> {
    // SAFETY: TIOCSCTTY takes an int by value (0: never steal the terminal
    // from another session); the descriptor is borrowed, so open.
    Errno::result(unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSCTTY, 0 as libc::c_int) }).map(drop)
}

/// A process's terminal as the agent keeps it while the process lives.
/// Dropping it (when the process exits) tells the output relay to finish.
#[derive(Debug)]
pub struct Terminal {
    master: File,
    /// The write end of a pipe the output relay polls: closed, it reads
    /// end-of-file, which says the process exited.
    _exited: OwnedFd,
}

impl Terminal {
    /// Starts the relays of `master`: `input` (the stdin stream) into the
    /// terminal, the terminal's output to `output` (the stdout stream; read
    /// and dropped without one). Called before the process starts, so that
    /// nothing can fail once it runs; the caller holds the slave meanwhile.
    pub fn start(master: File, input: Option<Socket>, output: Option<Socket>) -> io::Result<Self> {
        let (exited_r, exited_w) = pipe2(OFlag::O_CLOEXEC)?;
        let out_master = master.try_clone()?;
        // The output relay's handle on stdin: it ends the stdin relay.
        let stop_input = input.as_ref().map(Socket::try_clone).transpose()?;
        if let Some(input) = input {
            let in_master = master.try_clone()?;
            std::thread::Builder::new()
                .name("pty-in".into())
                .spawn(move || relay_in(&input, &in_master))?;
        }
        let spawned = std::thread::Builder::new().name("pty-out".into()).spawn({
            let stop_input = stop_input.as_ref().map(Socket::try_clone).transpose()?;
            move || {
                relay_out(&out_master, output.as_ref(), &exited_r);
                if let Some(out) = &output {
                    let _ = out.shutdown(Shutdown::Write);
                }
                if let Some(input) = &stop_input {
                    let _ = input.shutdown(Shutdown::Read);
                }
            }
        });
        if let Err(e) = spawned {
            if let Some(input) = &stop_input {
                let _ = input.shutdown(Shutdown::Read);
            }
            return Err(e);
        }
        Ok(Self {
            master,
            _exited: exited_w,
        })
    }

    /// A new window size.
    pub fn resize(&self, rows: u16, cols: u16) -> nix::Result<()> {
        set_size(self.master.as_fd(), rows, cols)
    }
}

/// Copies the host's input into the terminal until the input ends (the
/// host closed it, or the output relay shut it down). The terminal stays:
/// the end of the stream is no end-of-file for the process, which reads
/// its terminal's EOF character when one is typed.
fn relay_in(mut input: impl Read, mut master: &File) {
    let _ = io::copy(&mut input, &mut master);
}

/// Copies the terminal's output (`master`) to `out` until no process holds
/// the slave, or, once `exited` reads end-of-file (the process exited),
/// until it has been quiet for [`DRAIN_IDLE`] or [`DRAIN_MAX`] has passed.
/// Output `out` does not take (none, or it failed) is read and dropped,
/// so that the process never blocks on a full terminal.
fn relay_out(master: &File, mut out: Option<impl Write>, exited: &OwnedFd) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut exited_at: Option<Instant> = None;
    loop {
        let timeout = match exited_at {
            None => PollTimeout::NONE,
            Some(at) => {
                let left = DRAIN_MAX.saturating_sub(at.elapsed());
                if left.is_zero() {
                    return;
                }
                PollTimeout::try_from(left.min(DRAIN_IDLE)).unwrap_or(PollTimeout::ZERO)
            }
        };
        let mut fds = vec![PollFd::new(master.as_fd(), PollFlags::POLLIN)];
        if exited_at.is_none() {
            fds.push(PollFd::new(exited.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            // Only with a timeout: the process exited and all is quiet.
            Ok(0) => return,
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(_) => return,
        }
        let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
        if exited_at.is_none() && fds.get(1).is_some_and(ready) {
            exited_at = Some(Instant::now());
        }
        if !ready(&fds[0]) {
            continue;
        }
        let mut reader = master;
        match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if let Some(w) = out.as_mut()
                    && w.write_all(&buf[..n]).and_then(|()| w.flush()).is_err()
                {
                    out = None;
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => {}
            // EIO: every holder of the slave has closed it, and everything
            // written before is read.
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::process::{Command, Stdio};

    /// The host's own multiplexer: these tests need no container.
    const PTMX: &str = "/dev/ptmx";

    fn size(tty: BorrowedFd<'_>) -> (u16, u16) {
        let mut size = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize through the pointer, which
        // points at a live local; the descriptor is borrowed, so open.
        Errno::result(unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCGWINSZ, &mut size) }).unwrap();
        (size.ws_row, size.ws_col)
    }

    /// Runs `script` with the slave as its stdio, relays into a socket
    /// pair as the agent does (the exit notice when `sh` exits), and
    /// returns what came out and how long the relay took after the exit.
    fn run(script: &str) -> (String, Duration) {
        let (master, slave) = open_pair(Path::new(PTMX)).unwrap();
        let (exited_r, exited_w) = pipe2(OFlag::O_CLOEXEC).unwrap();
        let (theirs, ours) = UnixStream::pair().unwrap();
        let relay = std::thread::spawn(move || {
            relay_out(&master, Some(&theirs), &exited_r);
        });
        let mut child = Command::new("sh")
            .args(["-c", script])
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave))
            .spawn()
            .unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = String::new();
            (&ours).read_to_string(&mut got).unwrap();
            got
        });
        child.wait().unwrap();
        let exited = Instant::now();
        drop(exited_w);
        relay.join().unwrap();
        (reader.join().unwrap(), exited.elapsed())
    }

    #[test]
    fn the_output_arrives_whole_and_the_stream_ends_with_the_process() {
        // More than the terminal's buffers hold: the relay must keep up.
        let (got, after) =
            run("i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done; echo done >&2");
        assert!(got.starts_with("line-0\r\n"), "{:?}", &got[..got.len().min(40)]);
        assert!(
            got.contains("line-1999\r\ndone\r\n"),
            "stderr on the terminal too"
        );
        assert_eq!(got.lines().count(), 2001);
        assert!(
            after < DRAIN_IDLE,
            "no holder left: ended at EIO, not by waiting ({after:?})"
        );
    }

    #[test]
    fn a_child_holding_the_terminal_does_not_hold_the_stream() {
        let (got, after) = run("echo parent; (sleep 3; echo late) & exit 0");
        assert!(got.contains("parent\r\n"), "{got:?}");
        assert!(!got.contains("late"), "{got:?}");
        assert!(
            (DRAIN_IDLE..DRAIN_MAX + Duration::from_secs(1)).contains(&after),
            "ended after the idle wait: {after:?}"
        );
    }

    #[test]
    fn input_reaches_the_process_and_sizes_are_set() {
        let (master, slave) = open_pair(Path::new(PTMX)).unwrap();
        set_size(master.as_fd(), 37, 101).unwrap();
        assert_eq!(size(slave.as_fd()), (37, 101), "the slave sees the master's size");
        let (theirs, ours) = UnixStream::pair().unwrap();
        let in_master = master.try_clone().unwrap();
        let input = std::thread::spawn(move || relay_in(&theirs, &in_master));
        (&ours).write_all(b"typed\n").unwrap();
        ours.shutdown(Shutdown::Write).unwrap();
        input.join().unwrap();
        let mut line = String::new();
        io::BufRead::read_line(&mut io::BufReader::new(&slave), &mut line).unwrap();
        assert_eq!(line, "typed\n");
    }

    #[test]
    fn a_missing_multiplexer_is_an_error() {
        assert_eq!(
            open_pair(Path::new("/nonexistent/ptmx")).err(),
            Some(Errno::ENOENT)
        );
    }
}
