//! One app, running: everything `bext run` starts for its directory, and
//! what `bext serve` starts for each `[apps.NAME]`: detection, the
//! pre-build hook, install and build, static files, workers, cache, rate
//! limiter, and the [`AppService`] that answers its requests. Stopping
//! drains its requests before its workers.

use std::io::IsTerminal;
use std::num::NonZeroU32;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::Admin;
use crate::app::{self, App};
use crate::cache::IsrCache;
use crate::config::platform::Hooks;
use crate::config::{Config, Framework};
use crate::metrics::{AppSource, Metrics};
use crate::nextcache::NextLink;
use crate::pool::{self, DEFAULT_STOP_TIMEOUT, LaunchPlan, PoolConfig, PoolHandle};
use crate::proxy::Proxy;
use crate::ratelimit::RateLimiter;
use crate::run::RunError;
use crate::server::AppService;
use crate::statics::StaticFiles;
use crate::{hooks, memory};

/// What to run, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct AppSettings {
    /// The app's name (multi-app: its table; single-app: its directory).
    pub name: Option<String>,
    pub dir: PathBuf,
    /// The app's config (in multi-app mode, merged with its platform table).
    pub config: Config,
    /// Workers when the config does not say.
    pub default_workers: NonZeroU32,
    pub force_build: bool,
    /// Installs and builds are killed after this.
    pub build_timeout: std::time::Duration,
    pub hooks: Option<Hooks>,
    pub rate_limit: Option<NonZeroU32>,
    /// IPv6 clients of the rate limit are keyed by this prefix length.
    pub ipv6_prefix: u8,
    pub trusted_proxies: Vec<IpNet>,
    /// Clients (after `trusted_proxies`) that get the full health report
    /// and the metrics.
    pub admin_networks: Vec<IpNet>,
    /// Where the app's sockets go (a private directory is made inside).
    pub runtime_base: PathBuf,
    /// Multi-app: the app's files are a tenant's, so its static
    /// directories must resolve inside its source.
    pub confined: bool,
    /// Multi-app: the app's processes run as this user.
    pub user: Option<crate::config::platform::AppUser>,
    /// A purge token that wins over the config's (single-app mode:
    /// `BEXT_PURGE_TOKEN`). Multi-app mode has none: each app's token is
    /// its own, so a token for one app purges no other.
    pub purge_token_override: Option<String>,
    /// `bext dev`: the app's development server, no build, and the cache
    /// in preview unless asked for.
    pub dev: Option<DevMode>,
}

/// How `bext dev` runs an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevMode {
    /// `--cache`: the real cache; otherwise every request reaches the app
    /// and says what the cache would have done with its response.
    pub cache: bool,
    /// A static site's pages reload themselves when a file changes.
    pub reload: crate::dev::LiveReload,
}

impl AppSettings {
    /// Single-app mode (`bext run`, `bext dev`): the app in `dir`, run as
    /// bext's own user, its limits from `config`, the purge token from
    /// `BEXT_PURGE_TOKEN` if set.
    pub fn single_app(
        dir: PathBuf,
        config: Config,
        default_workers: NonZeroU32,
        dev: Option<DevMode>,
    ) -> Self {
        let (rate_limit, ipv6_prefix, trusted_proxies, admin_networks) = derived(&config);
        AppSettings {
            name: None,
            dir,
            config,
            default_workers,
            force_build: false,
            build_timeout: crate::app::build::BUILD_TIMEOUT,
            hooks: None,
            rate_limit,
            ipv6_prefix,
            trusted_proxies,
            admin_networks,
            runtime_base: default_runtime_base(),
            user: None,
            confined: false,
            purge_token_override: std::env::var(crate::config::ENV_PURGE_TOKEN)
                .ok()
                .filter(|t| !t.is_empty()),
            dev,
        }
    }

    /// These settings with another single-app `config` and what derives
    /// from it (its rate limit, trusted proxies and admin networks).
    pub fn with_config(self, config: Config) -> Self {
        let (rate_limit, ipv6_prefix, trusted_proxies, admin_networks) = derived(&config);
        AppSettings {
            rate_limit,
            ipv6_prefix,
            trusted_proxies,
            admin_networks,
            config,
            ..self
        }
    }

    /// Do `other`'s differences need new workers (or only a new request
    /// path: domains, limits, cache settings)?
    pub fn needs_restart(&self, other: &AppSettings) -> bool {
        self.dir != other.dir
            || self.config.runtime != other.config.runtime
            || self.config.isolate != other.config.isolate
            || self.config.server.static_dir != other.config.server.static_dir
            || self.default_workers != other.default_workers
            || self.user != other.user
    }
}

