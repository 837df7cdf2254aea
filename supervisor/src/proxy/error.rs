//! Upstream failures, and the one place they become responses.
//!
//! Each variant knows whose fault it was and whether the request may be
//! retried on another worker; clients get a status and a short body, the log
//! gets the details.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{self, Body};
use crate::pool::upstream::UpstreamError;

/// Why a request could not be answered by a worker.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no worker became ready within {0:?}")]
    NoReadyWorker(Duration),
    /// `bext dev`: the app crashed or failed to start, and waits for a
    /// change; why (with its last output) is the developer's to see.
    #[error("the app is not running: {0}")]
    Down(std::sync::Arc<str>),
    #[error("worker {worker}: {}", chain(source))]
    Connect {
        worker: usize,
        source: UpstreamError,
    },
    #[error(
        "worker {worker} closed the connection before answering: {}",
        chain(source)
    )]
    Closed {
        worker: usize,
        source: UpstreamError,
    },
    #[error("worker {worker} sent an invalid response: {}", chain(source))]
    Invalid {
        worker: usize,
        source: UpstreamError,
    },
    #[error(
        "the client's request body failed on its way to worker {worker}: {}",
        chain(source)
    )]
    RequestBody {
        worker: usize,
        source: UpstreamError,
    },
    #[error("worker {worker} did not answer within {timeout:?}")]
    Timeout { worker: usize, timeout: Duration },
    #[error("the client left before a worker was free")]
    ClientLeft,
}

impl ProxyError {
    /// Classifies a failure to get a response head from `worker`.
    pub fn from_upstream(worker: usize, source: UpstreamError) -> Self {
        match source {
            UpstreamError::Connect { .. } => ProxyError::Connect { worker, source },
            UpstreamError::Invalid(_) | UpstreamError::Incomplete(_) => {
                ProxyError::Invalid { worker, source }
            }
            UpstreamError::RequestBody(_) => ProxyError::RequestBody { worker, source },
            UpstreamError::Timeout(timeout) => ProxyError::Timeout { worker, timeout },
            UpstreamError::Send(_) => ProxyError::Closed { worker, source },
        }
    }

    /// May an idempotent request without a body be sent again, to another
    /// worker? Only when the worker surely did not answer.
    pub fn retryable(&self) -> bool {
        matches!(self, ProxyError::Connect { .. } | ProxyError::Closed { .. })
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoReadyWorker(_) | ProxyError::Down(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::RequestBody { .. } => StatusCode::BAD_REQUEST,
            ProxyError::ClientLeft => StatusCode::from_u16(crate::access_log::CLIENT_CLOSED)
                .unwrap_or(StatusCode::BAD_REQUEST),
            ProxyError::Connect { .. } | ProxyError::Closed { .. } | ProxyError::Invalid { .. } => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    /// The response the client sees; the error itself goes to the log.
    pub fn into_response(self, request_id: &str) -> Response<Body> {
        let status = self.status();
        if let ProxyError::Down(why) = &self {
            // Said once in the log when it happened; every request shows it.
            let mut response = Response::new(body::full(format!(
                "503 service unavailable: the app is not running (bext dev)\n\n{why}\n\n\
                 Save a change to the app and bext starts it again.\n"
            )));
            *response.status_mut() = status;
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return response;
        }
        if matches!(self, ProxyError::ClientLeft) {
            // (Any client can cause it: not a warning.)
            tracing::debug!(request_id, "{self}");
        } else {
            tracing::warn!(
                request_id,
                status = status.as_u16(),
                "upstream failure: {self}"
            );
        }
        let text = match status {
            StatusCode::SERVICE_UNAVAILABLE => "503 service unavailable: no worker is ready\n",
            StatusCode::GATEWAY_TIMEOUT => "504 gateway timeout\n",
            StatusCode::BAD_REQUEST => "400 bad request: the request body was cut short\n",
            _ => "502 bad gateway\n",
        };
        let mut response = Response::new(body::full(text));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// An error and its causes, "a: b: c".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
