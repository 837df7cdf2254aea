//! `bext dev`: the single-app server while the app is being written.
//!
//! The app runs as under `bext run`, with three differences: its worker
//! runs the development server (`next dev`, a `dev` script or task) or,
//! for an app without one, its start command restarted by bext whenever a
//! file changes ([`Watch`]); a crash waits for the next change instead of
//! restarting in a loop, and requests are told why (`crate::pool`); and
//! the cache is in preview (`crate::cache::preview`) unless `--cache`.
//! `bext.config.toml` is read again when saved: a mistake is logged with
//! its place and the running config kept.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::apps::{AppSettings, DevMode, Gate, RunningApp};
use crate::body::Body;
use crate::cli::DevArgs;
use crate::config::{CONFIG_FILE_NAME, Config, ConfigError};
use crate::listener::{Handler, Peer, Shutdown};
use crate::metrics::Metrics;
use crate::run::{RunError, load_config, watch_signals};
use crate::server::AppService;
use crate::shards::Shards;

/// Quiet time after a change before the app restarts: an editor's save,
/// or a `git checkout`, is several writes.
pub const SETTLE: Duration = Duration::from_millis(50);
/// A stream of changes restarts the app at least this often.
const SETTLE_MAX: Duration = Duration::from_millis(300);
/// Longest wait for requests and streams when the app is stopped.
const DEV_GRACE: Duration = Duration::from_secs(1);

/// Directories never watched: dependencies, version control, and the
/// build output of the frameworks bext knows.
const IGNORED_DIRS: &[&str] = &[
    "node_modules",
    ".git",
    ".hg",
    ".svn",
    ".next",
    ".turbo",
    ".nuxt",
    ".svelte-kit",
    ".vercel",
    ".cache",
];

pub async fn dev(args: DevArgs, shards: Shards) -> Result<(), RunError> {
    let config = load(&args)?;
    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: config.server.listen,
            source,
        })?;
    let grace = config.server.shutdown_grace;
    let limits = config.server.limits;
    let live_reload = LiveReload::default();
    let settings = AppSettings::single_app(
        args.dir.clone(),
        config,
        NonZeroU32::MIN,
        Some(DevMode {
            cache: args.cache,
            reload: live_reload.clone(),
        }),
    );
    let metrics = Arc::new(Metrics::new());
    let shutdown = Shutdown::default();
    tokio::spawn(watch_signals(shutdown.clone()));
    let mut app = tokio::select! {
        app = RunningApp::start(settings, Arc::clone(&metrics), Gate::AnyReady) => app?,
        _ = shutdown.graceful.cancelled() => return Ok(()),
    };
    let addr = listener.local_addr().map_err(|source| RunError::Listen {
        addr: app.settings.config.server.listen,
        source,
    })?;
    let cache = if args.cache { "on" } else { "preview" };
    info!(app = %app.name, %addr, cache, "listening on http://{addr} (bext dev)");
    crate::notify::ready(&format!("developing {} on {addr}", app.name));

    let live = Arc::new(Live(ArcSwap::new(app.service())));
    let changes = Arc::new(Changes::default());
    let root = app
        .settings
        .dir
        .canonicalize()
        .unwrap_or_else(|_| app.settings.dir.clone());
    let config_file = config_path(&args);
    let watch = Watch::start(&root, &config_file, Arc::clone(&changes))
        .map(Arc::new)
        .inspect_err(|e| warn!("files are not watched (start bext dev again after a change): {e}"))
        .ok();
    if watch.is_some() {
        let does = if app.watches_itself() {
            "the app's own command restarts on changes; bext starts it again after a crash"
        } else if !app.has_workers() {
            "a change reloads the open pages"
        } else {
            "a change restarts the app"
        };
        info!(dir = %root.display(), "watching the app's files: {does}");
    }

    let serving = crate::listener::serve(
        listener,
        Arc::clone(&live),
        limits,
        &shutdown,
        grace,
        &shards,
        None,
    );
    let reacting = async {
        loop {
            tokio::select! {
                change = changes.next() => {
                    if let Some(path) = change.source {
                        app.forget_statics();
                        if app.watches_itself() {
                            // Its own watcher restarts it, unless it died.
                            if app.is_down() {
                                info!("changed: {}", shown(&root, &path));
                                app.recycle_workers();
                            }
                        } else {
                            info!("changed: {}", shown(&root, &path));
                            if !app.recycle_workers() {
                                // A static site: its open pages reload.
                                live_reload.changed();
                            }
                        }
                    }
                    if change.config {
                        reload(&args, &mut app, &live, &metrics, &shutdown).await;
                    }
                    if let (Some(watch), Some(dirs)) = (&watch, change.new_dirs) {
                        // Walking a tree is blocking work.
                        let watch = Arc::clone(watch);
                        tokio::task::spawn_blocking(move || watch.add(dirs));
                    }
                }
                _ = shutdown.graceful.cancelled() => break,
            }
        }
    };
    let (served, ()) = tokio::join!(serving, reacting);
    drop(watch);
    app.stop(grace, &shutdown.immediate).await;
    served.map_err(|source| RunError::Listen { addr, source })?;
    info!("bye");
    Ok(())
}

