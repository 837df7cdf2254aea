//! Prometheus metrics for `/__bext/metrics`: one registry for the whole
//! process, every series labelled with its `app`.
//!
//! Counters that move on every request are atomics updated where the event
//! happens (handed out as [`AppCounters`]); what other parts own (cache
//! entries and bytes, evictions, worker states, restarts, RSS) is read at
//! scrape time from the apps registered with [`Metrics::register_app`] —
//! only from the one app asked about, when a scrape is for one app.

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::cache::{CacheCounters, IsrCache};
use crate::pool::Pool;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabel {
    pub app: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppStatusLabel {
    pub app: String,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppDomainLabel {
    pub app: String,
    pub domain: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppOpLabel {
    pub app: String,
    pub op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppWorkerLabel {
    pub app: String,
    pub worker: u32,
}

/// The process's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<AppStatusLabel, Counter>,
    rate_limited: Family<AppLabel, Counter>,
    cache: [Family<AppLabel, Counter>; 6],
    apps: Arc<ArcSwap<Vec<AppSource>>>,
    /// The HTTPS listener's certificates, for their expiry.
    certificates: OnceLock<Arc<crate::listener::tls::Certificates>>,
}

/// What the scrape reads from one app.
#[derive(Debug, Clone)]
pub struct AppSource {
    pub app: String,
    /// Which start of the app this is (a replacement registers under the
    /// same name; the replaced one must not unregister it).
    pub id: u64,
    pub pool: Option<Arc<Pool>>,
    pub cache: Option<Arc<IsrCache>>,
}

/// One app's request-path counters.
#[derive(Debug, Clone)]
pub struct AppCounters {
    app: String,
    requests: Family<AppStatusLabel, Counter>,
    /// The `requests` counter of each status 100–599, looked up in the
    /// family once (a lookup allocates the label and takes a lock).
    by_status: Arc<[OnceLock<Counter>]>,
    pub rate_limited: Counter,
}

impl AppCounters {
    pub fn count(&self, status: http::StatusCode) {
        let code = status.as_u16();
        let lookup = || {
            self.requests
                .get_or_create(&AppStatusLabel {
                    app: self.app.clone(),
                    status: code,
                })
                .clone()
        };
        match self.by_status.get(usize::from(code).wrapping_sub(100)) {
            Some(slot) => slot.get_or_init(lookup).inc(),
            None => lookup().inc(),
        };
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("bext");
        let requests = Family::<AppStatusLabel, Counter>::default();
        registry.register(
            "requests",
            "Responses sent, by app and status",
            requests.clone(),
        );
        let rate_limited = Family::<AppLabel, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests refused with 429 by the app's rate limit",
            rate_limited.clone(),
        );
        let cache: [Family<AppLabel, Counter>; 6] = Default::default();
        let help = [
            ("cache_hits", "Served fresh from the cache"),
            (
                "cache_stale",
                "Served stale from the cache (revalidating, or standing in for a failing app)",
            ),
            (
                "cache_misses",
                "Fetched from the app (one per fill, however many requests waited for it)",
            ),
            ("cache_bypasses", "Not served from or stored in the cache"),
            (
                "cache_coalesced",
                "Misses that waited for another request's fetch",
            ),
            ("cache_revalidations", "Background revalidations started"),
        ];
        for ((name, help), family) in help.into_iter().zip(&cache) {
            registry.register(name, help, family.clone());
        }
        registry.register_collector(Box::new(Process));
        let apps = Arc::new(ArcSwap::from_pointee(Vec::new()));
        Metrics {
            registry,
            requests,
            rate_limited,
            cache,
            apps,
            certificates: OnceLock::new(),
        }
    }

    /// Counters for `app`'s request path.
    pub fn counters(&self, app: &str) -> AppCounters {
        AppCounters {
            app: app.to_string(),
            requests: self.requests.clone(),
            by_status: (100..600).map(|_| OnceLock::new()).collect(),
            rate_limited: self
                .rate_limited
                .get_or_create(&AppLabel {
                    app: app.to_string(),
                })
                .clone(),
        }
    }

    /// Counters for `app`'s cache (shared with the registry).
    pub fn cache_counters(&self, app: &str) -> CacheCounters {
        let label = AppLabel {
            app: app.to_string(),
        };
        let c = |i: usize| self.cache[i].get_or_create(&label).clone();
        CacheCounters {
            hits: c(0),
            stale: c(1),
            misses: c(2),
            bypasses: c(3),
            coalesced: c(4),
            revalidations: c(5),
        }
    }

    /// Adds (or replaces) an app whose pool and cache the scrape reads.
    pub fn register_app(&self, source: &AppSource) {
        self.apps.rcu(|apps| {
            let mut apps: Vec<AppSource> = apps
                .iter()
                .filter(|a| a.app != source.app)
                .cloned()
                .collect();
            apps.push(source.clone());
            apps
        });
    }

    /// Forgets an app that was removed, unless another start of it (`id`
    /// differs) has registered since.
    pub fn unregister_app(&self, app: &str, id: u64) {
        self.apps.rcu(|apps| {
            apps.iter()
                .filter(|a| a.app != app || a.id != id)
                .cloned()
                .collect::<Vec<_>>()
        });
    }

    /// Reports `certificates`' expiry (`bext_tls_cert_expiry_seconds`).
    pub fn set_certificates(&self, certificates: Arc<crate::listener::tls::Certificates>) {
        let _ = self.certificates.set(certificates);
    }

    /// The Prometheus text exposition, for every app or for one. For one,
    /// only that app's pool and cache are read.
    pub fn render(&self, only: Option<&str>) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut counters = String::new();
        if encode_registry(&mut counters, &self.registry).is_err() {
            counters.clear();
        }
        let mut out = match only {
            None => counters,
            Some(app) => {
                let label = format!("app=\"{app}\"");
                let own = |line: &&str| {
                    line.starts_with('#')
                        || !line.contains('{')
                        || line.contains(&format!("{{{label},"))
                        || line.contains(&format!("{{{label}}}"))
                        || line.contains(&format!(",{label},"))
                        || line.contains(&format!(",{label}}}"))
                };
                counters
                    .lines()
                    .filter(own)
                    .fold(String::new(), |mut acc, line| {
                        acc.push_str(line);
                        acc.push('\n');
                        acc
                    })
            }
        };
        let apps: Vec<AppSource> = self
            .apps
            .load()
            .iter()
            .filter(|a| only.is_none_or(|only| a.app == only))
            .cloned()
            .collect();
        let mut snapshot = Registry::with_prefix("bext");
        let certificates = self
            .certificates
            .get()
            .map(|c| c.info())
            .unwrap_or_default()
            .into_iter()
            .filter(|c| only.is_none_or(|only| c.app == only))
            .collect();
        snapshot.register_collector(Box::new(Snapshot { apps, certificates }));
        if encode_registry(&mut out, &snapshot).is_err() || encode_eof(&mut out).is_err() {
            out.clear();
        }
        out
    }
}

/// The process's own figures.
#[derive(Debug)]
struct Process;

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let no_labels: Vec<(String, String)> = Vec::new();
        counters(
            &mut encoder,
            "log_lines_dropped",
            "Log lines dropped because stderr did not take them in time",
            std::iter::once((&no_labels, crate::telemetry::dropped_lines())),
        )
    }
}

