//! `bext serve --config platform.toml`: many apps behind one listener.
//!
//! This module is the request side of the platform and its wiring: the
//! [`PlatformService`] routes each request by Host to its app through an
//! immutable snapshot of the routes ([`RouteTable`]), swapped whole when
//! the [`Platform`] (the one owner of apps, versions and generations:
//! `crate::platform`) publishes a change. [`serve`] binds the listener and
//! the control socket and hands the apps to the platform.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use ipnet::IpNet;
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::apps::RunningApp;
use crate::body::{self, Body};
use crate::cli::ServeArgs;
use crate::config::platform::{PlatformConfig, PlatformTls};
use crate::config::{DEFAULT_SHUTDOWN_GRACE, ENV_PURGE_TOKEN};
use crate::listener::acme::Acme;
use crate::listener::tls::{CertSource, Certificates, Origin};
use crate::listener::{Handler, Peer, Plain, Shutdown};
use crate::metrics::Metrics;
use crate::platform::{Platform, Signals};
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
    /// Why configured apps are not running (starting, failed).
    not_running: ArcSwap<BTreeMap<String, String>>,
    metrics: Arc<Metrics>,
    /// `admin_networks` and `trusted_proxies`, as of the last reload.
    access: ArcSwap<(Vec<IpNet>, Vec<IpNet>)>,
    /// The HTTPS listener's certificates (`[platform.tls]`).
    certificates: Option<Arc<Certificates>>,
    /// Keeps the certificates of apps without `[apps.NAME.tls]`.
    acme: Option<Arc<Acme>>,
}

/// Where every app's certificate comes from (its files, else ACME for its
/// domains); the default one (for clients without SNI) is the default
/// app's, else the first app's.
fn cert_sources(config: &PlatformConfig) -> Vec<CertSource> {
    config
        .apps
        .iter()
        .filter_map(|entry| {
            let origin = match &entry.tls {
                Some(tls) => Origin::Files {
                    cert: tls.cert.clone(),
                    key: tls.key.clone(),
                },
                None if entry.domains.is_empty() => return None,
                None => Origin::Acme,
            };
            Some(CertSource {
                app: entry.name.clone(),
                domains: entry.domains.clone(),
                origin,
                default: config.default_app.as_deref() == Some(entry.name.as_str()),
            })
        })
        .collect()
}

impl PlatformService {
    /// Routes `apps` for `config`'s domains.
    pub fn publish(
        &self,
        apps: &BTreeMap<String, RunningApp>,
        config: &PlatformConfig,
        not_running: &BTreeMap<String, String>,
    ) {
        self.not_running.store(Arc::new(not_running.clone()));
        let services: BTreeMap<String, Arc<AppService>> = apps
            .iter()
            .map(|(name, app)| (name.clone(), app.service()))
            .collect();
        for entry in &config.apps {
            if let Some(service) = services.get(&entry.name) {
                service.set_hsts(entry.tls.as_ref().and_then(|t| t.hsts));
            }
        }
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
    }

