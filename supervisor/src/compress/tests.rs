use std::io::Read as _;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::BodyExt;

use super::*;

fn accepted(value: &str) -> Accepted {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_str(value).expect("valid"),
    );
    Accepted::parse(&headers)
}

pub(crate) fn decode(coding: Coding, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        Coding::Zstd => out = zstd::decode_all(data).expect("zstd"),
        Coding::Br => {
            brotli::BrotliDecompress(&mut &data[..], &mut out).expect("br");
        }
        Coding::Gzip => {
            flate2::read::GzDecoder::new(data)
                .read_to_end(&mut out)
                .expect("gzip");
        }
    }
    out
}

/// Acceptance 4: negotiation, table-driven.
#[test]
fn negotiation_follows_q_values_star_and_identity() {
    use Coding::*;
    let table: &[(&str, Option<Coding>, bool)] = &[
        // (Accept-Encoding, chosen, identity refused)
        ("gzip, deflate, br, zstd", Some(Zstd), false),
        ("gzip, deflate, br", Some(Br), false),
        ("gzip", Some(Gzip), false),
        ("x-gzip", Some(Gzip), false),
        ("GZIP", Some(Gzip), false),
        ("deflate", None, false),
        ("", None, false),
        ("br;q=0.5, gzip;q=0.8", Some(Gzip), false),
        ("br;q=1.0, gzip;q=0.999", Some(Br), false),
        ("zstd;q=0, br", Some(Br), false),
        ("br;q=0, gzip;q=0, zstd;q=0", None, false),
        ("*", Some(Zstd), false),
        ("*;q=0.5, gzip", Some(Gzip), false),
        ("gzip;q=0, *", Some(Zstd), false),
        ("*;q=0", None, true),
        ("identity;q=0, gzip", Some(Gzip), true),
        ("identity;q=0, *;q=0.1", Some(Zstd), true),
        ("*;q=0, identity", None, false),
        // Identity named heavier than every coding: identity.
        ("gzip;q=0.5, identity", None, false),
        ("gzip;q=0.5, identity;q=0.4", Some(Gzip), false),
        // Malformed weights drop their item only.
        ("br;q=2, gzip", Some(Gzip), false),
        ("br;q=0.5000, gzip;q=0.1", Some(Gzip), false),
        ("br;q=abc", None, false),
        ("br;q=1.5, gzip;q=-1", None, false),
        ("  br ; q=0.7 ,gzip;Q=0.6", Some(Br), false),
        // The first mention of a coding counts.
        ("br;q=0, br", None, false),
    ];
    for (header, chosen, refused) in table {
        let a = accepted(header);
        assert_eq!(
            a.best_among(&STREAMED_ORDER),
            *chosen,
            "Accept-Encoding: {header}"
        );
        assert_eq!(a.identity_refused(), *refused, "Accept-Encoding: {header}");
    }
    assert_eq!(
        Accepted::parse(&HeaderMap::new()).best_among(&STREAMED_ORDER),
        None,
        "no header"
    );
    // Equal weights: the caller's order decides; a weight beats the order.
    assert_eq!(
        accepted("gzip, br, zstd").best_among(&STORED_ORDER),
        Some(Coding::Br)
    );
    assert_eq!(
        accepted("br;q=0.9, zstd").best_among(&STORED_ORDER),
        Some(Coding::Zstd)
    );
    assert_eq!(
        accepted("zstd").best_among(&[Coding::Br, Coding::Gzip]),
        None
    );
    // Several lines are one list.
    let mut headers = HeaderMap::new();
    headers.append(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("gzip;q=0.2"),
    );
    headers.append(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("br;q=0.3"),
    );
    assert_eq!(
        Accepted::parse(&headers).best_among(&STREAMED_ORDER),
        Some(Br)
    );
}

fn response_headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    h
}

