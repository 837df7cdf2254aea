//! Logging: `tracing` events, pretty on a terminal, JSON lines otherwise (or
//! when asked). Filtered by `BEXT_LOG` (or `RUST_LOG`), default `info`.
//!
//! Lines are written by a background thread in batches: a request thread
//! appends its line to a shared buffer (an access line not even formatted:
//! its facts, which the writer thread formats, see [`write_access`]); the
//! writer thread flushes every [`FLUSH_INTERVAL`], or at once when the
//! buffer passes [`FLUSH_BYTES`] or a warning or error is logged. Not
//! `tracing-appender`:
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

/// Appends one access line to the log, as facts (`size` bytes) that
/// `encode` appends to the buffer (and does nothing else to it); the
/// writer thread formats them
/// ([`crate::access_log::format_entry`]). The request's thread formats
/// nothing: a line costs it a few copies.
pub fn write_access(size: usize, encode: impl FnOnce(&mut Vec<u8>)) {
    if let Some(raw) = RAW.get() {
        raw.sink.0.push(Kind::Access, false, size, encode);
    }
}

/// What an entry of the buffer holds. Each entry is its kind (one byte),
/// its length (four, native order), then that many bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    /// A formatted line.
    Text = 0,
    /// An access line to format ([`write_access`]).
    Access = 1,
}

/// Bytes before an entry's own.
const ENTRY_HEAD: usize = 5;

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    dropped: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// Appends an entry of `kind` whose `size` bytes `fill` appends, unless
    /// that would pass [`MAX_BUFFERED_BYTES`] (then nothing is appended,
    /// and the entry is counted as dropped), and wakes the writer once per
    /// batch (at once if `urgent`).
    fn push(&self, kind: Kind, urgent: bool, size: usize, fill: impl FnOnce(&mut Vec<u8>)) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let start = state.buf.len();
        if size.saturating_add(ENTRY_HEAD) > MAX_BUFFERED_BYTES.saturating_sub(start) {
            drop(state);
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        {
            // Until the entry is whole, a panic in `fill` takes it out again
            // (half an entry would unframe the rest of the buffer).
            let entry = Uncommitted {
                buf: &mut state.buf,
                start,
            };
            entry.buf.push(kind as u8);
            entry.buf.extend_from_slice(&[0; 4]);
            fill(entry.buf);
            let len = entry.buf.len() - start - ENTRY_HEAD;
            debug_assert_eq!(len, size, "an entry is the size it said");
            // (At most `MAX_BUFFERED_BYTES`, far below 4 GiB.)
            entry.buf[start + 1..start + ENTRY_HEAD].copy_from_slice(&(len as u32).to_ne_bytes());
            std::mem::forget(entry);
        }
        // Wake the writer once per batch, and only when it is worth it.
        let wake = !state.signalled && (urgent || state.buf.len() >= FLUSH_BYTES);
        state.signalled |= wake;
        drop(state);
        if wake {
            self.wake.notify_one();
        }
    }
}

/// An entry being appended to `buf` from `start`: dropped before it is
/// whole (forgotten then), it is taken out.
struct Uncommitted<'a> {
    buf: &'a mut Vec<u8>,
    start: usize,
}

impl Drop for Uncommitted<'_> {
    fn drop(&mut self) {
        self.buf.truncate(self.start);
    }
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
    let mut batch = Vec::with_capacity(FLUSH_BYTES);
    let mut out = Vec::with_capacity(2 * FLUSH_BYTES);
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
            std::mem::swap(&mut batch, &mut state.buf);
            state.signalled = false;
            state.closing
        };
        // Nowhere to report a failed log write: the lines are dropped.
        let unread = write_batch(&batch, &mut out, |lines| {
            let _ = stderr.write_all(lines);
        });
        shared
            .dropped
            .fetch_add(unread, std::sync::atomic::Ordering::Relaxed);
        batch.clear();
        // A burst's buffers do not stay.
        if batch.capacity() > 4 * FLUSH_BYTES {
            batch = Vec::with_capacity(FLUSH_BYTES);
        }
        if closing {
            return;
        }
    }
}

/// Writes the entries of `batch` as lines, through `out`, handing `write`
/// at most about [`FLUSH_BYTES`] at a time; returns how many entries it
/// could not read (none, unless something is wrong: counted as dropped).
fn write_batch(batch: &[u8], out: &mut Vec<u8>, mut write: impl FnMut(&[u8])) -> u64 {
    let mut unread = 0;
    let json = RAW.get().is_none_or(|raw| raw.json);
    let mut rest = batch;
    while let Some((head, tail)) = rest.split_at_checked(ENTRY_HEAD) {
        let len = u32::from_ne_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let Some((entry, tail)) = tail.split_at_checked(len) else {
            break;
        };
        rest = tail;
        if head[0] == Kind::Text as u8 {
            out.extend_from_slice(entry);
        } else if head[0] != Kind::Access as u8
            || !crate::access_log::format_entry(entry, out, json)
        {
            unread += 1;
        }
        if out.len() >= FLUSH_BYTES {
            write(out);
            out.clear();
        }
    }
    if !out.is_empty() {
        write(out);
        out.clear();
    }
    if out.capacity() > 4 * FLUSH_BYTES {
        *out = Vec::with_capacity(2 * FLUSH_BYTES);
    }
    unread + u64::from(!rest.is_empty())
}

