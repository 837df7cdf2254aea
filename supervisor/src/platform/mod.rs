//! The one owner of the platform's state: the running apps, their
//! versions and which one is active.
//!
//! Commands come in from signals (SIGHUP: reload) and from the control
//! socket (deploy, rollback, restart, reload, status, versions, purge) on
//! one channel, and are applied here, one at a time, without waiting on
//! anything slow: installs, builds, worker starts, health checks and drains
//! run as effects (their own futures) that report back with an [`Effect`].
//! So a deploy's build never holds up a SIGTERM, a status call, or another
//! app's deploy. What requests see is published to the [`PlatformService`]
//! (routes swapped whole), and what must survive a restart is written to
//! [`state`] before it is acted on.
//!
//! A **version** is one upload of an app's source (or the configured
//! `source` itself), in its own directory; a **generation** is one set of
//! workers running one version. A deploy, rollback or restart starts a new
//! generation, which takes traffic only once all its workers are ready
//! (and pass `deploy.health_path`); the old one then drains.

pub mod state;

mod deploy;
pub mod leftovers;
mod ops;
mod reload;

pub use ops::{busy_message, workers_of};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::apps::{AppSettings, Gate, RunningApp};
use crate::cache::store::Selector;
use crate::config::ConfigError;
use crate::config::platform::{AppEntry, DEFAULT_PLATFORM_WORKERS, PlatformConfig};
use crate::listener::Shutdown;
use crate::metrics::Metrics;
use crate::progress::Reporter;
use crate::run::RunError;
use crate::serve::PlatformService;
use bext_proto::control::v1 as pb;

pub use state::{SOURCE_VERSION, State, VersionState};

/// Commands the control socket may queue before it waits.
pub const COMMAND_QUEUE: usize = 64;

/// A request to the platform.
#[derive(Debug)]
pub enum Command {
    /// Re-read the platform file.
    Reload {
        reply: Option<oneshot::Sender<Result<String, String>>>,
    },
    /// Make the uploaded archive a new version of `app`, and switch to it.
    Deploy {
        app: String,
        upload: Upload,
        reporter: Reporter,
    },
    /// Switch back to a retained version (`None`: the previous one).
    Rollback {
        app: String,
        to: Option<String>,
        reporter: Reporter,
    },
    /// New workers for the active version.
    Restart { app: String, reporter: Reporter },
    Status {
        apps: Vec<String>,
        reply: oneshot::Sender<Result<Vec<pb::AppStatus>, CommandError>>,
    },
    Versions {
        app: String,
        reply: oneshot::Sender<Result<Vec<pb::Version>, CommandError>>,
    },
    Purge {
        app: String,
        selectors: Vec<Selector>,
        soft: bool,
        reply: oneshot::Sender<Result<u64, CommandError>>,
    },
}

/// An uploaded archive waiting to become a version.
#[derive(Debug)]
pub struct Upload {
    /// Removed when dropped.
    pub file: tempfile::TempPath,
    /// sha256, hex.
    pub digest: String,
    pub bytes: u64,
}

/// Why a command was refused.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Failed(String),
}

/// What an effect reports back when it is over.
enum Effect {
    /// An app's first start (at launch, or added by a reload).
    Started {
        name: String,
        result: Result<RunningApp, RunError>,
    },
    /// A reload's new apps and replacements have started (or failed to).
    Reloaded {
        config: Box<PlatformConfig>,
        started: BTreeMap<String, Result<RunningApp, RunError>>,
        replies: Vec<oneshot::Sender<Result<String, String>>>,
    },
    /// A deploy, rollback or restart has its new generation ready (or not).
    Replaced {
        name: String,
        op: ops::Op,
        version: String,
        reporter: Reporter,
        result: Result<RunningApp, String>,
    },
    /// The tail of an operation (drain, post_deploy, prune) is over.
    Finished {
        name: String,
        /// The version of the generation that drained.
        drained: Option<String>,
    },
}