    /// Takes `config`'s certificates for new handshakes; on an error the
    /// ones in use stay.
    pub fn set_certificates(&self, config: &PlatformConfig) -> Result<(), String> {
        match &self.certificates {
            Some(certificates) => {
                certificates.set_sources(cert_sources(config))?;
                if let Some(acme) = &self.acme {
                    acme.sync();
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// `app`'s certificates, for `status`.
    pub fn certificates_of(&self, app: &str) -> Vec<bext_proto::control::v1::CertificateStatus> {
        let Some(certificates) = &self.certificates else {
            return Vec::new();
        };
        certificates
            .info()
            .into_iter()
            .filter(|c| c.app == app)
            .map(|c| bext_proto::control::v1::CertificateStatus {
                domain: c.domain,
                source: if c.acme { "acme" } else { "files" }.to_string(),
                not_after: c.not_after.unwrap_or(0),
                problem: c.problem.unwrap_or_default(),
            })
            .collect()
    }

    /// `admin_networks` and `trusted_proxies` of a reloaded file.
    pub fn set_access(&self, config: &PlatformConfig) {
        self.access.store(Arc::new((
            config.admin_networks.clone(),
            config.trusted_proxies.clone(),
        )));
    }

    /// The client as the trusted proxies tell it.
    fn client_ip(&self, req: &Request<Body>, peer: SocketAddr) -> IpAddr {
        crate::proxy::headers::client_ip(peer.ip(), req.headers(), &self.access.load().1)
    }

    async fn platform_admin(&self, req: Request<Body>, peer: SocketAddr) -> Response<Body> {
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
                let why = self.not_running.load();
                for name in self.names.load().iter() {
                    if !apps.contains_key(name) {
                        healthy = false;
                        let detail = why.get(name).map_or("", String::as_str);
                        report.insert(
                            name.clone(),
                            serde_json::json!({"status": "not running", "detail": detail}),
                        );
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
    async fn purge_by_body(&self, req: Request<Body>, peer: SocketAddr) -> Response<Body> {
        let client = self.client_ip(&req, peer);
        let (parts, sent) = req.into_parts();
        let Some(bytes) = crate::admin::read_limited(sent, crate::admin::MAX_PURGE_BODY).await
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
    async fn handle(self: Arc<Self>, req: Request<Body>, peer: Peer) -> Response<Body> {
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

    fn answer_plain(
        self: &Arc<Self>,
        req: Request<()>,
        peer: &Peer,
        head: &mut Vec<u8>,
    ) -> Plain<impl Future<Output = Response<Body>> + Send + 'static + use<>> {
        use futures_util::future::Either;
        let routes = self.routes.load();
        let app = routes
            .route(host_of(&req))
            .filter(|_| !req.uri().path().starts_with("/__bext/platform/"));
        match app {
            Some(app) => match app.answer_plain(req, peer, head) {
                Plain::Now(now) => Plain::Now(now),
                Plain::Later(later) => Plain::Later(Either::Left(later)),
            },
            // Boxed, as the app's: the future is large, and an idle
            // connection's state would carry its room.
            None => Plain::Later(Either::Right(Box::pin(
                Arc::clone(self).handle(req.map(|()| body::empty()), peer.clone()),
            ))),
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

/// Says so when a challenge type bext will try cannot reach it: ACME
/// servers validate on ports 80 (HTTP-01) and 443 (TLS-ALPN-01) only, so
/// other ports work only behind a forward.
fn warn_unreachable_challenges(listen: SocketAddr, settings: &PlatformTls) {
    use crate::listener::acme::ChallengeKind;
    for kind in &settings.acme.challenges {
        let (port, key, wanted) = match kind {
            ChallengeKind::Http01 => (settings.http_listen.port(), "platform.tls.http_listen", 80),
            ChallengeKind::TlsAlpn01 => (listen.port(), "platform.listen", 443),
        };
        if port != wanted {
            warn!(
                "{key} is port {port}, but ACME servers validate {} on port {wanted}: it fails unless port {wanted} is forwarded here",
                kind.name()
            );
        }
    }
}

/// `bext serve`: listens at once, serves the control socket, and hands the
/// apps to the [`Platform`], which starts them and owns them from then on.
pub async fn serve(args: ServeArgs, shards: Shards) -> Result<(), RunError> {
    let config = PlatformConfig::load_listening(&args.config, args.listen)?
        .with_env_redis()
        .map_err(RunError::Redis)?;
    let dir_error = |source| RunError::RuntimeDir {
        dir: config.data_dir.clone(),
        source,
    };
    std::fs::create_dir_all(config.data_dir.join("run")).map_err(dir_error)?;
    // The control socket first: it refuses a second supervisor on the same
    // data_dir, so what is found there from here on is from a dead one.
    let (commands, inbox) = tokio::sync::mpsc::channel(crate::platform::COMMAND_QUEUE);
    let control_path = config.data_dir.join(crate::control::SOCKET_NAME);
    let (control, service) = crate::control::serve(
        &control_path,
        config.control_group.as_ref(),
        Some(config.data_dir.join("uploads")),
        commands,
    )
    .map_err(|source| RunError::Control {
        path: control_path.clone(),
        source,
    })?;
    // The same service on TCP, with mutual TLS, when asked for.
    let remote_control = match &config.remote_control {
        Some(settings) => {
            let (addr, task) =
                crate::control::remote::serve(settings, service).map_err(|source| {
                    RunError::RemoteControl {
                        addr: settings.listen,
                        source,
                    }
                })?;
            info!(%addr, client_ca = %settings.client_ca.display(), "control port: listening (mutual TLS)");
            Some(task)
        }
        None => None,
    };
    let mark = crate::platform::leftovers::mark(&config.data_dir);
    crate::platform::leftovers::reap(&mark);
    bext_worker::env::set_mark(mark);
    crate::platform::leftovers::clear_runtime_dirs(&config.data_dir.join("run"));
    let state = crate::platform::recover(&config.data_dir)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: config.listen,
            source,
        })?;
    // HTTPS: the certificates, and the plain listener that redirects.
    let tls = match &config.tls {
        Some(settings) => {
            let certificates =
                Arc::new(Certificates::load(cert_sources(&config)).map_err(RunError::Tls)?);
            if !certificates.acme_domains().is_empty()
                && settings.acme.issuer == crate::listener::acme::Issuer::Acme
            {
                warn_unreachable_challenges(config.listen, settings);
            }
            let acme = Acme::new(
                settings.acme.clone(),
                &config.data_dir,
                Arc::clone(&certificates),
            )
            .map_err(RunError::Tls)?;
            // Before the first handshake: a restart serves the kept
            // certificates at once.
            acme.load_kept();
            let server = crate::listener::tls::server_config(Arc::clone(&certificates))
                .map_err(RunError::Tls)?;
            let plain = TcpListener::bind(settings.http_listen)
                .await
                .map_err(|source| RunError::Listen {
                    addr: settings.http_listen,
                    source,
                })?;
            Some((certificates, acme, server, plain))
        }
        None => None,
    };
    let metrics = Arc::new(Metrics::new());
    if let Some((certificates, _, _, _)) = &tls {
        metrics.set_certificates(Arc::clone(certificates));
    }
    if std::env::var_os(ENV_PURGE_TOKEN).is_some() {
        warn!(
            "{ENV_PURGE_TOKEN} is ignored in multi-app mode (one token would purge every app); \
             give each app its own: [apps.NAME.cache] purge_token"
        );
    }
    // Signals are handled from here on: a SIGTERM during the first builds
    // stops them and exits.
    let signals = match Signals::install() {
        Ok(signals) => signals,
        Err(e) => {
            error!("could not install signal handlers: {e}");
            return Ok(());
        }
    };
    let platform = Arc::new(PlatformService {
        routes: ArcSwap::from_pointee(RouteTable::new([], None)),
        configured: ArcSwap::from_pointee(RouteTable::new([], None)),
        names: ArcSwap::from_pointee(Vec::new()),
        apps: ArcSwap::from_pointee(BTreeMap::new()),
        not_running: ArcSwap::from_pointee(BTreeMap::new()),
        metrics: Arc::clone(&metrics),
        access: ArcSwap::from_pointee((
            config.admin_networks.clone(),
            config.trusted_proxies.clone(),
        )),
        certificates: tls.as_ref().map(|(c, _, _, _)| Arc::clone(c)),
        acme: tls.as_ref().map(|(_, a, _, _)| Arc::clone(a)),
    });
    let addr = listener.local_addr().map_err(|source| RunError::Listen {
        addr: config.listen,
        source,
    })?;
    // bext serves at once: each app is routed as soon as it has started (a
    // slow or hung build holds up only its own app, whose hosts get 503
    // meanwhile).
    let scheme = if tls.is_some() { "https" } else { "http" };
    info!(%addr, apps = config.apps.len(), threads = shards.handles().len(), control = %control_path.display(), "listening on {scheme}://{addr}");
    let shutdown = Shutdown::default();
    let grace = config.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE);
    let limits = config.limits;
    let challenged = tls.as_ref().map(|(c, _, _, _)| Arc::clone(c));
    let acme = platform.acme.clone();
    if let Some(acme) = &acme {
        acme.sync();
    }
    let (server_tls, plain, watcher) = match tls {
        Some((certificates, _, server, plain)) => {
            // Certificate files replaced on disk are taken within a
            // second; without the watcher, at the next reload.
            let watcher = crate::listener::tls::watch(certificates)
                .inspect_err(|e| {
                    warn!("certificate files are not watched (a reload takes new ones): {e}");
                })
                .ok();
            (Some(server), Some(plain), watcher)
        }
        None => (None, None, None),
    };
    let redirecting = plain
        .map(|plain| {
            let plain_addr = plain
                .local_addr()
                .map_err(|source| RunError::Listen { addr, source })?;
            info!(addr = %plain_addr, "redirecting http://{plain_addr} to https://");
            Ok::<_, RunError>((plain, plain_addr))
        })
        .transpose()?;
    let serving = {
        let (platform, shutdown) = (Arc::clone(&platform), shutdown.clone());
        async move {
            let https = crate::listener::serve(
                listener, platform, limits, &shutdown, grace, &shards, server_tls,
            );
            let redirect = async {
                let Some((plain, plain_addr)) = redirecting else {
                    return Ok(true);
                };
                let to_https = Arc::new(crate::listener::redirect::ToHttps::new(
                    addr.port(),
                    challenged,
                ));
                crate::listener::serve(plain, to_https, limits, &shutdown, grace, &shards, None)
                    .await
                    .inspect_err(|e| error!("could not serve on {plain_addr}: {e}"))
            };
            let (served, redirected) = futures_util::future::join(https, redirect).await;
            if let Err(e) = &served {
                error!("could not serve on {addr}: {e}");
            }
            served.unwrap_or(false) && redirected.unwrap_or(false)
        }
    };
    Platform::new(
        config,
        args.config.clone(),
        args.listen,
        state,
        platform,
        metrics,
        shutdown,
    )
    .run(inbox, signals, serving)
    .await;
    control.abort();
    if let Some(remote_control) = remote_control {
        remote_control.abort();
    }
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    if let Some(acme) = acme {
        acme.stop();
    }
    let _ = std::fs::remove_file(&control_path);
    crate::memory::release();
    info!("bye");
    Ok(())
}

/// `bext check` of a platform file: the file, then every app's own config.
pub fn check(path: &Path) -> Result<Vec<String>, RunError> {
    let config = PlatformConfig::load(path)?
        .with_env_redis()
        .map_err(RunError::Redis)?;
    let mut lines = vec![format!(
        "{}: ok ({} apps)",
        path.display(),
        config.apps.len()
    )];
    if let Some(redis) = &config.redis {
        lines.push(crate::check::redis_line(&redis.url));
    }
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
