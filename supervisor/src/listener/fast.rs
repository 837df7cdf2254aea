//! A shorter way through HTTP/1.1 for what a busy site is asked most: a
//! plain `GET`, answered at once when it needs no waiting (a static file, a
//! fresh cache hit) and otherwise when the app's answer comes
//! ([`Handler::answer_plain`]).
//!
//! Each connection starts here. A request is parsed with the parser hyper
//! uses (`httparse`), and only one whose meaning cannot differ between the
//! two is answered here: `GET`, HTTP/1.1, origin-form target, no body
//! framing (`Content-Length`, `Transfer-Encoding`), no `Expect`, `Upgrade`
//! or `Connection` other than `keep-alive`, one valid `Host`, at most
//! [`FAST_MAX_HEADERS`] fields. At the first request that is anything else,
//! the connection goes to hyper for the rest of its life, with every byte
//! read so far: hyper then sees exactly what it would have seen, and
//! answers or refuses it.
//!
//! While an answer is awaited, the connection is watched as hyper watches
//! it: a client that closes its end (having sent nothing more) cancels the
//! request. The connection's time bounds stay with [`TimedIo`] (they are
//! enforced on the socket, whoever reads it), and graceful shutdown closes
//! it between requests, as hyper does.

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
use super::{Handler, MAX_HEADER_BYTES, Now, Peer, Plain, Written};
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
    // The head of a written answer ([`Now::Written`]), reused (made at
    // the first one).
    let mut head = Vec::new();
    let mut answered = false;
    // Registered once per connection, not per request.
    let stopped = stop.cancelled();
    let mut stopped = std::pin::pin!(stopped);
    loop {
        if buf.is_empty() {
            // Between requests: shutdown closes the connection, as hyper
            // closes an idle one.
            let read = tokio::select! {
                biased;
                () = &mut stopped => return Left::Closed,
                read = read_more(io, &mut buf) => read,
            };
            if !read {
                return Left::Closed;
            }
        }
        let (req, len) = match parse(&buf) {
            Parsed::Partial if buf.len() < MAX_HEADER_BYTES => {
                // A head under way is read to its end (or its timeout).
                if !read_more(io, &mut buf).await {
                    return Left::Closed;
                }
                continue;
            }
            Parsed::Request(req, len) => (req, len),
            Parsed::Partial | Parsed::NotHere => return hand_over(buf, answered, stop),
        };
        head.clear();
        // The request is in flight (the drain waits for it) until its
        // answer is written.
        let in_flight = activity.begin();
        let answer = handler.answer_plain(req, peer, &mut head);
        buf.advance(len);
        answered = true;
        let written = match answer {
            Plain::Now(Now::Response(response)) => {
                write(io, response, stop.is_cancelled(), &mut buf).await
            }
            Plain::Now(Now::Written(written)) => {
                write_written(io, &mut head, written, stop.is_cancelled()).await
            }
            Plain::Later(later) => match wait(io, &mut buf, later).await {
                // (Shutdown may have begun meanwhile: then this answer
                // says it is the last.)
                Some(response) => write(io, response, stop.is_cancelled(), &mut buf).await,
                None => return Left::Closed,
            },
        };
        drop(in_flight);
        // An app's large head does not stay with an idle connection.
        if head.capacity() > 2048 {
            head = Vec::new();
        }
        match written {
            Ok(true) if !stop.is_cancelled() => {}
            _ => return Left::Closed,
        }
    }
}

/// Gives the connection to hyper, unless hyper alone would not serve what
/// is left: after answers here, an HTTP/2 preface (hyper never switches a
/// connection of HTTP/1.1 requests to HTTP/2), or a request that comes
/// once shutdown began (hyper closes a kept-alive connection then, and the
/// client retries on a new one).
fn hand_over(buf: BytesMut, answered: bool, stop: &CancellationToken) -> Left {
    if answered && (buf.starts_with(b"PRI * HTTP/2.0") || stop.is_cancelled()) {
        return Left::Closed;
    }
    Left::Hyper(buf)
}

/// The answer `later` gives, awaited as hyper awaits a service's: if the
/// client closes its end (or the connection fails) before sending anything
/// more, the request is cancelled (`None`); bytes it sends meanwhile (a
/// pipelined request) are kept for after, and end the watch.
async fn wait<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    later: impl Future<Output = Response<Body>>,
) -> Option<Response<Body>> {
    let mut later = std::pin::pin!(later);
    if buf.is_empty() {
        tokio::select! {
            biased;
            response = &mut later => return Some(response),
            read = read_more(io, buf) => {
                if !read {
                    return None;
                }
            }
        }
    }
    Some(later.await)
}

