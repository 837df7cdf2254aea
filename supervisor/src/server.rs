//! The wiring module: the only place that knows every layer of one app's
//! request path and puts them in order:
//!
//! ```text
//! request id + access log + metrics → /__bext/ endpoints → rate limiter
//!     → static files → ISR cache → proxy → worker pool
//! ```
//!
//! In multi-app mode the Host router ([`crate::router`]) picks the app
//! first; everything after is the app's own.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use http::{HeaderValue, Request, Response, StatusCode, header};
use ipnet::IpNet;

use tokio_util::sync::CancellationToken;

use crate::access_log::{Logged, Record, Unanswered};
use crate::admin::{self, Admin};
use crate::body::{self, Body, WithGuard};
use crate::cache::{Fill, IsrCache, respond};
use crate::compress;
use crate::listener::{Handler, Now, Peer, Plain, Written};
use crate::metrics::AppCounters;
use crate::proxy::{ClientFill, ClientInfo, Proxy, headers};
use crate::ratelimit::{Decision, RateLimiter};
use crate::statics::{self, Outcome, StaticFiles};

/// Everything that answers requests for one app.
#[derive(Debug)]
pub struct AppService {
    pub app: Arc<str>,
    pub admin: Admin,
    pub statics: Arc<StaticFiles>,
    /// Static files of the app's retained versions, newest first: a page
    /// of the previous build still asks for its content-hashed assets.
    pub older_statics: Arc<[Arc<StaticFiles>]>,
    /// The way to the app's workers; `None` for a static site.
    pub proxy: Option<Proxy>,
    /// `None` when `[cache.isr] enabled = false`.
    pub cache: Option<Arc<IsrCache>>,
    /// `None` without `rate_limit.rpm`.
    pub limiter: Option<Arc<RateLimiter>>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Arc<[IpNet]>,
    pub counters: AppCounters,
    pub access_log: bool,
    /// Requests being answered (a removed app drains until zero).
    pub inflight: Arc<AtomicUsize>,
    /// Unsafe requests running on after their clients left.
    pub orphans: Arc<AtomicUsize>,
    /// `Strict-Transport-Security` for answers over HTTPS (`tls.hsts`).
    pub hsts: arc_swap::ArcSwapOption<HeaderValue>,
    /// `[compression]`: what the app sends is compressed here.
    pub compression: compress::Settings,
    /// `bext dev` (without `--cache`): no cache, but every answer says what
    /// it would have done ([`crate::cache::preview`]).
    pub preview: Option<Arc<crate::config::IsrConfig>>,
    /// `bext dev`, a static site: HTML pages reload when a file changes.
    pub live_reload: Option<crate::dev::LiveReload>,
}

/// What [`AppService::answer_here`] could do for a request.
enum Here {
    Answer(Response<Body>),
    /// A fresh hit written as head bytes ([`crate::cache::Hit::Written`]).
    Written(crate::cache::WrittenHit),
    /// Not a static file nor a fresh hit: on to the app, with the
    /// request's `Accept-Encoding` read.
    AskApp(compress::Accepted, Option<crate::cache::Looked>),
    /// Not for here: the full way ([`AppService::respond`]).
    No,
}

/// Counts a request as in flight until its response body is done.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(counter))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Requests of one app that run on after their clients left (see
/// [`AppService::respond_to_the_end`]); past this, the next one is cut.
const MAX_ORPHANS: usize = 64;

/// An unsafe request's way to its end: when dropped armed (its client
/// left), the request is cancelled if it still waits for a worker, and
/// cut if too many of the app's requests already run without a client.
struct Abandon {
    armed: bool,
    left: CancellationToken,
    task: tokio::task::AbortHandle,
    orphans: Arc<AtomicUsize>,
    orphaned: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.left.cancel();
        // Counted in first; whichever of this and the task's end comes
        // second counts it out (`orphaned` says who came first).
        let before = self.orphans.fetch_add(1, Ordering::AcqRel);
        if self.orphaned.swap(true, Ordering::AcqRel) {
            // The task has ended already.
            self.orphans.fetch_sub(1, Ordering::AcqRel);
        } else if before >= MAX_ORPHANS {
            self.task.abort();
        }
    }
}

