//! The data store: one JSON document per microVM, bounded in size, with
//! the settings the guest side follows (version, IMDS compatibility) and
//! the V2 session tokens.
//!
//! The host (API, `--metadata`) replaces it with `put` or changes it with
//! `patch` (JSON merge patch, RFC 7396); the guest reads it through
//! [`crate::stack::MmdsStack`]. It is shared between the VMM thread's net
//! devices and the controller behind an `Arc<Mutex<_>>`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Firecracker's default size limit of the data store, in bytes of
/// serialized JSON (also its default API payload limit).
pub const DEFAULT_SIZE_LIMIT: usize = 51200;
/// Shortest token lifetime a guest may ask for, in seconds.
pub const MIN_TOKEN_TTL_SECS: u32 = 1;
/// Longest token lifetime a guest may ask for, in seconds (6 hours).
pub const MAX_TOKEN_TTL_SECS: u32 = 21600;
/// Live tokens kept at most: past that, the oldest is forgotten. A guest
/// asking for tokens in a loop costs bounded memory and only invalidates
/// its own older tokens.
pub const MAX_TOKENS: usize = 1024;
/// Random bytes in a token (shown as twice as many hex digits).
const TOKEN_BYTES: usize = 24;

/// The guest-side protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    /// Plain `GET`s; tokens are optional (and only counted).
    #[default]
    V1,
    /// Sessions: every `GET` needs a token from `PUT /latest/api/token`.
    V2,
}

/// How a value is shown to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// The JSON text of the value.
    Json,
    /// EC2 IMDS text: an object lists its keys (objects with a `/`), a
    /// string is shown as is; other values cannot be shown.
    Imds,
}

/// Errors of the data store.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The new contents are larger than the limit.
    #[error("the MMDS data store would be {size} bytes, over its limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    /// `PATCH` before any `PUT`.
    #[error("the MMDS data store is not initialized (PUT /mmds first)")]
    NotInitialized,
    /// No value at the path.
    #[error("not found")]
    NotFound,
    /// The value cannot be shown in IMDS format.
    #[error("the value at this path cannot be shown in IMDS format (only objects and strings)")]
    UnsupportedValueType,
    /// A token lifetime out of range.
    #[error(
        "invalid token lifetime {0}: it must be between {MIN_TOKEN_TTL_SECS} and {MAX_TOKEN_TTL_SECS} seconds"
    )]
    TokenTtl(u32),
    /// The host gave no randomness.
    #[error("cannot make a token: {0}")]
    Random(String),
}

/// A V2 session token and when it expires.
#[derive(Debug)]
struct Token {
    value: [u8; TOKEN_BYTES],
    expires: Instant,
}

/// The data store.
#[derive(Debug)]
pub struct Mmds {
    data: Value,
    initialized: bool,
    limit: usize,
    version: MmdsVersion,
    imds_compat: bool,
    tokens: VecDeque<Token>,
}

impl Default for Mmds {
    fn default() -> Self {
        Self::new(DEFAULT_SIZE_LIMIT)
    }
}

impl Mmds {
    /// An empty store bounded to `limit` bytes of serialized JSON.
    pub fn new(limit: usize) -> Self {
        Self {
            data: Value::Null,
            initialized: false,
            limit,
            version: MmdsVersion::V1,
            imds_compat: false,
            tokens: VecDeque::new(),
        }
    }

    /// The size limit, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Changes the size limit (for contents put from now on).
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// The guest-side protocol.
    pub fn version(&self) -> MmdsVersion {
        self.version
    }

    /// Whether the guest always gets IMDS text, whatever it accepts.
    pub fn imds_compat(&self) -> bool {
        self.imds_compat
    }

    /// Sets the guest-side protocol and format.
    pub fn configure(&mut self, version: MmdsVersion, imds_compat: bool) {
        self.version = version;
        self.imds_compat = imds_compat;
    }

    fn check_size(&self, value: &Value) -> Result<(), StoreError> {
        // Serializing a `Value` cannot fail (its keys are strings).
        let size = serde_json::to_vec(value).map(|v| v.len()).unwrap_or(usize::MAX);
        if size > self.limit {
            return Err(StoreError::TooLarge {
                size,
                limit: self.limit,
            });
        }
        Ok(())
    }

