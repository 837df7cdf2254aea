//! One access-log line per request, written when the response body is done
//! (or abandoned), so it carries the real byte count and duration.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::StatusCode;
use http_body::{Frame, SizeHint};

use crate::body::{Body, BoxError};

/// What the access log says about one request, filled in along the way.
#[derive(Debug)]
pub struct Record {
    pub app: std::sync::Arc<str>,
    pub method: http::Method,
    pub host: String,
    pub path: String,
    pub status: StatusCode,
    pub worker: Option<usize>,
    /// The client's address (the peer, or a trusted proxy's client).
    pub client: std::net::IpAddr,
    pub request_id: String,
    pub started: Instant,
}

impl Record {
    fn emit(&self, bytes: u64, complete: bool) {
        if !tracing::enabled!(target: "bext::access", tracing::Level::INFO) {
            return;
        }
        match crate::telemetry::json_format() {
            Some(json) => crate::telemetry::write_line(&self.format(bytes, complete, json)),
            None => self.emit_event(bytes, complete),
        }
    }

    /// The line `tracing`'s formatter would write for [`emit_event`], built
    /// directly: this runs for every request, and the generic formatter
    /// costs several times more.
    ///
    /// [`emit_event`]: Self::emit_event
    fn format(&self, bytes: u64, complete: bool, json: bool) -> Vec<u8> {
        use std::io::Write;
        let mut line = Vec::with_capacity(320);
        let now = humantime::format_rfc3339_micros(std::time::SystemTime::now());
        let status = self.status.as_u16();
        let duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let worker = self.worker.map_or(-1, |w| w as i64);
        if json {
            let s = |v: &str| serde_json::to_string(v).unwrap_or_else(|_| "\"\"".into());
            let _ = writeln!(
                line,
                r#"{{"timestamp":"{now}","level":"INFO","message":{},"target":"bext::access","app":{},"method":{},"host":{},"path":{},"status":{status},"bytes":{bytes},"duration_ms":{duration_ms:.3},"worker":{worker},"client":"{}","request_id":{},"complete":{complete}}}"#,
                s(&format!("{} {} {status}", self.method, self.path)),
                s(&self.app),
                s(self.method.as_str()),
                s(&self.host),
                s(&self.path),
                self.client,
                s(&self.request_id),
            );
        } else {
            let _ = writeln!(
                line,
                "{now}  INFO bext::access: {} {} {status} app={} host={} bytes={bytes} duration_ms={duration_ms:.3} worker={worker} client={} request_id={} complete={complete}",
                self.method,
                self.path.escape_debug(),
                self.app,
                self.host.escape_debug(),
                self.client,
                self.request_id,
            );
        }
        line
    }

    fn emit_event(&self, bytes: u64, complete: bool) {
        tracing::info!(
            target: "bext::access",
            app = %self.app,
            method = %self.method,
            host = %self.host,
            path = %self.path,
            status = self.status.as_u16(),
            bytes,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            worker = self.worker.map_or(-1, |w| w as i64),
            client = %self.client,
            request_id = %self.request_id,
            complete,
            "{} {} {}",
            self.method,
            self.path,
            self.status.as_u16(),
        );
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts what it sends and logs the request when
    /// it ends.
    pub struct Logged {
        #[pin]
        inner: Body,
        record: Option<Record>,
        bytes: u64,
        done: bool,
    }

    impl PinnedDrop for Logged {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(record) = this.record.take() {
                // hyper stops polling once the body says it has ended.
                let done = *this.done || http_body::Body::is_end_stream(&*this.inner);
                record.emit(*this.bytes, done);
            }
        }
    }
}

impl Logged {
    pub fn new(inner: Body, record: Option<Record>) -> Self {
        Logged {
            inner,
            record,
            bytes: 0,
            done: false,
        }
    }
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => *this.done = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
