//! Edge mode's L2: one app's share of a Redis (or Valkey, 6.0 or later, not
//! a cluster) that several bext instances use, so that a page rendered by
//! one is a hit on the others.
//!
//! Keys, all under `PREFIX NAMESPACE ":"` (so that platforms and sites can
//! share one Redis):
//!
//! - `o:HASH` an object ([`super::wire`]), HASH the SHA-256 of its full
//!   cache key; it expires with the object (`PX` = what is left of its
//!   keep time);
//! - `v:HASH(primary)` the `Vary` names of a URL's last stored response,
//!   so that a cold instance finds varied pages (every Next.js App Router
//!   page varies on `rsc`);
//! - `t:TAG`, `p:PATH`, `k:HASH(primary)` sets of object keys, for purges
//!   by tag, path and URL (they expire no sooner than their members);
//! - `gen` the purge generation: every purge increments it first, and a
//!   store from an instance that has not heard of the latest purge yet is
//!   refused (it may hold a page from before it);
//! - `lease:HASH` who renders an entry again (one instance of the fleet);
//! - `pass:HASH` its render was not storable (for 10 s: the instances that
//!   waited for it ask their apps at once);
//! - `rl:CLIENT` a client's rate-limit state;
//! - channel `purge`: every purge, for the other instances to drop what
//!   they hold in memory.
//!
//! Request-path operations are bounded by the configured timeout and fail
//! soft: an error or a timeout is a miss (or an unshared write), never a
//! failed request; after one, they skip Redis for a while (doubling from
//! 1 s to 30 s) so that a dead Redis costs nothing per request. Purges have
//! a connection and a time bound of their own and are never skipped: a
//! purge that cannot reach Redis is logged as such. An instance cut off
//! from the purge channel (noticed by a ping every few seconds) drops
//! everything it holds in memory when it is back: it may have missed a
//! purge.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use http::HeaderName;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tracing::{info, warn};

use super::object::Object;
use super::store::Selector;
use super::wire;
use crate::config::{RedisSettings, RedisWrite};

/// Longest request-path operations skip Redis after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest one step of a purge may take (not on a request's path).
const PURGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most object keys one purge removes (a bound on one purge's work; the
/// rest, cut and logged, expire by themselves).
const MAX_PURGE_MEMBERS: usize = 100_000;
/// Bodies larger than this are kept in memory only: moving them through
/// Redis would not fit the request-path timeout.
pub const MAX_SHARED_BODY: usize = 1 << 20;
/// How often the purge channel is pinged: a silent connection loss is
/// noticed within about this (plus the ping's own bound).
pub const CHANNEL_PING: Duration = Duration::from_secs(5);

/// A purge, as published to the other instances. Fields added later must
/// have defaults: instances of two versions run side by side in a rolling
/// upgrade.
#[derive(Debug, Serialize, Deserialize)]
struct PurgeMessage {
    /// The instance that purged (it has already purged its own memory).
    from: String,
    /// The purge generation it made.
    #[serde(default)]
    generation: u64,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    primaries: Vec<String>,
    #[serde(default)]
    soft: bool,
    /// Sent as the purge starts (its generation taken): nothing to purge
    /// yet, only "this generation is coming".
    #[serde(default)]
    pending: bool,
}

/// What an operation on Redis was for, as `bext_redis_op_duration_seconds`
/// labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Set,
    Lease,
    Release,
    RateLimit,
    Ping,
    Purge,
    /// A store that raced a purge taken back.
    TakeBack,
    /// Redis's purge generation read (on subscribing, and with each ping).
    Generation,
}

impl Op {
    pub const ALL: [Op; 9] = [
        Op::Get,
        Op::Set,
        Op::Lease,
        Op::Release,
        Op::RateLimit,
        Op::Ping,
        Op::Purge,
        Op::TakeBack,
        Op::Generation,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Set => "set",
            Op::Lease => "lease",
            Op::Release => "lease_release",
            Op::RateLimit => "rate_limit",
            Op::Ping => "ping",
            Op::Purge => "purge",
            Op::TakeBack => "take_back",
            Op::Generation => "generation",
        }
    }
}

/// Upper bounds (seconds) of the operation time buckets: 100 µs (a local
/// Redis) to the longest timeout.
const OP_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// Request-path operations skip Redis for a while after a failure.
#[derive(Debug)]
struct Breaker {
    start: Instant,
    /// Nanoseconds after `start` until which Redis is skipped (0: in use).
    skip_until: AtomicU64,
    failures: AtomicU32,
    /// The last state logged (true: up).
    up: AtomicBool,
}

impl Breaker {
    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn open(&self) -> bool {
        let until = self.skip_until.load(Ordering::Relaxed);
        until == 0 || self.now() >= until
    }

