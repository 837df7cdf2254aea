//! The moving parts of one request on a worker connection: the request body
//! going out ([`RequestPump`]) while the response comes in
//! ([`UpstreamBody`]).
//!
//! Both directions are driven together, as hyper's client does: a worker
//! may answer before it has read the whole request (`req.pipe(res)`, or an
//! early 413), and stop reading until its answer is read. So the request
//! body is written by a non-blocking state machine, polled by the exchange
//! while the response head is awaited and, if the head arrives first, by
//! the response body as it is read.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::UnixStream;
use tokio::time::Instant;

use super::h1::{self, ChunkedDecoder, Decoded, RequestFraming};
use super::upstream::{Conn, Inner};
use crate::body::{Body, BoxError};

/// Reads of a response body ask for at least this much room.
const BODY_READ: usize = 32 * 1024;

/// Why a request body could not be sent.
#[derive(Debug)]
pub(super) enum PumpError {
    /// The worker's end failed (it may still have answered).
    Write(io::Error),
    /// The client's body failed.
    Body(BoxError),
    /// The body's length differs from the one it declared.
    Length,
}

/// A request body being written to the worker, framed as its head said.
#[derive(Debug)]
pub(super) struct RequestPump {
    body: Body,
    chunked: bool,
    /// Bytes still due under a `Content-Length`.
    left: Option<u64>,
    /// Framed bytes not written yet, in order.
    out: VecDeque<Bytes>,
    /// The body has ended (its last bytes may still be in `out`).
    ended: bool,
    /// Bytes written so far, framing included.
    sent: u64,
}

impl RequestPump {
    pub(super) fn new(body: Body, framing: RequestFraming) -> Self {
        RequestPump {
            body,
            chunked: framing == RequestFraming::Chunked,
            left: match framing {
                RequestFraming::Length(len) => Some(len),
                _ => None,
            },
            out: VecDeque::new(),
            ended: false,
            sent: 0,
        }
    }

    /// Bytes written so far (progress, for the inactivity timer).
    pub(super) fn sent(&self) -> u64 {
        self.sent
    }

    /// Every byte of the body has been written.
    pub(super) fn is_finished(&self) -> bool {
        self.ended && self.out.is_empty()
    }

    /// Writes as much of the body as the client and the socket allow.
    pub(super) fn poll_send(
        &mut self,
        io: &mut UnixStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), PumpError>> {
        loop {
            while !self.out.is_empty() {
                let mut slices = [IoSlice::new(&[]); 4];
                let mut count = 0;
                for (slice, bytes) in slices.iter_mut().zip(&self.out) {
                    *slice = IoSlice::new(bytes);
                    count += 1;
                }
                let written = Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count]);
                let mut written = match written {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(PumpError::Write(io::ErrorKind::WriteZero.into())));
                    }
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpError::Write(e))),
                };
                self.sent += written as u64;
                while written > 0 {
                    let Some(front) = self.out.front_mut() else {
                        break;
                    };
                    if front.len() <= written {
                        written -= front.len();
                        self.out.pop_front();
                    } else {
                        front.advance(written);
                        written = 0;
                    }
                }
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    if self.left.is_some_and(|left| left > 0) {
                        return Poll::Ready(Err(PumpError::Length));
                    }
                    if self.chunked {
                        self.out.push_back(Bytes::from_static(h1::LAST_CHUNK));
                    }
                    self.ended = true;
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(PumpError::Body(e))),
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers are dropped.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if let Some(left) = &mut self.left {
                        match left.checked_sub(data.len() as u64) {
                            Some(rest) => *left = rest,
                            None => return Poll::Ready(Err(PumpError::Length)),
                        }
                    }
                    if self.chunked {
                        self.out.push_back(h1::chunk_size_line(data.len()));
                        self.out.push_back(data);
                        self.out.push_back(Bytes::from_static(b"\r\n"));
                    } else {
                        self.out.push_back(data);
                    }
                    // Ended as soon as it is known to be, not when the
                    // client's next frame says so (an HTTP/2 END_STREAM may
                    // come later): the connection is reusable once the
                    // response ends.
                    if self.left == Some(0) || self.body.is_end_stream() {
                        if self.chunked {
                            self.out.push_back(Bytes::from_static(h1::LAST_CHUNK));
                        }
                        self.ended = true;
                    }
                }
            }
        }
    }
}

