//! Pooled HTTP/1.1 keep-alive connections to one worker's Unix socket.
//!
//! bext speaks HTTP/1.1 to its workers itself ([`super::h1`]) instead of
//! through hyper's client: there is exactly one destination per pool, and a
//! request is written, and its response head read, by the task that serves
//! the client, with no connection task, channel or oneshot between them
//! (measured with bench/proxy-instructions.sh: 37.9k → 29.4k user-space
//! instructions per proxied request, see bench/RESULTS.md). The request
//! body goes out while the response comes in ([`super::exchange`]). A
//! connection returns to the pool once both are complete; a response body
//! dropped half-way closes it.
//!
//! Idle connections are kept per shard ([`crate::shards`]), newest last: a
//! request takes the most recently used one, so few stay warm, and one that
//! sat idle longer than [`UPSTREAM_IDLE_TIMEOUT`] is never reused (Node
//! closes idle connections after 5 s). A connection the worker closed while
//! it sat idle is noticed when it is taken, from the readiness the runtime
//! already has (usually without a system call). If the worker closes it
//! just as it is reused, the request is sent again once on a new
//! connection, as nginx does with its cached upstream connections: any
//! request if the worker received none of it, a bodiless safe one (GET,
//! HEAD, OPTIONS, TRACE) if it may have. Every second the worker's
//! supervisor closes idle connections that are too old or that the worker
//! closed ([`Upstream::close_idle`]), so none lingers half-closed while an
//! app is quiet.
//!
//! The upstream timeout is one timer per connection, moved to each new
//! request's deadline: a later deadline on a timer that has not fired is
//! cheap, where a fresh timer per request is an insertion into the
//! runtime's timer wheel and a removal (measured with
//! bench/proxy-instructions.sh: 250 fewer instructions per proxied
//! request).

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::{Method, Request, Response, header};
use tokio::io::AsyncWrite;
use tokio::net::UnixStream;
use tokio::time::Sleep;

pub use super::exchange::UpstreamBody;
use super::exchange::{PumpError, Reading, RequestPump};
use super::h1::{self, ChunkedDecoder, ParseError, RequestFraming, ResponseFraming};
use crate::body::{Body, BoxError};

/// Idle upstream connections older than this are not reused: Node closes
/// idle connections after its `keepAliveTimeout` (5 s by default).
pub const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Idle connections kept per worker and shard.
pub const UPSTREAM_MAX_IDLE: usize = 256;
/// Room for a response head (grown as needed up to [`h1::MAX_HEAD`]).
const HEAD_READ: usize = 8 * 1024;

/// Why a request could not be sent to the worker.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    /// The connection failed before any of a response arrived.
    #[error("the connection failed before a response: {0}")]
    Send(#[source] io::Error),
    /// The connection failed in the middle of a response head.
    #[error("the connection failed in the middle of a response: {0}")]
    Incomplete(#[source] io::Error),
    /// The worker's response could not be parsed.
    #[error("invalid response: {0}")]
    Invalid(#[source] ParseError),
    /// The client's request body failed while it was being sent.
    #[error("the request body failed: {0}")]
    RequestBody(#[source] BoxError),
    /// No response head arrived in time.
    #[error("no response within {0:?}")]
    Timeout(Duration),
}

impl UpstreamError {
    /// The worker surely never saw the request.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect { .. })
    }
}

/// The connection pool for one worker.
#[derive(Debug, Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(super) struct Inner {
    path: PathBuf,
    /// The uids that may be listening on `path` (none: not checked):
    /// whoever called listen() on it last (bext, or the app's user for a
    /// socket it listens on or binds itself). A socket swapped for another
    /// (a symlink to some other service's socket, in a directory the app
    /// may write) is refused, and a symlink is not even connected to.
    peer_uids: Vec<u32>,
    /// The worker is going away: connections are no longer kept.
    closing: AtomicBool,
    /// Idle connections, one list per shard (slot: [`Inner::slot`]),
    /// oldest first.
    idle: Box<[Mutex<VecDeque<Idle>>]>,
}

#[derive(Debug)]
struct Idle {
    conn: Conn,
    since: Instant,
}

/// One open connection.
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) io: UnixStream,
    /// Bytes read and not used yet.
    pub(super) buf: BytesMut,
    /// The request head being sent.
    head: BytesMut,
    /// The deadline of the request on it.
    pub(super) timer: Pin<Box<Sleep>>,
    /// It has served a response before.
    reused: bool,
}

