//! Accepting client connections and serving HTTP/1.1 and h2c on them.
//!
//! Owns sockets and protocol settings (time bounds in [`timed`], header
//! limits), and the graceful part of shutdown: stop accepting, tell every
//! connection to finish its in-flight requests, wait for them up to the
//! grace period. It hands each request to a [`Handler`] and knows nothing of
//! what happens next.

pub mod acme;
mod fast;
mod local_ca;
pub mod redirect;
mod timed;
pub mod tls;

pub use timed::ConnLimits;
use timed::{Activity, InFlight, TimedIo};

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::body::{Body, WithGuard};
use crate::shards::Shards;

/// Largest request head bext reads (431 beyond); for HTTP/2, the largest
/// header list.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Largest number of request headers.
pub const MAX_HEADERS: usize = 128;
/// Streams one HTTP/2 connection may have open at once.
pub const MAX_H2_STREAMS: u32 = 256;
/// HTTP/2 pings on a connection that has been silent this long, to find
/// peers that are gone; one unanswered for [`H2_PING_TIMEOUT`] closes it.
pub const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Streams a client may reset before bext has answered them, per
/// connection, before the connection is closed (CVE-2023-44487, "rapid
/// reset").
pub const H2_MAX_PENDING_RESETS: usize = 20;

/// Longest a TLS handshake may take (less if `client_header_timeout` is):
/// a pending one holds a buffered ClientHello.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// In a request's extensions when it came over TLS: its scheme is
/// `https` (the cache key, `X-Forwarded-Proto`).
#[derive(Debug, Clone, Copy)]
pub struct Secure;

/// Whether `req` came over TLS.
pub fn is_secure<B>(req: &http::Request<B>) -> bool {
    req.extensions().get::<Secure>().is_some()
}

/// How the short way through HTTP/1.1 reads the head at the start of
/// `buf`: the request and the head's length, if it would answer it there
/// (`None`: it would hand the bytes to hyper). For the differential fuzz
/// target, which checks it against hyper's reading.
#[doc(hidden)]
pub fn read_plain_get(buf: &[u8]) -> Option<(http::Request<()>, usize)> {
    match fast::parse(buf) {
        fast::Parsed::Request(req, len) => Some((req, len)),
        fast::Parsed::Partial | fast::Parsed::NotHere => None,
    }
}

/// What the listener calls for every request.
pub trait Handler: Send + Sync + 'static {
    /// The answer to `req` (its body is the client's, as a [`Body`]).
    fn handle(
        self: Arc<Self>,
        req: http::Request<Body>,
        peer: Peer,
    ) -> impl Future<Output = http::Response<Body>> + Send + 'static;

    /// A plain HTTP/1.1 `GET` the short way read (see [`fast`]; no body,
    /// one `Host`, checked first): answered at once when it needs no
    /// waiting (a static file, a fresh cache hit), else the answer to wait
    /// for, as [`Handler::handle`] gives it. `head` is empty; a
    /// [`Now::Written`] answer's status line and fields are written there.
    fn answer_plain(
        self: &Arc<Self>,
        req: http::Request<()>,
        peer: &Peer,
        _head: &mut Vec<u8>,
    ) -> Plain<impl Future<Output = http::Response<Body>> + Send + 'static + use<Self>> {
        // Boxed: a connection's state would otherwise carry the future's
        // room from its first request to its end (hyper boxes it too).
        Plain::Later(Box::pin(
            Arc::clone(self).handle(req.map(|()| crate::body::empty()), peer.clone()),
        ))
    }
}

/// What [`Handler::answer_plain`] gives.
#[derive(Debug)]
pub enum Plain<F> {
    /// The answer, now.
    Now(Now),
    /// The answer, once `F` is done.
    Later(F),
}

/// An answer given at once ([`Plain::Now`]).
#[derive(Debug)]
pub enum Now {
    Response(http::Response<Body>),
    /// Its status line and fields are written (each line ending in CRLF;
    /// not the blank line that ends the head): the listener adds `Date`
    /// (unless `dated`) and what it says of the connection, then `body`,
    /// whose length the fields give.
    Written(Written),
}

/// See [`Now::Written`].
#[derive(Debug)]
pub struct Written {
    pub body: Bytes,
    pub dated: bool,
    /// The request's access-log line, written once the answer is sent.
    pub record: Option<Box<crate::access_log::Record>>,
    /// Held until then (the app's requests in flight).
    pub guard: crate::server::InFlight,
}

impl Written {
    /// The answer went (`sent`), or the connection failed after `bytes`
    /// of its body.
    fn done(mut self, bytes: u64, sent: bool) {
        if let Some(record) = self.record.take() {
            record.sent(bytes, sent);
        }
    }
}

impl Drop for Written {
    /// Dropped unsent (the connection was cut at shutdown): logged as
    /// incomplete, as a response body dropped midway is.
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            record.sent(0, false);
        }
    }
}