/// The config `bext dev` runs with: the file's, with `--listen`; plain
/// HTTP, and no Redis (a developer's cache is their own).
fn load(args: &DevArgs) -> Result<Config, ConfigError> {
    let mut config = load_config(&args.dir, args.config.as_deref())?;
    if config.server.tls.take().is_some() {
        info!("[server.tls] is for bext run: bext dev serves plain HTTP");
        if config.server.listen.port() == 443 {
            config
                .server
                .listen
                .set_port(crate::config::default_listen().port());
        }
    }
    match args.listen {
        Some(listen) => config.server.listen = listen,
        // What bext dev shows (the app's errors, its development server)
        // is for this machine, unless asked otherwise.
        None if config.server.listen.ip().is_unspecified() => {
            config
                .server
                .listen
                .set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        None => {}
    }
    // A developer's Ctrl-C, or a restart for a saved config, does not wait
    // for open streams (an HMR socket) for long.
    config.server.shutdown_grace = config.server.shutdown_grace.min(DEV_GRACE);
    config.redis = None;
    Ok(config)
}

fn config_path(args: &DevArgs) -> PathBuf {
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| args.dir.join(CONFIG_FILE_NAME));
    std::path::absolute(&path).unwrap_or(path)
}

/// Applies a saved config: in place when it can be, with a new app (its
/// workers) when `[runtime]` or `[isolate]` changed; a mistake is logged
/// and changes nothing.
async fn reload(
    args: &DevArgs,
    app: &mut RunningApp,
    live: &Live,
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
) {
    let config = match load(args) {
        Ok(config) => config,
        Err(e) => {
            error!("{e}\n  the running config is kept");
            return;
        }
    };
    if config.source.is_none() {
        info!(
            "{} is gone: the defaults apply",
            config_path(args).display()
        );
    }
    let running = &app.settings.config.server;
    if config.server.listen != running.listen
        || config.server.limits != running.limits
        || config.server.shutdown_grace != running.shutdown_grace
    {
        warn!(
            "[server] listen, limits and shutdown_grace_ms take effect when bext dev starts again"
        );
    }
    let settings = app.settings.clone().with_config(config);
    if settings == app.settings {
        info!("{} saved: nothing changed", config_path(args).display());
        return;
    }
    if !app.settings.needs_restart(&settings) {
        app.apply(settings);
        live.0.store(app.service());
        info!("{} applied", config_path(args).display());
        return;
    }
    info!(
        "{} changed how the app runs: starting it again",
        config_path(args).display()
    );
    let started = tokio::select! {
        started = RunningApp::start(settings, Arc::clone(metrics), Gate::AnyReady) => started,
        _ = shutdown.graceful.cancelled() => return,
    };
    match started {
        Ok(new) => {
            let old = std::mem::replace(app, new);
            live.0.store(app.service());
            let grace = old.settings.config.server.shutdown_grace;
            old.stop(grace, &shutdown.immediate).await;
        }
        Err(e) => error!("{e}\n  the running app is kept"),
    }
}

