//! The protocol between the containerd shim (`containerd-shim-flatlet-v2`,
//! on the host) and the agent (PID 1 in the guest). `PROTOCOL.md` beside
//! this crate describes it for people; this is its only implementation.
//!
//! The agent listens on vsock port [`AGENT_PORT`]. The host opens one
//! connection per request (through flatlet's Unix socket and
//! `CONNECT <port>\n`). On each connection:
//!
//! 1. the shim sends a [`Hello`] frame with its [`PROTOCOL_VERSION`];
//! 2. the agent answers with its own [`Hello`]; if the versions differ it
//!    closes the connection, and the shim refuses the agent;
//! 3. the shim sends one [`Request`], the agent answers one [`Response`];
//! 4. for [`Request::Attach`] the connection then carries the process's
//!    raw bytes (stdin towards the guest, stdout or stderr towards the host)
//!    until either side closes it; otherwise it is closed.
//!
//! A frame is a 4-byte big-endian length and that many bytes of JSON, at
//! most [`MAX_FRAME`]. A bad length, oversized frame or bad JSON is an
//! error, never a panic.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The protocol version. Bumped on any incompatible change; the shim
/// refuses an agent whose version differs. Version 2: processes with a
/// terminal (version 1 refused them, and `resize_pty`).
pub const PROTOCOL_VERSION: u32 = 2;

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;

/// The largest frame body either side accepts.
pub const MAX_FRAME: usize = 1 << 20;

/// Errors of reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection before a frame started.
    #[error("the connection was closed")]
    Closed,
    /// Reading or writing failed (including a frame cut short).
    #[error("frame I/O: {0}")]
    Io(#[from] io::Error),
    /// The length prefix is over the limit.
    #[error("frame of {len} bytes is over the limit of {MAX_FRAME}")]
    TooLarge {
        /// The length the peer announced or the sender tried.
        len: usize,
    },
    /// The body is not the JSON expected.
    #[error("bad frame body: {0}")]
    Json(#[from] serde_json::Error),
}

/// The first frame each way on every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The sender's [`PROTOCOL_VERSION`].
    pub version: u32,
    /// Who is speaking, for logs (`flatlet-agent 0.1.0`).
    pub software: String,
}

/// One of a process's standard streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Host to process.
    Stdin,
    /// Process to host.
    Stdout,
    /// Process to host.
    Stderr,
}

/// Where a container's root file system is in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rootfs {
    /// A block device, e.g. `/dev/vdb`.
    pub device: String,
    /// Its file system type (`ext4`).
    pub fstype: String,
    /// Mount it read-only.
    pub readonly: bool,
}

/// A process to run in a container (from the OCI spec's `process`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    /// `argv`; `args[0]` is looked up in the `PATH` of `env` when it has no `/`.
    pub args: Vec<String>,
    /// `NAME=value` entries: the whole environment.
    pub env: Vec<String>,
    /// The working directory inside the container (absolute).
    pub cwd: String,
    /// The user id.
    pub uid: u32,
    /// The group id.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
    /// Run it on a pseudo-terminal of its container: the terminal is its
    /// stdin, stdout and stderr, and its controlling terminal; the stdin
    /// stream feeds it, the stdout stream carries everything it prints
    /// (no stderr stream may be attached).
    pub terminal: bool,
}

/// What the shim asks. Each names its container; `exec_id` is `""` for
/// the container's first process and the exec's id for the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Is the agent there? Answered with [`Response::Ok`].
    Ping {},
    /// Mount the container's root file system (`/proc`, `/sys`, `/dev` in it).
    CreateContainer {
        /// The container's id.
        container_id: String,
        /// Its root file system.
        rootfs: Rootfs,
    },
    /// Make this connection one of a process's streams (before it starts).
    Attach {
        /// The container's id.
        container_id: String,
        /// The process's exec id.
        exec_id: String,
        /// Which stream.
        stream: Stream,
    },
    /// Start a process in the container: the first (`exec_id` `""`) or an exec.
    StartProcess {
        /// The container's id.
        container_id: String,
        /// The process's exec id.
        exec_id: String,
        /// What to run.
        process: ProcessSpec,
    },
    /// Send a signal to a process (or, with `all`, to every process of the container).
    Signal {
        /// The container's id.
        container_id: String,
        /// The process's exec id.
        exec_id: String,
        /// The signal number.
        signal: i32,
        /// Every process of the container.
        all: bool,
    },
    /// Answered when the process has exited, with [`Response::Exited`].
    Wait {
        /// The container's id.
        container_id: String,
        /// The process's exec id.
        exec_id: String,
    },
    /// The agent lets go of the process's stdin. End-of-file comes from the
    /// host closing its end (after the data), never from the agent.
    CloseStdin {
        /// The container's id.
        container_id: String,
        /// The process's exec id.
        exec_id: String,
    },
    /// A new window size for the terminal of a process started with
    /// `terminal` (its foreground process group gets SIGWINCH); nothing
    /// once it has exited.
    ResizePty {
        /// The container's id.
        container_id: String,
        /// The process's exec id.
        exec_id: String,
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// The pids (in the guest) of the container's processes.
    ListProcesses {
        /// The container's id.
        container_id: String,
    },
    /// Kill what is left of the container and unmount its file systems.
    DeleteContainer {
        /// The container's id.
        container_id: String,
    },
    /// Sync and power off the VM (answered first).
    Shutdown {},
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// Done.
    Ok {},
    /// The process started, with this pid in the guest.
    Started {
        /// Its pid.
        pid: u32,
    },
    /// The process exited: its exit code, or 128 + the signal that killed it.
    Exited {
        /// The status.
        status: i32,
    },
    /// [`Request::ListProcesses`]'s answer.
    Pids {
        /// Guest pids.
        pids: Vec<u32>,
    },
    /// The request failed.
    Error {
        /// Why, for people.
        message: String,
    },
}

/// Writes one frame: the length, then the JSON of `msg`.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge { len: body.len() });
    }
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge { len: body.len() })?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame and parses its JSON as `T`. The length is checked
/// before anything is allocated.
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { len });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

/// This side's [`Hello`].
pub fn hello(software: &str) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        software: software.to_string(),
    }
}

#[cfg(test)]
mod tests;
