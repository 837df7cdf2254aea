//! `platform.toml`: multi-app mode (`bext serve --config platform.toml`).
//!
//! ```toml
//! [platform]
//! listen = "0.0.0.0:443"
//! data_dir = "/var/lib/bext"
//! max_apps = 50
//!
//! [apps.marketing]
//! source = "/srv/marketing"
//! domains = ["example.com", "www.example.com"]
//! runtime = "nextjs"
//! [apps.marketing.cache]
//! default_ttl = "60s"
//! ```
//!
//! Each app's own `bext.config.toml` in its `source` still applies; the
//! app's table here overrides it. Errors carry file, line, column and key,
//! like every config error in bext; cross-key mistakes (two apps claiming a
//! domain, too many apps, an unknown default app) point at the value that
//! broke the rule.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::diag::{self, ConfigError, Diagnostic};
use super::units::{EnvVars, HumanDuration, PositiveDuration};
use super::{Config, Framework, MemorySize};

/// Where multi-app mode listens when the file does not say.
pub const DEFAULT_PLATFORM_LISTEN: &str = "0.0.0.0:80";
/// `platform.listen` when not set and `[platform.tls]` is.
pub const DEFAULT_PLATFORM_TLS_LISTEN: &str = "0.0.0.0:443";
/// Where multi-app mode keeps its state when the file does not say.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/bext";
/// How many apps one platform may run when the file does not say.
pub const DEFAULT_MAX_APPS: u32 = 50;
/// How long a hook may run.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(300);
/// Workers per app in multi-app mode when neither file says: many apps
/// share one host.
pub const DEFAULT_PLATFORM_WORKERS: u32 = 1;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlatformFile {
    platform: Option<RawPlatform>,
    apps: Option<BTreeMap<String, RawApp>>,
    /// Refused with a pointer to `[platform.redis]` (as a single-app file
    /// spells it).
    redis: Option<Spanned<toml::Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlatform {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    max_apps: Option<Spanned<NonZeroU32>>,
    default_app: Option<Spanned<String>>,
    trusted_proxies: Option<Vec<ipnet::IpNet>>,
    admin_networks: Option<Vec<ipnet::IpNet>>,
    shutdown_grace: Option<HumanDuration>,
    client_header_timeout: Option<PositiveDuration>,
    keepalive_timeout: Option<HumanDuration>,
    send_timeout: Option<PositiveDuration>,
    control_group: Option<Spanned<String>>,
    control: Option<Spanned<RawControl>>,
    tls: Option<Spanned<RawPlatformTls>>,
    compression: Option<super::raw::RawCompression>,
    redis: Option<Spanned<super::raw::RawRedis>>,
}

/// The ACME keys of `[platform.tls]` or `[server.tls]`, named under
/// `prefix` in errors.
pub(super) struct AcmeKeys<'a> {
    pub(super) prefix: &'static str,
    pub(super) issuer: Option<crate::listener::acme::Issuer>,
    pub(super) email: Option<&'a Spanned<String>>,
    pub(super) directory: Option<&'a Spanned<String>>,
    pub(super) ca_root: Option<&'a Spanned<PathBuf>>,
    pub(super) challenges: Option<&'a Spanned<Vec<crate::listener::acme::ChallengeKind>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlatformTls {
    http_listen: Option<SocketAddr>,
    issuer: Option<crate::listener::acme::Issuer>,
    acme_email: Option<Spanned<String>>,
    acme_directory: Option<Spanned<String>>,
    acme_ca_root: Option<Spanned<PathBuf>>,
    acme_challenges: Option<Spanned<Vec<crate::listener::acme::ChallengeKind>>>,
}