/// Appends one formatted event to the buffer.
#[derive(Debug)]
struct LineWriter<'a> {
    shared: &'a Shared,
    urgent: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.shared
            .push(Kind::Text, self.urgent, bytes.len(), |buf| {
                buf.extend_from_slice(bytes);
            });
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
        // An access line too: dropped whole, never cut.
        let before = shared.dropped.load(std::sync::atomic::Ordering::Relaxed);
        shared.push(Kind::Access, false, line.len(), |buf| {
            buf.extend_from_slice(&line);
        });
        let after = shared.state.lock().expect("lock").buf.len();
        assert_eq!(after, held, "nothing of it kept");
        assert_eq!(
            shared.dropped.load(std::sync::atomic::Ordering::Relaxed),
            before + 1
        );
    }

    /// The writer thread's side: entries become lines in the order they
    /// were appended, access lines formatted there, and what it writes
    /// comes in pieces of about [`FLUSH_BYTES`].
    #[test]
    fn a_batch_is_written_in_order_with_access_lines_formatted() {
        let shared = Shared::default();
        let text = |shared: &Shared, line: &'static [u8]| {
            shared.push(Kind::Text, false, line.len(), |buf| {
                buf.extend_from_slice(line);
            });
        };
        text(&shared, b"first\n");
        let record = crate::access_log::tests::record("/a\"b");
        let access = |shared: &Shared| {
            let mut encoded = Vec::new();
            crate::access_log::tests::encode(&record, &mut encoded);
            shared.push(Kind::Access, false, encoded.len(), |buf| {
                buf.extend_from_slice(&encoded);
            });
        };
        access(&shared);
        text(&shared, b"last\n");
        let batch = std::mem::take(&mut shared.state.lock().expect("lock").buf);
        let mut written = Vec::new();
        let unread = write_batch(&batch, &mut Vec::new(), |lines| {
            written.extend_from_slice(lines);
        });
        assert_eq!(unread, 0);
        let written = String::from_utf8(written).expect("UTF-8");
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len(), 3, "{written}");
        assert_eq!(lines[0], "first");
        let line: serde_json::Value = serde_json::from_str(lines[1]).expect("JSON");
        assert_eq!(line["path"], "/a\"b");
        assert_eq!(line["target"], "bext::access");
        assert_eq!(lines[2], "last");

        // Many lines: handed over in pieces, none longer than a flush and
        // one line.
        for _ in 0..2000 {
            access(&shared);
        }
        let batch = std::mem::take(&mut shared.state.lock().expect("lock").buf);
        let mut pieces = Vec::new();
        write_batch(&batch, &mut Vec::new(), |lines| pieces.push(lines.to_vec()));
        assert!(pieces.len() > 1, "{} pieces", pieces.len());
        assert!(pieces.iter().all(|p| p.len() < FLUSH_BYTES + 1024));
        let all: Vec<u8> = pieces.concat();
        assert_eq!(all.iter().filter(|&&b| b == b'\n').count(), 2000);
        // An entry that is not one (not made by `encode`) is counted, and
        // the next is read.
        access(&shared);
        let batch = std::mem::take(&mut shared.state.lock().expect("lock").buf);
        let mut broken = vec![Kind::Access as u8, 3, 0, 0, 0, 1, 2, 3];
        broken[1..ENTRY_HEAD].copy_from_slice(&3u32.to_ne_bytes());
        broken.extend_from_slice(&batch);
        let mut lines = 0;
        let unread = write_batch(&broken, &mut Vec::new(), |out| {
            lines += out.iter().filter(|&&b| b == b'\n').count();
        });
        assert_eq!((unread, lines), (1, 1));
    }

    /// An entry whose filling panics leaves nothing of itself behind: the
    /// entries after it read as they were written.
    #[test]
    fn a_panic_while_appending_leaves_no_half_entry() {
        let shared = Shared::default();
        shared.push(Kind::Text, false, 2, |buf| buf.extend_from_slice(b"a\n"));
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            shared.push(Kind::Text, false, 4, |buf| {
                buf.extend_from_slice(b"xy");
                panic!("while appending");
            });
        }));
        assert!(failed.is_err());
        shared.push(Kind::Text, false, 2, |buf| buf.extend_from_slice(b"b\n"));
        let batch = std::mem::take(&mut shared.state.lock().unwrap_or_else(|e| e.into_inner()).buf);
        let mut written = Vec::new();
        let unread = write_batch(&batch, &mut Vec::new(), |lines| {
            written.extend_from_slice(lines);
        });
        assert_eq!((written.as_slice(), unread), (&b"a\nb\n"[..], 0));
    }
}