/// What single-app settings take from the config: the rate limit (and its
/// IPv6 prefix), trusted proxies and admin networks.
fn derived(config: &Config) -> (Option<NonZeroU32>, u8, Vec<IpNet>, Vec<IpNet>) {
    (
        config.rate_limit.map(|l| l.rpm),
        config
            .rate_limit
            .map_or(crate::ratelimit::DEFAULT_IPV6_PREFIX, |l| l.ipv6_prefix),
        config.server.trusted_proxies.clone(),
        config.server.admin_networks.clone(),
    )
}

/// When a started app is good enough to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// A first start: serve as soon as bext listens; a crashing app gets
    /// 503s while its restarts continue.
    AnyReady,
    /// Workers that replace running ones: all of them must be ready, or the
    /// start fails and the old ones keep serving.
    AllReady,
}

/// A started app.
#[derive(Debug)]
pub struct RunningApp {
    pub name: String,
    pub framework: Framework,
    pub settings: AppSettings,
    /// The version it runs (set by the platform; empty in single-app mode).
    pub version: String,
    /// Static files of retained versions (id, files), newest first.
    older_statics: Vec<(String, Arc<StaticFiles>)>,
    /// Swapped when hot settings change; in-flight requests keep the old one.
    service: ArcSwap<AppService>,
    statics: Arc<StaticFiles>,
    pool: Option<PoolHandle>,
    memory: Option<memory::AppMemory>,
    /// Next.js: the workers' shared cache state (dropped before the
    /// runtime directory its socket is in).
    next_link: Option<Arc<NextLink>>,
    _runtime_dir: Option<RuntimeDir>,
    metrics: Arc<Metrics>,
    /// This start's registration with `metrics`.
    metrics_id: u64,
    watches_itself: bool,
    app: App,
}