/// `[platform.control]`: the control service on TCP too.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    listen: Option<Spanned<SocketAddr>>,
    cert: Option<Spanned<PathBuf>>,
    key: Option<Spanned<PathBuf>>,
    client_ca: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAppTls {
    cert: Spanned<PathBuf>,
    key: Spanned<PathBuf>,
    hsts: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    source: Spanned<PathBuf>,
    #[serde(default)]
    domains: Vec<Spanned<String>>,
    runtime: Option<Framework>,
    cache: Option<RawAppCache>,
    rate_limit: Option<RawRateLimit>,
    isolate: Option<RawAppIsolate>,
    deploy: Option<RawDeploy>,
    hooks: Option<RawHooks>,
    env: Option<EnvVars>,
    user: Option<Spanned<String>>,
    tls: Option<Spanned<RawAppTls>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAppCache {
    enabled: Option<bool>,
    default_ttl: Option<HumanDuration>,
    default_swr: Option<HumanDuration>,
    stale_if_error: Option<HumanDuration>,
    max_entries: Option<NonZeroU64>,
    max_bytes: Option<MemorySize>,
    max_entry_bytes: Option<MemorySize>,
    purge_token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    rpm: Option<NonZeroU32>,
    ipv6_prefix: Option<Spanned<u8>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAppIsolate {
    workers: Option<NonZeroU32>,
    memory_limit: Option<MemorySize>,
    start_timeout: Option<HumanDuration>,
    max_inflight: Option<NonZeroU32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeploy {
    keep_versions: Option<NonZeroU32>,
    health_path: Option<Spanned<String>>,
    health_timeout: Option<PositiveDuration>,
    build_timeout: Option<PositiveDuration>,
    purge_cache: Option<bool>,
    drain_timeout: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    pre_build: Option<String>,
    post_deploy: Option<String>,
    timeout: Option<HumanDuration>,
}

/// The validated platform.
#[derive(Debug, Clone, PartialEq)]
pub struct PlatformConfig {
    pub source: PathBuf,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub max_apps: u32,
    /// The app for hosts no domain matches (else: 404).
    pub default_app: Option<String>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Peers allowed on `/__bext/platform/*`.
    pub admin_networks: Vec<ipnet::IpNet>,
    pub shutdown_grace: Option<Duration>,
    /// Time bounds on client connections (read at start).
    pub limits: crate::listener::ConnLimits,
    /// In file order (sorted by name).
    pub apps: Vec<AppEntry>,
    /// `control_group`: its members may use the control socket (name, gid).
    pub control_group: Option<(String, u32)>,
    /// `[platform.control]`: the control service on TCP, mutual TLS only.
    pub remote_control: Option<RemoteControl>,
    /// `[platform.tls]`: the listener is HTTPS.
    pub tls: Option<PlatformTls>,
    /// `[platform.redis]` (else `REDIS_URL`, applied by `bext serve`):
    /// edge mode for every app, each under its own name.
    pub redis: Option<super::RedisSettings>,
    /// `[platform.compression]`: every app's levels; an app's own file may
    /// turn compression off or raise its minimum size.
    pub compression: crate::compress::Settings,
}

/// `[platform.tls]` (or its defaults when `listen` is on port 443).
#[derive(Debug, Clone, PartialEq)]
pub struct PlatformTls {
    /// Plain HTTP: redirects to `https://` (308), answers ACME HTTP-01.
    pub http_listen: SocketAddr,
    /// How apps without `[apps.NAME.tls]` get their certificates.
    pub acme: crate::listener::acme::AcmeSettings,
}

/// `[platform.control]`: the control service (what `bextctl` uses) on a
/// TCP address too, for managing the host from elsewhere. Only with mutual
/// TLS: the server's certificate, and the CA whose client certificates are
/// let in (absolute paths; read at every new connection, so replaced files
/// apply without a restart).
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteControl {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// `platform.tls.http_listen` when not set.
pub const DEFAULT_HTTP_LISTEN: &str = "0.0.0.0:80";

/// `[apps.NAME.tls]`: the app's certificate (PEM; the chain after the
/// leaf in `cert`), absolute paths.
#[derive(Debug, Clone, PartialEq)]
pub struct AppTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `Strict-Transport-Security: max-age` of the app's HTTPS answers.
    pub hsts: Option<Duration>,
}

/// One `[apps.NAME]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct AppEntry {
    pub name: String,
    /// Absolute (relative paths are relative to platform.toml's directory).
    pub source: PathBuf,
    /// Lowercase; `*.` prefix for wildcards.
    pub domains: Vec<String>,
    pub runtime: Option<Framework>,
    pub cache: AppCacheOverrides,
    /// Requests per minute per client IP; `None`: no limit.
    pub rate_limit_rpm: Option<NonZeroU32>,
    /// IPv6 clients are keyed by this prefix length (1–128).
    pub rate_limit_ipv6_prefix: u8,
    pub workers: Option<NonZeroU32>,
    pub memory_limit: Option<MemorySize>,
    pub start_timeout: Option<Duration>,
    pub max_inflight: Option<NonZeroU32>,
    pub deploy: DeploySettings,
    pub hooks: Hooks,
    /// `[apps.NAME.env]`: on top of the app's own `[runtime] env`.
    pub env: EnvVars,
    /// `apps.NAME.user`: the app's processes run as this user.
    pub user: Option<AppUser>,
    /// `[apps.NAME.tls]`.
    pub tls: Option<AppTls>,
    /// The platform's `[platform.compression]`.
    pub compression: crate::compress::Settings,
}

/// A system user an app's processes run as (bext must run as root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl AppUser {
    /// Looks `name` up in the system's user database.
    pub fn lookup(name: &str) -> Result<Self, String> {
        match nix::unistd::User::from_name(name) {
            Ok(Some(user)) => Ok(AppUser {
                name: user.name,
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
                home: user.dir,
            }),
            Ok(None) => Err(format!("no user is named `{name}` on this host")),
            Err(e) => Err(format!("could not look up user `{name}`: {e}")),
        }
    }
}

/// `[apps.NAME.cache]`: overrides of the app's `[cache.isr]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppCacheOverrides {
    pub enabled: Option<bool>,
    pub default_ttl: Option<Duration>,
    pub default_swr: Option<Duration>,
    pub stale_if_error: Option<Duration>,
    pub max_entries: Option<u64>,
    pub max_bytes: Option<MemorySize>,
    pub max_entry_bytes: Option<MemorySize>,
    pub purge_token: Option<String>,
}

