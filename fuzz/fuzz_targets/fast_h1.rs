//! The short way through HTTP/1.1 against hyper: whatever head the short
//! way answers itself, hyper must read as the same request (method,
//! target, version, fields, with `Cookie` lines joined as bext joins them
//! for hyper's requests too), and must not refuse it. A difference would
//! let the two ways disagree about a request, the root of smuggling.
#![no_main]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fuzz_target!(|data: &[u8]| {
    let Some((ours, len)) = bext::listener::read_plain_get(data) else {
        return;
    };
    let head = &data[..len];
    let Some(theirs) = hyper_reads(head) else {
        panic!(
            "hyper refuses a head the short way answers: {:?}",
            String::from_utf8_lossy(head)
        );
    };
    let mut their_headers = theirs.headers;
    bext::proxy::headers::join_cookies(&mut their_headers);
    assert_eq!(ours.method(), theirs.method);
    assert_eq!(ours.uri(), &theirs.uri);
    assert_eq!(ours.version(), theirs.version);
    assert_eq!(ours.headers(), &their_headers);
    // A GET with no body framing: hyper reads the next request from `len`
    // on, as the short way does.
    assert!(!their_headers.contains_key(http::header::CONTENT_LENGTH));
    assert!(!their_headers.contains_key(http::header::TRANSFER_ENCODING));
});

/// The first request hyper's server (with bext's limits) reads from
/// `bytes`, if any.
fn hyper_reads(bytes: &[u8]) -> Option<http::request::Parts> {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
    }
    RUNTIME.with(|runtime| {
        runtime.block_on(async {
            let (mut client, server) = tokio::io::duplex(256 * 1024);
            client.write_all(bytes).await.expect("write");
            client.shutdown().await.expect("shutdown");
            let seen = Arc::new(Mutex::new(None));
            let service = {
                let seen = Arc::clone(&seen);
                hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let seen = Arc::clone(&seen);
                    async move {
                        seen.lock().expect("lock").get_or_insert(req.into_parts().0);
                        Ok::<_, Infallible>(http::Response::new(Empty::<Bytes>::new()))
                    }
                })
            };
            // As bext's listener builds it.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(None)
                // The input ends with the client's write side closed; a
                // request read before that is still answered.
                .half_close(true)
                .max_buf_size(bext::listener::MAX_HEADER_BYTES)
                .max_headers(bext::listener::MAX_HEADERS)
                .serve_connection(TokioIo::new(server), service)
                .await;
            seen.lock().expect("lock").take()
        })
    })
}
