//! `bext serve --config platform.toml`: many apps behind one listener.
//!
//! The platform owns the running apps and the route table; requests see an
//! immutable snapshot of the routes ([`RouteTable`]) swapped whole by
//! reloads. SIGHUP reloads `platform.toml`: added apps start, removed apps
//! are unrouted, drained and stopped, apps whose domains, limits or cache
//! settings changed get a new request path on the same workers, apps whose
//! source, runtime or isolation changed get new workers; a file that does
//! not validate changes nothing. One app failing to start (hook, install,
//! build) is logged and skipped; the others serve.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use ipnet::IpNet;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::apps::{AppSettings, Gate, RunningApp};
use crate::body::{self, Body};
use crate::cli::ServeArgs;
use crate::config::platform::PlatformConfig;
use crate::config::{ConfigError, DEFAULT_SHUTDOWN_GRACE, ENV_PURGE_TOKEN};
use crate::listener::{Handler, Peer, Shutdown};
use crate::metrics::Metrics;
use crate::router::{self, RouteTable};
use crate::run::RunError;
use crate::server::AppService;
use crate::shards::Shards;

/// Workers per app in multi-app mode when neither the app's config nor
/// its platform table says.
pub use crate::config::platform::DEFAULT_PLATFORM_WORKERS;

/// The request side of the platform: routes, and what `/__bext/platform/`
/// reports on.
#[derive(Debug)]
pub struct PlatformService {
    routes: ArcSwap<RouteTable<AppService>>,
    /// Every configured app by domain, running or not: a host of an app
    /// that is starting (or failed to) gets 503, not 404.
    configured: ArcSwap<RouteTable<String>>,
    /// Every configured app's name.
    names: ArcSwap<Vec<String>>,
    /// Every app by name (for purges naming their app in the body).
    apps: ArcSwap<BTreeMap<String, Arc<AppService>>>,
    metrics: Arc<Metrics>,
    /// `admin_networks` and `trusted_proxies`, as of the last reload.
    access: ArcSwap<(Vec<IpNet>, Vec<IpNet>)>,
}

impl PlatformService {
    fn publish(&self, apps: &BTreeMap<String, RunningApp>, config: &PlatformConfig) {
        let services: BTreeMap<String, Arc<AppService>> = apps
            .iter()
            .map(|(name, app)| (name.clone(), app.service()))
            .collect();
        let routes = config
            .apps
            .iter()
            .filter(|a| services.contains_key(&a.name))
            .flat_map(|a| {
                let service = &services[&a.name];
                a.domains
                    .iter()
                    .map(move |d| (d.clone(), Arc::clone(service)))
            });
        let default = config
            .default_app
            .as_ref()
            .and_then(|d| services.get(d))
            .cloned();
        let table = RouteTable::new(routes, default);
        let configured = RouteTable::new(
            config.apps.iter().flat_map(|a| {
                let name = Arc::new(a.name.clone());
                a.domains
                    .iter()
                    .map(move |d| (d.clone(), Arc::clone(&name)))
            }),
            config.default_app.clone().map(Arc::new),
        );
        self.configured.store(Arc::new(configured));
        self.names.store(Arc::new(
            config.apps.iter().map(|a| a.name.clone()).collect(),
        ));
        info!(
            apps = services.len(),
            routes = table.len(),
            "routes published"
        );
        self.routes.store(Arc::new(table));
        self.apps.store(Arc::new(services));
        self.access.store(Arc::new((
            config.admin_networks.clone(),
            config.trusted_proxies.clone(),
        )));
    }

    /// The client as the trusted proxies tell it.
    fn client_ip(&self, req: &Request<Incoming>, peer: SocketAddr) -> IpAddr {
        crate::proxy::headers::client_ip(peer.ip(), req.headers(), &self.access.load().1)
    }