/// `[apps.NAME.deploy]`: how versions of the app go live.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploySettings {
    /// Previous versions kept for rollbacks (besides the active one).
    pub keep_versions: usize,
    /// Asked of every new worker before the switch; 2xx/3xx passes.
    pub health_path: Option<String>,
    /// How long new workers have to pass `health_path`.
    pub health_timeout: Duration,
    /// How long the old workers' requests, WebSockets and streams get
    /// after a switch (`None`: the platform's shutdown grace).
    pub drain_timeout: Option<Duration>,
    /// Installs and builds (first start and deploys) are killed after it.
    pub build_timeout: Duration,
    /// A new generation starts with an empty cache (else it takes over the
    /// old one's entries).
    pub purge_cache: bool,
}

/// Previous versions kept when `deploy.keep_versions` is not set.
pub const DEFAULT_KEEP_VERSIONS: usize = 3;
/// `deploy.build_timeout` when not set.
pub const DEFAULT_BUILD_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// `deploy.health_timeout` when not set.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// `[apps.NAME.hooks]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Hooks {
    /// Run (`sh -c`, cwd = the app's source) before the app's build.
    pub pre_build: Option<String>,
    /// Run once the app serves.
    pub post_deploy: Option<String>,
    pub timeout: Duration,
}

impl PlatformConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_listening(path, None)
    }

    /// Edge mode by the environment: `REDIS_URL` when the file has no
    /// `[platform.redis]`.
    pub fn with_env_redis(mut self) -> Result<Self, String> {
        if self.redis.is_none() {
            self.redis = super::redis_from_env()?;
        }
        Ok(self)
    }

    /// Loads the file as served with `bext serve --listen ADDR`: the
    /// address replaces `platform.listen` before anything depends on it
    /// (port 443 implies HTTPS only when bext really listens there).
    pub fn load_listening(path: &Path, listen: Option<SocketAddr>) -> Result<Self, ConfigError> {
        let text = super::read_small_file(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_listening(path, &text, listen)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        Self::parse_listening(path, text, None)
    }

    pub fn parse_listening(
        path: &Path,
        text: &str,
        listen: Option<SocketAddr>,
    ) -> Result<Self, ConfigError> {
        Self::parse_checking(path, text, listen, true)
    }

    /// Loads the file for a reload (SIGHUP): as [`Self::load_listening`],
    /// but `[platform.control]`'s files are not read. That table applies
    /// only at a restart, and its files may be mid-rotation: that must not
    /// refuse the reload of everything else.
    pub fn load_for_reload(path: &Path, listen: Option<SocketAddr>) -> Result<Self, ConfigError> {
        let text = super::read_small_file(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_checking(path, &text, listen, false)
    }

    fn parse_checking(
        path: &Path,
        text: &str,
        listen: Option<SocketAddr>,
        control_files: bool,
    ) -> Result<Self, ConfigError> {
        let mut raw: RawPlatformFile = diag::deserialize(path, text)?;
        if let Some(listen) = listen {
            raw.platform.get_or_insert_with(Default::default).listen = Some(listen);
        }
        let invalid = |offset: usize, key: String, message: String| {
            ConfigError::Invalid(Box::new(Diagnostic::at(
                path,
                text,
                offset,
                Some(key),
                message,
            )))
        };
        let raw_redis = raw.redis;
        let platform = raw.platform.unwrap_or_default();
        // The listener is HTTPS with a [platform.tls] table, or on port 443.
        let https = platform.tls.is_some() || platform.listen.is_some_and(|l| l.port() == 443);
        // Certificates from bext's own CA: any name will do.
        let internal = platform
            .tls
            .as_ref()
            .is_some_and(|t| t.get_ref().issuer == Some(crate::listener::acme::Issuer::Internal));
        let compression = platform
            .compression
            .as_ref()
            .map(super::raw::RawCompression::settings)
            .unwrap_or_default();
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let max_apps = platform
            .max_apps
            .as_ref()
            .map_or(DEFAULT_MAX_APPS, |m| m.get_ref().get());

        let mut apps = Vec::new();
        let mut claimed: HashMap<String, String> = HashMap::new();
        for (name, app) in raw.apps.unwrap_or_default() {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(invalid(
                    app.source.span().start,
                    format!("apps.{name}"),
                    "an app name may use only letters, digits, `-` and `_`".to_string(),
                ));
            }
            if apps.len() as u32 >= max_apps {
                return Err(invalid(
                    app.source.span().start,
                    format!("apps.{name}"),
                    format!("more apps than [platform] max_apps = {max_apps} allows"),
                ));
            }
            let mut domains = Vec::new();
            for (i, domain) in app.domains.iter().enumerate() {
                let key = format!("apps.{name}.domains[{i}]");
                let normalized = normalize_domain(domain.get_ref())
                    .map_err(|why| invalid(domain.span().start, key.clone(), why))?;
                if let Some(other) = claimed.insert(normalized.clone(), name.clone()) {
                    let message = if other == name {
                        format!("domain `{normalized}` is listed twice")
                    } else {
                        format!(
                            "domain `{normalized}` is claimed by both apps `{other}` and `{name}`"
                        )
                    };
                    return Err(invalid(domain.span().start, key, message));
                }
                domains.push(normalized);
            }
            let source = app.source.into_inner();
            let source = if source.is_absolute() {
                source
            } else {
                base.join(source)
            };
            let mut deploy = app.deploy.unwrap_or_default();
            let health_path = match deploy.health_path.take() {
                Some(p) if !p.get_ref().starts_with('/') || p.get_ref().len() > 1024 => {
                    return Err(invalid(
                        p.span().start,
                        format!("apps.{name}.deploy.health_path"),
                        "a health path starts with `/` (at most 1024 bytes)".to_string(),
                    ));
                }
                Some(p) => Some(p.into_inner()),
                None => None,
            };
            let rate_limit = app.rate_limit.unwrap_or_default();
            let ipv6_prefix = match &rate_limit.ipv6_prefix {
                Some(p) if !(1..=128).contains(p.get_ref()) => {
                    return Err(invalid(
                        p.span().start,
                        format!("apps.{name}.rate_limit.ipv6_prefix"),
                        "an IPv6 prefix length is 1 to 128".to_string(),
                    ));
                }
                Some(p) => *p.get_ref(),
                None => crate::ratelimit::DEFAULT_IPV6_PREFIX,
            };
            let user =
                match &app.user {
                    Some(user) => Some(AppUser::lookup(user.get_ref()).map_err(|why| {
                        invalid(user.span().start, format!("apps.{name}.user"), why)
                    })?),
                    None => None,
                };
            let absolute = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
            let tls = match &app.tls {
                Some(raw) if !https => {
                    return Err(invalid(
                        raw.span().start,
                        format!("apps.{name}.tls"),
                        "a certificate needs an HTTPS listener: add a [platform.tls] table"
                            .to_string(),
                    ));
                }
                Some(raw) => {
                    let raw = raw.get_ref();
                    let tls = AppTls {
                        cert: absolute(raw.cert.get_ref().clone()),
                        key: absolute(raw.key.get_ref().clone()),
                        hsts: raw.hsts.map(|d| d.0).filter(|d| !d.is_zero()),
                    };
                    let pair =
                        crate::listener::tls::load_pair(&tls.cert, &tls.key).map_err(|why| {
                            invalid(raw.cert.span().start, format!("apps.{name}.tls.cert"), why)
                        })?;
                    for (i, domain) in domains.iter().enumerate() {
                        if !crate::listener::tls::covers(&pair, domain) {
                            return Err(invalid(
                                app.domains[i].span().start,
                                format!("apps.{name}.domains[{i}]"),
                                format!(
                                    "the certificate of apps.{name}.tls.cert ({}) does not cover `{domain}`",
                                    tls.cert.display()
                                ),
                            ));
                        }
                    }
                    Some(tls)
                }
                None => {
                    // Certificates from ACME: every domain must be one an
                    // ACME server issues for.
                    if https && !internal {
                        for (i, domain) in domains.iter().enumerate() {
                            if let Some(why) = crate::listener::acme::unusable(domain) {
                                return Err(invalid(
                                    app.domains[i].span().start,
                                    format!("apps.{name}.domains[{i}]"),
                                    format!("{why} ([apps.{name}.tls] cert and key)"),
                                ));
                            }
                        }
                    }
                    None
                }
            };
            let cache = app.cache.unwrap_or_default();
            let isolate = app.isolate.unwrap_or_default();
            let hooks = app.hooks.unwrap_or_default();
            apps.push(AppEntry {
                name,
                source,
                domains,
                runtime: app.runtime,
                cache: AppCacheOverrides {
                    enabled: cache.enabled,
                    default_ttl: cache.default_ttl.map(|d| d.0),
                    default_swr: cache.default_swr.map(|d| d.0),
                    stale_if_error: cache.stale_if_error.map(|d| d.0),
                    max_entries: cache.max_entries.map(NonZeroU64::get),
                    max_bytes: cache.max_bytes,
                    max_entry_bytes: cache.max_entry_bytes,
                    purge_token: cache.purge_token.filter(|t| !t.is_empty()),
                },
                rate_limit_rpm: rate_limit.rpm,
                rate_limit_ipv6_prefix: ipv6_prefix,
                workers: isolate.workers,
                memory_limit: isolate.memory_limit,
                start_timeout: isolate.start_timeout.map(|d| d.0),
                max_inflight: isolate.max_inflight,
                deploy: DeploySettings {
                    keep_versions: deploy
                        .keep_versions
                        .map_or(DEFAULT_KEEP_VERSIONS, |k| k.get() as usize),
                    health_path,
                    health_timeout: deploy
                        .health_timeout
                        .map_or(DEFAULT_HEALTH_TIMEOUT, |d| d.0),
                    drain_timeout: deploy.drain_timeout.map(|d| d.0),
                    build_timeout: deploy.build_timeout.map_or(DEFAULT_BUILD_TIMEOUT, |d| d.0),
                    purge_cache: deploy.purge_cache.unwrap_or(true),
                },
                env: app.env.unwrap_or_default(),
                user,
                tls,
                compression,
                hooks: Hooks {
                    pre_build: hooks.pre_build.filter(|h| !h.trim().is_empty()),
                    post_deploy: hooks.post_deploy.filter(|h| !h.trim().is_empty()),
                    timeout: hooks.timeout.map_or(DEFAULT_HOOK_TIMEOUT, |d| d.0),
                },
            });
        }
        if let Some(default) = &platform.default_app
            && !apps.iter().any(|a| a.name == *default.get_ref())
        {
            return Err(invalid(
                default.span().start,
                "platform.default_app".to_string(),
                format!("no app is named `{}`", default.get_ref()),
            ));
        }
        let control_group = match &platform.control_group {
            Some(group) => match nix::unistd::Group::from_name(group.get_ref()) {
                Ok(Some(g)) => Some((g.name, g.gid.as_raw())),
                Ok(None) => {
                    return Err(invalid(
                        group.span().start,
                        "platform.control_group".to_string(),
                        format!("no group is named `{}` on this host", group.get_ref()),
                    ));
                }
                Err(e) => {
                    return Err(invalid(
                        group.span().start,
                        "platform.control_group".to_string(),
                        format!("could not look up group `{}`: {e}", group.get_ref()),
                    ));
                }
            },
            None => None,
        };
        if let Some(table) = &raw_redis {
            return Err(invalid(
                table.span().start,
                "redis".to_string(),
                "in platform.toml Redis is the platform's: write this table as [platform.redis]"
                    .to_string(),
            ));
        }
        let redis = match &platform.redis {
            Some(table) => Some(super::redis_settings("platform.redis", table, &invalid)?),
            None => None,
        };
        let remote_control = match &platform.control {
            Some(table) => Some(remote_control(table, &base, control_files, &invalid)?),
            None => None,
        };
        if let Some(table) = &platform.tls
            && !apps
                .iter()
                .any(|a| a.tls.is_some() || !a.domains.is_empty())
        {
            return Err(invalid(
                table.span().start,
                "platform.tls".to_string(),
                "no app has a certificate or a domain to get one for: give an app domains (certificates come from ACME) or an [apps.NAME.tls]".to_string(),
            ));
        }
        let listen = platform.listen.unwrap_or_else(|| {
            let default = if platform.tls.is_some() {
                DEFAULT_PLATFORM_TLS_LISTEN
            } else {
                DEFAULT_PLATFORM_LISTEN
            };
            default.parse().expect("valid default")
        });
        let tls = match platform.tls {
            // Port 443 is HTTPS, with every default (certificates from
            // Let's Encrypt).
            None if https => Some(PlatformTls {
                http_listen: DEFAULT_HTTP_LISTEN.parse().expect("valid default"),
                acme: crate::listener::acme::AcmeSettings::default(),
            }),
            Some(table) => {
                let at = table.span().start;
                let table = table.into_inner();
                let acme = acme_settings(
                    &AcmeKeys {
                        prefix: "platform.tls",
                        issuer: table.issuer,
                        email: table.acme_email.as_ref(),
                        directory: table.acme_directory.as_ref(),
                        ca_root: table.acme_ca_root.as_ref(),
                        challenges: table.acme_challenges.as_ref(),
                    },
                    &base,
                    &invalid,
                )?;
                let http_listen = table
                    .http_listen
                    .unwrap_or_else(|| DEFAULT_HTTP_LISTEN.parse().expect("valid default"));
                if http_listen == listen && listen.port() != 0 {
                    return Err(invalid(
                        at,
                        "platform.tls.http_listen".to_string(),
                        format!(
                            "plain HTTP and HTTPS cannot share {listen}: set platform.listen (HTTPS, usually port 443) and platform.tls.http_listen (usually port 80) apart"
                        ),
                    ));
                }
                Some(PlatformTls { http_listen, acme })
            }
            None => None,
        };
        Ok(PlatformConfig {
            tls,
            redis,
            compression,
            control_group,
            remote_control,
            source: path.to_path_buf(),
            listen,
            data_dir: platform
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            max_apps,
            default_app: platform.default_app.map(Spanned::into_inner),
            trusted_proxies: platform.trusted_proxies.unwrap_or_default(),
            admin_networks: platform.admin_networks.unwrap_or_else(super::loopback),
            shutdown_grace: platform.shutdown_grace.map(|d| d.0),
            limits: crate::listener::ConnLimits {
                client_header_timeout: platform
                    .client_header_timeout
                    .map_or(super::DEFAULT_CLIENT_HEADER_TIMEOUT, |d| d.0),
                keepalive_timeout: platform
                    .keepalive_timeout
                    .map_or(super::DEFAULT_KEEPALIVE_TIMEOUT, |d| d.0),
                send_timeout: platform
                    .send_timeout
                    .map_or(super::DEFAULT_SEND_TIMEOUT, |d| d.0),
            },
            apps,
        })
    }

    pub fn app(&self, name: &str) -> Option<&AppEntry> {
        self.apps.iter().find(|a| a.name == name)
    }
}