/// The platform's state and its owner loop.
pub struct Platform {
    config: PlatformConfig,
    config_path: PathBuf,
    /// `bext serve --listen`: it stands for `platform.listen` on reload too.
    listen_override: Option<std::net::SocketAddr>,
    apps: BTreeMap<String, RunningApp>,
    state: State,
    service: Arc<PlatformService>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    /// Apps with an operation under way, and what it is.
    busy: BTreeMap<String, &'static str>,
    /// Versions whose generation still drains after a switch, per app
    /// (never pruned meanwhile).
    draining: BTreeMap<String, Vec<String>>,
    /// Apps whose new settings a reload skipped (an operation was under
    /// way): applied when it is over.
    stale: std::collections::BTreeSet<String>,
    /// The old generations' drains, `post_deploy` and pruning: waited for
    /// at shutdown.
    tails: tokio_util::task::TaskTracker,
    /// Why configured apps are not running.
    not_running: BTreeMap<String, String>,
    effects: FuturesUnordered<BoxFuture<'static, Effect>>,
    /// A reload is starting apps; more reload requests wait for it.
    reloading: bool,
    reload_due: bool,
    reload_waiting: Vec<oneshot::Sender<Result<String, String>>>,
    /// READY=1 was sent (once every first start was over).
    announced: bool,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("apps", &self.apps.keys().collect::<Vec<_>>())
            .field("busy", &self.busy)
            .finish_non_exhaustive()
    }
}

/// SIGHUP, SIGTERM and SIGINT.
#[derive(Debug)]
pub struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