/// Inside the task: counts it out of the orphans when it ends (or is cut).
struct Orphan {
    orphans: Arc<AtomicUsize>,
    orphaned: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Orphan {
    fn drop(&mut self) {
        if self.orphaned.swap(true, Ordering::AcqRel) {
            // Its client left first, and counted it in.
            self.orphans.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl AppService {
    /// An unsafe request (a form post, a server action) runs to its end
    /// once a worker has it, even if its client leaves: cut in the middle,
    /// a change the user asked for could be half made, or made with no
    /// answer in the app's log. (nginx cuts it unless told
    /// `proxy_ignore_client_abort on`.) The answer is then dropped; the
    /// wait is bounded by the upstream timeout. A request whose client
    /// leaves while it still waits for a worker is dropped, and at most
    /// [`MAX_ORPHANS`] run on at once per app.
    async fn respond_to_the_end(
        self: &Arc<Self>,
        req: Request<Body>,
        mut client: ClientInfo,
        client_ip: IpAddr,
    ) -> (Response<Body>, Option<usize>) {
        let left = CancellationToken::new();
        client.left = Some(left.clone());
        let orphaned = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let orphan = Orphan {
            orphans: Arc::clone(&self.orphans),
            orphaned: Arc::clone(&orphaned),
        };
        let service = Arc::clone(self);
        let task = tokio::spawn(async move {
            let _orphan = orphan;
            let _inflight = InFlight::new(&service.inflight);
            service.respond(req, client, client_ip).await
        });
        let mut abandon = Abandon {
            armed: true,
            left,
            task: task.abort_handle(),
            orphans: Arc::clone(&self.orphans),
            orphaned,
        };
        let answer = task
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        abandon.armed = false;
        answer
    }

    /// Sends `Strict-Transport-Security: max-age=…` on every HTTPS answer
    /// from now on (`None`: none).
    pub fn set_hsts(&self, max_age: Option<std::time::Duration>) {
        self.hsts.store(max_age.and_then(|age| {
            HeaderValue::from_str(&format!("max-age={}", age.as_secs()))
                .ok()
                .map(Arc::new)
        }));
    }

    /// The response, and which worker gave it (none for bext's own
    /// answers and cache hits).
    async fn respond(
        &self,
        req: Request<Body>,
        client: ClientInfo,
        client_ip: IpAddr,
    ) -> (Response<Body>, Option<usize>) {
        // bext's own endpoints first: never the app's, never cached or
        // rate-limited.
        if let Some(reload) = &self.live_reload
            && req.uri().path() == crate::dev::LiveReload::PATH
        {
            return (reload.events(), None);
        }
        if req.uri().path().starts_with(admin::PREFIX) {
            // Boxed, as every rarely taken path here: a request's future
            // is moved whole on every request, so it stays as small as
            // the common path needs.
            return (Box::pin(self.admin.handle(req, client_ip)).await, None);
        }
        // The rate limit, before any work is done for the request.
        let mut allowance = None;
        if let Some(limiter) = &self.limiter {
            match limiter.decide(client_ip).await {
                Decision::Allowed { remaining } => allowance = Some((limiter, remaining)),
                Decision::Limited { retry_after } => {
                    self.counters.rate_limited.inc();
                    return (limiter.refusal(retry_after), None);
                }
            }
        }
        let (mut response, worker) = self.answer(req, client).await;
        if let Some((limiter, remaining)) = allowance {
            limiter.annotate(response.headers_mut(), remaining);
        }
        (response, worker)
    }

    async fn answer(
        &self,
        mut req: Request<Body>,
        client: ClientInfo,
    ) -> (Response<Body>, Option<usize>) {
        if let Some(reload) = &self.live_reload {
            // Pages are answered uncompressed, to be given the script.
            req.headers_mut().remove(header::ACCEPT_ENCODING);
            if let Outcome::Response(response) = self.statics.serve(&req) {
                return (Box::pin(reload.inject(response)).await, None);
            }
        }
        if let Some(response) = self.static_file(&req) {
            return (response, None);
        }
        self.ask_app(req, client, None, None).await
    }

    /// Static files: answered from disk without a worker hop (a retained
    /// version's hashed asset for one the active version lacks).
    fn static_file<B>(&self, req: &Request<B>) -> Option<Response<Body>> {
        let Outcome::Response(response) = self.statics.serve(req) else {
            return None;
        };
        if response.status() == StatusCode::NOT_FOUND
            && let Some(older) = self.older_asset(req)
        {
            return Some(older);
        }
        Some(response)
    }

    /// A safe request answered without waiting for anything, as
    /// [`AppService::respond`] would answer it: a static file or a fresh
    /// cache hit. Most requests to a busy site are one of the two, and
    /// answered here they skip the layers of futures the rest needs.
    /// Given `write`, a plain hit may be written there as head bytes
    /// ([`Here::Written`]).
    fn answer_here<B>(
        &self,
        req: &Request<B>,
        fields: &crate::fields::Fields<'_>,
        write: Option<&mut Vec<u8>>,
    ) -> Here {
        // What `respond` does first, and what waits: not here.
        if self.live_reload.is_some()
            || self.limiter.is_some()
            || req.uri().path().starts_with(admin::PREFIX)
        {
            return Here::No;
        }
        if let Some(response) = self.static_file(req) {
            return Here::Answer(response);
        }
        let accepted = compress::Accepted::parse_fields(fields);
        // A cached 404 may be answered by a retained version instead
        // (below): not written then.
        let write = write.filter(|_| !self.may_have_older(req.uri().path()));
        let hit = match (&self.cache, &self.proxy) {
            (Some(cache), Some(_)) => cache.fresh_hit(req, fields, &accepted, write),
            _ => Err(None),
        };
        let mut response = match hit {
            Ok(crate::cache::Hit::Response(response)) => response,
            Ok(crate::cache::Hit::Written(hit)) => return Here::Written(hit),
            Err(looked) => return Here::AskApp(accepted, looked),
        };
        // As `ask_app`: a retained version's hashed asset for a 404.
        if response.status() == StatusCode::NOT_FOUND
            && self.may_have_older(req.uri().path())
            && let Some(older) = self.older_asset(req)
        {
            return Here::Answer(older);
        }
        respond::strip_internal_headers(response.headers_mut());
        Here::Answer(response)
    }

    /// The app's answer (through the cache), for a request that is not a
    /// static file; `accepted`: its `Accept-Encoding`, if already read.
    async fn ask_app(
        &self,
        mut req: Request<Body>,
        client: ClientInfo,
        accepted: Option<compress::Accepted>,
        looked: Option<crate::cache::Looked>,
    ) -> (Response<Body>, Option<usize>) {
        // A content-hashed asset the active version answers 404 for may be
        // a retained version's (a browser holding the old build's HTML).
        let probe = self.may_have_older(req.uri().path()).then(|| {
            let mut probe = Request::new(());
            *probe.method_mut() = req.method().clone();
            *probe.uri_mut() = req.uri().clone();
            *probe.headers_mut() = req.headers().clone();
            probe
        });
        let Some(proxy) = &self.proxy else {
            return (statics::plain(StatusCode::NOT_FOUND, "not found\n"), None);
        };
        let fill = ClientFill::new(proxy.clone(), client);
        // Compression happens at the edge: the app is asked for identity
        // bodies (by the cache's fills, or here), and the client gets a
        // coding it accepts.
        let accepted = accepted.unwrap_or_else(|| compress::Accepted::parse(req.headers()));
        // The cache in front of the workers; it reaches them through `fill`
        // and compresses what it answers.
        let mut response = match &self.cache {
            Some(cache) => cache.handle_looked(req, &fill, accepted, looked).await,
            None => {
                let head = req.method() == http::Method::HEAD;
                let preview = self
                    .preview
                    .as_deref()
                    .map(|settings| crate::cache::preview::Preview::of(settings, &req));
                if self.compression.enabled {
                    compress::ask_identity(req.headers_mut());
                }
                // Boxed: the fetch is large, and a cached app's requests
                // must not carry its room.
                let mut response = Box::pin(fill.fetch(req)).await;
                // The app's answers only: bext's own (the app is down) are
                // nothing the cache would see in production.
                if let Some(preview) = preview
                    && fill.served_by().is_some()
                {
                    let status = response.status();
                    preview.mark(status, response.headers_mut());
                }
                compress::compress_streamed(&self.compression, &accepted, &mut response, head);
                response
            }
        };
        // Purge tags and Surrogate-Control are for bext, never for clients:
        // this is the one place every answer from the app passes.
        respond::strip_internal_headers(response.headers_mut());
        if response.status() == StatusCode::NOT_FOUND
            && let Some(probe) = probe
            && let Some(older) = self.older_asset(&probe)
        {
            return (older, None);
        }
        (response, fill.served_by())
    }

    /// Whether a retained version may have the content-hashed asset
    /// `raw_path` names (the app's 404 for it is then worth a look there).
    fn may_have_older(&self, raw_path: &str) -> bool {
        self.older_statics
            .iter()
            .any(|s| s.may_have_hashed(raw_path))
    }

    /// A retained version's copy of the hashed asset `req` names.
    fn older_asset<B>(&self, req: &Request<B>) -> Option<Response<Body>> {
        self.older_statics.iter().find_map(|s| s.serve_hashed(req))
    }

    /// Requests of this app still being answered.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }
}

/// What a request of this app gets before it is answered.
struct Begun {
    guard: InFlight,
    client_ip: IpAddr,
    trusted_peer: bool,
    secure: bool,
    request_id: HeaderValue,
    record: Unanswered,
}

impl AppService {
    /// Whether the peer is a trusted proxy, and whether `req` is secure
    /// (marked on it): one scheme for the cache key and the app, the
    /// connection's or a trusted TLS-terminating proxy's
    /// `X-Forwarded-Proto`.
    fn scheme<B>(&self, req: &mut Request<B>, peer_ip: IpAddr) -> (bool, bool) {
        let trusted_peer = self
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&peer_ip));
        let secure = crate::listener::is_secure(req)
            || (trusted_peer && headers::forwarded_https(req.headers()));
        if secure {
            req.extensions_mut().insert(crate::listener::Secure);
        }
        (trusted_peer, secure)
    }

    /// The client, the request id and the access-log record, for a request
    /// whose scheme ([`AppService::scheme`]) is known: the same for every
    /// way a request is answered.
    fn begin<B>(
        &self,
        req: &Request<B>,
        fields: &crate::fields::Fields<'_>,
        peer: &Peer,
        (trusted_peer, secure): (bool, bool),
        started: Instant,
        guard: InFlight,
    ) -> Begun {
        let peer_ip = peer.addr.ip();
        let client_ip = headers::client_ip(peer_ip, req.headers(), &self.trusted_proxies);
        let request_id = headers::request_id(fields);
        // Boxed: it goes along with the request (moved at every step), and
        // on to its body.
        let record = Unanswered::new(self.access_log.then(|| {
            Box::new(Record {
                app: Arc::clone(&self.app),
                method: req.method().clone(),
                host: fields.host().cloned(),
                uri: req.uri().clone(),
                status: StatusCode::OK,
                worker: None,
                client: if client_ip == peer_ip {
                    peer.ip.clone()
                } else {
                    HeaderValue::from_str(&client_ip.to_string())
                        .unwrap_or_else(|_| HeaderValue::from_static("-"))
                },
                request_id: request_id.clone(),
                started,
                cache: None,
            })
        }));
        Begun {
            guard,
            client_ip,
            trusted_peer,
            secure,
            request_id,
            record,
        }
    }

    /// The fields every answer gets, the counters, and the access log when
    /// its body is done.
    fn finish(
        &self,
        begun: Begun,
        mut response: Response<Body>,
        worker: Option<usize>,
    ) -> Response<Body> {
        let record = begun.record.answered();
        response
            .headers_mut()
            .insert(headers::X_REQUEST_ID, begun.request_id);
        if begun.secure
            && let Some(hsts) = self.hsts.load().as_deref()
        {
            response
                .headers_mut()
                .insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
        self.counters.count(response.status());
        let record = record.map(|mut r| {
            if self.preview.is_some() {
                r.cache = response.headers().get(respond::CACHE_STATUS).cloned();
            }
            r.status = response.status();
            r.worker = worker;
            r
        });
        let guard = begun.guard;
        response.map(|b| body::boxed(WithGuard::new(Logged::new(b, record), guard)))
    }
}

impl AppService {
    /// [`AppService::finish`] for a hit written as head bytes into `head`.
    fn finish_written(
        &self,
        begun: Begun,
        hit: crate::cache::WrittenHit,
        head: &mut Vec<u8>,
    ) -> Written {
        let record = begun.record.answered();
        crate::listener::push_field(head, &headers::X_REQUEST_ID, &begun.request_id);
        self.counters.count(hit.status);
        Written {
            body: hit.body,
            dated: hit.dated,
            record: record.map(|mut r| {
                r.status = hit.status;
                r
            }),
            guard: begun.guard,
        }
    }
}

impl AppService {
    /// What [`Handler::handle`] does once [`AppService::answer_here`] has
    /// said what it could (`here`; [`Here::No`] for an unsafe request).
    async fn answer_later(
        self: Arc<Self>,
        req: Request<Body>,
        peer: Peer,
        begun: Begun,
        here: Here,
    ) -> Response<Body> {
        let client = ClientInfo {
            peer,
            trusted_peer: begun.trusted_peer,
            scheme: if begun.secure { "https" } else { "http" },
            request_id: begun.request_id.clone(),
            left: None,
        };
        let client_ip = begun.client_ip;
        let (response, worker) = if !req.method().is_safe() {
            self.respond_to_the_end(req, client, client_ip).await
        } else {
            match here {
                Here::Answer(response) => (response, None),
                Here::AskApp(accepted, looked) => {
                    self.ask_app(req, client, Some(accepted), looked).await
                }
                // (`Written` needs a buffer, and none was given.)
                Here::No | Here::Written(_) => self.respond(req, client, client_ip).await,
            }
        };
        self.finish(begun, response, worker)
    }
}

impl Handler for AppService {
    async fn handle(self: Arc<Self>, mut req: Request<Body>, peer: Peer) -> Response<Body> {
        let started = Instant::now();
        let guard = InFlight::new(&self.inflight);
        #[cfg(feature = "bench-ceiling")]
        if crate::ceiling::stage() == 2 {
            return crate::ceiling::fixed_response().map(|b| body::boxed(WithGuard::new(b, guard)));
        }
        let scheme = self.scheme(&mut req, peer.addr.ip());
        let fields = crate::fields::Fields::of(req.headers());
        let begun = self.begin(&req, &fields, &peer, scheme, started, guard);
        #[cfg(feature = "bench-ceiling")]
        if crate::ceiling::stage() == 3 {
            let record = begun.record.answered();
            return crate::ceiling::fixed_response()
                .map(|b| body::boxed(WithGuard::new(Logged::new(b, record), begun.guard)));
        }
        let here = if req.method().is_safe() {
            self.answer_here(&req, &fields, None)
        } else {
            Here::No
        };
        self.answer_later(req, peer, begun, here).await
    }

    fn answer_plain(
        self: &Arc<Self>,
        mut req: Request<()>,
        peer: &Peer,
        head: &mut Vec<u8>,
    ) -> Plain<impl Future<Output = Response<Body>> + Send + 'static + use<>> {
        let started = Instant::now();
        let guard = InFlight::new(&self.inflight);
        // The scheme first: it is part of the cache key.
        let scheme = self.scheme(&mut req, peer.addr.ip());
        // `finish` puts its own HSTS field over the app's: not written.
        let (_, secure) = scheme;
        let write = !(secure && self.hsts.load().is_some());
        let fields = crate::fields::Fields::of(req.headers());
        let here = self.answer_here(&req, &fields, write.then_some(&mut *head));
        let begun = self.begin(&req, &fields, peer, scheme, started, guard);
        match here {
            Here::Answer(response) => Plain::Now(Now::Response(self.finish(begun, response, None))),
            Here::Written(hit) => Plain::Now(Now::Written(self.finish_written(begun, hit, head))),
            // Boxed: the future is large; moved on its way to the
            // connection's loop, and an idle connection's state would
            // carry its room.
            here @ (Here::AskApp(..) | Here::No) => {
                Plain::Later(Box::pin(Arc::clone(self).answer_later(
                    req.map(|()| body::empty()),
                    peer.clone(),
                    begun,
                    here,
                )))
            }
        }
    }
}
