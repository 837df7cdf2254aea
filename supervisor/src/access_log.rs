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
    /// Logs the request. With bext's own log sink (after
    /// [`crate::telemetry::init`]) the serving thread only copies the
    /// line's facts into the log buffer ([`Record::encode`]); the writer
    /// thread formats them ([`format_entry`]), a batch at a time, off the
    /// path of the request.
    fn emit(&self, bytes: u64, complete: bool) {
        use crate::telemetry::AccessFormat;
        match crate::telemetry::access_format() {
            Some(AccessFormat::Off) => {}
            Some(AccessFormat::Json | AccessFormat::Text) => {
                let now = std::time::SystemTime::now();
                let duration = self.started.elapsed();
                let texts = self.texts();
                crate::telemetry::write_access(Self::encoded_len(&texts), |buf| {
                    self.encode(&texts, buf, bytes, complete, now, duration);
                });
            }
            None => self.emit_event(bytes, complete),
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

    /// The texts of the line, in their encoded order (`None`: no cache
    /// field), each cut to what a length can say.
    fn texts(&self) -> Texts<'_> {
        [
            Some(self.method.as_str().as_bytes()),
            Some(self.app.as_bytes()),
            Some(self.host()),
            Some(self.uri.path().as_bytes()),
            Some(self.client.as_bytes()),
            Some(self.request_id.as_bytes()),
            self.cache.as_ref().map(HeaderValue::as_bytes),
        ]
        .map(|text| text.map(|t| t.get(..MAX_TEXT).unwrap_or(t)))
    }

    /// How many bytes [`Record::encode`] appends.
    fn encoded_len(texts: &Texts<'_>) -> usize {
        ENCODED_NUMBERS
            + texts
                .iter()
                .map(|t| 4 + t.map_or(0, <[u8]>::len))
                .fold(0, usize::saturating_add)
    }

    /// Appends this request's line, as [`Entry::decode`] reads it, to
    /// `buf`: the numbers, then each of its `texts` ([`Record::texts`])
    /// with its length ([`Record::encoded_len`] bytes in all). `now`: when
    /// it ended; `duration`: how long it took.
    fn encode(
        &self,
        texts: &Texts<'_>,
        buf: &mut Vec<u8>,
        bytes: u64,
        complete: bool,
        now: std::time::SystemTime,
        duration: std::time::Duration,
    ) {
        let since = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let duration = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        let worker = self
            .worker
            .map_or(-1, |w| i64::try_from(w).unwrap_or(i64::MAX));
        buf.extend_from_slice(&since.as_secs().to_ne_bytes());
        buf.extend_from_slice(&since.subsec_micros().to_ne_bytes());
        buf.extend_from_slice(&duration.to_ne_bytes());
        buf.extend_from_slice(&bytes.to_ne_bytes());
        buf.extend_from_slice(&worker.to_ne_bytes());
        buf.extend_from_slice(&self.status.as_u16().to_ne_bytes());
        buf.push(u8::from(complete));
        for text in texts {
            match text {
                Some(text) => {
                    // (`texts` cut it to `MAX_TEXT`.)
                    buf.extend_from_slice(&(text.len() as u32).to_ne_bytes());
                    buf.extend_from_slice(text);
                }
                None => buf.extend_from_slice(&NO_TEXT.to_ne_bytes()),
            }
        }
    }

    /// The line the writer thread makes of this record (its encoding
    /// decoded and formatted).
    #[cfg(test)]
    fn format(&self, bytes: u64, complete: bool, json: bool) -> Vec<u8> {
        let mut encoded = Vec::new();
        self.encode(
            &self.texts(),
            &mut encoded,
            bytes,
            complete,
            std::time::SystemTime::now(),
            self.started.elapsed(),
        );
        assert_eq!(encoded.len(), Self::encoded_len(&self.texts()));
        let mut line = Vec::new();
        assert!(format_entry(&encoded, &mut line, json), "decodes");
        line
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

/// A text's length that says "none" in an encoded line.
const NO_TEXT: u32 = u32::MAX;
/// An access line's texts, in their encoded order ([`Record::texts`]).
type Texts<'a> = [Option<&'a [u8]>; 7];
/// The longest text an encoded line carries (more than a request's head
/// can hold; the log buffer refuses a longer line anyway).
const MAX_TEXT: usize = crate::telemetry::MAX_BUFFERED_BYTES;
/// Bytes of the numbers that start an encoded line.
const ENCODED_NUMBERS: usize = 8 + 4 + 8 + 8 + 8 + 2 + 1;

/// One access line's facts as [`Record::encode`] wrote them.
struct Entry<'a> {
    /// When the request ended: seconds and microseconds since 1970.
    secs: u64,
    micros: u32,
    /// How long it took, in microseconds.
    duration: u64,
    bytes: u64,
    worker: i64,
    status: u16,
    complete: bool,
    method: &'a [u8],
    app: &'a [u8],
    host: &'a [u8],
    path: &'a [u8],
    client: &'a [u8],
    request_id: &'a [u8],
    cache: Option<&'a [u8]>,
}

