//! Filling the cache from the app: the blocking miss (with its waiters), the
//! background revalidation of a stale entry, and turning one response into
//! a stored object.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;

use super::object::{Freshness, Object};
use super::policy::{self, Verdict};
use super::respond::{self, Served};
use super::store::Store;
use super::{Fill, IsrCache, Lead, Outcome, key};
use super::{PASS_MEMORY, Pass, UrlInfo};
use crate::body::{self, Body};
use crate::config::RouteRule;

/// What one fill produced.
enum Fetched {
    Stored(Arc<Object>, http::Extensions),
    /// A usable response that may not be stored, and why.
    NotStored(Response<Body>, &'static str),
    /// The app failed (5xx, or the body broke off).
    Failed(Response<Body>),
}

/// The fleet's lease on a key this instance renders: given back if the
/// render is dropped unfinished (its client went away), so that the
/// instances waiting for it take over at once, not when it runs out.
struct LeaseGuard<S: Store> {
    cache: Option<Arc<IsrCache<S>>>,
    key: String,
}

impl<S: Store> Drop for LeaseGuard<S> {
    fn drop(&mut self) {
        if let Some(cache) = self.cache.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let key = std::mem::take(&mut self.key);
            runtime.spawn(async move { cache.store.release(&key).await });
        }
    }
}

/// The longest one instance holds the fleet's lease on a key (and the
/// others wait for its render): a holder that died or lost Redis delays
/// them by this at most; a render that takes longer may be made twice.
const FLEET_LEASE: Duration = Duration::from_secs(10);

/// See [`IsrCache::fleet_turn`].
enum Turn {
    Ours,
    Theirs(Arc<Object>),
    TimedOut,
    /// Another instance found it not storable: every instance asks its app.
    Uncacheable,
}

/// Request headers a fill must not pass on: the cache wants a whole,
/// identity-encoded representation, whatever this client already has.
const CLIENT_ONLY: [header::HeaderName; 6] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
    header::RANGE,
];

/// Headers a 304 must not change in the stored response (RFC 9111 §3.2).
const KEPT_ON_304: [&str; 5] = [
    "content-length",
    "content-encoding",
    "content-md5",
    "content-range",
    "etag",
];

/// The request a fill sends: GET (a HEAD is filled with a GET, so it can be
/// stored), without the client's conditionals and ranges, asking for an
/// identity body, announcing bext as a surrogate, and conditional on the
/// validators of `previous` (a stored copy that needs revalidating).
fn fill_request(
    method: &Method,
    uri: &http::Uri,
    headers: &HeaderMap,
    extensions: http::Extensions,
    previous: Option<&Object>,
) -> Request<Body> {
    let mut req = Request::new(body::empty());
    *req.method_mut() = if method == Method::HEAD {
        Method::GET
    } else {
        method.clone()
    };
    *req.uri_mut() = uri.clone();
    let mut headers = headers.clone();
    for name in CLIENT_ONLY {
        headers.remove(name);
    }
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    headers.insert(
        "surrogate-capability",
        HeaderValue::from_static(policy::SURROGATE_CAPABILITY),
    );
    if let Some(previous) = previous.filter(|p| p.status.is_success()) {
        if let Some(etag) = previous.headers.get(header::ETAG) {
            headers.insert(header::IF_NONE_MATCH, etag.clone());
        }
        if let Some(modified) = previous.headers.get(header::LAST_MODIFIED) {
            headers.insert(header::IF_MODIFIED_SINCE, modified.clone());
        }
    }
    *req.headers_mut() = headers;
    *req.extensions_mut() = extensions;
    req
}

