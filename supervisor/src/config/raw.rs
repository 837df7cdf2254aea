//! What serde reads from `bext.config.toml`: every table denies unknown keys,
//! every key is optional. Values that can be checked alone (addresses,
//! non-zero counts, sizes, enum names) are checked here, so their errors carry
//! the value's position. Defaults are filled in by `Config::from_raw`.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::PathBuf;

use serde::Deserialize;

use super::{EnvVars, MemorySize, Millis, PositiveMillis};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) server: Option<RawServer>,
    pub(super) cache: Option<RawCache>,
    pub(super) runtime: Option<RawRuntime>,
    pub(super) isolate: Option<RawIsolate>,
    pub(super) route_rules: Option<Vec<RawRouteRule>>,
    pub(super) compression: Option<RawCompression>,
    pub(super) redis: Option<toml::Spanned<RawRedis>>,
    pub(super) rate_limit: Option<toml::Spanned<RawRateLimit>>,
}

/// `[rate_limit]`: requests per minute per client.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    pub(super) rpm: Option<NonZeroU32>,
    pub(super) ipv6_prefix: Option<toml::Spanned<u8>>,
}

/// `[redis]`: edge mode.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedis {
    pub(super) url: Option<toml::Spanned<String>>,
    pub(super) prefix: Option<toml::Spanned<String>>,
    pub(super) write: Option<super::RedisWrite>,
    pub(super) timeout_ms: Option<PositiveMillis>,
}

/// `[compression]` (and `[platform.compression]`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCompression {
    pub(super) enabled: Option<bool>,
    pub(super) min_size: Option<MemorySize>,
    pub(super) stored: Option<RawLevels<19, 11>>,
    /// Paid on every response, and held in memory per open stream: the
    /// slow, memory-hungry top levels are refused.
    pub(super) streamed: Option<RawLevels<9, 6>>,
}

/// `stored = { zstd = 15, br = 9, gzip = 9 }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLevels<const ZSTD_MAX: i64, const BR_MAX: i64> {
    pub(super) zstd: Option<Level<1, ZSTD_MAX>>,
    pub(super) br: Option<Level<0, BR_MAX>>,
    pub(super) gzip: Option<Level<1, 9>>,
}

impl RawCompression {
    /// The settings, defaults filled in.
    pub(super) fn settings(&self) -> crate::compress::Settings {
        use crate::compress::{DEFAULT_MIN_SIZE, DEFAULT_STORED, DEFAULT_STREAMED, Settings};
        Settings {
            enabled: self.enabled.unwrap_or(true),
            min_size: self.min_size.map_or(DEFAULT_MIN_SIZE, MemorySize::bytes),
            stored: RawLevels::levels(self.stored.as_ref(), DEFAULT_STORED),
            streamed: RawLevels::levels(self.streamed.as_ref(), DEFAULT_STREAMED),
        }
    }
}

impl<const ZSTD_MAX: i64, const BR_MAX: i64> RawLevels<ZSTD_MAX, BR_MAX> {
    fn levels(raw: Option<&Self>, default: crate::compress::Levels) -> crate::compress::Levels {
        let Some(raw) = raw else { return default };
        crate::compress::Levels {
            zstd: raw.zstd.map_or(default.zstd, |l| l.0 as i32),
            br: raw.br.map_or(default.br, |l| l.0 as u32),
            gzip: raw.gzip.map_or(default.gzip, |l| l.0 as u32),
        }
    }
}

/// A compression level, checked against its coding's range where it is
/// read (so the error points at it).
#[derive(Debug, Clone, Copy)]
pub(super) struct Level<const MIN: i64, const MAX: i64>(i64);

impl<'de, const MIN: i64, const MAX: i64> Deserialize<'de> for Level<MIN, MAX> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let level = i64::deserialize(deserializer)?;
        if !(MIN..=MAX).contains(&level) {
            return Err(serde::de::Error::custom(format!(
                "level {level} is out of range: this coding's levels are {MIN} to {MAX}"
            )));
        }
        Ok(Level(level))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<SocketAddr>,
    pub(super) static_dir: Option<PathBuf>,
    pub(super) upstream_timeout_ms: Option<Millis>,
    pub(super) queue_timeout_ms: Option<Millis>,
    pub(super) shutdown_grace_ms: Option<Millis>,
    pub(super) client_header_timeout_ms: Option<PositiveMillis>,
    pub(super) keepalive_timeout_ms: Option<Millis>,
    pub(super) send_timeout_ms: Option<PositiveMillis>,
    pub(super) trusted_proxies: Option<Vec<ipnet::IpNet>>,
    pub(super) admin_networks: Option<Vec<ipnet::IpNet>>,
    pub(super) access_log: Option<bool>,
    pub(super) data_dir: Option<PathBuf>,
    pub(super) tls: Option<toml::Spanned<RawServerTls>>,
}

