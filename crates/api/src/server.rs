//! The API thread: HTTP/1.1 (hyper) on a Unix socket, on a single-threaded
//! tokio runtime. Each request is parsed into a controller request and
//! handed to the VMM thread; the thread's answer becomes the response.
//!
//! No client can hold the VMM up: headers must arrive within
//! [`HEADER_TIMEOUT`] and bodies within [`BODY_TIMEOUT`], bodies are capped
//! at the payload limit (51200 bytes by default, as in Firecracker), and
//! every connection is a task of its own, so a slow or vanished client
//! stalls only itself.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request as HttpRequest, Response as HttpResponse, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};

use flatlet_vmm::runtime::{ApiCall, ApiSender};

use crate::routes;

/// Firecracker's default limit on request bodies.
pub const DEFAULT_MAX_PAYLOAD: usize = 51200;
/// How long a client may take to send its headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send its body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest header section.
const MAX_HEADER_BUF: usize = 16 * 1024;

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket path is taken by a live server.
    #[error("the API socket {0} is in use by another process")]
    InUse(String),
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket: flatlet replaces only a stale API socket")]
    NotASocket(String),
    /// The socket cannot be made.
    #[error("cannot create the API socket {path}: {source}")]
    Bind { path: String, source: std::io::Error },
    /// The API thread cannot start.
    #[error("cannot start the API thread: {0}")]
    Thread(std::io::Error),
    /// The API thread's seccomp filter.
    #[error("API thread: {0}")]
    Seccomp(String),
}

/// Binds the API socket. Only a stale socket (a socket file nobody
/// listens on) is replaced; a live one, or anything that is not a socket
/// (a file, a directory, a symbolic link, ...), is refused and left as it
/// is.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let shown = path.display().to_string();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse(shown));
            }
            std::fs::remove_file(path).map_err(|source| ServerError::Bind {
                path: shown.clone(),
                source,
            })?;
        }
        Ok(_) => return Err(ServerError::NotASocket(shown)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ServerError::Bind { path: shown, source }),
    }
    UnixListener::bind(path).map_err(|source| ServerError::Bind { path: shown, source })
}

/// Removes the socket file when dropped (when flatlet exits).
pub struct SocketFile(pub PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The running API thread.
pub struct ApiThread {
    /// The thread.
    pub handle: JoinHandle<()>,
    ready: Receiver<Result<(), String>>,
}

impl ApiThread {
    /// Waits until the thread has installed its seccomp filter, which it
    /// does before it hears any client; an error if it could not.
    pub fn wait_ready(&self) -> Result<(), ServerError> {
        match self.ready.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ServerError::Seccomp(e)),
            Err(_) => Err(ServerError::Seccomp("the API thread ended".into())),
        }
    }
}

/// Starts the API thread serving `listener`. It installs its seccomp filter
/// first, while the caller goes on (installing a filter costs a few hundred
/// microseconds here, so the VMM thread installs its own meanwhile); the
/// caller checks the outcome with [`ApiThread::wait_ready`].
pub fn spawn(listener: UnixListener, vmm: ApiSender, max_payload: usize) -> Result<ApiThread, ServerError> {
    listener.set_nonblocking(true).map_err(ServerError::Thread)?;
    // Read here: the API thread's filter does not allow getrlimit.
    let cap = connection_cap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("fl_api".into())
        .spawn(move || {
            flatlet_vmm::thread::mask_stop_signals();
            let filtered = flatlet_vmm::seccomp::install(flatlet_vmm::seccomp::ThreadKind::Api);
            let ok = filtered.is_ok();
            let _ = ready_tx.send(filtered.map_err(|e| e.to_string()));
            if ok {
                serve(listener, vmm, max_payload, cap);
            }
        })
        .map_err(ServerError::Thread)?;
    Ok(ApiThread {
        handle,
        ready: ready_rx,
    })
}

fn serve(listener: UnixListener, vmm: ApiSender, max_payload: usize, cap: usize) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            warn!("API server: cannot start its runtime: {e}");
            return;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                warn!("API server: {e}");
                return;
            }
        };
        let vmm = Arc::new(vmm);
        let mut live = Connections::new(cap);
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait, then go on.
                    warn!("API server: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (id, close) = live.add();
            let ended = live.ended.clone();
            let vmm = vmm.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(req, vmm.clone(), max_payload));
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(MAX_HEADER_BUF)
                    .serve_connection(TokioIo::new(stream), service);
                let mut conn = std::pin::pin!(conn);
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    () = close.notified() => {
                        // Evicted for a newer client: an idle connection
                        // closes now, a busy one after its request.
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = result {
                    debug!("API server: connection ended: {e}");
                }
                if let Ok(mut ended) = ended.lock() {
                    ended.push(id);
                }
            });
        }
    });
}

/// Most API connections served at once, whatever the descriptor limit.
pub const MAX_CONNECTIONS: usize = 256;
/// Descriptors kept for the VM (KVM, vCPUs, eventfds, images, TAPs) and
/// for flatlet's own files, out of reach of API clients.
pub const FD_RESERVE: u64 = 512;
/// Fewest connections served at once, however low the descriptor limit.
const MIN_CONNECTIONS: usize = 8;

/// How many connections to serve at once: at most [`MAX_CONNECTIONS`],
/// and no more than the descriptor limit leaves after [`FD_RESERVE`].
pub fn connection_cap() -> usize {
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    cap_for(nofile)
}

