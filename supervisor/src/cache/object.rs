//! A stored response and what time does to it: fresh, stale within its
//! stale-while-revalidate window, usable only if the app fails, or dead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::policy::Lifetime;
use crate::compress::{Coding, Levels};

/// How long an expired response with a validator is kept for conditional
/// revalidation (bounded, like everything stored, by the cache's size).
pub const KEEP_FOR_REVALIDATION: Duration = Duration::from_secs(3600);

/// What an object is charged beyond its parts (itself, and the
/// allocations around it).
const OBJECT_BYTES: usize = 256 + std::mem::size_of::<Object>();

/// Bytes of a hit head beyond its fields: the status line, and what a
/// coding adds (`Content-Encoding`, `Vary`, a weak `ETag`).
const HEAD_EXTRA: usize = 160;

/// One stored response.
#[derive(Debug)]
pub struct Object {
    pub status: StatusCode,
    /// As the app sent them, minus hop-by-hop, tag and `Age` headers.
    pub headers: HeaderMap,
    /// Identity-encoded.
    pub body: Bytes,
    /// When bext stored it (wall clock: comparable across instances).
    pub stored_at: SystemTime,
    /// The `Age` it arrived with.
    pub initial_age: Duration,
    pub lifetime: Lifetime,
    /// Purge tags.
    pub tags: Vec<String>,
    /// The request path (no query), for path and prefix purges.
    pub path: String,
    /// The primary cache key (host, path, query), for invalidation after
    /// an unsafe request to the same URL.
    pub primary: String,
    /// The request header values this variant was stored for (the
    /// response's `Vary` names), to check a lookup really matches.
    pub vary: Vec<(HeaderName, Option<HeaderValue>)>,
    /// May be served to requests carrying `Authorization`.
    pub shared_with_auth: bool,
    /// `Cache-Control: no-cache="Field"`: never sent with a reuse.
    pub omit_on_reuse: Vec<HeaderName>,
    /// Unix milliseconds of a soft purge (0: none): from then on the object
    /// counts as stale.
    soft_purged_ms: AtomicU64,
    /// Could be compressed ([`crate::compress::candidate`]).
    pub compressible: bool,
    /// Its `Vary` names Accept-Encoding (added when it was stored, if
    /// compression was on).
    pub varies_on_encoding: bool,
    /// The `ETag` of its compressed variants.
    pub weak_etag: Option<HeaderValue>,
    /// Compressed copies of `body`, each made once, on first demand.
    variants: Variants,
    /// The head every reuse starts from, made at the first one.
    reuse_head: std::sync::OnceLock<HeaderMap>,
    /// The heads of hits written as bytes, per coding (identity, then
    /// [`Coding::ALL`] order), each made at its first hit.
    hit_heads: [std::sync::OnceLock<Option<HitHead>>; 4],
}

/// The part of a hit's HTTP/1.1 head that is the same for every plain
/// `GET` given the same coding: the status line and the fields, each
/// ending in CRLF, without what differs per request (`Age`, the cache's
/// status fields, the request id, the connection's own fields).
#[derive(Debug)]
pub struct HitHead {
    pub bytes: Bytes,
    /// The fields include `Date` (the app's, as stored).
    pub dated: bool,
}

/// An object's compressed copies (in [`Coding::ALL`] order). Each is made
/// once by a detached task; requests wait for it a little, or not at all.
#[derive(Debug, Default)]
struct Variants {
    /// `Some(None)`: the coding did not make the body smaller (or failed).
    cells: [std::sync::OnceLock<Option<Bytes>>; 3],
    /// Being made (or made): no second maker.
    building: [std::sync::atomic::AtomicBool; 3],
    /// Woken when any variant is made.
    made: tokio::sync::Notify,
}

/// Where an object stands at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Serve as HIT.
    Fresh,
    /// Serve as STALE while one background revalidation runs.
    Stale,
    /// Only to stand in for a failing app.
    StaleIfError,
    /// Of no use.
    Dead,
}

/// A fresh object's clock at a moment ([`Object::fresh_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreshAt {
    pub now: SystemTime,
    /// Its age, in seconds.
    pub age: u64,
    /// Seconds of freshness left ([`Object::ttl_left`]).
    pub ttl_left: i64,
}

