//! Child processes as the log sees them: their output line by line, and how
//! they ended.
//!
//! Lines are capped (a runaway line without a newline cannot grow memory) and
//! decoded lossily (a stray byte cannot stop the stream).

use std::process::ExitStatus;

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
