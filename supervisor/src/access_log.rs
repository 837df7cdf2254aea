//! One access-log line per request, written when the response body is done
//! (or abandoned), so it carries the real byte count and duration.

use std::borrow::Cow;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, Uri};
use http_body::{Frame, SizeHint};

use crate::body::{Body, BoxError};

/// What the access log says about one request, filled in along the way.
/// Its parts are the request's own (shared, not copied).
#[derive(Debug)]
pub struct Record {
    pub app: std::sync::Arc<str>,
    pub method: http::Method,
    /// The `Host` header (or, for HTTP/2, the URI's authority).
    pub host: Option<HeaderValue>,
    pub uri: Uri,
    pub status: StatusCode,
    pub worker: Option<usize>,
    /// The client's address as text (the peer, or a trusted proxy's client).
    pub client: HeaderValue,
    pub request_id: HeaderValue,
    pub started: Instant,
    /// `bext dev`: what the cache would have done (its `Cache-Status`).
    pub cache: Option<HeaderValue>,
}

impl Record {
    fn emit(&self, bytes: u64, complete: bool) {
        use crate::telemetry::AccessFormat;
        thread_local! {
            /// The line being written, kept per thread so that a request
            /// allocates nothing for its log line.
            static LINE: std::cell::RefCell<Vec<u8>> =
                std::cell::RefCell::new(Vec::with_capacity(LINE_CAPACITY));
        }
        let json = match crate::telemetry::access_format() {
            Some(AccessFormat::Off) => return,
            Some(AccessFormat::Json) => true,
            Some(AccessFormat::Text) => false,
            None => return self.emit_event(bytes, complete),
        };
        let written = LINE.try_with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            self.format_into(&mut line, bytes, complete, json);
            crate::telemetry::write_line(&line);
            // A freak line (a 64 KiB path) does not pin its buffer.
            if line.capacity() > 4 * LINE_CAPACITY {
                *line = Vec::with_capacity(LINE_CAPACITY);
            }
        });
        // (A body dropped while its thread exits: no buffer left there.)
        if written.is_err() {
            let mut line = Vec::with_capacity(LINE_CAPACITY);
            self.format_into(&mut line, bytes, complete, json);
            crate::telemetry::write_line(&line);
        }
    }

    /// Logs a request whose answer was written whole (`complete`: sent),
    /// with `bytes` of body.
    pub fn sent(self: Box<Self>, bytes: u64, complete: bool) {
        self.emit(bytes, complete);
    }

    fn host(&self) -> &[u8] {
        match &self.host {
            Some(host) => host.as_bytes(),
            None => self.uri.host().unwrap_or("").as_bytes(),
        }
    }

    /// The line `tracing`'s formatter would write for [`emit_event`], built
    /// directly: this runs for every request, and the generic formatter
    /// costs several times more.
    ///
    /// [`emit_event`]: Self::emit_event
    #[cfg(test)]
    fn format(&self, bytes: u64, complete: bool, json: bool) -> Vec<u8> {
        let mut line = Vec::new();
        self.format_into(&mut line, bytes, complete, json);
        line
    }

    fn format_into(&self, line: &mut Vec<u8>, bytes: u64, complete: bool, json: bool) {
        let status = self.status.as_u16();
        let micros = self.started.elapsed().as_micros();
        let mut num = itoa::Buffer::new();
        let worker = self.worker.map_or(-1, |w| w as i64);
        let path = self.uri.path().as_bytes();
        if json {
            // The method (an HTTP token), the request id (checked or made by
            // bext) and the client's address need no escaping.
            line.extend_from_slice(br#"{"timestamp":""#);
            timestamp(line);
            line.extend_from_slice(br#"","level":"INFO","message":""#);
            line.extend_from_slice(self.method.as_str().as_bytes());
            line.push(b' ');
            push_json(line, path);
            line.push(b' ');
            line.extend_from_slice(num.format(status).as_bytes());
            line.extend_from_slice(br#"","target":"bext::access","app":""#);
            push_json(line, self.app.as_bytes());
            line.extend_from_slice(br#"","method":""#);
            line.extend_from_slice(self.method.as_str().as_bytes());
            line.extend_from_slice(br#"","host":""#);
            push_json(line, self.host());
            line.extend_from_slice(br#"","path":""#);
            push_json(line, path);
            line.extend_from_slice(br#"","status":"#);
            line.extend_from_slice(num.format(status).as_bytes());
            line.extend_from_slice(br#","bytes":"#);
            line.extend_from_slice(num.format(bytes).as_bytes());
            line.extend_from_slice(br#","duration_ms":"#);
            millis(line, micros);
            line.extend_from_slice(br#","worker":"#);
            line.extend_from_slice(num.format(worker).as_bytes());
            line.extend_from_slice(br#","client":""#);
            line.extend_from_slice(self.client.as_bytes());
            line.extend_from_slice(br#"","request_id":""#);
            line.extend_from_slice(self.request_id.as_bytes());
            if let Some(cache) = &self.cache {
                line.extend_from_slice(br#"","cache":""#);
                push_json(line, cache.as_bytes());
            }
            line.extend_from_slice(if complete {
                b"\",\"complete\":true}\n"
            } else {
                b"\",\"complete\":false}\n"
            });
        } else {
            use std::io::Write;
            timestamp(line);
            let mut duration = Vec::with_capacity(12);
            millis(&mut duration, micros);
            let text = |b: &[u8]| String::from_utf8_lossy(b).escape_debug().to_string();
            if let Some(cache) = &self.cache {
                // `bext dev`: short, with the cache's decision beside it.
                let cache = String::from_utf8_lossy(cache.as_bytes());
                let decision = cache
                    .split_once("detail=preview; ")
                    .map_or(cache.as_ref(), |(_, d)| d)
                    .replace("; ", " ");
                let _ = writeln!(
                    line,
                    "  INFO bext::access: {} {} {status} {}ms  cache: {decision}",
                    self.method,
                    text(path),
                    String::from_utf8_lossy(&duration),
                );
                return;
            }
            let _ = writeln!(
                line,
                "  INFO bext::access: {} {} {status} app={} host={} bytes={bytes} duration_ms={} worker={worker} client={} request_id={} complete={complete}",
                self.method,
                text(path),
                self.app,
                text(self.host()),
                String::from_utf8_lossy(&duration),
                text(self.client.as_bytes()),
                text(self.request_id.as_bytes()),
            );
        }
    }

    fn emit_event(&self, bytes: u64, complete: bool) {
        tracing::info!(
            target: "bext::access",
            app = %self.app,
            method = %self.method,
            host = %String::from_utf8_lossy(self.host()),
            path = %self.uri.path(),
            status = self.status.as_u16(),
            bytes,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            worker = self.worker.map_or(-1, |w| w as i64),
            client = %String::from_utf8_lossy(self.client.as_bytes()),
            request_id = %String::from_utf8_lossy(self.request_id.as_bytes()),
            complete,
            "{} {} {}",
            self.method,
            self.uri.path(),
            self.status.as_u16(),
        );
    }
}

/// Appends the time now as RFC 3339 with microseconds, in UTC. The
/// date-and-seconds part is formatted once per second per thread.
fn timestamp(line: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
    }
    let now = SystemTime::now();
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != since.as_secs() {
            // "YYYY-MM-DDTHH:MM:SSZ": the part before the Z.
            let full = humantime::format_rfc3339_seconds(now).to_string();
            if let Some(prefix) = full.as_bytes().get(..19) {
                cached.1.copy_from_slice(prefix);
                cached.0 = since.as_secs();
            }
        }
        line.extend_from_slice(&cached.1);
    });
    line.push(b'.');
    padded(line, u64::from(since.subsec_micros()), 6);
    line.push(b'Z');
}

/// Appends microseconds as milliseconds with three decimals.
fn millis(line: &mut Vec<u8>, micros: u128) {
    let micros = u64::try_from(micros).unwrap_or(u64::MAX);
    line.extend_from_slice(itoa::Buffer::new().format(micros / 1000).as_bytes());
    line.push(b'.');
    padded(line, micros % 1000, 3);
}

/// Appends `n` zero-padded to `width` digits.
fn padded(line: &mut Vec<u8>, n: u64, width: usize) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(n);
    line.extend(std::iter::repeat_n(
        b'0',
        width.saturating_sub(digits.len()),
    ));
    line.extend_from_slice(digits.as_bytes());
}

/// Room for a typical access line (about 350 bytes in JSON).
const LINE_CAPACITY: usize = 512;

/// Appends `text` escaped for the inside of a JSON string.
fn push_json(line: &mut Vec<u8>, text: &[u8]) {
    line.extend_from_slice(&json_text(text));
}

/// `text` escaped for the inside of a JSON string. Plain printable ASCII
/// (nearly every path, host and app name) is used as it is; anything else
/// goes through `serde_json` (invalid UTF-8 replaced).
fn json_text(text: &[u8]) -> Cow<'_, [u8]> {
    const PLAIN: [bool; 256] = {
        let mut plain = [false; 256];
        let mut b = 0x20;
        while b < 0x7f {
            plain[b] = b != b'"' as usize && b != b'\\' as usize;
            b += 1;
        }
        plain
    };
    if text.iter().all(|&b| PLAIN[usize::from(b)]) {
        return Cow::Borrowed(text);
    }
    let quoted = serde_json::to_string(&String::from_utf8_lossy(text)).unwrap_or_default();
    let inside = quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"'));
    Cow::Owned(inside.unwrap_or_default().as_bytes().to_vec())
}

pin_project_lite::pin_project! {
    /// A response body that counts what it sends and logs the request when
    /// it ends.
    pub struct Logged {
        #[pin]
        inner: Body,
        record: Option<Box<Record>>,
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

/// A request's record until its response exists. Dropped before that (the
/// client left while bext or the app was still at work on it), it is
/// logged as nginx logs such a request: status 499, nothing sent.
#[derive(Debug)]
pub struct Unanswered(Option<Box<Record>>);

impl Unanswered {
    pub fn new(record: Option<Box<Record>>) -> Self {
        Unanswered(record)
    }

    /// The response exists: its body logs the request from now on.
    pub fn answered(mut self) -> Option<Box<Record>> {
        self.0.take()
    }
}

/// nginx's "client closed request".
pub const CLIENT_CLOSED: u16 = 499;

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(mut record) = self.0.take() {
            record.status = StatusCode::from_u16(CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST);
            record.emit(0, false);
        }
    }
}

impl Logged {
    pub fn new(inner: Body, record: Option<Box<Record>>) -> Self {
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
    fn only_printable_ascii_without_quote_or_backslash_goes_as_it_is() {
        for b in 0..=u8::MAX {
            let text = [b'/', b, b'x'];
            let plain = (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\';
            let escaped = json_text(&text);
            assert_eq!(matches!(escaped, Cow::Borrowed(_)), plain, "byte {b:#04x}");
            if !plain {
                let back: String = serde_json::from_slice(&[b"\"", &*escaped, b"\""].concat())
                    .expect("a JSON string");
                assert_eq!(back, String::from_utf8_lossy(&text), "byte {b:#04x}");
            }
        }
    }

    #[test]
    fn json_line_is_valid_json_with_escaped_fields() {
        let record = Record {
            app: "blog".into(),
            method: http::Method::GET,
            host: Some(HeaderValue::from_bytes("exämple.com\"".as_bytes()).expect("obs-text")),
            uri: Uri::from_static("/a\"b\\c"),
            status: StatusCode::NOT_FOUND,
            worker: Some(1),
            client: HeaderValue::from_static("10.0.0.7"),
            request_id: HeaderValue::from_static("r-1"),
            started: Instant::now() - std::time::Duration::from_micros(1_234_567),
            cache: None,
        };
        let line = record.format(42, true, true);
        assert_eq!(line.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&line).expect("one JSON object");
        assert_eq!(v["message"], "GET /a\"b\\c 404");
        assert_eq!(v["path"], "/a\"b\\c");
        assert_eq!(v["host"], "exämple.com\"");
        assert_eq!(v["request_id"], "r-1");
        let timestamp = v["timestamp"].as_str().expect("timestamp");
        let parsed = humantime::parse_rfc3339(timestamp).expect("RFC 3339");
        let age = std::time::SystemTime::now()
            .duration_since(parsed)
            .expect("not in the future");
        assert!(age < std::time::Duration::from_secs(60), "{timestamp}");
        assert_eq!(
            timestamp.len(),
            "2026-01-01T00:00:00.000000Z".len(),
            "{timestamp}"
        );
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
