//! Time bounds on one client connection, with nginx's names and meanings:
//!
//! - `client_header_timeout`: from accept until the first request's head is
//!   complete (protocol detection included), and from the first byte of each
//!   later request until its head is complete;
//! - `keepalive_timeout`: idle time between requests (HTTP/1.1), or with no
//!   stream open (HTTP/2; control frames do not count as activity);
//! - `send_timeout`: between two successful writes to the client.
//!
//! [`TimedIo`] wraps the socket and enforces them at the I/O layer, the only
//! place that sees every byte whatever the protocol; the request side tells
//! it when requests start and end through [`Activity`]. While a request is in
//! flight, reads have no deadline (its body and the app's answer have
//! theirs), and a connection upgraded to another protocol (WebSocket) has
//! none at all. A deadline that passes fails the pending read or write with
//! `TimedOut`, and hyper closes the connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The bounds in force for every connection of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    pub client_header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub send_timeout: Duration,
}

/// What the request side tells the connection's I/O.
#[derive(Debug)]
pub(super) struct Activity {
    accepted: Instant,
    in_flight: AtomicUsize,
    /// Requests begun on this connection.
    requests: AtomicU64,
    /// When the last request in flight ended, in ms after `accepted`.
    idle_since_ms: AtomicU64,
    upgraded: AtomicBool,
    /// HTTP/2 by ALPN (under TLS the socket's bytes are records, not the
    /// preface [`TimedIo`] looks for).
    h2: AtomicBool,
}

impl Activity {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Activity {
            accepted: Instant::now(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
            upgraded: AtomicBool::new(false),
            h2: AtomicBool::new(false),
        })
    }

    /// The TLS handshake chose HTTP/2.
    pub(super) fn set_h2(&self) {
        self.h2.store(true, Ordering::Relaxed);
    }

    /// A request's head is complete: until the returned guard is dropped
    /// (with its response body), the connection is not idle.
    pub(super) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// The connection now carries another protocol: no more deadlines.
    pub(super) fn upgraded(&self) {
        self.upgraded.store(true, Ordering::Relaxed);
    }

    fn idle_since(&self) -> Instant {
        self.accepted + Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed))
    }
}