    async fn platform_admin(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let client = self.client_ip(&req, peer);
        if !self.access.load().0.iter().any(|n| n.contains(&client)) {
            return text(StatusCode::FORBIDDEN, "forbidden\n");
        }
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/__bext/platform/metrics") => {
                let mut response = Response::new(body::full(self.metrics.render(None)));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            (&Method::GET, "/__bext/platform/health") => {
                let apps = self.apps.load();
                let mut report: serde_json::Map<String, serde_json::Value> = apps
                    .iter()
                    .map(|(name, service)| (name.clone(), service.admin.health_report().1))
                    .collect();
                let mut healthy = apps.values().all(|s| s.admin.health_report().0);
                // Configured but not running (starting, or failed to start).
                for name in self.names.load().iter() {
                    if !apps.contains_key(name) {
                        healthy = false;
                        report.insert(name.clone(), serde_json::json!({"status": "not running"}));
                    }
                }
                let body = serde_json::json!({
                    "status": if healthy { "ok" } else { "degraded" },
                    "apps": report,
                });
                let mut response = Response::new(body::full(body.to_string()));
                *response.status_mut() = if healthy {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                response
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// A purge on a host no app serves: the body names the app.
    async fn purge_by_body(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let client = self.client_ip(&req, peer);
        let (parts, incoming) = req.into_parts();
        let Some(bytes) =
            crate::admin::read_limited(body::incoming(incoming), crate::admin::MAX_PURGE_BODY)
                .await
        else {
            return text(
                StatusCode::BAD_REQUEST,
                "the body must be JSON of at most 64 KiB, sent within 10 s\n",
            );
        };
        let bytes = Bytes::from(bytes);
        let app = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("app").and_then(|a| a.as_str()).map(str::to_string));
        let Some(service) = app.and_then(|a| self.apps.load().get(&a).cloned()) else {
            return text(
                StatusCode::NOT_FOUND,
                "no app serves this host; name one with \"app\" in the body\n",
            );
        };
        let req = Request::from_parts(parts, body::full(bytes));
        service.admin.handle(req, client).await
    }
}

impl Handler for PlatformService {
    async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: Peer) -> Response<Body> {
        if req.uri().path().starts_with("/__bext/platform/") {
            return Box::pin(self.platform_admin(req, peer.addr)).await;
        }
        let service = self.routes.load().route(host_of(&req)).cloned();
        match service {
            Some(service) => service.handle(req, peer).await,
            None if req.method() == Method::POST
                && req.uri().path() == "/__bext/cache/invalidate" =>
            {
                Box::pin(self.purge_by_body(req, peer.addr)).await
            }
            None if self.configured.load().route(host_of(&req)).is_some() => {
                let mut response = text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "this app is not running yet\n",
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                response
            }
            None => {
                tracing::debug!(host = %router::normalize(host_of(&req)), "no app for host");
                text(
                    StatusCode::NOT_FOUND,
                    "no app is configured for this host\n",
                )
            }
        }
    }
}

/// The host a request names: `Host`, or an HTTP/2 request's authority.
fn host_of<B>(req: &Request<B>) -> &str {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("")
}

fn text(status: StatusCode, message: &'static str) -> Response<Body> {
    let mut response = Response::new(body::full(message));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The apps of a platform file, as settings; and the apps whose own
/// `bext.config.toml` does not load (a tenant's mistake is that app's
/// failure, never the platform's).
fn settings_for(
    config: &PlatformConfig,
) -> (BTreeMap<String, AppSettings>, BTreeMap<String, ConfigError>) {
    let runtime_base = config.data_dir.join("run");
    let mut all = BTreeMap::new();
    let mut failed = BTreeMap::new();
    for entry in &config.apps {
        let (mut app_config, capped) = match entry.merged_config() {
            Ok(merged) => merged,
            Err(e) => {
                failed.insert(entry.name.clone(), e);
                continue;
            }
        };
        for note in capped {
            warn!(app = %entry.name, "{note}");
        }
        app_config.server.listen = config.listen;
        if let Some(grace) = config.shutdown_grace {
            app_config.server.shutdown_grace = grace;
        }
        all.insert(
            entry.name.clone(),
            AppSettings {
                name: Some(entry.name.clone()),
                dir: entry.source.clone(),
                config: app_config,
                default_workers: std::num::NonZeroU32::new(DEFAULT_PLATFORM_WORKERS)
                    .expect("non-zero"),
                force_build: false,
                hooks: Some(entry.hooks.clone()),
                rate_limit: entry.rate_limit_rpm,
                ipv6_prefix: entry.rate_limit_ipv6_prefix,
                trusted_proxies: config.trusted_proxies.clone(),
                admin_networks: config.admin_networks.clone(),
                runtime_base: runtime_base.clone(),
                user: entry.user.clone(),
                confined: true,
                purge_token_override: None,
            },
        );
    }
    (all, failed)
}

/// Starts every app concurrently; one that fails is logged and left out
/// (a replacement that fails leaves the app on its old workers).
async fn start_apps(
    wanted: BTreeMap<String, (AppSettings, Gate)>,
    metrics: &Arc<Metrics>,
) -> BTreeMap<String, RunningApp> {
    let starts = wanted.into_iter().map(|(name, (settings, gate))| {
        let metrics = Arc::clone(metrics);
        async move { (name, gate, RunningApp::start(settings, metrics, gate).await) }
    });
    let mut started = BTreeMap::new();
    for (name, gate, result) in futures_util::future::join_all(starts).await {
        match (result, gate) {
            (Ok(app), _) => {
                started.insert(name, app);
            }
            (Err(e), Gate::AnyReady) => error!(app = %name, "app not started: {e}"),
            (Err(e), Gate::AllReady) => {
                error!(app = %name, "{e}; the app keeps serving on its old workers");
            }
        }
    }
    started
}

pub async fn serve(args: ServeArgs, shards: Shards) -> Result<(), RunError> {
    let mut config = PlatformConfig::load(&args.config)?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    std::fs::create_dir_all(config.data_dir.join("run")).map_err(|source| {
        RunError::RuntimeDir {
            dir: config.data_dir.clone(),
            source,
        }
    })?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: config.listen,
            source,
        })?;
    let metrics = Arc::new(Metrics::new());
    if std::env::var_os(ENV_PURGE_TOKEN).is_some() {
        warn!(
            "{ENV_PURGE_TOKEN} is ignored in multi-app mode (one token would purge every app); \
             give each app its own: [apps.NAME.cache] purge_token"
        );
    }
    // Signals are handled from here on: a SIGTERM during the first builds
    // stops them and exits, a SIGHUP waits for them.
    let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("could not install signal handlers");
        return Ok(());
    };
    let platform = Arc::new(PlatformService {
        routes: ArcSwap::from_pointee(RouteTable::new([], None)),
        configured: ArcSwap::from_pointee(RouteTable::new([], None)),
        names: ArcSwap::from_pointee(Vec::new()),
        apps: ArcSwap::from_pointee(BTreeMap::new()),
        metrics: Arc::clone(&metrics),
        access: ArcSwap::from_pointee((
            config.admin_networks.clone(),
            config.trusted_proxies.clone(),
        )),
    });
    let mut apps = BTreeMap::new();
    platform.publish(&apps, &config);
    let addr = listener.local_addr().map_err(|source| RunError::Listen {
        addr: config.listen,
        source,
    })?;
    // bext serves at once: each app is routed as soon as it has started (a
    // slow or hung build holds up only its own app, whose hosts get 503
    // meanwhile).
    info!(%addr, apps = config.apps.len(), threads = shards.handles().len(), "listening on http://{addr}");
    let (first, broken) = settings_for(&config);
    for (name, e) in broken {
        error!(app = %name, "app not started: {e}");
    }
    let mut starting: futures_util::stream::FuturesUnordered<_> = first
        .into_iter()
        .map(|(name, settings)| {
            let metrics = Arc::clone(&metrics);
            async move {
                (
                    name,
                    RunningApp::start(settings, metrics, Gate::AnyReady).await,
                )
            }
        })
        .collect();
    let shutdown = Shutdown::default();
    let grace = config.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE);
    let limits = config.limits;
    let serving = {
        let (platform, shutdown) = (Arc::clone(&platform), shutdown.clone());
        async move {
            let served =
                crate::listener::serve(listener, platform, limits, &shutdown, grace, &shards).await;
            if let Err(e) = &served {
                error!("could not serve on {addr}: {e}");
            }
            served.unwrap_or(false)
        }
    };
    let mut serving = std::pin::pin!(serving);

    let config_path = args.config.clone();
    let mut listener_stopped = false;
    // A SIGHUP during the first starts is applied once they are over.
    let mut reload_due = false;
    loop {
        let reload_now = tokio::select! {
            Some((name, started)) = starting.next(), if !starting.is_empty() => {
                match started {
                    Ok(app) => {
                        apps.insert(name.clone(), app);
                        platform.publish(&apps, &config);
                        // Routed first: the hook may call the app itself.
                        if let Some(app) = apps.get(&name) {
                            app.post_deploy();
                        }
                    }
                    Err(e) => error!(app = %name, "app not started: {e}"),
                }
                if starting.is_empty() {
                    info!(apps = apps.len(), of = config.apps.len(), "apps started");
                }
                std::mem::take(&mut reload_due) && starting.is_empty()
            }
            _ = hup.recv() => {
                if starting.is_empty() {
                    true
                } else {
                    info!("SIGHUP: the reload waits until the first starts are over");
                    reload_due = true;
                    false
                }
            }
            _ = term.recv() => { info!("SIGTERM: shutting down gracefully (send it again to stop at once)"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down gracefully (send it again to stop at once)"); break; }
            _ = &mut serving => { warn!("the listener stopped"); listener_stopped = true; break; }
        };
        if reload_now {
            info!(config = %config_path.display(), "SIGHUP: reloading");
            // A reload may build and start apps for a while; a SIGTERM
            // abandons it (nothing is swapped until its starts are done).
            let reloading = reload(
                &config_path,
                &config,
                args.listen.is_some(),
                &mut apps,
                &platform,
                &metrics,
                &shutdown,
            );
            tokio::select! {
                reloaded = reloading => match reloaded {
                    Ok(new) => config = new,
                    Err(e) => error!("reload refused, the running configuration is unchanged: {e}"),
                },
                _ = term.recv() => { info!("SIGTERM during a reload: abandoning it, shutting down"); break; }
                _ = int.recv() => { info!("SIGINT during a reload: abandoning it, shutting down"); break; }
            }
        }
    }
    // First starts still under way are abandoned (their builds and hooks
    // are killed with their process groups).
    drop(starting);
    shutdown.graceful.cancel();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        warn!("second signal: stopping at once");
        shutdown.immediate.cancel();
    });
    if !listener_stopped {
        serving.await;
    }
    let kill = tokio_util::sync::CancellationToken::new();
    let stops = apps.into_values().map(|app| {
        let kill = kill.clone();
        async move { app.stop(Duration::ZERO, &kill).await }
    });
    futures_util::future::join_all(stops).await;
    crate::memory::release();
    info!("bye");
    Ok(())
}

