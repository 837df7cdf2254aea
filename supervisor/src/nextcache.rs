//! Next.js apps: one Next cache for all of an app's workers, and the app's
//! own revalidations (`revalidatePath`, `revalidateTag`, `updateTag`,
//! `res.revalidate`) reaching bext's HTTP cache at once.
//!
//! The Node adapter installs a cache handler in every worker of a Next app
//! (`installNextCache` in `worker/js/node-adapter.cjs`): Next's own
//! file-system cache without its per-process memory, so the workers share
//! the entries in `.next`. What Next keeps per process, the revalidated
//! tags, goes through this module: each worker connects to the app's
//! socket here (its first line carries the secret only the app's workers
//! were given), and over it, one JSON object per line:
//!
//! - worker → bext:
//!   - `hello {token, pid, worker, next}`;
//!   - `rev {n, tags: [[tag, {stale, expired}]], soft}`: the worker
//!     revalidated these tags (Next's own manifest entries);
//!   - `map {n, primary, path, tags}`: the request for `primary` (a URL
//!     bext may store) read Next's entry for `path`, which has these tags;
//!   - `set {n, primary, path, tags}`: Next wrote a new entry for `path`
//!     (`primary` when a request through bext caused it);
//!   - `ack {id}`.
//! - bext → worker: `tags {tags, ack}` (apply these to your manifest, then
//!   acknowledge), and `synced` after the state so far.
//!
//! A revalidation is applied by every other worker (which acknowledge it)
//! and purges the URLs of bext's cache that show one of the tags; a new
//! entry for a path purges the other URLs that showed that path (the Pages
//! Router's `res.revalidate`). Messages with effects are numbered per
//! worker, and every response a worker writes after one carries
//! `x-bext-next-sync: PID:N`: the proxy passes the response on only once
//! message N has been applied ([`NextLink::settle`]), so the request after
//! a revalidation sees it, whichever worker it lands on.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::{FramedRead, LinesCodec};
use tracing::{debug, info, warn};

use crate::cache::{IsrCache, store::Selector};

/// The socket's name in the app's runtime directory.
pub const SOCKET_NAME: &str = "next-cache.sock";
/// Where the workers find the socket, and the secret they show.
pub const ENV_SOCKET: &str = "BEXT_NEXT_CACHE_SOCKET";
pub const ENV_TOKEN: &str = "BEXT_NEXT_CACHE_TOKEN";
/// Request header: the URL bext caches the answer under (its primary key).
pub const PRIMARY_HEADER: &str = "x-bext-primary";
/// Response header: the worker's last message with effects (`PID:N`).
pub const SYNC_HEADER: &str = "x-bext-next-sync";

/// Longest line a worker may send.
const MAX_LINE: usize = 256 * 1024;
/// Connections at once (an app has at most a few dozen workers).
const MAX_CONNECTIONS: usize = 128;
/// Revalidated tags remembered (for workers that start later).
const MAX_TAGS: usize = 10_000;
/// Tags in one message, and the longest tag (Next's own limit is 256).
const MAX_MESSAGE_TAGS: usize = 1024;
const MAX_TAG_LEN: usize = 1024;
/// Tags per line of the state sent to a worker that connects.
const SNAPSHOT_CHUNK: usize = 500;
/// Lines waiting to be written to one worker.
const OUTBOX: usize = 1024;
/// Messages with effects waiting to be applied, per worker.
const INBOX: usize = 256;
/// How long a connection may take to say who it is.
const HELLO_WAIT: Duration = Duration::from_secs(5);
/// How long a revalidation waits for the other workers to apply it.
const ACK_WAIT: Duration = Duration::from_secs(1);
/// How long a response waits for its worker's messages to be applied.
pub const SETTLE_WAIT: Duration = Duration::from_secs(1);

/// One app's link with its workers' Next caches.
#[derive(Debug)]
pub struct NextLink {
    app: String,
    token: String,
    socket: PathBuf,
    /// The app's HTTP cache (replaced when the app's settings are).
    cache: arc_swap::ArcSwapOption<IsrCache>,
    state: Mutex<State>,
    acks: Mutex<HashMap<u64, (u64, oneshot::Sender<()>)>>,
    ids: AtomicU64,
    announced: AtomicBool,
    accept: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[derive(Debug, Default)]
struct State {
    /// Tag → its manifest entry, as Next keeps it (ms since the epoch).
    tags: HashMap<String, TagTimes>,
    urls: Urls,
    /// Connected workers, by connection.
    peers: HashMap<u64, Peer>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, Deserialize)]
