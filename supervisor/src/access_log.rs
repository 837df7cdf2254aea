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
        let micros = self.started.elapsed().as_micros();
        let worker = self.worker.map_or(-1, |w| w as i64);
        if json {
            // Strings go through serde_json straight into the line (escaped,
            // no intermediate allocation).
            fn put(line: &mut Vec<u8>, v: &impl serde::Serialize) {
                let _ = serde_json::to_writer(line, v);
            }
            let _ = write!(line, r#"{{"timestamp":"{now}","level":"INFO","message":"#);
            put(
                &mut line,
                &format_args!("{} {} {status}", self.method, self.path),
            );
            line.extend_from_slice(br#","target":"bext::access","app":"#);
            put(&mut line, &&*self.app);
            line.extend_from_slice(br#","method":"#);
            put(&mut line, &self.method.as_str());
            line.extend_from_slice(br#","host":"#);
            put(&mut line, &self.host.as_str());
            line.extend_from_slice(br#","path":"#);
            put(&mut line, &self.path.as_str());
            let _ = write!(
                line,
                r#","status":{status},"bytes":{bytes},"duration_ms":{}.{:03},"worker":{worker},"client":"{}","request_id":"#,
                micros / 1000,
                micros % 1000,
                self.client,
            );
            put(&mut line, &self.request_id.as_str());
            let _ = writeln!(line, r#","complete":{complete}}}"#);
        } else {
            let _ = writeln!(
                line,
                "{now}  INFO bext::access: {} {} {status} app={} host={} bytes={bytes} duration_ms={}.{:03} worker={worker} client={} request_id={} complete={complete}",
                self.method,
                self.path.escape_debug(),
                self.app,
                self.host.escape_debug(),
                micros / 1000,
                micros % 1000,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_is_valid_json_with_escaped_fields() {
        let record = Record {
            app: "blog".into(),
            method: http::Method::GET,
            host: "example.com".into(),
            path: "/a\"b\\c\u{1}é".into(),
            status: StatusCode::NOT_FOUND,
            worker: Some(1),
            client: "10.0.0.7".parse().expect("ip"),
            request_id: "r-1".into(),
            started: Instant::now() - std::time::Duration::from_micros(1_234_567),
        };
        let line = record.format(42, true, true);
        assert_eq!(line.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&line).expect("one JSON object");
        assert_eq!(v["message"], "GET /a\"b\\c\u{1}é 404");
        assert_eq!(v["path"], "/a\"b\\c\u{1}é");
        assert_eq!(v["app"], "blog");
        assert_eq!(v["status"], 404);
        assert_eq!(v["bytes"], 42);
        assert_eq!(v["worker"], 1);
        assert_eq!(v["client"], "10.0.0.7");
        assert_eq!(v["complete"], true);
        let ms = v["duration_ms"].as_f64().expect("number");
        assert!((1234.567..1300.0).contains(&ms), "{ms}");
    }
}