    fn succeeded(&self, prefix: &str) {
        self.failures.store(0, Ordering::Relaxed);
        self.skip_until.store(0, Ordering::Relaxed);
        if !self.up.swap(true, Ordering::Relaxed) {
            info!(%prefix, "redis: reachable again; the cache is shared again");
        }
    }

    fn failed(&self, prefix: &str, what: &str) {
        let now = self.now();
        // Operations that failed together (in flight when Redis went) count
        // once: only a failure after the skip has ended escalates it.
        if self.skip_until.load(Ordering::Relaxed) > now {
            return;
        }
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let backoff = Duration::from_secs(1)
            .saturating_mul(1u32 << failures.saturating_sub(1).min(5))
            .min(MAX_BACKOFF);
        let until = now.saturating_add(u64::try_from(backoff.as_nanos()).unwrap_or(u64::MAX));
        self.skip_until.store(until.max(1), Ordering::Relaxed);
        if self.up.swap(false, Ordering::Relaxed) {
            warn!(%prefix, "redis: {what}; serving from memory and the app without it until it answers again");
        }
    }
}

/// One app's L2.
pub struct L2 {
    client: redis::Client,
    /// For the request path, one per serving thread (slot 0: any other
    /// thread), each made by its thread on first use.
    conns: Box<[std::sync::OnceLock<ConnectionManager>]>,
    request_config: ConnectionManagerConfig,
    /// For purges: a longer timeout, and no breaker.
    slow: ConnectionManager,
    /// `PREFIX NAMESPACE ":"`.
    prefix: String,
    timeout: Duration,
    write: RedisWrite,
    max_body: usize,
    /// This instance, in purge messages.
    instance: String,
    /// The latest purge generation this instance has heard of (see the
    /// module's `gen`).
    generation: AtomicU64,
    breaker: Breaker,
    /// Pings of the purge channel answered (for tests).
    pings: AtomicU64,
    /// The highest purge generation heard of on the channel (announced or
    /// done), whether applied yet or not.
    received: AtomicU64,
    /// How long operations took (answered, failed or timed out; not those
    /// skipped), per [`Op`].
    times: [prometheus_client::metrics::histogram::Histogram; Op::ALL.len()],
}

impl std::fmt::Debug for L2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L2")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn hash(text: &str) -> String {
    let digest = sha2::Sha256::digest(text.as_bytes());
    let mut out = String::with_capacity(64);
    for byte in digest {
        use std::fmt::Write;
        let _ = write!(out, "{byte:02x}");
    }
    out
}