impl RunningApp {
    /// Detects, hooks, installs, builds and starts the app. With `Gate::AllReady`
    /// (workers that are to replace running ones), it is an error unless
    /// every worker becomes ready within `isolate.start_timeout`: the
    /// caller keeps the old ones.
    pub async fn start(
        settings: AppSettings,
        metrics: Arc<Metrics>,
        gate: Gate,
    ) -> Result<Self, RunError> {
        if settings.confined {
            trusted_path(&settings.dir).map_err(|source| RunError::Static {
                dir: settings.dir.clone(),
                source,
            })?;
        }
        let mut app = app::detect(&settings.dir, &settings.config)?;
        if let Some(name) = &settings.name {
            app.name = name.clone();
        }
        info!(
            app = %app.name,
            framework = %app.framework,
            engine = app.engine.map_or("none".to_string(), |e| e.to_string()),
            dir = %app.dir.display(),
            "detected {} app '{}' ({})",
            app.framework,
            app.name,
            app.reason
        );
        let user = settings.user.as_ref();
        if let Some(user) = user {
            let me = nix::unistd::geteuid().as_raw();
            if me != 0 && me != user.uid {
                return Err(RunError::NeedsRoot {
                    app: app.name.clone(),
                    user: user.name.clone(),
                });
            }
        }
        if let Some(hook) = settings
            .hooks
            .as_ref()
            .and_then(|h| h.pre_build.as_ref().map(|c| (c, h.timeout)))
        {
            hooks::run(
                &app.name,
                "pre_build",
                hook.0,
                &app.dir,
                &app.env,
                user,
                hook.1,
            )
            .await?;
        }
        if settings.dev.is_some() {
            // No production build: the development server builds as it
            // serves. Dependencies still get installed when missing.
            app::prepare_install(&app, user, settings.build_timeout).await?;
        } else {
            app::prepare(&app, settings.force_build, user, settings.build_timeout).await?;
        }
        if app.framework == Framework::Nextjs && settings.dev.is_none() {
            app.preview_id = app.next_preview_id();
            if app.preview_id.is_none() {
                warn!(app = %app.name, "no preview mode id in the Next.js build: draft-mode requests are not told from others by the cache");
            }
        }
        let (start, watches_itself) = match settings.dev {
            Some(_) if app.engine.is_some() => {
                let dev = app.dev_start()?;
                (Some(dev.start), dev.watches)
            }
            _ if app.engine.is_some() => (Some(app.start()?), false),
            _ => (None, false),
        };

        let mut mounts = app.mounts();
        if settings.dev.is_some() {
            // A production build's hashed assets (`.next/static`) are not
            // what the development server serves.
            mounts.retain(|m| !m.immutable);
        }
        for mount in &mounts {
            info!(app = %app.name, "serving {} at {}", mount.root.display(), mount.prefix);
        }
        let statics = Arc::new(
            StaticFiles::open(&mounts, settings.confined.then_some(app.dir.as_path()))
                .map_err(|source| RunError::Static {
                    dir: app.dir.clone(),
                    source,
                })?
                .with_compression(settings.config.compression),
        );

        let config = &settings.config;
        let (pool, memory, runtime_dir, next_link) = match app.engine {
            Some(_) => {
                let runtime_dir = RuntimeDir::create(&settings.runtime_base, &app.name)?;
                let dir_error = |source| RunError::RuntimeDir {
                    dir: runtime_dir.path().to_path_buf(),
                    source,
                };
                let adapters =
                    bext_worker::adapter::install(runtime_dir.path()).map_err(dir_error)?;
                let start = start.as_ref().ok_or(crate::app::StartError::Static)?;
                let plan = LaunchPlan::new(
                    start,
                    &app.dir,
                    adapters.clone(),
                    config.isolate.memory_limit,
                    app.env.clone(),
                    settings.user.clone(),
                )?;
                let raw_output = settings.dev.is_some()
                    && std::io::stderr().is_terminal()
                    && crate::telemetry::is_pretty();
                let plan = match settings.dev {
                    Some(_) => plan.for_dev(pool::DevLaunch { colour: raw_output }),
                    None => plan,
                };
                let next_link =
                    next_link(&app, &settings, runtime_dir.path(), user).map_err(dir_error)?;
                let plan = match &next_link {
                    Some(link) => plan.with_bext_env(link.worker_env()),
                    None => plan,
                };
                let (socket_dir, peer_uids) =
                    socket_dir(runtime_dir.path(), &adapters, &plan, user).map_err(dir_error)?;
                let memory = config
                    .isolate
                    .memory_limit
                    .map(|limit| memory::AppMemory::new(&app.name, limit));
                // A development server that watches its files runs once:
                // several would share one build directory (`.next`).
                let workers = match settings.dev {
                    Some(_) if watches_itself => 1,
                    _ => config.isolate.workers_or(settings.default_workers).get() as usize,
                };
                crate::progress::step("start", format!("{workers} worker(s): {}", plan.describe()));
                let handle = pool::start(PoolConfig {
                    app: app.name.clone(),
                    workers,
                    plan,
                    runtime_dir: socket_dir,
                    peer_uids,
                    memory_limit: config.isolate.memory_limit,
                    memory: memory.clone(),
                    start_timeout: config.isolate.start_timeout,
                    stop_timeout: DEFAULT_STOP_TIMEOUT,
                    drain_timeout: config.server.shutdown_grace,
                    max_inflight: config.isolate.max_inflight.get() as usize,
                    dev: settings.dev.is_some(),
                    raw_output,
                });
                match gate {
                    Gate::AnyReady => {
                        let ready = handle.wait_ready(config.isolate.start_timeout).await;
                        if ready == 0 && settings.dev.is_some() {
                            error!(app = %app.name, "the app is not running; requests get 503 until a change starts it again");
                        } else if ready == 0 {
                            error!(app = %app.name, "no worker is ready yet; requests get 503 until one is (restarts continue)");
                        } else {
                            info!(app = %app.name, ready, "workers ready");
                        }
                    }
                    Gate::AllReady => {
                        if !handle.wait_all_ready(config.isolate.start_timeout).await {
                            let ready = handle.pool.ready_count();
                            let workers = handle.pool.size();
                            let cause = handle.last_failure().unwrap_or_else(|| {
                                format!("not ready within {:?}", config.isolate.start_timeout)
                            });
                            let kill = CancellationToken::new();
                            kill.cancel();
                            handle.stop(&kill).await;
                            if let Some(memory) = &memory {
                                memory.cleanup();
                            }
                            return Err(RunError::NotReady {
                                app: app.name.clone(),
                                ready,
                                workers,
                                cause,
                            });
                        }
                        info!(app = %app.name, ready = handle.pool.size(), "workers ready");
                    }
                }
                (Some(handle), memory, Some(runtime_dir), next_link)
            }
            None => (None, None, None, None),
        };

        let service = build_service(
            &app,
            &settings,
            Arc::clone(&statics),
            Arc::from([]),
            pool.as_ref(),
            next_link.as_ref(),
            &metrics,
            None,
            None,
        );
        static STARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let metrics_id = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics.register_app(&AppSource {
            app: app.name.clone(),
            id: metrics_id,
            pool: pool.as_ref().map(|h| Arc::clone(&h.pool)),
            cache: service.cache.clone(),
        });
        Ok(RunningApp {
            name: app.name.clone(),
            framework: app.framework,
            settings,
            version: String::new(),
            older_statics: Vec::new(),
            service: ArcSwap::from_pointee(service),
            statics,
            pool,
            memory,
            next_link,
            _runtime_dir: runtime_dir,
            metrics,
            metrics_id,
            watches_itself,
            app,
        })
    }

