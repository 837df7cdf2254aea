//! The HTTP/1.1 wire format between bext and its workers: request heads
//! out, response heads and bodies in.
//!
//! bext's client side of HTTP/1.1 is its own rather than hyper's client,
//! because hyper's runs every connection as a task of its own and hands the
//! request, the response head and each body chunk across channels: 8.6k of
//! the 37.9k user-space instructions of a proxied request (measured with
//! bench/proxy-instructions.sh, see bench/RESULTS.md, session 9). The
//! parsing itself is `httparse`, the parser hyper uses; this module only
//! decides framing, as RFC 9112 §6 says, and decodes chunked bodies.
//!
//! Hop-by-hop response headers (RFC 9110 §7.6.1) are dropped while the head
//! is parsed, so the proxy need not look for them again; the names are
//! those of `proxy::headers::HOP_BY_HOP`, which strips requests (matched
//! here inline, in the one pass over the header lines).

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

/// Largest response head accepted from a worker.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header lines accepted in a response head (as hyper).
const MAX_HEADERS: usize = 100;

/// Why a worker's response could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("malformed response head: {0}")]
    Head(httparse::Error),
    #[error("response head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("invalid header {0:?}")]
    Header(String),
    #[error("invalid or conflicting Content-Length")]
    ContentLength,
    #[error("malformed chunked body")]
    Chunk,
    #[error("101 Switching Protocols to a request that asked for no upgrade")]
    UnrequestedUpgrade,
}

/// How a request body is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    Empty,
    Length(u64),
    Chunked,
}

impl RequestFraming {
    /// The framing for a body that is known to be empty, of exactly `len`
    /// bytes, or of unknown length.
    pub fn for_body(end_stream: bool, exact: Option<u64>) -> Self {
        match (end_stream, exact) {
            (true, _) | (false, Some(0)) => RequestFraming::Empty,
            (false, Some(len)) => RequestFraming::Length(len),
            (false, None) => RequestFraming::Chunked,
        }
    }
}

/// Writes the request line and headers. The caller has already removed
/// hop-by-hop headers; `Content-Length` and `Transfer-Encoding` are written
/// from `framing`, whatever `headers` says.
pub fn encode_request(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    framing: RequestFraming,
    out: &mut BytesMut,
) {
    out.reserve(64 + target.len() + headers.len() * 40);
    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        // RFC 9110 §8.6: a request whose method defines a body says so even
        // when it is empty.
        RequestFraming::Empty => {
            if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
        }
        RequestFraming::Length(len) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// The size line of one chunk of `len` bytes.
pub fn chunk_size_line(len: usize) -> Bytes {
    Bytes::from(format!("{len:x}\r\n"))
}

/// The end of a chunked body (no trailers).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body (HEAD, 1xx, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the worker closes the connection.
    Close,
    /// 101: the connection now belongs to the upgraded protocol.
    Upgrade,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: ResponseFraming,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
}

impl ResponseHead {
    /// An interim (1xx) response other than 101, to be skipped.
    pub fn is_interim(&self) -> bool {
        self.status.is_informational() && self.status != StatusCode::SWITCHING_PROTOCOLS
    }
}

/// Headers bext may add to a worker's response before it leaves.
const RESPONSE_HEADROOM: usize = 6;

