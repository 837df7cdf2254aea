//! Showing a long operation's `Progress` events (deploy, rollback,
//! restart) to the person who asked for it, on stderr: a spinner with the
//! current step on a terminal, plain lines elsewhere (CI logs, pipes).
//! It decides nothing: the last event says how the operation ended, and
//! the caller turns that into output and an exit code.

use std::borrow::Cow;
use std::io::{self, IsTerminal, Write};
use std::time::{Duration, Instant};

use bext_proto::control::v1::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// How often the spinner moves.
const TICK: Duration = Duration::from_millis(100);

/// How an operation ended, from its last event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The final message.
    Done(String),
    /// Why it failed.
    Failed(String),
}

/// The step being shown.
#[derive(Debug)]
struct Step {
    name: String,
    message: String,
    started: Instant,
    /// The server's time in this step, from its latest event.
    server_elapsed: Duration,
}

impl Step {
    /// The server's count, or ours when events were sparse.
    fn elapsed(&self) -> Duration {
        self.server_elapsed.max(self.started.elapsed())
    }
}

#[derive(Debug)]
enum Sink<W> {
    Tty(ProgressBar),
    Plain(W),
}

/// Shows one operation's events.
#[derive(Debug)]
pub struct View<W: Write> {
    sink: Sink<W>,
    current: Option<Step>,
}

impl View<Box<dyn Write>> {
    /// A spinner if stderr is a terminal, else plain lines.
    pub fn stderr() -> Self {
        if io::stderr().is_terminal() {
            Self::spinner(ProgressBar::new_spinner())
        } else {
            Self::plain(Box::new(io::stderr()))
        }
    }
}

impl<W: Write> View<W> {
    /// Plain lines: `[step] message (1.2s)` each time the step or its
    /// message changes.
    pub fn plain(out: W) -> Self {
        Self {
            sink: Sink::Plain(out),
            current: None,
        }
    }

    /// A spinner on `bar`'s target, with a `✓` line per finished step.
    fn spinner(bar: ProgressBar) -> Self {
        if let Ok(style) = ProgressStyle::with_template("{spinner} {wide_msg}  ({elapsed})") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(TICK);
        Self {
            sink: Sink::Tty(bar),
            current: None,
        }
    }

    /// Shows one event; returns how the operation ended if it was the last.
    pub fn event(&mut self, event: &Progress) -> Option<Outcome> {
        let server_elapsed = Duration::from_millis(event.elapsed_ms);
        if event.finished {
            self.log_lines(&event.log_lines);
            if event.ok {
                self.end_step("✓", None);
                return Some(Outcome::Done(final_message(event)));
            }
            // A failure belongs to the step that was running.
            let reason = if event.message.is_empty() {
                "the operation failed".to_string()
            } else {
                event.message.clone()
            };
            self.end_step("✗", Some(&reason));
            return Some(Outcome::Failed(reason));
        }
        let new_step =
            !event.step.is_empty() && self.current.as_ref().is_none_or(|s| s.name != event.step);
        if new_step {
            self.end_step("✓", None);
            self.current = Some(Step {
                name: event.step.clone(),
                message: event.message.clone(),
                started: Instant::now(),
                server_elapsed,
            });
            if let Sink::Tty(bar) = &self.sink {
                bar.reset_elapsed();
            }
            self.show(server_elapsed);
        } else if let Some(step) = &mut self.current {
            step.server_elapsed = server_elapsed;
            if !event.message.is_empty() && step.message != event.message {
                step.message.clone_from(&event.message);
                self.show(server_elapsed);
            }
        }
        self.log_lines(&event.log_lines);
        None
    }

    /// Puts the current step on screen.
    fn show(&mut self, elapsed: Duration) {
        let Some(step) = &self.current else {
            return;
        };
        match &mut self.sink {
            // One update, so the spinner never shows a step with the
            // previous step's message.
            Sink::Tty(bar) => bar.set_message(format!("{}{}", step.name, spaced(&step.message))),
            Sink::Plain(out) => {
                // Stderr going away must not fail the deploy. The time
                // comes when the step ends.
                let _ = elapsed;
                let _ = writeln!(out, "[{}]{}", step.name, spaced_one(&step.message));
            }
        }
    }

    fn log_lines(&mut self, lines: &[String]) {
        for line in lines {
            let line = format!("  | {line}");
            match &mut self.sink {
                Sink::Tty(bar) => bar.println(line),
                Sink::Plain(out) => {
                    let _ = writeln!(out, "{line}");
                }
            }
        }
    }