impl Upstream {
    pub fn new(path: PathBuf, peer_uids: Vec<u32>) -> Self {
        Upstream {
            inner: Arc::new(Inner {
                path,
                peer_uids,
                closing: AtomicBool::new(false),
                idle: (0..=crate::shards::default_count().get())
                    .map(|_| Mutex::new(VecDeque::new()))
                    .collect(),
            }),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.inner.path
    }

    /// Sends `req` on a pooled (or new) connection; resolves with the
    /// response head, or fails after `timeout` without one.
    pub async fn send(
        &self,
        req: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let slot = self.inner.slot();
        let (parts, body) = req.into_parts();
        let framing = RequestFraming::for_body(
            http_body::Body::is_end_stream(&body),
            http_body::Body::size_hint(&body).exact(),
        );
        let mut pump = (framing != RequestFraming::Empty).then(|| RequestPump::new(body, framing));
        let mut conn = match self.inner.checkout(slot) {
            Some(conn) => conn,
            None => self.connect(deadline, timeout).await?,
        };
        conn.timer.as_mut().reset(deadline);
        conn.head.clear();
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        h1::encode_request(
            &parts.method,
            target,
            &parts.headers,
            framing,
            &mut conn.head,
        );

        let head = loop {
            let Conn {
                io,
                buf,
                head,
                timer,
                reused,
            } = &mut conn;
            let exchanged = exchange(
                io,
                buf,
                head,
                &mut pump,
                &parts.method,
                timer.as_mut(),
                timeout,
            )
            .await;
            let resend = match &exchanged {
                // The worker closed a kept-alive connection just as it was
                // reused. Nothing was delivered: any request may go again.
                Err(Failure::NotDelivered(_)) => *reused,
                // Delivered, and closed with no answer: most likely unread,
                // but only a request that is safe to repeat goes again.
                Err(Failure::Unanswered(_)) => {
                    *reused && framing == RequestFraming::Empty && parts.method.is_safe()
                }
                _ => false,
            };
            match exchanged {
                Ok(head) => break head,
                Err(Failure::NotDelivered(e) | Failure::Unanswered(e)) if resend => {
                    tracing::debug!("reused upstream connection was closed ({e}); sending again");
                    let mut fresh = self.connect(deadline, timeout).await?;
                    fresh.head = std::mem::take(&mut conn.head);
                    conn = fresh;
                }
                Err(Failure::NotDelivered(e) | Failure::Unanswered(e)) => {
                    return Err(UpstreamError::Send(e));
                }
                Err(Failure::Other(e)) => return Err(e),
            }
        };
        if head.framing == ResponseFraming::Upgrade && !parts.headers.contains_key(header::UPGRADE)
        {
            return Err(UpstreamError::Invalid(ParseError::UnrequestedUpgrade));
        }

        let reading = match head.framing {
            ResponseFraming::Empty | ResponseFraming::Length(0) => Reading::Done,
            ResponseFraming::Length(len) => Reading::Length(len),
            ResponseFraming::Chunked => Reading::Chunked(ChunkedDecoder::default()),
            ResponseFraming::Close => Reading::Close,
            ResponseFraming::Upgrade => Reading::Upgrade,
        };
        // The worker answered before it had all of the request body: the
        // rest goes out as the response is read. Either way the body is on
        // an inactivity timer (the connection's, moved when it fires).
        let pump = pump.filter(|pump| !pump.is_finished());
        let mut body = UpstreamBody {
            conn: Some(conn),
            reading,
            keep_alive: head.keep_alive,
            pump,
            timeout,
            progress: tokio::time::Instant::now(),
            pool: Arc::clone(&self.inner),
            slot,
        };
        if matches!(body.reading, Reading::Done) {
            // Nothing to read (204, 304, HEAD, empty): reusable now.
            body.finish();
        }
        let mut response = Response::new(body);
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        Ok(response)
    }

    /// A new connection, its timer set to `deadline`.
    async fn connect(
        &self,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<Conn, UpstreamError> {
        let path = &self.inner.path;
        let refuse = |why: String| UpstreamError::Connect {
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, why),
        };
        let checked = !self.inner.peer_uids.is_empty();
        if checked && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(refuse("the socket is a symlink".to_string()));
        }
        let io = tokio::time::timeout_at(deadline, UnixStream::connect(path))
            .await
            .map_err(|_| UpstreamError::Timeout(timeout))?
            .map_err(|source| UpstreamError::Connect {
                path: path.clone(),
                source,
            })?;
        if checked {
            let uid = io.peer_cred().map(|c| c.uid()).ok();
            if !uid.is_some_and(|uid| self.inner.peer_uids.contains(&uid)) {
                return Err(refuse(format!(
                    "the socket is served by uid {uid:?}, not the app's ({:?})",
                    self.inner.peer_uids
                )));
            }
        }
        Ok(Conn {
            io,
            buf: BytesMut::with_capacity(HEAD_READ),
            head: BytesMut::new(),
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            reused: false,
        })
    }
}