impl Object {
    #[allow(
        clippy::too_many_arguments,
        reason = "a plain constructor of a plain record"
    )]
    pub fn new(
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        initial_age: Duration,
        lifetime: Lifetime,
        tags: Vec<String>,
        (path, primary): (String, String),
        vary: Vec<(HeaderName, Option<HeaderValue>)>,
        shared_with_auth: bool,
    ) -> Self {
        Self::restored(
            status,
            headers,
            body,
            (SystemTime::now(), initial_age),
            lifetime,
            tags,
            (path, primary),
            vary,
            (shared_with_auth, 0),
        )
    }

    /// An object as it was stored elsewhere (edge mode's L2): its own
    /// storing time and soft purge (Unix ms, 0: none).
    #[allow(
        clippy::too_many_arguments,
        reason = "a plain constructor of a plain record"
    )]
    pub fn restored(
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        (stored_at, initial_age): (SystemTime, Duration),
        lifetime: Lifetime,
        tags: Vec<String>,
        (path, primary): (String, String),
        vary: Vec<(HeaderName, Option<HeaderValue>)>,
        (shared_with_auth, soft_purged_ms): (bool, u64),
    ) -> Self {
        let omit_on_reuse = super::policy::CacheControl::parse(&headers)
            .no_cache_fields
            .iter()
            .filter_map(|f| HeaderName::from_bytes(f.as_bytes()).ok())
            .collect();
        let compressible = crate::compress::candidate(status, &headers);
        Object {
            compressible,
            varies_on_encoding: crate::compress::varies_on_encoding(&headers),
            weak_etag: compressible
                .then(|| crate::compress::weak_etag(&headers))
                .flatten(),
            status,
            omit_on_reuse,
            headers,
            body,
            stored_at,
            initial_age,
            lifetime,
            tags,
            path,
            primary,
            vary,
            shared_with_auth,
            soft_purged_ms: AtomicU64::new(soft_purged_ms),
            variants: Variants::default(),
            reuse_head: std::sync::OnceLock::new(),
            hit_heads: Default::default(),
        }
    }

    /// The head of an answer that reuses the object: its headers without
    /// the `no-cache="Field"` ones, with `Content-Length`. Made once: a
    /// hit clones it rather than rebuilding it (the clone's index table has
    /// room for the few headers each answer adds, so they need no rehash).
    /// Counted in [`Object::size`].
    pub fn reuse_head(&self) -> &HeaderMap {
        self.reuse_head.get_or_init(|| {
            let mut head = HeaderMap::with_capacity(self.headers.len() + 4);
            for (name, value) in &self.headers {
                head.append(name.clone(), value.clone());
            }
            for field in &self.omit_on_reuse {
                head.remove(field);
            }
            head.insert(
                http::header::CONTENT_LENGTH,
                HeaderValue::from(self.body.len()),
            );
            head
        })
    }

    /// The head of a hit written as bytes for `coding` (`None`: identity),
    /// made by `make` the first time; `None` if it cannot be written so.
    /// Counted in [`Object::size`].
    pub fn hit_head(
        &self,
        coding: Option<Coding>,
        make: impl FnOnce() -> Option<HitHead>,
    ) -> Option<&HitHead> {
        let slot = coding.map_or(0, |c| c.index() + 1);
        self.hit_heads[slot].get_or_init(make).as_ref()
    }

    /// The body compressed with `coding`, if it was made: `Some(None)`
    /// when the coding did not make it smaller.
    pub fn variant(&self, coding: Coding) -> Option<Option<Bytes>> {
        self.variants.cells[coding.index()].get().cloned()
    }

    /// Marks the variant for `coding` as being made; true for the one
    /// caller that must make it.
    pub fn start_variant(&self, coding: Coding) -> bool {
        !self.variants.building[coding.index()].swap(true, Ordering::AcqRel)
    }

    /// Makes the variant for `coding` at `levels` (off the event loop,
    /// within the process-wide encoder bound) and wakes whoever waits.
    /// Run by the one caller [`Object::start_variant`] chose, on a task of
    /// its own: a client that goes away cancels nothing.
    pub async fn make_variant(
        &self,
        coding: Coding,
        levels: Levels,
        turn: tokio::sync::OwnedSemaphorePermit,
    ) {
        let made = match crate::compress::encode_off_loop(turn, self.body.clone(), coding, levels)
            .await
        {
            Ok(packed) if packed.len() < self.body.len() => Some(packed),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(path = %self.path, coding = coding.as_str(), "could not compress a cached body: {e}");
                None
            }
        };
        let _ = self.variants.cells[coding.index()].set(made);
        self.variants.made.notify_waiters();
    }

    /// Is the variant for `coding` being made (or made)?
    pub fn variant_started(&self, coding: Coding) -> bool {
        self.variants.building[coding.index()].load(Ordering::Acquire)
    }

    /// Gives up making the variant for `coding` (the object is no longer
    /// stored): none is made, and a later caller may start again.
    pub fn abandon_variant(&self, coding: Coding) {
        self.variants.building[coding.index()].store(false, Ordering::Release);
    }

    /// Waits for the variant for `coding` (being made by another task).
    pub async fn wait_variant(&self, coding: Coding) -> Option<Bytes> {
        loop {
            let made = self.variants.made.notified();
            tokio::pin!(made);
            made.as_mut().enable();
            if let Some(variant) = self.variant(coding) {
                return variant;
            }
            made.await;
        }
    }

    /// Takes over `previous`'s variants when the body is the same (a 304
    /// freshened it): a revalidated page stays compressed without being
    /// compressed again.
    pub fn adopt_variants(&self, previous: &Object) {
        if self.body != previous.body {
            return;
        }
        for coding in Coding::ALL {
            if let Some(variant) = previous.variant(coding)
                && self.variants.cells[coding.index()].set(variant).is_ok()
            {
                self.variants.building[coding.index()].store(true, Ordering::Release);
            }
        }
    }

    /// The codings `previous` had made (for making them again, ahead of
    /// demand, for a replacement with a new body).
    pub fn codings_made(&self) -> impl Iterator<Item = Coding> + '_ {
        Coding::ALL
            .into_iter()
            .filter(|c| self.variants.cells[c.index()].get().is_some())
    }

    /// Current age (RFC 9111 §4.2.3, simplified: arrival age plus time here).
    pub fn age(&self, now: SystemTime) -> Duration {
        self.initial_age
            .saturating_add(now.duration_since(self.stored_at).unwrap_or_default())
    }

    /// How long it has been stale (zero while fresh).
    fn staleness(&self, now: SystemTime) -> Option<Duration> {
        let age = self.age(now);
        let mut stale_for = age.checked_sub(self.lifetime.ttl);
        let purged = self.soft_purged_ms.load(Ordering::Relaxed);
        if purged != 0 {
            let purged_at = UNIX_EPOCH + Duration::from_millis(purged);
            let since_purge = now.duration_since(purged_at).unwrap_or_default();
            stale_for = Some(stale_for.map_or(since_purge, |s| s.max(since_purge)));
        }
        stale_for
    }

    pub fn freshness(&self, now: SystemTime) -> Freshness {
        match self.staleness(now) {
            None => Freshness::Fresh,
            Some(stale) if stale < self.lifetime.swr => Freshness::Stale,
            Some(stale) if stale < self.lifetime.stale_if_error => Freshness::StaleIfError,
            Some(_) => Freshness::Dead,
        }
    }

    /// Its clock at `now` while it is fresh ([`Freshness::Fresh`]): what
    /// a hit asks, from one reading of its age.
    pub fn fresh_at(&self, now: SystemTime) -> Option<FreshAt> {
        // (What `staleness` says, read once: no soft purge, younger than
        // its ttl.)
        let age = self.age(now);
        if self.soft_purged_ms.load(Ordering::Relaxed) != 0 || age >= self.lifetime.ttl {
            return None;
        }
        Some(FreshAt {
            now,
            age: age.as_secs(),
            ttl_left: i64::try_from((self.lifetime.ttl - age).as_secs()).unwrap_or(i64::MAX),
        })
    }

    /// Seconds of freshness left (negative once stale), for `Cache-Status`.
    pub fn ttl_left(&self, now: SystemTime) -> i64 {
        match self.staleness(now) {
            Some(stale) => -i64::try_from(stale.as_secs()).unwrap_or(i64::MAX),
            None => i64::try_from(self.lifetime.ttl.saturating_sub(self.age(now)).as_secs())
                .unwrap_or(i64::MAX),
        }
    }

    /// How long the store must keep it: until no window can use it, or,
    /// if it has a validator, [`KEEP_FOR_REVALIDATION`] longer, so that an
    /// expired copy still makes the next fetch conditional (a 304 instead of
    /// the whole body).
    pub fn keep_for(&self) -> Duration {
        let l = self.lifetime;
        let keep = if self.headers.contains_key(http::header::ETAG)
            || self.headers.contains_key(http::header::LAST_MODIFIED)
        {
            KEEP_FOR_REVALIDATION
        } else {
            Duration::ZERO
        };
        l.ttl
            .saturating_add(l.swr.max(l.stale_if_error).max(keep))
            .saturating_sub(self.initial_age)
    }

    /// What is left of [`Object::keep_for`], counted from when it was
    /// stored.
    pub fn keep_left(&self) -> Duration {
        let since = SystemTime::now()
            .duration_since(self.stored_at)
            .unwrap_or_default();
        self.keep_for().saturating_sub(since)
    }

    /// Unix milliseconds of its soft purge (0: none).
    pub fn soft_purged_ms(&self) -> u64 {
        self.soft_purged_ms.load(Ordering::Relaxed)
    }

    /// Marks it stale from now on (soft purge). True if it was not already.
    pub fn soft_purge(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        self.soft_purged_ms
            .compare_exchange(0, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// Does a request with these headers select this variant?
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, value)| super::key::combined(headers, name).as_ref() == value.as_ref())
    }

    /// What a hit head not made yet is counted as.
    pub(super) fn head_estimate(&self) -> usize {
        let fields: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        fields + HEAD_EXTRA
    }

    /// Bytes this object holds, for the store's bound.
    pub fn size(&self) -> u64 {
        let fields: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum();
        // Each field's entry twice: the stored map and the reuse head
        // (whose values share the stored bytes).
        let headers = fields + 80 * self.headers.len();
        let variants: usize = self
            .variants
            .cells
            .iter()
            .filter_map(|v| v.get().and_then(Option::as_ref))
            .map(Bytes::len)
            .sum();
        // A hit head as made, or as it would be: identity's, and one per
        // coding whose variant is made (it is weighed again then).
        let head = |slot: usize| match self.hit_heads[slot].get() {
            Some(made) => made.as_ref().map_or(0, |h| h.bytes.len()),
            None => self.head_estimate(),
        };
        let heads: usize = head(0)
            + Coding::ALL
                .iter()
                .filter(|c| self.variants.cells[c.index()].get().is_some())
                .map(|c| head(c.index() + 1))
                .sum::<usize>();
        (self.body.len() + variants + headers + heads + self.path.len() + OBJECT_BYTES) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(ttl: u64, swr: u64, sie: u64, initial_age: u64) -> Object {
        Object::new(
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::new(),
            Duration::from_secs(initial_age),
            Lifetime {
                ttl: Duration::from_secs(ttl),
                swr: Duration::from_secs(swr),
                stale_if_error: Duration::from_secs(sie),
            },
            vec![],
            ("/".into(), "h /".into()),
            vec![],
            false,
        )
    }

    #[test]
    fn freshness_moves_through_its_windows() {
        let o = object(10, 20, 60, 0);
        let at = |s| o.stored_at + Duration::from_secs(s);
        assert_eq!(o.freshness(at(5)), Freshness::Fresh);
        assert_eq!(o.ttl_left(at(4)), 6);
        assert_eq!(o.freshness(at(15)), Freshness::Stale);
        assert_eq!(o.ttl_left(at(15)), -5);
        assert_eq!(o.freshness(at(45)), Freshness::StaleIfError);
        assert_eq!(o.freshness(at(80)), Freshness::Dead);
        assert_eq!(o.keep_for(), Duration::from_secs(70));
        // `fresh_at` says what `freshness`, `age` and `ttl_left` say.
        for s in 0..=12 {
            for ms in [0, 999] {
                let now = at(s) + Duration::from_millis(ms);
                let fresh = (o.freshness(now) == Freshness::Fresh).then(|| FreshAt {
                    now,
                    age: o.age(now).as_secs(),
                    ttl_left: o.ttl_left(now),
                });
                assert_eq!(o.fresh_at(now), fresh, "{s}.{ms} s");
            }
        }
        o.soft_purge();
        assert_eq!(o.fresh_at(SystemTime::now()), None, "soft-purged");
    }

    /// Issue 11, fault 2: lifetimes at the edge of what a header or a config
    /// can name neither panic nor wrap into a negative ttl.
    #[test]
    fn huge_lifetimes_saturate() {
        let o = object(u64::MAX, u64::MAX, u64::MAX, u64::MAX);
        let now = o.stored_at + Duration::from_secs(1);
        assert!(
            o.keep_for() < Duration::from_secs(1),
            "arrived as old as it lives"
        );
        assert!(o.ttl_left(now) <= 0);
        let o = object(u64::MAX, u64::MAX, 0, 0);
        assert_eq!(o.freshness(now), Freshness::Fresh);
        assert!(o.ttl_left(now) > 0, "{}", o.ttl_left(now));
        assert!(o.keep_for() >= Duration::from_secs(u64::MAX / 2));
    }

    #[test]
    fn arriving_age_counts() {
        let o = object(10, 0, 0, 8);
        assert_eq!(
            o.age(o.stored_at + Duration::from_secs(1)),
            Duration::from_secs(9)
        );
        assert_eq!(
            o.freshness(o.stored_at + Duration::from_secs(3)),
            Freshness::Dead
        );
    }

    #[test]
    fn a_soft_purge_makes_it_stale_now() {
        let o = object(3600, 60, 600, 0);
        assert_eq!(o.freshness(SystemTime::now()), Freshness::Fresh);
        assert!(o.soft_purge());
        assert!(!o.soft_purge(), "once");
        assert_eq!(o.freshness(SystemTime::now()), Freshness::Stale);
        assert_eq!(
            o.freshness(SystemTime::now() + Duration::from_secs(120)),
            Freshness::StaleIfError
        );
    }
}