/// Appends an HTTP/1.1 status line (as hyper writes it).
pub(crate) fn push_status_line(out: &mut Vec<u8>, status: http::StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends an HTTP/1.1 field line.
pub(crate) fn push_field(out: &mut Vec<u8>, name: &http::HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The other end of a client connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The address's IP as text, made once per connection (it goes into
    /// `X-Forwarded-For` and the access log of every request).
    pub ip: HeaderValue,
}

impl Peer {
    /// An IPv4-mapped IPv6 peer (a dual-stack listener's IPv4 client) is
    /// its IPv4 address, for every comparison that follows.
    pub fn new(addr: SocketAddr) -> Peer {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        let ip = HeaderValue::from_maybe_shared(Bytes::from(addr.ip().to_string()))
            .unwrap_or_else(|_| HeaderValue::from_static("-"));
        Peer { addr, ip }
    }
}

/// When to stop serving.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Stop accepting and drain.
    pub graceful: CancellationToken,
    /// Stop waiting for in-flight requests.
    pub immediate: CancellationToken,
}

/// Serves `listener` on every shard until `shutdown.graceful` is
/// cancelled, then drains: in-flight requests get up to `grace` (or until
/// `shutdown.immediate`) to finish. Returns whether every connection
/// finished in time; an error only when the listener cannot be shared with
/// the shards.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    limits: ConnLimits,
    shutdown: &Shutdown,
    grace: Duration,
    shards: &Shards,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> io::Result<bool> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Head and idle time are bounded by TimedIo, which tells the two
        // apart (hyper's timer would cut idle keep-alive at the header
        // timeout).
        .header_read_timeout(None)
        .keep_alive(!limits.keepalive_timeout.is_zero())
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_H2_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    // For a request read by the short way as shutdown began: answered
    // alone, on a connection that closes after it.
    let mut last_answer = hyper::server::conn::http1::Builder::new();
    last_answer
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(false)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    let graceful = Arc::new(GracefulShutdown::new());

    // Every shard accepts on the same socket: whichever is free first takes
    // the next connection, and serves it to the end on its own thread.
    let listener = listener.into_std()?;
    let mut acceptors = Vec::with_capacity(shards.handles().len());
    for shard in shards.handles() {
        let (listener, builder, last_answer, handler, graceful, stop, tls) = (
            listener.try_clone()?,
            builder.clone(),
            last_answer.clone(),
            Arc::clone(&handler),
            Arc::clone(&graceful),
            shutdown.graceful.clone(),
            tls.clone().map(tokio_rustls::TlsAcceptor::from),
        );
        acceptors.push(shard.spawn(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => {
                    let conns = Conns {
                        builder: &builder,
                        last_answer: &last_answer,
                        handler: &handler,
                        limits,
                        graceful: &graceful,
                        tls,
                    };
                    accept(listener, &conns, &stop).await;
                }
                Err(e) => error!("a shard could not take the listener: {e}"),
            }
        }));
    }
    for acceptor in acceptors {
        if let Err(e) = acceptor.await {
            error!("a shard's accept loop failed: {e}");
        }
    }
    drop(listener);
    info!("stopped accepting; draining in-flight requests (up to {grace:?})");
    // The accept loops are done, so this is the last reference.
    let Some(graceful) = Arc::into_inner(graceful) else {
        return Ok(false);
    };
    Ok(tokio::select! {
        drained = tokio::time::timeout(grace, graceful.shutdown()) => {
            if drained.is_err() {
                warn!("grace period over with requests still in flight");
            }
            drained.is_ok()
        }
        _ = shutdown.immediate.cancelled() => {
            warn!("not waiting for in-flight requests");
            false
        }
    })
}

/// One request: the connection is busy until its response body is done.
async fn respond<H: Handler>(
    handler: Arc<H>,
    mut req: http::Request<Incoming>,
    client: Peer,
    activity: Arc<Activity>,
    secure: bool,
) -> Result<http::Response<WithGuard<Body, InFlight>>, Infallible> {
    let in_flight = activity.begin();
    #[cfg(feature = "bench-ceiling")]
    if crate::ceiling::stage() == 1 {
        return Ok(crate::ceiling::fixed_response().map(|body| WithGuard::new(body, in_flight)));
    }
    if secure {
        req.extensions_mut().insert(Secure);
    }
    // One `Cookie` line for everything after (the cache's `Vary: Cookie`
    // key included), as an HTTP/2 client may split it.
    crate::proxy::headers::join_cookies(req.headers_mut());
    let response = match check_host(&mut req) {
        Ok(()) => handler.handle(req.map(crate::body::incoming), client).await,
        Err(why) => bad_request(why),
    };
    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        activity.upgraded();
    }
    Ok(response.map(|body| WithGuard::new(body, in_flight)))
}