/// One request in flight (see [`Activity::begin`]).
#[derive(Debug)]
pub(super) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = a.accepted.elapsed().as_millis().min(u64::MAX as u128) as u64;
        a.idle_since_ms.store(ms, Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The HTTP/2 connection preface starts with these bytes.
const H2_PREFIX: &[u8] = b"PRI * HTTP/2.0";

pin_project_lite::pin_project! {
    /// A client socket with [`ConnLimits`] enforced on it.
    pub(super) struct TimedIo<S> {
        #[pin]
        io: S,
        activity: Arc<Activity>,
        limits: ConnLimits,
        read_timer: Option<Pin<Box<Sleep>>>,
        write_timer: Option<Pin<Box<Sleep>>>,
        // When the pending write fails (None: no write pending).
        write_deadline: Option<Instant>,
        // HTTP/2 (known once the first bytes match its preface, or do not):
        // idle is "no stream open".
        h2: Option<bool>,
        // Bytes of the preface matched so far.
        preface_seen: usize,
        // The first byte of a request that has not begun yet, and the
        // request count it was seen at.
        head_started: Option<(Instant, u64)>,
    }
}

impl<S> TimedIo<S> {
    pub(super) fn new(io: S, activity: Arc<Activity>, limits: ConnLimits) -> Self {
        TimedIo {
            io,
            activity,
            limits,
            read_timer: None,
            write_timer: None,
            write_deadline: None,
            h2: None,
            preface_seen: 0,
            head_started: None,
        }
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what.to_string())
}

/// Polls `timer` for `deadline`: ready once it has passed.
///
/// A later deadline than the one armed does not move the timer (the
/// keep-alive deadline moves on with every request): it fires at the
/// earlier one and is set again then, once per timeout period instead of a
/// timer-wheel update per request, as the kernel's TCP timers do.
fn poll_deadline(
    timer: &mut Option<Pin<Box<Sleep>>>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> bool {
    let sleep = match timer {
        Some(sleep) => {
            if deadline < sleep.deadline() {
                sleep.as_mut().reset(deadline);
            }
            sleep
        }
        None => timer.insert(Box::pin(tokio::time::sleep_until(deadline))),
    };
    if sleep.as_mut().poll(cx).is_pending() {
        return false;
    }
    if sleep.deadline() >= deadline {
        return true;
    }
    // An earlier deadline passed, not this one: wait on for it.
    sleep.as_mut().reset(deadline);
    sleep.as_mut().poll(cx).is_ready()
}

impl<S: AsyncRead> AsyncRead for TimedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let activity = &**this.activity;
        if activity.upgraded.load(Ordering::Relaxed) {
            return this.io.poll_read(cx, buf);
        }
        let before = buf.filled().len();
        let polled = this.io.poll_read(cx, buf);
        let requests = activity.requests.load(Ordering::Relaxed);
        let in_flight = activity.in_flight.load(Ordering::Relaxed) > 0;
        match polled {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                // ALPN's word wins over the sniffed bytes (under TLS they
                // were the handshake's).
                if *this.h2 != Some(true) && activity.h2.load(Ordering::Relaxed) {
                    *this.h2 = Some(true);
                }
                if this.h2.is_none() && !new.is_empty() {
                    let want = &H2_PREFIX[*this.preface_seen..];
                    let n = new.len().min(want.len());
                    if new[..n] != want[..n] {
                        *this.h2 = Some(false);
                    } else {
                        *this.preface_seen += n;
                        if *this.preface_seen == H2_PREFIX.len() {
                            *this.h2 = Some(true);
                        }
                    }
                }
                if !new.is_empty() && !in_flight && requests > 0 {
                    match this.head_started {
                        Some((_, at)) if *at == requests => {}
                        _ => *this.head_started = Some((Instant::now(), requests)),
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if in_flight => Poll::Pending,
            Poll::Pending => {
                let (deadline, what) = if requests == 0 {
                    (
                        activity.accepted + this.limits.client_header_timeout,
                        "client_header_timeout",
                    )
                } else {
                    match *this.head_started {
                        Some((first_byte, at)) if at == requests && *this.h2 != Some(true) => (
                            first_byte + this.limits.client_header_timeout,
                            "client_header_timeout",
                        ),
                        _ => (
                            activity.idle_since() + this.limits.keepalive_timeout,
                            "keepalive_timeout",
                        ),
                    }
                };
                if poll_deadline(this.read_timer, deadline, cx) {
                    return Poll::Ready(Err(timed_out(what)));
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite> TimedIo<S> {
    /// A write that made progress disarms the send timer; one that is
    /// pending arms it (once) and fails when it fires.
    fn guard_write<T>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let this = self.project();
        match write(this.io, cx) {
            Poll::Ready(result) => {
                *this.write_deadline = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                if this.activity.upgraded.load(Ordering::Relaxed) {
                    return Poll::Pending;
                }
                let deadline = *this
                    .write_deadline
                    .get_or_insert_with(|| Instant::now() + this.limits.send_timeout);
                if poll_deadline(this.write_timer, deadline, cx) {
                    return Poll::Ready(Err(timed_out("send_timeout")));
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite> AsyncWrite for TimedIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.guard_write(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.guard_write(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.guard_write(cx, |io, cx| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        ready!(this.io.poll_shutdown(cx))?;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMITS: ConnLimits = ConnLimits {
        client_header_timeout: Duration::from_secs(10),
        keepalive_timeout: Duration::from_secs(75),
        send_timeout: Duration::from_secs(60),
    };

    /// Far past every limit: a timer that never fires fails the test
    /// instead of hanging it.
    const LONG_AFTER: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_times_out_at_the_header_timeout() {
        let (client, server) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut io = TimedIo::new(server, activity, LIMITS);
        let started = Instant::now();
        let mut buf = [0u8; 8];
        let err = io.read(&mut buf).await.expect_err("timed out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), LIMITS.client_header_timeout);
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn between_requests_the_keepalive_timeout_holds_then_the_header_timeout() {
        let (mut client, server) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut io = TimedIo::new(server, Arc::clone(&activity), LIMITS);
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 64];
        let n = io.read(&mut buf).await.expect("head");
        assert!(n > 0);
        let request = activity.begin();
        // In flight: no read deadline however long the app takes.
        tokio::select! {
            _ = io.read(&mut buf) => panic!("nothing to read"),
            _ = tokio::time::sleep(Duration::from_secs(300)) => {}
        }
        drop(request);
        let idle = Instant::now();
        let err = io.read(&mut buf).await.expect_err("idle too long");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(idle.elapsed(), LIMITS.keepalive_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_head_started_after_idle_gets_the_header_timeout() {
        let (mut client, server) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut io = TimedIo::new(server, Arc::clone(&activity), LIMITS);
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 64];
        assert!(io.read(&mut buf).await.expect("head") > 0);
        drop(activity.begin());
        tokio::time::sleep(Duration::from_secs(30)).await;
        client.write_all(b"GET /slow").await.expect("write");
        assert!(io.read(&mut buf).await.expect("part of a head") > 0);
        let first_byte = Instant::now();
        let err = io.read(&mut buf).await.expect_err("slowloris");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(first_byte.elapsed(), LIMITS.client_header_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_hits_the_send_timeout() {
        let (_client, server) = tokio::io::duplex(16);
        let activity = Activity::new();
        let _request = activity.begin();
        let mut io = TimedIo::new(server, activity, LIMITS);
        let started = Instant::now();
        let err = io.write_all(&[b'x'; 1024]).await.expect_err("nobody reads");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), LIMITS.send_timeout);
    }

    /// The idle timer is not moved at every request (see
    /// [`poll_deadline`]), yet the keep-alive timeout still counts from the
    /// end of the last one.
    #[tokio::test(start_paused = true)]
    async fn the_keepalive_timeout_counts_from_the_last_request_not_the_first() {
        let (mut client, server) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut io = TimedIo::new(server, Arc::clone(&activity), LIMITS);
        let mut buf = [0u8; 64];
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        assert!(io.read(&mut buf).await.expect("head") > 0);
        drop(activity.begin());
        // Idle for most of the timeout (the timer is armed for its end).
        tokio::select! {
            _ = io.read(&mut buf) => panic!("nothing to read"),
            _ = tokio::time::sleep(LIMITS.keepalive_timeout - Duration::from_secs(5)) => {}
        }
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        assert!(io.read(&mut buf).await.expect("second head") > 0);
        drop(activity.begin());
        let idle = Instant::now();
        let err = tokio::time::timeout(LONG_AFTER, io.read(&mut buf))
            .await
            .expect("the keep-alive timeout fires")
            .expect_err("idle too long");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(idle.elapsed(), LIMITS.keepalive_timeout);
    }

    /// A write that waited, then went through, leaves no deadline behind
    /// for the next write that waits.
    #[tokio::test(start_paused = true)]
    async fn each_waiting_write_gets_the_whole_send_timeout() {
        let (mut client, server) = tokio::io::duplex(16);
        let activity = Activity::new();
        let _request = activity.begin();
        let mut io = TimedIo::new(server, activity, LIMITS);
        let half = LIMITS.send_timeout / 2;
        let (written, read) = tokio::join!(io.write_all(&[b'x'; 32]), async {
            tokio::time::sleep(half).await;
            let mut got = [0u8; 32];
            client.read_exact(&mut got).await
        });
        written.expect("read in time");
        read.expect("read");
        // The first write's deadline is still ahead: the next write must
        // not inherit it.
        tokio::time::sleep(half / 2).await;
        let started = Instant::now();
        let err = tokio::time::timeout(LONG_AFTER, io.write_all(&[b'x'; 1024]))
            .await
            .expect("the send timeout fires")
            .expect_err("nobody reads");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), LIMITS.send_timeout);
        drop(client);
    }

    /// A first read of just `P` (of `POST`) does not make the connection
    /// HTTP/2: its later heads still get the header timeout.
    #[tokio::test(start_paused = true)]
    async fn http2_is_known_from_the_whole_preface_not_its_first_byte() {
        let (mut client, server) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut io = TimedIo::new(server, Arc::clone(&activity), LIMITS);
        let mut buf = [0u8; 64];
        client.write_all(b"P").await.expect("write");
        assert_eq!(io.read(&mut buf).await.expect("P"), 1);
        client
            .write_all(b"OST / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        assert!(io.read(&mut buf).await.expect("rest") > 0);
        assert_eq!(io.h2, Some(false));
        drop(activity.begin());
        client.write_all(b"GET").await.expect("write");
        assert!(io.read(&mut buf).await.expect("a head begins") > 0);
        let started = Instant::now();
        let err = io.read(&mut buf).await.expect_err("slow head");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), LIMITS.client_header_timeout);
    }

    /// Under TLS the first bytes are a ClientHello, not the preface: once
    /// ALPN says h2, a frame on an idle connection (a PING's answer) gets
    /// the keep-alive time, not the header timeout.
    #[tokio::test(start_paused = true)]
    async fn alpn_h2_keeps_the_idle_timeout_under_tls() {
        let (mut client, server) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut io = TimedIo::new(server, Arc::clone(&activity), LIMITS);
        let mut buf = [0u8; 64];
        client.write_all(&[0x16, 0x03, 0x01]).await.expect("write");
        assert!(io.read(&mut buf).await.expect("hello") > 0);
        assert_eq!(io.h2, Some(false), "sniffed: not the preface");
        activity.set_h2();
        drop(activity.begin());
        let idle = Instant::now();
        client.write_all(b"ping").await.expect("write");
        assert!(io.read(&mut buf).await.expect("a frame") > 0);
        assert_eq!(io.h2, Some(true));
        let err = io.read(&mut buf).await.expect_err("idle");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(idle.elapsed(), LIMITS.keepalive_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn an_upgraded_connection_has_no_deadlines() {
        let (_client, server) = tokio::io::duplex(64);
        let activity = Activity::new();
        drop(activity.begin());
        activity.upgraded();
        let mut io = TimedIo::new(server, activity, LIMITS);
        let mut buf = [0u8; 8];
        tokio::select! {
            _ = io.read(&mut buf) => panic!("nothing to read"),
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}