/// `path` as the developer knows it: relative to the app.
fn shown(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The app's request path, replaced when the config is saved.
#[derive(Debug)]
struct Live(ArcSwap<AppService>);

impl Handler for Live {
    fn handle(
        self: Arc<Self>,
        req: http::Request<Body>,
        peer: Peer,
    ) -> impl Future<Output = http::Response<Body>> + Send + 'static {
        self.0.load_full().handle(req, peer)
    }

    fn answer_plain(
        self: &Arc<Self>,
        req: http::Request<()>,
        peer: &Peer,
        head: &mut Vec<u8>,
    ) -> crate::listener::Plain<impl Future<Output = http::Response<Body>> + Send + 'static + use<>>
    {
        self.0.load_full().answer_plain(req, peer, head)
    }
}

/// What changed since it was last looked at, collected from the watcher's
/// thread.
#[derive(Debug, Default)]
struct Changes {
    config: AtomicBool,
    /// The last source file changed.
    source: Mutex<Option<PathBuf>>,
    /// Directories made since, to watch too.
    new_dirs: Mutex<Vec<PathBuf>>,
    seen: Notify,
}

#[derive(Debug, Default)]
struct Change {
    config: bool,
    source: Option<PathBuf>,
    new_dirs: Option<Vec<PathBuf>>,
}

impl Changes {
    /// The next burst of changes, once quiet for [`SETTLE`].
    async fn next(&self) -> Change {
        loop {
            self.seen.notified().await;
            let until = tokio::time::Instant::now() + SETTLE_MAX;
            loop {
                let quiet = until.min(tokio::time::Instant::now() + SETTLE);
                if tokio::time::timeout_at(quiet, self.seen.notified())
                    .await
                    .is_err()
                    || tokio::time::Instant::now() >= until
                {
                    break;
                }
            }
            let new_dirs = std::mem::take(&mut *lock(&self.new_dirs));
            let change = Change {
                config: self.config.swap(false, Ordering::AcqRel),
                source: lock(&self.source).take(),
                new_dirs: (!new_dirs.is_empty()).then_some(new_dirs),
            };
            if change.config || change.source.is_some() || change.new_dirs.is_some() {
                return change;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The file watcher: every directory of the app that is not ignored
/// ([`IGNORED_DIRS`], the app's `.gitignore`), one inotify watch each
/// (not `node_modules`' thousands), and the config file's directory.
struct Watch {
    watcher: Mutex<notify::RecommendedWatcher>,
    filter: Arc<Filter>,
}

impl Watch {
    fn start(root: &Path, config_file: &Path, changes: Arc<Changes>) -> notify::Result<Self> {
        use notify::Watcher as _;
        let config_file = config_file
            .parent()
            .and_then(|dir| dir.canonicalize().ok())
            .zip(config_file.file_name())
            .map(|(dir, name)| dir.join(name))
            .unwrap_or_else(|| config_file.to_path_buf());
        let filter = Arc::new(Filter::new(root));
        let seen = Arc::clone(&filter);
        let config = config_file.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                if event.kind.is_access() {
                    return;
                }
                let mut any = false;
                for path in &event.paths {
                    if *path == config {
                        changes.config.store(true, Ordering::Release);
                        any = true;
                    } else if seen.relevant(path) {
                        if event.kind.is_create() && path.is_dir() {
                            lock(&changes.new_dirs).push(path.clone());
                        }
                        *lock(&changes.source) = Some(path.clone());
                        any = true;
                    }
                }
                if any {
                    changes.seen.notify_one();
                }
            })?;
        if let Some(dir) = config_file.parent()
            && let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive)
        {
            warn!(dir = %dir.display(), "the config file is not watched: {e}");
        }
        let watch = Watch {
            watcher: Mutex::new(watcher),
            filter,
        };
        watch.add(vec![root.to_path_buf()]);
        Ok(watch)
    }

    /// Watches `dirs` and what is under them (but what is ignored).
    fn add(&self, dirs: Vec<PathBuf>) {
        use notify::Watcher as _;
        let mut watcher = lock(&self.watcher);
        for dir in dirs {
            let filter = Arc::clone(&self.filter);
            // The filter decides alone, as for events.
            let walk = ignore::WalkBuilder::new(&dir)
                .standard_filters(false)
                .filter_entry(move |entry| {
                    entry.file_type().is_some_and(|t| t.is_dir()) && filter.relevant(entry.path())
                })
                .build();
            for entry in walk.flatten() {
                if let Err(e) = watcher.watch(entry.path(), notify::RecursiveMode::NonRecursive) {
                    warn!(dir = %entry.path().display(), "not watched: {e}");
                }
            }
        }
    }
}

/// Which paths are the app's sources: not in [`IGNORED_DIRS`], not listed
/// in the app's `.gitignore` (but `.env` files, which it usually lists,
/// are), not editors' scratch files nor what an app writes while it runs
/// (logs, SQLite databases).
struct Filter {
    root: PathBuf,
    gitignore: ignore::gitignore::Gitignore,
}

impl Filter {
    fn new(root: &Path) -> Self {
        let (gitignore, error) = ignore::gitignore::Gitignore::new(root.join(".gitignore"));
        if let Some(e) = error.filter(|_| root.join(".gitignore").exists()) {
            warn!("{}/.gitignore: {e}", root.display());
        }
        Filter {
            root: root.to_path_buf(),
            gitignore,
        }
    }