/// The one host a request names, or why it names none: none, or two `Host`
/// lines, in HTTP/1.1 are refused (RFC 9112 §3.2), as is an HTTP/2 `Host` that disagrees with
/// `:authority` (RFC 9113 §8.3.1); an HTTP/1.1 absolute-form target's
/// authority replaces `Host` (RFC 9112 §3.2.2), so routing, the cache key
/// and the app all see the same host.
fn check_host<B>(req: &mut http::Request<B>) -> Result<(), &'static str> {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let (host, second) = (hosts.next(), hosts.next());
    if second.is_some() {
        return Err("more than one Host header\n");
    }
    let Some(authority) = req.uri().authority() else {
        // RFC 9112 §3.2: an HTTP/1.1 request must name its host.
        if host.is_none() && req.version() == http::Version::HTTP_11 {
            return Err("a Host header is required\n");
        }
        return Ok(());
    };
    let same = host.is_some_and(|h| {
        h.as_bytes()
            .eq_ignore_ascii_case(authority.as_str().as_bytes())
    });
    if same {
        return Ok(());
    }
    if req.version() == http::Version::HTTP_2 {
        return match host {
            Some(_) => Err("Host and :authority disagree\n"),
            None => Ok(()),
        };
    }
    match HeaderValue::from_str(authority.as_str()) {
        Ok(value) => {
            req.headers_mut().insert(http::header::HOST, value);
            Ok(())
        }
        Err(_) => Err("invalid authority\n"),
    }
}

/// A 400 that also ends the connection: after a malformed request, what
/// follows on it cannot be trusted to be framed as the client meant.
fn bad_request(why: &'static str) -> http::Response<Body> {
    let mut response = http::Response::new(crate::body::full(why));
    *response.status_mut() = http::StatusCode::BAD_REQUEST;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// What every connection of a shard is served with.
struct Conns<'a, H> {
    builder: &'a auto::Builder<TokioExecutor>,
    /// HTTP/1.1 alone, no keep-alive (see [`serve`]).
    last_answer: &'a hyper::server::conn::http1::Builder,
    handler: &'a Arc<H>,
    limits: ConnLimits,
    graceful: &'a GracefulShutdown,
    /// TLS first, when the listener is HTTPS.
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// One shard's accept loop: serves each connection on this shard until
/// `stop`.
async fn accept<H: Handler>(listener: TcpListener, conns: &Conns<'_, H>, stop: &CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let handler = Arc::clone(conns.handler);
        let client = Peer::new(peer);
        let activity = Activity::new();
        let mut io = TimedIo::new(stream, Arc::clone(&activity), conns.limits);
        let tls_activity = Arc::clone(&activity);
        let secure = conns.tls.is_some();
        let (fast_handler, fast_client, fast_activity) =
            (Arc::clone(&handler), client.clone(), Arc::clone(&activity));
        let service = service_fn(move |req| {
            respond(
                Arc::clone(&handler),
                req,
                client.clone(),
                Arc::clone(&activity),
                secure,
            )
        });
        let Some(tls) = &conns.tls else {
            let (builder, last_answer, watcher, stop) = (
                conns.builder.clone(),
                conns.last_answer.clone(),
                conns.graceful.watcher(),
                stop.clone(),
            );
            // The short way first, for a connection that may carry more
            // than one request (it knows nothing of bench stages).
            let short = !conns.limits.keepalive_timeout.is_zero();
            #[cfg(feature = "bench-ceiling")]
            let short = short && crate::ceiling::stage() == 0;
            tokio::spawn(async move {
                let read = if short {
                    match fast::serve(&mut io, &fast_handler, &fast_client, &fast_activity, &stop)
                        .await
                    {
                        fast::Left::Hyper(read) => read.freeze(),
                        fast::Left::Closed => return,
                    }
                } else {
                    bytes::Bytes::new()
                };
                if short && stop.is_cancelled() {
                    // Shutdown began while its first request was read: that
                    // one is answered, then the connection closes (the drain
                    // waits for it: `watcher` is held until then).
                    let io = TokioIo::new(fast::Prefixed::new(read, io));
                    if let Err(e) = last_answer.serve_connection(io, service).await {
                        debug!(%peer, "connection ended: {e}");
                    }
                    drop(watcher);
                    return;
                }
                let conn = builder
                    .serve_connection_with_upgrades(
                        TokioIo::new(fast::Prefixed::new(read, io)),
                        service,
                    )
                    .into_owned();
                if let Err(e) = watcher.watch(conn).await {
                    // Resets and early closes are the client's business.
                    debug!(%peer, "connection ended: {e}");
                }
            });
            continue;
        };
        // The handshake on the connection's own task: a slow client holds
        // up no one. It is bounded by the header timeout (TimedIo counts
        // it as the head of the first request; this is the backstop).
        let handshake = tokio::time::timeout(
            conns
                .limits
                .client_header_timeout
                .min(TLS_HANDSHAKE_TIMEOUT),
            tls.accept(io),
        );
        let (builder, graceful_watch) = (conns.builder.clone(), conns.graceful.watcher());
        tokio::spawn(async move {
            let stream = match handshake.await {
                Ok(Ok(stream)) => {
                    match stream.get_ref().1.alpn_protocol() {
                        Some(b"h2") => tls_activity.set_h2(),
                        // An ACME validator has seen the challenge
                        // certificate: that is all it came for.
                        Some(tls::ACME_TLS_ALPN) => return,
                        _ => {}
                    }
                    stream
                }
                Ok(Err(e)) => {
                    debug!(%peer, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            if let Err(e) = graceful_watch.watch(conn).await {
                debug!(%peer, "connection ended: {e}");
            }
        });
    }
}