/// The body's next frame, the client watched meanwhile as [`wait`]
/// watches it: an error if it leaves first.
async fn next_frame<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    body: &mut Body,
) -> io::Result<Option<Result<http_body::Frame<Bytes>, crate::body::BoxError>>> {
    if buf.is_empty() {
        tokio::select! {
            biased;
            frame = body.frame() => return Ok(frame),
            read = read_more(io, buf) => {
                if !read {
                    return Err(io::ErrorKind::ConnectionAborted.into());
                }
            }
        }
    }
    Ok(body.frame().await)
}

/// Reads more of a request into `buf` (a head is at most
/// [`MAX_HEADER_BYTES`], so the buffer stays within twice that); false
/// when the client closed the connection or a time bound passed.
async fn read_more<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut) -> bool {
    if buf.capacity() == buf.len() {
        buf.reserve(buf.len().clamp(4096, MAX_HEADER_BYTES));
    }
    matches!(io.read_buf(buf).await, Ok(n) if n > 0)
}

/// What the bytes read so far hold.
#[expect(
    clippy::large_enum_variant,
    reason = "returned once per request and taken apart at once; a box would cost an allocation"
)]
pub(super) enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// Not a request for here (or not a valid one: hyper says why).
    NotHere,
    /// A request for here, and the length of its head.
    Request(Request<()>, usize),
}