/// How an exchange failed.
enum Failure {
    /// The request head could not be written: the worker saw nothing.
    NotDelivered(io::Error),
    /// The request was written; the connection failed before a byte of
    /// the response arrived.
    Unanswered(io::Error),
    Other(UpstreamError),
}

/// Writes the request head, then the body while reading the response head,
/// until the response head (after any interim 1xx) has arrived, or `timer`
/// fires. While the request body is being written, the deadline runs from
/// its last progress, as nginx's `proxy_send_timeout` does: a long upload
/// that keeps moving is not cut off.
async fn exchange(
    io: &mut UnixStream,
    buf: &mut BytesMut,
    head: &[u8],
    pump: &mut Option<RequestPump>,
    method: &Method,
    mut timer: Pin<&mut Sleep>,
    timeout: Duration,
) -> Result<h1::ResponseHead, Failure> {
    let mut written = 0;
    // A worker may answer without reading the whole body (a 413, say) and
    // close its end: its answer is still read, and the connection not reused.
    let mut unsent: Option<io::Error> = None;
    let mut received = false;
    std::future::poll_fn(|cx| {
        while written < head.len() {
            match Pin::new(&mut *io).poll_write(cx, &head[written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(Failure::NotDelivered(
                        io::ErrorKind::WriteZero.into(),
                    )));
                }
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Failure::NotDelivered(e))),
                Poll::Pending => return unless_expired(&mut timer, cx, timeout),
            }
        }
        if let Some(sending) = pump.as_mut() {
            let before = sending.sent();
            let polled = sending.poll_send(io, cx);
            if sending.sent() > before {
                timer.as_mut().reset(tokio::time::Instant::now() + timeout);
            }
            match polled {
                Poll::Ready(Ok(())) | Poll::Pending => {}
                Poll::Ready(Err(PumpError::Write(e))) => {
                    unsent = Some(e);
                    *pump = None;
                }
                Poll::Ready(Err(PumpError::Body(e))) => {
                    return Poll::Ready(Err(Failure::Other(UpstreamError::RequestBody(e))));
                }
                Poll::Ready(Err(PumpError::Length)) => {
                    return Poll::Ready(Err(Failure::Other(UpstreamError::RequestBody(
                        "the request body's length differs from its Content-Length".into(),
                    ))));
                }
            }
        }
        loop {
            if received {
                match h1::parse_response(buf, method) {
                    Ok(Some(head)) if head.is_interim() => continue,
                    Ok(Some(mut head)) => {
                        head.keep_alive &= unsent.is_none();
                        return Poll::Ready(Ok(head));
                    }
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Err(Failure::Other(UpstreamError::Invalid(e)))),
                }
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(HEAD_READ);
            }
            let failure = match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf) {
                Poll::Pending => return unless_expired(&mut timer, cx, timeout),
                Poll::Ready(Ok(0)) => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the worker closed the connection",
                ),
                Poll::Ready(Ok(_)) => {
                    received = true;
                    continue;
                }
                Poll::Ready(Err(e)) => e,
            };
            return Poll::Ready(Err(if received {
                Failure::Other(UpstreamError::Incomplete(failure))
            } else {
                Failure::Unanswered(unsent.take().unwrap_or(failure))
            }));
        }
    })
    .await
}