/// `[server.tls]`: HTTPS in single-app mode.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServerTls {
    pub(super) cert: Option<toml::Spanned<PathBuf>>,
    pub(super) key: Option<toml::Spanned<PathBuf>>,
    #[serde(default)]
    pub(super) domains: Vec<toml::Spanned<String>>,
    pub(super) http_listen: Option<toml::Spanned<SocketAddr>>,
    pub(super) hsts: Option<super::HumanDuration>,
    pub(super) issuer: Option<crate::listener::acme::Issuer>,
    pub(super) acme_email: Option<toml::Spanned<String>>,
    pub(super) acme_directory: Option<toml::Spanned<String>>,
    pub(super) acme_ca_root: Option<toml::Spanned<PathBuf>>,
    pub(super) acme_challenges: Option<toml::Spanned<Vec<crate::listener::acme::ChallengeKind>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    pub(super) isr: Option<RawIsr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIsr {
    pub(super) enabled: Option<bool>,
    pub(super) default_ttl_ms: Option<Millis>,
    pub(super) default_swr_ms: Option<Millis>,
    pub(super) stale_if_error_ms: Option<Millis>,
    pub(super) max_entries: Option<NonZeroU64>,
    pub(super) max_bytes: Option<MemorySize>,
    pub(super) max_entry_bytes: Option<MemorySize>,
    pub(super) purge_token: Option<String>,
}

/// `[[route_rules]]`: per-path cache lifetimes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouteRule {
    pub(super) path: PathPattern,
    pub(super) ttl_ms: Option<Millis>,
    pub(super) swr_ms: Option<Millis>,
    pub(super) stale_if_error_ms: Option<Millis>,
    pub(super) cache: Option<bool>,
}

/// A URL path glob: `*` matches within one segment, `**` across segments.
#[derive(Debug, Clone)]
pub struct PathPattern {
    pub text: String,
    pub matcher: globset::GlobMatcher,
}

impl PartialEq for PathPattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl<'de> Deserialize<'de> for PathPattern {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if !text.starts_with('/') {
            return Err(serde::de::Error::custom(format!(
                "`{text}` is not a path pattern; it must start with `/`"
            )));
        }
        let glob = globset::GlobBuilder::new(&text)
            .literal_separator(true)
            .build()
            .map_err(|e| {
                serde::de::Error::custom(format!("invalid path pattern `{text}`: {}", e.kind()))
            })?;
        Ok(PathPattern {
            matcher: glob.compile_matcher(),
            text,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuntime {
    pub(super) framework: Option<Framework>,
    pub(super) engine: Option<Engine>,
    pub(super) start: Option<String>,
    pub(super) build: Option<String>,
    pub(super) env: Option<EnvVars>,
    pub(super) next_cache: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIsolate {
    pub(super) workers: Option<NonZeroU32>,
    pub(super) memory_limit: Option<MemorySize>,
    pub(super) start_timeout_ms: Option<Millis>,
    pub(super) max_inflight: Option<NonZeroU32>,
}

/// The kinds of app bext knows how to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Framework {
    Nextjs,
    Hono,
    Express,
    /// Any Node HTTP server started by package.json `start` or `main`.
    Node,
    Deno,
    /// Files only: no workers.
    Static,
}

impl Framework {
    pub fn as_str(self) -> &'static str {
        match self {
            Framework::Nextjs => "nextjs",
            Framework::Hono => "hono",
            Framework::Express => "express",
            Framework::Node => "node",
            Framework::Deno => "deno",
            Framework::Static => "static",
        }
    }
}

impl std::fmt::Display for Framework {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JavaScript runtime a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Node,
    Deno,
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Engine::Node => "node",
            Engine::Deno => "deno",
        })
    }
}