/// Applies a changed platform file, or refuses it whole.
async fn reload(
    path: &Path,
    current: &PlatformConfig,
    listen_overridden: bool,
    apps: &mut BTreeMap<String, RunningApp>,
    platform: &Arc<PlatformService>,
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
) -> Result<PlatformConfig, ConfigError> {
    let mut new = PlatformConfig::load(path)?;
    if listen_overridden {
        new.listen = current.listen;
    }
    if new.listen != current.listen {
        warn!(old = %current.listen, new = %new.listen, "[platform] listen changed; restart bext to apply it");
        new.listen = current.listen;
    }
    let (mut wanted, broken) = settings_for(&new);
    for (name, e) in broken {
        match apps.get(&name) {
            Some(running) => {
                error!(app = %name, "reload: {e}; the app keeps running as it was");
                wanted.insert(name, running.settings.clone());
            }
            None => error!(app = %name, "app not started: {e}"),
        }
    }

    // Start what is new, and replacements for apps that need new workers.
    let mut to_start = BTreeMap::new();
    for (name, settings) in &wanted {
        match apps.get(name) {
            None => {
                info!(app = %name, "reload: new app");
                to_start.insert(name.clone(), (settings.clone(), Gate::AnyReady));
            }
            Some(running) if running.settings.needs_restart(settings) => {
                info!(app = %name, "reload: app changed; starting new workers (the old ones serve until all are ready)");
                to_start.insert(name.clone(), (settings.clone(), Gate::AllReady));
            }
            _ => {}
        }
    }
    let mut started = start_apps(to_start, metrics).await;
    let mut retired = Vec::new();
    for (name, running) in std::mem::take(apps) {
        match (wanted.remove(&name), started.remove(&name)) {
            // Removed from the file.
            (None, _) => {
                info!(app = %name, "reload: app removed; draining");
                retired.push(running);
            }
            // Replaced by new workers.
            (Some(_), Some(mut replacement)) => {
                replacement.inherit_limiter(&running);
                retired.push(running);
                apps.insert(name, replacement);
            }
            // Same workers, maybe a new request path.
            (Some(settings), None) => {
                let mut running = running;
                if running.settings != settings {
                    if running.settings.needs_restart(&settings) {
                        // Logged with its cause by start_apps.
                    } else {
                        info!(app = %name, "reload: applying new domains, limits or cache settings");
                        running.apply(settings);
                    }
                }
                apps.insert(name, running);
            }
        }
    }
    let fresh: Vec<String> = started.keys().cloned().collect();
    for (name, app) in started {
        apps.insert(name, app);
    }
    platform.publish(apps, &new);
    for name in fresh {
        if let Some(app) = apps.get(&name) {
            app.post_deploy();
        }
    }
    let grace = new.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE);
    for app in retired {
        let kill = shutdown.immediate.clone();
        tokio::spawn(async move { app.stop(grace, &kill).await });
    }
    Ok(new)
}

