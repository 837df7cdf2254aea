//! Compression at the edge (issue #13): real apps, real clients sending
//! `Accept-Encoding`, bodies decoded with the codecs' own decoders.

use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

use crate::support::{Bext, client, fixture};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Coding {
    Zstd,
    Br,
    Gzip,
}

impl Coding {
    fn name(self) -> &'static str {
        match self {
            Coding::Zstd => "zstd",
            Coding::Br => "br",
            Coding::Gzip => "gzip",
        }
    }
}

fn decode(coding: Coding, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        Coding::Zstd => out = zstd::decode_all(data).expect("zstd"),
        Coding::Br => brotli::BrotliDecompress(&mut &data[..], &mut out).expect("br"),
        Coding::Gzip => {
            flate2::read::GzDecoder::new(data)
                .read_to_end(&mut out)
                .expect("gzip");
        }
    }
    out
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("ascii").to_string())
        .unwrap_or_default()
}

/// The origin fixture (every header chosen per request) in a directory of
/// its own.
fn origin() -> (tempfile::TempDir, Bext) {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = fixture("origin");
    for file in ["package.json", "server.js"] {
        std::fs::copy(origin.join(file), dir.path().join(file)).expect("copy");
    }
    let bext = Bext::run(dir.path(), &["--workers", "1"]);
    (dir, bext)
}