/// Acceptance 4: which responses are compressed.
#[test]
fn only_candidates_are_compressed() {
    let settings = Settings::default();
    let all = accepted("gzip, br, zstd");
    let html = [("content-type", "text/html; charset=utf-8")];
    type Case<'a> = (StatusCode, &'a [(&'a str, &'a str)], bool, Decision);
    let table: &[Case<'_>] = &[
        (StatusCode::OK, &html, false, Decision::Encode(Coding::Zstd)),
        (
            StatusCode::NOT_FOUND,
            &html,
            false,
            Decision::Encode(Coding::Zstd),
        ),
        // HEAD: no body, but the same Vary as a GET.
        (StatusCode::OK, &html, true, Decision::Vary),
        (StatusCode::PARTIAL_CONTENT, &html, false, Decision::Leave),
        (StatusCode::NOT_MODIFIED, &html, false, Decision::Leave),
        (StatusCode::NO_CONTENT, &html, false, Decision::Leave),
        (
            StatusCode::SWITCHING_PROTOCOLS,
            &html,
            false,
            Decision::Leave,
        ),
        (
            StatusCode::OK,
            &[("content-type", "text/html"), ("content-encoding", "br")],
            false,
            Decision::Leave,
        ),
        (
            StatusCode::OK,
            &[
                ("content-type", "text/html"),
                ("content-encoding", "identity"),
            ],
            false,
            Decision::Encode(Coding::Zstd),
        ),
        (
            StatusCode::OK,
            &[
                ("content-type", "text/html"),
                ("cache-control", "public, No-Transform"),
            ],
            false,
            Decision::Leave,
        ),
        (
            StatusCode::OK,
            &[
                ("content-type", "text/html"),
                ("content-range", "bytes 0-1/2"),
            ],
            false,
            Decision::Leave,
        ),
        (
            StatusCode::OK,
            &[("content-type", "image/png")],
            false,
            Decision::Leave,
        ),
        (StatusCode::OK, &[], false, Decision::Leave),
        (
            StatusCode::OK,
            &[("content-type", "text/html"), ("content-length", "100")],
            false,
            Decision::Leave,
        ),
        (
            StatusCode::OK,
            &[("content-type", "text/html"), ("content-length", "5000")],
            false,
            Decision::Encode(Coding::Zstd),
        ),
        (
            StatusCode::OK,
            &[("content-type", "text/event-stream")],
            false,
            Decision::Encode(Coding::Zstd),
        ),
        (
            StatusCode::OK,
            &[("content-type", "application/ld+json")],
            false,
            Decision::Encode(Coding::Zstd),
        ),
        (
            StatusCode::OK,
            &[("content-type", "image/svg+xml")],
            false,
            Decision::Encode(Coding::Zstd),
        ),
    ];
    for (status, headers, head, expected) in table {
        let h = response_headers(headers);
        assert_eq!(
            decide(&settings, &all, &STREAMED_ORDER, *status, &h, *head),
            *expected,
            "{status} {headers:?} head={head}"
        );
    }
    // Digests of the sent bytes would be wrong after compression.
    for digest in ["content-digest", "repr-digest", "digest", "content-md5"] {
        let h = response_headers(&[("content-type", "text/html"), (digest, "sha-256=:x:")]);
        assert_eq!(
            decide(&settings, &all, &STREAMED_ORDER, StatusCode::OK, &h, false),
            Decision::Leave,
            "{digest}"
        );
    }
    // A request with `Cache-Control: no-transform`.
    let mut request = HeaderMap::new();
    request.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
    request.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    let h = response_headers(&html);
    assert_eq!(
        decide(
            &settings,
            &Accepted::parse(&request),
            &STREAMED_ORDER,
            StatusCode::OK,
            &h,
            false
        ),
        Decision::Leave
    );
    // A client that accepts nothing bext makes: Vary only.
    let h = response_headers(&html);
    assert_eq!(
        decide(
            &settings,
            &accepted("deflate"),
            &STREAMED_ORDER,
            StatusCode::OK,
            &h,
            false
        ),
        Decision::Vary
    );
    // Refusing identity lifts the minimum size.
    let small = response_headers(&[("content-type", "text/html"), ("content-length", "10")]);
    assert_eq!(
        decide(
            &settings,
            &accepted("identity;q=0, gzip"),
            &STREAMED_ORDER,
            StatusCode::OK,
            &small,
            false
        ),
        Decision::Encode(Coding::Gzip)
    );
    let off = Settings {
        enabled: false,
        ..settings
    };
    assert_eq!(
        decide(&off, &all, &STREAMED_ORDER, StatusCode::OK, &h, false),
        Decision::Leave
    );
}

#[test]
fn compressible_types() {
    for t in [
        "text/html; charset=utf-8",
        "TEXT/CSS",
        "application/json",
        "application/manifest+json",
        "application/rss+XML",
        "application/javascript",
        "image/svg+xml",
        "application/wasm",
        "font/ttf",
    ] {
        assert!(compressible(t), "{t}");
    }
    for t in [
        "image/png",
        "video/mp4",
        "application/zip",
        "font/woff2",
        "",
        "json",
        "application/octet-stream",
    ] {
        assert!(!compressible(t), "{t}");
    }
}