fn cap_for(nofile: u64) -> usize {
    let spare = usize::try_from(nofile.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
    spare.clamp(MIN_CONNECTIONS, MAX_CONNECTIONS)
}

/// The connections being served, oldest first. At the cap, a new client
/// does not wait: the oldest connection is asked to close (at once if it
/// is idle, after its request if not), so idle or slow clients can hold
/// neither descriptors nor newcomers up.
struct Connections {
    cap: usize,
    next: u64,
    live: std::collections::BTreeMap<u64, Arc<tokio::sync::Notify>>,
    /// Connections that ended since the last `add`.
    ended: Arc<std::sync::Mutex<Vec<u64>>>,
}

impl Connections {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            next: 0,
            live: std::collections::BTreeMap::new(),
            ended: Arc::default(),
        }
    }

    /// Registers a new connection; evicts the oldest at the cap.
    fn add(&mut self) -> (u64, Arc<tokio::sync::Notify>) {
        if let Ok(mut ended) = self.ended.lock() {
            for id in ended.drain(..) {
                self.live.remove(&id);
            }
        }
        while self.live.len() >= self.cap {
            let Some((old, close)) = self.live.pop_first() else {
                break;
            };
            debug!("API server: {} connections: closing the oldest ({old})", self.cap);
            close.notify_one();
        }
        let id = self.next;
        self.next += 1;
        let close = Arc::new(tokio::sync::Notify::new());
        self.live.insert(id, close.clone());
        (id, close)
    }
}

fn response(status: u16, body: Option<String>) -> HttpResponse<Full<Bytes>> {
    let mut r = HttpResponse::new(Full::new(Bytes::from(body.clone().unwrap_or_default())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if body.is_some() {
        r.headers_mut().insert(
            CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
    }
    r
}

fn too_large(size: usize, max: usize) -> HttpResponse<Full<Bytes>> {
    let (s, b) = routes::fault(&format!(
        "Request payload with size {size} is larger than the limit of {max} allowed by server."
    ));
    response(s, b)
}

async fn handle(
    req: HttpRequest<Incoming>,
    vmm: Arc<ApiSender>,
    max_payload: usize,
) -> Result<HttpResponse<Full<Bytes>>, std::convert::Infallible> {
    let method = req.method().as_str().to_string();
    // Only origin-form targets (`/machine-config`): an authority-form or
    // absolute one would otherwise be served as `/`.
    if req.uri().authority().is_some() || !req.uri().to_string().starts_with('/') {
        let (s, b) = routes::fault(&format!(
            "Invalid request target {:?}: it must start with '/'.",
            req.uri()
        ));
        return Ok(response(s, b));
    }
    let path = req.uri().path().to_string();
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = declared.filter(|n| *n > max_payload) {
        return Ok(too_large(n, max_payload));
    }
    let body = match tokio::time::timeout(BODY_TIMEOUT, Limited::new(req.into_body(), max_payload).collect())
        .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => {
            return Ok(if e.is::<http_body_util::LengthLimitError>() {
                too_large(max_payload + 1, max_payload)
            } else {
                let (s, b) = routes::fault(&format!("Cannot read the request body: {e}"));
                response(s, b)
            });
        }
        Err(_) => {
            let (s, b) = routes::fault("The request body did not arrive in time.");
            return Ok(response(s, b));
        }
    };
    let request = match routes::parse(&method, &path, &body) {
        Ok(r) => r,
        Err(e) => {
            debug!("API: {method} {path}: {e}");
            let (s, b) = routes::fault(&e.to_string());
            return Ok(response(s, b));
        }
    };
    debug!("API: {method} {path}");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let call = ApiCall {
        request,
        reply: Box::new(move |result| {
            let _ = tx.send(result.map_err(|e| (e.http_status(), e.to_string())));
        }),
    };
    if vmm.send(call).is_err() {
        return Ok(response(
            503,
            Some(r#"{"fault_message":"The VMM is shutting down."}"#.into()),
        ));
    }
    let (status, body) = match rx.await {
        Ok(result) => routes::reply(result),
        Err(_) => (
            503,
            Some(r#"{"fault_message":"The VMM is shutting down."}"#.into()),
        ),
    };
    Ok(response(status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_descriptors_for_the_vm() {
        assert_eq!(cap_for(2048), MAX_CONNECTIONS);
        assert_eq!(cap_for(700), 700 - FD_RESERVE as usize);
        assert_eq!(cap_for(100), MIN_CONNECTIONS);
    }

    #[test]
    fn the_oldest_connection_is_asked_to_close_at_the_cap() {
        let mut c = Connections::new(3);
        let (a, close_a) = c.add();
        let (_, close_b) = c.add();
        let (_, _) = c.add();
        let (_, _) = c.add();
        assert_eq!(c.live.len(), 3);
        assert!(!c.live.contains_key(&a));
        // The evicted one has a permit waiting; the others have none.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(100), close_a.notified())
                .await
                .unwrap();
            assert!(
                tokio::time::timeout(Duration::from_millis(50), close_b.notified())
                    .await
                    .is_err()
            );
        });
        // An ended connection frees its place without an eviction.
        c.ended.lock().unwrap().push(1);
        c.add();
        assert_eq!(c.live.len(), 3);
    }
}