/// `[platform.control]` checked: every key set and, with `files`, the
/// files readable, the server's key its certificate's, the client CA a CA.
fn remote_control(
    table: &Spanned<RawControl>,
    base: &Path,
    files: bool,
    invalid: &impl Fn(usize, String, String) -> ConfigError,
) -> Result<RemoteControl, ConfigError> {
    let at = table.span().start;
    let raw = table.get_ref();
    let required = |value: Option<&Spanned<PathBuf>>, name: &str| {
        value.map(|v| (v.span().start, absolute(base, v.get_ref()))).ok_or_else(|| {
            invalid(
                at,
                format!("platform.control.{name}"),
                format!(
                    "missing: the control service listens on TCP only with mutual TLS (set listen, cert, key and client_ca; `{name}` is not set)"
                ),
            )
        })
    };
    let Some(listen) = &raw.listen else {
        return Err(invalid(
            at,
            "platform.control.listen".to_string(),
            "missing: the TCP address to serve the control service on (e.g. \"10.0.0.5:7443\")"
                .to_string(),
        ));
    };
    let (cert_at, cert) = required(raw.cert.as_ref(), "cert")?;
    let (key_at, key) = required(raw.key.as_ref(), "key")?;
    let (ca_at, client_ca) = required(raw.client_ca.as_ref(), "client_ca")?;
    let settings = RemoteControl {
        listen: *listen.get_ref(),
        cert,
        key,
        client_ca,
    };
    if !files {
        return Ok(settings);
    }
    let RemoteControl {
        cert,
        key,
        client_ca,
        ..
    } = &settings;
    crate::listener::tls::load_pair(cert, key).map_err(|why| {
        let (offset, name) = if why.starts_with(&key.display().to_string()) {
            (key_at, "key")
        } else {
            (cert_at, "cert")
        };
        invalid(offset, format!("platform.control.{name}"), why)
    })?;
    // Everything the port would refuse to start with (an expired
    // certificate, a client CA that is not a CA or shares the server's
    // chain), named by its key.
    crate::control::remote::pem_roots(client_ca)
        .map_err(|why| invalid(ca_at, "platform.control.client_ca".to_string(), why))?;
    crate::control::remote::server_config(&settings).map_err(|why| {
        let (offset, name) = if why.starts_with(&client_ca.display().to_string()) {
            (ca_at, "client_ca")
        } else {
            (cert_at, "cert")
        };
        invalid(offset, format!("platform.control.{name}"), why)
    })?;
    Ok(settings)
}

