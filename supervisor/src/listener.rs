//! Accepting client connections and serving HTTP/1.1 and h2c on them.
//!
//! Owns sockets and protocol settings (header timeouts, limits), and the
//! graceful part of shutdown: stop accepting, tell every connection to finish
//! its in-flight requests, wait for them up to the grace period. It hands
//! each request to a [`Handler`] and knows nothing of what happens next.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::body::Body;

/// A client has this long to send its request headers (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head bext reads (431 beyond).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Largest number of request headers.
pub const MAX_HEADERS: usize = 128;

/// What the listener calls for every request.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        req: http::Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = http::Response<Body>> + Send + 'static;
}

/// When to stop serving.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Stop accepting and drain.
    pub graceful: CancellationToken,
    /// Stop waiting for in-flight requests.
    pub immediate: CancellationToken,
}

/// Serves `listener` until `shutdown.graceful` is cancelled, then drains:
/// in-flight requests get up to `grace` (or until `shutdown.immediate`) to
/// finish. Returns whether every connection finished in time.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    shutdown: &Shutdown,
    grace: Duration,
) -> bool {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);
    let graceful = GracefulShutdown::new();

    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let handler = Arc::clone(&handler);
                let service = service_fn(move |req| {
                    let handler = Arc::clone(&handler);
                    async move { Ok::<_, Infallible>(handler.handle(req, peer).await) }
                });
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        // Resets and early closes are the client's business.
                        debug!(%peer, "connection ended: {e}");
                    }
                });
            }
            _ = shutdown.graceful.cancelled() => break,
        }
    }
    drop(listener);
    info!("stopped accepting; draining in-flight requests (up to {grace:?})");
    tokio::select! {
        drained = tokio::time::timeout(grace, graceful.shutdown()) => {
            if drained.is_err() {
                warn!("grace period over with requests still in flight");
            }
            drained.is_ok()
        }
        _ = shutdown.immediate.cancelled() => {
            warn!("not waiting for in-flight requests");
            false
        }
    }
}
