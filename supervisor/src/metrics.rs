//! Prometheus metrics for `/__bext/metrics`.
//!
//! Counters that move on every request are plain atomics updated where the
//! event happens; gauges and counters owned by other parts (cache entries
//! and bytes, evictions, worker states and restarts) are read at scrape time
//! by [`Snapshot`].

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::cache::{CacheCounters, IsrCache};
use crate::pool::Pool;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: u16,
}

/// One app's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<StatusLabel, Counter>,
}

impl Metrics {
    pub fn new(pool: Option<Arc<Pool>>, cache: Option<Arc<IsrCache>>) -> Self {
        let mut registry = Registry::with_prefix("bext");
        let requests = Family::<StatusLabel, Counter>::default();
        registry.register("requests", "Responses sent, by status", requests.clone());
        if let Some(cache) = &cache {
            let CacheCounters {
                hits,
                stale,
                misses,
                bypasses,
                coalesced,
                revalidations,
            } = cache.counters.clone();
            registry.register("cache_hits", "Served fresh from the cache", hits);
            registry.register(
                "cache_stale",
                "Served stale from the cache (revalidating, or standing in for a failing app)",
                stale,
            );
            registry.register(
                "cache_misses",
                "Fetched from the app (one per fill, however many requests waited for it)",
                misses,
            );
            registry.register(
                "cache_bypasses",
                "Not served from or stored in the cache",
                bypasses,
            );
            registry.register(
                "cache_coalesced",
                "Misses that waited for another request's fetch",
                coalesced,
            );
            registry.register(
                "cache_revalidations",
                "Background revalidations started",
                revalidations,
            );
        }
        registry.register_collector(Box::new(Snapshot { pool, cache }));
        Metrics { registry, requests }
    }

    pub fn count(&self, status: http::StatusCode) {
        self.requests
            .get_or_create(&StatusLabel {
                status: status.as_u16(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Values read from their owners at scrape time.
#[derive(Debug)]
struct Snapshot {
    pool: Option<Arc<Pool>>,
    cache: Option<Arc<IsrCache>>,
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        if let Some(cache) = &self.cache {
            let stats = cache.stats();
            gauge(
                &mut encoder,
                "cache_entries",
                "Entries in the cache",
                stats.entries as i64,
            )?;
            gauge(
                &mut encoder,
                "cache_bytes",
                "Bytes held by the cache",
                stats.bytes as i64,
            )?;
            counter(
                &mut encoder,
                "cache_evictions",
                "Entries evicted to stay within max_entries / max_bytes",
                stats.evictions,
            )?;
        }
        if let Some(pool) = &self.pool {
            counter(
                &mut encoder,
                "worker_restarts",
                "Worker restarts after crashes and recycles",
                pool.restarts(),
            )?;
            gauge(
                &mut encoder,
                "workers_ready",
                "Workers ready to take requests",
                pool.ready_count() as i64,
            )?;
        }
        Ok(())
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}
