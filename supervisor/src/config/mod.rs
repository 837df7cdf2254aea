//! Configuration: `bext.config.toml` for single-app mode.
//!
//! Two stages, as everywhere in bext: [`raw`] is what serde reads (every
//! table denies unknown keys), and [`Config`] is the validated result with
//! every default filled in from a named `DEFAULT_*` constant. Errors carry the
//! file, line, column and dotted key, and a suggestion for a misspelt key
//! ([`diag`]). This module reads files and nothing else: it never starts
//! anything.

mod diag;
pub mod platform;
mod raw;
mod units;

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use diag::{ConfigError, Diagnostic};
pub use raw::{Engine, Framework, PathPattern};
pub use units::{
    EnvVars, HumanDuration, MAX_CONFIG_DURATION, MemorySize, Millis, PositiveDuration,
    PositiveMillis,
};

/// The file `bext run DIR` reads from `DIR`, when it exists.
pub const CONFIG_FILE_NAME: &str = "bext.config.toml";

/// Where the supervisor listens when neither the config nor `--listen` says.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:3000";
/// How long a request may wait for a worker's response headers (→ 504).
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a request may wait for a ready worker before a 503.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to send a request's head: from accept (protocol
/// detection included) for the first, from its first byte for later ones.
pub const DEFAULT_CLIENT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection may sit idle between requests (HTTP/1.1) or with
/// no stream open (HTTP/2). Zero: no keep-alive.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(75);
/// How long a write to a client may wait for it to read.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long SIGTERM waits for in-flight requests before stopping workers.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default ISR lifetime for responses marked cacheable without one.
pub const DEFAULT_ISR_TTL: Duration = Duration::from_secs(60);
/// Default stale-while-revalidate window.
pub const DEFAULT_ISR_SWR: Duration = Duration::from_secs(3600);
/// Default bound on cached entries per app.
pub const DEFAULT_ISR_MAX_ENTRIES: u64 = 10_000;
/// Default bound on cached bytes per app (bodies and headers).
pub const DEFAULT_ISR_MAX_BYTES: MemorySize = MemorySize::from_bytes(256 << 20);
/// Responses larger than this are passed through, never stored.
pub const DEFAULT_ISR_MAX_ENTRY_BYTES: MemorySize = MemorySize::from_bytes(8 << 20);
/// How long past its lifetime an entry may stand in for a failing app.
pub const DEFAULT_ISR_STALE_IF_ERROR: Duration = Duration::from_secs(24 * 3600);
/// Environment variable holding the purge token (overrides the config).
pub const ENV_PURGE_TOKEN: &str = "BEXT_PURGE_TOKEN";
/// Largest number of workers bext starts by default for one app.
pub const DEFAULT_MAX_WORKERS: u32 = 4;
/// Requests one worker is given at once when `isolate.max_inflight` does
/// not say: each is one connection to it; more wait (up to
/// `queue_timeout`, at most `pool::MAX_WAITING` of them), then get a 503.
pub const DEFAULT_MAX_INFLIGHT: NonZeroU32 = NonZeroU32::new(512).expect("non-zero");
/// How long a worker may take from launch to listening.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);

/// The validated single-app configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this came from, if any (defaults apply without one).
    pub source: Option<PathBuf>,
    pub server: ServerConfig,
    pub isr: IsrConfig,
    pub runtime: RuntimeConfig,
    pub isolate: IsolateConfig,
    /// `[compression]`.
    pub compression: crate::compress::Settings,
    /// `[redis]` (or `REDIS_URL`, applied by `bext run`; in multi-app mode
    /// `[platform.redis]`, set by the platform): edge mode.
    pub redis: Option<RedisSettings>,
    /// `[rate_limit]`: requests per minute per client (single-app mode;
    /// the platform file's `[apps.NAME.rate_limit]` in multi-app mode).
    pub rate_limit: Option<RateLimitSettings>,
}

/// Requests per minute per client, and how IPv6 clients are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitSettings {
    pub rpm: std::num::NonZeroU32,
    pub ipv6_prefix: u8,
}