/// `path`, relative to `base` when it is not absolute.
fn absolute(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// What an app's own `bext.config.toml` may ask for in multi-app mode (it
/// is the tenant's file): resource limits at most these; the platform
/// table may set any.
pub const TENANT_MAX_WORKERS: u32 = super::DEFAULT_MAX_WORKERS;
pub const TENANT_MAX_START_TIMEOUT: Duration = super::DEFAULT_START_TIMEOUT;
pub const TENANT_MAX_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3600);
pub const TENANT_MAX_QUEUE_TIMEOUT: Duration = Duration::from_secs(60);
pub const TENANT_MAX_SHUTDOWN_GRACE: Duration = super::DEFAULT_SHUTDOWN_GRACE;
/// Route rules are matched in order on every request.
pub const TENANT_MAX_ROUTE_RULES: usize = 256;

impl AppEntry {
    /// The app's own `bext.config.toml`, its resource limits capped at
    /// what a tenant may ask for, with this table's settings on top; and a
    /// note for each value that was capped.
    pub fn merged_config(&self) -> Result<(Config, Vec<String>), ConfigError> {
        self.merged_config_in(&self.source)
    }

    /// [`Self::merged_config`] with the app's own `bext.config.toml` read
    /// from `dir` (a deployed version of the app).
    pub fn merged_config_in(&self, dir: &Path) -> Result<(Config, Vec<String>), ConfigError> {
        let mut config = Config::load_tenant_dir(dir)?;
        let mut notes = cap_tenant_limits(&mut config);
        // Compression runs on the platform's threads: the levels are the
        // platform's; an app may only do less (off, or a larger minimum).
        let own = config.compression;
        if own.stored != self.compression.stored && own.stored != crate::compress::DEFAULT_STORED
            || own.streamed != self.compression.streamed
                && own.streamed != crate::compress::DEFAULT_STREAMED
        {
            notes.push(
                "its bext.config.toml sets compression levels; in multi-app mode they are the platform's ([platform.compression])"
                    .to_string(),
            );
        }
        config.compression = crate::compress::Settings {
            enabled: own.enabled && self.compression.enabled,
            min_size: own.min_size.max(self.compression.min_size),
            ..self.compression
        };
        if let Some(framework) = self.runtime {
            config.runtime.framework = Some(framework);
        }
        let isr = &mut config.isr;
        let c = &self.cache;
        if let Some(v) = c.enabled {
            isr.enabled = v;
        }
        if let Some(v) = c.default_ttl {
            isr.default_ttl = v;
        }
        if let Some(v) = c.default_swr {
            isr.default_swr = v;
        }
        if let Some(v) = c.stale_if_error {
            isr.stale_if_error = v;
        }
        if let Some(v) = c.max_entries {
            isr.max_entries = v;
        }
        if let Some(v) = c.max_bytes {
            isr.max_bytes = v;
        }
        if let Some(v) = c.max_entry_bytes {
            isr.max_entry_bytes = v;
        }
        if let Some(v) = &c.purge_token {
            isr.purge_token = Some(v.clone());
        }
        if let Some(v) = self.workers {
            config.isolate.workers = Some(v);
        }
        if let Some(v) = self.memory_limit {
            config.isolate.memory_limit = Some(v);
        }
        if let Some(v) = self.start_timeout {
            config.isolate.start_timeout = v;
        }
        if let Some(v) = self.max_inflight {
            config.isolate.max_inflight = v;
        }
        config
            .runtime
            .env
            .0
            .extend(self.env.0.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok((config, notes))
    }
}

/// Caps what a tenant's own file asks for (see [`TENANT_MAX_WORKERS`]).
fn cap_tenant_limits(config: &mut Config) -> Vec<String> {
    let mut notes = Vec::new();
    if !config.server.access_log {
        notes.push(
            "its bext.config.toml turns the access log off; in multi-app mode that log is the platform's, and stays on"
                .to_string(),
        );
        config.server.access_log = true;
    }
    let mut cap = |key: &str, asked: String, max: String| {
        notes.push(format!(
            "its bext.config.toml sets {key} = {asked}; an app's own file may ask for at most {max}"
        ));
    };
    let iso = &mut config.isolate;
    if let Some(w) = iso.workers.filter(|w| w.get() > TENANT_MAX_WORKERS) {
        cap(
            "isolate.workers",
            w.to_string(),
            TENANT_MAX_WORKERS.to_string(),
        );
        iso.workers = NonZeroU32::new(TENANT_MAX_WORKERS);
    }
    let durations: [(&str, &mut Duration, Duration); 4] = [
        (
            "isolate.start_timeout_ms",
            &mut iso.start_timeout,
            TENANT_MAX_START_TIMEOUT,
        ),
        (
            "server.upstream_timeout_ms",
            &mut config.server.upstream_timeout,
            TENANT_MAX_UPSTREAM_TIMEOUT,
        ),
        (
            "server.queue_timeout_ms",
            &mut config.server.queue_timeout,
            TENANT_MAX_QUEUE_TIMEOUT,
        ),
        (
            "server.shutdown_grace_ms",
            &mut config.server.shutdown_grace,
            TENANT_MAX_SHUTDOWN_GRACE,
        ),
    ];
    for (key, value, max) in durations {
        if *value > max {
            cap(
                key,
                value.as_millis().to_string(),
                max.as_millis().to_string(),
            );
            *value = max;
        }
    }
    if iso.max_inflight > super::DEFAULT_MAX_INFLIGHT {
        cap(
            "isolate.max_inflight",
            iso.max_inflight.to_string(),
            super::DEFAULT_MAX_INFLIGHT.to_string(),
        );
        iso.max_inflight = super::DEFAULT_MAX_INFLIGHT;
    }
    let isr = &mut config.isr;
    if isr.max_entries > super::DEFAULT_ISR_MAX_ENTRIES {
        cap(
            "cache.isr.max_entries",
            isr.max_entries.to_string(),
            super::DEFAULT_ISR_MAX_ENTRIES.to_string(),
        );
        isr.max_entries = super::DEFAULT_ISR_MAX_ENTRIES;
    }
    for (key, value, max) in [
        (
            "cache.isr.max_bytes",
            &mut isr.max_bytes,
            super::DEFAULT_ISR_MAX_BYTES,
        ),
        (
            "cache.isr.max_entry_bytes",
            &mut isr.max_entry_bytes,
            super::DEFAULT_ISR_MAX_ENTRY_BYTES,
        ),
    ] {
        if *value > max {
            cap(key, value.to_string(), max.to_string());
            *value = max;
        }
    }
    if config.isr.route_rules.len() > TENANT_MAX_ROUTE_RULES {
        cap(
            "route_rules",
            format!("{} rules", config.isr.route_rules.len()),
            format!("{TENANT_MAX_ROUTE_RULES} (the first are kept)"),
        );
        config.isr.route_rules.truncate(TENANT_MAX_ROUTE_RULES);
    }
    notes
}

/// `Example.COM.` → `example.com`; `*.example.com` stays a wildcard.
pub(super) fn normalize_domain(domain: &str) -> Result<String, String> {
    let lower = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    let (wildcard, rest) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    let valid = !rest.is_empty()
        && rest.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !valid {
        return Err(format!(
            "`{domain}` is not a domain name (letters, digits and `-` between dots; `*.` for a wildcard; no port)"
        ));
    }
    Ok(if wildcard {
        format!("*.{rest}")
    } else {
        rest.to_string()
    })
}

/// Does this file look like a platform file (a `[platform]` or `[apps]`
/// table) rather than an app's `bext.config.toml`?
pub fn is_platform_file(text: &str) -> bool {
    toml::from_str::<toml::Table>(text)
        .map(|t| t.contains_key("platform") || t.contains_key("apps"))
        .unwrap_or(false)
}

#[cfg(test)]
#[path = "platform_tests.rs"]
pub(crate) mod tests;

/// `[platform.tls]`'s ACME keys, checked: an email address, an `https://`
/// directory, a readable PEM root, known challenge types.
pub(super) fn acme_settings(
    table: &AcmeKeys<'_>,
    base: &Path,
    invalid: &impl Fn(usize, String, String) -> ConfigError,
) -> Result<crate::listener::acme::AcmeSettings, ConfigError> {
    let mut acme = crate::listener::acme::AcmeSettings {
        issuer: table.issuer.unwrap_or_default(),
        ..Default::default()
    };
    if let Some(email) = &table.email {
        let text = email.get_ref().trim();
        let plausible = text
            .split_once('@')
            .is_some_and(|(user, domain)| !user.is_empty() && domain.contains('.'))
            && !text.contains(|c: char| c.is_whitespace() || "<>,:;\"\\".contains(c));
        if !plausible {
            return Err(invalid(
                email.span().start,
                format!("{}.acme_email", table.prefix),
                format!("`{text}` is not an email address"),
            ));
        }
        acme.email = Some(text.to_string());
    }
    if let Some(directory) = &table.directory {
        let url = directory.get_ref().trim();
        let https = url
            .parse::<http::Uri>()
            .is_ok_and(|u| u.scheme_str() == Some("https") && u.authority().is_some());
        if !https {
            return Err(invalid(
                directory.span().start,
                format!("{}.acme_directory", table.prefix),
                format!(
                    "`{url}` is not an https:// URL (Let's Encrypt's is {})",
                    crate::listener::acme::LETS_ENCRYPT
                ),
            ));
        }
        acme.directory = url.to_string();
    }
    if let Some(root) = &table.ca_root {
        let path = if root.get_ref().is_absolute() {
            root.get_ref().clone()
        } else {
            base.join(root.get_ref())
        };
        let usable = super::read_small_file(&path)
            .map_err(|e| e.to_string())
            .and_then(|pem| {
                use rustls_pki_types::pem::PemObject;
                match rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).next() {
                    Some(Ok(_)) => Ok(()),
                    Some(Err(e)) => Err(format!("not a PEM certificate: {e}")),
                    None => Err("no certificate in it".to_string()),
                }
            });
        if let Err(why) = usable {
            return Err(invalid(
                root.span().start,
                format!("{}.acme_ca_root", table.prefix),
                format!("{}: {why}", path.display()),
            ));
        }
        acme.ca_root = Some(path);
    }
    if let Some(challenges) = &table.challenges {
        let mut list = challenges.get_ref().clone();
        list.dedup();
        if list.is_empty() {
            return Err(invalid(
                challenges.span().start,
                format!("{}.acme_challenges", table.prefix),
                "name at least one: \"http-01\", \"tls-alpn-01\"".to_string(),
            ));
        }
        acme.challenges = list;
    }
    Ok(acme)
}
