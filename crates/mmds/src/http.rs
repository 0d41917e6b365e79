//! The guest's HTTP requests to MMDS and their answers, as Firecracker
//! gives them: `GET` reads the store (V2: with a session token), `PUT
//! /latest/api/token` makes a token, anything else is refused.
//!
//! Requests are parsed by `httparse`; a request (headers and body) is at
//! most [`MAX_REQUEST_BYTES`].

use std::time::Instant;

use crate::store::{Mmds, MmdsVersion, OutputFormat, StoreError};

/// Largest request (headers and body) MMDS reads.
pub const MAX_REQUEST_BYTES: usize = 4096;
/// Most headers in a request.
const MAX_HEADERS: usize = 32;
/// Where a V2 session starts.
pub const TOKEN_PATH: &str = "/latest/api/token";
const TOKEN_HEADERS: [&str; 2] = ["X-metadata-token", "X-aws-ec2-metadata-token"];
const TTL_HEADERS: [&str; 2] = [
    "X-metadata-token-ttl-seconds",
    "X-aws-ec2-metadata-token-ttl-seconds",
];
const TEXT: &str = "text/plain";
const JSON: &str = "application/json";

/// Counters of what guests asked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpCounters {
    /// Requests answered.
    pub requests: u64,
    /// Requests that could not be parsed, or too large.
    pub bad_requests: u64,
    /// `GET`s without a token (refused under V2, served under V1).
    pub no_token: u64,
    /// `GET`s with an invalid or expired token (refused under V2).
    pub invalid_token: u64,
    /// Tokens made.
    pub tokens: u64,
}

/// What a buffer of request bytes gives.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// The request is not complete yet.
    Incomplete,
    /// A request was answered.
    Answered {
        /// Bytes of the buffer the request took.
        consumed: usize,
        /// The response.
        response: Vec<u8>,
        /// Whether the connection ends after the response.
        close: bool,
    },
}

/// An answer before it is written out.
struct Answer {
    status: u16,
    content_type: &'static str,
    body: String,
    extra: Option<(&'static str, String)>,
}

impl Answer {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: TEXT,
            body: body.into(),
            extra: None,
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        501 => "Not Implemented",
        _ => "Error",
    }
}

fn render(a: &Answer, http10: bool, close: bool) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.{} {} {}\r\nServer: flatlet MMDS\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
        if http10 { 0 } else { 1 },
        a.status,
        reason(a.status),
        a.content_type,
        a.body.len()
    );
    if let Some((name, value)) = &a.extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(if close {
        "Connection: close\r\n\r\n"
    } else {
        "\r\n"
    });
    let mut out = head.into_bytes();
    out.extend_from_slice(a.body.as_bytes());
    out
}

/// A request's parts MMDS looks at.
struct Request<'a> {
    method: &'a str,
    path: &'a str,
    headers: &'a [httparse::Header<'a>],
}

impl Request<'_> {
    /// The first of `names` the request has, and its value.
    fn header(&self, names: &[&'static str]) -> Option<(&'static str, &str)> {
        names
            .iter()
            .find_map(|want| self.header_value(want).map(|value| (*want, value)))
    }

    fn has_header(&self, name: &str) -> bool {
        self.headers.iter().any(|h| h.name.eq_ignore_ascii_case(name))
    }

    fn header_value(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| std::str::from_utf8(h.value).unwrap_or("").trim())
    }
}

/// Serves the first request in `buf`, if it is complete.
pub fn serve(buf: &[u8], mmds: &mut Mmds, now: Instant, counters: &mut HttpCounters) -> Served {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let bad = |counters: &mut HttpCounters, why: &str| {
        counters.bad_requests += 1;
        Served::Answered {
            consumed: buf.len(),
            response: render(&Answer::text(400, why), false, true),
            close: true,
        }
    };
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST_BYTES => {
            return bad(counters, "The request is too large.");
        }
        Ok(httparse::Status::Partial) => return Served::Incomplete,
        Err(e) => return bad(counters, &format!("Invalid HTTP request: {e}.")),
    };
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return bad(counters, "Invalid HTTP request.");
    };
    let request = Request {
        method,
        path,
        headers: req.headers,
    };
    let body_len = match request.header_value("Content-Length").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return bad(counters, "Invalid value of the Content-Length header."),
    };
    if head_len.saturating_add(body_len) > MAX_REQUEST_BYTES {
        return bad(counters, "The request is too large.");
    }
    if buf.len() < head_len + body_len {
        return Served::Incomplete;
    }
    let http10 = minor == 0;
    let connection = request.header_value("Connection").unwrap_or("");
    let close = if http10 {
        !connection.eq_ignore_ascii_case("keep-alive")
    } else {
        connection.eq_ignore_ascii_case("close")
    };
    counters.requests += 1;
    let (answer, close) = if request.has_header("Transfer-Encoding") {
        (
            Answer::text(501, "Transfer-Encoding is not supported by MMDS."),
            true,
        )
    } else {
        (answer(&request, mmds, now, counters), close)
    };
    Served::Answered {
        consumed: head_len + body_len,
        response: render(&answer, http10, close),
        close,
    }
}

