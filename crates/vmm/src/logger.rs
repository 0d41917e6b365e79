//! flatlet's log: one line per record, stamped with the seconds since
//! flatlet started (so boot timings can be read off it), on stderr until
//! `PUT /logger` sends it to a file. Guest console output has stdout to
//! itself.

use std::fs::File;
use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use log::{LevelFilter, Log, Metadata, Record};
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Firecracker's log levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Level {
    /// Nothing.
    Off,
    /// Errors.
    Error,
    /// Warnings and errors.
    Warning,
    /// Informational messages (the default).
    Info,
    /// Debugging detail.
    Debug,
    /// Everything.
    Trace,
}

impl From<Level> for LevelFilter {
    fn from(l: Level) -> Self {
        match l {
            Level::Off => LevelFilter::Off,
            Level::Error => LevelFilter::Error,
            Level::Warning => LevelFilter::Warn,
            Level::Info => LevelFilter::Info,
            Level::Debug => LevelFilter::Debug,
            Level::Trace => LevelFilter::Trace,
        }
    }
}

/// `PUT /logger`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// A file (or FIFO) to append the log to; stderr when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// The level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<Level>,
    /// Whether lines show their level (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Whether lines show the module and line they come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log from modules whose path starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

struct Settings {
    out: Option<File>,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
}

struct Logger {
    start: Instant,
    settings: Mutex<Settings>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

fn logger() -> &'static Logger {
    LOGGER.get_or_init(|| Logger {
        start: Instant::now(),
        settings: Mutex::new(Settings {
            out: None,
            show_level: true,
            show_origin: false,
            module: None,
        }),
    })
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut s = self
            .settings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(m) = &s.module {
            if !record.module_path().unwrap_or("").starts_with(m.as_str()) {
                return;
            }
        }
        let t = self.start.elapsed();
        let mut line = format!("[{:>5}.{:06}", t.as_secs(), t.subsec_micros());
        if s.show_level {
            line.push_str(&format!(" {:<5}", record.level()));
        }
        if s.show_origin {
            line.push_str(&format!(
                " {}:{}",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            ));
        }
        line.push_str(&format!("] {}\n", record.args()));
        // One write per line, so lines from different threads do not mix.
        let written = match &mut s.out {
            Some(f) => f.write_all(line.as_bytes()),
            None => std::io::stderr().lock().write_all(line.as_bytes()),
        };
        if written.is_err() {
            // A log sink that fails (a full disk, a FIFO nobody reads) must
            // not stop the VMM: go back to stderr.
            s.out = None;
        }
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// Installs the logger at `level`, writing to stderr.
pub fn init(level: LevelFilter) {
    if log::set_logger(logger()).is_ok() {
        log::set_max_level(level);
    }
}

/// Applies `PUT /logger`.
pub fn configure(c: &LoggerConfig) -> Result<(), ConfigError> {
    let out = match &c.log_path {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .map_err(|e| ConfigError::Unreadable {
                    what: "log file",
                    path: path.clone(),
                    reason: e.to_string(),
                })?,
        ),
        None => None,
    };
    let mut s = logger()
        .settings
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if c.log_path.is_some() {
        s.out = out;
    }
    if let Some(v) = c.show_level {
        s.show_level = v;
    }
    if let Some(v) = c.show_log_origin {
        s.show_origin = v;
    }
    if c.module.is_some() {
        s.module = c.module.clone().filter(|m| !m.is_empty());
    }
    if let Some(level) = c.level {
        log::set_max_level(level.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_logger_body() {
        let c: LoggerConfig =
            serde_json::from_str(r#"{"log_path": "/tmp/x.log", "level": "Warning", "show_level": false}"#)
                .unwrap();
        assert_eq!(c.level, Some(Level::Warning));
        assert_eq!(LevelFilter::from(Level::Warning), LevelFilter::Warn);
        assert!(serde_json::from_str::<LoggerConfig>(r#"{"level": "Loud"}"#).is_err());
        assert!(serde_json::from_str::<LoggerConfig>(r#"{"colour": true}"#).is_err());
    }

    #[test]
    fn unwritable_log_path_is_an_error() {
        let c = LoggerConfig {
            log_path: Some("/nonexistent/dir/x.log".into()),
            level: None,
            show_level: None,
            show_log_origin: None,
            module: None,
        };
        assert!(configure(&c).is_err());
    }
}