    /// False for a static site.
    pub fn has_workers(&self) -> bool {
        self.pool.is_some()
    }

    /// `bext dev`: the app crashed or failed to start, and waits for a
    /// change.
    pub fn is_down(&self) -> bool {
        self.pool.as_ref().is_some_and(|h| h.pool.down().is_some())
    }

    /// `bext dev`, after a change: static files are looked up afresh.
    pub fn forget_statics(&self) {
        self.statics.forget();
    }

    /// `bext dev`: the app's own command watches its files (`next dev`, a
    /// `dev` script), so bext does not restart it on changes.
    pub fn watches_itself(&self) -> bool {
        self.watches_itself
    }

    /// The request path to route to.
    pub fn service(&self) -> Arc<AppService> {
        self.service.load_full()
    }

    /// Applies settings that need no new workers (rate limit, cache
    /// settings, trusted proxies): a new request path on the same workers.
    /// The cache keeps its entries unless its settings changed.
    pub fn apply(&mut self, settings: AppSettings) {
        let current = self.service.load_full();
        let keep_cache = settings.config.isr == self.settings.config.isr
            && settings.config.server.upstream_timeout
                == self.settings.config.server.upstream_timeout;
        let cache = keep_cache.then(|| current.cache.clone()).flatten();
        // Compression settings change in place: the entries stay.
        if let Some(cache) = &cache {
            cache.set_compression(settings.config.compression);
        }
        self.statics.set_compression(settings.config.compression);
        for older in self.older().iter() {
            older.set_compression(settings.config.compression);
        }
        let service = build_service(
            &self.app,
            &settings,
            Arc::clone(&self.statics),
            self.older(),
            self.pool.as_ref(),
            self.next_link.as_ref(),
            &self.metrics,
            cache,
            current.limiter.clone(),
        );
        self.metrics.register_app(&AppSource {
            app: self.name.clone(),
            id: self.metrics_id,
            pool: self.pool.as_ref().map(|h| Arc::clone(&h.pool)),
            cache: service.cache.clone(),
        });
        self.service.store(Arc::new(service));
        self.settings = settings;
    }

    /// Takes over `old`'s rate-limit allowances when the limit is the same:
    /// new workers for an app must not hand every client a fresh burst.
    pub fn inherit_limiter(&mut self, old: &RunningApp) {
        let Some(previous) = old.service().limiter.clone() else {
            return;
        };
        let current = self.service.load_full();
        let service = build_service(
            &self.app,
            &self.settings,
            Arc::clone(&self.statics),
            self.older(),
            self.pool.as_ref(),
            self.next_link.as_ref(),
            &self.metrics,
            current.cache.clone(),
            Some(previous),
        );
        self.service.store(Arc::new(service));
    }

    /// Takes over `old`'s cached pages (`deploy.purge_cache = false`),
    /// when both cache the same way.
    pub fn adopt_cache(&mut self, old: &RunningApp) {
        let Some(cache) = old.service().cache.clone() else {
            return;
        };
        if self.settings.config.isr != old.settings.config.isr {
            return;
        }
        let current = self.service.load_full();
        let service = build_service(
            &self.app,
            &self.settings,
            Arc::clone(&self.statics),
            self.older(),
            self.pool.as_ref(),
            self.next_link.as_ref(),
            &self.metrics,
            Some(cache),
            current.limiter.clone(),
        );
        self.metrics.register_app(&AppSource {
            app: self.name.clone(),
            id: self.metrics_id,
            pool: self.pool.as_ref().map(|h| Arc::clone(&h.pool)),
            cache: service.cache.clone(),
        });
        self.service.store(Arc::new(service));
    }

    fn older(&self) -> Arc<[Arc<StaticFiles>]> {
        self.older_statics
            .iter()
            .map(|(_, s)| Arc::clone(s))
            .collect()
    }

