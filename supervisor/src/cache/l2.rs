//! Edge mode's L2: one app's share of a Redis (or Valkey) that several bext
//! instances use, so that a page rendered by one is a hit on the others.
//!
//! Keys, all under `PREFIX APP ":"` (so that platforms and apps can share
//! one Redis):
//!
//! - `o:HASH` an object ([`super::wire`]), HASH the SHA-256 of its full
//!   cache key; it expires with the object (`PX` = what is left of its
//!   keep time);
//! - `v:HASH(primary)` the `Vary` names of a URL's last stored response,
//!   so that a cold instance finds varied pages (every Next.js App Router
//!   page varies on `rsc`);
//! - `t:TAG`, `p:PATH`, `k:HASH(primary)` sets of object keys, for purges
//!   by tag, path and URL (they expire no sooner than their members);
//! - channel `purge`: every purge, for the other instances to drop what
//!   they hold in memory.
//!
//! Every operation is bounded by the configured timeout and fails soft: an
//! error or a timeout is a miss (or an unshared write), never a failed
//! request. After a failure the L2 is skipped for a while (doubling from
//! 1 s to 30 s) so that a dead Redis costs nothing per request; one state
//! line is logged per change. An instance cut off from the purge channel
//! drops everything it holds in memory when it is back (it may have missed
//! a purge; what it drops is filled again from L2 or the app).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// Longest the L2 is skipped after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest one step of a purge may take (not on a request's path).
const PURGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most members one purge removes through an index set (a bound on one
/// purge's work; a larger set is cut and logged).
const MAX_PURGE_MEMBERS: usize = 100_000;

/// Stores an object (KEYS[1], ARGV[1]) for ARGV[2] ms, its URL's Vary
/// names (KEYS[2], ARGV[3]), and its key in each index set (KEYS[3..]),
/// which then lives at least as long.
const PUT_SCRIPT: &str = r#"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
local ms = tonumber(ARGV[2])
for i = 3, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  local left = redis.call('PTTL', KEYS[i])
  if left >= 0 and left < ms or left == -1 then
    redis.call('PEXPIRE', KEYS[i], ms)
  end
end
return 1
"#;

/// Deletes a lease (KEYS[1]) only if it is still this instance's (ARGV[1]).
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
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

/// A purge, as published to the other instances.
#[derive(Debug, Serialize, Deserialize)]
struct PurgeMessage {
    /// The instance that purged (it has already purged its own memory).
    from: String,
    all: bool,
    tags: Vec<String>,
    paths: Vec<String>,
    prefix: Option<String>,
    primaries: Vec<String>,
    soft: bool,
}

/// One app's L2.
pub struct L2 {
    client: redis::Client,
    conn: ConnectionManager,
    /// `PREFIX APP ":"`.
    prefix: String,
    timeout: Duration,
    write: RedisWrite,
    max_body: usize,
    /// This instance, in purge messages.
    instance: String,
    /// Unix ms until which the L2 is skipped (0: in use).
    skip_until_ms: AtomicU64,
    failures: AtomicU32,
    /// The last state logged (true: up).
    up: AtomicBool,
}

impl std::fmt::Debug for L2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L2")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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
    /// The L2 of app `app` (nothing is connected yet: the first operation
    /// connects, and the connection comes back by itself after a loss).
    pub fn new(settings: &RedisSettings, app: &str, max_body: usize) -> Result<Arc<L2>, String> {
        // rediss:// uses rustls: the process's provider is bext's own.
        let _ = rustls::crypto::CryptoProvider::install_default(Arc::unwrap_or_clone(
            crate::listener::tls::provider(),
        ));
        let client =
            redis::Client::open(settings.url.as_str()).map_err(|e| format!("redis url: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout.max(Duration::from_millis(500))))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(MAX_BACKOFF);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| format!("redis: {e}"))?;
        Ok(Arc::new(L2 {
            client,
            conn,
            prefix: format!("{}{app}:", settings.prefix),
            timeout: settings.timeout,
            write: settings.write,
            max_body,
            instance: uuid::Uuid::new_v4().simple().to_string(),
            skip_until_ms: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            up: AtomicBool::new(true),
        }))
    }

    fn object_key(&self, key: &str) -> String {
        format!("{}o:{}", self.prefix, hash(key))
    }

    fn vary_key(&self, primary: &str) -> String {
        format!("{}v:{}", self.prefix, hash(primary))
    }

    fn channel(&self) -> String {
        format!("{}purge", self.prefix)
    }

    /// Whether the L2 may be tried now (not skipped after failures).
    fn open(&self) -> bool {
        let until = self.skip_until_ms.load(Ordering::Relaxed);
        until == 0 || now_ms() >= until
    }

    fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.skip_until_ms.store(0, Ordering::Relaxed);
        if !self.up.swap(true, Ordering::Relaxed) {
            info!(prefix = %self.prefix, "redis: reachable again; the L2 is shared again");
        }
    }

    fn failed(&self, what: &str) {
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let backoff = Duration::from_secs(1)
            .saturating_mul(1u32 << failures.saturating_sub(1).min(5))
            .min(MAX_BACKOFF);
        let until = now_ms().saturating_add(u64::try_from(backoff.as_millis()).unwrap_or(0));
        self.skip_until_ms.store(until, Ordering::Relaxed);
        if self.up.swap(false, Ordering::Relaxed) {
            warn!(prefix = %self.prefix, "redis: {what}; serving from memory and the app without the L2 until it answers again");
        }
    }

    /// Runs `op` on the connection, bounded by the timeout; `None` when the
    /// L2 is skipped, fails or is late.
    async fn run<T>(
        &self,
        what: &str,
        op: impl AsyncFnOnce(&mut ConnectionManager) -> redis::RedisResult<T>,
    ) -> Option<T> {
        self.run_within(what, self.timeout, op).await
    }

    /// [`Self::run`] with a time bound of its own (purges: not on a
    /// request's path, and many keys).
    async fn run_within<T>(
        &self,
        what: &str,
        timeout: Duration,
        op: impl AsyncFnOnce(&mut ConnectionManager) -> redis::RedisResult<T>,
    ) -> Option<T> {
        if !self.open() {
            return None;
        }
        let mut conn = self.conn.clone();
        match tokio::time::timeout(timeout, op(&mut conn)).await {
            Ok(Ok(value)) => {
                self.succeeded();
                Some(value)
            }
            Ok(Err(e)) => {
                self.failed(&format!("{what} failed: {e}"));
                None
            }
            Err(_) => {
                self.failed(&format!("{what} took longer than {timeout:?}"));
                None
            }
        }
    }

    /// The object stored for the full cache key `key`, if L2 has a usable
    /// one.
    pub async fn get(&self, key: &str) -> Option<Object> {
        let object_key = self.object_key(key);
        let bytes: Option<Vec<u8>> = self
            .run("GET", async |c| {
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
    pub async fn put(self: &Arc<Self>, key: &str, object: &Object) {
        if object.body.len() > self.max_body {
            return;
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
        // One script, atomic, on any Redis since 2.6.12 (no PEXPIRE GT).
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(PUT_SCRIPT)
            .arg(2 + sets.len())
            .arg(&object_key)
            .arg(self.vary_key(&object.primary))
            .arg(&sets)
            .arg(bytes.as_ref())
            .arg(ms)
            .arg(vary.join(","));
        let this = Arc::clone(self);
        let write = async move {
            this.run("SET", async |c| cmd.query_async::<()>(c).await)
                .await;
        };
        match self.write {
            RedisWrite::Sync => write.await,
            RedisWrite::Async => {
                tokio::spawn(write);
            }
        }
    }

    /// The `Vary` names of `primary`'s last stored response, if L2 knows
    /// the URL (`Some(empty)`: stored, unvaried).
    pub async fn vary(&self, primary: &str) -> Option<Vec<HeaderName>> {
        let vary_key = self.vary_key(primary);
        let names: Option<String> = self
            .run("GET", async |c| {
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

    /// Takes the lease to render `key` again, for `hold` at most: false
    /// when another instance holds it; true when this one got it, or when
    /// Redis does not answer (then each instance renders for itself, as
    /// without Redis).
    pub async fn lease(&self, key: &str, hold: Duration) -> bool {
        let lease_key = format!("{}lease:{}", self.prefix, hash(key));
        let ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX).max(1);
        let taken: Option<Option<String>> = self
            .run("lease", async |c| {
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
        let lease_key = format!("{}lease:{}", self.prefix, hash(key));
        self.run("lease release", async |c| {
            redis::cmd("EVAL")
                .arg(RELEASE_SCRIPT)
                .arg(1)
                .arg(&lease_key)
                .arg(&self.instance)
                .query_async::<i64>(c)
                .await
        })
        .await;
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
            .run("rate limit", async |c| {
                redis::cmd("EVAL")
                    .arg(GCRA_SCRIPT)
                    .arg(1)
                    .arg(&key)
                    .arg(interval_us.max(1))
                    .arg(tolerance_us)
                    .query_async(c)
                    .await
            })
            .await;
        let (allowed, value) = answer?;
        Some((allowed == 1, u64::try_from(value).unwrap_or(0)))
    }

    /// Purges what `selector` names from L2 (hard: deleted; soft: marked
    /// stale, kept) and tells the other instances. Returns the objects
    /// affected in L2.
    pub async fn purge(&self, selector: &Selector, soft: bool) -> u64 {
        let members = self.members(selector).await.unwrap_or_default();
        let affected = if soft {
            self.mark_stale(&members).await
        } else {
            self.delete(&members).await
        };
        let message = PurgeMessage {
            from: self.instance.clone(),
            all: selector.all,
            tags: selector.tags.clone(),
            paths: selector.paths.clone(),
            prefix: selector.prefix.clone(),
            primaries: selector.primaries.clone(),
            soft,
        };
        if let Ok(text) = serde_json::to_string(&message) {
            let channel = self.channel();
            self.run("PUBLISH", async |c| {
                redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg(&text)
                    .query_async::<i64>(c)
                    .await
            })
            .await;
        }
        affected
    }

    /// The object keys `selector` names in L2.
    async fn members(&self, selector: &Selector) -> Option<Vec<String>> {
        let mut sets: Vec<String> = Vec::new();
        let mut patterns: Vec<String> = Vec::new();
        if selector.all {
            patterns.push(format!("{}o:*", glob_escape(&self.prefix)));
        }
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
        if let Some(prefix) = &selector.prefix {
            patterns.push(format!(
                "{}p:{}*",
                glob_escape(&self.prefix),
                glob_escape(prefix)
            ));
        }
        let found = self
            .run_within("purge lookup", PURGE_TIMEOUT, async |c| {
                let mut members: Vec<String> = Vec::new();
                for pattern in &patterns {
                    let keys: Vec<String> = scan(c, pattern).await?;
                    if pattern.ends_with("o:*") {
                        members.extend(keys);
                    } else {
                        sets.extend(keys);
                    }
                }
                for set in &sets {
                    let more: Vec<String> = redis::cmd("SMEMBERS").arg(set).query_async(c).await?;
                    members.extend(more);
                    if members.len() > MAX_PURGE_MEMBERS {
                        break;
                    }
                }
                Ok(members)
            })
            .await;
        let mut members = found?;
        if members.len() > MAX_PURGE_MEMBERS {
            warn!(prefix = %self.prefix, "redis: a purge names more than {MAX_PURGE_MEMBERS} objects; the rest expire by themselves");
            members.truncate(MAX_PURGE_MEMBERS);
        }
        members.sort_unstable();
        members.dedup();
        Some(members)
    }

    async fn delete(&self, members: &[String]) -> u64 {
        let mut deleted = 0;
        for batch in members.chunks(500) {
            let n: Option<u64> = self
                .run_within("UNLINK", PURGE_TIMEOUT, async |c| {
                    redis::cmd("UNLINK").arg(batch).query_async(c).await
                })
                .await;
            deleted += n.unwrap_or(0);
        }
        deleted
    }

    /// Soft purge in L2: each object rewritten as stale from now, its
    /// expiry kept.
    async fn mark_stale(&self, members: &[String]) -> u64 {
        let mut marked = 0;
        for batch in members.chunks(100) {
            let values: Option<Vec<Option<Vec<u8>>>> = self
                .run_within("MGET", PURGE_TIMEOUT, async |c| {
                    redis::cmd("MGET").arg(batch).query_async(c).await
                })
                .await;
            let Some(values) = values else { break };
            let mut pipe = redis::pipe();
            for (key, value) in batch.iter().zip(values) {
                let Some(object) = value.and_then(|v| wire::decode(&v, self.max_body).ok()) else {
                    continue;
                };
                if object.soft_purge() {
                    marked += 1;
                    pipe.cmd("SET")
                        .arg(key)
                        .arg(wire::encode(&object).as_ref())
                        .arg("KEEPTTL")
                        .arg("XX")
                        .ignore();
                }
            }
            self.run_within("SET", PURGE_TIMEOUT, async |c| {
                pipe.query_async::<()>(c).await
            })
            .await;
        }
        marked
    }

    /// Listens for the other instances' purges, calling `purge` for each
    /// (and `purge` of everything, hard, after a time without the channel:
    /// a purge may have been missed), until `purge` returns false (the
    /// cache is gone) or the task is aborted.
    pub fn listen<F>(self: &Arc<Self>, purge: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn(Selector, bool) -> bool + Send + Sync + 'static,
    {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(250);
            let mut cut_off = false;
            loop {
                let subscribed = async {
                    let mut pubsub = this.client.get_async_pubsub().await?;
                    pubsub.subscribe(this.channel()).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                };
                match tokio::time::timeout(Duration::from_secs(5), subscribed).await {
                    Ok(Ok(mut pubsub)) => {
                        backoff = Duration::from_millis(250);
                        if cut_off {
                            info!(prefix = %this.prefix, "redis: purge channel back; dropping what this instance holds in memory (a purge may have been missed)");
                            if !purge(
                                Selector {
                                    all: true,
                                    ..Selector::default()
                                },
                                false,
                            ) {
                                return;
                            }
                        }
                        cut_off = true;
                        let mut messages = pubsub.on_message();
                        while let Some(message) = messages.next().await {
                            let Ok(text) = message.get_payload::<String>() else {
                                continue;
                            };
                            let Ok(message) = serde_json::from_str::<PurgeMessage>(&text) else {
                                continue;
                            };
                            if message.from == this.instance {
                                continue;
                            }
                            if !purge(
                                Selector {
                                    all: message.all,
                                    tags: message.tags,
                                    paths: message.paths,
                                    prefix: message.prefix,
                                    primaries: message.primaries,
                                },
                                message.soft,
                            ) {
                                return;
                            }
                        }
                        warn!(prefix = %this.prefix, "redis: the purge channel closed; reconnecting");
                    }
                    Ok(Err(e)) => {
                        if !cut_off || backoff >= MAX_BACKOFF {
                            tracing::debug!(prefix = %this.prefix, "redis: cannot subscribe to purges: {e}");
                        }
                        cut_off = true;
                    }
                    Err(_) => cut_off = true,
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        })
    }
}

/// Every key matching `pattern` (SCAN, not KEYS: Redis keeps serving).
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
