//! The wiring module: the only place that knows every layer of the request
//! path and puts them in order. For one app:
//!
//! ```text
//! listener → request id + access log → static files → proxy → worker pool
//! ```
//!
//! (The ISR cache will sit between static files and the proxy; the Host
//! router and rate limiter in front, for multi-app mode.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::access_log::{Logged, Record};
use crate::body::{self, Body};
use crate::listener::Handler;
use crate::proxy::{ClientInfo, Proxy, headers};
use crate::statics::{self, Outcome, StaticFiles};

/// Everything that answers requests for one app.
#[derive(Debug)]
pub struct AppService {
    statics: StaticFiles,
    /// `None` for a static site: no workers behind it.
    proxy: Option<Proxy>,
    access_log: bool,
}

impl AppService {
    pub fn new(statics: StaticFiles, proxy: Option<Proxy>, access_log: bool) -> Self {
        AppService {
            statics,
            proxy,
            access_log,
        }
    }

    async fn respond(
        &self,
        req: Request<Incoming>,
        client: &ClientInfo,
    ) -> (Response<Body>, Option<usize>) {
        // Static files first: answered from disk without a worker hop.
        if let Outcome::Response(response) = self.statics.serve(&req) {
            return (response, None);
        }
        // Then the app's workers.
        let Some(proxy) = &self.proxy else {
            return (statics::plain(StatusCode::NOT_FOUND, "not found\n"), None);
        };
        match proxy.forward(req.map(body::boxed), client).await {
            Ok(forwarded) => (forwarded.response, Some(forwarded.worker)),
            Err(e) => (e.into_response(&client.request_id), None),
        }
    }
}

impl Handler for AppService {
    async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        {
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
            let (mut response, worker) = self.respond(req, &client).await;
            if let Ok(id) = HeaderValue::from_str(&client.request_id) {
                response.headers_mut().insert(headers::X_REQUEST_ID, id);
            }
            let record = record.map(|mut r| {
                r.status = response.status();
                r.worker = worker;
                r
            });
            response.map(|b| body::boxed(Logged::new(b, record)))
        }
    }
}