/// `Pending`, unless the exchange's timer has fired.
fn unless_expired(
    timer: &mut Pin<&mut Sleep>,
    cx: &mut Context<'_>,
    timeout: Duration,
) -> Poll<Result<h1::ResponseHead, Failure>> {
    match timer.as_mut().poll(cx) {
        Poll::Ready(()) => Poll::Ready(Err(Failure::Other(UpstreamError::Timeout(timeout)))),
        Poll::Pending => Poll::Pending,
    }
}

impl Upstream {
    /// Closes idle connections that are too old to be reused or that the
    /// worker has closed; called every [`super::IDLE_SWEEP_INTERVAL`] by
    /// the worker's supervisor, so that a quiet app's connections do not
    /// linger half-closed until its next request.
    pub fn close_idle(&self) {
        let now = Instant::now();
        for slot in &self.inner.idle {
            let closing: Vec<Idle> = {
                let mut idle = slot.lock().unwrap_or_else(|e| e.into_inner());
                if idle.is_empty() {
                    continue;
                }
                let (keep, close): (VecDeque<Idle>, VecDeque<Idle>) =
                    std::mem::take(&mut *idle).into_iter().partition(|entry| {
                        now.duration_since(entry.since) < UPSTREAM_IDLE_TIMEOUT
                            && entry.conn.is_open()
                    });
                *idle = keep;
                close.into()
            };
            // Closed outside the lock the request path takes.
            drop(closing);
        }
    }

    /// The worker is draining or stopping: closes the idle connections,
    /// and those of requests still running as they end.
    pub fn close(&self) {
        self.inner.closing.store(true, Ordering::Relaxed);
        for slot in &self.inner.idle {
            let closing = std::mem::take(&mut *slot.lock().unwrap_or_else(|e| e.into_inner()));
            drop(closing);
        }
    }

