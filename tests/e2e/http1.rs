//! The short way through HTTP/1.1 (issue 13, a cheaper hit): plain GETs
//! answered at once (fresh hits) on a connection, and everything else
//! handed to hyper with the bytes read, in order, with nothing smuggled,
//! and with the connection's time bounds and graceful shutdown intact.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::cache::renders;
use crate::support::Bext;

const PAGE: &str = "/page/short?cc=public,max-age=3600&size=100";

/// The origin fixture, one worker, the given `[server]` lines.
fn origin(server: &str) -> (tempfile::TempDir, Bext) {
    crate::cache::origin(&format!("[server]\n{server}\n[isolate]\nworkers = 1\n"))
}

/// Stores `PAGE` and checks that it is now a hit.
async fn warm(bext: &Bext) {
    for expected in ["MISS", "HIT"] {
        // The host the raw requests name (it is part of the cache key).
        let response = bext.get_host("x", PAGE).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-bext-cache"], expected);
    }
}

/// One response read off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Every response in `bytes`, framed by `Content-Length` or chunked.
fn answers(mut bytes: &[u8]) -> Vec<Answer> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let end = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("a head: {:?}", String::from_utf8_lossy(bytes)));
        let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
        bytes = &bytes[end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("status line");
        assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
        let status = status_line[9..12].parse().expect("status");
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').expect("a field");
                (n.trim().to_string(), v.trim().to_string())
            })
            .collect();
        let mut answer = Answer {
            status,
            headers,
            body: Vec::new(),
        };
        if let Some(len) = answer.header("content-length") {
            let len: usize = len.parse().expect("length");
            answer.body = bytes[..len].to_vec();
            bytes = &bytes[len..];
        } else if answer.header("transfer-encoding") == Some("chunked") {
            loop {
                let line_end = bytes.windows(2).position(|w| w == b"\r\n").expect("size");
                let size = usize::from_str_radix(
                    std::str::from_utf8(&bytes[..line_end]).expect("hex"),
                    16,
                )
                .expect("chunk size");
                bytes = &bytes[line_end + 2..];
                answer.body.extend_from_slice(&bytes[..size]);
                bytes = &bytes[size + 2..];
                if size == 0 {
                    break;
                }
            }
        }
        out.push(answer);
    }
    out
}

/// Writes `request` on a new connection and reads until the server
/// closes it (10 s at most).
fn exchange(bext: &Bext, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(bext.addr).expect("connect");
    stream.write_all(request).expect("write");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut out = Vec::new();
    stream.read_to_end(&mut out).expect("read to the close");
    out
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n")
}

/// Sends GETs of `first`, then a GET of `then` carrying a request as its
/// body (never to be read as one), then a GET of `last` asking to close,
/// pipelined on one connection; the answers, one per request.
fn pipelined_with_a_body(bext: &Bext, first: &[&str], then: &str, last: &str) -> Vec<Answer> {
    let smuggled = get("/page/smuggled?cc=public,max-age=60", "");
    let mut request: String = first.iter().map(|path| get(path, "")).collect();
    request.push_str(&get(
        then,
        &format!("Content-Length: {}\r\n", smuggled.len()),
    ));
    request.push_str(&smuggled);
    request.push_str(&get(last, "Connection: close\r\n"));
    let bytes = exchange(bext, request.as_bytes());
    let answers = answers(&bytes);
    assert_eq!(
        answers.len(),
        first.len() + 2,
        "one answer per request, none for the body: {:?}",
        String::from_utf8_lossy(&bytes)
    );
    answers
}

