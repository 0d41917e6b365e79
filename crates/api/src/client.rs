//! A client of the API socket (hyper, HTTP/1.1), for `flatlet api`, the
//! tests and the benchmarks.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;

/// Errors talking to the socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No server at the path.
    #[error("cannot connect to {path}: {source}")]
    Connect { path: String, source: std::io::Error },
    /// The runtime could not start.
    #[error("cannot start the client runtime: {0}")]
    Runtime(std::io::Error),
    /// HTTP failed.
    #[error("HTTP: {0}")]
    Http(String),
}

/// An answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Body (empty for 204).
    pub body: String,
}

/// A connection to the API socket, kept open across requests.
pub struct Client {
    rt: tokio::runtime::Runtime,
    sender: SendRequest<Full<Bytes>>,
}

impl Client {
    /// Connects to the API socket at `path`.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(ClientError::Runtime)?;
        let shown = path.display().to_string();
        let sender = rt.block_on(async {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|source| ClientError::Connect { path: shown, source })?;
            let (sender, conn) = http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?;
            tokio::spawn(conn);
            Ok::<_, ClientError>(sender)
        })?;
        Ok(Self { rt, sender })
    }

    /// Sends `method path` with an optional JSON body.
    pub fn request(&mut self, method: &str, path: &str, body: Option<&str>) -> Result<Reply, ClientError> {
        // Anything else would be sent as another request than the one
        // meant (`machine-config` went out as `GET /`).
        if !path.starts_with('/') {
            return Err(ClientError::Http(format!(
                "the path {path:?} does not start with '/' (try \"/{path}\")"
            )));
        }
        let req = hyper::Request::builder()
            .method(method.to_ascii_uppercase().as_str())
            .uri(path)
            .header(HOST, "localhost")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let sender = &mut self.sender;
        self.rt.block_on(async {
            sender
                .ready()
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?;
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?
                .to_bytes();
            Ok(Reply {
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            })
        })
    }
}

/// One request on a fresh connection.
pub fn request(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Result<Reply, ClientError> {
    Client::connect(sock)?.request(method, path, body)
}