impl Platform {
    pub fn new(
        config: PlatformConfig,
        config_path: PathBuf,
        listen_override: Option<std::net::SocketAddr>,
        state: State,
        service: Arc<PlatformService>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Self {
        Platform {
            config,
            config_path,
            listen_override,
            apps: BTreeMap::new(),
            state,
            service,
            metrics,
            shutdown,
            busy: BTreeMap::new(),
            draining: BTreeMap::new(),
            stale: std::collections::BTreeSet::new(),
            tails: tokio_util::task::TaskTracker::new(),
            not_running: BTreeMap::new(),
            effects: FuturesUnordered::new(),
            reloading: false,
            reload_due: false,
            reload_waiting: Vec::new(),
            announced: false,
        }
    }

    /// Starts every app, then applies commands and effects until a
    /// SIGTERM/SIGINT or the listener stops; then drains and stops the apps.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut signals: Signals,
        serving: impl Future<Output = bool>,
    ) {
        self.publish();
        self.first_starts();
        let mut serving = std::pin::pin!(serving);
        let mut listener_stopped = false;
        loop {
            tokio::select! {
                Some(effect) = self.effects.next(), if !self.effects.is_empty() => {
                    self.apply(effect);
                }
                Some(command) = commands.recv() => self.command(command),
                _ = signals.hup.recv() => self.reload(None),
                _ = signals.term.recv() => { info!("SIGTERM: shutting down gracefully (send it again to stop at once)"); break; }
                _ = signals.int.recv() => { info!("SIGINT: shutting down gracefully (send it again to stop at once)"); break; }
                _ = &mut serving => { warn!("the listener stopped"); listener_stopped = true; break; }
            }
        }
        crate::notify::stopping();
        // Starts, builds and deploys still under way are abandoned (their
        // builds and hooks are killed with their process groups; a deploy's
        // version is found `building` at the next start and marked failed).
        drop(std::mem::take(&mut self.effects));
        drop(commands);
        self.shutdown.graceful.cancel();
        let immediate = self.shutdown.immediate.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = signals.term.recv() => {}
                _ = signals.int.recv() => {}
            }
            warn!("second signal: stopping at once");
            immediate.cancel();
        });
        if !listener_stopped {
            serving.await;
        }
        let kill = tokio_util::sync::CancellationToken::new();
        let stops = std::mem::take(&mut self.apps).into_values().map(|app| {
            let kill = kill.clone();
            async move { app.stop(Duration::ZERO, &kill).await }
        });
        // Generations still draining stop too (their drain is cut short).
        self.tails.close();
        futures_util::future::join(futures_util::future::join_all(stops), self.tails.wait()).await;
    }

    /// Routes what runs now.
    fn publish(&self) {
        self.service
            .publish(&self.apps, &self.config, &self.not_running);
    }

    fn spawn_effect(&mut self, effect: impl Future<Output = Effect> + Send + 'static) {
        self.effects.push(Box::pin(effect));
    }

    /// Every configured app, each as its own effect: each is routed as
    /// soon as it has started (a slow build holds up only its own app).
    fn first_starts(&mut self) {
        let (first, broken) = settings_for(&self.config, &self.state);
        for (name, e) in broken {
            error!(app = %name, "app not started: {e}");
            self.not_running.insert(name, format!("not started: {e}"));
        }
        for (name, settings) in first {
            let (version, _) = self.state.active_dir(&name, &settings.dir);
            if version != SOURCE_VERSION {
                info!(app = %name, %version, dir = %settings.dir.display(), "serving deployed version {version} (it wins over `source` in the platform file)");
            }
            self.busy.insert(name.clone(), "starting");
            self.not_running
                .insert(name.clone(), "starting".to_string());
            let metrics = Arc::clone(&self.metrics);
            self.spawn_effect(async move {
                let result = RunningApp::start(settings, metrics, Gate::AnyReady).await;
                Effect::Started { name, result }
            });
        }
        if self.effects.is_empty() {
            info!(apps = 0, of = self.config.apps.len(), "apps started");
            self.announce_ready();
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Reload { reply } => self.reload(reply),
            Command::Deploy {
                app,
                upload,
                reporter,
            } => self.deploy(app, upload, reporter),
            Command::Rollback { app, to, reporter } => self.rollback(app, to, &reporter),
            Command::Restart { app, reporter } => self.restart(app, &reporter),
            Command::Status { apps, reply } => {
                let _ = reply.send(self.status(&apps));
            }
            Command::Versions { app, reply } => {
                let _ = reply.send(self.versions(&app));
            }
            Command::Purge {
                app,
                selectors,
                soft,
                reply,
            } => self.purge(&app, selectors, soft, reply),
        }
    }

    fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::Started { name, result } => {
                self.busy.remove(&name);
                match result {
                    Ok(mut app) => {
                        app.version = self.active_version(&name);
                        app.set_older_statics(self.older_statics(&name));
                        self.not_running.remove(&name);
                        if self.configured(&name).is_some() {
                            self.apps.insert(name.clone(), app);
                            self.publish();
                            // Routed first: the hook may call the app itself.
                            if let Some(app) = self.apps.get(&name) {
                                app.post_deploy();
                            }
                        } else {
                            self.retire(app, Duration::ZERO);
                        }
                    }
                    Err(e) => {
                        error!(app = %name, "app not started: {e}");
                        self.not_running
                            .insert(name.clone(), format!("failed to start: {e}"));
                        self.publish();
                    }
                }
                if !self.busy.values().any(|op| *op == "starting") && !self.reloading {
                    info!(
                        apps = self.apps.len(),
                        of = self.config.apps.len(),
                        "apps started"
                    );
                    self.announce_ready();
                    if std::mem::take(&mut self.reload_due) {
                        self.reload(None);
                    }
                }
            }
            Effect::Reloaded {
                config,
                started,
                replies,
            } => self.reloaded(*config, started, replies),
            Effect::Replaced {
                name,
                op,
                version,
                reporter,
                result,
            } => self.replaced(name, op, version, reporter, result),
            Effect::Finished { name, drained } => {
                if let (Some(version), Some(list)) = (drained, self.draining.get_mut(&name)) {
                    if let Some(i) = list.iter().position(|v| *v == version) {
                        list.remove(i);
                    }
                    if list.is_empty() {
                        self.draining.remove(&name);
                    }
                }
                self.announce();
            }
        }
    }

    /// One line for `systemctl status`.
    fn summary(&self) -> String {
        let running = self.apps.len();
        let of = self.config.apps.len();
        let busy = self.busy.len();
        if busy > 0 {
            format!("{running} of {of} apps running; {busy} starting or deploying")
        } else {
            format!("{running} of {of} apps running")
        }
    }

    /// READY=1, the first time every first start is over.
    fn announce_ready(&mut self) {
        if !self.announced {
            self.announced = true;
            crate::notify::ready(&self.summary());
        }
    }

    /// READY=1 after a reload, or a new STATUS= line.
    pub(super) fn announce(&self) {
        if !self.announced {
            return;
        }
        if self.reloading {
            crate::notify::status(&self.summary());
        } else {
            crate::notify::ready(&self.summary());
        }
    }

    /// The id of the version `name` serves (`source` if none deployed).
    fn active_version(&self, name: &str) -> String {
        self.state
            .app(name)
            .and_then(|a| a.active.clone())
            .unwrap_or_else(|| SOURCE_VERSION.to_string())
    }

    fn configured(&self, name: &str) -> Option<&AppEntry> {
        self.config.apps.iter().find(|a| a.name == name)
    }

    /// Drains and stops `app` (already unrouted) in the background.
    fn retire(&self, app: RunningApp, grace: Duration) {
        let kill = self.shutdown.immediate.clone();
        // Tracked: a shutdown waits for the drain as for its own apps'.
        self.tails
            .spawn(async move { app.stop(grace, &kill).await });
    }

    fn shutdown_grace(&self) -> Duration {
        self.config
            .shutdown_grace
            .unwrap_or(crate::config::DEFAULT_SHUTDOWN_GRACE)
    }

    /// Writes the state file; a failure is logged (what runs is right; a
    /// restart would come back on the last state written).
    fn save_state(&mut self) -> Result<(), String> {
        self.state.save().map_err(|e| {
            error!("{e}");
            e.to_string()
        })
    }
}

