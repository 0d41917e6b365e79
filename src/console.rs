//! The host side of the guest console: stdout for output, stdin for input
//! (in raw mode when it is a terminal, restored on exit).

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

/// Where guest output goes: stdout, flushed as the guest writes.
pub fn output() -> Box<dyn Write + Send> {
    Box::new(std::io::stdout())
}
