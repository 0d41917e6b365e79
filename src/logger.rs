//! flatlet's log: one line per record on stderr, stamped with the seconds
//! since flatlet started, so boot timings can be read off it. Guest
//! console output has stdout to itself.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Instant;

use log::{LevelFilter, Log, Metadata, Record};

struct Logger {
    start: Instant,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let t = self.start.elapsed();
        let line = format!(
            "[{:>5}.{:06} {:<5}] {}\n",
            t.as_secs(),
            t.subsec_micros(),
            record.level(),
            record.args()
        );
        // One write per line, so lines from different threads do not mix.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// Installs the logger at `level`.
pub fn init(level: LevelFilter) {
    let logger = LOGGER.get_or_init(|| Logger {
        start: Instant::now(),
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