/// Where a response body stands.
#[derive(Debug)]
pub(super) enum Reading {
    Length(u64),
    Chunked(ChunkedDecoder),
    Close,
    Done,
    /// The connection belongs to an upgraded protocol.
    Upgrade,
}

/// A worker's response body; gives its connection back to the pool once
/// read to the end, if the request was written to the end too (a body
/// dropped half-way closes the connection).
#[derive(Debug)]
pub struct UpstreamBody {
    pub(super) conn: Option<Conn>,
    pub(super) reading: Reading,
    pub(super) keep_alive: bool,
    /// The rest of the request body, when the worker answered first.
    pub(super) pump: Option<RequestPump>,
    /// The longest time without progress: between two reads of the body
    /// (nginx's `proxy_read_timeout`), or, while `pump` runs, either way
    /// (on the connection's timer).
    pub(super) timeout: Duration,
    /// The last progress: the head, a read of the body, or a write of the
    /// rest of the request. The timer is moved to `progress + timeout` only
    /// when it fires, so a read costs a clock read, not a timer reset.
    pub(super) progress: Instant,
    pub(super) pool: Arc<Inner>,
    /// The idle list it came from.
    pub(super) slot: usize,
}

impl UpstreamBody {
    /// For an accepted upgrade (101): the connection, and whatever the
    /// worker already sent on it after the head.
    pub fn into_upgraded(mut self) -> Option<(UnixStream, bytes::BytesMut)> {
        match self.reading {
            Reading::Upgrade => self.conn.take().map(|conn| (conn.io, conn.buf)),
            _ => None,
        }
    }

    /// The body is complete: the connection goes back to the pool if it
    /// can carry another request.
    pub(super) fn finish(&mut self) {
        self.reading = Reading::Done;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && self.pump.is_none()
            && conn.buf.is_empty()
        {
            self.pool.checkin(self.slot, conn);
        }
        self.pump = None;
    }

    /// The exchange is over and its connection cannot be reused: closed.
    fn close(&mut self) {
        self.reading = Reading::Done;
        self.conn = None;
        self.pump = None;
    }

