//! flatlet's log: one line per record, stamped with the seconds since
//! flatlet started (so boot timings can be read off it), on stderr until
//! `PUT /logger` sends it to a file. Guest console output has stdout to
//! itself.
//!
//! Nothing that logs may wait for the log: the VMM and vCPU threads log
//! too. Every sink (log and metrics files, stderr, and the console's
//! stdout) is written without blocking ([`Sink`], [`nonblocking_stdio`]):
//! a line the sink cannot take now (a FIFO or pipe nobody reads) is
//! dropped and counted (`logger.missed_log_count` in the metrics), never
//! waited for. Lines a guest can cause (from the device models, the vCPU
//! exits and virtio-queue) are also rate-limited per call site, so that a
//! guest cannot flood the log (`logger.rate_limited_log_count`).

use std::collections::HashMap;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use flatlet_devices::ratelimit::{BURST, REFILL, TokenBucket};
use log::{LevelFilter, Log, Metadata as LogMetadata, Record};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Firecracker's log levels. Read in any case (`debug`, `DEBUG`), and
/// `Warn` for `Warning`, as Firecracker reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String")]
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

/// A level name that is none of Firecracker's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid log level {0:?}: expected one of Error, Warning, Info, Debug, Trace, Off (any case)")]
pub struct LevelError(String);

impl std::str::FromStr for Level {
    type Err = LevelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "off" => Level::Off,
            "error" => Level::Error,
            "warning" | "warn" => Level::Warning,
            "info" => Level::Info,
            "debug" => Level::Debug,
            "trace" => Level::Trace,
            _ => return Err(LevelError(s.to_string())),
        })
    }
}

impl TryFrom<String> for Level {
    type Error = LevelError;

    fn try_from(s: String) -> Result<Self, LevelError> {
        s.parse()
    }
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

/// How a record fared in a [`Sink`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// All of it was written.
    Whole,
    /// The sink was full: the record was dropped (or cut short).
    Dropped,
}

/// A place records (log lines, metrics lines) go to, written without ever
/// blocking: what the sink cannot take now is dropped.
///
/// Records are whole lines. A write to a pipe or FIFO of at most
/// `PIPE_BUF` (4 KiB) bytes is all or nothing; a longer record may be cut
/// short, and then the next record starts with a newline, so that one
/// truncated line never swallows the next.
pub struct Sink {
    file: File,
    torn: bool,
}

/// Why a FIFO without a reader is refused.
const NO_READER: &str = "it is a FIFO that no process has open for reading; \
    flatlet does not wait for a reader (open the FIFO's reading end first)";

impl Sink {
    /// A sink over `file`, which must already be non-blocking (or a
    /// regular file).
    pub fn new(file: File) -> Self {
        Self { file, torn: false }
    }

    /// Opens `path` (`what` names it in errors) for appending, creating a
    /// regular file if nothing is there. Regular files, FIFOs and
    /// character devices (`/dev/null`, a terminal) are sinks; directories,
    /// sockets and block devices are refused. A FIFO is opened without
    /// waiting for a reader: if it has none, that is an error.
    pub fn open(path: &str, what: &'static str) -> Result<Self, ConfigError> {
        let fail = |reason: String| ConfigError::Unreadable {
            what,
            path: path.to_string(),
            reason,
        };
        let fifo = match std::fs::metadata(path) {
            Ok(m) => {
                check_sink_kind(&m).map_err(|r| fail(r.into()))?;
                m.file_type().is_fifo()
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(fail(e.to_string())),
        };
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(code) if fifo && code == Errno::ENXIO as i32 => fail(NO_READER.into()),
                _ => fail(e.to_string()),
            })?;
        // What was opened, not what was there a moment before.
        let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
        check_sink_kind(&meta).map_err(|r| fail(r.into()))?;
        Ok(Self::new(file))
    }

    /// Writes `record` whole, or drops it if the sink is full. An error
    /// other than a full sink is returned (the record is lost).
    pub fn write_record(&mut self, record: &[u8]) -> io::Result<Written> {
        if self.torn {
            match self.file.write(b"\n") {
                Ok(1) => self.torn = false,
                Ok(_) => return Ok(Written::Dropped),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Written::Dropped),
                Err(e) => return Err(e),
            }
        }
        let mut done = 0;
        while done < record.len() {
            match self.file.write(&record[done..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.torn = done > 0;
                    if e.kind() == io::ErrorKind::WouldBlock {
                        return Ok(Written::Dropped);
                    }
                    return Err(e);
                }
            }
        }
        Ok(Written::Whole)
    }
}

