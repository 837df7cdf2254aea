//! Command-line interface: `bext run`, `bext serve`, `bext check`, `bext dev`.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// bext: run JavaScript web apps (Next.js, Hono, Express, any Node HTTP
/// server, Deno, static sites) in production behind one supervisor.
#[derive(Debug, Parser)]
#[command(name = "bext", version, about, long_about = None)]
pub struct Cli {
    /// Log format: pretty on a terminal, JSON otherwise (auto), or forced.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto, env = "BEXT_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// Threads serving requests, each with its own event loop (default: the
    /// CPUs bext may run on).
    #[arg(long, global = true, env = "BEXT_THREADS")]
    pub threads: Option<NonZeroUsize>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Auto,
    Pretty,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Detect, install, build and serve the app in DIR (single-app mode).
    /// With REDIS_URL (or a [redis] table) the cache is shared with every
    /// instance using the same Redis (edge mode).
    Run(RunArgs),
    /// Run many apps behind one listener, routed by Host (multi-app mode).
    /// With REDIS_URL (or a [platform.redis] table) each app's cache is
    /// shared with its namesake on every instance using the same Redis.
    Serve(ServeArgs),
    /// Validate the config (and detect the app) without starting anything.
    Check(CheckArgs),
    /// Develop the app in DIR behind bext: its development server (`next
    /// dev`, a `dev` script) or its start command restarted on every
    /// change, bext.config.toml applied as you save it, and every answer
    /// saying what the cache would do with it in production.
    Dev(DevArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The app directory.
    #[arg(default_value = ".")]
    pub dir: PathBuf,

    /// Config file (default: DIR/bext.config.toml, if it exists).
    #[arg(long, short)]
    pub config: Option<PathBuf>,

    /// Listen address, overriding [server] listen (e.g. 127.0.0.1:8080; port 0 picks a free port).
    #[arg(long, short)]
    pub listen: Option<SocketAddr>,

    /// Worker processes, overriding [isolate] workers.
    #[arg(long, short)]
    pub workers: Option<NonZeroU32>,

    /// Run the app's build even if it looks built.
    #[arg(long)]
    pub build: bool,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// The app directory.
    #[arg(default_value = ".")]
    pub dir: PathBuf,

    /// Config file (default: DIR/bext.config.toml, if it exists).
    #[arg(long, short)]
    pub config: Option<PathBuf>,

    /// Listen address (default: [server] listen's port on 127.0.0.1, the
    /// address too if it names one; port 0 picks a free port).
    #[arg(long, short)]
    pub listen: Option<SocketAddr>,

    /// Use the cache for real (by default every request reaches the app,
    /// and its answer says what the cache would have done: a Cache-Status
    /// with detail=preview).
    #[arg(long)]
    pub cache: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The platform file ([platform] and [apps.NAME] tables).
    #[arg(long, short)]
    pub config: PathBuf,

    /// Listen address, overriding [platform] listen (port 443 without a [platform.tls] table means HTTPS with ACME certificates).
    #[arg(long, short)]
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The app directory (its bext.config.toml is checked).
    #[arg(default_value = ".")]
    pub dir: PathBuf,

    /// Check this config file instead: an app's bext.config.toml, or a
    /// platform file (then every app it names is checked too).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}