/// Pipelined hits are answered in order; a request with a body that
/// follows them goes to hyper with its body, which is never read as a
/// request of its own; the connection closes when asked to.
#[tokio::test(flavor = "multi_thread")]
async fn issue13_pipelined_hits_and_what_follows_them_are_answered_in_order() {
    let (_dir, bext) = origin("");
    warm(&bext).await;
    let answers = pipelined_with_a_body(&bext, &[PAGE; 3], PAGE, PAGE);
    let mut ids = std::collections::HashSet::new();
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(answer.status, 200, "answer {i}");
        assert_eq!(answer.body.len(), 100, "answer {i}");
        assert_eq!(answer.header("x-bext-cache"), Some("HIT"), "answer {i}");
        assert!(answer.header("date").is_some(), "answer {i}");
        assert!(
            ids.insert(
                answer
                    .header("x-request-id")
                    .expect("a request id")
                    .to_string()
            ),
            "answer {i}: a request id of its own"
        );
    }
    assert_eq!(
        renders(&bext, "/page/short").await,
        1,
        "rendered once, then hits"
    );
    assert_eq!(
        renders(&bext, "/page/smuggled").await,
        0,
        "the body was read as a request"
    );
    // Each answer is in the access log, once, under its request id.
    for id in &ids {
        let line = bext.wait_log(Duration::from_secs(5), |v| {
            v["target"] == "bext::access" && v["request_id"] == id.as_str()
        });
        assert_eq!(line["path"], "/page/short", "{line}");
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["bytes"], 100, "{line}");
        assert_eq!(line["complete"], true, "{line}");
    }
    let logged = bext
        .logs()
        .iter()
        .filter(|v| {
            v["target"] == "bext::access" && ids.contains(v["request_id"].as_str().unwrap_or(""))
        })
        .count();
    assert_eq!(logged, ids.len(), "one line per request");
}

/// A hit written as bytes on the short way (the head made once per
/// object and coding) has the fields hyper's way gives the same request,
/// each once: identity and gzip, the page's own `Date` kept.
#[tokio::test(flavor = "multi_thread")]
async fn issue13_a_hit_written_as_bytes_is_the_answer_hypers_way_gives() {
    let (_dir, bext) = origin("");
    const BIG: &str = "/page/written?cc=public,max-age=3600&size=4096";
    for accept in ["", "Accept-Encoding: gzip\r\n"] {
        // Stored, and (gzip) its variant made: hyper's way (TE sends a
        // request there) until the answer is a compressed hit.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let bytes = exchange(
                &bext,
                get(
                    BIG,
                    &format!("{accept}TE: trailers\r\nConnection: close\r\n"),
                )
                .as_bytes(),
            );
            let answer = &answers(&bytes)[0];
            if answer.header("x-bext-cache") == Some("HIT")
                && (accept.is_empty() || answer.header("content-encoding") == Some("gzip"))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "never a compressed hit: {answer:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut request = get(BIG, accept);
        request.push_str(&get(
            BIG,
            &format!("{accept}TE: trailers\r\nConnection: close\r\n"),
        ));
        let bytes = exchange(&bext, request.as_bytes());
        let both = answers(&bytes);
        assert_eq!(both.len(), 2, "{:?}", String::from_utf8_lossy(&bytes));
        // What differs per request or per connection, each once.
        let volatile = ["date", "age", "x-request-id", "cache-status", "connection"];
        let fields = |answer: &Answer| {
            for name in &volatile[..4] {
                let count = answer
                    .headers
                    .iter()
                    .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                    .count();
                assert_eq!(count, 1, "{name} in {answer:?}");
            }
            let mut fields: Vec<(String, String)> = answer
                .headers
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
                .filter(|(n, _)| !volatile.contains(&n.as_str()))
                .collect();
            fields.sort();
            fields
        };
        let (written, hypers) = (&both[0], &both[1]);
        assert_eq!(written.status, hypers.status);
        assert_eq!(fields(written), fields(hypers), "accept {accept:?}");
        assert_eq!(written.body, hypers.body);
        assert_eq!(written.header("x-bext-cache"), Some("HIT"));
        assert_eq!(hypers.header("connection"), Some("close"));
        if !accept.is_empty() {
            assert_eq!(written.header("content-encoding"), Some("gzip"));
        }
    }
}

/// After answers the short way, an HTTP/2 preface is not taken for a new
/// connection: the connection is closed (hyper alone never switches a
/// connection of HTTP/1.1 requests to HTTP/2).
#[tokio::test(flavor = "multi_thread")]
async fn issue13_no_switch_to_http2_after_http1_hits() {
    let (_dir, bext) = origin("");
    warm(&bext).await;
    let mut request = get(PAGE, "");
    request.push_str("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0");
    let bytes = exchange(&bext, request.as_bytes());
    let answers = answers(&bytes);
    assert_eq!(answers.len(), 1, "{:?}", String::from_utf8_lossy(&bytes));
    assert_eq!(answers[0].header("x-bext-cache"), Some("HIT"));
}

