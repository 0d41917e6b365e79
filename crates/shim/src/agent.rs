//! The shim's side of the agent protocol: a connection per request through
//! flatlet's vsock Unix socket (`CONNECT 1024\n`, `OK ...`), the version
//! handshake (an agent of another version is refused), one request and
//! its answer.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flatlet_agent_protocol::{
    AGENT_PORT, FrameError, Hello, PROTOCOL_VERSION, Request, Response, Stream, hello, read_frame,
    write_frame,
};

const SOFTWARE: &str = concat!("containerd-shim-flatlet-v2 ", env!("CARGO_PKG_VERSION"));
/// An ordinary request's answer (a nested guest is slow: seconds).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a refused connect to an agent that answered before is retried
/// (flatlet gives the guest 2 s to take each connection; a busy emulated
/// guest on a loaded host missed that for 30 s straight once).
const CONNECT_RETRY: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("connecting to the VM's vsock socket {path}: {source}")]
    Connect { path: String, source: std::io::Error },
    #[error("the VM did not accept a connection to the agent's port: {0}")]
    Refused(String),
    #[error("talking to the agent: {0}")]
    Frame(#[from] FrameError),
    #[error("the agent speaks protocol version {theirs} ({software}); this shim speaks {PROTOCOL_VERSION}")]
    Version { theirs: u32, software: String },
    #[error("the agent: {0}")]
    Failed(String),
    #[error("the agent answered {0:?}, not what was asked")]
    Unexpected(Box<Response>),
    #[error("the agent did not answer within {0:?}")]
    NotReady(Duration),
    #[error("the VM ended before its agent answered")]
    VmEnded,
}

/// The agent of one VM.
#[derive(Debug, Clone)]
pub struct Agent {
    uds: PathBuf,
}

impl Agent {
    /// The agent behind flatlet's vsock socket at `uds`.
    pub fn new(uds: &Path) -> Self {
        Self {
            uds: uds.to_path_buf(),
        }
    }

