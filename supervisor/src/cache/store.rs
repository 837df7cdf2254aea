//! Where objects live. [`Store`] is the seam: the in-memory store here is
//! L1; edge mode adds Redis as one more implementation (and a tiered store
//! that combines them) without the cache above noticing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;

use super::object::Object;

/// Which objects a purge touches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub all: bool,
    pub tags: Vec<String>,
    pub paths: Vec<String>,
    pub prefix: Option<String>,
    /// Primary keys (host, path, query): every variant of those URLs.
    pub primaries: Vec<String>,
}

impl Selector {
    /// Whether this names URLs only: an invalidation after an unsafe
    /// request (RFC 9111 §4.4), not an operator's purge.
    pub fn is_invalidation(&self) -> bool {
        !self.all
            && self.tags.is_empty()
            && self.paths.is_empty()
            && self.prefix.is_none()
            && !self.primaries.is_empty()
    }

    pub fn matches(&self, object: &Object) -> bool {
        self.all
            || object.tags.iter().any(|t| self.tags.contains(t))
            || self.paths.contains(&object.path)
            || self
                .prefix
                .as_ref()
                .is_some_and(|p| object.path.starts_with(p.as_str()))
            || self.primaries.contains(&object.primary)
    }
}

/// Counts the store reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub entries: u64,
    pub bytes: u64,
    pub evictions: u64,
    /// Edge mode: whether Redis answers (`None`: no Redis).
    pub shared_up: Option<bool>,
}

/// Storage for cached objects, keyed by the cache's full key.
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &str) -> impl Future<Output = Option<Arc<Object>>> + Send;
    /// What [`Store::get`] would give, when that needs no waiting: `Some`
    /// only from this instance's memory, and (with a shared tier behind
    /// it) only a copy fresh there. `None`: ask [`Store::get`].
    fn get_here(&self, key: &str) -> Option<Arc<Object>>;
    fn insert(&self, key: String, object: Arc<Object>) -> impl Future<Output = ()> + Send;
    /// `object`, stored under `key`, grew (a compressed variant was added):
    /// count it again, if it is still the one stored there.
    fn resized(&self, key: &str, object: &Arc<Object>) -> impl Future<Output = ()> + Send;
    /// Drops (hard) or marks stale (soft) every matching object; returns
    /// how many were affected.
    fn purge(&self, selector: &Selector, soft: bool) -> impl Future<Output = u64> + Send;
    /// Drops what `selector` names after an unsafe request (RFC 9111
    /// §4.4): at once here, and wherever it is shared without the request
    /// waiting for it.
    fn invalidate(&self, selector: &Selector) -> impl Future<Output = u64> + Send {
        self.purge(selector, false)
    }
    /// [`Store::purge`] of what this instance holds alone, for a purge
    /// another instance made (and already made in what they share).
    fn purge_local(&self, selector: &Selector, soft: bool) -> impl Future<Output = u64> + Send {
        self.purge(selector, soft)
    }
    /// The `Vary` names of `primary`'s last stored response as a store
    /// shared with other instances knows them (`None`: no such store, or
    /// it does not know the URL).
    fn shared_vary(
        &self,
        _primary: &str,
    ) -> impl Future<Output = Option<Vec<http::HeaderName>>> + Send {
        std::future::ready(None)
    }
    /// The right to render `key` again, for `hold` at most, among every
    /// instance sharing this store (edge mode: one background render for
    /// the fleet). True when this instance may go ahead: always, without a
    /// shared store or when it does not answer.
    fn lease(&self, _key: &str, _hold: Duration) -> impl Future<Output = bool> + Send {
        std::future::ready(true)
    }
    /// Gives back a lease taken with [`Store::lease`] (before it runs out).
    fn release(&self, _key: &str) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }
    /// [`Store::release`], for a render that was not storable: the others
    /// waiting for it are told so, for `remember`.
    fn release_as_pass(&self, key: &str, _remember: Duration) -> impl Future<Output = ()> + Send {
        self.release(key)
    }
    /// Did another instance find `key` not storable lately?
    fn shared_pass(&self, _key: &str) -> impl Future<Output = bool> + Send {
        std::future::ready(false)
    }
    fn stats(&self) -> StoreStats;
}

