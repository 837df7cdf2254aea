//! A shorter way through HTTP/1.1 for what a busy site is asked most: a
//! plain `GET` that the handler answers without waiting for anything (a
//! static file, a fresh cache hit: [`Handler::answer_now`]).
//!
//! Each connection starts here. A request is parsed with the parser hyper
//! uses (`httparse`), and only one whose meaning cannot differ between the
//! two is answered here: `GET`, HTTP/1.1, origin-form target, no body
//! framing (`Content-Length`, `Transfer-Encoding`), no `Expect`, `Upgrade`
//! or `Connection` other than `keep-alive`, one valid `Host`, at most
//! [`FAST_MAX_HEADERS`] fields. At the first request that is anything else
//! (or that the handler does not answer at once), the connection goes to
//! hyper for the rest of its life, with every byte read so far: hyper then
//! sees exactly what it would have seen, and answers or refuses it.
//!
//! The connection's time bounds stay with [`TimedIo`] (they are enforced
//! on the socket, whoever reads it), and graceful shutdown closes it
//! between requests, as hyper does.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::timed::{Activity, TimedIo};
use super::{Handler, MAX_HEADER_BYTES, Peer};
use crate::body::Body;

/// Header fields a request answered here may have (a browser sends about
/// 15); more go to hyper, which allows [`super::MAX_HEADERS`].
pub(super) const FAST_MAX_HEADERS: usize = 48;

/// How a connection left the short way.
pub(super) enum Left {
    /// To hyper, with the bytes read and not answered.
    Hyper(BytesMut),
    /// Closed: the client went, a bound passed, or shutdown.
    Closed,
}

/// Serves `io` the short way until a request is not for it; see the module
/// documentation.
pub(super) async fn serve<H: Handler, S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut TimedIo<S>,
    handler: &Arc<H>,
    peer: &Peer,
    activity: &Arc<Activity>,
    stop: &CancellationToken,
) -> Left {
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut out = Vec::with_capacity(2 * 1024);
    loop {
        if buf.is_empty() && !read_more(io, &mut buf, stop).await {
            return Left::Closed;
        }
        let (mut req, len) = match parse(&buf) {
            Parsed::Partial if buf.len() < MAX_HEADER_BYTES => {
                if !read_more(io, &mut buf, stop).await {
                    return Left::Closed;
                }
                continue;
            }
            Parsed::Partial | Parsed::NotHere => return Left::Hyper(buf),
            Parsed::Request(req, len) => (req, len),
        };
        let Some(response) = handler.answer_now(&mut req, peer) else {
            return Left::Hyper(buf);
        };
        buf.advance(len);
        let in_flight = activity.begin();
        let written = write(io, response, &mut out).await;
        drop(in_flight);
        match written {
            Ok(true) if !stop.is_cancelled() => {}
            _ => return Left::Closed,
        }
    }
}

/// Reads more of a request; false when the connection is to be closed:
/// the client closed it, a time bound passed, or shutdown began (before a
/// request's head is complete, as hyper closes it then).
async fn read_more<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    stop: &CancellationToken,
) -> bool {
    if buf.capacity() == buf.len() {
        buf.reserve(buf.len().max(4096));
    }
    tokio::select! {
        biased;
        () = stop.cancelled() => false,
        read = io.read_buf(buf) => matches!(read, Ok(n) if n > 0),
    }
}

/// What the bytes read so far hold.
#[expect(
    clippy::large_enum_variant,
    reason = "returned once per request and taken apart at once; a box would cost an allocation"
)]
enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// Not a request for here (or not a valid one: hyper says why).
    NotHere,
    /// A request for here, and the length of its head.
    Request(Request<()>, usize),
}

fn parse(buf: &[u8]) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; FAST_MAX_HEADERS];
    let mut head = httparse::Request::new(&mut fields);
    let len = match head.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::NotHere,
    };
    if head.method != Some("GET") || head.version != Some(1) {
        return Parsed::NotHere;
    }
    let Some(path) = head.path.filter(|p| p.starts_with('/')) else {
        return Parsed::NotHere;
    };
    // The head's bytes, shared by the target and the field values (as
    // hyper shares them).
    let bytes = Bytes::copy_from_slice(&buf[..len]);
    // The same bytes in `bytes` as `part` is in `buf`.
    let shared = |part: &[u8]| {
        let at = (part.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
        if at > len || part.len() > len - at {
            return Bytes::copy_from_slice(part);
        }
        bytes.slice(at..at + part.len())
    };
    let Ok(uri) = Uri::from_maybe_shared(shared(path.as_bytes())) else {
        return Parsed::NotHere;
    };
    let mut headers = HeaderMap::with_capacity(head.headers.len());
    for field in head.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(field.name.as_bytes()) else {
            return Parsed::NotHere;
        };
        if !plain_field(&name, field.value) {
            return Parsed::NotHere;
        }
        let Ok(value) = HeaderValue::from_maybe_shared(shared(field.value)) else {
            return Parsed::NotHere;
        };
        headers.append(name, value);
    }
    let mut req = Request::new(());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    // As hyper's way does (`super::respond`): one host, one `Cookie` line.
    if super::check_host(&mut req).is_err() {
        return Parsed::NotHere;
    }
    crate::proxy::headers::join_cookies(req.headers_mut());
    Parsed::Request(req, len)
}

