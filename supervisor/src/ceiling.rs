//! Built only with `--features bench-ceiling`, for `bench/ceiling.sh`:
//! answers every request with fixed bytes at one stage of the request
//! path, so that a benchmark shows what the path up to that stage costs
//! against a bare hyper server answering the same bytes. The stage comes
//! from `BEXT_BENCH_CEILING` (read once):
//!
//! - 1: as the listener hands over the request (connection handling:
//!   time bounds, protocol detection, graceful shutdown);
//! - 2: as the app's service takes it (plus the `Cookie` and `Host`
//!   checks and the app's in-flight count);
//! - 3: after the request's bookkeeping (client address, request id, the
//!   access-log record, whose line is written as usual; the status
//!   counters and the `X-Request-Id` field, added after the answer, are
//!   left out, so their cost shows in the next step);
//! - anything else: not at all (the whole path, as in a release build).

use std::sync::OnceLock;

use bytes::Bytes;
use http::{HeaderValue, Response, header};

use crate::body::{self, Body};

/// The stage to answer at (see the module docs); 0 for none.
pub fn stage() -> u8 {
    static STAGE: OnceLock<u8> = OnceLock::new();
    *STAGE.get_or_init(|| {
        std::env::var("BEXT_BENCH_CEILING")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    })
}

/// The answer `bench/bare-server` gives: 1 KiB and the head of a hit.
pub fn fixed_response() -> Response<Body> {
    static BODY: OnceLock<Bytes> = OnceLock::new();
    let bytes = BODY.get_or_init(|| Bytes::from(vec![b'x'; 1024])).clone();
    let mut response = Response::new(body::full(bytes.clone()));
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        (header::CACHE_CONTROL, "public, max-age=3600"),
        (header::AGE, "12"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    for (name, value) in [
        ("x-bext-cache", "HIT"),
        ("cache-status", "bext; hit; ttl=3588"),
        ("x-request-id", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