pub(super) fn parse(buf: &[u8]) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; FAST_MAX_HEADERS];
    let mut head = httparse::Request::new(&mut fields);
    let len = match head.parse(buf) {
        // hyper refuses a longer head (431).
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEADER_BYTES => len,
        Ok(httparse::Status::Complete(_)) => return Parsed::NotHere,
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
    // Room for what the way to the app adds (`X-Forwarded-For`, `-Proto`
    // and `-Host`, `X-Request-Id`, `Accept-Encoding: identity`, a Next
    // app's `x-bext-primary`): a map that has to grow is allocated again
    // and every entry placed again (~850 instructions). Measured: five
    // slots were one short for a GET with only `Host`.
    let mut headers = HeaderMap::with_capacity(head.headers.len() + 6);
    let (mut hosts, mut cookies) = (0, 0);
    for field in head.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(field.name.as_bytes()) else {
            return Parsed::NotHere;
        };
        if !plain_field(&name, field.value) {
            return Parsed::NotHere;
        }
        if name == http::header::HOST {
            hosts += 1;
        } else if name == http::header::COOKIE {
            cookies += 1;
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
    // (With an origin-form target, `super::check_host` asks for exactly
    // one `Host` of an HTTP/1.1 request, and changes nothing.)
    if hosts != 1 {
        return Parsed::NotHere;
    }
    if cookies > 1 {
        crate::proxy::headers::join_cookies(req.headers_mut());
    }
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

/// Writes an answer whose head is in `head` (see [`Now::Written`]), then
/// logs it; true if the connection may carry another request.
async fn write_written<S: AsyncWrite + Unpin>(
    io: &mut S,
    head: &mut Vec<u8>,
    written: Written,
    closing: bool,
) -> io::Result<bool> {
    if !written.dated {
        head.extend_from_slice(b"date: ");
        date(head);
        head.extend_from_slice(b"\r\n");
    }
    if closing {
        head.extend_from_slice(b"connection: close\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let mut put = 0;
    let sent = async {
        write_all_vectored_counted(io, &mut [head, &written.body], &mut put).await?;
        io.flush().await
    }
    .await;
    // The body's bytes handed to the socket, as the access log counts
    // them on hyper's way.
    let body = put.saturating_sub(head.len()) as u64;
    written.done(body, sent.is_ok());
    sent.map(|()| !closing)
}

/// Writes `response` as HTTP/1.1 (head, then body); true if the connection
/// may carry another request. A body that ends before its
/// `Content-Length` is an error (the connection closes, as hyper closes
/// it); one that goes on is cut there. `closing`: the last answer on this
/// connection (shutdown began), which says so.
///
/// While the body has nothing to send, the client is watched as [`wait`]
/// watches it (bytes it sends go to `buf`): one that leaves ends the
/// answer, as hyper ends it, instead of at the next piece (an event stream
/// may be quiet for minutes).
async fn write<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    response: Response<Body>,
    closing: bool,
    buf: &mut BytesMut,
) -> io::Result<bool> {
    use http::header;
    // An interim answer is not an answer (a request gets one): a 500 in
    // its place, as hyper sends. One that switches protocols was not asked
    // for (no `Upgrade` comes this way). After either, what follows on the
    // connection cannot be trusted: it closes.
    let interim = response.status().is_informational();
    let response = if interim && response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        let mut refused = Response::new(crate::body::empty());
        *refused.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        refused
    } else {
        response
    };
    let (parts, mut body) = response.into_parts();
    let mut head = Vec::with_capacity(512);
    super::push_status_line(&mut head, parts.status);
    // No body for these, whatever the fields say (RFC 9110 §6.4.1).
    let bodiless = parts.status.is_informational()
        || parts.status == http::StatusCode::NO_CONTENT
        || parts.status == http::StatusCode::NOT_MODIFIED;
    let mut close = interim;
    let mut declared: Option<u64> = None;
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING {
            continue; // framed here, below
        }
        if name == header::CONNECTION {
            close |= value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        if name == header::CONTENT_LENGTH {
            if parts.status == http::StatusCode::NO_CONTENT {
                continue; // as hyper: none on a 204 (RFC 9110 §8.6)
            }
            // Digits only (`u64::from_str` also takes a `+`); written once,
            // and never two that differ (as hyper).
            let digits = value.as_bytes().trim_ascii();
            let length = std::str::from_utf8(digits)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| io::Error::other("an invalid content-length"))?;
            match declared {
                Some(seen) if seen != length => {
                    return Err(io::Error::other("two different content-lengths"));
                }
                Some(_) => continue,
                None => declared = Some(length),
            }
        }
        super::push_field(&mut head, name, value);
    }
    if closing && !close {
        head.extend_from_slice(b"connection: close\r\n");
        close = true;
    }
    if !parts.headers.contains_key(header::DATE) {
        head.extend_from_slice(b"date: ");
        date(&mut head);
        head.extend_from_slice(b"\r\n");
    }
    let chunked = !bodiless
        && declared.is_none()
        && match http_body::Body::size_hint(&body).exact() {
            Some(len) => {
                head.extend_from_slice(b"content-length: ");
                head.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
                head.extend_from_slice(b"\r\n");
                declared = Some(len);
                false
            }
            None => {
                head.extend_from_slice(b"transfer-encoding: chunked\r\n");
                true
            }
        };
    head.extend_from_slice(b"\r\n");
    if bodiless {
        io.write_all(&head).await?;
        io.flush().await?;
        return Ok(!close);
    }
    // The head goes with the first piece of the body when that is there
    // (one write for a page), else at once.
    let mut head = Some(head);
    let mut left = declared;
    let mut cut = false;
    loop {
        let ready = std::future::poll_fn(|cx| {
            Poll::Ready(http_body::Body::poll_frame(Pin::new(&mut body), cx))
        });
        let frame = match ready.await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                // (An event stream's first event may be a while.)
                if let Some(first) = head.take() {
                    io.write_all(&first).await?;
                    io.flush().await?;
                }
                next_frame(io, buf, &mut body).await?
            }
        };
        let Some(frame) = frame else {
            break;
        };
        let frame = frame.map_err(io::Error::other)?;
        let Ok(mut data) = frame.into_data() else {
            continue; // trailers: not sent over HTTP/1.1 here
        };
        if let Some(left) = &mut left {
            if data.len() as u64 > *left {
                // Longer than it said: cut, and close.
                data.truncate(*left as usize);
                cut = true;
                close = true;
            }
            *left -= data.len() as u64;
        }
        let mut size = [0u8; 18];
        let size = if chunked {
            hex_line(data.len(), &mut size)
        } else {
            &[][..]
        };
        let tail: &[u8] = if chunked { b"\r\n" } else { b"" };
        if !data.is_empty() {
            let first = head.take().unwrap_or_default();
            write_all_vectored(io, &mut [&first, size, &data, tail]).await?;
        }
        if cut {
            break;
        }
    }
    if left.is_some_and(|left| left > 0) {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the body ended before its content-length",
        ));
    }
    let first = head.take().unwrap_or_default();
    let end: &[u8] = if chunked { b"0\r\n\r\n" } else { b"" };
    write_all_vectored(io, &mut [&first, end]).await?;
    io.flush().await?;
    Ok(!close)
}

/// Writes every byte of `parts`, in as few writes as the socket takes.
async fn write_all_vectored<S: AsyncWrite + Unpin>(
    io: &mut S,
    parts: &mut [&[u8]],
) -> io::Result<()> {
    write_all_vectored_counted(io, parts, &mut 0).await
}