    /// This generation's static files, and those of the retained versions
    /// it still serves hashed assets of: for the generation that replaces it.
    pub fn statics_by_version(&self) -> Vec<(String, Arc<StaticFiles>)> {
        std::iter::once((self.version.clone(), Arc::clone(&self.statics)))
            .chain(self.older_statics.iter().cloned())
            .collect()
    }

    /// Serves the hashed assets of `older` (retained versions, newest
    /// first) that this version lacks.
    pub fn set_older_statics(&mut self, older: Vec<(String, Arc<StaticFiles>)>) {
        self.older_statics = older;
        let current = self.service.load_full();
        let service = build_service(
            &self.app,
            &self.settings,
            Arc::clone(&self.statics),
            self.older(),
            self.pool.as_ref(),
            self.next_link.as_ref(),
            &self.metrics,
            current.cache.clone(),
            current.limiter.clone(),
        );
        self.service.store(Arc::new(service));
    }

    /// Runs `hooks.post_deploy` in the background (the app serves).
    pub fn post_deploy(&self) {
        if let Some(hook) = self.post_deploy_hook() {
            let name = self.name.clone();
            tokio::spawn(async move {
                if let Err(e) = hook.await {
                    error!(app = %name, "{e}");
                }
            });
        }
    }

    /// `hooks.post_deploy`, to run once the app serves (none: `None`).
    pub fn post_deploy_hook(
        &self,
    ) -> Option<impl Future<Output = Result<(), hooks::HookError>> + Send + 'static> {
        let hooks = self.settings.hooks.as_ref()?;
        let command = hooks.post_deploy.clone()?;
        let (name, dir, timeout) = (self.name.clone(), self.app.dir.clone(), hooks.timeout);
        let env = self.app.env.clone();
        let user = self.settings.user.clone();
        Some(async move {
            hooks::run(
                &name,
                "post_deploy",
                &command,
                &dir,
                &env,
                user.as_ref(),
                timeout,
            )
            .await
        })
    }

    /// The app's running worker processes (none for a static site).
    pub fn workers(&self) -> Vec<Arc<pool::Worker>> {
        self.pool
            .as_ref()
            .map(|h| h.pool.workers())
            .unwrap_or_default()
    }

    /// The workers' status, with their memory.
    pub fn worker_status(&self) -> Vec<pool::WorkerStatus> {
        self.pool
            .as_ref()
            .map(|h| h.pool.status())
            .unwrap_or_default()
    }

    /// Replaces every worker, each once its successor is ready; false for
    /// an app without workers.
    pub fn recycle_workers(&self) -> bool {
        self.pool.as_ref().map(PoolHandle::recycle_all).is_some()
    }

    /// Reads the workers' restart count (for waiting on a restart).
    pub fn restarts_counter(&self) -> impl Fn() -> u64 + Send + 'static {
        let pool = self.pool.as_ref().map(|h| Arc::clone(&h.pool));
        move || pool.as_ref().map_or(0, |p| p.restarts())
    }

    pub fn restarts(&self) -> u64 {
        self.pool.as_ref().map_or(0, |h| h.pool.restarts())
    }

    /// What is still being answered: requests, and what holds a worker
    /// after its request is done (response bodies still streaming,
    /// WebSocket and other upgraded tunnels).
    fn busy(&self) -> usize {
        let workers: usize = self.workers().iter().map(|w| w.inflight()).sum();
        self.service.load().inflight() + workers
    }

    /// Waits for its requests, streams and tunnels (already unrouted) up to
    /// `grace`, then stops its workers.
    pub async fn stop(self, grace: Duration, kill: &CancellationToken) {
        self.drain_and_stop(grace, kill, kill).await;
    }

    /// [`Self::stop`], which stops waiting for requests when `hurry` is
    /// cancelled (its workers still get SIGTERM first, unless `kill` is).
    pub async fn drain_and_stop(
        self,
        grace: Duration,
        hurry: &CancellationToken,
        kill: &CancellationToken,
    ) {
        let deadline = tokio::time::Instant::now() + grace;
        while self.busy() > 0
            && tokio::time::Instant::now() < deadline
            && !hurry.is_cancelled()
            && !kill.is_cancelled()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.busy() > 0 {
            warn!(app = %self.name, inflight = self.busy(), "stopping with requests, streams or WebSockets still open");
        }
        if let Some(pool) = self.pool {
            info!(app = %self.name, "stopping workers");
            pool.stop(kill).await;
        }
        if let Some(memory) = &self.memory {
            memory.cleanup();
        }
        self.metrics.unregister_app(&self.name, self.metrics_id);
        info!(app = %self.name, "app stopped");
    }
}