    /// The body failed: the connection is closed.
    fn fail(&mut self, error: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.close();
        Poll::Ready(Some(Err(error.into())))
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if let Some(pump) = this.pump.as_mut() {
                let before = pump.sent();
                let polled = pump.poll_send(&mut conn.io, cx);
                if pump.sent() > before {
                    this.progress = Instant::now();
                }
                match polled {
                    Poll::Pending => {}
                    Poll::Ready(Ok(())) => this.pump = None,
                    // The worker has answered; the rest of the request is
                    // moot, but the connection is in no state to reuse.
                    Poll::Ready(Err(_)) => {
                        this.pump = None;
                        this.keep_alive = false;
                    }
                }
            }
            let data = match &mut this.reading {
                Reading::Length(left) => (!conn.buf.is_empty()).then(|| {
                    let take = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(conn.buf.len());
                    *left -= take as u64;
                    conn.buf.split_to(take).freeze()
                }),
                Reading::Chunked(decoder) => match decoder.decode(&mut conn.buf) {
                    Ok(Decoded::Data(data)) => Some(data),
                    Ok(Decoded::Incomplete) => None,
                    Ok(Decoded::End) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Err(e) => return this.fail(e),
                },
                Reading::Close => (!conn.buf.is_empty()).then(|| conn.buf.split().freeze()),
                Reading::Done | Reading::Upgrade => return Poll::Ready(None),
            };
            if let Some(data) = data {
                if matches!(this.reading, Reading::Length(0)) {
                    this.finish();
                }
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if conn.buf.capacity() - conn.buf.len() < 4096 {
                conn.buf.reserve(BODY_READ);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf) {
                // A worker that stalled mid-body, or stuck both ways: a
                // client that stopped sending to a worker that waits for it.
                Poll::Pending => {
                    if conn.timer.as_mut().poll(cx).is_ready() {
                        let due = this.progress + this.timeout;
                        if due > Instant::now() {
                            conn.timer.as_mut().reset(due);
                            // Registers the waker for the new deadline.
                            let _ = conn.timer.as_mut().poll(cx);
                        } else {
                            return this.fail(io::Error::new(
                                io::ErrorKind::TimedOut,
                                format!("no progress on the response body for {:?}", this.timeout),
                            ));
                        }
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Ok(0)) if matches!(this.reading, Reading::Close) => {
                    this.close();
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    return this.fail(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the worker closed the connection before the body ended",
                    ));
                }
                Poll::Ready(Ok(_)) => this.progress = Instant::now(),
                Poll::Ready(Err(e)) => return this.fail(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.reading, Reading::Done | Reading::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.reading {
            Reading::Length(len) => SizeHint::with_exact(len),
            Reading::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Pumps `chunks` with `framing` into one end of a socket pair; returns
    /// the outcome and the bytes that came out of the other end.
    async fn pump(
        chunks: &[&'static str],
        framing: RequestFraming,
    ) -> (Result<(), String>, Vec<u8>) {
        let (mut ours, mut theirs) = UnixStream::pair().expect("pair");
        let frames = chunks
            .iter()
            .map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from_static(c.as_bytes()))));
        let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(
            futures_util::stream::iter(frames.collect::<Vec<_>>()),
        ));
        let mut pump = RequestPump::new(body, framing);
        let outcome = std::future::poll_fn(|cx| pump.poll_send(&mut ours, cx))
            .await
            .map_err(|e| format!("{e:?}"));
        drop(ours);
        let mut wire = Vec::new();
        theirs.read_to_end(&mut wire).await.expect("read");
        (outcome, wire)
    }

    #[tokio::test]
    async fn bodies_go_out_framed_and_held_to_their_declared_length() {
        let (outcome, wire) = pump(&["hello", " world"], RequestFraming::Chunked).await;
        assert_eq!(outcome, Ok(()));
        assert_eq!(wire, b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");

        let (outcome, wire) = pump(&["hello", " world"], RequestFraming::Length(11)).await;
        assert_eq!(outcome, Ok(()));
        assert_eq!(wire, b"hello world");

        // More than declared: the extra bytes would be read as a request.
        let (outcome, wire) = pump(&["hello", " world"], RequestFraming::Length(7)).await;
        assert_eq!(outcome, Err("Length".to_string()));
        assert_eq!(wire, b"hello", "nothing past the declared length");
        // Less than declared: the worker would wait for the rest.
        let (outcome, _) = pump(&["hello"], RequestFraming::Length(7)).await;
        assert_eq!(outcome, Err("Length".to_string()));
    }

    #[tokio::test]
    async fn a_body_ends_when_its_declared_length_is_sent() {
        // The client's end of stream may come later, or never: the pump is
        // done (and the connection reusable) once the bytes are out.
        let (mut ours, mut theirs) = UnixStream::pair().expect("pair");
        let frames = futures_util::StreamExt::chain(
            futures_util::stream::iter([Ok::<_, BoxError>(Frame::data(Bytes::from_static(
                b"hello",
            )))]),
            futures_util::stream::pending(),
        );
        let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(frames));
        let mut pump = RequestPump::new(body, RequestFraming::Length(5));
        let outcome = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            std::future::poll_fn(|cx| pump.poll_send(&mut ours, cx)),
        )
        .await
        .expect("finished without waiting for the end of stream");
        assert!(outcome.is_ok());
        assert!(pump.is_finished());
        assert_eq!(pump.sent(), 5);
        drop(ours);
        let mut wire = Vec::new();
        theirs.read_to_end(&mut wire).await.expect("read");
        assert_eq!(wire, b"hello");
    }
}