impl L2 {
    /// The L2 under `PREFIX namespace ":"`. Connecting starts in the
    /// background; the connections come back by themselves after a loss.
    pub fn new(
        settings: &RedisSettings,
        namespace: &str,
        max_body: usize,
    ) -> Result<Arc<L2>, String> {
        // rediss:// uses rustls: the process's provider is bext's own.
        let _ = rustls::crypto::CryptoProvider::install_default(Arc::unwrap_or_clone(
            crate::listener::tls::provider(),
        ));
        let client =
            redis::Client::open(settings.url.as_str()).map_err(|e| format!("redis url: {e}"))?;
        let manager = |response: Duration| {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(response))
                .set_number_of_retries(1)
                .set_max_delay(MAX_BACKOFF);
            ConnectionManager::new_lazy_with_config(client.clone(), config)
                .map_err(|e| format!("redis: {e}"))
        };
        // (The request bound is bext's own, below: the client's is only a
        // backstop.)
        let request_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(settings.timeout.saturating_mul(2)))
            .set_number_of_retries(1)
            .set_max_delay(MAX_BACKOFF);
        let l2 = Arc::new(L2 {
            conns: (0..=crate::shards::all().len())
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            request_config,
            slow: manager(PURGE_TIMEOUT)?,
            client,
            prefix: format!("{}{namespace}:", settings.prefix),
            timeout: settings.timeout,
            write: settings.write,
            max_body: max_body.min(MAX_SHARED_BODY),
            instance: uuid::Uuid::new_v4().simple().to_string(),
            generation: AtomicU64::new(0),
            pings: AtomicU64::new(0),
            received: AtomicU64::new(0),
            times: std::array::from_fn(|_| {
                prometheus_client::metrics::histogram::Histogram::new(OP_BUCKETS)
            }),
            breaker: Breaker {
                start: Instant::now(),
                skip_until: AtomicU64::new(0),
                failures: AtomicU32::new(0),
                up: AtomicBool::new(true),
            },
        });
        // Connect now, off the request path, on every thread that will use
        // a connection: the first request should not pay for it (nor count
        // it as a slow answer).
        let warm = |l2: Arc<L2>| async move {
            let Some(mut conn) = l2.conn() else { return };
            for conn in [&mut conn, &mut l2.slow.clone()] {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    redis::cmd("PING").query_async::<String>(conn),
                )
                .await;
            }
        };
        tokio::spawn(warm(Arc::clone(&l2)));
        for shard in crate::shards::all() {
            shard.spawn(warm(Arc::clone(&l2)));
        }
        Ok(l2)
    }

    /// The purge generation this instance has applied (see the module's
    /// `gen`): called once what it names has been purged from memory.
    pub fn adopt(&self, generation: u64) {
        self.generation.fetch_max(generation, Ordering::AcqRel);
    }

    /// Whether Redis answered the last request-path operation.
    pub fn is_up(&self) -> bool {
        self.breaker.up.load(Ordering::Relaxed)
    }

    fn object_key(&self, key: &str) -> String {
        format!("{}o:{}", self.prefix, hash(key))
    }

    fn vary_key(&self, primary: &str) -> String {
        format!("{}v:{}", self.prefix, hash(primary))
    }

    fn generation_key(&self) -> String {
        format!("{}gen", self.prefix)
    }

    fn lease_key(&self, key: &str) -> String {
        format!("{}lease:{}", self.prefix, hash(key))
    }

    fn pass_key(&self, key: &str) -> String {
        format!("{}pass:{}", self.prefix, hash(key))
    }

    fn channel(&self) -> String {
        format!("{}purge", self.prefix)
    }

    /// The calling thread's request-path connection, made on its first use
    /// there (its I/O then runs on this thread: no wake-up of another
    /// thread per operation).
    fn conn(&self) -> Option<ConnectionManager> {
        let slot = self
            .conns
            .get(crate::shards::current())
            .unwrap_or(&self.conns[0]);
        if let Some(conn) = slot.get() {
            return Some(conn.clone());
        }
        let made = ConnectionManager::new_lazy_with_config(
            self.client.clone(),
            self.request_config.clone(),
        )
        .inspect_err(|e| warn!(prefix = %self.prefix, "redis: {e}"))
        .ok()?;
        Some(slot.get_or_init(|| made).clone())
    }

    /// Runs `op` on the request-path connection, bounded by the timeout;
    /// `None` when Redis is being skipped, fails or is late.
    async fn run<T>(
        &self,
        what: Op,
        op: impl AsyncFnOnce(&mut ConnectionManager) -> redis::RedisResult<T>,
    ) -> Option<T> {
        if !self.breaker.open() {
            return None;
        }
        let mut conn = self.conn()?;
        let started = Instant::now();
        let answer = tokio::time::timeout(self.timeout, op(&mut conn)).await;
        self.observe(what, started);
        let what = what.label();
        match answer {
            Ok(Ok(value)) => {
                self.breaker.succeeded(&self.prefix);
                Some(value)
            }
            Ok(Err(e)) => {
                self.breaker
                    .failed(&self.prefix, &format!("{what} failed: {e}"));
                None
            }
            Err(_) => {
                self.breaker.failed(
                    &self.prefix,
                    &format!("{what} took longer than {:?}", self.timeout),
                );
                None
            }
        }
    }

    fn observe(&self, op: Op, started: Instant) {
        let index = Op::ALL.iter().position(|o| *o == op).unwrap_or(0);
        self.times[index].observe(started.elapsed().as_secs_f64());
    }

    /// How long each kind of operation took so far.
    pub fn times(
        &self,
    ) -> impl Iterator<Item = (Op, &prometheus_client::metrics::histogram::Histogram)> {
        Op::ALL.into_iter().zip(self.times.iter())
    }

    /// Runs `op` for a purge: its own connection and time bound, never
    /// skipped; the error, if any.
    async fn run_purge<T>(
        &self,
        what: Op,
        op: impl AsyncFnOnce(&mut ConnectionManager) -> redis::RedisResult<T>,
    ) -> Result<T, String> {
        let mut conn = self.slow.clone();
        let started = Instant::now();
        let answer = tokio::time::timeout(PURGE_TIMEOUT, op(&mut conn)).await;
        self.observe(what, started);
        match answer {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {PURGE_TIMEOUT:?}")),
        }
    }

    /// The object stored for the full cache key `key`, if L2 has a usable
    /// one.
    pub async fn get(&self, key: &str) -> Option<Object> {
        let object_key = self.object_key(key);
        let bytes: Option<Vec<u8>> = self
            .run(Op::Get, async |c| {
                redis::cmd("GET").arg(&object_key).query_async(c).await
            })
            .await
            .flatten();
        let bytes = bytes?;
        match wire::decode(&bytes, self.max_body) {
            Ok(object) => Some(object),
            Err(e) => {
                tracing::debug!(key = %object_key, "redis: an unusable value ({e}); a miss");
                None
            }
        }
    }

    /// Stores `object` under `key` (and its URL's `Vary` names, and its
    /// purge indexes), synchronously or in the background as configured.
    /// Refused by Redis when a purge this instance has not heard of yet
    /// came in between. Returns whether it is stored there (for `async`:
    /// whether it was sent).
    /// With `release`, this instance's lease on `key` is given back in
    /// the same round trip (stored or not).
    pub async fn put(self: &Arc<Self>, key: &str, object: &Object, release: bool) -> bool {
        if object.body.len() > self.max_body || !wire::fits(object) {
            return false;
        }
        let keep = object.keep_left();
        let ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX).max(1);
        let object_key = self.object_key(key);
        let bytes = wire::encode(object);
        let vary: Vec<&str> = object.vary.iter().map(|(n, _)| n.as_str()).collect();
        let mut sets: Vec<String> = object
            .tags
            .iter()
            .map(|t| format!("{}t:{t}", self.prefix))
            .collect();
        sets.push(format!("{}p:{}", self.prefix, object.path));
        sets.push(format!("{}k:{}", self.prefix, hash(&object.primary)));
        let mut cmd = PUT.key(&object_key);
        cmd.key(self.vary_key(&object.primary))
            .key(self.generation_key())
            .key(self.lease_key(key));
        for set in &sets {
            cmd.key(set);
        }
        cmd.arg(bytes.as_ref())
            .arg(ms)
            .arg(vary.join(","))
            .arg(self.generation.load(Ordering::Acquire))
            .arg(if release { self.instance.as_str() } else { "" });
        let this = Arc::clone(self);
        let write = async move {
            let stored: Option<i64> = this.run(Op::Set, async |c| cmd.invoke_async(c).await).await;
            stored == Some(1)
        };
        match self.write {
            RedisWrite::Sync => write.await,
            RedisWrite::Async => {
                tokio::spawn(write);
                true
            }
        }
    }

    /// Removes the object stored under `key` (a store that raced a purge).
    pub async fn forget(&self, key: &str) {
        let object_key = self.object_key(key);
        let _ = self
            .run_purge(Op::TakeBack, async |c| {
                redis::cmd("UNLINK")
                    .arg(&object_key)
                    .query_async::<i64>(c)
                    .await
            })
            .await;
    }

    /// The `Vary` names of `primary`'s last stored response, if L2 knows
    /// the URL (`Some(empty)`: stored, unvaried).
    pub async fn vary(&self, primary: &str) -> Option<Vec<HeaderName>> {
        let vary_key = self.vary_key(primary);
        let names: Option<String> = self
            .run(Op::Get, async |c| {
                redis::cmd("GET").arg(&vary_key).query_async(c).await
            })
            .await
            .flatten();
        let names = names?;
        Some(
            names
                .split(',')
                .filter(|n| !n.is_empty())
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .take(64)
                .collect(),
        )
    }

    /// What L2 knows of `primary` in one round trip: its `Vary` names
    /// (`None`: the URL is not stored) and, for an unvaried URL, its
    /// object. `None` when Redis does not answer.
    pub async fn lookup(&self, primary: &str) -> Option<(Option<Vec<HeaderName>>, Option<Object>)> {
        let (vary_key, object_key) = (self.vary_key(primary), self.object_key(primary));
        let (names, bytes): (Option<String>, Option<Vec<u8>>) = self
            .run(Op::Get, async |c| {
                redis::cmd("MGET")
                    .arg(&vary_key)
                    .arg(&object_key)
                    .query_async(c)
                    .await
            })
            .await?;
        let Some(names) = names else {
            return Some((None, None));
        };
        let vary: Vec<HeaderName> = names
            .split(',')
            .filter(|n| !n.is_empty())
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .take(64)
            .collect();
        let object = bytes.filter(|_| vary.is_empty()).and_then(|bytes| {
            match wire::decode(&bytes, self.max_body) {
                Ok(object) => Some(object),
                Err(e) => {
                    tracing::debug!(key = %object_key, "redis: an unusable value ({e}); a miss");
                    None
                }
            }
        });
        Some((Some(vary), object))
    }

    /// Takes the lease to render `key` again, for `hold` at most: false
    /// when another instance holds it; true when this one got it, or when
    /// Redis does not answer (then each instance renders for itself, as
    /// without Redis).
    pub async fn lease(&self, key: &str, hold: Duration) -> bool {
        let lease_key = self.lease_key(key);
        let ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX).max(1);
        let taken: Option<Option<String>> = self
            .run(Op::Lease, async |c| {
                redis::cmd("SET")
                    .arg(&lease_key)
                    .arg(&self.instance)
                    .arg("NX")
                    .arg("PX")
                    .arg(ms)
                    .query_async(c)
                    .await
            })
            .await;
        match taken {
            Some(reply) => reply.is_some(),
            None => true,
        }
    }

    /// Gives back this instance's lease on `key` (not another's: it may
    /// have run out and been taken since).
    pub async fn release(&self, key: &str) {
        let lease_key = self.lease_key(key);
        self.run(Op::Release, async |c| {
            RELEASE
                .key(&lease_key)
                .arg(&self.instance)
                .invoke_async::<i64>(c)
                .await
        })
        .await;
    }

    /// Gives back this instance's lease on `key`, whose render was not
    /// storable, and says so to the instances waiting for it (for
    /// `remember`): they send their requests to their app at once, rather
    /// than one after another with the lease.
    pub async fn release_as_pass(&self, key: &str, remember: Duration) {
        let (lease_key, pass_key) = (self.lease_key(key), self.pass_key(key));
        let ms = u64::try_from(remember.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let generation_key = self.generation_key();
        self.run(Op::Release, async |c| {
            RELEASE_AS_PASS
                .key(&lease_key)
                .key(&pass_key)
                .key(&generation_key)
                .arg(&self.instance)
                .arg(ms)
                .invoke_async::<i64>(c)
                .await
        })
        .await;
    }

    /// Was `key`'s render found not storable by another instance lately,
    /// with no purge since?
    pub async fn passes(&self, key: &str) -> bool {
        let (pass_key, generation_key) = (self.pass_key(key), self.generation_key());
        let found: Option<(Option<String>, Option<String>)> = self
            .run(Op::Get, async |c| {
                redis::cmd("MGET")
                    .arg(&pass_key)
                    .arg(&generation_key)
                    .query_async(c)
                    .await
            })
            .await;
        match found {
            Some((Some(marked), generation)) => marked == generation.as_deref().unwrap_or("0"),
            _ => false,
        }
    }

    /// The fleet-wide rate limit (GCRA, in Redis, by Redis's clock) for
    /// `client`: `Some((true, remaining))` or `Some((false, retry_after
    /// µs))`; `None` when Redis does not answer (the caller decides alone).
    pub async fn gcra(
        &self,
        client: &str,
        interval_us: u64,
        tolerance_us: u64,
    ) -> Option<(bool, u64)> {
        let key = format!("{}rl:{client}", self.prefix);
        let answer: Option<(i64, i64)> = self
            .run(Op::RateLimit, async |c| {
                GCRA.key(&key)
                    .arg(interval_us.max(1))
                    .arg(tolerance_us)
                    .invoke_async(c)
                    .await
            })
            .await;
        let (allowed, value) = answer?;
        Some((allowed == 1, u64::try_from(value).unwrap_or(0)))
    }

    /// Purges what `selector` names from L2 (hard: deleted; soft: marked
    /// stale, kept) and tells the other instances, even when the deleting
    /// failed. Returns the objects affected in L2, or why Redis could not
    /// take the purge (then the other instances may not have heard of it:
    /// the caller says so).
    pub async fn purge(
        &self,
        selector: &Selector,
        soft: bool,
        only_if_found: bool,
    ) -> Result<u64, String> {
        // An invalidation after an unsafe request names URLs that are
        // mostly not stored in Redis: then nothing is bumped or deleted
        // there, but the other instances still hear of it (they may hold
        // the URL in memory). A failed lookup counts as found.
        let found = if only_if_found {
            match self.members(selector).await {
                Ok(found) if found.0.is_empty() => {
                    self.publish(selector, soft, 0, false).await?;
                    return Ok(0);
                }
                Ok(found) => Some(found),
                Err(_) => None,
            }
        } else {
            None
        };
        // The generation first: a store racing this purge is refused. It
        // is announced at once (so that the others know it is coming) and
        // adopted here when the purge's own message comes back.
        let generation = self
            .run_purge(Op::Purge, async |c| {
                redis::cmd("INCR")
                    .arg(self.generation_key())
                    .query_async::<u64>(c)
                    .await
            })
            .await;
        if let Ok(generation) = &generation {
            let _ = self.publish(selector, soft, *generation, true).await;
        }
        let members = match found {
            Some(found) => Ok(found),
            None => self.members(selector).await,
        };
        let done = match members {
            Ok((members, sets)) => {
                let affected = if soft {
                    self.mark_stale(&members).await
                } else {
                    self.delete(&members).await
                };
                // The named index sets go too (their members are gone or
                // stale; a later store starts them again).
                if !soft && !sets.is_empty() {
                    let _ = self.delete(&sets).await;
                }
                affected
            }
            Err(e) => Err(e),
        };
        let published = self
            .publish(
                selector,
                soft,
                generation.as_ref().copied().unwrap_or(0),
                false,
            )
            .await;
        generation?;
        published?;
        done
    }

    /// Publishes a purge (or its announcement) on the channel.
    async fn publish(
        &self,
        selector: &Selector,
        soft: bool,
        generation: u64,
        pending: bool,
    ) -> Result<(), String> {
        let message = PurgeMessage {
            from: self.instance.clone(),
            generation,
            all: selector.all,
            tags: selector.tags.clone(),
            paths: selector.paths.clone(),
            prefix: selector.prefix.clone(),
            primaries: selector.primaries.clone(),
            soft,
            pending,
        };
        let text = serde_json::to_string(&message).unwrap_or_default();
        let channel = self.channel();
        self.run_purge(Op::Purge, async |c| {
            redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(&text)
                .query_async::<i64>(c)
                .await
        })
        .await
        .map(|_| ())
    }

    /// The object keys `selector` names in L2, and the index sets it names.
    async fn members(&self, selector: &Selector) -> Result<(Vec<String>, Vec<String>), String> {
        let mut sets: Vec<String> = Vec::new();
        sets.extend(
            selector
                .tags
                .iter()
                .map(|t| format!("{}t:{t}", self.prefix)),
        );
        sets.extend(
            selector
                .paths
                .iter()
                .map(|p| format!("{}p:{p}", self.prefix)),
        );
        sets.extend(
            selector
                .primaries
                .iter()
                .map(|p| format!("{}k:{}", self.prefix, hash(p))),
        );
        let objects_pattern = selector
            .all
            .then(|| format!("{}o:*", glob_escape(&self.prefix)));
        let paths_pattern = selector
            .prefix
            .as_ref()
            .map(|prefix| format!("{}p:{}*", glob_escape(&self.prefix), glob_escape(prefix)));
        let (mut members, sets) = self
            .run_purge(Op::Purge, async |c| {
                let mut members: Vec<String> = Vec::new();
                if let Some(pattern) = &objects_pattern {
                    members.extend(scan(c, pattern).await?);
                }
                if let Some(pattern) = &paths_pattern {
                    sets.extend(scan(c, pattern).await?);
                }
                for set in &sets {
                    if members.len() > MAX_PURGE_MEMBERS {
                        break;
                    }
                    members.extend(sscan(c, set).await?);
                }
                Ok((members, sets))
            })
            .await?;
        if members.len() > MAX_PURGE_MEMBERS {
            warn!(prefix = %self.prefix, "redis: a purge names more than {MAX_PURGE_MEMBERS} objects; the rest expire by themselves");
            members.truncate(MAX_PURGE_MEMBERS);
        }
        members.sort_unstable();
        members.dedup();
        Ok((members, sets))
    }

    async fn delete(&self, keys: &[String]) -> Result<u64, String> {
        let mut deleted = 0;
        for batch in keys.chunks(500) {
            deleted += self
                .run_purge(Op::Purge, async |c| {
                    redis::cmd("UNLINK").arg(batch).query_async::<u64>(c).await
                })
                .await?;
        }
        Ok(deleted)
    }

    /// Soft purge in L2: each object rewritten as stale from now, its
    /// expiry kept (`SET … KEEPTTL XX`: Redis 6.0). A store that lands
    /// between the read and the write is overwritten with the stale copy
    /// (it revalidates: one stale answer at worst).
    async fn mark_stale(&self, members: &[String]) -> Result<u64, String> {
        let mut marked = 0;
        // Small batches: each value may be a whole page.
        for batch in members.chunks(16) {
            let values: Vec<Option<Vec<u8>>> = self
                .run_purge(Op::Purge, async |c| {
                    redis::cmd("MGET").arg(batch).query_async(c).await
                })
                .await?;
            let mut pipe = redis::pipe();
            let mut queued = 0;
            for (key, value) in batch.iter().zip(values) {
                let Some(object) = value.and_then(|v| wire::decode(&v, self.max_body).ok()) else {
                    continue;
                };
                if object.soft_purge() {
                    marked += 1;
                    queued += 1;
                    pipe.cmd("SET")
                        .arg(key)
                        .arg(wire::encode(&object).as_ref())
                        .arg("KEEPTTL")
                        .arg("XX")
                        .ignore();
                }
            }
            // (An empty pipeline is an error in the client.)
            if queued > 0 {
                self.run_purge(Op::Purge, async |c| pipe.query_async::<()>(c).await)
                    .await?;
            }
        }
        Ok(marked)
    }

    /// Listens for the other instances' purges, calling `purge` for each
    /// with the purge generation to [`L2::adopt`] once it is applied (and a
    /// purge of everything, hard, after a time without the channel, or
    /// when Redis's generation runs ahead of this instance's: a purge may
    /// have been missed), until `purge` returns false (the cache is gone)
    /// or the task is aborted. `purge` must not block: it queues the work.
    /// The channel is pinged every `ping`; each ping also refreshes
    /// whether Redis answers (health, metrics).
    pub fn listen<F>(self: &Arc<Self>, ping: Duration, purge: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn(Selector, bool, u64) -> bool + Send + Sync + 'static,
    {
        let this = Arc::clone(self);
        let everything = || Selector {
            all: true,
            ..Selector::default()
        };
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(250);
            // Whether memory may hold what a missed purge named: after a
            // connection to the channel was lost, or never had.
            let mut cut_off = false;
            let mut warned = false;
            loop {
                let subscribed = async {
                    let mut pubsub = this.client.get_async_pubsub().await?;
                    pubsub.subscribe(this.channel()).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                };
                let pubsub = match tokio::time::timeout(Duration::from_secs(5), subscribed).await {
                    Ok(Ok(pubsub)) => Some(pubsub),
                    Ok(Err(e)) => {
                        if !warned {
                            warn!(prefix = %this.prefix, "redis: cannot listen for purges ({e}); retrying (an ACL must allow the channel {}purge)", this.prefix);
                            warned = true;
                        }
                        None
                    }
                    Err(_) => None,
                };
                let generation = match &pubsub {
                    Some(_) => this.current_generation().await,
                    None => None,
                };
                if let (Some(pubsub), Some(generation)) = (pubsub, generation) {
                    backoff = Duration::from_millis(250);
                    warned = false;
                    if cut_off {
                        info!(prefix = %this.prefix, "redis: purge channel back; dropping what this instance holds in memory (a purge may have been missed)");
                        if !purge(everything(), false, generation) {
                            return;
                        }
                    } else {
                        this.generation.fetch_max(generation, Ordering::AcqRel);
                    }
                    this.received.fetch_max(generation, Ordering::AcqRel);
                    let (mut sink, mut messages) = pubsub.split();
                    let mut ticks = tokio::time::interval(ping);
                    ticks.tick().await;
                    // Redis's generation at the last tick, when it was
                    // ahead of everything heard on the channel.
                    let mut ahead_at: Option<u64> = None;
                    loop {
                        tokio::select! {
                            message = messages.next() => {
                                let Some(message) = message else { break };
                                let Ok(text) = message.get_payload::<String>() else {
                                    continue;
                                };
                                let message = match serde_json::from_str::<PurgeMessage>(&text) {
                                    Ok(message) => message,
                                    Err(e) => {
                                        warn!(prefix = %this.prefix, "redis: a purge message this version cannot read ({e}); dropping what this instance holds in memory");
                                        let current = this.current_generation().await.unwrap_or(0);
                                        this.received.fetch_max(current, Ordering::AcqRel);
                                        if !purge(everything(), false, current) {
                                            return;
                                        }
                                        continue;
                                    }
                                };
                                this.received.fetch_max(message.generation, Ordering::AcqRel);
                                if message.pending {
                                    continue;
                                }
                                if message.from == this.instance {
                                    this.adopt(message.generation);
                                    continue;
                                }
                                let selector = Selector {
                                    all: message.all,
                                    tags: message.tags,
                                    paths: message.paths,
                                    prefix: message.prefix,
                                    primaries: message.primaries,
                                };
                                if !purge(selector, message.soft, message.generation) {
                                    return;
                                }
                            }
                            _ = ticks.tick() => {
                                let pinged = tokio::time::timeout(
                                    Duration::from_secs(3),
                                    sink.ping::<redis::Value>(),
                                )
                                .await;
                                if !matches!(pinged, Ok(Ok(_))) {
                                    break;
                                }
                                this.pings.fetch_add(1, Ordering::Relaxed);
                                // Whether Redis answers, for health and
                                // metrics even without traffic.
                                this.run(Op::Ping, async |c| {
                                    redis::cmd("PING").query_async::<redis::Value>(c).await
                                })
                                .await;
                                // Redis's generation still ahead of every
                                // purge heard on the channel (announced or
                                // done) one tick later: a message was lost.
                                // Behind what was applied: Redis lost its
                                // data (a restart, a flush): start from it.
                                let known = this.generation.load(Ordering::Acquire);
                                let received = this.received.load(Ordering::Acquire);
                                match this.current_generation().await {
                                    Some(current) if current > received => {
                                        if ahead_at.is_some_and(|before| before > this.received.load(Ordering::Acquire)) {
                                            warn!(prefix = %this.prefix, "redis: a purge was missed; dropping what this instance holds in memory");
                                            this.received.fetch_max(current, Ordering::AcqRel);
                                            if !purge(everything(), false, current) {
                                                return;
                                            }
                                            ahead_at = None;
                                        } else {
                                            ahead_at = Some(current);
                                        }
                                    }
                                    Some(current) if current < known => {
                                        let _ = this.generation.compare_exchange(
                                            known,
                                            current,
                                            Ordering::AcqRel,
                                            Ordering::Acquire,
                                        );
                                        this.received.store(current, Ordering::Release);
                                        ahead_at = None;
                                    }
                                    _ => ahead_at = None,
                                }
                            }
                        }
                    }
                    warn!(prefix = %this.prefix, "redis: the purge channel is gone; reconnecting");
                }
                cut_off = true;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        })
    }

    /// Redis's purge generation now.
    async fn current_generation(&self) -> Option<u64> {
        self.run_purge(Op::Generation, async |c| {
            redis::cmd("GET")
                .arg(self.generation_key())
                .query_async::<Option<u64>>(c)
                .await
        })
        .await
        .ok()
        .map(|g| g.unwrap_or(0))
    }

    /// Pings of the purge channel answered so far.
    pub fn pings(&self) -> u64 {
        self.pings.load(Ordering::Relaxed)
    }
}