    fn relevant(&self, path: &Path) -> bool {
        let Ok(inside) = path.strip_prefix(&self.root) else {
            return false;
        };
        let ignored_dir = inside.components().any(|c| {
            c.as_os_str()
                .to_str()
                .is_some_and(|name| IGNORED_DIRS.contains(&name))
        });
        if ignored_dir {
            return false;
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(".env") {
            return true;
        }
        // As a directory or a file: a deleted path is neither any more.
        let ignored = |is_dir| {
            self.gitignore
                .matched_path_or_any_parents(path, is_dir)
                .is_ignore()
        };
        if path != self.root && (ignored(true) || ignored(false)) {
            return false;
        }
        // Editors' swap, backup, lock and temporary files.
        let scratch = name.ends_with('~')
            || name.ends_with(".swp")
            || name.ends_with(".swx")
            || name.ends_with(".tmp")
            || name.starts_with(".#")
            || name.starts_with('#') && name.ends_with('#')
            || name.ends_with("___jb_tmp___")
            || name.ends_with("___jb_old___")
            || name == "4913";
        // What the app itself writes as it runs.
        let output = name.ends_with(".log")
            || name.ends_with(".db")
            || name.ends_with(".db-journal")
            || name.contains(".sqlite");
        !scratch && !output
    }
}

/// Live reload for static sites: HTML pages get a script that listens on
/// [`LiveReload::PATH`] (server-sent events) and reloads the page when a
/// file of the site changes.
#[derive(Debug, Clone, Default)]
pub struct LiveReload(Arc<tokio::sync::watch::Sender<u64>>);

impl PartialEq for LiveReload {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for LiveReload {}

/// The script, put before `</body>`.
const RELOAD_SCRIPT: &str = "<script>/* bext dev: live reload */new EventSource('/__bext/dev/reload').onmessage=function(){location.reload()};</script>";

/// Pages larger than this (by their `Content-Length`) are served without
/// the script.
const MAX_INJECTED_PAGE: usize = 8 << 20;

impl LiveReload {
    pub const PATH: &'static str = "/__bext/dev/reload";