struct TagTimes {
    #[serde(skip_serializing_if = "Option::is_none")]
    stale: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expired: Option<f64>,
}

impl TagTimes {
    fn latest(&self) -> f64 {
        self.stale.unwrap_or(0.0).max(self.expired.unwrap_or(0.0))
    }
}

#[derive(Debug)]
struct Peer {
    pid: u32,
    outbox: mpsc::Sender<Arc<str>>,
    applied: watch::Receiver<u64>,
}

/// Which of bext's URLs show which Next tags and paths.
#[derive(Debug, Default)]
struct Urls {
    shown: HashMap<String, Shown>,
    by_tag: HashMap<String, HashSet<String>>,
    by_path: HashMap<String, HashSet<String>>,
    /// Oldest first, for the bound.
    order: VecDeque<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Shown {
    path: String,
    tags: Vec<String>,
}

impl Urls {
    fn record(&mut self, primary: &str, shown: Shown, max: usize) {
        match self.shown.get(primary) {
            Some(old) if *old == shown => return,
            Some(_) => self.unindex(primary),
            None => self.order.push_back(primary.to_string()),
        }
        for tag in &shown.tags {
            self.by_tag
                .entry(tag.clone())
                .or_default()
                .insert(primary.to_string());
        }
        self.by_path
            .entry(shown.path.clone())
            .or_default()
            .insert(primary.to_string());
        self.shown.insert(primary.to_string(), shown);
        while self.shown.len() > max {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.unindex(&oldest);
            self.shown.remove(&oldest);
        }
    }

    fn unindex(&mut self, primary: &str) {
        let Some(old) = self.shown.get(primary) else {
            return;
        };
        for tag in &old.tags {
            if let Some(set) = self.by_tag.get_mut(tag) {
                set.remove(primary);
                if set.is_empty() {
                    self.by_tag.remove(tag);
                }
            }
        }
        if let Some(set) = self.by_path.get_mut(&old.path) {
            set.remove(primary);
            if set.is_empty() {
                self.by_path.remove(&old.path);
            }
        }
    }

    fn showing_tags<'a>(&self, tags: impl Iterator<Item = &'a str>) -> Vec<String> {
        let mut found = HashSet::new();
        for tag in tags {
            if let Some(set) = self.by_tag.get(tag) {
                found.extend(set.iter().cloned());
            }
        }
        found.into_iter().collect()
    }

    fn showing_path(&self, path: &str) -> Vec<String> {
        self.by_path
            .get(path)
            .map_or_else(Vec::new, |set| set.iter().cloned().collect())
    }
}

/// A worker's message.
#[derive(Debug, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
enum Message {
    Hello {
        token: String,
        pid: u32,
        #[serde(default)]
        worker: String,
        #[serde(default)]
        next: String,
    },
    Rev {
        n: u64,
        tags: Vec<(String, TagTimes)>,
        #[serde(default)]
        soft: bool,
    },
    Map {
        n: u64,
        primary: Option<String>,
        path: String,
        #[serde(default)]
        tags: Vec<String>,
    },
    Set {
        n: u64,
        primary: Option<String>,
        path: String,
        #[serde(default)]
        tags: Vec<String>,
    },
    Ack {
        id: u64,
    },
}

