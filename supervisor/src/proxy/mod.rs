//! Forwarding a request to one of the app's workers and streaming the answer
//! back: request and response bodies are never buffered (SSE and large
//! uploads flow through), WebSocket upgrades become a byte tunnel, and a
//! bodiless safe request (GET, HEAD, OPTIONS, TRACE) that met a dead worker is retried once on
//! another one, as nginx's `proxy_next_upstream` does.
//!
//! Talks to [`crate::pool`] only; knows nothing of static files, and of the
//! cache only the [`Fill`] trait it implements for it.

mod error;
pub mod headers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

pub use error::ProxyError;

use crate::body::{self, Body, WithGuard};
use crate::cache::Fill;
use crate::listener::Peer;
use crate::nextcache::{self, NextLink};
use crate::pool::upstream::UpstreamBody;
use crate::pool::{Lease, Pool};

/// Attempts per request: the first worker, then one other.
const MAX_ATTEMPTS: usize = 2;

/// Who is asking, as the proxy needs to tell the worker.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub peer: Peer,
    /// The peer is a trusted proxy (its forwarding headers are believed).
    pub trusted_peer: bool,
    pub scheme: &'static str,
    pub request_id: HeaderValue,
    /// Cancelled when the client leaves, for a request that runs on
    /// without it once a worker has it (see `AppService::respond_to_the_end`).
    pub left: Option<tokio_util::sync::CancellationToken>,
}

impl ClientInfo {
    /// The request id as text (always visible ASCII).
    pub fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("-")
    }
}

/// Forwards requests to one app's workers.
#[derive(Debug, Clone)]
pub struct Proxy {
    pool: Arc<Pool>,
    upstream_timeout: Duration,
    queue_timeout: Duration,
    /// Next.js: the workers' shared cache state.
    next: Option<Arc<NextLink>>,
}

/// A worker's answer, and which worker gave it.
#[derive(Debug)]
pub struct Forwarded {
    pub response: Response<Body>,
    pub worker: usize,
}

/// [`nextcache::PRIMARY_HEADER`] as a name (a lookup by text would parse
/// it each time).
const PRIMARY_HEADER: HeaderName = HeaderName::from_static(nextcache::PRIMARY_HEADER);

impl Proxy {
    pub fn new(pool: Arc<Pool>, upstream_timeout: Duration, queue_timeout: Duration) -> Self {
        Proxy {
            pool,
            upstream_timeout,
            queue_timeout,
            next: None,
        }
    }

    /// With a Next.js app's link ([`crate::nextcache`]): requests say which
    /// URL bext caches them under, and a response that follows one of its
    /// worker's revalidations waits until the revalidation has been applied.
    pub fn with_next(mut self, next: Option<Arc<NextLink>>) -> Self {
        self.next = next;
        self
    }

    /// Sends `req` to the least-busy ready worker.
    pub async fn forward(
        &self,
        mut req: Request<Body>,
        client: &ClientInfo,
    ) -> Result<Forwarded, ProxyError> {
        // Only bext says which URL it caches an answer under.
        let primary = self
            .next
            .as_ref()
            .map(|_| crate::cache::key::primary(&req))
            .filter(|p| p.len() <= nextcache::MAX_PRIMARY)
            .and_then(|p| crate::cache::key::primary_to_header(&p));
        req.headers_mut().remove(&PRIMARY_HEADER);
        // (Its tag, if an answer needs one, is made then: few do.)
        let next_uri = self.next.as_ref().map(|_| req.uri().clone());
        if let Some(primary) = primary {
            req.headers_mut().insert(PRIMARY_HEADER, primary);
        }
        let upgrade =
            headers::is_websocket_upgrade(req.headers()) && req.version() == Version::HTTP_11;
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();

        // The worker sees an HTTP/1.1 request with the client's Host (an
        // HTTP/2 client sends it as the `:authority`), whatever the client's
        // `Connection` header names.
        let host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
        });
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        if let Some(host) = &host
            && !parts.headers.contains_key(header::HOST)
        {
            parts.headers.insert(header::HOST, host.clone());
        }
        headers::set_forwarded(
            &mut parts.headers,
            &client.peer,
            client.trusted_peer,
            client.scheme,
            host.as_ref(),
            &client.request_id,
        );
        // Origin-form (`/path?query`), as a server expects from a client;
        // the bytes are shared with the client's request, not copied.
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            parts.uri = Uri::from(
                parts
                    .uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            );
        }
        parts.version = Version::HTTP_11;
        // Nothing the client's connection attached is meant for the worker's.
        parts.extensions.clear();
        // A bodiless safe request may be sent again to another worker
        // (if the app has one) when this one fails it: keep a copy for that.
        let retry_allowed = http_body::Body::is_end_stream(&body)
            // Safe methods (GET, HEAD, OPTIONS, TRACE), as the upstream
            // pool's own resend on a fresh connection.
            && parts.method.is_safe()
            && !upgrade
            && self.pool.size() > 1;
        let mut req = Request::from_parts(parts, body);

        let mut retrying = None;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let lease = match retrying.take() {
                None => match self.acquire(client).await? {
                    Some(lease) => lease,
                    None => {
                        return Err(match self.pool.down() {
                            Some(why) => ProxyError::Down(why),
                            None => ProxyError::NoReadyWorker(self.queue_timeout),
                        });
                    }
                },
                // A retry goes to another worker that is ready now, or not
                // at all: waiting would only add to the failure.
                Some((failed, error)) => match self.pool.try_acquire(Some(failed)) {
                    Some(lease) => {
                        warn!(
                            request_id = client.request_id(),
                            "{error}; retrying on another worker"
                        );
                        lease
                    }
                    None => return Err(error),
                },
            };
            let worker = lease.worker().index;
            let again = (retry_allowed && attempt < MAX_ATTEMPTS).then(|| bodiless_copy(&req));

            let sent = lease
                .worker()
                .upstream()
                .send(req, self.upstream_timeout)
                .await;
            let error = match sent {
                Ok(mut response) => {
                    if let Some(next) = &self.next
                        && let Some(sync) = response.headers_mut().remove(nextcache::SYNC_HEADER)
                        && let Some((pid, n)) = sync.to_str().ok().and_then(parse_sync)
                    {
                        next.settle(pid, n).await;
                    }
                    // An answer from Next's cache that names no tags (Next
                    // answered it from another request's lookup): its
                    // path's, so that revalidating the path reaches it.
                    if let Some(uri) = &next_uri
                        && response.headers().contains_key("x-nextjs-cache")
                        && !response.headers().contains_key("x-next-cache-tags")
                        && let Some(tag) = nextcache::fallback_tag(uri.path())
                    {
                        response
                            .headers_mut()
                            .insert(HeaderName::from_static("x-next-cache-tags"), tag);
                    }
                    return Ok(Forwarded {
                        response: finish(response, lease, client_upgrade),
                        worker,
                    });
                }
                Err(e) => ProxyError::from_upstream(worker, e),
            };
            if let Some(again) = again
                && error.retryable()
            {
                req = again;
                retrying = Some((lease.worker().id, error));
                continue;
            }
            return Err(error);
        }
    }
}