/// `bext_cache_bytes` of the app.
async fn cache_bytes(bext: &Bext) -> i64 {
    let metrics = client()
        .get(bext.url("/__bext/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    metrics
        .lines()
        .find(|l| l.starts_with("bext_cache_bytes"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("bext_cache_bytes in metrics")
}

async fn renders(bext: &Bext, path: &str) -> u64 {
    let json: Value = client()
        .get(bext.url(&format!("/count?path={path}")))
        .send()
        .await
        .expect("count")
        .json()
        .await
        .expect("json");
    json["renders"].as_u64().expect("renders")
}

/// Acceptance 4: one cached entry is served as br, zstd, gzip and identity
/// to four clients, all HITs after the first fill, the app rendering once;
/// each variant decodes to the identity body.
#[tokio::test(flavor = "multi_thread")]
async fn issue13_one_cached_entry_is_served_in_every_coding_from_one_render() {
    let (_dir, bext) = origin();
    let path = "/page/compressed?cc=public,max-age=300&size=20000&etag=1";
    let http = client();
    let first = http
        .get(bext.url(path))
        .header("accept-encoding", "identity")
        .send()
        .await
        .expect("GET");
    assert_eq!(header(&first, "x-bext-cache"), "MISS");
    assert_eq!(header(&first, "content-encoding"), "");
    assert_eq!(header(&first, "vary"), "accept-encoding");
    let identity = first.bytes().await.expect("body");
    assert_eq!(identity.len(), 20000);
    let bare = cache_bytes(&bext).await;
    let mut variants = 0;
    for (accept, coding) in [
        ("br", Some(Coding::Br)),
        ("zstd, gzip;q=0.5", Some(Coding::Zstd)),
        ("gzip;q=1, br;q=0.5", Some(Coding::Gzip)),
        ("identity", None),
    ] {
        for round in 0..2 {
            // The first request for a coding starts its variant and waits
            // a little for it (on a loaded machine it may get identity,
            // and a later request the variant).
            let deadline = Instant::now() + Duration::from_secs(10);
            let response = loop {
                let response = http
                    .get(bext.url(path))
                    .header("accept-encoding", accept)
                    .send()
                    .await
                    .expect("GET");
                if coding.is_none() || !header(&response, "content-encoding").is_empty() {
                    break response;
                }
                assert_eq!(round, 0, "{accept}: a made variant is served at once");
                assert!(Instant::now() < deadline, "{accept}: never compressed");
            };
            assert_eq!(response.status(), 200);
            assert_eq!(
                header(&response, "x-bext-cache"),
                "HIT",
                "{accept} #{round}"
            );
            let encoding = header(&response, "content-encoding");
            let etag = header(&response, "etag");
            let length = header(&response, "content-length");
            let body = response.bytes().await.expect("body");
            assert_eq!(length, body.len().to_string());
            match coding {
                Some(coding) => {
                    assert_eq!(encoding, coding.name(), "{accept}");
                    assert_eq!(etag, "W/\"r1\"", "a compressed variant's ETag is weak");
                    assert!(body.len() < 1000, "{accept}: {} bytes", body.len());
                    assert_eq!(decode(coding, &body), identity, "{accept}");
                    if round == 0 {
                        variants += body.len() as i64;
                    }
                }
                None => {
                    assert_eq!(encoding, "");
                    assert_eq!(etag, "\"r1\"");
                    assert_eq!(body, identity);
                }
            }
        }
    }
    assert_eq!(
        renders(&bext, "/page/compressed").await,
        1,
        "one render for all"
    );
    // The variants are kept with the entry, counted in the cache's bytes
    // (by the task that made each, just after the answer that waited),
    // each with the head of its hits (its fields, under 2 KiB here).
    let deadline = Instant::now() + Duration::from_secs(10);
    let most = variants + 3 * 2048;
    loop {
        let grown = cache_bytes(&bext).await - bare;
        if grown >= variants {
            assert!(grown <= most, "cache bytes grew by {grown}, over {most}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cache bytes never grew by {variants}: {grown}"
        );
    }
    // A conditional request with the weak tag a compressed client holds is
    // a 304.
    let revalidated = http
        .get(bext.url(path))
        .header("accept-encoding", "br")
        .header("if-none-match", "W/\"r1\"")
        .send()
        .await
        .expect("GET");
    assert_eq!(revalidated.status(), 304);
}

/// Acceptance 4: SSE events arrive one by one through gzip (each is
/// flushed out of the compressor when the app pauses).
#[tokio::test(flavor = "multi_thread")]
async fn issue13_sse_events_arrive_one_by_one_through_gzip() {
    let bext = Bext::run(&fixture("express"), &["--workers", "1"]);
    let started = Instant::now();
    let response = client()
        .get(bext.url("/sse?n=5&interval=300"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("GET /sse");
    assert_eq!(header(&response, "content-type"), "text/event-stream");
    assert_eq!(header(&response, "content-encoding"), "gzip");
    let mut stream = response.bytes_stream();
    let mut decoder = flate2::write::GzDecoder::new(Vec::new());
    let mut arrivals = Vec::new();
    while let Some(chunk) = stream.next().await {
        decoder.write_all(&chunk.expect("chunk")).expect("gzip");
        decoder.flush().expect("gzip");
        let text = String::from_utf8_lossy(decoder.get_ref()).to_string();
        while arrivals.len() < text.matches("\n\n").count() {
            arrivals.push(started.elapsed());
        }
    }
    let text = decoder.finish().expect("a complete gzip stream");
    assert_eq!(
        String::from_utf8_lossy(&text),
        "data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\n"
    );
    assert_eq!(arrivals.len(), 5);
    assert!(
        arrivals[0] < Duration::from_millis(900),
        "first event late: {arrivals:?}"
    );
    assert!(
        arrivals[4] - arrivals[0] >= Duration::from_millis(900),
        "events were buffered in the compressor: {arrivals:?}"
    );
}

/// The app is asked for identity bodies (bext compresses), and an answer
/// that is not stored is compressed as it streams.
#[tokio::test(flavor = "multi_thread")]
async fn issue13_the_app_is_asked_for_identity_and_uncached_answers_are_compressed() {
    let (_dir, bext) = origin();
    // The origin writes the value of the header it varies on into the body.
    let response = client()
        .get(bext.url("/page/dynamic?cc=no-store&vary=Accept-Encoding&size=5000"))
        .header("accept-encoding", "gzip, br")
        .send()
        .await
        .expect("GET");
    assert_eq!(header(&response, "x-bext-cache"), "BYPASS");
    assert_eq!(header(&response, "content-encoding"), "br");
    assert_eq!(header(&response, "content-length"), "", "streamed");
    assert_eq!(header(&response, "vary"), "Accept-Encoding");
    let body = response.bytes().await.expect("body");
    let text = String::from_utf8(decode(Coding::Br, &body)).expect("utf-8");
    assert!(
        text.starts_with("/page/dynamic render 1 Accept-Encoding=identity\n"),
        "{}",
        &text[..60]
    );
    assert_eq!(text.len(), 5000);
    assert!(body.len() < 200, "{} bytes", body.len());
}

/// Static files: a precompressed sibling first, else a copy compressed
/// once; ranges and HEAD get the file's own bytes.
#[tokio::test(flavor = "multi_thread")]
async fn issue13_static_files_use_siblings_or_a_compressed_copy() {
    let site = tempfile::tempdir().expect("tempdir");
    let css = ".rule { color: red; margin: 0 auto; }\n".repeat(200);
    std::fs::write(site.path().join("index.html"), "<h1>site</h1>").expect("write");
    std::fs::write(site.path().join("site.css"), &css).expect("write");
    let js = "console.log('bundled');\n".repeat(300);
    std::fs::write(site.path().join("app.js"), &js).expect("write");
    let js_zst = zstd::bulk::compress(js.as_bytes(), 19).expect("zstd");
    std::fs::write(site.path().join("app.js.zst"), &js_zst).expect("write");
    let bext = Bext::run(site.path(), &[]);
    let http = client();

    // The precompressed sibling, byte for byte.
    let sibling = http
        .get(bext.url("/app.js"))
        .header("accept-encoding", "gzip, br, zstd")
        .send()
        .await
        .expect("GET");
    assert_eq!(header(&sibling, "content-encoding"), "zstd");
    assert_eq!(sibling.bytes().await.expect("body"), js_zst);

    // No sibling for br: a compressed copy, the same on every request.
    let mut copies = Vec::new();
    for coding in [Coding::Br, Coding::Gzip, Coding::Br] {
        let response = http
            .get(bext.url("/site.css"))
            .header("accept-encoding", coding.name())
            .send()
            .await
            .expect("GET");
        assert_eq!(header(&response, "content-encoding"), coding.name());
        assert_eq!(header(&response, "vary"), "accept-encoding");
        assert!(header(&response, "etag").starts_with("W/"));
        assert_eq!(header(&response, "accept-ranges"), "");
        let body = response.bytes().await.expect("body");
        assert_eq!(decode(coding, &body), css.as_bytes());
        copies.push(body);
    }
    assert_eq!(copies[0], copies[2], "the copy is remembered");

    // A range is of the file's own bytes.
    let range = http
        .get(bext.url("/site.css"))
        .header("accept-encoding", "br")
        .header("range", "bytes=0-9")
        .send()
        .await
        .expect("GET");
    assert_eq!(range.status(), 206);
    assert_eq!(header(&range, "content-encoding"), "");
    assert_eq!(range.bytes().await.expect("body"), &css.as_bytes()[..10]);

    // Below the minimum size: sent as it is, still varying.
    let small = http
        .get(bext.url("/index.html"))
        .header("accept-encoding", "br")
        .send()
        .await
        .expect("GET");
    assert_eq!(header(&small, "content-encoding"), "");
    assert_eq!(header(&small, "vary"), "accept-encoding");
}

/// `[compression] enabled = false`: the client's Accept-Encoding reaches
/// the app, and nothing is compressed.
#[tokio::test(flavor = "multi_thread")]
async fn issue13_compression_can_be_turned_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = fixture("origin");
    for file in ["package.json", "server.js"] {
        std::fs::copy(origin.join(file), dir.path().join(file)).expect("copy");
    }
    std::fs::write(
        dir.path().join("bext.config.toml"),
        "[compression]\nenabled = false\n",
    )
    .expect("config");
    let bext = Bext::run(dir.path(), &["--workers", "1"]);
    let response = client()
        .get(bext.url("/page/plain?cc=public,max-age=60&size=5000"))
        .header("accept-encoding", "br")
        .send()
        .await
        .expect("GET");
    assert_eq!(header(&response, "content-encoding"), "");
    assert_eq!(header(&response, "vary"), "");
    assert_eq!(response.bytes().await.expect("body").len(), 5000);
}
