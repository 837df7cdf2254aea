//! `bext run`: the single-app lifecycle as one explicit sequence —
//! config → detect → install/build → workers → listen → serve → drain →
//! stop workers — with every way it can fail in [`RunError`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::admin::Admin;
use crate::app::{self, App, BuildError, DetectError, StartError};
use crate::cache::{Fill, IsrCache};
use crate::cli::RunArgs;
use crate::config::{Config, ConfigError, ENV_PURGE_TOKEN};
use crate::listener::Shutdown;
use crate::metrics::Metrics;
use crate::pool::{self, DEFAULT_STOP_TIMEOUT, LaunchPlan, PlanError, PoolConfig, PoolHandle};
use crate::proxy::Proxy;
use crate::server::AppService;
use crate::statics::StaticFiles;

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

pub async fn run(args: RunArgs) -> Result<(), RunError> {
    let mut config = load_config(&args.dir, args.config.as_deref())?;
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(workers) = args.workers {
        config.isolate.workers = workers;
    }

    let app = app::detect(&args.dir, &config)?;
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
    app::prepare(&app, args.build).await?;

    let mounts = app.mounts();
    for mount in &mounts {
        info!(app = %app.name, "serving {} at {}", mount.root.display(), mount.prefix);
    }
    let statics = StaticFiles::open(&mounts).map_err(|source| RunError::Static {
        dir: app.dir.clone(),
        source,
    })?;

    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: config.server.listen,
            source,
        })?;

    let (pool, runtime_dir) = match app.engine {
        Some(_) => {
            let runtime_dir = RuntimeDir::create(&app)?;
            let adapters = bext_worker::adapter::install(runtime_dir.path()).map_err(|source| {
                RunError::RuntimeDir {
                    dir: runtime_dir.path().to_path_buf(),
                    source,
                }
            })?;
            let plan = LaunchPlan::new(
                &app.start()?,
                &app.dir,
                adapters,
                config.isolate.memory_limit,
            )?;
            let handle = pool::start(PoolConfig {
                app: app.name.clone(),
                workers: config.isolate.workers.get() as usize,
                plan,
                runtime_dir: runtime_dir.path().to_path_buf(),
                memory_limit: config.isolate.memory_limit,
                start_timeout: config.isolate.start_timeout,
                stop_timeout: DEFAULT_STOP_TIMEOUT,
                drain_timeout: config.server.shutdown_grace,
            });
            let ready = handle.wait_ready(config.isolate.start_timeout).await;
            if ready == 0 {
                error!(app = %app.name, "no worker is ready yet; requests get 503 until one is (restarts continue)");
            } else {
                info!(app = %app.name, ready, "workers ready");
            }
            (Some(handle), Some(runtime_dir))
        }
        None => (None, None),
    };

    let service = Arc::new(app_service(&app, &config, statics, pool.as_ref()));

    let addr = listener.local_addr().map_err(|source| RunError::Listen {
        addr: config.server.listen,
        source,
    })?;
    info!(app = %app.name, %addr, "listening on http://{addr}");

    let shutdown = Shutdown::default();
    tokio::spawn(watch_signals(shutdown.clone()));
    crate::listener::serve(listener, service, &shutdown, config.server.shutdown_grace).await;

    if let Some(pool) = pool {
        info!(app = %app.name, "stopping workers");
        pool.stop(&shutdown.immediate).await;
    }
    drop(runtime_dir);
    info!("bye");
    Ok(())
}

/// Puts the request path together: endpoints, static files, cache, proxy.
fn app_service(
    app: &App,
    config: &Config,
    statics: StaticFiles,
    pool: Option<&PoolHandle>,
) -> AppService {
    let pool = pool.map(|h| Arc::clone(&h.pool));
    let fill = pool.as_ref().map(|pool| {
        Arc::new(Proxy::new(
            Arc::clone(pool),
            config.server.upstream_timeout,
            config.server.queue_timeout,
        )) as Arc<dyn Fill>
    });
    // A static site has nothing to cache: its files are served from disk.
    let cache = (config.isr.enabled && fill.is_some()).then(|| {
        Arc::new(IsrCache::in_memory(
            config.isr.clone(),
            config.server.upstream_timeout,
        ))
    });
    let metrics = Arc::new(Metrics::new(pool.clone(), cache.clone()));
    let purge_token = std::env::var(ENV_PURGE_TOKEN)
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| config.isr.purge_token.clone());
    AppService {
        admin: Admin {
            app: app.name.clone(),
            framework: app.framework.to_string(),
            pool,
            cache: cache.clone(),
            metrics: Arc::clone(&metrics),
            purge_token,
        },
        statics,
        fill,
        cache,
        metrics,
        access_log: config.server.access_log,
    }
}

/// SIGTERM or SIGINT starts the graceful shutdown; a second one stops
/// waiting for requests and workers (SIGKILL instead of SIGTERM).
async fn watch_signals(shutdown: Shutdown) {
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
    shutdown.graceful.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    warn!("second signal: stopping at once");
    shutdown.immediate.cancel();
}

/// The supervisor's private directory for one app's sockets and adapters,
/// removed when dropped.
#[derive(Debug)]
struct RuntimeDir(PathBuf);

impl RuntimeDir {
    fn create(app: &App) -> Result<Self, RunError> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let name: String = app
            .name
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
        let dir = base.join(format!("bext-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|source| RunError::RuntimeDir {
                dir: dir.clone(),
                source,
            })?;
        Ok(RuntimeDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