/// Edge mode: Redis as the cache's L2, shared by every instance.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` (TLS), with AUTH and database as the URL
    /// says.
    pub url: String,
    /// Put before every key and channel (then the app's name).
    pub prefix: String,
    pub write: RedisWrite,
    /// Longest one operation may take before it counts as a miss.
    pub timeout: Duration,
}

/// `redis.prefix` when not set.
pub const DEFAULT_REDIS_PREFIX: &str = "bext:";
/// `redis.timeout_ms` when not set: small, as every L1 miss may pay it.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(50);
/// The longest `redis.timeout_ms` accepted.
pub const MAX_REDIS_TIMEOUT: Duration = Duration::from_secs(10);

/// When a cache write reaches Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisWrite {
    /// Before the response is sent (bounded by the timeout): another
    /// instance finds the page as soon as the client has it.
    #[default]
    Sync,
    /// In the background.
    Async,
}

impl RedisSettings {
    /// `REDIS_URL` alone: every other setting at its default.
    pub fn from_url(url: &str) -> Result<Self, String> {
        check_redis_url(url)?;
        Ok(RedisSettings {
            url: url.to_string(),
            prefix: DEFAULT_REDIS_PREFIX.to_string(),
            write: RedisWrite::Sync,
            timeout: DEFAULT_REDIS_TIMEOUT,
        })
    }
}

/// Edge mode by the environment: `REDIS_URL`, when set and not empty, as
/// [`RedisSettings::from_url`] (a `[redis]` table wins over it).
pub fn redis_from_env() -> Result<Option<RedisSettings>, String> {
    std::env::var("REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .map(|url| RedisSettings::from_url(&url).map_err(|why| format!("REDIS_URL: {why}")))
        .transpose()
}

/// Whether `url` is a Redis URL bext can use (parsed, not connected).
pub fn check_redis_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err("must start with redis:// or rediss:// (TLS)".to_string());
    }
    redis::Client::open(url)
        .map(|_| ())
        .map_err(|e| format!("not a usable Redis URL: {e}"))
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Served at `/` without a worker hop; relative to the app directory.
    /// `None`: the app's `public/` if it exists.
    pub static_dir: Option<PathBuf>,
    pub upstream_timeout: Duration,
    pub queue_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Time bounds on client connections.
    pub limits: crate::listener::ConnLimits,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Clients allowed the full health report and the metrics.
    pub admin_networks: Vec<ipnet::IpNet>,
    pub access_log: bool,
    /// `[server.tls]`: the listener is HTTPS (boxed: every config is
    /// carried in futures, and most have no TLS).
    pub tls: Option<Box<ServerTls>>,
    /// bext's state (automatic certificates); `None`: the default for
    /// the user bext runs as (see `run::default_data_dir`).
    pub data_dir: Option<PathBuf>,
}

/// `[server.tls]` (single-app mode): the certificate, checked when the
/// file is read.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerTls {
    /// `cert` and `key`: PEM, the chain after the leaf in `cert`.
    /// Absolute (relative paths are relative to the config file). `None`:
    /// a certificate per domain, automatic (`acme`).
    pub files: Option<(PathBuf, PathBuf)>,
    /// Names the certificate must cover, or that get automatic ones
    /// (lowercase; `*.` wildcards).
    pub domains: Vec<String>,
    /// How automatic certificates are had.
    pub acme: crate::listener::acme::AcmeSettings,
    /// Plain HTTP: redirects to `https://` (308).
    pub http_listen: SocketAddr,
    /// `Strict-Transport-Security: max-age`.
    pub hsts: Option<Duration>,
}

/// `server.listen` when `[server.tls]` is set and `listen` is not.
pub const DEFAULT_TLS_LISTEN: &str = "0.0.0.0:443";
/// `server.tls.http_listen` when not set.
pub const DEFAULT_HTTP_LISTEN: &str = "0.0.0.0:80";

