//! The ISR cache: one namespace per app, in front of its workers.
//!
//! - fresh → HIT; stale within stale-while-revalidate → STALE served at
//!   once plus exactly one background revalidation; past it → a blocking
//!   MISS; concurrent misses on one key share one fill ([`fill`]); an app
//!   that fails (5xx, timeout, no worker) is stood in for by an entry within
//!   its stale-if-error window.
//! - What may be stored and for how long is [`policy`]; keys are [`key`];
//!   stored responses are [`object`]s in a [`store::Store`].
//! - The cache reaches the app only through [`Fill`], a trait it owns and the
//!   proxy implements: it never imports the proxy, and Redis (edge mode) is
//!   one more `Store`.
//!
//! Responses say what happened: `x-bext-cache: HIT|STALE|MISS|BYPASS`,
//! `Age`, and an RFC 9211 `Cache-Status`.

mod fill;
pub mod key;
pub mod l2;
pub mod wire;

/// The hasher of the cache's key maps. The keys are URLs clients choose,
/// and moka's map probes by full key comparison with no bound, so the
/// hasher must resist HashDoS: aHash, keyed at random per map (as SipHash
/// is, at a fraction of its cost on a URL; foldhash, faster still, makes
/// no claim against an attacker who probes). Built without AES
/// instructions enabled, aHash uses its fallback, whose resistance is less
/// studied than SipHash's. See bench/RESULTS.md.
pub type KeyHasher = ahash::RandomState;
pub mod object;
pub mod policy;
pub mod preview;
pub mod respond;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, header};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;

use crate::body::Body;
use crate::config::{IsrConfig, RouteRule};
use object::{Freshness, Object};
use respond::Served;
use store::{Selector, Store};

pub use store::{MemoryStore, TieredStore};

/// How the cache reaches the app, for one client request. Failures come
/// back as responses (502, 503, 504 from bext, or the app's own 5xx): the
/// cache treats any 5xx as the app failing. A background revalidation runs
/// on a clone.
pub trait Fill: Clone + Send + Sync + 'static {
    fn fetch(&self, req: Request<Body>) -> impl Future<Output = Response<Body>> + Send;
}

/// Variant jobs one app may have waiting or running (see
/// [`IsrCache::start_variant`]).
pub const MAX_VARIANT_JOBS: usize = 16;

/// Counts a running job until dropped.
struct JobCount<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for JobCount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long "not storable" is remembered for a key: later requests go
/// straight to the app, uncoalesced and unstored (Varnish's hit-for-pass).
/// A page that turns cacheable is stored at most this much later; a purge
/// forgets every such marker at once.
pub const PASS_MEMORY: Duration = Duration::from_secs(10);

/// Response headers that carry purge tags; never sent to clients.
pub const TAG_HEADERS: [&str; 3] = ["x-cache-tags", "x-next-cache-tags", "surrogate-key"];

/// The cache's counters (exported by `/__bext/metrics`).
#[derive(Debug, Clone, Default)]
pub struct CacheCounters {
    pub hits: Counter,
    pub stale: Counter,
    pub misses: Counter,
    pub bypasses: Counter,
    pub coalesced: Counter,
    pub revalidations: Counter,
}

/// What [`IsrCache::fresh_hit`] looked up for a request it did not
/// answer, for [`IsrCache::handle_looked`] to go on from.
#[derive(Debug)]
pub struct Looked {
    primary: String,
    /// The URL's entry in the index (`None`: not there).
    info: Option<Arc<UrlInfo>>,
}

/// A fresh hit answered at once ([`IsrCache::fresh_hit`]).
#[derive(Debug)]
pub enum Hit {
    Response(Response<Body>),
    /// Written as HTTP/1.1 head bytes into the buffer given.
    Written(WrittenHit),
}

/// A hit whose status line and fields (all but `Date` when `dated` is
/// false, the request id and the connection's own) are written; what goes
/// with them.
#[derive(Debug)]
pub struct WrittenHit {
    pub status: http::StatusCode,
    /// The whole body; the fields give its length.
    pub body: Bytes,
    /// The fields include `Date`.
    pub dated: bool,
}

/// One app's cache.
pub struct IsrCache<S: Store = TieredStore> {
    store: S,
    /// What is known per primary key (one lookup per request).
    index: moka::sync::Cache<String, Arc<UrlInfo>, KeyHasher>,
    /// Keys of varied responses that were not storable, recently (those of
    /// unvaried ones are in `index`).
    pass: moka::sync::Cache<String, Pass, KeyHasher>,
    inflight: Mutex<HashMap<String, watch::Receiver<Option<Outcome>>>>,
    settings: IsrConfig,
    /// How long a request waits for another request's fill.
    wait_timeout: Duration,
    /// Bumped by every purge: a fill that raced a purge stores its object
    /// as already stale.
    purge_epoch: AtomicU64,
    pub counters: CacheCounters,
    /// How stored bodies are compressed for clients (the variants are made
    /// once per object and kept with it); a reload may change it.
    compression: arc_swap::ArcSwap<crate::compress::Settings>,
    /// Variant jobs waiting or running.
    variant_jobs: std::sync::atomic::AtomicUsize,
    /// A Next.js app's preview mode id: a request whose draft-mode cookie
    /// carries it sees the draft rendering, never the cache.
    draft_id: arc_swap::ArcSwapOption<String>,
}

impl<S: Store> std::fmt::Debug for IsrCache<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IsrCache")
            .field("stats", &self.store.stats())
            .finish_non_exhaustive()
    }
}

/// What the cache knows of one URL (primary key).
#[derive(Debug, Default)]
struct UrlInfo {
    /// The `Vary` names of its last stored response.
    vary: Arc<[HeaderName]>,
    /// For an unvaried URL: recently not storable, until when, as of which
    /// purge epoch (a purge forgets it).
    pass: Option<(Pass, Instant, u64)>,
}

/// An index entry that only holds a hit-for-pass marker goes when the
/// marker does (it must not crowd out the Vary names of stored URLs); one
/// with Vary names stays until evicted.
struct PassExpiry;

impl moka::Expiry<String, Arc<UrlInfo>> for PassExpiry {
    fn expire_after_create(&self, _: &String, info: &Arc<UrlInfo>, _: Instant) -> Option<Duration> {
        info.pass.map(|_| PASS_MEMORY)
    }

    fn expire_after_update(
        &self,
        _: &String,
        info: &Arc<UrlInfo>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        info.pass.map(|_| PASS_MEMORY)
    }
}

/// A "recently not storable" record.
#[derive(Debug, Clone, Copy)]
struct Pass {
    /// Why (for `Cache-Status`).
    reason: &'static str,
    /// A stored copy existed when it was written (it may stand in if the
    /// app fails). Without one, the store need not be asked: storing for
    /// the key removes the record.
    with_copy: bool,
}

/// What a fill left for those who waited on it.
#[derive(Debug, Clone)]
enum Outcome {
    Stored(Arc<Object>),
    NotShared,
}