impl Proxy {
    /// A worker for the request; [`ProxyError::ClientLeft`] when the client
    /// of a request that would run on without it leaves while it waits for
    /// one (a free worker takes it even if its client already left).
    async fn acquire(&self, client: &ClientInfo) -> Result<Option<Lease>, ProxyError> {
        let Some(left) = &client.left else {
            return Ok(self.pool.acquire(self.queue_timeout, None).await);
        };
        if let Some(lease) = self.pool.try_acquire(None) {
            return Ok(Some(lease));
        }
        tokio::select! {
            biased;
            () = left.cancelled() => Err(ProxyError::ClientLeft),
            lease = self.pool.acquire(self.queue_timeout, None) => Ok(lease),
        }
    }
}

/// `PID:N` of [`nextcache::SYNC_HEADER`].
fn parse_sync(value: &str) -> Option<(u32, u64)> {
    let (pid, n) = value.split_once(':')?;
    Some((pid.parse().ok()?, n.parse().ok()?))
}

/// `req` again, for another attempt (its body was empty).
fn bodiless_copy(req: &Request<Body>) -> Request<Body> {
    let mut copy = Request::new(body::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// Ties the lease to the worker's response body (or, for an accepted
/// upgrade, to the tunnel). Hop-by-hop headers were already left out when
/// the response head was read ([`crate::pool`]), except `Upgrade` on a 101.
fn finish(
    mut response: Response<UpstreamBody>,
    lease: Lease,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<Body> {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return response.map(|upstream| body::boxed(WithGuard::new(upstream, lease)));
    }
    headers::strip_hop_by_hop(response.headers_mut(), client_upgrade.is_some());
    let (parts, upstream) = response.into_parts();
    if let Some(client_upgrade) = client_upgrade
        && let Some((worker, early)) = upstream.into_upgraded()
    {
        tokio::spawn(tunnel(client_upgrade, worker, early, lease));
    }
    Response::from_parts(parts, body::empty())
}

/// Copies bytes both ways between the upgraded client connection and the
/// worker's until either side closes; `early` is what the worker sent right
/// after its 101.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    mut worker: tokio::net::UnixStream,
    early: bytes::BytesMut,
    lease: Lease,
) {
    let mut client = match client.await {
        Ok(client) => TokioIo::new(client),
        Err(e) => {
            debug!("upgrade failed: {e}");
            return;
        }
    };
    if !early.is_empty()
        && let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut client, &early).await
    {
        debug!("tunnel closed: {e}");
        return;
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut worker).await {
        debug!("tunnel closed: {e}");
    }
    drop(lease);
}

/// One client request's way to the workers: the proxy and who is asking.
/// The cache fills through it ([`Fill`]); it remembers which worker
/// answered, for the access log. A clone (a background revalidation) starts
/// with no worker recorded.
#[derive(Debug)]
pub struct ClientFill {
    proxy: Proxy,
    client: ClientInfo,
    served_by: AtomicUsize,
}

const NO_WORKER: usize = usize::MAX;

impl ClientFill {
    pub fn new(proxy: Proxy, client: ClientInfo) -> Self {
        ClientFill {
            proxy,
            client,
            served_by: AtomicUsize::new(NO_WORKER),
        }
    }

    /// The worker that answered this request's last fetch, if any.
    pub fn served_by(&self) -> Option<usize> {
        Some(self.served_by.load(Ordering::Relaxed)).filter(|&w| w != NO_WORKER)
    }
}

impl Clone for ClientFill {
    fn clone(&self) -> Self {
        ClientFill::new(self.proxy.clone(), self.client.clone())
    }
}

/// Failures come back as the proxy's error responses.
impl Fill for ClientFill {
    async fn fetch(&self, req: Request<Body>) -> Response<Body> {
        match self.proxy.forward(req, &self.client).await {
            Ok(forwarded) => {
                self.served_by.store(forwarded.worker, Ordering::Relaxed);
                forwarded.response
            }
            Err(e) => e.into_response(self.client.request_id()),
        }
    }
}

impl ClientInfo {
    /// A request bext makes on its own behalf.
    pub fn internal() -> Self {
        ClientInfo {
            peer: Peer::new(SocketAddr::from(([127, 0, 0, 1], 0))),
            trusted_peer: false,
            scheme: "http",
            request_id: headers::new_request_id(),
            left: None,
        }
    }
}