#[derive(Debug, Clone, PartialEq)]
pub struct IsrConfig {
    pub enabled: bool,
    /// Lifetime of responses marked cacheable (`public`) without one.
    pub default_ttl: Duration,
    /// Stale-while-revalidate window that goes with `default_ttl`.
    pub default_swr: Duration,
    /// Stale-if-error window of entries whose response names none.
    pub stale_if_error: Duration,
    pub max_entries: u64,
    pub max_bytes: MemorySize,
    pub max_entry_bytes: MemorySize,
    /// Bearer token of `POST /__bext/cache/invalidate`; `None`: endpoint off.
    pub purge_token: Option<String>,
    /// First match wins.
    pub route_rules: Vec<RouteRule>,
}

/// `[[route_rules]]`: lifetimes for a path pattern, ahead of the response's
/// own `Cache-Control`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteRule {
    pub path: PathPattern,
    pub ttl: Option<Duration>,
    pub swr: Option<Duration>,
    pub stale_if_error: Option<Duration>,
    /// `false`: never cache this path.
    pub cache: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    pub framework: Option<Framework>,
    pub engine: Option<Engine>,
    /// Replaces the detected start command.
    pub start: Option<String>,
    /// Replaces the detected build command (run with `sh -c`).
    pub build: Option<String>,
    /// The app's own environment variables, for its workers, build and
    /// hooks (on top of the few bext passes on; see `bext_worker::env`).
    pub env: EnvVars,
    /// Next.js: bext's cache handler, one Next cache for all the app's
    /// workers with in-app revalidation reaching bext's cache
    /// ([`crate::nextcache`]). `false`: each worker keeps Next's own.
    pub next_cache: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            framework: None,
            engine: None,
            start: None,
            build: None,
            env: EnvVars::default(),
            next_cache: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct IsolateConfig {
    /// `None`: not set, the mode's default applies ([`IsolateConfig::workers`]).
    pub workers: Option<NonZeroU32>,
    pub memory_limit: Option<MemorySize>,
    pub start_timeout: Duration,
    /// Requests one worker is given at once.
    pub max_inflight: NonZeroU32,
}

/// Largest config or manifest file bext reads.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Opens a file that someone else may control (in multi-app mode, an app's
/// own config, manifest or start script, read by bext with its rights):
/// only a regular file, opened without blocking, so that a FIFO, a device
/// or `/dev/zero` behind the name is refused instead of hanging or filling
/// bext's memory.
pub fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    open_regular_with(path, 0)
}

/// [`open_regular`], refusing a symlink as the last component: for a file
/// in a directory a tenant writes, read by bext (perhaps root), where a
/// link could point it at another tenant's file or at bext's own
/// `/proc/self/environ`.
pub fn open_regular_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    open_regular_with(path, libc::O_NOFOLLOW)
}

fn open_regular_with(path: &Path, flags: i32) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    // O_PATH names the file without opening it: a device's open routine
    // (a watchdog, a tape) never runs for what is not a regular file.
    // With O_NOFOLLOW it names a symlink itself, which is not one either.
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | flags)
        .open(path)?;
    if !handle.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    // The same inode, opened for reading now that it is known to be a file.
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
}

/// The text of a regular file of at most [`MAX_FILE_BYTES`] (see
/// [`open_regular`]).
pub fn read_small_file(path: &Path) -> std::io::Result<String> {
    read_small(open_regular(path)?)
}

pub(crate) fn read_small(file: std::fs::File) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "larger than 1 MiB",
        ));
    }
    Ok(text)
}