/// With keep-alive off, a connection carries one request, hits included.
#[tokio::test(flavor = "multi_thread")]
async fn issue13_without_keep_alive_a_connection_of_hits_answers_once() {
    let (_dir, bext) = origin("keepalive_timeout_ms = 0");
    warm(&bext).await;
    let bytes = exchange(&bext, get(PAGE, "").repeat(2).as_bytes());
    let answers = answers(&bytes);
    assert_eq!(answers.len(), 1, "{:?}", String::from_utf8_lossy(&bytes));
    assert_eq!(answers[0].header("x-bext-cache"), Some("HIT"));
    assert_eq!(answers[0].header("connection"), Some("close"));
}

/// A connection of hits keeps its time bounds: a request's head must come
/// within `client_header_timeout`, and an idle connection is closed after
/// `keepalive_timeout`.
#[tokio::test(flavor = "multi_thread")]
async fn issue13_a_connection_of_hits_keeps_its_time_bounds() {
    let (_dir, bext) = origin("client_header_timeout_ms = 1000\nkeepalive_timeout_ms = 4000");
    warm(&bext).await;
    let hit = get(PAGE, "");
    let read_hit = |stream: &mut TcpStream| {
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while answers_complete(&got) == 0 {
            let n = stream.read(&mut buf).expect("an answer");
            assert!(n > 0, "closed before answering");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(answers(&got)[0].header("x-bext-cache"), Some("HIT"));
    };
    // Half a head after a hit: closed by the header timeout.
    let mut half = TcpStream::connect(bext.addr).expect("connect");
    half.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    half.write_all(hit.as_bytes()).expect("write");
    read_hit(&mut half);
    half.write_all(b"GET / HTTP/1.1\r\nHo").expect("write");
    let started = Instant::now();
    assert_eq!(half.read(&mut [0u8; 64]).unwrap_or(0), 0, "closed");
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(3000),
        "closed by the header timeout, not the keep-alive one: {waited:?}"
    );
    // Idle after a hit: closed by the keep-alive timeout.
    let mut idle = TcpStream::connect(bext.addr).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    idle.write_all(hit.as_bytes()).expect("write");
    read_hit(&mut idle);
    let started = Instant::now();
    assert_eq!(idle.read(&mut [0u8; 64]).unwrap_or(0), 0, "closed");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(3000) && waited < Duration::from_secs(9),
        "closed by the keep-alive timeout: {waited:?}"
    );
}

/// How many whole responses `bytes` holds (each with its body).
fn answers_complete(bytes: &[u8]) -> usize {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return 0;
    };
    let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    usize::from(bytes.len() >= end + 4 + len)
}