/// Values read from their owners at scrape time.
#[derive(Debug)]
struct Snapshot {
    apps: Vec<AppSource>,
    certificates: Vec<crate::listener::tls::CertInfo>,
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let apps = &self.apps;
        let label = |a: &AppSource| AppLabel { app: a.app.clone() };
        let caches: Vec<_> = apps
            .iter()
            .filter_map(|a| a.cache.as_ref().map(|c| (label(a), c.stats())))
            .collect();
        let pools: Vec<_> = apps
            .iter()
            .filter_map(|a| a.pool.as_ref().map(|p| (label(a), p)))
            .collect();

        gauges(
            &mut encoder,
            "cache_entries",
            "Entries in the cache",
            caches.iter().map(|(l, s)| (l, s.entries as i64)),
        )?;
        gauges(
            &mut encoder,
            "cache_bytes",
            "Bytes held by the cache",
            caches.iter().map(|(l, s)| (l, s.bytes as i64)),
        )?;
        gauges(
            &mut encoder,
            "redis_up",
            "Edge mode: 1 while Redis answers the cache, 0 while it is skipped",
            caches
                .iter()
                .filter_map(|(l, s)| s.shared_up.map(|up| (l, i64::from(up)))),
        )?;
        // Edge mode: how long Redis took, per kind of operation.
        let redis_ops: Vec<_> = apps
            .iter()
            .filter_map(|a| Some((a, a.cache.as_ref()?.l2()?)))
            .collect();
        if !redis_ops.is_empty() {
            let mut family = encoder.encode_descriptor(
                "redis_op_duration",
                "Edge mode: time of Redis operations (answered, failed or timed out; not those skipped while Redis is away)",
                Some(&prometheus_client::registry::Unit::Seconds),
                prometheus_client::metrics::MetricType::Histogram,
            )?;
            for (app, l2) in redis_ops {
                for (op, histogram) in l2.times() {
                    let label = AppOpLabel {
                        app: app.app.clone(),
                        op: op.label(),
                    };
                    histogram.encode(family.encode_family(&label)?)?;
                }
            }
        }
        counters(
            &mut encoder,
            "cache_evictions",
            "Entries evicted to stay within max_entries / max_bytes",
            caches.iter().map(|(l, s)| (l, s.evictions)),
        )?;
        counters(
            &mut encoder,
            "worker_restarts",
            "Worker restarts after crashes and recycles",
            pools.iter().map(|(l, p)| (l, p.restarts())),
        )?;
        gauges(
            &mut encoder,
            "workers_ready",
            "Workers ready to take requests",
            pools.iter().map(|(l, p)| (l, p.ready_count() as i64)),
        )?;
        gauges(
            &mut encoder,
            "worker_failures_in_a_row",
            "Consecutive failed starts or crashes (a crash loop backs off while this grows)",
            pools
                .iter()
                .map(|(l, p)| (l, p.consecutive_failures() as i64)),
        )?;
        let mut rss = Vec::new();
        for (label, pool) in &pools {
            for worker in pool.status() {
                if let Some(bytes) = worker.pid.and_then(crate::pool::rss_bytes) {
                    rss.push((
                        AppWorkerLabel {
                            app: label.app.clone(),
                            worker: worker.index as u32,
                        },
                        bytes as i64,
                    ));
                }
            }
        }
        gauges(
            &mut encoder,
            "worker_rss_bytes",
            "Resident memory of each worker process",
            rss.iter().map(|(l, v)| (l, *v)),
        )?;
        let expiry: Vec<_> = self
            .certificates
            .iter()
            .filter_map(|c| {
                let label = AppDomainLabel {
                    app: c.app.clone(),
                    domain: c.domain.clone(),
                };
                Some((label, c.not_after?))
            })
            .collect();
        gauges(
            &mut encoder,
            "tls_cert_expiry_seconds",
            "When the certificate in use for a domain expires (notAfter, Unix seconds)",
            expiry.iter().map(|(l, v)| (l, *v)),
        )?;
        // 1 while a domain's last ACME attempt failed (with or without a
        // certificate still serving): what to alert on before expiry.
        let failing: Vec<_> = self
            .certificates
            .iter()
            .filter(|c| c.acme)
            .map(|c| {
                let label = AppDomainLabel {
                    app: c.app.clone(),
                    domain: c.domain.clone(),
                };
                (label, i64::from(c.problem.is_some()))
            })
            .collect();
        gauges(
            &mut encoder,
            "tls_acme_failing",
            "1 while the last attempt to get a domain's ACME certificate failed, else 0",
            failing.iter().map(|(l, v)| (l, *v)),
        )?;
        Ok(())
    }
}

fn gauges<'a, L: EncodeLabelSet + 'a>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: impl Iterator<Item = (&'a L, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (label, value) in values {
        ConstGauge::new(value).encode(family.encode_family(label)?)?;
    }
    Ok(())
}

fn counters<'a, L: EncodeLabelSet + 'a>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: impl Iterator<Item = (&'a L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (label, value) in values {
        ConstCounter::new(value).encode(family.encode_family(label)?)?;
    }
    Ok(())
}
