//! The wiring module: the only place that knows every layer of the request
//! path and puts them in order. For one app:
//!
//! ```text
//! listener → request id + access log + metrics → /__bext/ endpoints
//!          → static files → ISR cache → proxy → worker pool
//! ```
//!
//! (The Host router and rate limiter go in front, for multi-app mode.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::access_log::{Logged, Record};
use crate::admin::{self, Admin};
use crate::body::{self, Body};
use crate::cache::{Fill, IsrCache, respond};
use crate::listener::Handler;
use crate::metrics::Metrics;
use crate::proxy::{ClientInfo, ServedBy, headers};
use crate::statics::{self, Outcome, StaticFiles};

/// Everything that answers requests for one app.
#[derive(Debug)]
pub struct AppService {
    pub admin: Admin,
    pub statics: StaticFiles,
    /// The way to the app's workers; `None` for a static site.
    pub fill: Option<Arc<dyn Fill>>,
    /// `None` when `[cache.isr] enabled = false`.
    pub cache: Option<Arc<IsrCache>>,
    pub metrics: Arc<Metrics>,
    pub access_log: bool,
}

impl std::fmt::Debug for dyn Fill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fill")
    }
}

impl AppService {
    async fn respond(&self, req: Request<Incoming>, client: &ClientInfo) -> Response<Body> {
        // bext's own endpoints first: they are never the app's, and never
        // cached.
        if req.uri().path().starts_with(admin::PREFIX) {
            return self.admin.handle(req.map(body::incoming)).await;
        }
        // Static files: answered from disk without a worker hop.
        if let Outcome::Response(response) = self.statics.serve(&req) {
            return response;
        }
        let Some(fill) = &self.fill else {
            return statics::plain(StatusCode::NOT_FOUND, "not found\n");
        };
        let mut req = req.map(body::incoming);
        req.extensions_mut().insert(client.clone());
        // The cache in front of the workers; it reaches them through `fill`.
        let mut response = match &self.cache {
            Some(cache) => cache.handle(req, fill).await,
            None => fill.fetch(req).await,
        };
        respond::strip_internal_headers(response.headers_mut());
        response
    }
}

impl Handler for AppService {
    async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let started = Instant::now();
        let client = ClientInfo {
            peer,
            scheme: "http",
            request_id: headers::request_id(req.headers()),
        };
        let record = self.access_log.then(|| Record {
            method: req.method().clone(),
            host: req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| req.uri().host())
                .unwrap_or("")
                .to_string(),
            path: req.uri().path().to_string(),
            status: StatusCode::OK,
            worker: None,
            request_id: client.request_id.clone(),
            started,
        });
        let mut response = self.respond(req, &client).await;
        if let Ok(id) = HeaderValue::from_str(&client.request_id) {
            response.headers_mut().insert(headers::X_REQUEST_ID, id);
        }
        self.metrics.count(response.status());
        let worker = response.extensions().get::<ServedBy>().map(|s| s.0);
        let record = record.map(|mut r| {
            r.status = response.status();
            r.worker = worker;
            r
        });
        response.map(|b| body::boxed(Logged::new(b, record)))
    }
}