impl<'a> Entry<'a> {
    /// Reads what [`Record::encode`] wrote (the whole of `encoded`);
    /// `None` if it is not that.
    fn decode(encoded: &'a [u8]) -> Option<Entry<'a>> {
        let mut rest = encoded;
        let mut take = |n: usize| -> Option<&'a [u8]> {
            let (taken, tail) = rest.split_at_checked(n)?;
            rest = tail;
            Some(taken)
        };
        let secs = u64::from_ne_bytes(take(8)?.try_into().ok()?);
        let micros = u32::from_ne_bytes(take(4)?.try_into().ok()?);
        let duration = u64::from_ne_bytes(take(8)?.try_into().ok()?);
        let bytes = u64::from_ne_bytes(take(8)?.try_into().ok()?);
        let worker = i64::from_ne_bytes(take(8)?.try_into().ok()?);
        let status = u16::from_ne_bytes(take(2)?.try_into().ok()?);
        let complete = take(1)? != [0];
        let mut text = || -> Option<Option<&'a [u8]>> {
            let len = u32::from_ne_bytes(take(4)?.try_into().ok()?);
            if len == NO_TEXT {
                return Some(None);
            }
            take(len as usize).map(Some)
        };
        let entry = Entry {
            secs,
            micros,
            duration,
            bytes,
            worker,
            status,
            complete,
            method: text()??,
            app: text()??,
            host: text()??,
            path: text()??,
            client: text()??,
            request_id: text()??,
            cache: text()?,
        };
        rest.is_empty().then_some(entry)
    }
}