/// The path of a request target: an absolute URI loses its scheme and
/// host, and a query is ignored.
fn target_path(target: &str) -> &str {
    let path = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("", |i| &rest[i..]),
        None => target,
    };
    path.split(['?', '#']).next().unwrap_or("")
}

fn answer(req: &Request<'_>, mmds: &mut Mmds, now: Instant, counters: &mut HttpCounters) -> Answer {
    let path = target_path(req.path);
    if !path.starts_with('/') {
        return Answer::text(400, "Invalid URI.");
    }
    match req.method {
        "GET" => get(req, path, mmds, now, counters),
        "PUT" => put(req, path, mmds, now, counters),
        _ => Answer {
            extra: Some(("Allow", "GET, PUT".into())),
            ..Answer::text(405, "Not allowed HTTP method.")
        },
    }
}

fn get(req: &Request<'_>, path: &str, mmds: &Mmds, now: Instant, counters: &mut HttpCounters) -> Answer {
    let token_ok = match req.header(&TOKEN_HEADERS) {
        None => {
            counters.no_token += 1;
            Err(
                "No MMDS token provided. Use the X-metadata-token or X-aws-ec2-metadata-token header to give the session token.",
            )
        }
        Some((_, token)) if !mmds.is_valid_token(token, now) => {
            counters.invalid_token += 1;
            Err("The MMDS token is not valid.")
        }
        Some(_) => Ok(()),
    };
    if let (Err(why), MmdsVersion::V2) = (token_ok, mmds.version()) {
        return Answer::text(401, why);
    }
    let json = req
        .header_value("Accept")
        .is_some_and(|a| a.eq_ignore_ascii_case(JSON));
    let format = if json {
        OutputFormat::Json
    } else {
        OutputFormat::Imds
    };
    match mmds.get(path, format) {
        Ok(body) => Answer {
            status: 200,
            content_type: if json && !mmds.imds_compat() { JSON } else { TEXT },
            body,
            extra: None,
        },
        Err(StoreError::NotFound) => Answer::text(404, format!("Resource not found: {path}.")),
        Err(e) => Answer::text(501, format!("Cannot show this resource: {e}.")),
    }
}

