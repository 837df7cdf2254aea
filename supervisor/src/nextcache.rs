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
//!   - `set {n, tag}`: Next wrote a new entry, whose page's implicit tag
//!     (`_N_T_<path>`) this is, on the app's own demand (the Pages Router's
//!     `res.revalidate`);
//!   - `ack {id}`.
//! - bext → worker: `tags {tags, ack}` (apply these to your manifest, then
//!   acknowledge), and `synced` after the state so far.
//!
//! The worker names, in `x-next-cache-tags` on each answer to a request
//! through bext, the tags of the Next entry it showed, with the page's
//! path as Next's implicit tag `_N_T_<path>`; bext keeps them with its copy
//! (in Redis too, in edge mode). A revalidation is applied by every other
//! worker (which acknowledge it) and purges bext's copies by those tags; a
//! new entry for a path purges by `_N_T_<path>`. Messages with effects are
//! numbered per worker, and every response a worker writes after one
//! carries `x-bext-next-sync: PID:N`: the proxy passes it on only once
//! message N has been applied ([`NextLink::settle`]), so the request after
//! a revalidation sees it, whichever worker it lands on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tracing::{debug, info, warn};

use crate::cache::{IsrCache, store::Selector};

/// The socket's name in the app's runtime directory.
pub const SOCKET_NAME: &str = "next-cache.sock";
/// Where the workers find the socket, and the secret they show.
pub const ENV_SOCKET: &str = "BEXT_NEXT_CACHE_SOCKET";
pub const ENV_TOKEN: &str = "BEXT_NEXT_CACHE_TOKEN";
/// Request header: the URL bext caches the answer under (its primary key),
/// by which the worker finds what its answer shows.
pub const PRIMARY_HEADER: &str = "x-bext-primary";
/// Response header: the worker's last message with effects (`PID:N`).
pub const SYNC_HEADER: &str = "x-bext-next-sync";
/// Longest URL sent to the worker (a longer one's copy is not tagged, and
/// stays until it expires).
pub const MAX_PRIMARY: usize = 2048;

/// Longest line a worker may send (a longer one is skipped).
const MAX_LINE: usize = 64 * 1024;
/// Connections at once (an app has at most a few dozen workers).
const MAX_CONNECTIONS: usize = 128;
/// Revalidated tags remembered (for workers that start later).
const MAX_TAGS: usize = 10_000;
/// Tags in one message, and the longest tag: Next's own limits.
const MAX_MESSAGE_TAGS: usize = 128;
const MAX_TAG_LEN: usize = 256;
/// Tags per line of the state sent to a worker that connects.
const SNAPSHOT_CHUNK: usize = 500;
/// Lines waiting to be written to one worker (a worker that reads none
/// misses the rest, and its revalidations time out).
const OUTBOX: usize = 64;
/// Messages with effects waiting to be applied, per worker.
const INBOX: usize = 256;
/// How long a connection may take to say who it is.
const HELLO_WAIT: Duration = Duration::from_secs(5);
/// How long a revalidation waits for the other workers to apply it.
const ACK_WAIT: Duration = Duration::from_secs(1);
/// How long a response waits for its worker's messages to be applied.
pub const SETTLE_WAIT: Duration = Duration::from_secs(1);