impl Config {
    /// Loads `dir/bext.config.toml` if it exists, else the defaults.
    pub fn load_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join(CONFIG_FILE_NAME);
        if path.exists() {
            Self::load_file(&path)
        } else {
            Ok(Self::from_raw(None, raw::RawConfig::default()))
        }
    }

    /// Loads and validates one file.
    pub fn load_file(path: &Path) -> Result<Self, ConfigError> {
        let text = read_small_file(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// [`Config::load_dir`] for a tenant's directory (multi-app mode): a
    /// `bext.config.toml` that is a symlink is refused, and so is a
    /// `[server.tls]` table (certificates are the platform's, and bext
    /// never opens a file a tenant names).
    pub fn load_tenant_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join(CONFIG_FILE_NAME);
        if std::fs::symlink_metadata(&path).is_err() {
            return Ok(Self::from_raw(None, raw::RawConfig::default()));
        }
        let text = open_regular_nofollow(&path)
            .and_then(read_small)
            .map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
        let raw: raw::RawConfig = diag::deserialize(&path, &text)?;
        if let Some(limit) = &raw.rate_limit {
            return Err(ConfigError::Invalid(Box::new(Diagnostic::at(
                &path,
                &text,
                limit.span().start,
                Some("rate_limit".to_string()),
                "in multi-app mode an app's rate limit is set in the platform file: [apps.NAME.rate_limit]".to_string(),
            ))));
        }
        if let Some(redis) = &raw.redis {
            return Err(ConfigError::Invalid(Box::new(Diagnostic::at(
                &path,
                &text,
                redis.span().start,
                Some("redis".to_string()),
                "in multi-app mode Redis is the platform's to set, not an app's".to_string(),
            ))));
        }
        if let Some(tls) = raw.server.as_ref().and_then(|s| s.tls.as_ref()) {
            return Err(ConfigError::Invalid(Box::new(Diagnostic::at(
                &path,
                &text,
                tls.span().start,
                Some("server.tls".to_string()),
                "in multi-app mode an app's certificate is set in the platform file: [apps.NAME.tls]".to_string(),
            ))));
        }
        Ok(Self::from_raw(Some(path.to_path_buf()), raw))
    }

    /// Parses `text` as if read from `path` (used in error messages).
    /// `[server.tls]` files are read and checked here.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: raw::RawConfig = diag::deserialize(path, text)?;
        let tls = match raw.server.as_ref().and_then(|s| s.tls.as_ref()) {
            Some(tls) => Some(Box::new(server_tls(path, text, tls, &raw)?)),
            None => None,
        };
        let redis = match &raw.redis {
            Some(table) => Some(redis_settings("redis", table, &|offset, key, message| {
                ConfigError::Invalid(Box::new(Diagnostic::at(
                    path,
                    text,
                    offset,
                    Some(key),
                    message,
                )))
            })?),
            None => None,
        };
        let rate_limit = match &raw.rate_limit {
            Some(table) => rate_limit_settings(path, text, table)?,
            None => None,
        };
        let mut config = Self::from_raw(Some(path.to_path_buf()), raw);
        config.server.tls = tls;
        config.redis = redis;
        config.rate_limit = rate_limit;
        Ok(config)
    }

    fn from_raw(source: Option<PathBuf>, mut raw: raw::RawConfig) -> Self {
        // (Checked, with positions, by `parse`.)
        raw.redis = None;
        raw.rate_limit = None;
        let server = raw.server.unwrap_or_default();
        let isr = raw.cache.unwrap_or_default().isr.unwrap_or_default();
        let runtime = raw.runtime.unwrap_or_default();
        let isolate = raw.isolate.unwrap_or_default();
        let compression = raw.compression.unwrap_or_default().settings();
        let ms = |m: Millis| m.0;
        let base = source
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf);
        Config {
            source,
            server: ServerConfig {
                listen: server.listen.unwrap_or_else(|| {
                    if server.tls.is_some() {
                        DEFAULT_TLS_LISTEN.parse().expect("valid default")
                    } else {
                        default_listen()
                    }
                }),
                static_dir: server.static_dir,
                upstream_timeout: server
                    .upstream_timeout_ms
                    .map_or(DEFAULT_UPSTREAM_TIMEOUT, ms),
                queue_timeout: server.queue_timeout_ms.map_or(DEFAULT_QUEUE_TIMEOUT, ms),
                shutdown_grace: server.shutdown_grace_ms.map_or(DEFAULT_SHUTDOWN_GRACE, ms),
                limits: crate::listener::ConnLimits {
                    client_header_timeout: server
                        .client_header_timeout_ms
                        .map_or(DEFAULT_CLIENT_HEADER_TIMEOUT, |m| m.0),
                    keepalive_timeout: server
                        .keepalive_timeout_ms
                        .map_or(DEFAULT_KEEPALIVE_TIMEOUT, ms),
                    send_timeout: server.send_timeout_ms.map_or(DEFAULT_SEND_TIMEOUT, |m| m.0),
                },
                trusted_proxies: server.trusted_proxies.unwrap_or_default(),
                admin_networks: server.admin_networks.unwrap_or_else(loopback),
                access_log: server.access_log.unwrap_or(true),
                tls: None,
                // Relative to the config file, like the certificate paths.
                data_dir: server.data_dir.map(|d| match &base {
                    Some(base) if d.is_relative() => base.join(d),
                    _ => d,
                }),
            },
            isr: IsrConfig {
                enabled: isr.enabled.unwrap_or(true),
                default_ttl: isr.default_ttl_ms.map_or(DEFAULT_ISR_TTL, ms),
                default_swr: isr.default_swr_ms.map_or(DEFAULT_ISR_SWR, ms),
                stale_if_error: isr.stale_if_error_ms.map_or(DEFAULT_ISR_STALE_IF_ERROR, ms),
                max_bytes: isr.max_bytes.unwrap_or(DEFAULT_ISR_MAX_BYTES),
                max_entry_bytes: isr.max_entry_bytes.unwrap_or(DEFAULT_ISR_MAX_ENTRY_BYTES),
                purge_token: isr.purge_token.filter(|t| !t.is_empty()),
                route_rules: raw
                    .route_rules
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| RouteRule {
                        path: r.path,
                        ttl: r.ttl_ms.map(ms),
                        swr: r.swr_ms.map(ms),
                        stale_if_error: r.stale_if_error_ms.map(ms),
                        cache: r.cache.unwrap_or(true),
                    })
                    .collect(),
                max_entries: isr
                    .max_entries
                    .map_or(DEFAULT_ISR_MAX_ENTRIES, NonZeroU64::get),
            },
            runtime: RuntimeConfig {
                framework: runtime.framework,
                engine: runtime.engine,
                start: runtime.start,
                build: runtime.build,
                env: runtime.env.unwrap_or_default(),
                next_cache: runtime.next_cache.unwrap_or(true),
            },
            isolate: IsolateConfig {
                workers: isolate.workers,
                memory_limit: isolate.memory_limit,
                start_timeout: isolate.start_timeout_ms.map_or(DEFAULT_START_TIMEOUT, ms),
                max_inflight: isolate.max_inflight.unwrap_or(DEFAULT_MAX_INFLIGHT),
            },
            compression,
            redis: None,
            rate_limit: None,
        }
    }
}