/// The store an app's cache uses: in memory (L1) and, in edge mode, Redis
/// behind it (L2): an L1 miss asks L2 and promotes what it finds; every
/// store is written through; purges reach both, and the other instances.
#[derive(Debug)]
pub struct TieredStore {
    l1: Arc<MemoryStore>,
    l2: Option<Arc<super::l2::L2>>,
    guard: Arc<PurgeGuard>,
    /// Invalidations after unsafe requests, for one task that takes them
    /// to L2 (never on the request's path; when it falls behind, the
    /// excess stays in memory, and is logged).
    invalidations: Option<tokio::sync::mpsc::Sender<Selector>>,
    /// Keys this instance holds the fleet's lease on: their store gives
    /// it back in the same round trip. (Forgotten after a while: a fill
    /// that was cancelled leaves its lease to run out in Redis.)
    leases: moka::sync::Cache<String, ()>,
    /// Keys found missing from L2 by a lookup of their URL a moment ago:
    /// the lookup of the object that follows it skips L2 (once).
    absent: moka::sync::Cache<String, ()>,
    /// Tasks that serve this store alone (edge mode's purge listener):
    /// aborted with it.
    tasks: std::sync::Mutex<Vec<tokio_util::task::AbortOnDropHandle<()>>>,
}

/// What keeps a purged object from coming back into memory from L2.
#[derive(Debug, Default)]
struct PurgeGuard {
    /// Bumped by every purge, local or from another instance: what was
    /// read from L2 or written there while one ran may predate it.
    generation: AtomicU64,
    /// Purges whose L2 part is still under way: nothing is promoted then.
    running: AtomicU64,
}

/// Counts a purge as running until dropped.
struct Running(Arc<PurgeGuard>);