    /// Replaces the contents (`PUT /mmds`, `--metadata`).
    pub fn put(&mut self, value: Value) -> Result<(), StoreError> {
        self.check_size(&value)?;
        self.data = value;
        self.initialized = true;
        Ok(())
    }

    /// Applies a JSON merge patch (`PATCH /mmds`); nothing changes if the
    /// result would be over the limit.
    pub fn patch(&mut self, patch: &Value) -> Result<(), StoreError> {
        if !self.initialized {
            return Err(StoreError::NotInitialized);
        }
        let mut data = self.data.clone();
        merge_patch(&mut data, patch);
        self.check_size(&data)?;
        self.data = data;
        Ok(())
    }

    /// The contents as the API shows them: `{}` before the first `PUT`.
    pub fn contents(&self) -> Value {
        match &self.data {
            Value::Null if !self.initialized => Value::Object(Map::new()),
            v => v.clone(),
        }
    }

    /// The value at `path` (a URI path: `/latest/meta-data/`), shown in
    /// `format` (IMDS text whatever the format when `imds_compat` is on).
    pub fn get(&self, path: &str, format: OutputFormat) -> Result<String, StoreError> {
        let pointer = json_pointer(path);
        let value = self.data.pointer(&pointer).ok_or(StoreError::NotFound)?;
        match (format, self.imds_compat) {
            (OutputFormat::Json, false) => Ok(value.to_string()),
            _ => imds_text(value),
        }
    }

    /// Makes a V2 session token valid for `ttl_secs` from `now`.
    pub fn new_token(&mut self, ttl_secs: u32, now: Instant) -> Result<String, StoreError> {
        if !(MIN_TOKEN_TTL_SECS..=MAX_TOKEN_TTL_SECS).contains(&ttl_secs) {
            return Err(StoreError::TokenTtl(ttl_secs));
        }
        let mut value = [0u8; TOKEN_BYTES];
        getrandom::fill(&mut value).map_err(|e| StoreError::Random(e.to_string()))?;
        self.tokens.retain(|t| t.expires > now);
        if self.tokens.len() >= MAX_TOKENS {
            self.tokens.pop_front();
        }
        self.tokens.push_back(Token {
            value,
            expires: now + Duration::from_secs(ttl_secs.into()),
        });
        Ok(hex(&value))
    }

    /// Whether `token` was made here and has not expired at `now`.
    pub fn is_valid_token(&self, token: &str, now: Instant) -> bool {
        let Some(value) = unhex(token) else {
            return false;
        };
        self.tokens.iter().any(|t| t.value == value && t.expires > now)
    }
}