fn put(req: &Request<'_>, path: &str, mmds: &mut Mmds, now: Instant, counters: &mut HttpCounters) -> Answer {
    if req.has_header("X-Forwarded-For") {
        return Answer::text(400, "The X-Forwarded-For header is not accepted on PUT requests.");
    }
    if path
        .split('/')
        .filter(|s| !s.is_empty())
        .ne(TOKEN_PATH.split('/').filter(|s| !s.is_empty()))
    {
        return Answer::text(404, format!("Resource not found: {path}."));
    }
    let Some((name, value)) = req.header(&TTL_HEADERS) else {
        return Answer::text(
            400,
            "Token time to live not given. Use the X-metadata-token-ttl-seconds or X-aws-ec2-metadata-token-ttl-seconds header to give the token's lifetime.",
        );
    };
    let Ok(ttl) = value.parse::<u32>() else {
        return Answer::text(400, format!("Invalid value of header {name}: {value:?}."));
    };
    match mmds.new_token(ttl, now) {
        Ok(token) => {
            counters.tokens += 1;
            Answer {
                extra: Some((name, ttl.to_string())),
                ..Answer::text(200, token)
            }
        }
        Err(e) => Answer::text(400, format!("{e}.")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mmds(version: MmdsVersion) -> Mmds {
        let mut m = Mmds::default();
        m.put(json!({"latest": {"meta-data": {"ami-id": "ami-1", "n": 3}}}))
            .unwrap();
        m.configure(version, false);
        m
    }

    fn call(m: &mut Mmds, raw: &str) -> (String, bool) {
        let mut c = HttpCounters::default();
        match serve(raw.as_bytes(), m, Instant::now(), &mut c) {
            Served::Answered {
                response,
                close,
                consumed,
            } => {
                assert!(consumed <= raw.len());
                (String::from_utf8(response).unwrap(), close)
            }
            Served::Incomplete => panic!("incomplete: {raw:?}"),
        }
    }

    fn body(resp: &str) -> &str {
        resp.split_once("\r\n\r\n").unwrap().1
    }

    #[test]
    fn v1_get_formats() {
        let mut m = mmds(MmdsVersion::V1);
        let (r, close) = call(&mut m, "GET /latest/meta-data HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Type: text/plain\r\n"));
        assert_eq!(body(&r), "ami-id\nn");
        assert!(!close);
        let (r, _) = call(
            &mut m,
            "GET /latest/meta-data/ami-id HTTP/1.1\r\nAccept: application/json\r\n\r\n",
        );
        assert!(r.contains("Content-Type: application/json\r\n"));
        assert_eq!(body(&r), "\"ami-1\"");
        let (r, _) = call(&mut m, "GET /latest/meta-data/n HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 501 "), "{r}");
        let (r, _) = call(&mut m, "GET /nothing HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 404 "));
        assert_eq!(body(&r), "Resource not found: /nothing.");
        let (r, close) = call(&mut m, "GET / HTTP/1.0\r\n\r\n");
        assert!(r.starts_with("HTTP/1.0 200 ") && close);
        let (_, close) = call(&mut m, "GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(close);
    }

    #[test]
    fn methods_and_bad_requests() {
        let mut m = mmds(MmdsVersion::V1);
        let (r, _) = call(&mut m, "POST / HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 405 ") && r.contains("Allow: GET, PUT\r\n"),
            "{r}"
        );
        let (r, close) = call(&mut m, "GARBAGE\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 400 ") && close, "{r}");
        let (r, _) = call(&mut m, "GET * HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        let (r, _) = call(&mut m, "PUT /latest/meta-data HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 404 "), "{r}");
        let mut c = HttpCounters::default();
        assert_eq!(
            serve(b"GET / HTTP/1.1\r\nHost:", &mut m, Instant::now(), &mut c),
            Served::Incomplete
        );
        let huge = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_REQUEST_BYTES));
        assert!(matches!(
            serve(huge.as_bytes(), &mut m, Instant::now(), &mut c),
            Served::Answered { close: true, .. }
        ));
        let (r, _) = call(&mut m, "GET http://169.254.169.254/latest?x=1 HTTP/1.1\r\n\r\n");
        assert_eq!(body(&r), "meta-data/");
    }

    #[test]
    fn v2_sessions() {
        let mut m = mmds(MmdsVersion::V2);
        let (r, _) = call(&mut m, "GET /latest HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 401 "), "{r}");
        let (r, _) = call(&mut m, "GET /latest HTTP/1.1\r\nX-metadata-token: nope\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 401 "), "{r}");
        let (r, _) = call(&mut m, "PUT /latest/api/token HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        let (r, _) = call(
            &mut m,
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 0\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        let (r, _) = call(
            &mut m,
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: x\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        let (r, _) = call(
            &mut m,
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: a\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        let (r, _) = call(
            &mut m,
            "PUT /latest/api/token HTTP/1.1\r\nx-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 2\r\n\r\nab",
        );
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        assert!(r.contains("X-aws-ec2-metadata-token-ttl-seconds: 60\r\n"), "{r}");
        let token = body(&r).to_string();
        let (r, _) = call(
            &mut m,
            &format!("GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n"),
        );
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        assert_eq!(body(&r), "ami-1");
    }

    #[test]
    fn v1_serves_without_a_token_and_counts() {
        let mut m = mmds(MmdsVersion::V1);
        let mut c = HttpCounters::default();
        let now = Instant::now();
        let _ = serve(b"GET / HTTP/1.1\r\n\r\n", &mut m, now, &mut c);
        let _ = serve(
            b"GET / HTTP/1.1\r\nX-metadata-token: bad\r\n\r\n",
            &mut m,
            now,
            &mut c,
        );
        assert_eq!((c.no_token, c.invalid_token, c.requests), (1, 1, 2));
    }
}