/// Parses one response head from the front of `buf`, removing it; `None`
/// if the head is not complete yet.
pub fn parse_response(
    buf: &mut BytesMut,
    request_method: &Method,
) -> Result<Option<ResponseHead>, ParseError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut slots,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(ParseError::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ParseError::Head(e)),
    };
    let status = StatusCode::from_u16(response.code.unwrap_or(0))
        .map_err(|_| ParseError::Head(httparse::Error::Status))?;
    let version = if response.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Where each kept header's name and value sit in the head, so that the
    // values can share the head's bytes instead of being copied.
    let base = buf.as_ptr() as usize;
    let mut spans: Vec<(HeaderName, usize, usize)> = Vec::with_capacity(response.headers.len());
    let (mut said_close, mut said_keep_alive) = (false, false);
    let mut connection_names: Vec<HeaderName> = Vec::new();
    let mut chunked = None;
    let mut content_length: Option<u64> = None;
    let mut upgrade = false;
    for h in response.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| ParseError::Header(h.name.to_owned()))?;
        match name.as_str() {
            "connection" => {
                for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        said_close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        said_keep_alive = true;
                    } else if let Ok(named) = HeaderName::from_bytes(token) {
                        connection_names.push(named);
                    }
                }
                continue;
            }
            "transfer-encoding" => {
                // Only the last coding decides (RFC 9112 §6.3).
                let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                continue;
            }
            "content-length" => {
                // Digits only: `u64::from_str` also takes a leading `+`.
                let digits = h.value.trim_ascii();
                let value = std::str::from_utf8(digits)
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or(ParseError::ContentLength)?;
                if content_length.is_some_and(|seen| seen != value) {
                    return Err(ParseError::ContentLength);
                }
                content_length = Some(value);
            }
            "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer" => continue,
            "upgrade" => {
                upgrade = true;
                if status != StatusCode::SWITCHING_PROTOCOLS {
                    continue;
                }
            }
            _ => {}
        }
        let start = h.value.as_ptr() as usize - base;
        spans.push((name, start, start + h.value.len()));
    }
    let head = buf.split_to(len).freeze();
    // Room for what bext adds on the way out (`Cache-Status`,
    // `X-Bext-Cache`, `X-Request-Id`, `Vary`…): a map that has to grow
    // on the way is allocated again and every entry placed again.
    let mut headers = HeaderMap::with_capacity(spans.len() + RESPONSE_HEADROOM);
    for (name, start, end) in spans {
        let value = HeaderValue::from_maybe_shared(head.slice(start..end))
            .map_err(|_| ParseError::Header(name.as_str().to_owned()))?;
        headers.append(name, value);
    }
    for name in connection_names {
        if !(upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }

    let framing = if status == StatusCode::SWITCHING_PROTOCOLS {
        ResponseFraming::Upgrade
    } else if *request_method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        ResponseFraming::Empty
    } else if let Some(chunked) = chunked {
        // Transfer-Encoding overrides Content-Length, which must then go.
        headers.remove(header::CONTENT_LENGTH);
        if chunked {
            ResponseFraming::Chunked
        } else {
            ResponseFraming::Close
        }
    } else if let Some(len) = content_length {
        ResponseFraming::Length(len)
    } else {
        ResponseFraming::Close
    };
    // HTTP/1.0 closes after each response unless it says otherwise; framing
    // that RFC 9112 §6.1 calls faulty (Transfer-Encoding beside
    // Content-Length, or in HTTP/1.0) is read, and the connection not reused.
    let faulty = chunked.is_some() && (content_length.is_some() || version == Version::HTTP_10);
    let close = said_close || faulty || (version == Version::HTTP_10 && !said_keep_alive);
    let keep_alive = !close && !matches!(framing, ResponseFraming::Close);
    Ok(Some(ResponseHead {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

/// Decodes a chunked body as its bytes arrive.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum ChunkedDecoder {
    /// Before a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines, then an empty line.
    Trailers,
    Done,
}

/// What [`ChunkedDecoder::decode`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// More bytes are needed.
    Incomplete,
    /// The body is complete; anything after it is still in the buffer.
    End,
}

/// Trailer lines longer than this are refused.
const MAX_TRAILERS: usize = 16 * 1024;

impl ChunkedDecoder {
    /// Consumes from `buf` as far as the next piece of data, or the end.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ParseError> {
        loop {
            match *self {
                // httparse reads a size line with no digits as 0 (the
                // last chunk), which would end a broken body early.
                ChunkedDecoder::Size if buf.is_empty() => return Ok(Decoded::Incomplete),
                ChunkedDecoder::Size if !buf[0].is_ascii_hexdigit() => {
                    return Err(ParseError::Chunk);
                }
                ChunkedDecoder::Size => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        *self = if size == 0 {
                            ChunkedDecoder::Trailers
                        } else {
                            ChunkedDecoder::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILERS => {
                        return Err(ParseError::Chunk);
                    }
                    Ok(httparse::Status::Partial) => return Ok(Decoded::Incomplete),
                    Err(_) => return Err(ParseError::Chunk),
                },
                ChunkedDecoder::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::Incomplete);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let left = left - take as u64;
                    *self = if left == 0 {
                        ChunkedDecoder::DataEnd
                    } else {
                        ChunkedDecoder::Data(left)
                    };
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                ChunkedDecoder::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::Incomplete);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ParseError::Chunk);
                    }
                    buf.advance(2);
                    *self = ChunkedDecoder::Size;
                }
                ChunkedDecoder::Trailers => {
                    // Trailers are read and dropped.
                    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
                        if buf.len() > MAX_TRAILERS {
                            return Err(ParseError::Chunk);
                        }
                        return Ok(Decoded::Incomplete);
                    };
                    buf.advance(eol + 2);
                    if eol == 0 {
                        *self = ChunkedDecoder::Done;
                    }
                }
                ChunkedDecoder::Done => return Ok(Decoded::End),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str, method: &Method) -> Result<Option<ResponseHead>, ParseError> {
        parse_response(&mut BytesMut::from(text), method)
    }

    fn complete(text: &str) -> ResponseHead {
        head(text, &Method::GET).expect("parses").expect("complete")
    }

    #[test]
    fn request_head_carries_framing_from_the_body_not_the_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("a.test"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        let mut out = BytesMut::new();
        encode_request(
            &Method::POST,
            "/up?x=1",
            &headers,
            RequestFraming::Chunked,
            &mut out,
        );
        assert_eq!(
            &out[..],
            b"POST /up?x=1 HTTP/1.1\r\nhost: a.test\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        out.clear();
        encode_request(
            &Method::PUT,
            "/",
            &HeaderMap::new(),
            RequestFraming::Empty,
            &mut out,
        );
        assert_eq!(&out[..], b"PUT / HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
        out.clear();
        encode_request(
            &Method::GET,
            "/",
            &HeaderMap::new(),
            RequestFraming::Length(12),
            &mut out,
        );
        assert_eq!(&out[..], b"GET / HTTP/1.1\r\ncontent-length: 12\r\n\r\n");
        assert_eq!(
            RequestFraming::for_body(true, Some(0)),
            RequestFraming::Empty
        );
        assert_eq!(
            RequestFraming::for_body(false, Some(0)),
            RequestFraming::Empty
        );
        assert_eq!(
            RequestFraming::for_body(false, None),
            RequestFraming::Chunked
        );
    }

    #[test]
    fn a_partial_head_asks_for_more_and_leaves_the_buffer() {
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\nContent-Len");
        assert!(matches!(parse_response(&mut buf, &Method::GET), Ok(None)));
        assert_eq!(&buf[..], b"HTTP/1.1 200 OK\r\nContent-Len");
    }

    #[test]
    fn node_response_keeps_its_headers_and_drops_hop_by_hop_ones() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: keep-alive\r\n\
             Keep-Alive: timeout=5\r\nContent-Length: 11\r\n\r\nHello Hono!",
        );
        let head = parse_response(&mut buf, &Method::GET)
            .expect("parses")
            .expect("complete");
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.framing, ResponseFraming::Length(11));
        assert!(head.keep_alive);
        assert_eq!(head.headers.len(), 2);
        assert_eq!(head.headers[header::CONTENT_TYPE], "text/plain");
        assert_eq!(head.headers[header::CONTENT_LENGTH], "11");
        assert_eq!(&buf[..], b"Hello Hono!");
    }

    #[test]
    fn connection_names_headers_that_are_removed() {
        let head = complete(
            "HTTP/1.1 200 OK\r\nConnection: close, x-secret\r\nX-Secret: 1\r\n\
             X-Kept: 2\r\nContent-Length: 0\r\n\r\n",
        );
        assert!(!head.keep_alive);
        assert!(!head.headers.contains_key("x-secret"));
        assert_eq!(head.headers["x-kept"], "2");
        assert!(!head.headers.contains_key(header::CONNECTION));
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let chunked =
            complete("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(chunked.framing, ResponseFraming::Chunked);
        assert!(!chunked.headers.contains_key(header::CONTENT_LENGTH));
        assert!(!chunked.headers.contains_key(header::TRANSFER_ENCODING));
        assert!(!chunked.keep_alive, "faulty framing: not reused");
        let plain_chunked = complete("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(plain_chunked.keep_alive);
        let old_chunked = complete(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(old_chunked.framing, ResponseFraming::Chunked);
        assert!(!old_chunked.keep_alive, "chunked in HTTP/1.0: not reused");

        let gzip_only = complete("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert_eq!(gzip_only.framing, ResponseFraming::Close);
        assert!(!gzip_only.keep_alive);

        let unframed = complete("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(unframed.framing, ResponseFraming::Close);
        assert!(!unframed.keep_alive);

        for status in ["204 No Content", "304 Not Modified"] {
            let text = format!("HTTP/1.1 {status}\r\nContent-Length: 10\r\n\r\n");
            assert_eq!(complete(&text).framing, ResponseFraming::Empty);
        }
        let to_head = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
            &Method::HEAD,
        )
        .expect("parses")
        .expect("complete");
        assert_eq!(to_head.framing, ResponseFraming::Empty);
        assert_eq!(to_head.headers[header::CONTENT_LENGTH], "10");

        let interim = complete("HTTP/1.1 100 Continue\r\n\r\n");
        assert!(interim.is_interim());
        assert_eq!(interim.framing, ResponseFraming::Empty);

        let upgrade = complete(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        );
        assert_eq!(upgrade.framing, ResponseFraming::Upgrade);
        assert!(!upgrade.is_interim());
        assert_eq!(upgrade.headers[header::UPGRADE], "websocket");
    }

    #[test]
    fn http_1_0_closes_unless_it_asks_to_keep_alive() {
        let plain = complete("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert!(!plain.keep_alive);
        assert_eq!(plain.version, Version::HTTP_10);
        let kept =
            complete("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n");
        assert!(kept.keep_alive);
    }

    #[test]
    fn bad_heads_are_errors() {
        for text in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1e3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
        ] {
            assert_eq!(
                head(text, &Method::GET).err(),
                Some(ParseError::ContentLength),
                "{text:?}"
            );
        }
        assert!(matches!(
            head("HTTP/1.1 abc OK\r\n\r\n", &Method::GET),
            Err(ParseError::Head(_))
        ));
        assert!(matches!(
            head("garbage\r\n\r\n", &Method::GET),
            Err(ParseError::Head(_))
        ));
        let huge = format!("HTTP/1.1 200 OK\r\nX-Big: {}", "a".repeat(MAX_HEAD + 1));
        assert_eq!(head(&huge, &Method::GET).err(), Some(ParseError::TooLarge));
        let same_twice =
            complete("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(same_twice.framing, ResponseFraming::Length(5));
    }

    /// Feeds `wire` to a decoder in pieces of `step` bytes.
    fn decode_in_steps(wire: &[u8], step: usize) -> Result<(Vec<u8>, BytesMut), ParseError> {
        let mut decoder = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::End => return Ok((body, buf)),
                Decoded::Incomplete => {
                    assert!(fed < wire.len(), "ran out of input");
                    let end = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let wire = b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        for step in 1..wire.len() {
            let (body, rest) = decode_in_steps(wire, step).expect("decodes");
            assert_eq!(body, b"hello world!", "step {step}");
            // Bytes after the body stay for whoever reads next.
            assert!(b"NEXT".starts_with(&rest), "step {step}");
        }
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for wire in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"fffffffffffffffff\r\n",
            // No digits is not a last chunk.
            b"5\r\nhello\r\n\r\n5\r\nworld\r\n0\r\n\r\n",
            b"5\r\nhello\r\n;x\r\n0\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(wire);
            let mut decoder = ChunkedDecoder::default();
            let mut result = decoder.decode(&mut buf);
            while let Ok(Decoded::Data(_)) = result {
                result = decoder.decode(&mut buf);
            }
            assert_eq!(result, Err(ParseError::Chunk), "{wire:?}");
        }
    }
}