/// May a request with this field be answered here? Not one that frames a
/// body, asks for something of the connection, or expects an interim
/// answer.
fn plain_field(name: &HeaderName, value: &[u8]) -> bool {
    use http::header;
    match *name {
        header::CONTENT_LENGTH
        | header::TRANSFER_ENCODING
        | header::UPGRADE
        | header::EXPECT
        | header::TE => false,
        // Browsers send `Connection: keep-alive` (HTTP/1.1's default).
        header::CONNECTION => value.trim_ascii().eq_ignore_ascii_case(b"keep-alive"),
        _ => name.as_str() != "http2-settings",
    }
}

/// Writes `response` as HTTP/1.1 (head, then body); true if the connection
/// may carry another request.
async fn write<S: AsyncWrite + Unpin>(
    io: &mut S,
    response: Response<Body>,
    out: &mut Vec<u8>,
) -> io::Result<bool> {
    use http::header;
    let (parts, mut body) = response.into_parts();
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut close = false;
    for (name, value) in &parts.headers {
        if name == header::CONNECTION && value.as_bytes().eq_ignore_ascii_case(b"close") {
            close = true;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        date(out);
        out.extend_from_slice(b"\r\n");
    }
    // No body for these, whatever the fields say (RFC 9110 §6.4.1).
    let bodiless = parts.status.is_informational()
        || parts.status == http::StatusCode::NO_CONTENT
        || parts.status == http::StatusCode::NOT_MODIFIED;
    let exact = http_body::Body::size_hint(&body).exact();
    let chunked = !bodiless && !parts.headers.contains_key(header::CONTENT_LENGTH) && {
        match exact {
            Some(len) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
                out.extend_from_slice(b"\r\n");
                false
            }
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                true
            }
        }
    };
    out.extend_from_slice(b"\r\n");
    if bodiless {
        io.write_all(out).await?;
        io.flush().await?;
        return Ok(!close);
    }
    // The first piece of the body goes with the head, if it is small (a
    // cached page): one write.
    let mut sent_head = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(io::Error::other)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: not sent over HTTP/1.1 here
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            let mut size = [0u8; 16];
            let size = hex(data.len(), &mut size);
            if !sent_head {
                out.extend_from_slice(size);
                out.extend_from_slice(b"\r\n");
            } else {
                io.write_all(size).await?;
                io.write_all(b"\r\n").await?;
            }
        }
        if !sent_head && data.len() <= 16 * 1024 {
            out.extend_from_slice(&data);
            if chunked {
                out.extend_from_slice(b"\r\n");
            }
            io.write_all(out).await?;
        } else {
            if !sent_head {
                io.write_all(out).await?;
            }
            io.write_all(&data).await?;
            if chunked {
                io.write_all(b"\r\n").await?;
            }
        }
        sent_head = true;
    }
    if !sent_head {
        io.write_all(out).await?;
    }
    if chunked {
        io.write_all(b"0\r\n\r\n").await?;
    }
    io.flush().await?;
    Ok(!close)
}

/// `n` in lowercase hexadecimal.
fn hex(mut n: usize, buf: &mut [u8; 16]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b"0123456789abcdef"[n % 16];
        n /= 16;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// Appends the time now as an HTTP date, formatted once per second per
/// thread (as hyper does).
fn date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static LAST: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.0 != second {
            *last = (second, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(last.1.as_bytes());
    });
}

pin_project_lite::pin_project! {
    /// A connection handed to hyper: the bytes already read come first.
    pub(super) struct Prefixed<S> {
        prefix: Bytes,
        #[pin]
        io: S,
    }
}

impl<S> Prefixed<S> {
    pub(super) fn new(prefix: Bytes, io: S) -> Self {
        Prefixed { prefix, io }
    }
}

impl<S: AsyncRead> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.io.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(raw: &str) -> Option<Request<()>> {
        match parse(raw.as_bytes()) {
            Parsed::Request(req, len) => {
                assert_eq!(len, raw.find("\r\n\r\n").expect("a head") + 4);
                Some(req)
            }
            Parsed::Partial => panic!("partial: {raw:?}"),
            Parsed::NotHere => None,
        }
    }

    /// Only a request whose meaning hyper could not read otherwise is
    /// taken here; the rest go to hyper, whole.
    #[test]
    fn only_plain_gets_are_answered_here() {
        let here = [
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /p?q=1 HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nCookie: a=1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection:  Keep-Alive \r\n\r\n",
        ];
        for raw in here {
            let req = parsed(raw).unwrap_or_else(|| panic!("not here: {raw:?}"));
            assert_eq!(req.headers()["host"], "a");
        }
        let req = parsed(here[1]).expect("here");
        assert_eq!(req.uri().path(), "/p");
        assert_eq!(req.uri().query(), Some("q=1"));
        assert_eq!(req.headers()["cookie"], "a=1");
        let elsewhere = [
            "HEAD / HTTP/1.1\r\nHost: a\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET * HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHTTP2-Settings: AAA\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n",
            "GET / HTTP/1.1\r\nHo st: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "get / HTTP/1.1\r\nHost: a\r\n\r\n",
        ];
        for raw in elsewhere {
            assert!(parsed(raw).is_none(), "answered here: {raw:?}");
        }
        let many = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            "X-A: b\r\n".repeat(FAST_MAX_HEADERS)
        );
        assert!(parsed(&many).is_none(), "too many fields for here");
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: a\r\n"),
            Parsed::Partial
        ));
    }

    #[test]
    fn hex_sizes() {
        let mut buf = [0; 16];
        assert_eq!(hex(0, &mut buf), b"0");
        assert_eq!(hex(255, &mut buf), b"ff");
        assert_eq!(hex(16 * 1024, &mut buf), b"4000");
    }
}