/// Graceful shutdown closes a connection of hits that is between requests
/// at once: it does not hold the exit until the grace period ends.
#[tokio::test(flavor = "multi_thread")]
async fn issue13_shutdown_closes_an_idle_connection_of_hits() {
    let (_dir, mut bext) = origin("shutdown_grace_ms = 60000\nkeepalive_timeout_ms = 60000");
    warm(&bext).await;
    let mut idle = TcpStream::connect(bext.addr).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    idle.write_all(get(PAGE, "").as_bytes()).expect("write");
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    while answers_complete(&got) == 0 {
        let n = idle.read(&mut buf).expect("an answer");
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    let started = Instant::now();
    let status = bext.terminate(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the idle connection held the exit: {:?}",
        started.elapsed()
    );
    assert_eq!(idle.read(&mut buf).unwrap_or(0), 0, "closed");
}

/// Proxied GETs (misses the app answers) take the short way too:
/// pipelined, they are answered in order, each by the app once, among
/// hits; a request with a body after them goes to hyper, body and all.
#[tokio::test(flavor = "multi_thread")]
async fn issue13_pipelined_misses_hits_and_a_body_after_them_are_answered_in_order() {
    let (_dir, bext) = origin("");
    warm(&bext).await;
    const MISS: &str = "/page/proxied?cc=no-store&size=50";
    let answers = pipelined_with_a_body(&bext, &[MISS, PAGE, MISS], MISS, MISS);
    let bodies: Vec<String> = answers
        .iter()
        .map(|a| {
            String::from_utf8_lossy(&a.body)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(
        bodies,
        [
            "/page/proxied render 1",
            "/page/short render 1",
            "/page/proxied render 2",
            "/page/proxied render 3",
            "/page/proxied render 4",
        ],
        "in order, each miss rendered once"
    );
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(answer.status, 200, "answer {i}");
        assert_eq!(
            answer.body.len(),
            if i == 1 { 100 } else { 50 },
            "answer {i}"
        );
        assert!(answer.header("date").is_some(), "answer {i}");
        assert!(answer.header("x-request-id").is_some(), "answer {i}");
    }
    assert_eq!(answers[1].header("x-bext-cache"), Some("HIT"));
    assert_eq!(
        renders(&bext, "/page/smuggled").await,
        0,
        "the body was read as a request"
    );
}

/// A client that leaves while its proxied GET is waiting for the app
/// cancels it, as hyper's way does: the access log says 499 long before
/// the app would have answered, and the app's other requests go on.
#[tokio::test(flavor = "multi_thread")]
async fn issue13_a_client_that_leaves_cancels_its_proxied_get() {
    let (_dir, bext) = origin("");
    const SLOW: &str = "/page/leaving?cc=no-store&delay=30000";
    let mut stream = TcpStream::connect(bext.addr).expect("connect");
    stream.write_all(get(SLOW, "").as_bytes()).expect("write");
    // Until the app has the request.
    let deadline = Instant::now() + Duration::from_secs(10);
    while renders(&bext, "/page/leaving").await == 0 {
        assert!(Instant::now() < deadline, "the app never got the request");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = Instant::now();
    drop(stream);
    let line = bext.wait_log(Duration::from_secs(10), |v| {
        v["target"] == "bext::access" && v["path"] == "/page/leaving"
    });
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["complete"], false, "{line}");
    assert!(
        left.elapsed() < Duration::from_secs(10),
        "logged when the client left, not when the app answered"
    );
    let response = bext.get_host("x", PAGE).await;
    assert_eq!(response.status(), 200, "serving goes on");
}

/// Requests sent while the one before them is still awaited (read by the
/// watch on the client while the app works) are answered after it, in
/// order: a hit, then a request with a body (hyper's way, the body never
/// read as a request), then one that closes.
#[tokio::test(flavor = "multi_thread")]
async fn issue13_requests_sent_while_one_is_awaited_are_answered_after_it() {
    let (_dir, bext) = origin("");
    warm(&bext).await;
    const SLOW: &str = "/page/awaited?cc=no-store&delay=3000";
    let mut stream = TcpStream::connect(bext.addr).expect("connect");
    stream.write_all(get(SLOW, "").as_bytes()).expect("write");
    // Until the app has it: its answer is then awaited.
    let deadline = Instant::now() + Duration::from_secs(10);
    while renders(&bext, "/page/awaited").await == 0 {
        assert!(Instant::now() < deadline, "the app never got the request");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let smuggled = get("/page/smuggled?cc=public,max-age=60", "");
    let mut more = get(PAGE, "");
    more.push_str(&get(
        PAGE,
        &format!("Content-Length: {}\r\n", smuggled.len()),
    ));
    more.push_str(&smuggled);
    more.push_str(&get(PAGE, "Connection: close\r\n"));
    stream.write_all(more.as_bytes()).expect("write");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).expect("read to the close");
    let answers = answers(&bytes);
    assert_eq!(
        answers.len(),
        4,
        "one answer per request, none for the body: {:?}",
        String::from_utf8_lossy(&bytes)
    );
    assert!(
        answers[0].body.starts_with(b"/page/awaited render 1"),
        "the awaited answer first"
    );
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(answer.status, 200, "answer {i}");
    }
    for answer in &answers[1..] {
        assert_eq!(answer.header("x-bext-cache"), Some("HIT"));
    }
    assert_eq!(
        renders(&bext, "/page/smuggled").await,
        0,
        "the body was read as a request"
    );
}