    /// A file changed: every open page reloads.
    pub fn changed(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The event stream an open page listens to.
    pub fn events(&self) -> http::Response<Body> {
        use futures_util::StreamExt;
        let changes = self.0.subscribe();
        let opened = futures_util::stream::once(async {
            Ok::<_, crate::body::BoxError>(http_body::Frame::data(bytes::Bytes::from_static(
                b": bext dev\n\n",
            )))
        });
        let reloads = futures_util::stream::unfold(changes, |mut changes| async move {
            changes.changed().await.ok()?;
            Some((
                Ok(http_body::Frame::data(bytes::Bytes::from_static(
                    b"data: reload\n\n",
                ))),
                changes,
            ))
        });
        let mut response = http::Response::new(crate::body::boxed(
            http_body_util::StreamBody::new(opened.chain(reloads)),
        ));
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
        response
    }

    /// `response` (a static file), with the script if it is an HTML page.
    pub async fn inject(&self, response: http::Response<Body>) -> http::Response<Body> {
        use http_body_util::BodyExt;
        let html = response.status() == http::StatusCode::OK
            || response.status() == http::StatusCode::NOT_FOUND;
        let small = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .is_some_and(|n| n <= MAX_INJECTED_PAGE);
        let html = html
            && small
            && !response
                .headers()
                .contains_key(http::header::CONTENT_ENCODING)
            && response
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/html"));
        if !html {
            return response;
        }
        let (mut parts, body) = response.into_parts();
        let Ok(collected) = body.collect().await else {
            parts.status = http::StatusCode::INTERNAL_SERVER_ERROR;
            parts.headers.remove(http::header::CONTENT_LENGTH);
            return http::Response::from_parts(
                parts,
                crate::body::full("could not read the page\n"),
            );
        };
        let page = collected.to_bytes();
        let at = find_body_end(&page).unwrap_or(page.len());
        let mut with = Vec::with_capacity(page.len() + RELOAD_SCRIPT.len());
        with.extend_from_slice(&page[..at]);
        with.extend_from_slice(RELOAD_SCRIPT.as_bytes());
        with.extend_from_slice(&page[at..]);
        for name in [
            http::header::CONTENT_LENGTH,
            http::header::ETAG,
            http::header::LAST_MODIFIED,
            http::header::ACCEPT_RANGES,
        ] {
            parts.headers.remove(name);
        }
        parts.headers.insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
        http::Response::from_parts(parts, crate::body::full(with))
    }
}

/// Where the last `</body>` (any case) starts.
fn find_body_end(page: &[u8]) -> Option<usize> {
    const END: &[u8] = b"</body";
    page.windows(END.len())
        .rposition(|w| w.eq_ignore_ascii_case(END))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev_args(dir: &Path, listen: Option<&str>) -> DevArgs {
        DevArgs {
            dir: dir.to_path_buf(),
            config: None,
            listen: listen.map(|l| l.parse().expect("address")),
            cache: false,
        }
    }

    /// What `bext dev` shows is for this machine unless asked otherwise;
    /// a `[server.tls]` file does not make it bind 443 for plain HTTP.
    #[test]
    fn dev_listens_on_localhost_and_over_plain_http() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = load(&dev_args(dir.path(), None)).expect("defaults");
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:3000");
        assert!(config.server.shutdown_grace <= DEV_GRACE);
        let config = load(&dev_args(dir.path(), Some("0.0.0.0:8080"))).expect("defaults");
        assert_eq!(
            config.server.listen.to_string(),
            "0.0.0.0:8080",
            "--listen wins"
        );

        std::fs::write(
            dir.path().join(CONFIG_FILE_NAME),
            "[server.tls]\ndomains = [\"site.test\"]\nissuer = \"internal\"\n",
        )
        .expect("config");
        let config = load(&dev_args(dir.path(), None)).expect("the TLS config");
        assert!(config.server.tls.is_none());
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:3000");
    }

    #[test]
    fn dependencies_build_output_ignored_and_scratch_files_are_not_sources() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical");
        std::fs::write(root.join(".gitignore"), "dist/\n*.log\n").expect("write");
        let filter = Filter::new(&root);
        assert!(filter.relevant(&root.join("server.js")));
        assert!(filter.relevant(&root.join("src/routes/a.ts")));
        assert!(!filter.relevant(&root.join("node_modules/express/index.js")));
        assert!(!filter.relevant(&root.join(".next/server/app.js")));
        assert!(!filter.relevant(&root.join(".git/index")));
        assert!(!filter.relevant(&root.join("dist/index.js")));
        assert!(!filter.relevant(&root.join("debug.log")));
        assert!(!filter.relevant(&root.join(".server.js.swp")));
        assert!(!filter.relevant(&root.join("server.js~")));
        assert!(!filter.relevant(Path::new("/elsewhere/server.js")));
        assert!(!filter.relevant(&root.join("data/app.sqlite3")));
        assert!(
            filter.relevant(&root.join(".env.local")),
            "gitignored but read by the app"
        );
        assert!(
            !filter.relevant(&root.join("dist")),
            "a deleted ignored directory"
        );
    }
}