/// One app's link with its workers' Next caches.
pub struct NextLink {
    app: String,
    token: String,
    socket: PathBuf,
    /// The app's HTTP cache (replaced when the app's settings are).
    cache: arc_swap::ArcSwapOption<IsrCache>,
    state: Mutex<State>,
    /// Revalidations waiting for workers: (broadcast, connection) → done.
    acks: Mutex<HashMap<(u64, u64), oneshot::Sender<()>>>,
    ids: AtomicU64,
    announced: AtomicBool,
    /// Told when a worker connects.
    joined: tokio::sync::Notify,
    accept: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for NextLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // (Not the secret.)
        f.debug_struct("NextLink")
            .field("app", &self.app)
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct State {
    /// Tag → its manifest entry, as Next keeps it (ms since the epoch).
    tags: HashMap<String, TagTimes>,
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

    fn valid(&self) -> bool {
        [self.stale, self.expired]
            .iter()
            .flatten()
            .all(|t| t.is_finite() && *t >= 0.0)
    }
}

#[derive(Debug)]
struct Peer {
    pid: u32,
    outbox: mpsc::Sender<Arc<str>>,
    /// The last message with effects applied.
    applied: watch::Receiver<u64>,
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
    Set {
        n: u64,
        tag: String,
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
            joined: tokio::sync::Notify::new(),
            accept: Mutex::new(None),
        });
        let weak = Arc::downgrade(&link);
        let accept = tokio::spawn(async move {
            let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // (Out of descriptors: not in a busy loop.)
                        debug!("next cache: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                    debug!("next cache: too many connections");
                    continue;
                };
                let weak = Weak::clone(&weak);
                tokio::spawn(async move {
                    serve(weak, stream).await;
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

    /// Waits (at most [`SETTLE_WAIT`]) until worker `pid`'s messages with
    /// effects up to `n` have been applied. A worker whose first messages
    /// are still on their way (its connection not yet taken) is waited for
    /// too.
    pub async fn settle(&self, pid: u32, n: u64) {
        let settled = async {
            let mut applied = loop {
                let joined = self.joined.notified();
                tokio::pin!(joined);
                joined.as_mut().enable();
                let marks = {
                    let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    state
                        .peers
                        .values()
                        .find(|p| p.pid == pid)
                        .map(|p| p.applied.clone())
                };
                match marks {
                    Some(marks) => break marks,
                    None => joined.await,
                }
            };
            let _ = applied.wait_for(|&done| done >= n).await;
        };
        if tokio::time::timeout(SETTLE_WAIT, settled).await.is_err() {
            warn!(app = %self.app, pid, "next cache: a response waited {SETTLE_WAIT:?} for its worker's revalidation to be applied, and went on");
        }
    }

    fn acknowledged(&self, from: u64, ack: u64) {
        let done = self
            .acks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(ack, from));
        if let Some(done) = done {
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
            Message::Set { n, tag } => {
                let purged = if tag.len() <= MAX_TAG_LEN && tag.starts_with("_N_T_") {
                    self.purge(vec![tag.clone()], false).await
                } else {
                    0
                };
                info!(app = %self.app, tag = %tag, purged, "next cache: the app regenerated a page");
                n
            }
            Message::Hello { .. } | Message::Ack { .. } => 0,
        }
    }

    /// A worker revalidated `tags`: every other worker applies it (and
    /// acknowledges), and bext's copies of what showed them are purged.
    async fn revalidate(&self, from: u64, mut tags: Vec<(String, TagTimes)>, soft: bool) {
        tags.retain(|(tag, times)| tag.len() <= MAX_TAG_LEN && times.valid());
        tags.truncate(MAX_MESSAGE_TAGS);
        if tags.is_empty() {
            return;
        }
        // Fills in flight may carry what is being revalidated: they are
        // stored stale.
        if let Some(cache) = self.cache.load().as_ref() {
            cache.fence();
        }
        let ack = self.ids.fetch_add(1, Ordering::Relaxed);
        let line: Arc<str> = serde_json::json!({ "t": "tags", "tags": tags, "ack": ack })
            .to_string()
            .into();
        let waits = {
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
            let mut waits = Vec::new();
            let mut acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
            for (&peer, p) in &state.peers {
                if peer != from && p.outbox.try_send(Arc::clone(&line)).is_ok() {
                    let (done, wait) = oneshot::channel();
                    acks.insert((ack, peer), done);
                    waits.push(wait);
                }
            }
            waits
        };
        let purged = self
            .purge(tags.iter().map(|(t, _)| t.clone()).collect(), soft)
            .await;
        let workers = waits.len();
        let all = futures_util::future::join_all(waits);
        if tokio::time::timeout(ACK_WAIT, all).await.is_err() {
            warn!(app = %self.app, "next cache: a worker did not apply a revalidation within {ACK_WAIT:?}");
        }
        self.acks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(id, _), _| *id != ack);
        info!(
            app = %self.app,
            tags = %tags.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>().join(","),
            soft,
            purged,
            workers,
            "next cache: the app revalidated"
        );
    }

    /// Purges bext's copies that show one of `tags`.
    async fn purge(&self, tags: Vec<String>, soft: bool) -> u64 {
        let Some(cache) = self.cache.load_full() else {
            return 0;
        };
        let selector = Selector {
            tags,
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

/// One worker's connection, until it closes or the app stops (the tasks
/// hold the link only while they use it).
async fn serve(link: Weak<NextLink>, stream: UnixStream) {
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
    let Some(strong) = link.upgrade() else { return };
    {
        use subtle::ConstantTimeEq;
        if !bool::from(token.as_bytes().ct_eq(strong.token.as_bytes())) {
            warn!(app = %strong.app, "next cache: a connection with a wrong secret was refused");
            return;
        }
    }
    let app = strong.app.clone();
    let id = strong.ids.fetch_add(1, Ordering::Relaxed);
    let (outbox, mut outgoing) = mpsc::channel::<Arc<str>>(OUTBOX);
    let (applied_tx, applied) = watch::channel(0u64);
    {
        let mut state = strong.state.lock().unwrap_or_else(|e| e.into_inner());
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
    strong.joined.notify_waiters();
    if !strong.announced.swap(true, Ordering::Relaxed) {
        info!(app = %app, next = %next, "Next.js uses bext's cache handler: its workers share one Next cache, and its own revalidations purge bext's cache");
    }
    drop(strong);
    debug!(app = %app, pid, worker = %worker, "next cache: worker connected");
    let writer = tokio::spawn(async move {
        while let Some(line) = outgoing.recv().await {
            if write.write_all(line.as_bytes()).await.is_err()
                || write.write_all(b"\n").await.is_err()
            {
                return;
            }
        }
    });
    // Messages with effects are applied in order by one task;
    // acknowledgements are taken by the reader at once (a worker that
    // floods its own queue only delays itself).
    let (inbox, mut work) = mpsc::channel::<Message>(INBOX);
    let applier_link = Weak::clone(&link);
    let applier = tokio::spawn(async move {
        while let Some(message) = work.recv().await {
            let Some(link) = applier_link.upgrade() else {
                return;
            };
            let n = link.apply(id, message).await;
            applied_tx.send_replace(n);
        }
    });
    loop {
        let line = match lines.next().await {
            Some(Ok(line)) => line,
            Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                debug!(app = %app, pid, "next cache: a message over {MAX_LINE} bytes was skipped");
                continue;
            }
            Some(Err(_)) | None => break,
        };
        let Some(link) = link.upgrade() else { break };
        let Ok(message) = serde_json::from_str::<Message>(&line) else {
            debug!(app = %app, pid, "next cache: unreadable message");
            continue;
        };
        match message {
            Message::Ack { id: ack } => link.acknowledged(id, ack),
            Message::Hello { .. } => {}
            other => {
                drop(link);
                if inbox.send(other).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(inbox);
    let _ = applier.await;
    writer.abort();
    if let Some(link) = link.upgrade() {
        link.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .peers
            .remove(&id);
        link.acks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(_, peer), _| *peer != id);
    }
    debug!(app = %app, pid, "next cache: worker gone");
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

/// The tag bext gives an answer from Next's cache that names none (Next
/// answered it from another request's lookup): the implicit tag of its
/// path, as Next writes it (`_N_T_` and the path, percent-encoded, without
/// a trailing slash).
pub fn fallback_tag(path: &str) -> Option<http::HeaderValue> {
    let path = match path.trim_end_matches('/') {
        "" => "/",
        trimmed => trimmed,
    };
    let tag = format!("_N_T_{path}");
    (tag.len() <= MAX_TAG_LEN)
        .then(|| http::HeaderValue::from_str(&tag).ok())
        .flatten()
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
        let file = crate::config::open_regular_nofollow(&app_dir.join(rel)).ok()?;
        let reader = std::io::Read::take(file, crate::config::MAX_FILE_BYTES);
        serde_json::from_reader::<_, Package>(reader).ok()
    })
    .map(|p| p.version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fallback_tag_is_the_path_as_next_tags_it() {
        assert_eq!(fallback_tag("/rv/").expect("tag"), "_N_T_/rv");
        assert_eq!(fallback_tag("/").expect("tag"), "_N_T_/");
        assert_eq!(
            fallback_tag("/blog/%E6%97%A5").expect("tag"),
            "_N_T_/blog/%E6%97%A5"
        );
        assert!(fallback_tag(&"/x".repeat(200)).is_none());
    }

    #[test]
    fn next_16_and_later_are_supported() {
        assert!(supported("16.4.6"));
        assert!(supported("17.0.0-canary.1"));
        assert!(!supported("15.5.4"));
        assert!(!supported("?"));
    }
}