/// Stores an object (KEYS[1], ARGV[1]) for ARGV[2] ms, its URL's Vary
/// names (KEYS[2], ARGV[3]), and its key in each index set (KEYS[5..]),
/// which then lives at least as long — unless the purge generation
/// (KEYS[3]) is past the one the storing instance knows (ARGV[4]): then
/// nothing is stored (0). First, when ARGV[5] names this instance, its
/// lease on the key (KEYS[4]) is given back, stored or not.
const PUT_SCRIPT: &str = r#"
if ARGV[5] ~= '' and redis.call('GET', KEYS[4]) == ARGV[5] then
  redis.call('DEL', KEYS[4])
end
if tonumber(redis.call('GET', KEYS[3]) or '0') > tonumber(ARGV[4]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
local ms = tonumber(ARGV[2])
for i = 5, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  local left = redis.call('PTTL', KEYS[i])
  if left >= 0 and left < ms or left == -1 then
    redis.call('PEXPIRE', KEYS[i], ms)
  end
end
return 1
"#;

// Sent by SHA (EVALSHA), their text only when Redis does not know them
// yet (after a restart or a flush).
static PUT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(PUT_SCRIPT));
static RELEASE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(RELEASE_SCRIPT));
static RELEASE_AS_PASS: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(RELEASE_AS_PASS_SCRIPT));
static GCRA: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(GCRA_SCRIPT));