/// Puts one app's request path together: endpoints, limiter, static files,
/// cache, proxy.
#[allow(
    clippy::too_many_arguments,
    reason = "one app's request path, put together"
)]
fn build_service(
    app: &App,
    settings: &AppSettings,
    statics: Arc<StaticFiles>,
    older_statics: Arc<[Arc<StaticFiles>]>,
    pool: Option<&PoolHandle>,
    next_link: Option<&Arc<NextLink>>,
    metrics: &Arc<Metrics>,
    cache: Option<Arc<IsrCache>>,
    previous_limiter: Option<Arc<RateLimiter>>,
) -> AppService {
    let config = &settings.config;
    let pool = pool.map(|h| Arc::clone(&h.pool));
    let proxy = pool.as_ref().map(|pool| {
        Proxy::new(
            Arc::clone(pool),
            config.server.upstream_timeout,
            config.server.queue_timeout,
        )
        .with_next(next_link.cloned())
    });
    // Edge mode: one Redis link per app, for its cache's L2 and its rate
    // limit, namespaced by the platform's app name, or in single-app mode
    // by the package's name (the same for every instance of one site,
    // whatever directory each runs from), else the directory's. A cache or
    // limiter carried over keeps its link (Redis's settings apply at a
    // restart).
    let l2 = config.redis.as_ref().and_then(|redis| {
        cache
            .as_ref()
            .and_then(|c| c.l2())
            .or_else(|| previous_limiter.as_ref().and_then(|l| l.l2()))
            .cloned()
            .or_else(|| {
                let max_body =
                    usize::try_from(config.isr.max_entry_bytes.bytes()).unwrap_or(usize::MAX);
                let namespace = settings
                    .name
                    .clone()
                    .or_else(|| app.package_name())
                    .unwrap_or_else(|| app.name.clone());
                crate::cache::l2::L2::new(redis, &namespace, max_body)
                    .inspect_err(|e| tracing::warn!(app = %app.name, "no Redis: {e}"))
                    .ok()
            })
    });
    // `bext dev` without `--cache`: nothing is cached, every answer says
    // what would have been.
    let preview =
        (config.isr.enabled && proxy.is_some() && settings.dev.as_ref().is_some_and(|d| !d.cache))
            .then(|| Arc::new(config.isr.clone()));
    // A static site has nothing to cache: its files are served from disk.
    let cache = cache.or_else(|| {
        (config.isr.enabled && proxy.is_some() && preview.is_none()).then(|| {
            let cache = Arc::new(
                IsrCache::tiered(
                    config.isr.clone(),
                    config.server.upstream_timeout,
                    metrics.cache_counters(&app.name),
                    l2.clone(),
                )
                .with_compression(config.compression),
            );
            if l2.is_some() {
                cache.hear_purges();
                tracing::info!(app = %app.name, "edge mode: the cache is shared through Redis");
            }
            cache
        })
    });
    // Next.js: draft-mode requests of this build skip the cache.
    if let Some(cache) = &cache {
        cache.set_draft_id(app.preview_id.as_deref());
    }
    // Next.js: the app's revalidations purge this cache.
    if let Some(link) = next_link {
        link.set_cache(cache.clone());
    }
    let purge_token = settings
        .purge_token_override
        .clone()
        .or_else(|| config.isr.purge_token.clone());
    // A static site under `bext dev`: its pages reload on changes.
    let live_reload = settings
        .dev
        .as_ref()
        .filter(|_| proxy.is_none())
        .map(|d| d.reload.clone());
    let service = AppService {
        hsts: arc_swap::ArcSwapOption::empty(),
        app: Arc::from(app.name.as_str()),
        admin: Admin {
            app: app.name.clone(),
            framework: app.framework.to_string(),
            pool,
            cache: cache.clone(),
            metrics: Arc::clone(metrics),
            purge_token,
            admin_networks: Arc::from(settings.admin_networks.as_slice()),
        },
        statics,
        older_statics,
        proxy,
        cache,
        limiter: settings.rate_limit.map(|rpm| {
            // The same limit keeps every client's allowance (a reload does
            // not hand out fresh bursts).
            previous_limiter
                .filter(|l| {
                    l.rpm() == rpm
                        && l.ipv6_prefix() == settings.ipv6_prefix
                        && l.is_shared() == l2.is_some()
                })
                .unwrap_or_else(|| {
                    Arc::new(
                        RateLimiter::new(rpm, settings.ipv6_prefix, crate::ratelimit::MAX_CLIENTS)
                            .shared(l2.clone()),
                    )
                })
        }),
        trusted_proxies: Arc::from(settings.trusted_proxies.as_slice()),
        counters: metrics.counters(&app.name),
        access_log: config.server.access_log,
        compression: config.compression,
        inflight: Arc::new(AtomicUsize::new(0)),
        orphans: Arc::new(AtomicUsize::new(0)),
        preview,
        live_reload,
    };
    // Single-app HTTPS (`[server.tls] hsts`); in multi-app mode the
    // platform sets it from `[apps.NAME.tls]`.
    if let Some(tls) = &config.server.tls {
        service.set_hsts(tls.hsts);
    }
    service
}