/// RFC 7396: members of an object patch replace, recurse into, or (when
/// `null`) remove the target's; any other patch replaces the target.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(members) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(map) = target {
        for (key, value) in members {
            if value.is_null() {
                map.remove(key);
            } else {
                merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// A URI path as a JSON pointer: runs of `/` count as one, and a trailing
/// `/` is dropped (`/` itself is the whole document).
fn json_pointer(path: &str) -> String {
    let mut pointer = String::with_capacity(path.len());
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        pointer.push('/');
        pointer.push_str(segment);
    }
    pointer
}

/// EC2 IMDS text of a value.
fn imds_text(value: &Value) -> Result<String, StoreError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Object(map) => Ok(map
            .iter()
            .map(|(k, v)| if v.is_object() { format!("{k}/") } else { k.clone() })
            .collect::<Vec<_>>()
            .join("\n")),
        _ => Err(StoreError::UnsupportedValueType),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; TOKEN_BYTES]> {
    let text = text.as_bytes();
    if text.len() != TOKEN_BYTES * 2 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16);
    let mut out = [0u8; TOKEN_BYTES];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store() -> Mmds {
        let mut m = Mmds::default();
        m.put(json!({
            "latest": {"meta-data": {"ami-id": "ami-1", "reservation-id": "r-1", "net": {"a": "b"}}},
            "age": 43,
            "list": ["x", "y"],
        }))
        .unwrap();
        m
    }

    #[test]
    fn get_in_json_and_imds() {
        let m = store();
        assert_eq!(
            m.get("/latest/meta-data/ami-id", OutputFormat::Json).unwrap(),
            "\"ami-1\""
        );
        assert_eq!(
            m.get("/latest/meta-data/ami-id", OutputFormat::Imds).unwrap(),
            "ami-1"
        );
        assert_eq!(
            m.get("/latest/meta-data/", OutputFormat::Imds).unwrap(),
            "ami-id\nnet/\nreservation-id"
        );
        assert_eq!(m.get("//latest//", OutputFormat::Imds).unwrap(), "meta-data/");
        assert_eq!(m.get("/age", OutputFormat::Json).unwrap(), "43");
        assert_eq!(
            m.get("/age", OutputFormat::Imds),
            Err(StoreError::UnsupportedValueType)
        );
        assert_eq!(m.get("/list/1", OutputFormat::Imds).unwrap(), "y");
        assert_eq!(m.get("/nope", OutputFormat::Json), Err(StoreError::NotFound));
        assert!(m.get("/", OutputFormat::Json).unwrap().starts_with('{'));
    }

    #[test]
    fn imds_compat_always_gives_text() {
        let mut m = store();
        m.configure(MmdsVersion::V2, true);
        assert_eq!(
            m.get("/latest/meta-data/ami-id", OutputFormat::Json).unwrap(),
            "ami-1"
        );
        assert_eq!(
            m.get("/age", OutputFormat::Json),
            Err(StoreError::UnsupportedValueType)
        );
    }

    #[test]
    fn merge_patch_follows_rfc7396() {
        // The examples of RFC 7396, appendix A (a selection).
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "b"}), json!({"b": "c"}), json!({"a": "b", "b": "c"})),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "b"}), json!(["c"]), json!(["c"])),
            (json!({"e": null}), json!({"a": 1}), json!({"e": null, "a": 1})),
            (json!([1, 2]), json!({"a": "b", "c": null}), json!({"a": "b"})),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (target, patch, want) in cases {
            let mut t = target.clone();
            merge_patch(&mut t, &patch);
            assert_eq!(t, want, "{target} + {patch}");
        }
    }

    #[test]
    fn size_limit_and_initialization() {
        let mut m = Mmds::new(20);
        assert_eq!(m.contents(), json!({}));
        assert_eq!(m.patch(&json!({"a": "b"})), Err(StoreError::NotInitialized));
        m.put(json!({"a": "b"})).unwrap();
        assert_eq!(
            m.put(json!({"a": "0123456789abcdefghij"})),
            Err(StoreError::TooLarge { size: 28, limit: 20 })
        );
        assert!(matches!(
            m.patch(&json!({"c": "0123456789"})),
            Err(StoreError::TooLarge { .. })
        ));
        // A refused patch changes nothing.
        assert_eq!(m.contents(), json!({"a": "b"}));
        m.patch(&json!({"a": null, "c": "d"})).unwrap();
        assert_eq!(m.contents(), json!({"c": "d"}));
    }

    #[test]
    fn tokens_expire_and_are_bounded() {
        let mut m = Mmds::default();
        let t0 = Instant::now();
        assert_eq!(m.new_token(0, t0), Err(StoreError::TokenTtl(0)));
        assert_eq!(m.new_token(21601, t0), Err(StoreError::TokenTtl(21601)));
        let token = m.new_token(2, t0).unwrap();
        assert_eq!(token.len(), TOKEN_BYTES * 2);
        assert!(m.is_valid_token(&token, t0 + Duration::from_secs(1)));
        assert!(!m.is_valid_token(&token, t0 + Duration::from_secs(2)));
        assert!(!m.is_valid_token("00", t0));
        assert!(!m.is_valid_token(&"zz".repeat(TOKEN_BYTES), t0));
        let mut other = token.clone().into_bytes();
        other[0] = if other[0] == b'0' { b'1' } else { b'0' };
        assert!(!m.is_valid_token(&String::from_utf8(other).unwrap(), t0));
        // A flood of tokens keeps the newest MAX_TOKENS.
        let first = m.new_token(100, t0).unwrap();
        for _ in 0..MAX_TOKENS {
            m.new_token(100, t0).unwrap();
        }
        assert_eq!(m.tokens.len(), MAX_TOKENS);
        assert!(!m.is_valid_token(&first, t0));
    }
}
