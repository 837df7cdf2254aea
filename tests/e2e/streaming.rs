//! Bodies stream through bext in both directions, and WebSockets pass
//! through (issue #2, acceptance 2).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Bext, client, fixture, rss};

#[tokio::test(flavor = "multi_thread")]
async fn sse_arrives_event_by_event() {
    let bext = Bext::run(&fixture("express"), &["--workers", "1"]);
    let started = Instant::now();
    let response = client()
        .get(bext.url("/sse?n=5&interval=300"))
        .send()
        .await
        .expect("GET /sse");
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut stream = response.bytes_stream();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
        // Note when each complete event has arrived.
        while arrivals.len() < text.matches("\n\n").count() {
            arrivals.push(started.elapsed());
        }
    }
    assert_eq!(
        text,
        "data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\n"
    );
    // Buffered, all five would land together after ~1.2 s. Streamed, the
    // first comes at once and the rest ~300 ms apart.
    assert!(
        arrivals[0] < Duration::from_millis(900),
        "first event late: {arrivals:?}"
    );
    let spread = arrivals[4] - arrivals[0];
    assert!(
        spread >= Duration::from_millis(900),
        "events were not streamed one by one: {arrivals:?}"
    );
}

/// An event stream's head reaches the client when the app sends it, not
/// with the first event (which here comes after 30 s).
#[tokio::test(flavor = "multi_thread")]
async fn an_event_streams_head_does_not_wait_for_its_first_event() {
    let bext = Bext::run(&fixture("express"), &["--workers", "1"]);
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        client().get(bext.url("/sse?n=1&first=30000")).send(),
    )
    .await
    .expect("the head waited for the first event")
    .expect("GET /sse");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
}

/// A client that leaves an event stream between events ends it when it
/// leaves: the access line (an incomplete answer) comes then, not at the
/// next event 30 s later.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_stream_ends_when_its_client_leaves() {
    use std::io::{Read, Write};
    let bext = Bext::run(&fixture("express"), &["--workers", "1"]);
    let mut stream = std::net::TcpStream::connect(bext.addr).expect("connect");
    stream
        .write_all(b"GET /sse?n=3&interval=30000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("data: 0") {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).expect("the first event");
        assert!(n > 0, "closed before the first event");
        seen.extend_from_slice(&chunk[..n]);
    }
    drop(stream);
    let line = bext.wait_log(Duration::from_secs(10), |v| {
        v["target"] == "bext::access" && v["path"] == "/sse"
    });
    assert_eq!(line["complete"], false, "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_50_mb_upload_streams_without_growing_the_supervisor() {
    const MB: usize = 1024 * 1024;
    const TOTAL: usize = 50 * MB;
    let bext = Bext::run(&fixture("express"), &["--workers", "1"]);
    let pid = bext.pid();
    // Warm up the connection pools and allocator.
    client().get(bext.url("/")).send().await.expect("warm up");
    let before = rss(pid);

    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss(pid), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let chunk: Vec<u8> = (0..MB).map(|i| (i % 253) as u8).collect();
    let mut expected = Sha256::new();
    for _ in 0..TOTAL / MB {
        expected.update(&chunk);
    }
    let expected = format!("{:x}", expected.finalize());
    let chunks = futures_util::stream::iter(
        (0..TOTAL / MB).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    let response = client()
        .post(bext.url("/upload"))
        .header("content-length", TOTAL.to_string())
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("POST /upload");
    let json: serde_json::Value = response.json().await.expect("json");
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    sampler.join().expect("sampler");

    assert_eq!(json["bytes"].as_u64(), Some(TOTAL as u64));
    assert_eq!(json["sha256"].as_str(), Some(expected.as_str()));
    let growth = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(before);
    assert!(
        growth < 8 * MB as u64,
        "supervisor RSS grew by {} KiB during a 50 MB upload",
        growth / 1024
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_50_mb_download_streams_too() {
    let bext = Bext::run(&fixture("express"), &["--workers", "1"]);
    let mut stream = client()
        .get(bext.url("/download?mb=50"))
        .send()
        .await
        .expect("GET")
        .bytes_stream();
    let mut total = 0usize;
    let mut position = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        for (i, byte) in chunk.iter().enumerate() {
            // The fixture sends byte k of each 64 KiB block as k % 256.
            assert_eq!(*byte as usize, ((position + i) % (64 * 1024)) % 256);
        }
        position += chunk.len();
        total += chunk.len();
    }
    assert_eq!(total, 50 * 1024 * 1024);
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_echo_passes_through() {
    let bext = Bext::run(&fixture("express"), &["--workers", "1"]);
    let (mut socket, response) = tokio_tungstenite::connect_async(format!("ws://{}/ws", bext.addr))
        .await
        .expect("websocket handshake through bext");
    assert_eq!(response.status(), 101);
    socket
        .send(Message::text("hello through bext"))
        .await
        .expect("send");
    let echoed = socket.next().await.expect("a message").expect("ok");
    assert_eq!(echoed, Message::text("hello through bext"));
    socket
        .send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .expect("send binary");
    let echoed = socket.next().await.expect("a message").expect("ok");
    assert_eq!(echoed, Message::binary(vec![0u8, 1, 2, 255]));
    socket.close(None).await.expect("close");
}