    /// A connection, past the vsock handshake and the version check.
    /// A connection; a connect the VM refuses (the guest did not accept
    /// within flatlet's 2 s, as happens on a loaded nested host) is tried
    /// again for up to `retry`.
    fn open(&self, timeout: Option<Duration>, retry: Duration) -> Result<UnixStream, AgentError> {
        let start = Instant::now();
        loop {
            match self.open_once(timeout, REQUEST_TIMEOUT) {
                Err(AgentError::Refused(why)) if start.elapsed() < retry => {
                    log::debug!("the agent's port refused ({why}); again");
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    /// One connection; the vsock handshake and the version check may take
    /// up to `handshake` (a VM whose vsock device is not set up yet holds
    /// the connection unanswered).
    fn open_once(&self, timeout: Option<Duration>, handshake: Duration) -> Result<UnixStream, AgentError> {
        let mut s = UnixStream::connect(&self.uds).map_err(|source| AgentError::Connect {
            path: self.uds.display().to_string(),
            source,
        })?;
        s.set_read_timeout(Some(handshake.max(Duration::from_millis(1))))
            .map_err(|e| AgentError::Frame(e.into()))?;
        s.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())
            .map_err(|e| AgentError::Frame(e.into()))?;
        // One byte at a time: nothing past the line may be consumed.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.last() != Some(&b'\n') && line.len() < 64 {
            match s.read(&mut byte) {
                Ok(0) => return Err(AgentError::Refused("closed".into())),
                Ok(_) => line.push(byte[0]),
                Err(e) => return Err(AgentError::Refused(e.to_string())),
            }
        }
        if !line.starts_with(b"OK ") {
            return Err(AgentError::Refused(
                String::from_utf8_lossy(&line).trim().to_string(),
            ));
        }
        write_frame(&mut s, &hello(SOFTWARE))?;
        let theirs: Hello = read_frame(&mut s)?;
        if theirs.version != PROTOCOL_VERSION {
            return Err(AgentError::Version {
                theirs: theirs.version,
                software: theirs.software,
            });
        }
        s.set_read_timeout(timeout)
            .map_err(|e| AgentError::Frame(e.into()))?;
        Ok(s)
    }

    fn call_with(
        &self,
        request: &Request,
        timeout: Option<Duration>,
        retry: Duration,
    ) -> Result<Response, AgentError> {
        let mut s = self.open(timeout, retry)?;
        write_frame(&mut s, request)?;
        match read_frame(&mut s)? {
            Response::Error { message } => Err(AgentError::Failed(message)),
            r => Ok(r),
        }
    }

    /// One request and its answer (errors from the agent are `Failed`).
    pub fn call(&self, request: &Request) -> Result<Response, AgentError> {
        self.call_with(request, Some(REQUEST_TIMEOUT), CONNECT_RETRY)
    }

    /// A request answered by `Ok`.
    pub fn call_ok(&self, request: &Request) -> Result<(), AgentError> {
        match self.call(request)? {
            Response::Ok {} => Ok(()),
            other => Err(AgentError::Unexpected(Box::new(other))),
        }
    }

    /// Waits, without a time limit, for the process's exit status.
    pub fn wait(&self, container_id: &str, exec_id: &str) -> Result<i32, AgentError> {
        let request = Request::Wait {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
        };
        match self.call_with(&request, None, CONNECT_RETRY)? {
            Response::Exited { status } => Ok(status),
            other => Err(AgentError::Unexpected(Box::new(other))),
        }
    }

    /// A connection that becomes the process's `stream`.
    pub fn attach(
        &self,
        container_id: &str,
        exec_id: &str,
        stream: Stream,
    ) -> Result<UnixStream, AgentError> {
        let mut s = self.open(Some(REQUEST_TIMEOUT), CONNECT_RETRY)?;
        let request = Request::Attach {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            stream,
        };
        write_frame(&mut s, &request)?;
        match read_frame(&mut s)? {
            Response::Ok {} => {
                s.set_read_timeout(None)
                    .map_err(|e| AgentError::Frame(e.into()))?;
                Ok(s)
            }
            Response::Error { message } => Err(AgentError::Failed(message)),
            other => Err(AgentError::Unexpected(Box::new(other))),
        }
    }

    /// Pings until the agent answers, `vm_alive` says no, or `timeout` passes
    /// (no ping outlasts it: a booting VM may hold a connection unanswered).
    pub fn wait_ready(&self, timeout: Duration, vm_alive: impl Fn() -> bool) -> Result<Duration, AgentError> {
        let start = Instant::now();
        loop {
            let left = timeout.saturating_sub(start.elapsed()).min(REQUEST_TIMEOUT);
            let ping = self.open_once(Some(left), left).and_then(|mut s| {
                write_frame(&mut s, &Request::Ping {})?;
                let answer: Response = read_frame(&mut s)?;
                Ok(answer)
            });
            match ping {
                Ok(Response::Ok {}) => return Ok(start.elapsed()),
                // An agent of another version will not change its mind.
                Err(e @ AgentError::Version { .. }) => return Err(e),
                _ => {}
            }
            if !vm_alive() {
                return Err(AgentError::VmEnded);
            }
            if start.elapsed() > timeout {
                return Err(AgentError::NotReady(timeout));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    fn read_line(r: &mut impl BufRead) -> String {
        let mut l = String::new();
        let _ = r.read_line(&mut l);
        l
    }

    /// A fake flatlet+agent: answers CONNECT, then Hello with `version`, then `answer`.
    fn fake(
        dir: &Path,
        version: u32,
        answer: Response,
    ) -> (PathBuf, std::thread::JoinHandle<Option<Request>>) {
        let uds = dir.join("v.sock");
        let _ = std::fs::remove_file(&uds);
        let l = UnixListener::bind(&uds).unwrap();
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            assert_eq!(read_line(&mut r), "CONNECT 1024\n");
            let mut w = s;
            w.write_all(b"OK 1073741824\n").unwrap();
            let h: Hello = read_frame(&mut r).unwrap();
            assert_eq!(h.version, PROTOCOL_VERSION);
            write_frame(
                &mut w,
                &Hello {
                    version,
                    software: "fake".into(),
                },
            )
            .unwrap();
            if version != PROTOCOL_VERSION {
                return None;
            }
            let req: Request = read_frame(&mut r).unwrap();
            write_frame(&mut w, &answer).unwrap();
            Some(req)
        });
        (uds, h)
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flatlet-shim-agent-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_request_goes_through_the_handshakes() {
        let d = tmp("ok");
        let (uds, h) = fake(&d, PROTOCOL_VERSION, Response::Exited { status: 3 });
        assert_eq!(Agent::new(&uds).wait("c", "").unwrap(), 3);
        assert_eq!(
            h.join().unwrap(),
            Some(Request::Wait {
                container_id: "c".into(),
                exec_id: String::new()
            })
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_agent_of_another_version_is_refused() {
        let d = tmp("version");
        let (uds, h) = fake(&d, PROTOCOL_VERSION + 1, Response::Ok {});
        match Agent::new(&uds).call(&Request::Ping {}) {
            Err(AgentError::Version { theirs, .. }) => assert_eq!(theirs, PROTOCOL_VERSION + 1),
            other => panic!("expected a version error, got {other:?}"),
        }
        assert_eq!(h.join().unwrap(), None);
        // Waiting for the agent to come up ends at once (the agent is up).
        let (uds, h) = fake(&d, PROTOCOL_VERSION + 1, Response::Ok {});
        let start = Instant::now();
        match Agent::new(&uds).wait_ready(Duration::from_secs(60), || true) {
            Err(AgentError::Version { theirs, .. }) => assert_eq!(theirs, PROTOCOL_VERSION + 1),
            other => panic!("expected a version error, got {other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{:?}", start.elapsed());
        assert_eq!(h.join().unwrap(), None);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn errors_and_unexpected_answers_are_errors() {
        let d = tmp("err");
        let (uds, h) = fake(
            &d,
            PROTOCOL_VERSION,
            Response::Error {
                message: "no container x".into(),
            },
        );
        assert!(
            matches!(Agent::new(&uds).call_ok(&Request::Ping {}), Err(AgentError::Failed(m)) if m == "no container x")
        );
        h.join().unwrap();
        let (uds, h) = fake(&d, PROTOCOL_VERSION, Response::Pids { pids: vec![] });
        assert!(matches!(
            Agent::new(&uds).call_ok(&Request::Ping {}),
            Err(AgentError::Unexpected(_))
        ));
        h.join().unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_vm_that_refuses_the_port_is_an_error() {
        let d = tmp("refused");
        let uds = d.join("v.sock");
        let l = UnixListener::bind(&uds).unwrap();
        let h = std::thread::spawn(move || drop(l.accept().unwrap()));
        // Refused, tried again, and then nobody listens at all.
        assert!(matches!(
            Agent::new(&uds).call(&Request::Ping {}),
            Err(AgentError::Connect { .. })
        ));
        h.join().unwrap();
        assert!(matches!(
            Agent::new(&d.join("none")).wait_ready(Duration::from_millis(10), || false),
            Err(AgentError::VmEnded)
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_vm_that_holds_the_connection_unanswered_ends_the_wait_in_time() {
        // A booting VM whose vsock device is not set up: the connection is
        // accepted and never answered. The wait ends at its own limit, not
        // at a request's (two minutes).
        let d = tmp("silent");
        let uds = d.join("v.sock");
        let l = UnixListener::bind(&uds).unwrap();
        let held = std::thread::spawn(move || {
            let mut kept = Vec::new();
            l.set_nonblocking(true).unwrap();
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until {
                match l.accept() {
                    Ok((s, _)) => kept.push(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            kept.len()
        });
        let start = Instant::now();
        let r = Agent::new(&uds).wait_ready(Duration::from_millis(300), || true);
        assert!(matches!(r, Err(AgentError::NotReady(_))), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
        assert!(held.join().unwrap() >= 1);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
