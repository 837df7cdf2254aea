//! The one body type of the request path, and small wrappers around it.
//!
//! Every response bext sends is a [`Body`]: a boxed stream of `Bytes`
//! frames, so proxied, static and generated responses flow through the same
//! layers without buffering.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};

/// Errors a body can fail with mid-stream.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response inside bext.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Boxes a body whose errors are already [`BoxError`]s.
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes, Error = BoxError> + Send + Sync + 'static,
{
    body.boxed()
}

pin_project_lite::pin_project! {
    /// A body that keeps `guard` alive until the body is finished or
    /// dropped: a worker lease stays counted as in flight while its response
    /// streams.
    pub struct WithGuard<B, G> {
        #[pin]
        inner: B,
        guard: G,
    }
}

impl<B, G> WithGuard<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        WithGuard { inner, guard }
    }
}

impl<B, G> http_body::Body for WithGuard<B, G>
where
    B: http_body::Body<Data = Bytes, Error = BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// `prefix`, then the rest of a body: a response that was being read
    /// into memory and turned out too large is sent on without losing what
    /// was already read.
    pub struct Prefixed {
        prefix: Option<Bytes>,
        #[pin]
        rest: Body,
    }
}

impl Prefixed {
    pub fn new(prefix: Bytes, rest: Body) -> Self {
        Prefixed {
            prefix: Some(prefix),
            rest,
        }
    }
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.prefix.take() {
            Some(prefix) => Poll::Ready(Some(Ok(Frame::data(prefix)))),
            None => this.rest.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }
}

/// A client's request body as a [`Body`] (a concrete function, so futures
/// holding it stay provably `Send`).
pub fn incoming(body: hyper::body::Incoming) -> Body {
    body.map_err(|e| Box::new(e) as BoxError).boxed()
}