impl IsolateConfig {
    /// Worker processes: as set, else `default`.
    pub fn workers_or(&self, default: NonZeroU32) -> NonZeroU32 {
        self.workers.unwrap_or(default)
    }
}

/// `[rate_limit]` checked (`None` without `rpm`: no limit).
fn rate_limit_settings(
    path: &Path,
    text: &str,
    table: &toml::Spanned<raw::RawRateLimit>,
) -> Result<Option<RateLimitSettings>, ConfigError> {
    let raw = table.get_ref();
    let ipv6_prefix = match &raw.ipv6_prefix {
        Some(prefix) if !(1..=128).contains(prefix.get_ref()) => {
            return Err(ConfigError::Invalid(Box::new(Diagnostic::at(
                path,
                text,
                prefix.span().start,
                Some("rate_limit.ipv6_prefix".to_string()),
                "a prefix length of 1 to 128 bits".to_string(),
            ))));
        }
        Some(prefix) => *prefix.get_ref(),
        None => crate::ratelimit::DEFAULT_IPV6_PREFIX,
    };
    Ok(raw.rpm.map(|rpm| RateLimitSettings { rpm, ipv6_prefix }))
}

/// `[redis]` (or `[platform.redis]`: keys named under `prefix`) checked:
/// a usable URL (required), a prefix without spaces, a timeout of at most
/// [`MAX_REDIS_TIMEOUT`].
fn redis_settings(
    key_prefix: &str,
    table: &toml::Spanned<raw::RawRedis>,
    invalid: &dyn Fn(usize, String, String) -> ConfigError,
) -> Result<RedisSettings, ConfigError> {
    let invalid = |offset: usize, key: &str, message: String| {
        invalid(offset, format!("{key_prefix}.{key}"), message)
    };
    let raw = table.get_ref();
    let Some(url) = &raw.url else {
        return Err(invalid(
            table.span().start,
            "url",
            format!(
                "missing: the Redis server (redis://host:6379, rediss:// for TLS; or set REDIS_URL and leave [{key_prefix}] out)"
            ),
        ));
    };
    check_redis_url(url.get_ref()).map_err(|why| invalid(url.span().start, "url", why))?;
    let prefix = match &raw.prefix {
        Some(prefix) => {
            let p = prefix.get_ref();
            if p.is_empty()
                || p.len() > 64
                || p.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(invalid(
                    prefix.span().start,
                    "prefix",
                    "1 to 64 characters, no spaces or control characters".to_string(),
                ));
            }
            p.clone()
        }
        None => DEFAULT_REDIS_PREFIX.to_string(),
    };
    let timeout = raw
        .timeout_ms
        .as_ref()
        .map_or(DEFAULT_REDIS_TIMEOUT, |t| t.0);
    if timeout > MAX_REDIS_TIMEOUT {
        return Err(invalid(
            table.span().start,
            "timeout_ms",
            format!(
                "at most {} ms: every cache miss may wait this long for Redis",
                MAX_REDIS_TIMEOUT.as_millis()
            ),
        ));
    }
    Ok(RedisSettings {
        url: url.get_ref().clone(),
        prefix,
        write: raw.write.unwrap_or_default(),
        timeout,
    })
}