/// `bext check` of a platform file: the file, then every app's own config.
pub fn check(path: &Path) -> Result<Vec<String>, RunError> {
    let config = PlatformConfig::load(path)?;
    let mut lines = vec![format!(
        "{}: ok ({} apps)",
        path.display(),
        config.apps.len()
    )];
    for entry in &config.apps {
        // An app's own files are its tenant's: their mistakes are reported
        // here, and stop only that app (never this check, which guards the
        // platform's start).
        let detected =
            entry
                .merged_config()
                .map_err(RunError::from)
                .and_then(|(merged, capped)| {
                    let app = crate::app::detect(&entry.source, &merged)?;
                    Ok((app, capped))
                });
        match detected {
            Ok((app, capped)) => {
                lines.push(format!(
                    "app '{}': {} ({}), domains {}",
                    entry.name,
                    app.framework,
                    app.reason,
                    entry.domains.join(", ")
                ));
                lines.extend(
                    capped
                        .into_iter()
                        .map(|note| format!("  app '{}': {note}", entry.name)),
                );
            }
            Err(e) => lines.push(format!("app '{}': will not start: {e}", entry.name)),
        }
    }
    Ok(lines)
}

/// The directory where sockets go.
pub fn runtime_base(config: &PlatformConfig) -> PathBuf {
    config.data_dir.join("run")
}