/// [`write_all_vectored`], adding the bytes written to `put` as it goes
/// (an error may come after some).
async fn write_all_vectored_counted<S: AsyncWrite + Unpin>(
    io: &mut S,
    parts: &mut [&[u8]],
    put: &mut usize,
) -> io::Result<()> {
    let mut parts: &mut [&[u8]] = parts;
    loop {
        while parts.first().is_some_and(|p| p.is_empty()) {
            parts = &mut parts[1..];
        }
        if parts.is_empty() {
            return Ok(());
        }
        let mut slices = [io::IoSlice::new(&[]); 4];
        for (slice, part) in slices.iter_mut().zip(parts.iter()) {
            *slice = io::IoSlice::new(part);
        }
        let mut n = io
            .write_vectored(&slices[..parts.len().min(slices.len())])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        *put += n;
        for part in parts.iter_mut() {
            let taken = n.min(part.len());
            *part = &part[taken..];
            n -= taken;
            if n == 0 {
                break;
            }
        }
    }
}

/// A chunk's size line: `n` in lowercase hexadecimal and CRLF.
fn hex_line(n: usize, buf: &mut [u8; 18]) -> &[u8] {
    buf[16] = b'\r';
    buf[17] = b'\n';
    let mut at = 16;
    let mut n = n;
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
        if !this.prefix.is_empty() && buf.remaining() > 0 {
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

    /// A body of these pieces whose length is not known up front, or is
    /// `claimed`.
    fn streamed(pieces: &[&'static str], claimed: Option<u64>) -> Response<Body> {
        use http_body_util::StreamBody;
        let frames = pieces
            .iter()
            .map(|p| {
                Ok::<_, crate::body::BoxError>(http_body::Frame::data(Bytes::from_static(
                    p.as_bytes(),
                )))
            })
            .collect::<Vec<_>>();
        let body = crate::body::boxed(StreamBody::new(futures_util::stream::iter(frames)));
        let mut response = Response::new(body);
        if let Some(len) = claimed {
            response
                .headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        response
    }

    /// A client that sends nothing and takes every byte written, or (a
    /// trickle) one byte per write.
    struct Sink {
        out: Vec<u8>,
        trickle: bool,
    }

    impl AsyncRead for Sink {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            _buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Sink {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = if self.trickle {
                buf.len().min(1)
            } else {
                buf.len()
            };
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    async fn written(response: Response<Body>) -> (io::Result<bool>, String) {
        let mut out = Sink {
            out: Vec::new(),
            trickle: false,
        };
        let result = write(&mut out, response, false, &mut BytesMut::new()).await;
        (result, String::from_utf8_lossy(&out.out).into_owned())
    }

    /// Bodies are framed as hyper frames them: by their length when it is
    /// known, else chunked; a body shorter than its `Content-Length` closes
    /// the connection, a longer one is cut there; a 204 has no length.
    #[tokio::test]
    async fn answers_are_framed_as_hyper_frames_them() {
        let (result, text) = written(Response::new(crate::body::full("hello"))).await;
        assert!(result.expect("written"), "kept alive");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("\r\ndate: "), "{text}");
        assert!(text.ends_with("content-length: 5\r\n\r\nhello"), "{text}");

        let (result, text) = written(streamed(&["ab", "", "cde"], None)).await;
        assert!(result.expect("written"));
        assert!(
            text.ends_with("transfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"),
            "{text}"
        );

        let (result, text) = written(streamed(&["ab", "cd"], Some(4))).await;
        assert!(result.expect("written"));
        assert!(text.contains("\r\ncontent-length: 4\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nabcd"), "{text}");

        let (result, _) = written(streamed(&["ab"], Some(4))).await;
        assert!(
            result.is_err(),
            "short of its length: the connection closes"
        );

        let (result, text) = written(streamed(&["ab", "cdef", "gh"], Some(3))).await;
        assert!(!result.expect("written"), "cut, and closed");
        assert!(text.contains("\r\ncontent-length: 3\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nabc"), "{text}");

        let mut no_content = streamed(&[], Some(0));
        *no_content.status_mut() = http::StatusCode::NO_CONTENT;
        let (result, text) = written(no_content).await;
        assert!(result.expect("written"));
        assert!(!text.contains("content-length"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");

        let mut closing = Response::new(crate::body::full("x"));
        closing.headers_mut().insert(
            http::header::CONNECTION,
            HeaderValue::from_static("foo, Close"),
        );
        let (result, _) = written(closing).await;
        assert!(!result.expect("written"), "the answer asked to close");
    }

    /// Partial writes resume where they stopped, across the pieces; an
    /// answer written at shutdown says it closes the connection; a body cut
    /// at its length is not polled on.
    #[tokio::test]
    async fn partial_writes_closing_answers_and_cut_bodies() {
        let mut trickle = Sink {
            out: Vec::new(),
            trickle: true,
        };
        let kept = write(
            &mut trickle,
            streamed(&["ab", "cde"], None),
            true,
            &mut BytesMut::new(),
        )
        .await
        .expect("written");
        assert!(!kept, "closing");
        let text = String::from_utf8(trickle.out).expect("text");
        assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
        assert!(
            text.ends_with("\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"),
            "{text}"
        );

        // A body that never ends, past its length: cut, and not waited on.
        use http_body_util::StreamBody;
        let endless = futures_util::stream::iter(std::iter::repeat_with(|| {
            Ok::<_, crate::body::BoxError>(http_body::Frame::data(Bytes::from_static(b"xy")))
        }));
        let mut response = Response::new(crate::body::boxed(StreamBody::new(endless)));
        response
            .headers_mut()
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(4u64));
        let (result, text) =
            tokio::time::timeout(std::time::Duration::from_secs(10), written(response))
                .await
                .expect("the body was not polled on past its length");
        assert!(!result.expect("written"), "cut, and closed");
        assert!(text.ends_with("\r\n\r\nxyxy"), "{text}");
    }

    /// A body fed from a channel: a frame whenever the test sends one.
    fn fed() -> (tokio::sync::mpsc::Sender<&'static str>, Body) {
        use http_body_util::StreamBody;
        let (tx, rx) = tokio::sync::mpsc::channel::<&'static str>(4);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            let piece = rx.recv().await?;
            let frame = http_body::Frame::data(Bytes::from_static(piece.as_bytes()));
            Some((Ok::<_, crate::body::BoxError>(frame), rx))
        });
        (tx, crate::body::boxed(StreamBody::new(frames)))
    }

    /// Reads from `from` until `want` has come, within 10 s.
    async fn read_until<R: AsyncRead + Unpin>(from: &mut R, seen: &mut Vec<u8>, want: &[u8]) {
        let deadline = std::time::Duration::from_secs(10);
        tokio::time::timeout(deadline, async {
            while !seen.windows(want.len()).any(|w| w == want) {
                let mut chunk = [0u8; 1024];
                let n = from.read(&mut chunk).await.expect("read");
                assert!(n > 0, "closed before {want:?}: {seen:?}");
                seen.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{want:?} never came: {:?}", String::from_utf8_lossy(seen)));
    }

    /// A head whose body has nothing yet goes at once (an event stream's
    /// first event may be a while), and each piece as it comes.
    #[tokio::test]
    async fn a_head_goes_before_a_body_that_is_not_there_yet() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let (tx, body) = fed();
        let writing = tokio::spawn(async move {
            write(
                &mut server,
                Response::new(body),
                false,
                &mut BytesMut::new(),
            )
            .await
        });
        let mut seen = Vec::new();
        read_until(
            &mut client,
            &mut seen,
            b"transfer-encoding: chunked\r\n\r\n",
        )
        .await;
        assert!(seen.ends_with(b"\r\n\r\n"), "only the head so far");
        tx.send("event 1").await.expect("send");
        read_until(&mut client, &mut seen, b"7\r\nevent 1\r\n").await;
        drop(tx);
        read_until(&mut client, &mut seen, b"0\r\n\r\n").await;
        assert!(writing.await.expect("task").expect("written"), "kept alive");
    }

    /// An answer that switches protocols (no `Upgrade` comes this way)
    /// ends the connection; a `Transfer-Encoding` of the answer's own is
    /// not sent beside the framing chosen here.
    #[tokio::test]
    async fn a_switch_closes_and_the_framing_is_chosen_here() {
        let mut switching = Response::new(crate::body::empty());
        *switching.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        let (result, text) = written(switching).await;
        assert!(!result.expect("written"), "closed after a 101");
        assert!(text.starts_with("HTTP/1.1 101 "), "{text}");

        let mut claimed = Response::new(crate::body::full("abc"));
        claimed.headers_mut().insert(
            http::header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        let (result, text) = written(claimed).await;
        assert!(result.expect("written"));
        assert!(!text.contains("transfer-encoding"), "{text}");
        assert!(text.ends_with("content-length: 3\r\n\r\nabc"), "{text}");
    }

    /// Polls `f` once.
    async fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *f).poll(cx))).await
    }

    /// An answer that comes only once `done` is sent.
    async fn answer_when(done: tokio::sync::oneshot::Receiver<()>) -> Response<Body> {
        let _ = done.await;
        Response::new(crate::body::full("late"))
    }

    /// While an answer is awaited: a client that closes its end cancels
    /// it; one that sends more (a pipelined request) waits for it, and what
    /// it sent is kept.
    #[tokio::test]
    async fn an_awaited_answer_is_cancelled_when_the_client_leaves() {
        let (client, mut server) = tokio::io::duplex(1024);
        let (_done, done_rx) = tokio::sync::oneshot::channel::<()>();
        drop(client);
        let mut buf = BytesMut::new();
        let answer = wait(&mut server, &mut buf, answer_when(done_rx)).await;
        assert!(answer.is_none(), "cancelled");

        let (mut client, mut server) = tokio::io::duplex(1024);
        let (done, done_rx) = tokio::sync::oneshot::channel::<()>();
        client
            .write_all(b"GET /next HTTP/1.1\r\n")
            .await
            .expect("write");
        drop(client); // (after sending more: no longer watched)
        let mut buf = BytesMut::new();
        let mut waiting = Box::pin(wait(&mut server, &mut buf, answer_when(done_rx)));
        assert!(
            poll_once(&mut waiting).await.is_pending(),
            "still waiting for the answer"
        );
        done.send(()).expect("send");
        assert!(waiting.await.is_some(), "answered");
        assert_eq!(
            &buf[..],
            b"GET /next HTTP/1.1\r\n",
            "the pipelined bytes are kept"
        );
    }

    /// A client that leaves while a streamed answer has nothing to send
    /// ends it at once, not at its next piece.
    #[tokio::test]
    async fn a_streamed_answer_ends_when_the_client_leaves() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let (_tx, body) = fed();
        let mut buf = BytesMut::new();
        let mut writing = Box::pin(write(&mut server, Response::new(body), false, &mut buf));
        assert!(
            poll_once(&mut writing).await.is_pending(),
            "the body has nothing yet"
        );
        let mut seen = Vec::new();
        read_until(&mut client, &mut seen, b"\r\n\r\n").await;
        drop(client);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), writing)
            .await
            .expect("the answer went on after the client left");
        assert!(ended.is_err(), "ended as failed");
    }

    /// The fields that frame an answer are checked as hyper checks them:
    /// an interim status is a 500 and closes the connection, one `Content-Length` is
    /// written however often it is given, and two that differ (or one
    /// that is not digits) are refused.
    #[tokio::test]
    async fn framing_fields_are_checked() {
        let mut interim = Response::new(crate::body::empty());
        *interim.status_mut() = http::StatusCode::CONTINUE;
        let (result, text) = written(interim).await;
        assert!(!result.expect("written"), "closed after an interim status");
        assert!(
            text.starts_with("HTTP/1.1 500 "),
            "a 500 in its place: {text}"
        );

        let mut twice = Response::new(crate::body::full("abc"));
        for _ in 0..2 {
            twice
                .headers_mut()
                .append(http::header::CONTENT_LENGTH, HeaderValue::from(3u64));
        }
        let (result, text) = written(twice).await;
        assert!(result.expect("written"));
        assert_eq!(text.matches("content-length").count(), 1, "{text}");

        for lengths in [&["3", "4"][..], &["+3"], &["3 3"], &[""]] {
            let mut odd = Response::new(crate::body::full("abc"));
            for length in lengths {
                odd.headers_mut().append(
                    http::header::CONTENT_LENGTH,
                    HeaderValue::from_static(length),
                );
            }
            let (result, text) = written(odd).await;
            assert!(result.is_err(), "{lengths:?} refused");
            assert!(text.is_empty(), "{lengths:?}: nothing written: {text}");
        }
    }

    #[test]
    fn chunk_size_lines() {
        let mut buf = [0; 18];
        assert_eq!(hex_line(0, &mut buf), b"0\r\n");
        assert_eq!(hex_line(255, &mut buf), b"ff\r\n");
        assert_eq!(hex_line(16 * 1024, &mut buf), b"4000\r\n");
        assert_eq!(hex_line(usize::MAX, &mut buf), b"ffffffffffffffff\r\n");
    }
}
