//! `bext run`: the single-app lifecycle as one explicit sequence —
//! config → listen → detect → install/build → workers → serve → drain →
//! stop workers — with every way it can fail in [`RunError`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::app::{BuildError, DetectError, StartError};
use crate::apps::{AppSettings, Gate, RunningApp};
use crate::cli::RunArgs;
use crate::config::{Config, ConfigError};
use crate::listener::Shutdown;
use crate::listener::tls::{CertSource, Certificates, Origin};
use crate::metrics::Metrics;
use crate::pool::PlanError;
use crate::shards::Shards;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Detect(#[from] DetectError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("could not open the static directory {}: {source}", dir.display())]
    Static {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("could not create the runtime directory {}: {source}", dir.display())]
    RuntimeDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Hook(#[from] crate::hooks::HookError),
    #[error("the new workers of app '{app}' did not become ready ({ready} of {workers}): {cause}")]
    NotReady {
        app: String,
        ready: usize,
        workers: usize,
        cause: String,
    },
    #[error("app '{app}' is to run as user `{user}`, which needs bext to run as root")]
    NeedsRoot { app: String, user: String },
    #[error(transparent)]
    State(#[from] crate::platform::state::StateError),
    #[error("could not serve the control socket {}: {source}", path.display())]
    Control {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not serve the control port on {addr} ([platform.control]): {source}")]
    RemoteControl {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Redis(String),
    #[error("could not listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

impl RunError {
    /// Exit code: 64 (EX_USAGE) for a bad config, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Config(_) => 64,
            _ => 1,
        }
    }
}

/// Loads the config for `dir` (or `file`), as `bext run` and `bext check` do.
pub fn load_config(dir: &Path, file: Option<&Path>) -> Result<Config, ConfigError> {
    match file {
        Some(file) => Config::load_file(file),
        None => Config::load_dir(dir),
    }
}

pub async fn run(args: RunArgs, shards: Shards) -> Result<(), RunError> {
    let mut config = load_config(&args.dir, args.config.as_deref())?;
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(workers) = args.workers {
        config.isolate.workers = Some(workers);
    }
    // Edge mode by the environment alone (a [redis] table wins).
    if config.redis.is_none() {
        config.redis = crate::config::redis_from_env().map_err(RunError::Redis)?;
    }
    // Bind before the (possibly long) build: a busy port fails at once.
    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: config.server.listen,
            source,
        })?;
    // HTTPS (`[server.tls]`): the certificate, and the plain listener
    // that redirects to it.
    let tls = match &config.server.tls {
        Some(tls) => {
            let origin = match &tls.files {
                Some((cert, key)) => Origin::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                },
                None => Origin::Acme,
            };
            let certificates = Arc::new(
                Certificates::load(vec![CertSource {
                    app: "app".to_string(),
                    domains: tls.domains.clone(),
                    origin,
                    default: true,
                }])
                .map_err(RunError::Tls)?,
            );
            // Automatic certificates: kept in the data directory, those
            // kept from an earlier run served from the first handshake.
            let acme = match &tls.files {
                Some(_) => None,
                None => {
                    let data_dir = config
                        .server
                        .data_dir
                        .clone()
                        .unwrap_or_else(default_data_dir);
                    let acme = crate::listener::acme::Acme::new(
                        tls.acme.clone(),
                        &data_dir,
                        Arc::clone(&certificates),
                    )
                    .map_err(RunError::Tls)?;
                    acme.load_kept();
                    info!(data_dir = %data_dir.display(), domains = ?tls.domains, "automatic certificates");
                    Some(acme)
                }
            };
            let server = crate::listener::tls::server_config(Arc::clone(&certificates))
                .map_err(RunError::Tls)?;
            let plain =
                TcpListener::bind(tls.http_listen)
                    .await
                    .map_err(|source| RunError::Listen {
                        addr: tls.http_listen,
                        source,
                    })?;
            Some((certificates, acme, server, plain))
        }
        None => None,
    };
    let grace = config.server.shutdown_grace;
    let settings = AppSettings {
        force_build: args.build,
        ..AppSettings::single_app(
            args.dir.clone(),
            config,
            crate::config::default_workers(),
            None,
        )
    };
    let metrics = Arc::new(Metrics::new());
    if let Some((certificates, _, _, _)) = &tls {
        metrics.set_certificates(Arc::clone(certificates));
    }
    // Signals are handled from here on, the build included: a SIGTERM
    // during `next build` stops it (and everything it started) and exits.
    let shutdown = Shutdown::default();
    tokio::spawn(watch_signals(shutdown.clone()));
    let app = tokio::select! {
        app = RunningApp::start(settings, metrics, Gate::AnyReady) => app?,
        _ = shutdown.graceful.cancelled() => {
            info!("stopped before the app was started");
            return Ok(());
        }
    };

    let addr = listener.local_addr().map_err(|source| RunError::Listen {
        addr: app.settings.config.server.listen,
        source,
    })?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    info!(app = %app.name, %addr, threads = shards.handles().len(), "listening on {scheme}://{addr}");
    crate::notify::ready(&format!("serving {} on {addr}", app.name));

    // The control socket (status, restart, purge, logs) beside the
    // workers' runtime directories; without it, bext serves all the same.
    let (commands, inbox) = tokio::sync::mpsc::channel(crate::platform::COMMAND_QUEUE);
    let control_path = control_dir().map(|d| d.join(format!("bext-{}.control.sock", app.name)));
    let control = match control_path
        .as_ref()
        .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))
        .and_then(|path| crate::control::serve(path, None, None, commands))
    {
        Ok((task, _)) => {
            let path = control_path.as_deref().unwrap_or(Path::new(""));
            info!(socket = %path.display(), "control socket: bextctl --socket {}", path.display());
            Some(task)
        }
        Err(e) => {
            warn!("no control socket: {e}");
            None
        }
    };
    let limits = app.settings.config.server.limits;
    let (server_tls, redirect, _watcher, acme, challenged) = match tls {
        Some((certificates, acme, server, plain)) => {
            // Unknown challenge tokens of other names get 404 only with
            // automatic certificates (with files, the app may renew its
            // own through the redirect).
            let challenged = acme.as_ref().map(|_| Arc::clone(&certificates));
            if let Some(acme) = &acme {
                acme.sync();
            }
            // A certificate replaced on disk is taken within a second.
            let watcher = crate::listener::tls::watch(certificates)
                .inspect_err(|e| warn!("the certificate files are not watched: {e}"))
                .ok();
            let plain_addr = plain
                .local_addr()
                .map_err(|source| RunError::Listen { addr, source })?;
            info!(addr = %plain_addr, "redirecting http://{plain_addr} to https://");
            (Some(server), Some(plain), watcher, acme, challenged)
        }
        None => (None, None, None, None, None),
    };
    let serving = async {
        let https = crate::listener::serve(
            listener,
            app.service(),
            limits,
            &shutdown,
            grace,
            &shards,
            server_tls,
        );
        let redirecting = async {
            let Some(plain) = redirect else {
                return Ok(true);
            };
            let to_https = Arc::new(crate::listener::redirect::ToHttps::new(
                addr.port(),
                challenged,
            ));
            crate::listener::serve(plain, to_https, limits, &shutdown, grace, &shards, None).await
        };
        let (served, redirected) = futures_util::future::join(https, redirecting).await;
        if let Err(e) = &redirected {
            error!("could not serve plain HTTP: {e}");
        }
        served
    };
    let served = tokio::select! {
        served = serving => served,
        () = crate::control::single::answer(&app, inbox), if control.is_some() => Ok(false),
    };
    if let Some(control) = control {
        control.abort();
        if let Ok(path) = &control_path {
            let _ = std::fs::remove_file(path);
        }
    }
    if let Some(acme) = &acme {
        acme.stop();
    }
    if let Err(source) = served {
        app.stop(grace, &shutdown.immediate).await;
        return Err(RunError::Listen { addr, source });
    }
    app.stop(grace, &shutdown.immediate).await;
    crate::memory::release();
    info!("bye");
    Ok(())
}

