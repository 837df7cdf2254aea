//! Logging: `tracing` events, pretty on a terminal, JSON lines otherwise (or
//! when asked). Filtered by `BEXT_LOG` (or `RUST_LOG`), default `info`.
//!
//! Lines are written by a background thread in batches: a request thread
//! only formats its line and appends it to a shared buffer; the writer thread
//! flushes every [`FLUSH_INTERVAL`], or at once when the buffer passes
//! [`FLUSH_BYTES`] or a warning or error is logged. Not `tracing-appender`:
//! its non-blocking writer wakes its thread for every line, which costs a
//! futex wake and scheduler round-trips per request (measured: six system
//! calls and a quarter of the static-file throughput on this machine).

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::cli::LogFormat;

/// Longest a log line waits in the buffer.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Buffered bytes that trigger a flush at once.
pub const FLUSH_BYTES: usize = 64 * 1024;
/// Most bytes held while stderr does not take them (a stopped journal, a
/// full pipe); lines beyond are dropped and counted
/// (`bext_log_lines_dropped_total`), never blocking a request.
pub const MAX_BUFFERED_BYTES: usize = 16 << 20;

/// Installs the global subscriber. Keep the guard until exit: dropping it
/// flushes the log.
pub fn init(format: LogFormat) -> LogGuard {
    let filter = std::env::var("BEXT_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (sink, guard) = LogSink::start();
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let raw_sink = sink.clone();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(sink);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
    // The filter is fixed from here on: whether access lines pass it is
    // decided once, not asked of the subscriber on every request.
    let access = tracing::enabled!(target: "bext::access", Level::INFO);
    let _ = RAW.set(Raw {
        sink: raw_sink,
        json,
        access,
    });
    guard
}

/// The sink and format, for lines formatted outside `tracing` (the access
/// log, which is written once per request and formats itself for speed).
static RAW: OnceLock<Raw> = OnceLock::new();

#[derive(Debug)]
struct Raw {
    sink: LogSink,
    json: bool,
    /// `bext::access` lines pass the filter.
    access: bool,
}

/// How access lines are written: `None` before [`init`] (they go through
/// `tracing`), else whether they are logged at all and as JSON.
pub fn access_format() -> Option<AccessFormat> {
    RAW.get().map(|raw| match (raw.access, raw.json) {
        (false, _) => AccessFormat::Off,
        (true, true) => AccessFormat::Json,
        (true, false) => AccessFormat::Text,
    })
}

/// See [`access_format`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessFormat {
    Off,
    Json,
    Text,
}

/// The log is pretty text (a person reads it), not JSON.
pub fn is_pretty() -> bool {
    RAW.get().is_some_and(|raw| !raw.json)
}

/// Log lines dropped so far because stderr did not keep up.
pub fn dropped_lines() -> u64 {
    RAW.get().map_or(0, |raw| {
        raw.sink
            .0
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    })
}

/// Appends one already formatted line (with its newline) to the log.
pub fn write_line(line: &[u8]) {
    if let Some(raw) = RAW.get() {
        let _ = raw.sink.make_writer().write(line);
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    dropped: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    buf: Vec<u8>,
    /// The writer thread has been woken for the current batch.
    signalled: bool,
    closing: bool,
}

/// Where formatted lines go: the shared buffer.
#[derive(Debug, Clone)]
struct LogSink(Arc<Shared>);

impl LogSink {
    fn start() -> (Self, LogGuard) {
        let shared = Arc::new(Shared::default());
        let writer = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("bext-log".into())
                .spawn(move || write_loop(&shared))
                .expect("spawn the log writer thread")
        };
        (
            LogSink(Arc::clone(&shared)),
            LogGuard {
                shared,
                writer: Some(writer),
            },
        )
    }
}

fn write_loop(shared: &Shared) {
    let mut out = Vec::with_capacity(FLUSH_BYTES);
    let mut stderr = std::io::stderr();
    loop {
        let closing = {
            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            if !state.signalled && !state.closing {
                state = shared
                    .wake
                    .wait_timeout(state, FLUSH_INTERVAL)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            std::mem::swap(&mut out, &mut state.buf);
            state.signalled = false;
            state.closing
        };
        if !out.is_empty() {
            // Nowhere to report a failed log write: drop the batch.
            let _ = stderr.write_all(&out);
            out.clear();
        }
        if closing {
            return;
        }
    }
}

/// Appends one formatted event to the buffer.
#[derive(Debug)]
struct LineWriter<'a> {
    shared: &'a Shared,
    urgent: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.buf.len() + bytes.len() > MAX_BUFFERED_BYTES {
            drop(state);
            self.shared
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(bytes.len());
        }
        state.buf.extend_from_slice(bytes);
        // Wake the writer once per batch, and only when it is worth it.
        let wake = !state.signalled && (self.urgent || state.buf.len() >= FLUSH_BYTES);
        state.signalled |= wake;
        drop(state);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogSink {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            shared: &self.0,
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        LineWriter {
            shared: &self.0,
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

/// Flushes what is buffered and stops the writer thread when dropped.
#[derive(Debug)]
pub struct LogGuard {
    shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        {
            let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            state.closing = true;
            state.signalled = true;
        }
        self.shared.wake.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 11, fault 8: with nothing draining the buffer (stderr
    /// blocked), it stops growing at its bound and counts what it drops.
    #[test]
    fn the_buffer_is_bounded_when_stderr_blocks() {
        let shared = Shared::default();
        let line = vec![b'x'; 1000];
        for _ in 0..(MAX_BUFFERED_BYTES / 1000 + 500) {
            let mut writer = LineWriter {
                shared: &shared,
                urgent: false,
            };
            assert_eq!(writer.write(&line).expect("write"), 1000);
        }
        let held = shared.state.lock().expect("lock").buf.len();
        assert!(held <= MAX_BUFFERED_BYTES, "{held} bytes held");
        assert!(
            shared.dropped.load(std::sync::atomic::Ordering::Relaxed) >= 500,
            "drops are counted"
        );
    }
}