impl IsrCache<TieredStore> {
    pub fn in_memory(settings: IsrConfig, wait_timeout: Duration, counters: CacheCounters) -> Self {
        Self::tiered(settings, wait_timeout, counters, None)
    }

    /// In memory, and with `l2` (edge mode) in Redis behind it.
    pub fn tiered(
        settings: IsrConfig,
        wait_timeout: Duration,
        counters: CacheCounters,
        l2: Option<Arc<l2::L2>>,
    ) -> Self {
        let l1 = MemoryStore::new(settings.max_entries, settings.max_bytes.bytes());
        IsrCache::new(TieredStore::new(l1, l2), settings, wait_timeout, counters)
    }

    /// Edge mode's Redis link, if any.
    pub fn l2(&self) -> Option<&Arc<l2::L2>> {
        self.store.l2()
    }

    /// [`IsrCache::purge_everywhere`] of each selector, summed: `Err` if
    /// any did not reach Redis.
    pub async fn purge_each_everywhere(
        &self,
        selectors: &[Selector],
        soft: bool,
    ) -> Result<u64, Unshared> {
        let mut purged = 0;
        let mut unshared = None;
        for selector in selectors {
            match self.purge_everywhere(selector, soft).await {
                Ok(n) => purged += n,
                Err(e) => {
                    purged += e.purged;
                    unshared = Some(e.why);
                }
            }
        }
        match unshared {
            None => Ok(purged),
            Some(why) => Err(Unshared { purged, why }),
        }
    }

    /// [`IsrCache::purge`] for a caller to answer: `Err` when the purge
    /// did not reach Redis (done in this instance's memory; the others may
    /// keep what it names until it expires), with what was purged here.
    pub async fn purge_everywhere(&self, selector: &Selector, soft: bool) -> Result<u64, Unshared> {
        self.forget(selector, soft);
        match self.store.purge_reporting(selector, soft).await {
            (purged, None) => Ok(purged),
            (purged, Some(why)) => Err(Unshared { purged, why }),
        }
    }

    /// Edge mode: the other instances' purges reach this one's memory,
    /// through a bounded queue worked by one task (when it is full,
    /// everything is dropped instead, once: safe, and bounded). Both tasks
    /// end with the cache.
    pub fn hear_purges(self: &Arc<Self>) {
        let Some(l2) = self.l2() else { return };
        let (queue, mut purges) = tokio::sync::mpsc::channel::<(Selector, bool, u64)>(PURGE_QUEUE);
        // Set when a purge could not be queued: the newest generation such
        // a purge carried (everything is dropped instead).
        let overflowed = Arc::new(AtomicU64::new(0));
        let weak = Arc::downgrade(self);
        let flag = Arc::clone(&overflowed);
        let adopter = Arc::clone(l2);
        let worker = tokio::spawn(async move {
            while let Some((selector, soft, generation)) = purges.recv().await {
                let Some(cache) = weak.upgrade() else { return };
                // A purge that found the queue full: everything goes, before
                // the purges queued ahead of it are worked through.
                let missed = flag.swap(0, Ordering::AcqRel);
                if missed > 0 {
                    let all = Selector {
                        all: true,
                        ..Default::default()
                    };
                    let purged = cache.purge_local(&all, false).await;
                    tracing::warn!(
                        purged,
                        "cache purge of everything: purges from other instances came faster than they could be applied"
                    );
                    adopter.adopt(missed);
                }
                let purged = cache.purge_local(&selector, soft).await;
                if selector.is_invalidation() {
                    tracing::debug!(
                        purged,
                        ?selector,
                        "cache invalidation (from another instance)"
                    );
                } else {
                    tracing::info!(
                        purged,
                        soft,
                        ?selector,
                        "cache purge (from another instance)"
                    );
                }
                // Only now may stores count this purge as applied.
                adopter.adopt(generation);
            }
        });
        let listener = l2.listen(
            l2::CHANNEL_PING,
            move |selector, soft, generation| match queue.try_send((selector, soft, generation)) {
                Ok(()) => true,
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                    overflowed.fetch_max(generation.max(1), Ordering::AcqRel);
                    true
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => false,
            },
        );
        self.store.own_tasks([worker, listener]);
    }
}

/// A purge done in this instance's memory that did not reach Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unshared {
    /// Entries purged here.
    pub purged: u64,
    pub why: String,
}

impl std::fmt::Display for Unshared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "purged {} entries in this instance's memory, but the purge did not reach Redis ({}): other instances may keep serving what it names until it expires; retry",
            self.purged, self.why
        )
    }
}

/// Purges from other instances waiting to be applied to memory.
const PURGE_QUEUE: usize = 256;