/// The stored headers, freshened by a 304's (RFC 9111 §3.2).
fn freshen(stored: &HeaderMap, not_modified: &HeaderMap) -> HeaderMap {
    let mut headers = stored.clone();
    for name in not_modified.keys() {
        if KEPT_ON_304.contains(&name.as_str()) {
            continue;
        }
        headers.remove(name);
        for value in not_modified.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}

impl<S: Store> IsrCache<S> {
    /// A blocking miss: fetch (conditionally, if there is a `previous`
    /// copy), store if allowed, answer; a failing app is stood in for by
    /// `previous` if it is within its stale-if-error window.
    #[allow(
        clippy::too_many_arguments,
        reason = "the request's facets, computed once by the caller"
    )]
    pub(super) async fn miss<F: Fill>(
        self: &Arc<Self>,
        req: Request<Body>,
        key: &str,
        primary: &str,
        rule: Option<&RouteRule>,
        fill: &F,
        previous: Option<Arc<Object>>,
        lead: Option<Lead<S>>,
    ) -> Response<Body> {
        let (parts, _) = req.into_parts();
        let client = Request::from_parts(parts, ());
        let accepted = client
            .extensions()
            .get::<crate::compress::Accepted>()
            .copied()
            .unwrap_or_default();
        let settings = **self.compression.load();
        let fill_req = fill_request(
            client.method(),
            client.uri(),
            client.headers(),
            client.extensions().clone(),
            previous.as_deref(),
        );
        // Edge mode: one render for the fleet here too. While another
        // instance renders this key, its result is awaited in the shared
        // store (up to the usual wait); without a shared store this is
        // always this instance's turn, at no cost.
        let mut leased = None;
        if lead.is_some() {
            match self.fleet_turn(key, primary, client.headers()).await {
                Turn::Ours => {
                    leased = Some(LeaseGuard {
                        cache: Some(Arc::clone(self)),
                        key: key.to_string(),
                    });
                }
                Turn::Theirs(object)
                    if object.matches(client.headers())
                        && (!client.headers().contains_key(header::AUTHORIZATION)
                            || object.shared_with_auth) =>
                {
                    self.counters.coalesced.inc();
                    if let Some(lead) = lead {
                        lead.finish(Outcome::Stored(Arc::clone(&object)));
                    }
                    return self
                        .answer(
                            &client,
                            &accepted,
                            &object,
                            Served::Miss { collapsed: true },
                            SystemTime::now(),
                        )
                        .await;
                }
                Turn::Theirs(_) | Turn::TimedOut | Turn::Uncacheable => {}
            }
        }
        let fetched = self
            .fetch_and_store(
                fill_req,
                client.headers(),
                fill,
                primary,
                rule,
                previous.clone(),
            )
            .await;
        if let Some(mut lease) = leased
            && let Some(cache) = lease.cache.take()
        {
            // Not storable (for everyone, not for this client's
            // credentials): the others waiting go to their apps at once.
            let uncacheable = matches!(fetched, Fetched::NotStored(..))
                && !client.headers().contains_key(header::AUTHORIZATION);
            if uncacheable {
                cache.store.release_as_pass(key, super::PASS_MEMORY).await;
            } else {
                cache.store.release(key).await;
            }
        }
        let with_copy = previous.is_some();
        let fallback =
            previous.filter(|p| p.freshness(SystemTime::now()) == Freshness::StaleIfError);
        // Only a leader records "not storable": a request that got here
        // because the record exists, or that waited for a leader who made
        // it, need not write it again (writes cost more than reads).
        let leading = lead.is_some();
        if let Some(lead) = lead {
            lead.finish(match &fetched {
                Fetched::Stored(object, _) => Outcome::Stored(Arc::clone(object)),
                _ => Outcome::NotShared,
            });
        }
        let head = client.method() == Method::HEAD;
        match fetched {
            Fetched::Stored(object, extensions) => {
                self.counters.misses.inc();
                self.pass.invalidate(key);
                let mut response = self
                    .answer(
                        &client,
                        &accepted,
                        &object,
                        Served::Miss { collapsed: false },
                        SystemTime::now(),
                    )
                    .await;
                response.extensions_mut().extend(extensions);
                response
            }
            Fetched::NotStored(mut response, reason) => {
                self.counters.bypasses.inc();
                // Not for a request with credentials: the verdict may be
                // about them, and must not make the key pass for others.
                if leading && !client.headers().contains_key(header::AUTHORIZATION) {
                    self.remember_pass(key, primary, Pass { reason, with_copy });
                }
                let status = response.status();
                respond::mark(response.headers_mut(), Served::NotStored(status, reason));
                if head {
                    *response.body_mut() = body::empty();
                }
                crate::compress::compress_streamed(&settings, &accepted, &mut response, head);
                response
            }
            Fetched::Failed(response) => match fallback {
                Some(object) => {
                    self.counters.stale.inc();
                    tracing::warn!(status = response.status().as_u16(), path = %object.path, "the app failed; serving a stale copy (stale-if-error)");
                    self.answer(
                        &client,
                        &accepted,
                        &object,
                        Served::StaleIfError(response.status()),
                        SystemTime::now(),
                    )
                    .await
                }
                None => {
                    self.counters.misses.inc();
                    let mut response = response;
                    let status = response.status();
                    respond::mark(response.headers_mut(), Served::Failed(status));
                    if head {
                        *response.body_mut() = body::empty();
                    }
                    crate::compress::compress_streamed(&settings, &accepted, &mut response, head);
                    response
                }
            },
        }
    }

    /// Whose turn it is to render `key` in the fleet: this instance's
    /// (it holds the lease, or nothing is shared), or another's, whose
    /// result is awaited in the shared store: polled (10 ms, doubling to
    /// 100 ms) until it is there, the lease is free again (the render was
    /// not storable, or its instance went away: this one takes over), or
    /// the wait runs out.
    async fn fleet_turn(&self, key: &str, primary: &str, headers: &HeaderMap) -> Turn {
        let hold = self.wait_timeout.min(FLEET_LEASE);
        if self.store.lease(key, hold).await {
            return Turn::Ours;
        }
        let deadline = tokio::time::Instant::now() + hold;
        let mut pause = Duration::from_millis(10);
        loop {
            tokio::time::sleep_until((tokio::time::Instant::now() + pause).min(deadline)).await;
            if let Some(object) = self.their_render(key, primary, headers).await {
                return Turn::Theirs(object);
            }
            if self.store.shared_pass(key).await {
                return Turn::Uncacheable;
            }
            if self.store.lease(key, hold).await {
                // Stored just before it was given back?
                if let Some(object) = self.their_render(key, primary, headers).await {
                    self.store.release(key).await;
                    return Turn::Theirs(object);
                }
                return Turn::Ours;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::debug!(
                    key,
                    "another instance's render did not come in time; rendering here"
                );
                return Turn::TimedOut;
            }
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// What another instance's render of `key` stored, fresh: under `key`,
    /// or, for a URL whose Vary names were not known when `key` was made
    /// from it (a cold page), under the variant of these request headers,
    /// which the render's Vary names (shared with it) tell.
    async fn their_render(
        &self,
        key: &str,
        primary: &str,
        headers: &HeaderMap,
    ) -> Option<Arc<Object>> {
        let fresh = |o: &Arc<Object>| o.freshness(SystemTime::now()) == Freshness::Fresh;
        if key != primary {
            return self.store.get(key).await.filter(fresh);
        }
        // One lookup tells the URL's Vary names and, unvaried, brings its
        // object into memory.
        match self.store.shared_vary(primary).await {
            Some(vary) if !vary.is_empty() => {
                let variant = super::key::full(primary, headers, &vary).into_owned();
                self.index.insert(
                    primary.to_string(),
                    Arc::new(UrlInfo {
                        vary: vary.into(),
                        pass: None,
                    }),
                );
                self.store.get(&variant).await.filter(fresh)
            }
            _ => self.store.get(key).await.filter(fresh),
        }
    }

    /// Records that `key` was found not storable (hit-for-pass): in the
    /// URL's index entry when the response did not vary, else by full key.
    fn remember_pass(&self, key: &str, primary: &str, pass: Pass) {
        // A response stored meanwhile may have given the URL Vary names:
        // those must stay (the marker then goes by full key, where no
        // lookup of the unvaried key will find it, as it should not).
        if key != primary || self.index.get(primary).is_some_and(|i| !i.vary.is_empty()) {
            self.pass.insert(key.to_string(), pass);
            return;
        }
        let until = std::time::Instant::now() + PASS_MEMORY;
        let epoch = self.purge_epoch.load(Ordering::Relaxed);
        self.index.insert(
            primary.to_string(),
            Arc::new(UrlInfo {
                vary: Arc::from([]),
                pass: Some((pass, until, epoch)),
            }),
        );
    }

    /// Starts one background revalidation of a stale entry, unless a fill
    /// for its key is already running.
    pub(super) fn revalidate<F: Fill>(
        self: &Arc<Self>,
        key: &str,
        primary: &str,
        req: &Request<Body>,
        rule: Option<RouteRule>,
        fill: &F,
        stale: &Arc<Object>,
    ) {
        let Some(lead) = self.lead_if_idle(key) else {
            return;
        };
        self.counters.revalidations.inc();
        let fill_req = fill_request(
            req.method(),
            req.uri(),
            req.headers(),
            req.extensions().clone(),
            Some(stale),
        );
        let client_headers = req.headers().clone();
        let (cache, fill, primary, stale) = (
            Arc::clone(self),
            fill.clone(),
            primary.to_string(),
            Arc::clone(stale),
        );
        let key = key.to_string();
        tokio::spawn(async move {
            // Edge mode: one instance of the fleet renders; the others keep
            // serving the stale copy until the new one is in the shared
            // store (then they take it from there).
            if !cache
                .store
                .lease(&key, cache.wait_timeout.min(FLEET_LEASE))
                .await
            {
                tracing::debug!(%primary, "another instance revalidates it");
                lead.finish(Outcome::NotShared);
                return;
            }
            // Another instance may have rendered it and let the lease go
            // between this instance's stale read and now: its render is
            // taken, not made again (one render for the fleet). Only a
            // render newer than the stale copy (never one from before a
            // purge whose shared part failed).
            if let Some(newer) = cache.store.get(&key).await
                && !Arc::ptr_eq(&newer, &stale)
                && newer.stored_at > stale.stored_at
                && newer.freshness(SystemTime::now()) == Freshness::Fresh
            {
                tracing::debug!(%primary, "another instance revalidated it");
                cache.store.release(&key).await;
                lead.finish(Outcome::Stored(newer));
                return;
            }
            let fetched = cache
                .fetch_and_store(
                    fill_req,
                    &client_headers,
                    &fill,
                    &primary,
                    rule.as_ref(),
                    Some(stale),
                )
                .await;
            cache.store.release(&key).await;
            match fetched {
                Fetched::Stored(object, _) => lead.finish(Outcome::Stored(object)),
                Fetched::NotStored(_, reason) => {
                    tracing::debug!(%primary, reason, "revalidation answer not storable; keeping the stale entry");
                    lead.finish(Outcome::NotShared);
                }
                Fetched::Failed(response) => {
                    tracing::warn!(%primary, status = response.status().as_u16(), "background revalidation failed; keeping the stale entry");
                    lead.finish(Outcome::NotShared);
                }
            }
        });
    }

    /// Fetches `req` (a [`fill_request`]) through `fill` and stores the
    /// answer if the policy allows; the variant is keyed on the headers of
    /// the client request it was made for.
    async fn fetch_and_store<F: Fill>(
        self: &Arc<Self>,
        req: Request<Body>,
        request_headers: &HeaderMap,
        fill: &F,
        primary: &str,
        rule: Option<&RouteRule>,
        previous: Option<Arc<Object>>,
    ) -> Fetched {
        let epoch = self.purge_epoch.load(Ordering::Relaxed);
        let uri = req.uri().clone();
        let has_auth = request_headers.contains_key(header::AUTHORIZATION);
        let conditional = req.headers().contains_key(header::IF_NONE_MATCH)
            || req.headers().contains_key(header::IF_MODIFIED_SINCE);
        let mut response = fill.fetch(req).await;
        let mut freshened_from = None;
        if response.status().is_server_error() {
            return Fetched::Failed(response);
        }
        // Still valid: the stored body with the 304's headers.
        if response.status() == StatusCode::NOT_MODIFIED
            && conditional
            && let Some(previous) = &previous
        {
            let (parts, _) = response.into_parts();
            let mut freshened = Response::new(body::full(previous.body.clone()));
            *freshened.status_mut() = previous.status;
            *freshened.headers_mut() = freshen(&previous.headers, &parts.headers);
            freshened.headers_mut().insert(
                header::CONTENT_LENGTH,
                HeaderValue::from(previous.body.len()),
            );
            *freshened.extensions_mut() = parts.extensions;
            response = freshened;
            freshened_from = Some(Arc::clone(previous));
        }
        let now = SystemTime::now();
        let verdict = policy::response_verdict(
            response.status(),
            response.headers(),
            has_auth,
            rule,
            &self.settings,
            now,
        );
        let Verdict::Store {
            mut lifetime,
            shared_with_auth,
        } = verdict
        else {
            let Verdict::Pass(reason) = verdict else {
                unreachable!("matched Store above")
            };
            let mut response = response;
            respond::strip_internal_headers(response.headers_mut());
            return Fetched::NotStored(response, reason);
        };
        let max = self.settings.max_entry_bytes.bytes();
        let declared = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > max) {
            let mut response = response;
            respond::strip_internal_headers(response.headers_mut());
            return Fetched::NotStored(response, "too-large");
        }
        let (mut parts, body) = response.into_parts();
        let bytes = match collect_limited(body, max).await {
            Collected::All(bytes) => bytes,
            Collected::TooLarge(prefix, rest) => {
                respond::strip_internal_headers(&mut parts.headers);
                let body = body::boxed(body::Prefixed::new(prefix, rest));
                return Fetched::NotStored(Response::from_parts(parts, body), "too-large");
            }
            Collected::Broken(e) => {
                tracing::warn!(path = %uri.path(), "the app's response broke off: {e}");
                let mut failed = Response::new(body::full("502 bad gateway\n"));
                *failed.status_mut() = StatusCode::BAD_GATEWAY;
                return Fetched::Failed(failed);
            }
        };

        // Stacked staleness: Next.js answered from its own stale copy while
        // it regenerates. Storing that as fresh would double how long old
        // content lives, so it is stored already stale: the next request
        // revalidates again and gets the regenerated page.
        if parts
            .headers
            .get("x-nextjs-cache")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"STALE"))
        {
            lifetime.ttl = Duration::ZERO;
        }
        let mut tags = respond::take_tags(&mut parts.headers);
        // A 304 that names no tags keeps the stored copy's.
        if tags.is_empty()
            && let Some(previous) = &freshened_from
        {
            tags = previous.tags.clone();
        }
        let initial_age = policy::upstream_age(&parts.headers);
        for name in [header::AGE, header::CONTENT_LENGTH, header::SET_COOKIE] {
            parts.headers.remove(name);
        }
        respond::unmark(&mut parts.headers);
        // Every answer from it will vary on Accept-Encoding (if it may be
        // compressed at all: a body under min_size never is): said once
        // here, not on every hit.
        let compression = self.compression.load();
        if compression.enabled
            && bytes.len() as u64 >= compression.min_size
            && crate::compress::candidate(parts.status, &parts.headers)
        {
            crate::compress::add_vary(&mut parts.headers);
        }
        let names = key::vary_names(&parts.headers);
        let vary = key::vary_values(request_headers, &names);
        let full_key = key::full(primary, request_headers, &names);
        let object = Arc::new(Object::new(
            parts.status,
            parts.headers,
            bytes,
            initial_age,
            lifetime,
            tags,
            (uri.path().to_string(), primary.to_string()),
            vary,
            shared_with_auth,
        ));
        if self.purge_epoch.load(Ordering::Relaxed) != epoch {
            // A purge ran while this was being fetched: the answer may
            // predate it.
            object.soft_purge();
        }
        // A revalidated page stays compressed: the same body keeps its
        // variants; a new body gets the ones clients asked for, made now.
        let remake: Vec<_> = match (&freshened_from, &previous) {
            (Some(same), _) => {
                object.adopt_variants(same);
                Vec::new()
            }
            (None, Some(previous)) => previous.codings_made().collect(),
            (None, None) => Vec::new(),
        };
        self.index.insert(
            primary.to_string(),
            Arc::new(UrlInfo {
                vary: Arc::from(names),
                pass: None,
            }),
        );
        self.store
            .insert(full_key.into_owned(), Arc::clone(&object))
            .await;
        let settings = **self.compression.load();
        for coding in remake {
            self.start_variant(&object, coding, &settings);
        }
        Fetched::Stored(object, parts.extensions)
    }
}

enum Collected {
    All(Bytes),
    /// Over the limit: what was read, and the rest of the body.
    TooLarge(Bytes, Body),
    Broken(crate::body::BoxError),
}

/// Reads a body whole, up to `max` bytes.
async fn collect_limited(mut body: Body, max: u64) -> Collected {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => return Collected::Broken(e),
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if (buf.len() + data.len()) as u64 > max {
            buf.extend_from_slice(&data);
            return Collected::TooLarge(buf.freeze(), body);
        }
        buf.extend_from_slice(&data);
    }
    Collected::All(buf.freeze())
}