impl NextLink {
    /// Listens on `runtime_dir/next-cache.sock` (connectable by `uid` as
    /// well when the app runs as its own user). The environment for the
    /// workers is [`NextLink::worker_env`].
    pub fn start(app: &str, runtime_dir: &Path, uid: Option<u32>) -> std::io::Result<Arc<Self>> {
        let socket = runtime_dir.join(SOCKET_NAME);
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)?;
        if let Some(uid) = uid {
            std::os::unix::fs::chown(&socket, Some(uid), None)?;
        }
        let link = Arc::new(NextLink {
            app: app.to_string(),
            token: uuid::Uuid::new_v4().simple().to_string(),
            socket,
            cache: arc_swap::ArcSwapOption::empty(),
            state: Mutex::new(State::default()),
            acks: Mutex::new(HashMap::new()),
            ids: AtomicU64::new(1),
            announced: AtomicBool::new(false),
            accept: Mutex::new(None),
        });
        let weak = Arc::downgrade(&link);
        let accept = tokio::spawn(async move {
            let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                    debug!("next cache: too many connections");
                    continue;
                };
                let Some(link) = weak.upgrade() else { return };
                tokio::spawn(async move {
                    link.serve(stream).await;
                    drop(permit);
                });
            }
        });
        *link.accept.lock().unwrap_or_else(|e| e.into_inner()) = Some(accept);
        Ok(link)
    }

    /// What the app's workers need to connect.
    pub fn worker_env(&self) -> Vec<(String, String)> {
        vec![
            (ENV_SOCKET.into(), self.socket.display().to_string()),
            (ENV_TOKEN.into(), self.token.clone()),
        ]
    }

    /// Purges go to `cache` from now on.
    pub fn set_cache(&self, cache: Option<Arc<IsrCache>>) {
        self.cache.store(cache);
    }

    /// Waits (at most [`SETTLE_WAIT`]) until worker `pid`'s messages up to
    /// `n` have been applied. A worker bext does not know is not waited for.
    pub async fn settle(&self, pid: u32, n: u64) {
        let applied = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state
                .peers
                .values()
                .find(|p| p.pid == pid)
                .map(|p| p.applied.clone())
        };
        let Some(mut applied) = applied else { return };
        if tokio::time::timeout(SETTLE_WAIT, applied.wait_for(|&done| done >= n))
            .await
            .is_err()
        {
            debug!(app = %self.app, pid, n, "next cache: a response waited its longest for its worker's revalidation");
        }
    }

    /// One worker's connection, until it closes.
    async fn serve(self: Arc<Self>, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_LINE));
        let hello = match tokio::time::timeout(HELLO_WAIT, lines.next()).await {
            Ok(Some(Ok(line))) => serde_json::from_str::<Message>(&line).ok(),
            _ => None,
        };
        let Some(Message::Hello {
            token,
            pid,
            worker,
            next,
        }) = hello
        else {
            return;
        };
        {
            use subtle::ConstantTimeEq;
            if !bool::from(token.as_bytes().ct_eq(self.token.as_bytes())) {
                warn!(app = %self.app, "next cache: a connection with a wrong secret was refused");
                return;
            }
        }
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let (outbox, mut outgoing) = mpsc::channel::<Arc<str>>(OUTBOX);
        let (applied_tx, applied) = watch::channel(0u64);
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let tags: Vec<_> = state.tags.iter().collect();
            for chunk in tags.chunks(SNAPSHOT_CHUNK) {
                let line = serde_json::json!({ "t": "tags", "tags": chunk }).to_string();
                let _ = outbox.try_send(line.into());
            }
            let _ = outbox.try_send(Arc::from(r#"{"t":"synced"}"#));
            state.peers.insert(
                id,
                Peer {
                    pid,
                    outbox: outbox.clone(),
                    applied,
                },
            );
        }
        if !self.announced.swap(true, Ordering::Relaxed) {
            info!(app = %self.app, next = %next, "Next.js uses bext's cache handler: its workers share one Next cache, and its own revalidations purge bext's cache");
        }
        debug!(app = %self.app, pid, worker = %worker, "next cache: worker connected");
        let writer = tokio::spawn(async move {
            while let Some(line) = outgoing.recv().await {
                if write.write_all(line.as_bytes()).await.is_err()
                    || write.write_all(b"\n").await.is_err()
                {
                    return;
                }
            }
        });
        // Messages with effects are applied in order by one task; the
        // reader goes on, so acknowledgements are never stuck behind them.
        let (inbox, mut work) = mpsc::channel::<Message>(INBOX);
        let link = Arc::clone(&self);
        let applier = tokio::spawn(async move {
            while let Some(message) = work.recv().await {
                let n = link.apply(id, message).await;
                applied_tx.send_replace(n);
            }
        });
        while let Some(Ok(line)) = lines.next().await {
            let Ok(message) = serde_json::from_str::<Message>(&line) else {
                debug!(app = %self.app, pid, "next cache: unreadable message");
                continue;
            };
            match message {
                Message::Ack { id: ack } => self.acknowledged(id, ack),
                Message::Hello { .. } => {}
                other => {
                    if inbox.send(other).await.is_err() {
                        break;
                    }
                }
            }
        }
        drop(inbox);
        let _ = applier.await;
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .peers
            .remove(&id);
        writer.abort();
        debug!(app = %self.app, pid, "next cache: worker gone");
    }

    fn acknowledged(&self, from: u64, ack: u64) {
        let mut acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        if acks.get(&ack).is_some_and(|(peer, _)| *peer == from)
            && let Some((_, done)) = acks.remove(&ack)
        {
            let _ = done.send(());
        }
    }

    /// Applies one message with effects from connection `from`; its number.
    async fn apply(&self, from: u64, message: Message) -> u64 {
        match message {
            Message::Rev { n, tags, soft } => {
                self.revalidate(from, tags, soft).await;
                n
            }
            Message::Map {
                n,
                primary,
                path,
                tags,
            } => {
                if let Some(primary) = primary
                    .as_deref()
                    .and_then(crate::cache::key::primary_from_header)
                {
                    self.record(&primary, path, tags);
                }
                n
            }
            Message::Set {
                n,
                primary,
                path,
                tags,
            } => {
                // A request through bext caused it (a fill, or Next's own
                // regeneration of an entry it found stale): the URL now shows
                // this entry. Else the app regenerated the page itself (the
                // Pages Router's `res.revalidate`): bext's copies of it go.
                match primary
                    .as_deref()
                    .and_then(crate::cache::key::primary_from_header)
                {
                    Some(primary) => self.record(&primary, path, tags),
                    None => {
                        let showing = {
                            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                            state.urls.showing_path(&path)
                        };
                        let purged = if showing.is_empty() {
                            0
                        } else {
                            self.purge(showing, false).await
                        };
                        info!(app = %self.app, path = %path, purged, "next cache: the app regenerated a page");
                    }
                }
                n
            }
            Message::Hello { .. } | Message::Ack { .. } => 0,
        }
    }

    fn record(&self, primary: &str, path: String, mut tags: Vec<String>) {
        if primary.len() > MAX_LINE || path.len() > MAX_TAG_LEN * 8 {
            return;
        }
        tags.truncate(MAX_MESSAGE_TAGS);
        tags.retain(|t| t.len() <= MAX_TAG_LEN);
        let max = self.cache.load().as_ref().map_or(100_000, |c| {
            usize::try_from(c.max_entries())
                .unwrap_or(usize::MAX)
                .max(1)
        });
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .urls
            .record(primary, Shown { path, tags }, max);
    }

    /// A worker revalidated `tags`: every other worker applies it (and
    /// acknowledges), and bext's copies of what showed them are purged.
    async fn revalidate(&self, from: u64, mut tags: Vec<(String, TagTimes)>, soft: bool) {
        tags.truncate(MAX_MESSAGE_TAGS);
        tags.retain(|(tag, times)| {
            tag.len() <= MAX_TAG_LEN
                && [times.stale, times.expired]
                    .iter()
                    .flatten()
                    .all(|t| t.is_finite() && *t >= 0.0)
        });
        if tags.is_empty() {
            return;
        }
        let (purge, waits) = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            for (tag, times) in &tags {
                let entry = state.tags.entry(tag.clone()).or_default();
                if let Some(stale) = times.stale {
                    entry.stale = Some(entry.stale.map_or(stale, |s| s.max(stale)));
                }
                if times.expired.is_some() {
                    entry.expired = times.expired;
                }
            }
            if state.tags.len() > MAX_TAGS {
                let mut by_age: Vec<(f64, String)> = state
                    .tags
                    .iter()
                    .map(|(t, times)| (times.latest(), t.clone()))
                    .collect();
                by_age.sort_by(|a, b| a.0.total_cmp(&b.0));
                let excess = state.tags.len() - MAX_TAGS;
                for (_, tag) in by_age.into_iter().take(excess) {
                    state.tags.remove(&tag);
                }
            }
            let purge = state
                .urls
                .showing_tags(tags.iter().map(|(t, _)| t.as_str()));
            let mut waits = Vec::new();
            let mut acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
            for (&peer, p) in &state.peers {
                if peer == from {
                    continue;
                }
                let ack = self.ids.fetch_add(1, Ordering::Relaxed);
                let line = serde_json::json!({ "t": "tags", "tags": tags, "ack": ack }).to_string();
                if p.outbox.try_send(line.into()).is_ok() {
                    let (done, wait) = oneshot::channel();
                    acks.insert(ack, (peer, done));
                    waits.push(wait);
                }
            }
            (purge, waits)
        };
        let purged = if purge.is_empty() {
            0
        } else {
            self.purge(purge, soft).await
        };
        let workers = waits.len();
        let all = futures_util::future::join_all(waits);
        if tokio::time::timeout(ACK_WAIT, all).await.is_err() {
            warn!(app = %self.app, "next cache: a worker did not apply a revalidation within {ACK_WAIT:?}");
        }
        info!(
            app = %self.app,
            tags = %tags.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>().join(","),
            soft,
            purged,
            workers,
            "next cache: the app revalidated"
        );
    }

    async fn purge(&self, primaries: Vec<String>, soft: bool) -> u64 {
        let Some(cache) = self.cache.load_full() else {
            return 0;
        };
        let selector = Selector {
            primaries,
            ..Default::default()
        };
        match cache.purge_everywhere(&selector, soft).await {
            Ok(purged) => purged,
            Err(e) => {
                warn!(app = %self.app, "next cache: {e}");
                e.purged
            }
        }
    }
}