impl<S: Store> IsrCache<S> {
    pub fn new(
        store: S,
        settings: IsrConfig,
        wait_timeout: Duration,
        counters: CacheCounters,
    ) -> Self {
        IsrCache {
            store,
            index: moka::sync::Cache::builder()
                .max_capacity(settings.max_entries)
                .expire_after(PassExpiry)
                .build_with_hasher(KeyHasher::default()),
            pass: moka::sync::Cache::builder()
                .max_capacity(settings.max_entries)
                .time_to_live(PASS_MEMORY)
                .build_with_hasher(KeyHasher::default()),
            inflight: Mutex::new(HashMap::new()),
            settings,
            wait_timeout,
            purge_epoch: AtomicU64::new(0),
            counters,
            compression: arc_swap::ArcSwap::from_pointee(crate::compress::Settings::default()),
            variant_jobs: std::sync::atomic::AtomicUsize::new(0),
            draft_id: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// Compresses answers with `settings` (default: [`crate::compress::Settings::default`]).
    pub fn with_compression(self, settings: crate::compress::Settings) -> Self {
        self.set_compression(settings);
        self
    }

    /// Compresses answers with `settings` from now on (variants already
    /// made stay until their entries go).
    pub fn set_compression(&self, settings: crate::compress::Settings) {
        self.compression.store(Arc::new(settings));
    }

    /// Fills in flight are stored stale (something they may show was
    /// revalidated elsewhere).
    pub fn fence(&self) {
        self.purge_epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// The most entries the cache keeps.
    pub fn max_entries(&self) -> u64 {
        self.settings.max_entries
    }

    /// Sets the preview mode id of the Next.js build being served (each
    /// build has its own).
    pub fn set_draft_id(&self, id: Option<&str>) {
        self.draft_id.store(id.map(|id| Arc::new(id.to_string())));
    }

    /// Is this a Next.js draft-mode request of the build being served?
    fn is_draft(&self, fields: &crate::fields::Fields<'_>) -> bool {
        if !fields.contains(&header::COOKIE) {
            return false;
        }
        let id = self.draft_id.load();
        let Some(id) = id.as_deref() else {
            return false;
        };
        policy::cookie_values(fields.map(), policy::NEXT_DRAFT_COOKIE).any(|value| {
            use subtle::ConstantTimeEq;
            // As Next reads it: percent-decoded.
            let value = percent_encoding::percent_decode_str(value).collect::<Vec<u8>>();
            bool::from(value.ct_eq(id.as_bytes()))
        })
    }

    /// Answers `req` from `object`, compressed for its client if it may be
    /// (the request's [`Accepted`](crate::compress::Accepted) extension,
    /// set by the server; none: identity). A compressed variant is made
    /// once per object, by a task of its own, and kept with it; a request
    /// waits for one being made at most [`crate::compress::VARIANT_WAIT`],
    /// else gets identity.
    async fn answer<B>(
        self: &Arc<Self>,
        req: &Request<B>,
        accepted: &crate::compress::Accepted,
        object: &Arc<Object>,
        served: Served,
        now: SystemTime,
    ) -> Response<Body> {
        match self.answer_ready(req, accepted, object, served, now) {
            Ready::Answer(response) => response,
            Ready::Wait(response, coding) => {
                let settings = **self.compression.load();
                self.start_variant(object, coding, &settings);
                let variant = if object.variant_started(coding) {
                    tokio::time::timeout(crate::compress::VARIANT_WAIT, object.wait_variant(coding))
                        .await
                        .ok()
                        .flatten()
                } else {
                    None
                };
                finish_answer(response, req, object, coding, variant)
            }
        }
    }

    /// [`IsrCache::answer`] as far as it goes without waiting: the whole
    /// answer, or, when the client should get a compressed variant that
    /// is not made yet, the identity answer and the coding to wait for.
    fn answer_ready<B>(
        &self,
        req: &Request<B>,
        accepted: &crate::compress::Accepted,
        object: &Arc<Object>,
        served: Served,
        now: SystemTime,
    ) -> Ready {
        use crate::compress;
        let mut response = respond::serve(req, object, served, now);
        // Decided on the stored answer, so that a 304 and a HEAD say what
        // the 200 to a GET would (its Vary was stored with it).
        let coding = if object.compressible {
            compress::stored_coding(&self.compression.load(), accepted, object.body.len())
        } else {
            None
        };
        let Some(coding) = coding else {
            return Ready::Answer(response);
        };
        let not_modified = response.status() == http::StatusCode::NOT_MODIFIED;
        let variant = match object.variant(coding) {
            Some(variant) => variant,
            None if req.method() == Method::HEAD || not_modified => None,
            None => return Ready::Wait(response, coding),
        };
        if not_modified {
            // A client that holds a compressed copy (it sent the weak tag)
            // is told the weak tag again.
            let headers = response.headers_mut();
            if accepted.weak_if_none_match()
                && let Some(etag) = &object.weak_etag
            {
                headers.insert(header::ETAG, etag.clone());
            }
            if !object.varies_on_encoding {
                compress::add_vary(headers);
            }
            return Ready::Answer(response);
        }
        Ready::Answer(finish_answer(response, req, object, coding, variant))
    }

    /// A fresh hit from memory, answered without waiting for anything;
    /// `Err` when the request takes the full way ([`IsrCache::handle`]):
    /// not a fresh hit here, or one whose compressed variant is still to
    /// be made. What `handle` would answer, checked in the same order.
    ///
    /// Given `write`, a plain `GET`'s hit is written there as HTTP/1.1
    /// head bytes ([`Hit::Written`]) instead of built as a response: the
    /// fields that are the same for every such hit are made once per
    /// object and coding.
    pub fn fresh_hit<B>(
        &self,
        req: &Request<B>,
        fields: &crate::fields::Fields<'_>,
        accepted: &crate::compress::Accepted,
        write: Option<&mut Vec<u8>>,
    ) -> Result<Hit, Option<Looked>> {
        let rule = self.rule_for(req.uri().path());
        if policy::request_bypass(req.method(), fields, rule).is_some() || self.is_draft(fields) {
            return Err(None);
        }
        let primary = key::primary_with_host(req, fields.host());
        let Some(info) = self.index.get(&primary) else {
            return Err(Some(Looked {
                primary,
                info: None,
            }));
        };
        let answer = self.fresh_object(req, fields, accepted, &primary, &info, write);
        answer.ok_or(Some(Looked {
            primary,
            info: Some(info),
        }))
    }

    /// [`IsrCache::fresh_hit`] once the URL is known here.
    fn fresh_object<B>(
        &self,
        req: &Request<B>,
        fields: &crate::fields::Fields<'_>,
        accepted: &crate::compress::Accepted,
        primary: &str,
        info: &UrlInfo,
        write: Option<&mut Vec<u8>>,
    ) -> Option<Hit> {
        let key = key::full(primary, req.headers(), &info.vary);
        let passing = if info.vary.is_empty() {
            info.pass.is_some_and(|(_, until, epoch)| {
                Instant::now() < until && epoch == self.purge_epoch.load(Ordering::Relaxed)
            })
        } else {
            self.pass.contains_key(&*key)
        };
        if passing {
            return None;
        }
        let has_auth = fields.contains(&header::AUTHORIZATION);
        let now = SystemTime::now();
        let object = self
            .store
            .get_here(&key)
            .filter(|o| o.matches(req.headers()) && (!has_auth || o.shared_with_auth))?;
        let fresh = object.fresh_at(now)?;
        if let Some(out) = write
            && let Some(written) = self.write_hit(req, fields, accepted, &object, fresh, out)
        {
            self.counters.hits.inc();
            return Some(Hit::Written(written));
        }
        match self.answer_ready(req, accepted, &object, Served::Hit, now) {
            Ready::Answer(response) => {
                self.counters.hits.inc();
                Some(Hit::Response(response))
            }
            Ready::Wait(..) => None,
        }
    }

    /// What [`IsrCache::answer_ready`] answers a plain `GET` (no
    /// conditional fields) from the fresh `object`, written into `out` as
    /// HTTP/1.1 head bytes, and its body; `None` for anything else (a
    /// conditional request, a status without a body, a variant still to
    /// be made), which is answered as a response. `fresh`: its clock
    /// ([`Object::fresh_at`]).
    fn write_hit<B>(
        &self,
        req: &Request<B>,
        fields: &crate::fields::Fields<'_>,
        accepted: &crate::compress::Accepted,
        object: &Object,
        fresh: object::FreshAt,
        out: &mut Vec<u8>,
    ) -> Option<WrittenHit> {
        let status = object.status;
        if req.method() != Method::GET
            || status.is_informational()
            || status == http::StatusCode::NO_CONTENT
            || status == http::StatusCode::NOT_MODIFIED
            || fields.contains(&header::IF_NONE_MATCH)
            || fields.contains(&header::IF_MODIFIED_SINCE)
        {
            return None;
        }
        let coding = if object.compressible {
            crate::compress::stored_coding(&self.compression.load(), accepted, object.body.len())
        } else {
            None
        };
        let (variant, body) = match coding {
            None => (None, object.body.clone()),
            // Not made yet: the full way starts it.
            Some(coding) => match object.variant(coding)? {
                Some(variant) => (Some(variant.clone()), variant),
                None => (None, object.body.clone()),
            },
        };
        let head = object.hit_head(coding, || hit_head(object, coding, variant, fresh.now))?;
        out.extend_from_slice(&head.bytes);
        respond::write_hit_fields(out, fresh.age, fresh.ttl_left);
        Some(WrittenHit {
            status,
            body,
            dated: head.dated,
        })
    }

    /// Starts making `object`'s variant for `coding` unless it is being
    /// made: on a task of its own, which then weighs the object again in
    /// the store. Bodies over [`crate::compress::STORED_HIGH_MAX`] are
    /// compressed at the streamed levels (still once).
    ///
    /// At most [`MAX_VARIANT_JOBS`] wait or run per app: beyond, clients get
    /// identity until a job ends. A job whose object was replaced, purged
    /// or evicted while it waited for its turn does nothing.
    fn start_variant(
        self: &Arc<Self>,
        object: &Arc<Object>,
        coding: crate::compress::Coding,
        settings: &crate::compress::Settings,
    ) {
        if !settings.enabled
            || !object.compressible
            || (object.body.len() as u64) < settings.min_size
            || self.variant_jobs.load(Ordering::Relaxed) >= MAX_VARIANT_JOBS
            || !object.start_variant(coding)
        {
            return;
        }
        let levels = if object.body.len() > crate::compress::STORED_HIGH_MAX {
            settings.streamed
        } else {
            settings.stored
        };
        self.variant_jobs.fetch_add(1, Ordering::Relaxed);
        let (cache, object) = (Arc::clone(self), Arc::clone(object));
        tokio::spawn(async move {
            let _job = JobCount(&cache.variant_jobs);
            let key = key::stored(&object).into_owned();
            let turn = crate::compress::encoder_turn().await;
            let stored = cache
                .store
                .get(&key)
                .await
                .is_some_and(|current| Arc::ptr_eq(&current, &object));
            match turn {
                Ok(turn) if stored => {
                    object.make_variant(coding, levels, turn).await;
                    cache.store.resized(&key, &object).await;
                }
                _ => object.abandon_variant(coding),
            }
        });
    }

    pub fn stats(&self) -> store::StoreStats {
        self.store.stats()
    }

    fn rule_for(&self, path: &str) -> Option<&RouteRule> {
        policy::rule_for(&self.settings, path)
    }

    /// Answers `req` from the cache, or through `fill`, compressed for a
    /// client that accepts these codings.
    pub async fn handle<F: Fill>(
        self: &Arc<Self>,
        req: Request<Body>,
        fill: &F,
        accepted: crate::compress::Accepted,
    ) -> Response<Body> {
        self.handle_looked(req, fill, accepted, None).await
    }

    /// [`IsrCache::handle`], with what [`IsrCache::fresh_hit`] looked up
    /// for this same request (not to be looked up again).
    pub async fn handle_looked<F: Fill>(
        self: &Arc<Self>,
        mut req: Request<Body>,
        fill: &F,
        accepted: crate::compress::Accepted,
        looked: Option<Looked>,
    ) -> Response<Body> {
        let rule = self.rule_for(req.uri().path()).cloned();
        let fields = crate::fields::Fields::of(req.headers());
        let has_auth = fields.contains(&header::AUTHORIZATION);
        if let Some(reason) = policy::request_bypass(req.method(), &fields, rule.as_ref()) {
            return Box::pin(self.pass_through(req, fill, reason, &accepted)).await;
        }
        // Next.js draft mode: the editor sees the draft, and it is never
        // stored (Next marks it private; this keeps it off the way in).
        if self.is_draft(&fields) {
            return Box::pin(self.pass_through(req, fill, "draft-mode", &accepted)).await;
        }
        let (primary, known) = match looked {
            Some(Looked { primary, info }) => (primary, info),
            None => {
                let primary = key::primary(&req);
                let info = self.index.get(&primary);
                (primary, info)
            }
        };
        let info = match known {
            Some(info) => info,
            // Not known here: another instance may have stored it, varied.
            None => match Box::pin(self.store.shared_vary(&primary)).await {
                // Known there (varied or not): known here from now on, so
                // that the next requests need not ask.
                Some(vary) => {
                    let info = Arc::new(UrlInfo {
                        vary: vary.into(),
                        pass: None,
                    });
                    self.index.insert(primary.clone(), Arc::clone(&info));
                    info
                }
                None => Arc::default(),
            },
        };
        let key = key::full(&primary, req.headers(), &info.vary);
        let key: &str = &key;
        // Recently not storable, with nothing stored to stand in (as for
        // every request to a dynamic page): straight through.
        let pass = if info.vary.is_empty() {
            info.pass
                .filter(|&(_, until, epoch)| {
                    Instant::now() < until && epoch == self.purge_epoch.load(Ordering::Relaxed)
                })
                .map(|(pass, _, _)| pass)
        } else {
            self.pass.get(key)
        };
        if let Some(Pass {
            reason,
            with_copy: false,
        }) = pass
        {
            return Box::pin(self.pass_through(req, fill, reason, &accepted)).await;
        }
        let now = SystemTime::now();

        let cached = self
            .store
            .get(key)
            .await
            .filter(|o| o.matches(req.headers()) && (!has_auth || o.shared_with_auth));
        if let Some(object) = &cached {
            match object.freshness(now) {
                Freshness::Fresh => {
                    self.counters.hits.inc();
                    return self.answer(&req, &accepted, object, Served::Hit, now).await;
                }
                Freshness::Stale => {
                    self.counters.stale.inc();
                    self.revalidate(key, &primary, &req, rule, fill, object);
                    return self
                        .answer(&req, &accepted, object, Served::StaleWhileRevalidate, now)
                        .await;
                }
                Freshness::StaleIfError | Freshness::Dead => {}
            }
        }
        // From here on `cached`, if any, is a stale copy: it makes the fill
        // conditional, and may stand in if the app fails.
        let previous = cached;
        // (The slow path: what the client accepts goes with the request.)
        req.extensions_mut().insert(accepted);
        // Recently not storable (hit-for-pass, as Varnish calls it): a burst
        // on a dynamic page must not queue behind one request, nor pay for
        // a fill it cannot store. With no stored copy to stand in, pass the
        // request through as it is; with one, fill (it may be stored again,
        // or stand in if the app fails).
        if let Some(Pass { reason, .. }) = pass {
            return match previous {
                None => Box::pin(self.pass_through(req, fill, reason, &accepted)).await,
                Some(_) => {
                    Box::pin(self.miss(req, key, &primary, rule.as_ref(), fill, previous, None))
                        .await
                }
            };
        }

        match self.join(key) {
            Join::Wait(rx) => {
                self.counters.coalesced.inc();
                let waited =
                    Box::pin(tokio::time::timeout(self.wait_timeout, wait_outcome(rx))).await;
                if let Ok(Some(Outcome::Stored(object))) = waited
                    && object.matches(req.headers())
                    && (!has_auth || object.shared_with_auth)
                {
                    return self
                        .answer(
                            &req,
                            &accepted,
                            &object,
                            Served::Miss { collapsed: true },
                            SystemTime::now(),
                        )
                        .await;
                }
                // Nothing to share (not storable, another variant, failed):
                // this request fills for itself.
                Box::pin(self.miss(req, key, &primary, rule.as_ref(), fill, previous, None)).await
            }
            Join::Lead(lead) => {
                Box::pin(self.miss(
                    req,
                    key,
                    &primary,
                    rule.as_ref(),
                    fill,
                    previous,
                    Some(lead),
                ))
                .await
            }
        }
    }

    /// Forwards without storing (callers box it: it holds the whole fetch,
    /// which a hit's future must not carry). A successful unsafe request (POST, PUT,
    /// DELETE…) invalidates what is stored for its URL and for the URLs its
    /// `Location` and `Content-Location` name (RFC 9111 §4.4).
    async fn pass_through<F: Fill>(
        &self,
        mut req: Request<Body>,
        fill: &F,
        reason: &'static str,
        accepted: &crate::compress::Accepted,
    ) -> Response<Body> {
        self.counters.bypasses.inc();
        let settings = **self.compression.load();
        let head = req.method() == Method::HEAD;
        if settings.enabled {
            crate::compress::ask_identity(req.headers_mut());
        }
        let unsafe_method = !matches!(
            *req.method(),
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        );
        let target =
            unsafe_method.then(|| (key::primary(&req), req.headers().get(header::HOST).cloned()));
        let mut response = fill.fetch(req).await;
        if let Some((primary, host)) = target
            && (response.status().is_success() || response.status().is_redirection())
        {
            let mut primaries = vec![primary];
            for name in [header::LOCATION, header::CONTENT_LOCATION] {
                if let Some(other) = response
                    .headers()
                    .get(name)
                    .and_then(|v| same_origin_primary(v, host.as_ref()))
                {
                    primaries.push(other);
                }
            }
            // What is stored for the other scheme is as stale.
            let other_schemes: Vec<_> = primaries.iter().map(|p| key::other_scheme(p)).collect();
            primaries.extend(other_schemes);
            let selector = Selector {
                primaries,
                ..Selector::default()
            };
            let invalidated = Box::pin(self.store.invalidate(&selector)).await;
            if invalidated > 0 {
                tracing::debug!(invalidated, "invalidated after an unsafe request");
            }
        }
        // (Purge tags are stripped by the caller, from every answer.)
        respond::mark(response.headers_mut(), Served::Bypass(reason));
        crate::compress::compress_streamed(&settings, accepted, &mut response, head);
        response
    }

    /// Drops (hard) or marks stale (soft) every entry the selector names.
    pub async fn purge(&self, selector: &Selector, soft: bool) -> u64 {
        self.forget(selector, soft);
        self.store.purge(selector, soft).await
    }

    /// A purge another instance made (edge mode): what this instance holds
    /// alone is purged; what they share already was.
    pub async fn purge_local(&self, selector: &Selector, soft: bool) -> u64 {
        // An invalidation after another instance's unsafe request is taken
        // as this instance's own are: the URLs leave memory, and fills in
        // flight elsewhere are not made stale by it.
        if !selector.is_invalidation() {
            self.forget(selector, soft);
        }
        self.store.purge_local(selector, soft).await
    }

    fn forget(&self, selector: &Selector, soft: bool) {
        self.purge_epoch.fetch_add(1, Ordering::Relaxed);
        // (The epoch bump also forgets the markers kept in `index`.)
        self.pass.invalidate_all();
        if selector.all && !soft {
            self.index.invalidate_all();
        }
    }

    /// Joins the fill in flight for `key`, or becomes its leader.
    fn join(self: &Arc<Self>, key: &str) -> Join<S> {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = inflight.get(key) {
            return Join::Wait(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        inflight.insert(key.to_string(), rx);
        Join::Lead(Lead {
            cache: Arc::clone(self),
            key: key.to_string(),
            tx,
        })
    }

    /// Leads a fill only if none is in flight (background revalidation).
    fn lead_if_idle(self: &Arc<Self>, key: &str) -> Option<Lead<S>> {
        match self.join(key) {
            Join::Lead(lead) => Some(lead),
            Join::Wait(_) => None,
        }
    }
}

/// How far an answer from a stored object got without waiting.
enum Ready {
    Answer(Response<Body>),
    /// The identity answer, and the coding whose variant is to be made.
    Wait(Response<Body>, crate::compress::Coding),
}

/// Gives `response` (not a 304) the variant for `coding` if there is one
/// (`None`: not made, or no smaller), else says it varies.
fn finish_answer<B>(
    mut response: Response<Body>,
    req: &Request<B>,
    object: &Object,
    coding: crate::compress::Coding,
    variant: Option<Bytes>,
) -> Response<Body> {
    match variant {
        Some(bytes) => {
            crate::compress::mark_variant(
                response.headers_mut(),
                coding,
                bytes.len(),
                object.weak_etag.as_ref(),
                object.varies_on_encoding,
            );
            if req.method() != Method::HEAD {
                *response.body_mut() = crate::body::full(bytes);
            }
        }
        None if !object.varies_on_encoding => crate::compress::add_vary(response.headers_mut()),
        None => {}
    }
    response
}

/// The fields every plain `GET`'s hit of `object` with `coding` (and its
/// `variant`, if made and smaller) has in common, made by the way a hit is
/// answered as a response and written out as HTTP/1.1 field lines; `None`
/// if the answer has a field a written hit must not carry as it is.
fn hit_head(
    object: &Object,
    coding: Option<crate::compress::Coding>,
    variant: Option<Bytes>,
    now: SystemTime,
) -> Option<object::HitHead> {
    let plain = Request::new(());
    let mut response = respond::serve(&plain, object, Served::Hit, now);
    if let Some(coding) = coding {
        response = finish_answer(response, &plain, object, coding, variant);
    }
    let length = http_body::Body::size_hint(response.body()).exact()?;
    let headers = response.headers_mut();
    // Per request: written by the cache, the server and the listener.
    headers.remove(header::AGE);
    respond::unmark(headers);
    headers.remove(crate::proxy::headers::X_REQUEST_ID);
    respond::strip_internal_headers(headers);
    let framed = headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|value| value.as_bytes() == itoa::Buffer::new().format(length).as_bytes());
    if !framed
        || headers.contains_key(header::TRANSFER_ENCODING)
        || headers.contains_key(header::CONNECTION)
    {
        return None;
    }
    let mut bytes = Vec::with_capacity(256);
    crate::listener::push_status_line(&mut bytes, response.status());
    for (name, value) in response.headers() {
        crate::listener::push_field(&mut bytes, name, value);
    }
    Some(object::HitHead {
        // (Copied: no spare room held with the object.)
        bytes: Bytes::copy_from_slice(&bytes),
        dated: response.headers().contains_key(header::DATE),
    })
}

/// The primary key of a `Location` / `Content-Location` value on the same
/// host as the request (relative references, or absolute ones naming it).
fn same_origin_primary(value: &HeaderValue, host: Option<&HeaderValue>) -> Option<String> {
    let uri: http::Uri = value.to_str().ok()?.parse().ok()?;
    let host = host?.to_str().ok()?;
    if let Some(authority) = uri.authority()
        && !authority.as_str().eq_ignore_ascii_case(host)
    {
        return None;
    }
    let target = uri.path_and_query()?.as_str();
    let target = if target.starts_with('/') {
        target.to_string()
    } else {
        format!("/{target}")
    };
    let req = Request::builder()
        .uri(target)
        .header(header::HOST, host)
        .body(())
        .ok()?;
    Some(key::primary(&req))
}

enum Join<S: Store> {
    Lead(Lead<S>),
    Wait(watch::Receiver<Option<Outcome>>),
}

/// The right and duty to fill one key; waiters are released when it is
/// finished or dropped.
struct Lead<S: Store> {
    cache: Arc<IsrCache<S>>,
    key: String,
    tx: watch::Sender<Option<Outcome>>,
}

impl<S: Store> Lead<S> {
    fn finish(self, outcome: Outcome) {
        self.tx.send_replace(Some(outcome));
    }
}

impl<S: Store> Drop for Lead<S> {
    fn drop(&mut self) {
        let mut inflight = self
            .cache
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        inflight.remove(&self.key);
        drop(inflight);
        // An unfinished lead (the fill was cancelled) releases its waiters
        // with nothing to share.
        if self.tx.borrow().is_none() {
            self.tx.send_replace(Some(Outcome::NotShared));
        }
    }
}

async fn wait_outcome(mut rx: watch::Receiver<Option<Outcome>>) -> Option<Outcome> {
    match rx.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone(),
        Err(_) => None,
    }
}

#[cfg(test)]
mod panic_tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::body;

    /// A fill whose first fetch waits for `go`, then panics; later ones
    /// answer a cacheable `ok`.
    #[derive(Clone)]
    struct PanicsFirst {
        calls: Arc<AtomicUsize>,
        go: Arc<tokio::sync::Notify>,
    }

    impl Fill for PanicsFirst {
        fn fetch(&self, _req: Request<Body>) -> impl Future<Output = Response<Body>> + Send {
            let first = self.calls.fetch_add(1, Ordering::SeqCst) == 0;
            let go = Arc::clone(&self.go);
            async move {
                if first {
                    go.notified().await;
                    panic!("the fill panicked");
                }
                let mut response = Response::new(body::full("ok"));
                response.headers_mut().insert(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("public, max-age=60"),
                );
                response
            }
        }
    }

    fn get() -> Request<Body> {
        let mut req = Request::new(body::empty());
        *req.uri_mut() = "/page".parse().expect("uri");
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("a.test"));
        req
    }

    /// Issue 11, fault 2: a panic while filling (on one connection) leaves
    /// nothing half-done: the request waiting for that fill is released and
    /// fills for itself, and the key is neither stuck nor poisoned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_fill_releases_its_waiters_and_its_key() {
        let settings = crate::config::Config::parse(std::path::Path::new("x.toml"), "")
            .expect("defaults")
            .isr;
        let cache = Arc::new(IsrCache::in_memory(
            settings,
            Duration::from_secs(30),
            CacheCounters::default(),
        ));
        let fill = PanicsFirst {
            calls: Arc::new(AtomicUsize::new(0)),
            go: Arc::new(tokio::sync::Notify::new()),
        };
        let leader = {
            let (cache, fill) = (Arc::clone(&cache), fill.clone());
            tokio::spawn(async move { cache.handle(get(), &fill, Default::default()).await })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while fill.calls.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the leader never fetched");
            tokio::task::yield_now().await;
        }
        let waiter = {
            let (cache, fill) = (Arc::clone(&cache), fill.clone());
            tokio::spawn(async move { cache.handle(get(), &fill, Default::default()).await })
        };
        while cache.counters.coalesced.get() == 0 {
            assert!(Instant::now() < deadline, "the second request never waited");
            tokio::task::yield_now().await;
        }
        fill.go.notify_one();
        assert!(leader.await.is_err(), "the leader panicked");
        let answered = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the waiter was released")
            .expect("no panic");
        assert_eq!(answered.status(), 200);
        let hit = cache.handle(get(), &fill, Default::default()).await;
        assert_eq!(hit.headers()["x-bext-cache"], "HIT", "stored and served");
        assert!(cache.inflight.lock().expect("lock").is_empty());
    }
}

