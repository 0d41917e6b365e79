//! The host side of the guest console: stdout for output, stdin for input
//! (in raw mode when it is a terminal, restored on exit).
//!
//! Guest output is written on vCPU threads and must never wait for
//! whoever reads stdout (a pipe nobody reads would otherwise stop the
//! vCPU, and then everything that waits for it). So stdout is written
//! without blocking, and the UART keeps a bounded buffer in front of it
//! (`flatlet_devices::serial`): output that finds both full is dropped and
//! counted (`uart.missed_write_count` in the metrics). No thread is added
//! for this: the buffer is written out by the vCPU thread at the guest's
//! next UART access (or the next console input), which is never a wait.
//!
//! Non-blocking without touching what others share: a pipe, FIFO or
//! terminal on stdout is opened again (a new open file description, see
//! `flatlet_vmm::logger::nonblocking_stdio`), so that `O_NONBLOCK` does
//! not reach the shell or pipeline flatlet runs in; a regular file needs
//! no change.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;

use log::{debug, warn};
use nix::sys::termios::{self, LocalFlags, SetArg, Termios};

/// A terminal put in raw mode, restored when dropped.
pub struct RawTerminal {
    saved: Option<Termios>,
}

impl RawTerminal {
    /// Puts stdin in raw mode when it is a terminal (echo, line editing
    /// and signal keys go to the guest; Ctrl-A x leaves).
    pub fn enter() -> Self {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Self { saved: None };
        }
        let saved = match termios::tcgetattr(stdin.as_fd()) {
            Ok(t) => t,
            Err(e) => {
                warn!("cannot read the terminal mode: {e}");
                return Self { saved: None };
            }
        };
        let mut raw = saved.clone();
        raw.local_flags &= !(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG | LocalFlags::IEXTEN);
        if let Err(e) = termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw) {
            warn!("cannot put the terminal in raw mode: {e}");
            return Self { saved: None };
        }
        debug!("terminal in raw mode; Ctrl-A x leaves the console");
        Self { saved: Some(saved) }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, saved);
        }
    }
}

/// Stdin as an unbuffered file (a buffered reader would hide input from
/// the event loop's readiness checks).
pub fn input() -> Option<File> {
    std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .map_err(|e| warn!("console input disabled: {e}"))
        .ok()
}

/// Where guest output goes: stdout, written without blocking (nothing,
/// with a warning, if stdout cannot be had).
pub fn output() -> Box<dyn Write + Send> {
    match flatlet_vmm::logger::nonblocking_stdio(std::io::stdout().as_fd()) {
        Ok(f) => Box::new(f),
        Err(e) => {
            warn!("guest console output disabled: {e}");
            Box::new(std::io::sink())
        }
    }
}