/// Deletes a lease (KEYS[1]) only if it is still this instance's (ARGV[1]).
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// If the lease (KEYS[1]) is still this instance's (ARGV[1]): marks the
/// key not storable (KEYS[2], for ARGV[2] ms, as of the purge generation
/// KEYS[3]: a purge voids it), then deletes the lease, so the marker is
/// there before a waiting instance can take it.
const RELEASE_AS_PASS_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], redis.call('GET', KEYS[3]) or '0', 'PX', tonumber(ARGV[2]))
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// GCRA on one client's key (KEYS[1]) with the emission interval ARGV[1]
/// and the burst tolerance ARGV[2], both in µs, by Redis's own clock (the
/// instances' clocks may differ): `{1, remaining}` or `{0, retry_after}`.
const GCRA_SCRIPT: &str = r#"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local nxt = tat + interval
local ahead = nxt - now
if ahead > tolerance then
  return {0, ahead - tolerance}
end
redis.call('SET', KEYS[1], string.format('%.0f', nxt), 'PX', math.floor(ahead / 1000) + 1)
return {1, math.floor((tolerance - ahead) / interval)}
"#;

/// Every key matching `pattern` (SCAN, not KEYS: Redis keeps serving),
/// at most [`MAX_PURGE_MEMBERS`] and a bit.
async fn scan(c: &mut ConnectionManager, pattern: &str) -> redis::RedisResult<Vec<String>> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(c)
            .await?;
        keys.extend(batch);
        if next == 0 || keys.len() > MAX_PURGE_MEMBERS {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// The members of the set `key`, a batch at a time (SSCAN: a huge set does
/// not block Redis), at most [`MAX_PURGE_MEMBERS`] and a bit.
async fn sscan(c: &mut ConnectionManager, key: &str) -> redis::RedisResult<Vec<String>> {
    let mut cursor: u64 = 0;
    let mut members = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SSCAN")
            .arg(key)
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(c)
            .await?;
        members.extend(batch);
        if next == 0 || members.len() > MAX_PURGE_MEMBERS {
            return Ok(members);
        }
        cursor = next;
    }
}

/// `text` with Redis glob characters escaped.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