/// Reads and checks `[server.tls]`: the pair loads and matches, covers
/// every domain, and plain HTTP has an address of its own.
fn server_tls(
    path: &Path,
    text: &str,
    tls: &toml::Spanned<raw::RawServerTls>,
    raw: &raw::RawConfig,
) -> Result<ServerTls, ConfigError> {
    let invalid = |offset: usize, key: String, message: String| {
        ConfigError::Invalid(Box::new(Diagnostic::at(
            path,
            text,
            offset,
            Some(key),
            message,
        )))
    };
    let table = tls.get_ref();
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let absolute = |p: &PathBuf| {
        if p.is_absolute() {
            p.clone()
        } else {
            base.join(p)
        }
    };
    let acme = platform::acme_settings(
        &platform::AcmeKeys {
            prefix: "server.tls",
            issuer: table.issuer,
            email: table.acme_email.as_ref(),
            directory: table.acme_directory.as_ref(),
            ca_root: table.acme_ca_root.as_ref(),
            challenges: table.acme_challenges.as_ref(),
        },
        &base,
        &invalid,
    )?;
    let files = match (&table.cert, &table.key) {
        (Some(cert_at), Some(key_at)) => {
            let (cert, key) = (absolute(cert_at.get_ref()), absolute(key_at.get_ref()));
            let pair = crate::listener::tls::load_pair(&cert, &key)
                .map_err(|why| invalid(cert_at.span().start, "server.tls.cert".to_string(), why))?;
            Some((cert, key, pair))
        }
        (None, None) => None,
        (Some(one), None) | (None, Some(one)) => {
            let missing = if table.key.is_none() { "key" } else { "cert" };
            return Err(invalid(
                one.span().start,
                format!("server.tls.{missing}"),
                "give both cert and key, or neither for automatic certificates (per domain)"
                    .to_string(),
            ));
        }
    };
    // Keys for automatic certificates beside cert and key would do
    // nothing: say so rather than ignore them.
    if files.is_some() {
        let unused = [
            (
                "acme_email",
                table.acme_email.as_ref().map(|s| s.span().start),
            ),
            (
                "acme_directory",
                table.acme_directory.as_ref().map(|s| s.span().start),
            ),
            (
                "acme_ca_root",
                table.acme_ca_root.as_ref().map(|s| s.span().start),
            ),
            (
                "acme_challenges",
                table.acme_challenges.as_ref().map(|s| s.span().start),
            ),
        ];
        if let Some((key, at)) = unused.iter().find_map(|(k, at)| at.map(|at| (k, at))) {
            return Err(invalid(
                at,
                format!("server.tls.{key}"),
                "has no effect with cert and key (it is for automatic certificates): remove one or the other".to_string(),
            ));
        }
        if table.issuer.is_some() {
            return Err(invalid(
                tls.span().start,
                "server.tls.issuer".to_string(),
                "has no effect with cert and key (it is for automatic certificates): remove one or the other".to_string(),
            ));
        }
    }
    let mut domains = Vec::new();
    for (i, domain) in table.domains.iter().enumerate() {
        let key = format!("server.tls.domains[{i}]");
        let name = platform::normalize_domain(domain.get_ref())
            .map_err(|why| invalid(domain.span().start, key.clone(), why))?;
        match &files {
            Some((cert, _, pair)) if !crate::listener::tls::covers(pair, &name) => {
                return Err(invalid(
                    domain.span().start,
                    key,
                    format!(
                        "the certificate of server.tls.cert ({}) does not cover `{name}`",
                        cert.display()
                    ),
                ));
            }
            None if acme.issuer == crate::listener::acme::Issuer::Acme => {
                if let Some(why) = crate::listener::acme::unusable(&name) {
                    return Err(invalid(
                        domain.span().start,
                        key,
                        format!("{why} (server.tls cert and key)"),
                    ));
                }
            }
            _ => {}
        }
        domains.push(name);
    }
    if files.is_none() && domains.is_empty() {
        return Err(invalid(
            tls.span().start,
            "server.tls.domains".to_string(),
            "name the domains to get certificates for (automatic), or give cert and key"
                .to_string(),
        ));
    }
    let http_listen = table
        .http_listen
        .as_ref()
        .map(|a| *a.get_ref())
        .unwrap_or_else(|| DEFAULT_HTTP_LISTEN.parse().expect("valid default"));
    let listen = raw
        .server
        .as_ref()
        .and_then(|s| s.listen)
        .unwrap_or_else(|| DEFAULT_TLS_LISTEN.parse().expect("valid default"));
    if http_listen == listen && listen.port() != 0 {
        let at = table
            .http_listen
            .as_ref()
            .map_or(tls.span().start, |a| a.span().start);
        return Err(invalid(
            at,
            "server.tls.http_listen".to_string(),
            format!(
                "plain HTTP and HTTPS cannot share {listen}: set server.listen (HTTPS, usually port 443) and server.tls.http_listen (usually port 80) apart"
            ),
        ));
    }
    Ok(ServerTls {
        files: files.map(|(cert, key, _)| (cert, key)),
        domains,
        acme,
        http_listen,
        hsts: table.hsts.map(|d| d.0).filter(|d| !d.is_zero()),
    })
}

/// The default `admin_networks`: this host only.
pub fn loopback() -> Vec<ipnet::IpNet> {
    ["127.0.0.0/8", "::1/128"]
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect()
}

pub(crate) fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN
        .parse()
        .expect("DEFAULT_LISTEN is a valid address")
}

/// The number of CPUs, at most [`DEFAULT_MAX_WORKERS`].
pub fn default_workers() -> NonZeroU32 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    NonZeroU32::new((cpus as u32).clamp(1, DEFAULT_MAX_WORKERS)).expect("clamped to at least 1")
}

#[cfg(test)]
mod tests;