/// The supervisor's private directory for one app's sockets and adapters,
/// removed when dropped.
#[derive(Debug)]
pub struct RuntimeDir(PathBuf);

impl RuntimeDir {
    fn create(base: &Path, app: &str) -> Result<Self, RunError> {
        let name: String = app
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(32)
            .collect();
        // Unique per start (an app being replaced keeps its own sockets
        // while its replacement starts) and unguessable: under a shared
        // /tmp, another user must not be able to make it first.
        let token = uuid::Uuid::new_v4().simple().to_string();
        let dir = base.join(format!(
            "bext-{}-{name}-{}",
            std::process::id(),
            &token[..16]
        ));
        let failed = |source| RunError::RuntimeDir {
            dir: dir.clone(),
            source,
        };
        std::fs::create_dir_all(base).map_err(failed)?;
        // Not recursive: an existing directory is an error, never reused.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(failed)?;
        verify_private(&dir).map_err(failed)?;
        Ok(RuntimeDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

/// A Next.js app's link with bext's cache handler in its workers
/// ([`crate::nextcache`]), unless it is off, the app brings its own
/// handler, or `bext dev` runs Next's development server. The log says
/// which.
fn next_link(
    app: &App,
    settings: &AppSettings,
    runtime_dir: &Path,
    user: Option<&crate::config::platform::AppUser>,
) -> std::io::Result<Option<Arc<NextLink>>> {
    if app.framework != Framework::Nextjs
        || settings.dev.is_some()
        || app.engine != Some(crate::config::Engine::Node)
    {
        return Ok(None);
    }
    // (A version bext cannot read, as with a hoisted `next` in a monorepo:
    // the handler checks it itself in the worker.)
    let version = crate::nextcache::next_version(&app.dir);
    let known = version.is_some();
    let version = version.unwrap_or_else(|| "(version not found)".into());
    if known && !crate::nextcache::supported(&version) {
        info!(app = %app.name, "Next.js {version}: each worker keeps Next's own cache (bext's cache handler needs Next 16); the app's revalidations do not reach bext's cache (purge it through bext's API)");
        return Ok(None);
    }
    if !settings.config.runtime.next_cache {
        info!(app = %app.name, "Next.js {version}: runtime.next_cache = false, each worker keeps Next's own cache");
        return Ok(None);
    }
    if let Some(own) = crate::nextcache::own_cache_handler(&app.dir) {
        info!(app = %app.name, "Next.js {version} with its own cacheHandler ({own}): bext's is not installed, and the app's revalidations do not reach bext's cache (purge it through bext's API)");
        return Ok(None);
    }
    let me = nix::unistd::geteuid().as_raw();
    let uid = user.map(|u| u.uid).filter(|&uid| uid != me);
    let link = NextLink::start(&app.name, runtime_dir, uid)?;
    info!(app = %app.name, "Next.js {version}: bext's cache handler goes in at run time (one Next cache for all workers; the app's revalidations purge bext's cache)");
    Ok(Some(link))
}

/// Where an app's worker sockets go, and the uid that must be listening on
/// them. The runtime directory stays bext's: an app that runs as its own
/// user may enter it (0711) and read the adapters (0644), nothing more;
/// its sockets are bound by bext and handed over (Node), or, when the
/// runtime binds them itself (Deno), go in a subdirectory of the app's
/// user, where bext checks who listens before it sends anything.
fn socket_dir(
    runtime_dir: &Path,
    adapters: &bext_worker::adapter::Adapters,
    plan: &LaunchPlan,
    user: Option<&crate::config::platform::AppUser>,
) -> std::io::Result<(PathBuf, Vec<u32>)> {
    use std::os::unix::fs::PermissionsExt;
    let me = nix::unistd::geteuid().as_raw();
    let Some(user) = user.filter(|u| u.uid != me) else {
        return Ok((runtime_dir.to_path_buf(), vec![me]));
    };
    std::fs::set_permissions(runtime_dir, std::fs::Permissions::from_mode(0o711))?;
    for file in [&adapters.node, &adapters.deno] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644))?;
    }
    if plan.inherits_socket() {
        // bext listened on it; a runtime that listens again on what it
        // inherits (Node does) makes it the app's user's.
        return Ok((runtime_dir.to_path_buf(), vec![me, user.uid]));
    }
    let sockets = runtime_dir.join("sockets");
    std::fs::DirBuilder::new().mode(0o700).create(&sockets)?;
    std::os::unix::fs::chown(&sockets, Some(user.uid), Some(user.gid))?;
    Ok((sockets, vec![user.uid]))
}