/// Whether a file of this kind may be a sink.
fn check_sink_kind(m: &Metadata) -> Result<(), &'static str> {
    let t = m.file_type();
    if t.is_file() || t.is_fifo() || t.is_char_device() {
        Ok(())
    } else if t.is_dir() {
        Err("it is a directory")
    } else if t.is_socket() {
        Err("it is a socket (a FIFO or a file can be a sink)")
    } else if t.is_block_device() {
        Err("it is a block device")
    } else {
        Err("it is not a regular file, FIFO or character device")
    }
}

/// A handle on `fd` (stdout or stderr) whose writes never block, made
/// without changing the open file description flatlet shares with other
/// processes wherever that can be helped:
///
/// - a regular file or block device: a duplicate (writing to it waits for
///   no one);
/// - a pipe, FIFO, terminal or other character device: opened again
///   through `/proc/self/fd`, which makes a new open file description, and
///   only that one is non-blocking (setting `O_NONBLOCK` on the shared
///   one would change it for a shell or a pipeline sharing it too);
/// - where that fails (a socket, or no `/proc`, as in the jailer's chroot):
///   a terminal stays blocking (it only stalls when a person stops it,
///   Ctrl-S), anything else is made non-blocking, shared description and
///   all: flatlet must not hang on a pipe nobody reads.
pub fn nonblocking_stdio(fd: BorrowedFd<'_>) -> io::Result<File> {
    let dup = File::from(fd.try_clone_to_owned()?);
    let kind = dup.metadata()?.file_type();
    if kind.is_file() || kind.is_block_device() {
        return Ok(dup);
    }
    let own = OpenOptions::new()
        .write(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    if let Ok(f) = own {
        return Ok(f);
    }
    if dup.is_terminal() {
        return Ok(dup);
    }
    let flags = OFlag::from_bits_truncate(fcntl(&dup, FcntlArg::F_GETFL)?);
    fcntl(&dup, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(dup)
}

/// Targets whose lines a guest can cause, rate-limited per call site
/// (besides the limits the device models keep themselves).
const GUEST_FACING: &[&str] = &["virtio_queue", "flatlet_devices", "flatlet_vmm::vcpu"];
/// Lines already rate-limited where they are made.
const LIMITED_AT_SOURCE: &str = "flatlet_devices::ratelimit";

/// A call site's rate limit.
struct Site {
    bucket: TokenBucket,
    suppressed: u64,
}

struct Settings {
    /// The `PUT /logger` file, if any.
    out: Option<Sink>,
    /// stderr, non-blocking (None if it cannot be had).
    stderr: Option<Sink>,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
    sites: HashMap<(String, u32), Site>,
}

struct Logger {
    start: Instant,
    settings: Mutex<Settings>,
    missed: AtomicU64,
    rate_limited: AtomicU64,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

fn logger() -> &'static Logger {
    LOGGER.get_or_init(|| {
        let stderr = nonblocking_stdio(io::stderr().as_fd()).ok().map(Sink::new);
        Logger::new(stderr)
    })
}

/// The logger's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogCounters {
    /// Lines dropped because the sink was full or failed.
    pub missed: u64,
    /// Guest-caused lines held back by the rate limit.
    pub rate_limited: u64,
}

/// The counters of flatlet's logger.
pub fn counters() -> LogCounters {
    LOGGER.get().map(Logger::counters).unwrap_or_default()
}

impl Logger {
    fn new(stderr: Option<Sink>) -> Self {
        Logger {
            start: Instant::now(),
            settings: Mutex::new(Settings {
                out: None,
                stderr,
                show_level: true,
                show_origin: false,
                module: None,
                sites: HashMap::new(),
            }),
            missed: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
        }
    }

    fn counters(&self) -> LogCounters {
        LogCounters {
            missed: self.missed.load(Ordering::Relaxed),
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
        }
    }

    fn settings(&self) -> std::sync::MutexGuard<'_, Settings> {
        self.settings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a guest-facing record may go out now; returns how many
    /// lines of its call site were held back before it.
    fn admit(&self, s: &mut Settings, record: &Record<'_>) -> Option<u64> {
        let target = record.target();
        if !GUEST_FACING.iter().any(|t| target.starts_with(t)) || target.starts_with(LIMITED_AT_SOURCE) {
            return Some(0);
        }
        let key = (target.to_string(), record.line().unwrap_or(0));
        let site = s.sites.entry(key).or_insert_with(|| Site {
            bucket: TokenBucket::new(BURST, REFILL),
            suppressed: 0,
        });
        if site.bucket.take(Instant::now()) {
            Some(std::mem::take(&mut site.suppressed))
        } else {
            site.suppressed += 1;
            self.rate_limited.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// The line of a record.
    fn format(&self, s: &Settings, record: &Record<'_>, suppressed: u64) -> String {
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
        if suppressed > 0 {
            line.push_str(&format!("] ({suppressed} similar lines suppressed)"));
            line.push_str(&format!(" {}\n", record.args()));
        } else {
            line.push_str(&format!("] {}\n", record.args()));
        }
        line
    }

    /// Writes a line to the log file, or stderr; counts it if dropped.
    fn emit(&self, s: &mut Settings, line: &str) {
        let sink = match (&mut s.out, &mut s.stderr) {
            (Some(f), _) => f,
            (None, Some(e)) => e,
            (None, None) => {
                self.missed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        match sink.write_record(line.as_bytes()) {
            Ok(Written::Whole) => {}
            Ok(Written::Dropped) => {
                self.missed.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.missed.fetch_add(1, Ordering::Relaxed);
                // A log file that fails (a full disk, a FIFO whose
                // reader went away) must not stop the VMM: go back to
                // stderr.
                s.out = None;
            }
        }
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &LogMetadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut s = self.settings();
        if let Some(m) = &s.module {
            if !record.module_path().unwrap_or("").starts_with(m.as_str()) {
                return;
            }
        }
        let Some(suppressed) = self.admit(&mut s, record) else {
            return;
        };
        let line = self.format(&s, record, suppressed);
        // One write per line, so lines from different threads do not mix.
        self.emit(&mut s, &line);
    }

    fn flush(&self) {}
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
        Some(path) => Some(Sink::open(path, "log file")?),
        None => None,
    };
    let mut s = logger().settings();
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
pub(crate) mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    #[test]
    fn firecracker_logger_body() {
        let c: LoggerConfig =
            serde_json::from_str(r#"{"log_path": "/tmp/x.log", "level": "Warning", "show_level": false}"#)
                .unwrap();
        assert_eq!(c.level, Some(Level::Warning));
        assert_eq!(LevelFilter::from(Level::Warning), LevelFilter::Warn);
        assert!(serde_json::from_str::<LoggerConfig>(r#"{"level": "Loud"}"#).is_err());
        for (text, level) in [
            ("debug", Level::Debug),
            ("TRACE", Level::Trace),
            ("wArN", Level::Warning),
            ("off", Level::Off),
        ] {
            let c: LoggerConfig = serde_json::from_str(&format!(r#"{{"level": "{text}"}}"#)).unwrap();
            assert_eq!(c.level, Some(level), "{text}");
        }
        assert_eq!(serde_json::to_string(&Level::Warning).unwrap(), r#""Warning""#);
        assert!(serde_json::from_str::<LoggerConfig>(r#"{"colour": true}"#).is_err());
    }

    fn config(path: &str) -> LoggerConfig {
        LoggerConfig {
            log_path: Some(path.into()),
            level: None,
            show_level: None,
            show_log_origin: None,
            module: None,
        }
    }

    #[test]
    fn unwritable_log_path_is_an_error() {
        assert!(configure(&config("/nonexistent/dir/x.log")).is_err());
    }

    /// A fresh directory, removed when dropped.
    pub(crate) struct Dir(pub PathBuf);

    impl Dir {
        pub(crate) fn new(tag: &str) -> Self {
            let n = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let p = std::env::temp_dir().join(format!("flatlet-{tag}-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }

        pub(crate) fn fifo(&self, name: &str) -> String {
            let p = self.0.join(name);
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).unwrap();
            p.display().to_string()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Opens the reading end of a FIFO (without waiting for a writer), and
    /// never reads it.
    pub(crate) fn idle_reader(path: &str) -> File {
        OpenOptions::new()
            .read(true)
            .custom_flags(OFlag::O_NONBLOCK.bits())
            .open(path)
            .unwrap()
    }

    /// Runs `f` on a thread; fails if it takes more than `limit` (where
    /// the code before the fix blocked forever).
    pub(crate) fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(limit)
            .unwrap_or_else(|_| panic!("blocked for more than {limit:?}"))
    }

    #[test]
    fn a_fifo_without_a_reader_is_refused_at_once() {
        let dir = Dir::new("log-noreader");
        let fifo = dir.fifo("log.fifo");
        let f = fifo.clone();
        let err =
            within(Duration::from_secs(5), move || configure(&config(&f))).expect_err("no reader: refused");
        assert!(
            err.to_string().contains("no process has open for reading"),
            "{err}"
        );
        let f = fifo.clone();
        assert!(within(Duration::from_secs(5), move || Sink::open(&f, "x").is_err()));
    }

    #[test]
    fn only_files_fifos_and_character_devices_are_sinks() {
        let dir = Dir::new("log-kinds");
        let d = dir.0.display().to_string();
        let err = Sink::open(&d, "log file").err().unwrap();
        assert!(err.to_string().contains("directory"), "{err}");
        let sock = dir.0.join("s.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let err = Sink::open(&sock.display().to_string(), "log file").err().unwrap();
        assert!(err.to_string().contains("socket"), "{err}");
        assert!(Sink::open("/dev/null", "log file").is_ok());
        let file = dir.0.join("new.log").display().to_string();
        let mut sink = Sink::open(&file, "log file").unwrap();
        assert_eq!(sink.write_record(b"one\n").unwrap(), Written::Whole);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "one\n");
    }

    /// A logger of its own (not the process's), writing to `sink`.
    fn local_logger(sink: Sink) -> Logger {
        // Records above the process's level are not logged at all.
        log::set_max_level(LevelFilter::Trace);
        let l = Logger::new(None);
        l.settings().out = Some(sink);
        l
    }

    fn log_line(l: &Logger, target: &str, line: u32, msg: &str) {
        l.log(
            &Record::builder()
                .level(log::Level::Error)
                .target(target)
                .line(Some(line))
                .args(format_args!("{msg}"))
                .build(),
        );
    }

    #[test]
    fn a_full_fifo_drops_lines_and_counts_them_instead_of_blocking() {
        let dir = Dir::new("log-full");
        let fifo = dir.fifo("log.fifo");
        let reader = idle_reader(&fifo);
        let sink = Sink::open(&fifo, "log file").unwrap();
        let (missed, lines) = within(Duration::from_secs(10), move || {
            let l = local_logger(sink);
            let text = "x".repeat(100);
            // 2 MB: far more than a pipe holds.
            for i in 0..20_000 {
                log_line(&l, "flatlet_vmm::test", i, &text);
            }
            (l.counters().missed, 20_000)
        });
        assert!(missed > 0 && missed < lines, "{missed} of {lines} dropped");
        // What the FIFO holds is whole lines.
        let mut r = reader;
        let mut buf = Vec::new();
        let _ = io::Read::read_to_end(&mut r, &mut buf);
        let text = String::from_utf8(buf).unwrap();
        assert!(text.ends_with('\n'));
        assert_eq!(text.lines().count() as u64, lines - missed);
        assert!(text.lines().all(|l| l.ends_with(&"x".repeat(100))));
    }

    #[test]
    fn a_record_cut_short_does_not_swallow_the_next() {
        let dir = Dir::new("log-torn");
        let fifo = dir.fifo("log.fifo");
        let mut reader = idle_reader(&fifo);
        let mut sink = Sink::open(&fifo, "metrics file").unwrap();
        // Longer than the pipe: written in part, then the pipe is full.
        let big = format!("{}\n", "y".repeat(200_000));
        assert_eq!(sink.write_record(big.as_bytes()).unwrap(), Written::Dropped);
        assert_eq!(sink.write_record(b"next\n").unwrap(), Written::Dropped);
        let mut buf = vec![0u8; 1 << 20];
        let n = io::Read::read(&mut reader, &mut buf).unwrap();
        assert!(n > 0 && buf[..n].iter().all(|b| *b == b'y'));
        assert_eq!(sink.write_record(b"next\n").unwrap(), Written::Whole);
        let n = io::Read::read(&mut reader, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"\nnext\n", "the cut line is ended first");
    }

    #[test]
    fn guest_facing_lines_are_rate_limited_per_call_site() {
        let dir = Dir::new("log-flood");
        let file = dir.0.join("flood.log").display().to_string();
        let l = local_logger(Sink::open(&file, "log file").unwrap());
        const N: u64 = 1000;
        for _ in 0..N {
            log_line(&l, "virtio_queue::queue", 573, "Iterator error");
            log_line(&l, "flatlet_vmm::vcpu", 55, "in from unassigned port");
        }
        log_line(&l, "flatlet_vmm::controller", 1, "host line");
        let text = std::fs::read_to_string(&file).unwrap();
        let count = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
        assert_eq!(count("Iterator error"), BURST as usize, "{text}");
        assert_eq!(count("unassigned port"), BURST as usize);
        assert_eq!(count("host line"), 1);
        assert_eq!(l.counters().rate_limited, 2 * (N - u64::from(BURST)));
        assert_eq!(l.counters().missed, 0);
        assert!(Path::new(&file).exists());
    }
}