    /// Closes the current step with its duration: on a terminal as a line
    /// with `mark`, in plain output as `[step] done (1.2s)`.
    fn end_step(&mut self, mark: &str, failure: Option<&str>) {
        let Some(step) = self.current.take() else {
            return;
        };
        match &mut self.sink {
            Sink::Tty(bar) => {
                let message = spaced(failure.unwrap_or(&step.message));
                bar.println(format!(
                    "{mark} {}{message}  ({})",
                    step.name,
                    seconds(step.elapsed())
                ));
            }
            Sink::Plain(out) => {
                let how = if failure.is_some() { "failed" } else { "done" };
                let _ = writeln!(out, "[{}] {how} ({})", step.name, seconds(step.elapsed()));
            }
        }
    }
}

impl<W: Write> Drop for View<W> {
    fn drop(&mut self) {
        if let Sink::Tty(bar) = &self.sink {
            bar.finish_and_clear();
        }
    }
}

/// `"  message"`, or nothing for an empty message.
fn spaced(message: &str) -> Cow<'_, str> {
    if message.is_empty() {
        Cow::Borrowed("")
    } else {
        Cow::Owned(format!("  {message}"))
    }
}

/// `" message"`, or nothing for an empty message.
fn spaced_one(message: &str) -> Cow<'_, str> {
    if message.is_empty() {
        Cow::Borrowed("")
    } else {
        Cow::Owned(format!(" {message}"))
    }
}

fn final_message(event: &Progress) -> String {
    match (event.message.is_empty(), event.version.is_empty()) {
        (false, _) => event.message.clone(),
        (true, false) => format!("done: version {}", event.version),
        (true, true) => "done".to_string(),
    }
}

/// `1.2s` under a minute, `2m05s` above.
pub fn seconds(elapsed: Duration) -> String {
    let secs = elapsed.as_secs();
    if secs < 60 {
        format!("{:.1}s", elapsed.as_secs_f64())
    } else {
        format!("{}m{:02}s", secs / 60, secs % 60)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bext_proto::control::v1::Progress;
    use indicatif::{ProgressBar, ProgressDrawTarget};

    use super::{Outcome, Sink, View, seconds};

    fn event(step: &str, message: &str, elapsed_ms: u64) -> Progress {
        Progress {
            step: step.into(),
            message: message.into(),
            elapsed_ms,
            ..Progress::default()
        }
    }

    fn script() -> Vec<Progress> {
        let mut with_logs = event("build", "next build", 1200);
        with_logs.log_lines = vec!["compiled".into(), "42 pages".into()];
        let mut done = event("done", "blog is serving v2", 5000);
        done.finished = true;
        done.ok = true;
        vec![
            event("upload", "received 1.2 MB", 10),
            event("upload", "received 1.2 MB", 30),
            event("build", "next build", 0),
            with_logs,
            event("build", "writing cache", 2500),
            done,
        ]
    }

    #[test]
    fn plain_lines_once_per_change() {
        let mut view = View::plain(Vec::new());
        let mut outcome = None;
        for e in script() {
            outcome = view.event(&e);
        }
        assert_eq!(outcome, Some(Outcome::Done("blog is serving v2".into())));
        let Sink::Plain(out) = &view.sink else {
            panic!("plain");
        };
        assert_eq!(
            String::from_utf8_lossy(out),
            "[upload] received 1.2 MB\n\
             [upload] done (0.0s)\n\
             [build] next build\n  \
             | compiled\n  \
             | 42 pages\n\
             [build] writing cache\n\
             [build] done (2.5s)\n"
        );
    }

    #[test]
    fn failure_reports_its_message() {
        let mut view = View::plain(Vec::new());
        assert_eq!(view.event(&event("install", "npm ci", 0)), None);
        let mut failed = event("failed", "npm ci exited with status 1", 900);
        failed.finished = true;
        failed.log_lines = vec!["npm ERR! missing script".into()];
        assert_eq!(
            view.event(&failed),
            Some(Outcome::Failed("npm ci exited with status 1".into()))
        );
    }

    #[test]
    fn spinner_runs_the_same_script() {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
        let mut view: View<Vec<u8>> = View::spinner(bar);
        let outcome = script().iter().find_map(|e| view.event(e));
        assert_eq!(outcome, Some(Outcome::Done("blog is serving v2".into())));
    }

    #[test]
    fn durations() {
        assert_eq!(seconds(Duration::from_millis(1234)), "1.2s");
        assert_eq!(seconds(Duration::from_secs(125)), "2m05s");
    }
}