#[test]
fn compressed_headers_are_marked() {
    let mut h = response_headers(&[
        ("content-type", "text/html"),
        ("etag", "\"abc\""),
        ("vary", "rsc"),
        ("accept-ranges", "bytes"),
        ("content-length", "5000"),
    ]);
    mark_encoded(&mut h, Coding::Br, None);
    assert_eq!(h["content-encoding"], "br");
    assert_eq!(h["etag"], "W/\"abc\"");
    assert!(!h.contains_key("accept-ranges"));
    assert!(!h.contains_key("content-length"));
    let vary: Vec<_> = h.get_all("vary").iter().collect();
    assert_eq!(vary, ["rsc", "accept-encoding"]);
    // Twice changes nothing more.
    mark_encoded(&mut h, Coding::Br, Some(42));
    assert_eq!(h["etag"], "W/\"abc\"");
    assert_eq!(h.get_all("vary").iter().count(), 2);
    assert_eq!(h["content-length"], "42");
    let mut star = response_headers(&[("vary", "*")]);
    add_vary(&mut star);
    assert_eq!(star.get_all("vary").iter().count(), 1);
}

#[test]
fn whole_bodies_round_trip_in_every_coding() {
    let page = "<html><body>".to_string() + &"<p>hello, compression</p>".repeat(400);
    for coding in Coding::ALL {
        for levels in [DEFAULT_STORED, DEFAULT_STREAMED] {
            let packed = encode_all(page.as_bytes(), coding, &levels).expect("encodes");
            assert!(
                packed.len() < page.len() / 10,
                "{coding:?}: {}",
                packed.len()
            );
            assert_eq!(decode(coding, &packed), page.as_bytes(), "{coding:?}");
        }
    }
}

/// Acceptance 4 (unit): each chunk the app sends comes out, decodable,
/// before the next is sent — nothing waits in the compressor.
#[tokio::test]
async fn a_streamed_body_is_flushed_whenever_the_app_pauses() {
    for coding in Coding::ALL {
        let (mut tx, rx) = futures_channel_body();
        let mut out = stream(
            rx,
            coding,
            &DEFAULT_STREAMED,
            stream_slot().expect("a slot"),
        );
        let mut received = Vec::new();
        for i in 0..3 {
            let event = format!("data: event {i}\n\n");
            tx.send(event.clone()).await;
            // Everything sent so far decodes from what came out so far.
            loop {
                let frame = tokio::time::timeout(Duration::from_secs(5), out.frame())
                    .await
                    .expect("a frame before the next event")
                    .expect("not the end")
                    .expect("no error");
                received.extend_from_slice(&frame.into_data().expect("data"));
                if prefix_decodes(coding, &received).ends_with(event.as_bytes()) {
                    break;
                }
            }
        }
        drop(tx);
        while let Some(frame) = out.frame().await {
            received.extend_from_slice(&frame.expect("no error").into_data().expect("data"));
        }
        assert_eq!(
            decode(coding, &received),
            b"data: event 0\n\ndata: event 1\n\ndata: event 2\n\n"
        );
    }
}

/// What a stream decoder yields from an unfinished stream.
fn prefix_decodes(coding: Coding, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut read = |r: &mut dyn std::io::Read| {
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
    };
    match coding {
        Coding::Zstd => read(&mut zstd::stream::read::Decoder::new(data).expect("zstd")),
        Coding::Br => read(&mut brotli::Decompressor::new(data, 4096)),
        Coding::Gzip => read(&mut flate2::read::GzDecoder::new(data)),
    }
    out
}

/// A body fed by hand, one chunk at a time.
struct Sender(tokio::sync::mpsc::Sender<bytes::Bytes>);

impl Sender {
    async fn send(&mut self, text: String) {
        self.0.send(text.into()).await.expect("receiver alive");
    }
}

fn futures_channel_body() -> (Sender, crate::body::Body) {
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
    let frames = tokio_stream_from(rx);
    (
        Sender(tx),
        crate::body::boxed(http_body_util::StreamBody::new(frames)),
    )
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
) -> impl futures_util::Stream<Item = Result<http_body::Frame<bytes::Bytes>, crate::body::BoxError>>
+ Send
+ Sync
+ 'static {
    futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|c| c.map(|c| Ok(http_body::Frame::data(c))))
    })
}