impl Running {
    fn start(guard: &Arc<PurgeGuard>) -> Self {
        guard.generation.fetch_add(1, Ordering::SeqCst);
        guard.running.fetch_add(1, Ordering::AcqRel);
        Running(Arc::clone(guard))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.generation.fetch_add(1, Ordering::AcqRel);
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Leases remembered for their store to give back (more are given back
/// on their own).
const MAX_LEASES: u64 = 10_000;

/// Invalidations waiting for the task that takes them to L2.
const MAX_INVALIDATIONS: usize = 1024;

impl TieredStore {
    pub fn new(l1: MemoryStore, l2: Option<Arc<super::l2::L2>>) -> Self {
        let l1 = Arc::new(l1);
        let invalidations = l2.as_ref().map(|l2| {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Selector>(MAX_INVALIDATIONS);
            let (l1, l2) = (Arc::clone(&l1), Arc::clone(l2));
            tokio::spawn(async move {
                while let Some(selector) = rx.recv().await {
                    // While Redis is away there is nothing to invalidate
                    // there (and nothing to wait for).
                    if !l2.is_up() {
                        continue;
                    }
                    if let Err(e) = Self::purge_shared(&l1, &l2, &selector, false, true).await {
                        tracing::debug!(
                            ?selector,
                            "redis: an invalidation did not reach Redis: {e}"
                        );
                    }
                }
            });
            tx
        });
        TieredStore {
            l1,
            l2,
            guard: Arc::new(PurgeGuard::default()),
            invalidations,
            leases: moka::sync::Cache::builder()
                .max_capacity(MAX_LEASES)
                .time_to_live(Duration::from_secs(600))
                .build(),
            absent: moka::sync::Cache::builder()
                .max_capacity(MAX_LEASES)
                .time_to_live(Duration::from_secs(1))
                .build(),
            tasks: std::sync::Mutex::default(),
        }
    }

    /// A purge, and why it did not reach Redis if it did not (the other
    /// instances may then keep what it names until it expires).
    pub async fn purge_reporting(&self, selector: &Selector, soft: bool) -> (u64, Option<String>) {
        let _running = Running::start(&self.guard);
        let local = self.l1.purge(selector, soft).await;
        let Some(l2) = &self.l2 else {
            return (local, None);
        };
        match Self::purge_shared(&self.l1, l2, selector, soft, false).await {
            Ok(shared) => (local.max(shared), None),
            Err(e) => {
                tracing::warn!(
                    ?selector,
                    soft,
                    "redis: the purge did not fully reach Redis ({e}): other instances may keep serving what it names until it expires"
                );
                (local, Some(e))
            }
        }
    }

    /// `shared`, read from L2 for `key` while the purge generation was
    /// `generation`, into memory if it is newer than `local` and no purge
    /// began meanwhile; what is to be served.
    async fn promote(
        &self,
        key: &str,
        local: Option<Arc<Object>>,
        shared: Object,
        generation: u64,
    ) -> Option<Arc<Object>> {
        let newer = local
            .as_ref()
            .is_none_or(|mine| shared.stored_at > mine.stored_at);
        if !newer || shared.keep_left().is_zero() {
            return local;
        }
        if self.guard.generation.load(Ordering::Acquire) != generation {
            // A purge ran while it was read: it may be what was purged.
            return local;
        }
        let shared = Arc::new(shared);
        self.l1.insert(key.to_string(), Arc::clone(&shared)).await;
        // A purge that began between the check above and the insert may
        // have passed over memory already: take the copy back. (One that
        // begins after this check passes over memory after the insert.)
        if self.guard.generation.load(Ordering::SeqCst) != generation {
            self.l1.remove_if_same(key, &shared);
            return local;
        }
        Some(shared)
    }

    /// Edge mode's Redis link, if any.
    pub fn l2(&self) -> Option<&Arc<super::l2::L2>> {
        self.l2.as_ref()
    }

    /// Keeps `tasks` running as long as this store lives.
    pub fn own_tasks(&self, tasks: impl IntoIterator<Item = tokio::task::JoinHandle<()>>) {
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(
                tasks
                    .into_iter()
                    .map(tokio_util::task::AbortOnDropHandle::new),
            );
    }

    /// The L2 part of a purge, then memory again (what was promoted from
    /// L2 before the L2 part was done is dropped too).
    async fn purge_shared(
        l1: &MemoryStore,
        l2: &super::l2::L2,
        selector: &Selector,
        soft: bool,
        only_if_found: bool,
    ) -> Result<u64, String> {
        let shared = l2.purge(selector, soft, only_if_found).await;
        l1.purge(selector, soft).await;
        shared
    }
}

impl Store for TieredStore {
    fn get_here(&self, key: &str) -> Option<Arc<Object>> {
        let local = self.l1.get_here(key);
        if self.l2.is_none() {
            return local;
        }
        // As `get`: a copy fresh here is answered without asking L2.
        local.filter(|object| {
            object.freshness(std::time::SystemTime::now()) == super::object::Freshness::Fresh
        })
    }

    async fn get(&self, key: &str) -> Option<Arc<Object>> {
        let local = self.l1.get(key).await;
        let l2 = match (&self.l2, &local) {
            (None, _) => return local,
            // Fresh here: no need to ask.
            (Some(_), Some(object))
                if object.freshness(std::time::SystemTime::now())
                    == super::object::Freshness::Fresh =>
            {
                return local;
            }
            (Some(l2), _) => l2,
        };
        // Missing or stale here: another instance may have stored a newer
        // one (the render of the fleet's one revalidation). Not while a
        // purge is under way: what L2 holds may be what it purges.
        // (The generation first: a purge starting after this read changes
        // it, one starting before is seen running.)
        let generation = self.guard.generation.load(Ordering::SeqCst);
        if self.guard.running.load(Ordering::SeqCst) > 0 {
            return local;
        }
        // Just looked up with its URL, and not there.
        if self.absent.remove(key).is_some() {
            return local;
        }
        let Some(shared) = l2.get(key).await else {
            return local;
        };
        self.promote(key, local, shared, generation).await
    }

    async fn insert(&self, key: String, object: Arc<Object>) {
        // Memory first, with no wait before it: a purge that follows finds
        // it there.
        let generation = self.guard.generation.load(Ordering::Acquire);
        self.l1.insert(key.clone(), Arc::clone(&object)).await;
        let Some(l2) = &self.l2 else { return };
        let leased = self.leases.remove(&key).is_some();
        let stored = l2.put(&key, &object, leased).await;
        if stored && self.guard.generation.load(Ordering::Acquire) != generation {
            // A purge ran while it was written: it may have missed it
            // there. (Cheaper to store it again than to serve it.)
            let l2 = Arc::clone(l2);
            tokio::spawn(async move { l2.forget(&key).await });
        } else if !stored && leased {
            // Not stored (refused, too big, or Redis did not answer): the
            // lease may still be held; the others must not wait for it.
            let l2 = Arc::clone(l2);
            tokio::spawn(async move { l2.release(&key).await });
        }
    }

    async fn resized(&self, key: &str, object: &Arc<Object>) {
        self.l1.resized(key, object).await;
    }

    async fn purge(&self, selector: &Selector, soft: bool) -> u64 {
        self.purge_reporting(selector, soft).await.0
    }

    async fn invalidate(&self, selector: &Selector) -> u64 {
        // (No purge guard: an invalidation is best effort, and its L2 part
        // ends with a second pass over memory, which drops what was
        // promoted meanwhile.)
        let local = self.l1.purge(selector, false).await;
        if let Some(queue) = &self.invalidations
            && queue.try_send(selector.clone()).is_err()
        {
            tracing::debug!(
                ?selector,
                "redis: invalidations fall behind; this one stays in memory"
            );
        }
        local
    }

    async fn purge_local(&self, selector: &Selector, soft: bool) -> u64 {
        let _running = Running::start(&self.guard);
        self.l1.purge(selector, soft).await
    }

    async fn shared_vary(&self, primary: &str) -> Option<Vec<http::HeaderName>> {
        let l2 = self.l2.as_ref()?;
        let generation = self.guard.generation.load(Ordering::SeqCst);
        if self.guard.running.load(Ordering::SeqCst) > 0 {
            return l2.vary(primary).await;
        }
        // The URL's Vary names and, unvaried, its object in one round trip:
        // the lookup of the object that follows need not ask again.
        let (vary, object) = l2.lookup(primary).await?;
        match (&vary, object) {
            (None, _) => {
                self.absent.insert(primary.to_string(), ());
            }
            (Some(_), Some(object)) => {
                let local = self.l1.get(primary).await;
                if self
                    .promote(primary, local, object, generation)
                    .await
                    .is_none()
                {
                    self.absent.insert(primary.to_string(), ());
                }
            }
            (Some(_), None) => {}
        }
        vary
    }

    async fn lease(&self, key: &str, hold: Duration) -> bool {
        match &self.l2 {
            Some(l2) => {
                let taken = l2.lease(key, hold).await;
                if taken {
                    self.leases.insert(key.to_string(), ());
                }
                taken
            }
            None => true,
        }
    }

    async fn release(&self, key: &str) {
        // (Given back already if the key was stored.)
        if let Some(l2) = &self.l2
            && self.leases.remove(key).is_some()
        {
            l2.release(key).await;
        }
    }

    async fn release_as_pass(&self, key: &str, remember: Duration) {
        if let Some(l2) = &self.l2
            && self.leases.remove(key).is_some()
        {
            l2.release_as_pass(key, remember).await;
        }
    }

    async fn shared_pass(&self, key: &str) -> bool {
        match &self.l2 {
            Some(l2) => l2.passes(key).await,
            None => false,
        }
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            shared_up: self.l2.as_ref().map(|l2| l2.is_up()),
            ..self.l1.stats()
        }
    }
}

/// The in-memory store: `moka`, with a per-object expiry (an object is kept
/// as long as any of its windows can use it), bounded by both entry count
/// and bytes.
///
/// moka bounds one weighted capacity. Each object weighs at least
/// `max_bytes / max_entries` (and at least its size), with the capacity set
/// to `max_bytes`: the byte total stays under `max_bytes`, and since every
/// object weighs at least `max_bytes / max_entries`, the count stays under
/// `max_entries`.
pub struct MemoryStore {
    objects: moka::sync::Cache<String, Stored, super::KeyHasher>,
    bytes: Arc<AtomicU64>,
    evictions: Arc<AtomicU64>,
}

/// One stored object and the bytes counted for it when it was put: each
/// put adds its own charge and each removal or replacement takes off the
/// charge of the entry that goes, so the count never drifts.
#[derive(Clone)]
struct Stored {
    object: Arc<Object>,
    charged: u64,
}

impl Stored {
    fn new(object: Arc<Object>) -> Self {
        Stored {
            charged: object.size(),
            object,
        }
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("stats", &self.stats())
            .finish()
    }
}

struct KeepWhileUseful;

impl moka::Expiry<String, Stored> for KeepWhileUseful {
    fn expire_after_create(&self, _: &String, stored: &Stored, _: Instant) -> Option<Duration> {
        Some(stored.object.keep_left())
    }

    /// From the object's own storing time: putting the same object again
    /// (it grew a variant) must not extend its life.
    fn expire_after_update(
        &self,
        _: &String,
        stored: &Stored,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(stored.object.keep_left())
    }
}

impl MemoryStore {
    pub fn new(max_entries: u64, max_bytes: u64) -> Self {
        let floor = (max_bytes / max_entries.max(1)).max(1);
        let bytes = Arc::new(AtomicU64::new(0));
        let evictions = Arc::new(AtomicU64::new(0));
        let (bytes_out, evicted) = (Arc::clone(&bytes), Arc::clone(&evictions));
        let objects = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(move |_: &String, stored: &Stored| {
                u32::try_from(stored.charged.max(floor)).unwrap_or(u32::MAX)
            })
            .expire_after(KeepWhileUseful)
            .eviction_listener(move |_, stored: Stored, cause| {
                bytes_out.fetch_sub(stored.charged, Ordering::Relaxed);
                if cause == RemovalCause::Size {
                    evicted.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build_with_hasher(super::KeyHasher::default());
        MemoryStore {
            objects,
            bytes,
            evictions,
        }
    }

    /// Puts `stored` at `key` if `still` says so of what is there now;
    /// the charge is counted before (so the count never goes below what
    /// is stored) and taken back if nothing was put.
    fn put_if(&self, key: &str, stored: Stored, still: impl FnOnce(Option<&Stored>) -> bool) {
        use moka::ops::compute::{CompResult, Op};
        let charged = stored.charged;
        self.bytes.fetch_add(charged, Ordering::Relaxed);
        // Every write goes through the entry API, which orders writes to
        // one key.
        let result = self.objects.entry_by_ref(key).and_compute_with(|entry| {
            if still(entry.as_ref().map(|e| e.value())) {
                Op::Put(stored)
            } else {
                Op::Nop
            }
        });
        if !matches!(
            result,
            CompResult::Inserted(_) | CompResult::ReplacedWith(_)
        ) {
            self.bytes.fetch_sub(charged, Ordering::Relaxed);
        }
    }
}

impl MemoryStore {
    /// Removes `key` if `object` is what is stored there.
    fn remove_if_same(&self, key: &str, object: &Arc<Object>) {
        self.objects
            .entry_by_ref(key)
            .and_compute_with(|entry| match entry {
                Some(entry) if Arc::ptr_eq(&entry.value().object, object) => {
                    moka::ops::compute::Op::Remove
                }
                _ => moka::ops::compute::Op::Nop,
            });
    }
}

impl Store for MemoryStore {
    fn get_here(&self, key: &str) -> Option<Arc<Object>> {
        self.objects.get(key).map(|stored| stored.object)
    }

    async fn get(&self, key: &str) -> Option<Arc<Object>> {
        self.get_here(key)
    }

    async fn insert(&self, key: String, object: Arc<Object>) {
        self.put_if(&key, Stored::new(object), |_| true);
    }

    async fn resized(&self, key: &str, object: &Arc<Object>) {
        // Put again (moka weighs it anew) only if it is still the object
        // stored there: a newer one may have replaced it meanwhile, or a
        // purge removed it.
        self.put_if(key, Stored::new(Arc::clone(object)), |current| {
            current.is_some_and(|c| Arc::ptr_eq(&c.object, object))
        });
    }

    async fn purge(&self, selector: &Selector, soft: bool) -> u64 {
        let mut affected = 0;
        for (key, stored) in self.objects.iter() {
            let object = &stored.object;
            if !selector.matches(object) {
                continue;
            }
            if soft {
                if object.soft_purge() {
                    affected += 1;
                }
            } else {
                // Only if what is stored there now still matches (a fill
                // may have replaced it since the scan saw it).
                let removed = self
                    .objects
                    .entry_by_ref(key.as_str())
                    .and_compute_with(|entry| match entry {
                        Some(entry) if selector.matches(&entry.value().object) => {
                            moka::ops::compute::Op::Remove
                        }
                        _ => moka::ops::compute::Op::Nop,
                    });
                if let moka::ops::compute::CompResult::Removed(_) = removed {
                    affected += 1;
                }
            }
        }
        affected
    }

    fn stats(&self) -> StoreStats {
        self.objects.run_pending_tasks();
        StoreStats {
            entries: self.objects.entry_count(),
            bytes: self.bytes.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            shared_up: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    use super::*;
    use crate::cache::policy::Lifetime;

    fn object(path: &str) -> Arc<Object> {
        Arc::new(Object::new(
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from_static(b"page"),
            Duration::ZERO,
            Lifetime {
                ttl: Duration::from_secs(60),
                swr: Duration::ZERO,
                stale_if_error: Duration::ZERO,
            },
            vec![],
            (path.into(), format!("h {path}")),
            vec![],
            false,
        ))
    }

    /// A promotion taken back removes its own copy only: a newer object
    /// stored under the key meanwhile stays.
    #[tokio::test]
    async fn remove_if_same_takes_back_only_that_object() {
        let store = MemoryStore::new(100, 1 << 20);
        let promoted = object("/a");
        store.insert("k".into(), Arc::clone(&promoted)).await;
        store.remove_if_same("k", &promoted);
        assert!(store.get("k").await.is_none(), "its own copy goes");

        let newer = object("/a");
        store.insert("k".into(), Arc::clone(&newer)).await;
        store.remove_if_same("k", &promoted);
        let kept = store.get("k").await.expect("the newer one stays");
        assert!(Arc::ptr_eq(&kept, &newer));
    }

    /// What counts as an invalidation (URLs only) and what as a purge.
    #[test]
    fn only_url_selectors_are_invalidations() {
        let urls = Selector {
            primaries: vec!["h /a".into()],
            ..Selector::default()
        };
        assert!(urls.is_invalidation());
        for purge in [
            Selector {
                all: true,
                ..urls.clone()
            },
            Selector {
                tags: vec!["t".into()],
                ..urls.clone()
            },
            Selector {
                paths: vec!["/a".into()],
                ..urls.clone()
            },
            Selector {
                prefix: Some("/".into()),
                ..urls.clone()
            },
            Selector::default(),
        ] {
            assert!(!purge.is_invalidation(), "{purge:?}");
        }
    }
}