/// The apps of a platform file as settings, each on its active version;
/// and the apps whose own `bext.config.toml` does not load (a tenant's
/// mistake is that app's failure, never the platform's).
fn settings_for(
    config: &PlatformConfig,
    state: &State,
) -> (BTreeMap<String, AppSettings>, BTreeMap<String, ConfigError>) {
    let mut all = BTreeMap::new();
    let mut failed = BTreeMap::new();
    for entry in &config.apps {
        let (_, dir) = state.active_dir(&entry.name, &entry.source);
        match app_settings(config, entry, dir) {
            Ok(settings) => {
                all.insert(entry.name.clone(), settings);
            }
            Err(e) => {
                failed.insert(entry.name.clone(), e);
            }
        }
    }
    (all, failed)
}

/// One app's settings, running from `dir` (its source, or a version).
fn app_settings(
    config: &PlatformConfig,
    entry: &AppEntry,
    dir: PathBuf,
) -> Result<AppSettings, ConfigError> {
    let (mut app_config, capped) = entry.merged_config_in(&dir)?;
    for note in capped {
        warn!(app = %entry.name, "{note}");
    }
    app_config.server.listen = config.listen;
    // Edge mode is the platform's: every app shares Redis under its own
    // name (a tenant's file may not set it).
    app_config.redis.clone_from(&config.redis);
    if let Some(grace) = config.shutdown_grace {
        app_config.server.shutdown_grace = grace;
    }
    Ok(AppSettings {
        name: Some(entry.name.clone()),
        dir,
        config: app_config,
        default_workers: std::num::NonZeroU32::new(DEFAULT_PLATFORM_WORKERS).expect("non-zero"),
        force_build: false,
        build_timeout: entry.deploy.build_timeout,
        hooks: Some(entry.hooks.clone()),
        rate_limit: entry.rate_limit_rpm,
        ipv6_prefix: entry.rate_limit_ipv6_prefix,
        trusted_proxies: config.trusted_proxies.clone(),
        admin_networks: config.admin_networks.clone(),
        runtime_base: runtime_base(config),
        user: entry.user.clone(),
        confined: true,
        purge_token_override: None,
        dev: None,
    })
}

/// The directory where sockets go.
pub fn runtime_base(config: &PlatformConfig) -> PathBuf {
    config.data_dir.join("run")
}

/// Loads the state, and removes the files of versions a crash cut off; an
/// active version whose files are gone falls back to the one before it.
pub fn recover(data_dir: &Path) -> Result<State, RunError> {
    let (mut state, interrupted) = State::load(data_dir)?;
    for (app, id) in &interrupted {
        warn!(%app, version = %id, "version {id} was being deployed when bext stopped; marked failed");
        let _ = deploy::remove_tree(&state.version_dir(app, id));
    }
    let names: Vec<String> = state.apps.keys().cloned().collect();
    let mut changed = !interrupted.is_empty();
    // Files a crash kept from being removed: those of pruned and failed
    // versions, and half-unpacked ones.
    for name in &names {
        let gone: Vec<_> = state
            .app(name)
            .map(|a| {
                a.versions
                    .iter()
                    .filter(|v| matches!(v.state, VersionState::Pruned | VersionState::Failed))
                    .map(|v| state.version_dir(name, &v.id))
                    .filter(|dir| dir.exists())
                    .collect()
            })
            .unwrap_or_default();
        for dir in gone {
            info!(app = %name, dir = %dir.display(), "removing the files of a pruned or failed version");
            if let Err(e) = deploy::remove_tree(&dir) {
                error!(app = %name, dir = %dir.display(), "could not remove a pruned or failed version: {e}");
            }
        }
        let staging = state.app_dir(name).join("staging");
        if let Ok(entries) = std::fs::read_dir(&staging) {
            for entry in entries.flatten() {
                let _ = deploy::remove_tree(&entry.path());
            }
        }
    }
    for name in names {
        let Some(active) = state.app(&name).and_then(|a| a.active.clone()) else {
            continue;
        };
        if !state.version_dir(&name, &active).is_dir() {
            error!(app = %name, version = %active, "the active version's files are gone; falling back to the one before it");
            let app = state.app_mut(&name);
            let previous = app.previous();
            app.fail(&active, "its files were gone at start".to_string());
            app.active = None;
            if let Some(previous) = previous {
                app.activate(&previous);
            }
            changed = true;
        }
    }
    if changed {
        state.save()?;
    }
    Ok(state)
}