/// Appends the line of an encoded access record (see [`Record::encode`])
/// to `line`, as JSON or as text; false if `encoded` is not one (nothing
/// appended).
///
/// The line is the one `tracing`'s formatter would write for
/// [`Record::emit_event`], built directly: this runs for every request,
/// and the generic formatter costs several times more.
pub(crate) fn format_entry(encoded: &[u8], line: &mut Vec<u8>, json: bool) -> bool {
    let Some(entry) = Entry::decode(encoded) else {
        return false;
    };
    let Entry {
        secs,
        micros,
        duration,
        bytes,
        worker,
        status,
        complete,
        method,
        app,
        host,
        path,
        client,
        request_id,
        cache,
    } = entry;
    let mut num = itoa::Buffer::new();
    if json {
        // The method (an HTTP token), the request id (checked or made by
        // bext) and the client's address need no escaping.
        let path = json_text(path);
        line.extend_from_slice(br#"{"timestamp":""#);
        timestamp(line, secs, micros);
        line.extend_from_slice(br#"","level":"INFO","message":""#);
        line.extend_from_slice(method);
        line.push(b' ');
        line.extend_from_slice(&path);
        line.push(b' ');
        line.extend_from_slice(num.format(status).as_bytes());
        line.extend_from_slice(br#"","target":"bext::access","app":""#);
        push_json(line, app);
        line.extend_from_slice(br#"","method":""#);
        line.extend_from_slice(method);
        line.extend_from_slice(br#"","host":""#);
        push_json(line, host);
        line.extend_from_slice(br#"","path":""#);
        line.extend_from_slice(&path);
        line.extend_from_slice(br#"","status":"#);
        line.extend_from_slice(num.format(status).as_bytes());
        line.extend_from_slice(br#","bytes":"#);
        line.extend_from_slice(num.format(bytes).as_bytes());
        line.extend_from_slice(br#","duration_ms":"#);
        millis(line, duration);
        line.extend_from_slice(br#","worker":"#);
        line.extend_from_slice(num.format(worker).as_bytes());
        line.extend_from_slice(br#","client":""#);
        line.extend_from_slice(client);
        line.extend_from_slice(br#"","request_id":""#);
        line.extend_from_slice(request_id);
        if let Some(cache) = cache {
            line.extend_from_slice(br#"","cache":""#);
            push_json(line, cache);
        }
        line.extend_from_slice(if complete {
            b"\",\"complete\":true}\n"
        } else {
            b"\",\"complete\":false}\n"
        });
    } else {
        use std::io::Write;
        timestamp(line, secs, micros);
        let mut ms = Vec::with_capacity(12);
        millis(&mut ms, duration);
        let ms = String::from_utf8_lossy(&ms);
        let text = |b: &[u8]| String::from_utf8_lossy(b).escape_debug().to_string();
        let method = String::from_utf8_lossy(method);
        if let Some(cache) = cache {
            // `bext dev`: short, with the cache's decision beside it.
            let cache = String::from_utf8_lossy(cache);
            let decision = cache
                .split_once("detail=preview; ")
                .map_or(cache.as_ref(), |(_, d)| d)
                .replace("; ", " ");
            let _ = writeln!(
                line,
                "  INFO bext::access: {method} {} {status} {ms}ms  cache: {decision}",
                text(path),
            );
            return true;
        }
        let _ = writeln!(
            line,
            "  INFO bext::access: {method} {} {status} app={} host={} bytes={bytes} duration_ms={ms} worker={worker} client={} request_id={} complete={complete}",
            text(path),
            String::from_utf8_lossy(app),
            text(host),
            text(client),
            text(request_id),
        );
    }
    true
}

/// Appends a time (seconds and microseconds since 1970) as RFC 3339 with
/// microseconds, in UTC. The date-and-seconds part is formatted once per
/// second per thread.
fn timestamp(line: &mut Vec<u8>, secs: u64, micros: u32) {
    use std::cell::RefCell;
    use std::fmt::Write;
    use std::time::{Duration, UNIX_EPOCH};
    thread_local! {
        static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
    }
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs {
            // "YYYY-MM-DDTHH:MM:SSZ": the part before the Z.
            // (Never a panic on the log's thread: a time past what the
            // formatter takes is written as the epoch.)
            let mut full = String::new();
            let time = UNIX_EPOCH
                .checked_add(Duration::from_secs(secs))
                .unwrap_or(UNIX_EPOCH);
            if write!(full, "{}", humantime::format_rfc3339_seconds(time)).is_err() {
                full = "1970-01-01T00:00:00Z".to_string();
            }
            if let Some(prefix) = full.as_bytes().get(..19) {
                cached.1.copy_from_slice(prefix);
                cached.0 = secs;
            }
        }
        line.extend_from_slice(&cached.1);
    });
    line.push(b'.');
    padded(line, u64::from(micros), 6);
    line.push(b'Z');
}

/// Appends microseconds as milliseconds with three decimals.
fn millis(line: &mut Vec<u8>, micros: u64) {
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
pub(crate) mod tests {
    use super::*;

    /// A record as a request on the short way makes it.
    pub(crate) fn record(path: &'static str) -> Record {
        Record {
            app: "blog".into(),
            method: http::Method::GET,
            host: Some(HeaderValue::from_static("example.com")),
            uri: Uri::from_static(path),
            status: StatusCode::OK,
            worker: None,
            client: HeaderValue::from_static("10.0.0.7"),
            request_id: HeaderValue::from_static("r-1"),
            started: Instant::now(),
            cache: None,
        }
    }

    /// `record`'s line, encoded as the serving thread hands it over.
    pub(crate) fn encode(record: &Record, buf: &mut Vec<u8>) {
        let now = std::time::SystemTime::now();
        let texts = record.texts();
        record.encode(&texts, buf, 1024, true, now, record.started.elapsed());
    }

    #[test]
    fn an_encoded_line_decodes_to_the_same_facts_and_nothing_else_does() {
        let mut record = record("/x");
        record.worker = Some(3);
        record.status = StatusCode::BAD_GATEWAY;
        record.cache = Some(HeaderValue::from_static("bext; fwd=miss"));
        let at = std::time::UNIX_EPOCH + std::time::Duration::new(1_765_000_000, 123_456_789);
        let mut encoded = Vec::new();
        record.encode(
            &record.texts(),
            &mut encoded,
            77,
            false,
            at,
            std::time::Duration::from_micros(1_500),
        );
        assert_eq!(encoded.len(), Record::encoded_len(&record.texts()));
        let entry = Entry::decode(&encoded).expect("decodes");
        assert_eq!((entry.secs, entry.micros), (1_765_000_000, 123_456));
        assert_eq!(entry.duration, 1_500);
        assert_eq!((entry.bytes, entry.worker, entry.status), (77, 3, 502));
        assert!(!entry.complete);
        assert_eq!(entry.method, b"GET");
        assert_eq!(entry.app, b"blog");
        assert_eq!(entry.host, b"example.com");
        assert_eq!(entry.path, b"/x");
        assert_eq!(entry.client, b"10.0.0.7");
        assert_eq!(entry.request_id, b"r-1");
        assert_eq!(entry.cache, Some(&b"bext; fwd=miss"[..]));
        // No cache field; no worker.
        record.cache = None;
        record.worker = None;
        let mut plain = Vec::new();
        let texts = record.texts();
        record.encode(&texts, &mut plain, 0, true, at, std::time::Duration::ZERO);
        assert_eq!(plain.len(), Record::encoded_len(&texts));
        let entry = Entry::decode(&plain).expect("decodes");
        assert_eq!((entry.cache, entry.worker), (None, -1));
        // Cut anywhere, or with bytes after it: not an entry, and nothing
        // is written for it.
        for cut in 0..encoded.len() {
            assert!(Entry::decode(&encoded[..cut]).is_none(), "cut at {cut}");
            let mut line = Vec::new();
            assert!(!format_entry(&encoded[..cut], &mut line, true));
            assert!(line.is_empty());
        }
        encoded.push(0);
        assert!(Entry::decode(&encoded).is_none());
    }

    #[test]
    fn text_lines_read_as_before() {
        let mut record = record("/a/b");
        record.worker = Some(0);
        let line = String::from_utf8(record.format(5, true, false)).expect("UTF-8");
        let (stamp, rest) = line.split_once("  INFO").expect("a level");
        humantime::parse_rfc3339(stamp).expect("RFC 3339 time first");
        let rest = rest.strip_suffix('\n').expect("one line");
        let (before, after) = rest.split_once(" duration_ms=").expect("duration");
        assert_eq!(
            before,
            " bext::access: GET /a/b 200 app=blog host=example.com bytes=5"
        );
        assert!(
            after.ends_with(" worker=0 client=10.0.0.7 request_id=r-1 complete=true"),
            "{after}"
        );
        // `bext dev`: short, with the cache's decision.
        record.cache = Some(HeaderValue::from_static(
            "bext; detail=preview; stored; ttl=60",
        ));
        let line = String::from_utf8(record.format(5, true, false)).expect("UTF-8");
        assert!(line.contains(" bext::access: GET /a/b 200 "), "{line}");
        assert!(line.ends_with("ms  cache: stored ttl=60\n"), "{line}");
    }

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
