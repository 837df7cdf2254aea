//! Child processes as the log sees them: their output line by line, and how
//! they ended.
//!
//! Lines are capped (a runaway line without a newline cannot grow memory) and
//! decoded lossily (a stray byte cannot stop the stream).

use std::process::ExitStatus;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncRead;
use tokio::task::JoinHandle;
use tokio_util::codec::{AnyDelimiterCodec, FramedRead};
use tracing::Instrument;

/// Longest line kept; the rest of a longer line is dropped.
pub const MAX_LINE: usize = 16 * 1024;

/// Calls `on_line` for each line of `reader` (without the newline) until
/// EOF, in a task that keeps the caller's tracing span.
pub fn forward<R, F>(reader: R, mut on_line: F) -> JoinHandle<()>
where
    R: AsyncRead + Send + Unpin + 'static,
    F: FnMut(&str) + Send + 'static,
{
    let codec = AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), b"\n".to_vec(), MAX_LINE);
    let mut lines = FramedRead::new(reader, codec);
    tokio::spawn(
        async move {
            while let Some(item) = lines.next().await {
                match item {
                    Ok(bytes) => {
                        let line = String::from_utf8_lossy(&bytes);
                        let line = line.trim_end_matches('\r');
                        if !line.is_empty() {
                            on_line(line);
                        }
                    }
                    // Over-long line: the codec skips to the next newline.
                    Err(tokio_util::codec::AnyDelimiterCodecError::MaxChunkLengthExceeded) => {}
                    Err(_) => break,
                }
            }
        }
        .in_current_span(),
    )
}

/// How long output is still read once a command has exited: a process it
/// left behind outside its group may hold the pipes open forever.
pub const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// How a command run by [`run_to_end`] ended.
#[derive(Debug)]
pub enum Finished {
    Exited(ExitStatus),
    TimedOut,
    WaitFailed(std::io::Error),
}

/// Runs a launched child, the leader of its own process group (see
/// `bext_worker::spawn`), to completion: its output goes to the log line by
/// line (in the caller's span), its whole group is killed at `timeout`, and
/// once it has exited, whatever it left running in its group is killed too
/// and its output is read for at most [`OUTPUT_DRAIN`] more. A build or hook
/// can neither hang bext nor leave processes behind.
pub async fn run_to_end(mut child: tokio::process::Child, timeout: Duration) -> Finished {
    use nix::sys::signal::{Signal, killpg};
    /// Kills the group if the run is abandoned (its future dropped, say by
    /// a shutdown during a build).
    struct Group(Option<nix::unistd::Pid>);
    impl Group {
        fn kill(&self) {
            if let Some(pgid) = self.0 {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
        }
    }
    impl Drop for Group {
        fn drop(&mut self) {
            self.kill();
        }
    }
    let mut group = Group(child.id().map(|pid| nix::unistd::Pid::from_raw(pid as i32)));
    // The operation this runs for (a deploy) sees the output too.
    let report = |reporter: Option<crate::progress::Reporter>| {
        move |line: &str| {
            tracing::info!("{line}");
            if let Some(reporter) = &reporter {
                reporter.line(line);
            }
        }
    };
    let out = child
        .stdout
        .take()
        .map(|s| forward(s, report(crate::progress::current())));
    let err = child
        .stderr
        .take()
        .map(|s| forward(s, report(crate::progress::current())));
    let finished = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => Finished::Exited(status),
        Ok(Err(e)) => Finished::WaitFailed(e),
        Err(_) => {
            group.kill();
            let _ = child.wait().await;
            Finished::TimedOut
        }
    };
    // The leader is gone; its group must not outlive it.
    group.kill();
    group.0 = None;
    for task in [out, err].into_iter().flatten() {
        let abort = task.abort_handle();
        if tokio::time::timeout(OUTPUT_DRAIN, task).await.is_err() {
            abort.abort();
        }
    }
    finished
}

/// "exit status 1" / "killed by signal 9".
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => {
            let name = nix::sys::signal::Signal::try_from(signal).map_or("unknown", |s| s.as_str());
            format!("killed by signal {signal} ({name})")
        }
        (None, None) => "unknown status".to_string(),
    }
}