/// A tenant's `source` as the operator wrote it: no symlink on the way that
/// someone other than root or bext made. Else the owner of a parent
/// directory (a tenant's home) could swap the app's directory for a link
/// to any place bext may read, and have bext serve it as the app's files.
fn trusted_path(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let mut so_far = PathBuf::new();
    for part in path.components() {
        so_far.push(part);
        let meta = std::fs::symlink_metadata(&so_far)?;
        if meta.file_type().is_symlink() && meta.uid() != 0 && meta.uid() != me {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} is a symlink of uid {}: an app's source may go only through links of root or bext",
                    so_far.display(),
                    meta.uid()
                ),
            ));
        }
    }
    Ok(())
}

/// `dir` is a real directory (not a symlink), owned by this process's user,
/// that no one else may enter.
pub(crate) fn verify_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)?;
    let uid = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "not a private directory of uid {uid} (owner {}, mode {:o})",
                meta.uid(),
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        // `sockets/` (Deno apps of their own user) is the app's to write:
        // only its top-level entries are removed, at most so many, never a
        // tree the app made there to stall bext.
        let sockets = self.0.join("sockets");
        if let Ok(entries) = std::fs::read_dir(&sockets) {
            for entry in entries.flatten().take(MAX_SOCKET_ENTRIES) {
                if entry.file_type().is_ok_and(|t| !t.is_dir()) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
            if let Err(e) = std::fs::remove_dir(&sockets) {
                warn!(dir = %sockets.display(), "could not remove an app's socket directory: {e}");
                return;
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Entries of an app's socket directory removed when it stops (it has one
/// per worker and restart, normally a handful).
const MAX_SOCKET_ENTRIES: usize = 10_000;

/// Where single-app mode puts runtime directories: `$XDG_RUNTIME_DIR`, or
/// the system temp dir.
pub fn default_runtime_base() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Issue 11, fault 8: runtime directories are fresh, unguessable and
    /// private; one that is not private is refused.
    #[test]
    fn runtime_dirs_are_fresh_and_private() {
        let base = tempfile::tempdir().expect("tempdir");
        let a = RuntimeDir::create(base.path(), "app").expect("create");
        let b = RuntimeDir::create(base.path(), "app").expect("create");
        assert_ne!(a.path(), b.path(), "a fresh name each start");
        let mode = std::fs::metadata(a.path())
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(verify_private(a.path()).is_ok());

        let shared = base.path().join("shared");
        std::fs::create_dir(&shared).expect("mkdir");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(verify_private(&shared).is_err(), "world-writable");
        let link = base.path().join("link");
        std::os::unix::fs::symlink(a.path(), &link).expect("symlink");
        assert!(verify_private(&link).is_err(), "a symlink to a private dir");
    }

    /// Issue 11 (review): a tenant who owns the parent of its source may
    /// not swap the source for a link elsewhere; the operator's links pass.
    #[test]
    fn a_source_through_someone_elses_symlink_is_refused() {
        let base = tempfile::tempdir().expect("tempdir");
        let real = base.path().join("real");
        std::fs::create_dir(&real).expect("mkdir");
        let link = base.path().join("current");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        assert!(trusted_path(&link).is_ok(), "bext's own link");
        if nix::unistd::geteuid().is_root() {
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                &link,
                Some(nix::unistd::Uid::from_raw(65534)),
                None,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .expect("lchown");
            let err = trusted_path(&link.join(".")).expect_err("a tenant's link");
            assert!(err.to_string().contains("symlink of uid 65534"), "{err}");
        }
    }
}