#[cfg(test)]
mod compression_tests {
    use std::sync::atomic::AtomicUsize;

    use http_body_util::BodyExt;

    use super::*;
    use crate::body;
    use crate::compress::{Accepted, Coding};

    /// A cacheable page, counting fetches.
    #[derive(Clone)]
    struct Page(Arc<AtomicUsize>);

    const PAGE: &str = "<p>a page worth compressing</p>";

    impl Fill for Page {
        fn fetch(&self, _req: Request<Body>) -> impl Future<Output = Response<Body>> + Send {
            self.0.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut response = Response::new(body::full(PAGE.repeat(200)));
                let h = response.headers_mut();
                h.insert(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("public, max-age=60"),
                );
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
                h.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
                response
            }
        }
    }

    fn get(accept: &str) -> Request<Body> {
        let mut req = Request::new(body::empty());
        *req.uri_mut() = "/page".parse().expect("uri");
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("a.test"));
        req.headers_mut().insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_str(accept).expect("value"),
        );
        req
    }

    /// An in-memory cache with the default settings.
    pub(super) fn new_cache() -> Arc<IsrCache> {
        let settings = crate::config::Config::parse(std::path::Path::new("x.toml"), "")
            .expect("defaults")
            .isr;
        Arc::new(IsrCache::in_memory(
            settings,
            Duration::from_secs(30),
            CacheCounters::default(),
        ))
    }

    async fn fetch(cache: &Arc<IsrCache>, fill: &Page, accept: &str) -> Response<Body> {
        let req = get(accept);
        let accepted = Accepted::parse(req.headers());
        cache.handle(req, fill, accepted).await
    }

    /// Review (issue 13): a client that goes away while a variant is being
    /// made cancels nothing: the variant is finished and kept, and served
    /// to the next client at once.
    #[tokio::test]
    async fn a_variant_outlives_the_request_that_started_it() {
        let cache = new_cache();
        let fill = Page(Arc::new(AtomicUsize::new(0)));
        fetch(&cache, &fill, "identity").await;
        // Polled once (it starts the variant, then waits), then dropped.
        let started = {
            let mut request = std::pin::pin!(fetch(&cache, &fill, "gzip"));
            futures_util::poll!(request.as_mut()).is_pending()
        };
        assert!(started, "the request waited for the variant");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let stored = cache.store.get("a.test /page").await.expect("stored");
            if let Some(variant) = stored.variant(Coding::Gzip) {
                assert!(variant.is_some(), "made and kept");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never made");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let answer = fetch(&cache, &fill, "gzip").await;
        assert_eq!(answer.headers()[header::CONTENT_ENCODING], "gzip");
    }

    /// Acceptance 4 (unit): one stored entry answers br, zstd, gzip and
    /// identity clients; each variant is made once, kept with the entry
    /// and counted in the store's bytes (and uncounted when it goes).
    #[tokio::test]
    async fn one_entry_serves_every_coding_and_counts_its_variants() {
        let cache = new_cache();
        let fetches = Arc::new(AtomicUsize::new(0));
        let fill = Page(Arc::clone(&fetches));
        let identity = PAGE.repeat(200);
        // The first request stores the entry (identity only).
        let first = fetch(&cache, &fill, "identity").await;
        assert_eq!(first.headers()[respond::X_BEXT_CACHE], "MISS");
        assert!(!first.headers().contains_key(header::CONTENT_ENCODING));
        assert_eq!(first.headers()[header::VARY], "accept-encoding");
        let bare = cache.stats().bytes;
        let mut grown = bare;
        for round in 0..2 {
            for (accept, coding) in [
                ("br", Some(Coding::Br)),
                ("zstd, gzip;q=0.5", Some(Coding::Zstd)),
                ("gzip", Some(Coding::Gzip)),
                ("deflate", None),
            ] {
                // The first request for a coding starts its variant and
                // waits a little for it; on a slow machine it may get
                // identity, and a later one the variant.
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                let response = loop {
                    let response = fetch(&cache, &fill, accept).await;
                    if coding.is_none() || response.headers().contains_key(header::CONTENT_ENCODING)
                    {
                        break response;
                    }
                    assert_eq!(round, 0, "a made variant is served at once");
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{accept}: never compressed"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                };
                let headers = response.headers().clone();
                assert_eq!(headers[respond::X_BEXT_CACHE], "HIT", "{accept}");
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .expect("body")
                    .to_bytes();
                assert_eq!(
                    headers[header::CONTENT_LENGTH],
                    body.len().to_string().as_str()
                );
                match coding {
                    Some(coding) => {
                        assert_eq!(headers[header::CONTENT_ENCODING], coding.as_str());
                        assert_eq!(headers[header::ETAG], "W/\"v1\"");
                        let decoded = crate::compress::tests::decode(coding, &body);
                        assert_eq!(decoded, identity.as_bytes(), "{accept}");
                        assert!(body.len() < identity.len() / 10);
                        if round == 0 {
                            // The variant, and the head of its hits.
                            let stored = cache.store.get_here("a.test /page").expect("stored");
                            grown += (body.len() + stored.head_estimate()) as u64;
                        }
                    }
                    None => {
                        assert!(!headers.contains_key(header::CONTENT_ENCODING));
                        assert_eq!(body, identity.as_bytes());
                    }
                }
                // The maker weighs the entry again just after it wakes
                // the requests waiting.
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while cache.stats().bytes != grown {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{accept}, round {round}: {} bytes, not {grown}",
                        cache.stats().bytes
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            1,
            "every answer came from one entry"
        );
        assert!(cache.counters.hits.get() >= 8);
        // HEAD gets the headers a GET would: the variant's coding and length.
        let mut head = get("br");
        *head.method_mut() = Method::HEAD;
        let accepted = Accepted::parse(head.headers());
        let answer = cache.handle(head, &fill, accepted).await;
        assert_eq!(answer.headers()[header::CONTENT_ENCODING], "br");
        let br_len: usize = answer.headers()[header::CONTENT_LENGTH]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("a length");
        assert!(br_len < identity.len() / 10);
        assert!(
            answer
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes()
                .is_empty()
        );
        // A 304 says what the 200 would: the weak ETag, Vary.
        let mut conditional = get("br");
        conditional
            .headers_mut()
            .insert(header::IF_NONE_MATCH, HeaderValue::from_static("W/\"v1\""));
        let accepted = Accepted::parse(conditional.headers());
        let answer = cache.handle(conditional, &fill, accepted).await;
        assert_eq!(answer.status(), http::StatusCode::NOT_MODIFIED);
        assert_eq!(answer.headers()[header::ETAG], "W/\"v1\"");
        assert_eq!(answer.headers()[header::VARY], "accept-encoding");
        // A client that holds the identity copy keeps the strong tag.
        let mut conditional = get("br");
        conditional
            .headers_mut()
            .insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"v1\""));
        let accepted = Accepted::parse(conditional.headers());
        let answer = cache.handle(conditional, &fill, accepted).await;
        assert_eq!(answer.status(), http::StatusCode::NOT_MODIFIED);
        assert_eq!(answer.headers()[header::ETAG], "\"v1\"");
        cache
            .purge(
                &Selector {
                    all: true,
                    ..Selector::default()
                },
                false,
            )
            .await;
        assert_eq!(cache.stats().bytes, 0, "the variants went with the entry");
    }
}

#[cfg(test)]
mod fresh_hit_tests {
    use std::sync::atomic::AtomicUsize;

    use http_body_util::BodyExt;

    use super::*;
    use crate::body;
    use crate::compress::{Accepted, Coding};

    /// A cacheable page (fresh for a minute, or stale at once for
    /// `/stale`), counting fetches.
    #[derive(Clone)]
    struct Page(Arc<AtomicUsize>);

    impl Fill for Page {
        fn fetch(&self, req: Request<Body>) -> impl Future<Output = Response<Body>> + Send {
            self.0.fetch_add(1, Ordering::SeqCst);
            let stale = req.uri().path() == "/stale";
            async move {
                let mut response = Response::new(body::full("<p>fresh or not</p>".repeat(100)));
                let h = response.headers_mut();
                h.insert(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static(if stale {
                        "public, max-age=0, stale-while-revalidate=60"
                    } else {
                        "public, max-age=60"
                    }),
                );
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
                h.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
                h.insert("x-bext-tags", HeaderValue::from_static("t1"));
                response
            }
        }
    }

    fn request(method: Method, path: &str, headers: &[(&str, &str)]) -> Request<Body> {
        let mut req = Request::new(body::empty());
        *req.method_mut() = method;
        *req.uri_mut() = path.parse().expect("uri");
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("a.test"));
        for (name, value) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        req
    }

    async fn parts(response: Response<Body>) -> (StatusCode, HeaderMap, Bytes) {
        let (parts, body) = response.into_parts();
        let mut headers = parts.headers;
        // Seconds since the answer was stored: may tick between the two.
        headers.remove(header::AGE);
        let body = body.collect().await.expect("body").to_bytes();
        (parts.status, headers, body)
    }

    use http::{HeaderMap, StatusCode};

    /// Issue 13 (a cheaper hit): what `fresh_hit` answers is what `handle`
    /// answers to the same request, and it answers every fresh hit that
    /// needs no waiting; everything else it leaves to `handle`, which goes
    /// on from what it looked up to the same answer.
    #[tokio::test]
    async fn a_fresh_hit_answered_at_once_is_the_answer_the_full_way_gives() {
        let cache = super::compression_tests::new_cache();
        let fill = Page(Arc::new(AtomicUsize::new(0)));
        for path in ["/page", "/stale"] {
            let req = request(Method::GET, path, &[]);
            cache.handle(req, &fill, Accepted::default()).await;
        }
        // The gzip variant made; br's not yet.
        let gzip = request(Method::GET, "/page", &[("accept-encoding", "gzip")]);
        assert!(
            cache
                .fresh_hit(
                    &gzip,
                    &crate::fields::Fields::of(gzip.headers()),
                    &Accepted::parse(gzip.headers()),
                    Some(&mut Vec::new())
                )
                .is_err()
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let req = request(Method::GET, "/page", &[("accept-encoding", "gzip")]);
            let accepted = Accepted::parse(req.headers());
            let answer = cache.handle(req, &fill, accepted).await;
            if answer.headers().contains_key(header::CONTENT_ENCODING) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never compressed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stored = cache.store.get_here("a.test /page").expect("stored");
        assert!(stored.variant(Coding::Br).is_none());

        // How a request is answered: written as head bytes, as a response
        // at once, or the full way.
        #[derive(Debug, PartialEq, Clone, Copy)]
        enum Way {
            Written,
            AtOnce,
            Full,
        }
        use Way::{AtOnce, Full, Written};
        type Row<'a> = (Method, &'a str, &'a [(&'a str, &'a str)], Way);
        let table: &[Row<'_>] = &[
            (Method::GET, "/page", &[], Written),
            (
                Method::GET,
                "/page",
                &[("accept-encoding", "gzip")],
                Written,
            ),
            (
                Method::GET,
                "/page",
                &[("accept-encoding", "gzip;q=0")],
                Written,
            ),
            (
                Method::HEAD,
                "/page",
                &[("accept-encoding", "gzip")],
                AtOnce,
            ),
            // br not made: HEAD says what a GET would get (identity now).
            (Method::HEAD, "/page", &[("accept-encoding", "br")], AtOnce),
            (Method::GET, "/page", &[("if-none-match", "\"v1\"")], AtOnce),
            (Method::GET, "/page", &[("if-none-match", "\"v2\"")], AtOnce),
            (
                Method::GET,
                "/page",
                &[("if-modified-since", "Thu, 01 Jan 2099 00:00:00 GMT")],
                AtOnce,
            ),
            (
                Method::GET,
                "/page",
                &[("if-none-match", "W/\"v1\""), ("accept-encoding", "gzip")],
                AtOnce,
            ),
            (
                Method::GET,
                "/page",
                &[("authorization", "Bearer x")],
                Written,
            ),
            (Method::GET, "/page", &[("range", "bytes=0-9")], Written),
            // The variant is to be made: the full way waits for it.
            (Method::GET, "/page", &[("accept-encoding", "br")], Full),
            // A client's no-cache does not reach the app through a shared
            // cache (as with nginx and Varnish): a hit either way.
            (
                Method::GET,
                "/page",
                &[("cache-control", "no-cache")],
                Written,
            ),
            (Method::GET, "/page", &[("upgrade", "websocket")], Full),
            (Method::GET, "/stale", &[], Full),
            (Method::GET, "/never-seen", &[], Full),
            (Method::POST, "/page", &[], Full),
            (Method::DELETE, "/page", &[], Full),
        ];
        for (method, path, headers, way) in table {
            let req = request(method.clone(), path, headers);
            let accepted = Accepted::parse(req.headers());
            let mut head = Vec::new();
            let fields = crate::fields::Fields::of(req.headers());
            let written = cache.fresh_hit(&req, &fields, &accepted, Some(&mut head));
            let here = cache.fresh_hit(&req, &fields, &accepted, None);
            let got = match (&written, &here) {
                (Ok(Hit::Written(_)), Ok(Hit::Response(_))) => Written,
                (Ok(Hit::Response(_)), Ok(Hit::Response(_))) => AtOnce,
                (Err(_), Err(_)) => Full,
                _ => panic!("{method} {path} {headers:?}: {written:?} and {here:?}"),
            };
            assert_eq!(got, *way, "{method} {path} {headers:?}");
            let here = match here {
                Ok(Hit::Response(here)) => here,
                Ok(Hit::Written(_)) => unreachable!("matched above"),
                Err(looked) => {
                    // The full way, from what was looked up: the answer
                    // it gives without that.
                    let again = request(method.clone(), path, headers);
                    let from_looked = cache.handle_looked(req, &fill, accepted, looked).await;
                    let without = cache.handle(again, &fill, accepted).await;
                    let (status, mut fields, body) = parts(from_looked).await;
                    let (status2, mut fields2, body2) = parts(without).await;
                    // Each answer has its own status line for the cache.
                    for f in [&mut fields, &mut fields2] {
                        f.remove(respond::CACHE_STATUS);
                        f.remove(respond::X_BEXT_CACHE);
                        f.remove(header::DATE);
                    }
                    assert_eq!(
                        (status, body),
                        (status2, body2),
                        "{method} {path} {headers:?}"
                    );
                    assert_eq!(fields.len(), fields2.len(), "{method} {path} {headers:?}");
                    continue;
                }
            };
            let full = cache.handle(req, &fill, accepted).await;
            let (here, full) = (parts(here).await, parts(full).await);
            assert_eq!(here, full, "{method} {path} {headers:?}");
            assert_eq!(here.1[respond::X_BEXT_CACHE], "HIT");
            if let Ok(Hit::Written(written)) = written {
                // The same answer, as the bytes a client reads.
                let mut fields = [httparse::EMPTY_HEADER; 32];
                let mut parsed = httparse::Response::new(&mut fields);
                head.extend_from_slice(b"\r\n");
                assert!(parsed.parse(&head).expect("a head").is_complete());
                let mut map = HeaderMap::new();
                for field in parsed.headers.iter() {
                    map.append(
                        HeaderName::from_bytes(field.name.as_bytes()).expect("name"),
                        HeaderValue::from_bytes(field.value).expect("value"),
                    );
                }
                assert!(map.contains_key(header::AGE), "{head:?}");
                map.remove(header::AGE);
                let status = StatusCode::from_u16(parsed.code.expect("a status")).expect("status");
                assert_eq!(status, written.status);
                assert_eq!(written.dated, map.contains_key(header::DATE));
                assert_eq!(
                    (status, map, written.body),
                    full,
                    "{method} {path} {headers:?}"
                );
            }
        }
    }
}