/// Where `bext run` keeps its state (automatic certificates) when
/// `[server] data_dir` is not set: `/var/lib/bext` for root (as `bext
/// serve`), else `$XDG_DATA_HOME/bext` (`~/.local/share/bext`).
pub fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/bext");
    }
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|h| h.join(".local/share"))
        })
        .unwrap_or_else(std::env::temp_dir)
        .join("bext")
}

/// SIGTERM or SIGINT starts the graceful shutdown; a second one stops
/// waiting for requests and workers (SIGKILL instead of SIGTERM).
pub async fn watch_signals(shutdown: Shutdown) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("could not install signal handlers");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!("{name}: shutting down gracefully (send it again to stop at once)");
    crate::notify::stopping();
    shutdown.graceful.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    warn!("second signal: stopping at once");
    shutdown.immediate.cancel();
}

/// Where `bext run` puts its control socket: `$XDG_RUNTIME_DIR` (the
/// user's own, made by systemd-logind or the unit's `RuntimeDirectory`),
/// else `bext-UID` in the temp dir, made private (0700) and checked to be
/// this user's: a name anyone could create first in `/tmp` would let
/// another user stand in for bext.
fn control_dir() -> std::io::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
    {
        return Ok(dir);
    }
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!("bext-{}", nix::unistd::geteuid().as_raw()));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    crate::apps::verify_private(&dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
    Ok(dir)
}