impl Drop for NextLink {
    fn drop(&mut self) {
        if let Some(accept) = self
            .accept
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            accept.abort();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// What a Next app's build says about its cache: the `cacheHandler` the
/// app configured, if any (bext's handler is then not used), from
/// `.next/required-server-files.json`.
pub fn own_cache_handler(app_dir: &Path) -> Option<String> {
    #[derive(Deserialize)]
    struct Required {
        config: RequiredConfig,
    }
    #[derive(Deserialize)]
    struct RequiredConfig {
        #[serde(rename = "cacheHandler")]
        cache_handler: Option<String>,
    }
    let file =
        crate::config::open_regular_nofollow(&app_dir.join(".next/required-server-files.json"))
            .ok()?;
    let reader = std::io::Read::take(file, crate::config::MAX_FILE_BYTES);
    let required: Required = serde_json::from_reader(reader).ok()?;
    required.config.cache_handler.filter(|h| !h.is_empty())
}

/// Whether bext's handler works with this Next version (16 and later: the
/// tag entries it shares are Next 16's).
pub fn supported(version: &str) -> bool {
    version
        .split('.')
        .next()
        .and_then(|major| major.parse::<u32>().ok())
        .is_some_and(|major| major >= 16)
}

/// The version of the `next` package the app runs (its standalone copy
/// first).
pub fn next_version(app_dir: &Path) -> Option<String> {
    #[derive(Deserialize)]
    struct Package {
        version: String,
    }
    [
        ".next/standalone/node_modules/next/package.json",
        "node_modules/next/package.json",
    ]
    .iter()
    .find_map(|rel| {
        let file = crate::config::open_regular(&app_dir.join(rel)).ok()?;
        let reader = std::io::Read::take(file, crate::config::MAX_FILE_BYTES);
        serde_json::from_reader::<_, Package>(reader).ok()
    })
    .map(|p| p.version)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(path: &str, tags: &[&str]) -> Shown {
        Shown {
            path: path.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn next_16_and_later_are_supported() {
        assert!(supported("16.4.6"));
        assert!(supported("17.0.0-canary.1"));
        assert!(!supported("15.5.4"));
        assert!(!supported("?"));
    }

    #[test]
    fn urls_are_found_by_tag_and_path_and_forgotten_oldest_first() {
        let mut urls = Urls::default();
        urls.record("h /latest", shown("/rv", &["_N_T_/rv", "_N_T_/layout"]), 2);
        urls.record("h /rv", shown("/rv", &["_N_T_/rv"]), 2);
        let mut found = urls.showing_tags(["_N_T_/rv"].into_iter());
        found.sort();
        assert_eq!(found, ["h /latest", "h /rv"]);
        let mut found = urls.showing_path("/rv");
        found.sort();
        assert_eq!(found, ["h /latest", "h /rv"]);
        // Recorded again with other tags: the old ones no longer find it.
        urls.record("h /rv", shown("/rv", &["posts"]), 2);
        assert_eq!(urls.showing_tags(["_N_T_/rv"].into_iter()), ["h /latest"]);
        // A third URL over a bound of two: the oldest goes, with its index.
        urls.record("h /x", shown("/x", &["x"]), 2);
        assert!(urls.showing_tags(["_N_T_/layout"].into_iter()).is_empty());
        assert_eq!(urls.shown.len(), 2);
        assert!(
            !urls
                .by_path
                .get("/rv")
                .is_some_and(|s| s.contains("h /latest"))
        );
    }
}
