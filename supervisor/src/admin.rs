//! bext's own endpoints under `/__bext/`, answered before anything else
//! (never by the app): `health` (JSON), `metrics` (Prometheus text) and
//! `cache/invalidate` (purge, behind a bearer token).
//!
//! Pids, memory and counters are for the operator: the full health report
//! and the metrics go only to clients in `admin_networks` (the client as
//! `trusted_proxies` resolve it, so that behind a local TLS terminator the
//! world is not "loopback"); everyone else gets the health status alone,
//! for load balancers, and a 403 for the metrics.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::body::{self, Body};
use crate::cache::IsrCache;
use crate::cache::store::Selector;
use crate::metrics::Metrics;
use crate::pool::Pool;

/// Every path under this prefix belongs to bext.
pub const PREFIX: &str = "/__bext/";
/// Largest purge request body.
pub const MAX_PURGE_BODY: usize = 64 * 1024;
/// How long a client has to send a body bext reads itself (a purge).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the endpoints report on and act on.
#[derive(Debug)]
pub struct Admin {
    pub app: String,
    pub framework: String,
    pub pool: Option<Arc<Pool>>,
    pub cache: Option<Arc<IsrCache>>,
    pub metrics: Arc<Metrics>,
    pub purge_token: Option<String>,
    pub admin_networks: Arc<[ipnet::IpNet]>,
}

/// `POST /__bext/cache/invalidate` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    /// Multi-app: which app (needed when the Host names none).
    app: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    prefix: Option<String>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    soft: bool,
}

impl Admin {
    /// Answers `req` from `client` (resolved through trusted proxies).
    pub async fn handle(&self, req: Request<Body>, client: std::net::IpAddr) -> Response<Body> {
        let admin = self.admin_networks.iter().any(|n| n.contains(&client));
        match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/__bext/health") if admin => self.health(),
            (&Method::GET | &Method::HEAD, "/__bext/health") => self.health_status(),
            (&Method::GET | &Method::HEAD, "/__bext/metrics") if !admin => json(
                StatusCode::FORBIDDEN,
                &serde_json::json!({"error": "metrics are served to admin_networks only"}),
            ),
            (&Method::GET | &Method::HEAD, "/__bext/metrics") => text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.render(Some(&self.app)),
            ),
            (&Method::POST, "/__bext/cache/invalidate") if self.purge_token.is_some() => {
                self.invalidate(req).await
            }
            _ => json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": "not found"}),
            ),
        }
    }

    fn health(&self) -> Response<Body> {
        let (healthy, body) = self.health_report();
        let status = if healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json(status, &body)
    }

    /// The public answer: whether the app can take requests, nothing more.
    fn health_status(&self) -> Response<Body> {
        let healthy = self.pool.as_ref().is_none_or(|p| p.ready_count() > 0);
        let (status, word) = if healthy {
            (StatusCode::OK, "ok")
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        };
        json(status, &serde_json::json!({ "status": word }))
    }

    /// Whether the app can answer, and the JSON report.
    pub fn health_report(&self) -> (bool, serde_json::Value) {
        let workers = self.pool.as_ref().map(|p| p.status()).unwrap_or_default();
        let ready = self.pool.as_ref().map_or(0, |p| p.ready_count());
        let healthy = self.pool.is_none() || ready > 0;
        let stats = self.cache.as_ref().map(|c| c.stats());
        let cache = stats.map(|stats| {
            let mut cache = serde_json::json!({"entries": stats.entries, "bytes": stats.bytes});
            if let Some(up) = stats.shared_up {
                cache["redis"] = serde_json::json!(if up { "up" } else { "down" });
            }
            cache
        });
        // Redis away: still serving (from memory and the app), not shared.
        let degraded = stats.is_some_and(|s| s.shared_up == Some(false));
        let body = serde_json::json!({
            "status": match (healthy, degraded) {
                (false, _) => "unavailable",
                (true, true) => "degraded",
                (true, false) => "ok",
            },
            "app": self.app,
            "framework": self.framework,
            "workers": workers,
            "ready": ready,
            "restarts": self.pool.as_ref().map_or(0, |p| p.restarts()),
            "failures_in_a_row": self.pool.as_ref().map_or(0, |p| p.consecutive_failures()),
            "cache": cache,
        });
        (healthy, body)
    }

    async fn invalidate(&self, req: Request<Body>) -> Response<Body> {
        if !self.authorized(req.headers()) {
            let mut response = json(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({"error": "a valid bearer token is required"}),
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
        let Some(cache) = &self.cache else {
            return json(
                StatusCode::CONFLICT,
                &serde_json::json!({"error": "the cache is disabled"}),
            );
        };
        let Some(bytes) = read_limited(req.into_body(), MAX_PURGE_BODY).await else {
            return bad_request("the body must be JSON of at most 64 KiB, sent within 10 s");
        };
        let request: PurgeRequest = match serde_json::from_slice(&bytes) {
            Ok(request) => request,
            Err(e) => return bad_request(&format!("invalid purge request: {e}")),
        };
        if let Some(other) = request.app.as_ref().filter(|a| **a != self.app) {
            return bad_request(&format!(
                "this host purges app `{}`, not `{other}`",
                self.app
            ));
        }
        let selector = Selector {
            all: request.all,
            tags: request.tags,
            paths: request.paths,
            prefix: request.prefix.filter(|p| !p.is_empty()),
            primaries: vec![],
        };
        if selector == Selector::default() {
            return bad_request("name what to purge: tags, paths, prefix, or all: true");
        }
        match cache.purge_everywhere(&selector, request.soft).await {
            Ok(purged) => {
                tracing::info!(purged, soft = request.soft, ?selector, "cache purge");
                json(
                    StatusCode::OK,
                    &serde_json::json!({"purged": purged, "soft": request.soft}),
                )
            }
            // Edge mode, Redis unreached: the fleet still serves it.
            Err(unshared) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({
                    "purged": unshared.purged,
                    "soft": request.soft,
                    "error": unshared.to_string(),
                }),
            ),
        }
    }

    /// Constant-time comparison of the bearer token.
    fn authorized(&self, headers: &http::HeaderMap) -> bool {
        let Some(expected) = &self.purge_token else {
            return false;
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        given.as_bytes().ct_eq(expected.as_bytes()).into()
    }
}

/// The whole body, if it arrives intact and within `max` bytes.
/// The whole body, if it is at most `max` bytes and arrives within
/// [`BODY_TIMEOUT`] (bext reads it itself: no worker's timeout covers it).
pub async fn read_limited(mut body: Body, max: usize) -> Option<Vec<u8>> {
    let read = async {
        let mut bytes = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.ok()?.into_data() {
                if bytes.len() + data.len() > max {
                    return None;
                }
                bytes.extend_from_slice(&data);
            }
        }
        Some(bytes)
    };
    tokio::time::timeout(BODY_TIMEOUT, read)
        .await
        .ok()
        .flatten()
}

fn bad_request(message: &str) -> Response<Body> {
    json(
        StatusCode::BAD_REQUEST,
        &serde_json::json!({"error": message}),
    )
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    text(status, "application/json", value.to_string())
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut response = Response::new(body::full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