    /// Idle connections, all slots together.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.inner
            .idle
            .iter()
            .map(|slot| slot.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

impl Inner {
    /// The calling shard's idle list (more shards than slots share them).
    fn slot(&self) -> usize {
        crate::shards::current() % self.idle.len()
    }

    /// The most recently used idle connection, if it is fresh and open.
    fn checkout(&self, slot: usize) -> Option<Conn> {
        let mut idle = self.idle[slot].lock().unwrap_or_else(|e| e.into_inner());
        while let Some(entry) = idle.pop_back() {
            if entry.since.elapsed() >= UPSTREAM_IDLE_TIMEOUT {
                // The rest are older still.
                idle.clear();
                return None;
            }
            if entry.conn.is_open() {
                return Some(entry.conn);
            }
        }
        None
    }

    pub(super) fn checkin(&self, slot: usize, mut conn: Conn) {
        conn.reused = true;
        let now = Instant::now();
        let mut idle = self.idle[slot].lock().unwrap_or_else(|e| e.into_inner());
        // Read under the lock: `close` sets it before it empties the lists.
        if self.closing.load(Ordering::Relaxed) {
            return;
        }
        while idle
            .front()
            .is_some_and(|oldest| now.duration_since(oldest.since) >= UPSTREAM_IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        if idle.len() < UPSTREAM_MAX_IDLE {
            idle.push_back(Idle { conn, since: now });
        }
    }
}

impl Conn {
    /// Not closed by the worker while idle, as far as the runtime knows:
    /// an idle connection becomes readable only when the worker closes it
    /// (or sends what nobody asked for). `try_read` answers from the
    /// readiness the runtime has already seen, without a system call, when
    /// the socket is not known to be readable.
    fn is_open(&self) -> bool {
        matches!(
            self.io.try_read(&mut [0; 1]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    /// A worker that answers one request per connection with `ok` and
    /// keeps the connection open until told to close it.
    async fn one_answer_worker(listener: UnixListener, close: tokio::sync::oneshot::Receiver<()>) {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0; 4096];
        let mut seen = Vec::new();
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).await.expect("read");
            seen.extend_from_slice(&buf[..n]);
        }
        socket
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await
            .expect("write");
        let _ = close.await;
    }

    /// Issue 11 (tenant isolation): a socket listened on by another uid
    /// than the app's (a symlink to some other service, planted where the
    /// app may write) is refused before anything is sent.
    #[tokio::test]
    async fn a_socket_served_by_another_uid_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let (_close, closed) = tokio::sync::oneshot::channel();
        let _worker = tokio::spawn(one_answer_worker(listener, closed));
        let me = nix::unistd::geteuid().as_raw();
        let request = || {
            Request::get("/")
                .body(crate::body::empty())
                .expect("request")
        };
        // The worker answers one connection: the app's own, first.
        let own = Upstream::new(path.clone(), vec![me]);
        let response = own
            .send(request(), Duration::from_secs(5))
            .await
            .expect("served");
        assert_eq!(response.status(), 200);
        let other = Upstream::new(path, vec![me.wrapping_add(1)]);
        let refused = other.send(request(), Duration::from_secs(5)).await;
        assert!(
            matches!(&refused, Err(UpstreamError::Connect { source, .. }) if source.kind() == std::io::ErrorKind::PermissionDenied),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn idle_connections_are_pooled_and_closed_once_the_worker_closes_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let (close, closed) = tokio::sync::oneshot::channel();
        let worker = tokio::spawn(one_answer_worker(listener, closed));
        let upstream = Upstream::new(path, vec![]);

        let request = Request::get("/")
            .body(crate::body::empty())
            .expect("request");
        let response = upstream
            .send(request, Duration::from_secs(5))
            .await
            .expect("response");
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.expect("body");
        assert_eq!(&body.to_bytes()[..], b"ok");
        assert_eq!(upstream.idle_count(), 1, "read to the end: pooled");

        upstream.close_idle();
        assert_eq!(upstream.idle_count(), 1, "open and fresh: kept");

        close.send(()).expect("worker waiting");
        worker.await.expect("worker");
        let deadline = Instant::now() + Duration::from_secs(5);
        while upstream.idle_count() > 0 {
            assert!(
                Instant::now() < deadline,
                "the closed connection stayed pooled"
            );
            // Lets the runtime see the socket's hang-up.
            tokio::time::sleep(Duration::from_millis(5)).await;
            upstream.close_idle();
        }
    }

    #[tokio::test]
    async fn a_closing_pool_keeps_no_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        // Answers every request on every connection, and keeps them open.
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.expect("accept");
                tokio::spawn(async move {
                    let mut buf = vec![0; 4096];
                    loop {
                        let mut seen = Vec::new();
                        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                            match socket.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => seen.extend_from_slice(&buf[..n]),
                            }
                        }
                        socket
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await
                            .expect("write");
                    }
                });
            }
        });
        let upstream = Upstream::new(path, vec![]);
        let get = || async {
            let request = Request::get("/")
                .body(crate::body::empty())
                .expect("request");
            upstream
                .send(request, Duration::from_secs(5))
                .await
                .expect("response")
        };

        // Two responses at once, on two connections.
        let done = get().await;
        let running = get().await;
        let done = done.into_body().collect().await.expect("body");
        assert_eq!(&done.to_bytes()[..], b"ok");
        assert_eq!(upstream.idle_count(), 1);
        // The worker starts stopping while the other is still being read.
        upstream.close();
        assert_eq!(upstream.idle_count(), 0, "idle ones closed at once");
        running.into_body().collect().await.expect("body");
        assert_eq!(upstream.idle_count(), 0, "finished ones not kept");
    }
}
