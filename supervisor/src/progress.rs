//! Progress of a long operation (a deploy, a rollback, a restart) as the
//! client that asked for it sees it: steps with their durations, and the
//! output lines of builds and hooks.
//!
//! The operation's [`Reporter`] rides along as a task-local, so the code it
//! runs (hooks, install, build, worker start) reports with
//! [`step`] / [`line`] and knows nothing of who listens. Nothing here
//! ever waits on the client: events that do not fit in the channel are
//! dropped (a client that does not read loses lines, never stalls a
//! deploy), and build output also goes to the version's build log.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bext_proto::control::v1::Progress;
use tokio::sync::mpsc;

/// Events a slow client may fall behind by before lines are dropped.
pub const CHANNEL: usize = 1024;

/// Largest build log kept per version; later lines are dropped from it.
pub const MAX_BUILD_LOG: u64 = 16 * 1024 * 1024;

/// Where one operation's progress goes.
#[derive(Debug, Clone)]
pub struct Reporter(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    events: mpsc::Sender<Progress>,
    version: String,
    began: Instant,
    current: Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    step: &'static str,
    since: Instant,
    log: Option<(std::fs::File, u64)>,
}

tokio::task_local! {
    static REPORTER: Reporter;
}

impl Reporter {
    /// A reporter and the stream of its events.
    pub fn new() -> (Self, mpsc::Receiver<Progress>) {
        let (events, rx) = mpsc::channel(CHANNEL);
        let now = Instant::now();
        let reporter = Reporter(Arc::new(Inner {
            events,
            version: String::new(),
            began: now,
            current: Mutex::new(Current {
                step: "upload",
                since: now,
                log: None,
            }),
        }));
        (reporter, rx)
    }

    /// The same channel, for the version `id` (named in every event).
    pub fn for_version(&self, id: &str) -> Self {
        let current = self.lock();
        Reporter(Arc::new(Inner {
            events: self.0.events.clone(),
            version: id.to_string(),
            began: self.0.began,
            current: Mutex::new(Current {
                step: current.step,
                since: current.since,
                log: None,
            }),
        }))
    }

    /// Build and hook output goes to `file` too (at most [`MAX_BUILD_LOG`]).
    pub fn log_to(&self, file: std::fs::File) {
        self.lock().log = Some((file, 0));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.0.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new step begins.
    pub fn step(&self, step: &'static str, message: impl Into<String>) {
        let message = message.into();
        {
            let mut current = self.lock();
            current.step = step;
            current.since = Instant::now();
            if let Some((file, written)) = current.log.as_mut() {
                let line = format!("== {step}: {message}\n");
                *written += line.len() as u64;
                let _ = file.write_all(line.as_bytes());
            }
        }
        self.send(self.event(step, message, Duration::ZERO));
    }

    /// A line of output of the current step.
    pub fn line(&self, line: &str) {
        let step = {
            let mut current = self.lock();
            if let Some((file, written)) = current.log.as_mut()
                && *written < MAX_BUILD_LOG
            {
                *written += line.len() as u64 + 1;
                let _ = file.write_all(line.as_bytes());
                let _ = file.write_all(b"\n");
            }
            current.step
        };
        let mut event = self.event(step, String::new(), self.in_step());
        event.log_lines.push(line.to_string());
        self.send(event);
    }

    /// How long the current step has run.
    pub fn in_step(&self) -> Duration {
        self.lock().since.elapsed()
    }

    /// The last event: how the operation ended. Sent even to a client that
    /// is behind (it waits a little for room).
    pub fn finish(&self, result: Result<String, String>) {
        let (step, ok, message) = match result {
            Ok(m) => ("done", true, m),
            Err(m) => ("failed", false, m),
        };
        if let Some((file, _)) = self.lock().log.as_mut() {
            let _ = writeln!(file, "== {step}: {message}");
        }
        let mut event = self.event(step, message, self.0.began.elapsed());
        event.finished = true;
        event.ok = ok;
        let events = self.0.events.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), events.send(event)).await;
        });
    }

    fn event(&self, step: &str, message: String, elapsed: Duration) -> Progress {
        Progress {
            step: step.to_string(),
            message,
            elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            version: self.0.version.clone(),
            ..Progress::default()
        }
    }

    fn send(&self, event: Progress) {
        // A client that has gone, or is behind: the operation goes on.
        let _ = self.0.events.try_send(event);
    }

    /// Runs `work` with this reporter as the one [`step`] and [`line`]
    /// report to.
    pub async fn scope<F: Future>(self, work: F) -> F::Output {
        REPORTER.scope(self, work).await
    }
}

/// The reporter of the operation this task runs for, if any.
pub fn current() -> Option<Reporter> {
    REPORTER.try_with(Reporter::clone).ok()
}

/// Reports a new step to the operation this task runs for (if any).
pub fn step(step: &'static str, message: impl Into<String>) {
    if let Some(reporter) = current() {
        reporter.step(step, message);
    }
}
