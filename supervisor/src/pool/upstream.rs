//! Pooled HTTP/1.1 keep-alive connections to one worker's Unix socket.
//!
//! A small pool of `hyper::client::conn::http1` senders rather than
//! `hyper_util`'s general-purpose client: there is exactly one destination
//! per pool, so none of its per-request key hashing, lazy connectors or
//! checkout futures are needed (measured: about a microsecond of CPU per
//! proxied request on this machine, see bench/RESULTS.md). Each connection
//! is driven by its own task, which notices a worker closing an idle
//! connection; a sender returns to the pool only once its response body has
//! been read to the end.
//!
//! Idle connections are kept per shard ([`crate::shards`]): a connection's
//! task runs on the shard that opened it, so it is only handed to requests
//! on that shard, and a request never wakes another thread.
//!
//! The upstream timeout is one timer per connection, moved to each new
//! request's deadline: a later deadline on a timer that has not fired is
//! cheap, where a fresh timer per request is an insertion into the
//! runtime's timer wheel and a removal (measured with
//! bench/proxy-instructions.sh: 250 fewer instructions per proxied
//! request).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::time::Sleep;

use crate::body::{Body, BoxError};

/// Idle upstream connections older than this are not reused: Node closes
/// idle connections after its `keepAliveTimeout` (5 s by default).
pub const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Idle connections kept per worker and shard.
pub const UPSTREAM_MAX_IDLE: usize = 256;

/// Why a request could not be sent to the worker.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not start HTTP on {}: {source}", path.display())]
    Handshake { path: PathBuf, source: hyper::Error },
    /// The request failed before a response head arrived.
    #[error("the connection failed before a response: {0}")]
    Send(#[source] hyper::Error),
    /// No response head arrived in time.
    #[error("no response within {0:?}")]
    Timeout(Duration),
}

impl UpstreamError {
    /// The worker surely never saw the request.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. } | UpstreamError::Handshake { .. }
        )
    }
}

/// The connection pool for one worker.
#[derive(Debug, Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    /// Idle connections, one list per shard (slot: [`slot`]).
    idle: Box<[Mutex<Vec<Idle>>]>,
}

#[derive(Debug)]
struct Idle {
    conn: Conn,
    since: Instant,
}

/// One open connection: its sender, and its timer for the request on it.
#[derive(Debug)]
struct Conn {
    sender: SendRequest<Body>,
    timer: Pin<Box<Sleep>>,
}

impl Upstream {
    pub fn new(path: PathBuf) -> Self {
        Upstream {
            inner: Arc::new(Inner {
                path,
                idle: (0..=crate::shards::default_count().get())
                    .map(|_| Mutex::new(Vec::new()))
                    .collect(),
            }),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.inner.path
    }

    /// Sends `req` on a pooled (or new) connection; resolves with the
    /// response head, or fails after `timeout` without one.
    pub async fn send(
        &self,
        req: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let slot = self.inner.slot();
        let mut conn = loop {
            match self.checkout(slot) {
                // A connection whose last response just ended may need a
                // moment to become ready; a closed one errors at once.
                Some(mut conn) => {
                    conn.timer.as_mut().reset(deadline);
                    let ready = tokio::select! {
                        biased;
                        ready = conn.sender.ready() => ready.is_ok(),
                        () = conn.timer.as_mut() => return Err(UpstreamError::Timeout(timeout)),
                    };
                    if ready {
                        break conn;
                    }
                }
                // Boxed: the common case, a pooled connection, should not
                // carry a connect's state in every request's future.
                None => {
                    break tokio::time::timeout_at(deadline, Box::pin(self.connect(deadline)))
                        .await
                        .map_err(|_| UpstreamError::Timeout(timeout))??;
                }
            }
        };
        let response = tokio::select! {
            biased;
            sent = conn.sender.send_request(req) => sent.map_err(UpstreamError::Send)?,
            () = conn.timer.as_mut() => return Err(UpstreamError::Timeout(timeout)),
        };
        // An upgraded connection belongs to the tunnel (the upgrade handle
        // stays in the response's extensions).
        let reusable = response.status() != StatusCode::SWITCHING_PROTOCOLS;
        let (parts, body) = response.into_parts();
        let mut body = UpstreamBody {
            body,
            conn: reusable.then_some(conn),
            pool: Arc::clone(&self.inner),
            slot,
        };
        if http_body::Body::is_end_stream(&body.body)
            && let Some(conn) = body.conn.take()
        {
            // Nothing to read (204, 304, empty): reusable now.
            self.inner.checkin(slot, conn);
        }
        Ok(Response::from_parts(parts, body))
    }

    /// An idle connection that is still open and fresh, if any.
    fn checkout(&self, slot: usize) -> Option<Conn> {
        let mut idle = self.inner.idle[slot]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while let Some(entry) = idle.pop() {
            if !entry.conn.sender.is_closed() && entry.since.elapsed() < UPSTREAM_IDLE_TIMEOUT {
                return Some(entry.conn);
            }
        }
        None
    }

    /// A new connection, its timer set to `deadline`.
    async fn connect(&self, deadline: tokio::time::Instant) -> Result<Conn, UpstreamError> {
        let path = &self.inner.path;
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| UpstreamError::Connect {
                path: path.clone(),
                source,
            })?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Handshake {
                path: path.clone(),
                source,
            })?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!("upstream connection ended: {e}");
            }
        });
        Ok(Conn {
            sender,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
        })
    }
}

impl Inner {
    /// The calling shard's idle list (more shards than slots share them).
    fn slot(&self) -> usize {
        crate::shards::current() % self.idle.len()
    }

    fn checkin(&self, slot: usize, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        let mut idle = self.idle[slot].lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < UPSTREAM_MAX_IDLE {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }
}

pin_project_lite::pin_project! {
    /// A worker's response body; gives its connection back to the pool once
    /// read to the end (a body dropped half-way closes the connection).
    #[derive(Debug)]
    pub struct UpstreamBody {
        #[pin]
        body: Incoming,
        conn: Option<Conn>,
        pool: Arc<Inner>,
        // The idle list it came from.
        slot: usize,
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.body.as_mut().poll_frame(cx);
        let finished = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => http_body::Body::is_end_stream(&*this.body),
            Poll::Ready(Some(Err(_))) => {
                this.conn.take();
                false
            }
            Poll::Pending => false,
        };
        if finished && let Some(conn) = this.conn.take() {
            this.pool.checkin(*this.slot, conn);
        }
        polled.map(|frame| frame.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
