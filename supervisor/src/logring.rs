//! Each app's recent worker output, for `bextctl logs`: a bounded ring of
//! lines per app (by name, so it outlives the app's generations), and a
//! broadcast of new lines for followers. Bounded in lines and bytes; a
//! follower that falls behind skips ahead, it never holds a worker's
//! output up. Lines go to bext's own log as before: this is a copy.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;

/// Lines kept per app.
pub const MAX_LINES: usize = 1000;
/// Bytes kept per app (the oldest lines go first).
pub const MAX_BYTES: usize = 1024 * 1024;
/// New lines a follower may be behind by before it skips ahead.
const FOLLOW_BACKLOG: usize = 512;

/// One line of a worker's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Counts the app's lines from 1.
    pub seq: u64,
    /// Unix time, milliseconds.
    pub time_ms: i64,
    pub worker: u32,
    pub pid: u32,
    /// `stdout` or `stderr`.
    pub stream: &'static str,
    pub text: String,
}

#[derive(Debug)]
pub struct LogRing {
    ring: Mutex<Ring>,
    follow: broadcast::Sender<Arc<Line>>,
}

#[derive(Debug, Default)]
struct Ring {
    lines: VecDeque<Arc<Line>>,
    bytes: usize,
    seq: u64,
}

impl Default for LogRing {
    fn default() -> Self {
        LogRing {
            ring: Mutex::new(Ring::default()),
            follow: broadcast::channel(FOLLOW_BACKLOG).0,
        }
    }
}

impl LogRing {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, worker: usize, pid: u32, stream: &'static str, text: &str) {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let line = {
            let mut ring = self.lock();
            ring.seq += 1;
            let line = Arc::new(Line {
                seq: ring.seq,
                time_ms,
                worker: u32::try_from(worker).unwrap_or(u32::MAX),
                pid,
                stream,
                text: text.to_string(),
            });
            ring.bytes += line.text.len();
            ring.lines.push_back(Arc::clone(&line));
            while ring.lines.len() > MAX_LINES || ring.bytes > MAX_BYTES {
                match ring.lines.pop_front() {
                    Some(old) => ring.bytes -= old.text.len(),
                    None => break,
                }
            }
            line
        };
        // No follower: nothing to do.
        let _ = self.follow.send(line);
    }

    /// The last `n` lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<Arc<Line>> {
        let ring = self.lock();
        ring.lines
            .iter()
            .skip(ring.lines.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// New lines from now on (subscribe before [`Self::tail`], and skip
    /// what the tail had by `seq`).
    pub fn follow(&self) -> broadcast::Receiver<Arc<Line>> {
        self.follow.subscribe()
    }
}

/// The ring of the app named `app` (made on first use).
pub fn for_app(app: &str) -> Arc<LogRing> {
    static RINGS: OnceLock<Mutex<HashMap<String, Arc<LogRing>>>> = OnceLock::new();
    let rings = RINGS.get_or_init(Default::default);
    let mut rings = rings.lock().unwrap_or_else(|e| e.into_inner());
    Arc::clone(rings.entry(app.to_string()).or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_lines_within_its_bounds() {
        let ring = LogRing::default();
        for i in 0..(MAX_LINES + 10) {
            ring.push(0, 42, "stdout", &format!("line {i}"));
        }
        let tail = ring.tail(usize::MAX);
        assert_eq!(tail.len(), MAX_LINES);
        assert_eq!(tail.last().map(|l| l.text.as_str()), Some("line 1009"));
        assert_eq!(ring.tail(2).first().map(|l| l.seq), Some(1009));

        let big = "x".repeat(300 * 1024);
        for _ in 0..5 {
            ring.push(1, 7, "stderr", &big);
        }
        let bytes: usize = ring.tail(usize::MAX).iter().map(|l| l.text.len()).sum();
        assert!(bytes <= MAX_BYTES, "{bytes}");
        assert_eq!(ring.tail(usize::MAX).len(), 3);
    }

    #[tokio::test]
    async fn followers_get_new_lines() {
        let ring = LogRing::default();
        ring.push(0, 1, "stdout", "before");
        let mut follow = ring.follow();
        ring.push(0, 1, "stdout", "after");
        let line = follow.recv().await.expect("a line");
        assert_eq!(line.text, "after");
        assert_eq!(line.seq, 2);
    }
}
