//! How bext speaks HTTP/1.1 to its workers (`supervisor/src/pool/h1.rs`):
//! request and response framing, interim responses, connections a worker
//! closes or cannot keep, and responses that are not HTTP at all. The worker
//! is a Node server that writes raw bytes, written for the purpose, so every byte on the wire
//! is the test's choice.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

use crate::support::{Bext, client, temp_app};

/// A Node server that reads request heads (and `Content-Length` bodies)
/// itself and answers each path with hand-written bytes. It is an
/// `http.Server` (the one kind bext's adapter puts on the worker socket)
/// with Node's HTTP parser taken off its connections. Every answer says
/// `Cache-Control: no-store`, so the cache stays out of it.
const RAW_SERVER: &str = r#"
const http = require('http');
const ok = (body, extra = '') =>
  `HTTP/1.1 200 OK\r\nCache-Control: no-store\r\n${extra}Content-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`;
const answers = {
  // What the worker received: method, target, headers, body length.
  '/echo': (s, req) => s.write(ok(JSON.stringify(req))),
  // Requests seen on this connection so far.
  '/count': (s, req, n) => s.write(ok(String(n))),
  '/head': (s, req) => s.write(req.method === 'HEAD'
    ? 'HTTP/1.1 200 OK\r\nCache-Control: no-store\r\nContent-Length: 5\r\n\r\n'
    : ok('hello')),
  '/http10': (s) => s.write('HTTP/1.0 200 OK\r\nCache-Control: no-store\r\nContent-Length: 7\r\n\r\nold one'),
  '/close-delimited': (s) => {
    s.write('HTTP/1.1 200 OK\r\nCache-Control: no-store\r\n\r\npart one, ');
    setTimeout(() => s.end('part two'), 50);
  },
  '/chunked': (s) => {
    const pieces = ['HTTP/1.1 200 OK\r\nCache-Control: no-store\r\nTransfer-Encoding: chunked\r\n',
      'Trailer: x-sum\r\n\r\n5;ext=1\r', '\nhel', 'lo\r\n7\r\n, world\r\n0\r\nx-s', 'um: 12\r\n\r\n'];
    const next = () => { if (pieces.length) { s.write(pieces.shift()); setTimeout(next, 10); } };
    next();
  },
  '/hints': (s) => s.write('HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n' + ok('ok')),
  '/private': (s) => s.write(ok('', 'Connection: x-private\r\nX-Private: secret\r\nX-Public: yes\r\n')),
  '/garbage': (s) => s.write('SPEAK FRIEND AND ENTER\r\n\r\n'),
  '/switch': (s) => s.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n'),
  '/short': (s) => s.end('HTTP/1.1 200 OK\r\nCache-Control: no-store\r\nContent-Length: 100\r\n\r\nonly nine'),
  // Answers the first request on a connection; closes it, unanswered, on
  // any later one (as a worker whose keep-alive timeout just ran out).
  '/once': (s, req, n) => n === 1 ? s.write(ok('once')) : s.destroy(),
};
const server = http.createServer();
server.removeAllListeners('connection');
server.on('connection', (s) => {
  let buf = Buffer.alloc(0);
  let n = 0;
  s.on('error', () => {});
  s.on('data', (data) => {
    buf = Buffer.concat([buf, data]);
    for (;;) {
      const end = buf.indexOf('\r\n\r\n');
      if (end < 0) return;
      const lines = buf.subarray(0, end).toString('latin1').split('\r\n');
      const [method, target] = lines[0].split(' ');
      const headers = {};
      for (const line of lines.slice(1)) {
        const i = line.indexOf(':');
        headers[line.slice(0, i).toLowerCase()] = line.slice(i + 1).trim();
      }
      if (target === '/reject') {
        // Answers on the head, reads none of the body, and closes.
        s.end('HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 9\r\n\r\ntoo large');
        return;
      }
      const length = Number(headers['content-length'] || 0);
      if (buf.length < end + 4 + length) return;
      const body = buf.subarray(end + 4, end + 4 + length).toString('latin1');
      buf = buf.subarray(end + 4 + length);
      n += 1;
      (answers[target.split('?')[0]] || ((s) => s.write(ok('raw server'))))(s, { method, target, headers, body }, n);
    }
  });
});
server.listen(process.env.PORT || 3000, () => console.log('raw server up'));
"#;

/// `bext run ARGS` in front of a one-file Node app with one worker (no
/// retries on another one hide anything) and the given upstream timeout.
fn node_app(server_js: &str, upstream_timeout_ms: u64, args: &[&str]) -> (tempfile::TempDir, Bext) {
    let config =
        format!("[server]\nupstream_timeout_ms = {upstream_timeout_ms}\n[isolate]\nworkers = 1\n");
    let app = temp_app(&[
        ("package.json", r#"{"main":"server.js"}"#),
        ("server.js", server_js),
        ("bext.config.toml", &config),
    ]);
    let bext = Bext::run(app.path(), args);
    (app, bext)
}

/// bext in front of the raw server, with one serving thread (one
/// idle-connection list).
fn raw_worker() -> (tempfile::TempDir, Bext) {
    node_app(RAW_SERVER, 5000, &["--threads", "1"])
}

async fn get(bext: &Bext, path: &str) -> (u16, String) {
    let response = client()
        .get(bext.url(path))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// A raw TCP connection to bext, for exchanges an HTTP client would not
/// make.
fn connect(bext: &Bext) -> TcpStream {
    let stream = TcpStream::connect(bext.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
}

/// Requests the worker has seen on the connection this one arrived on.
async fn count(bext: &Bext) -> u32 {
    let (status, body) = get(bext, "/count").await;
    assert_eq!(status, 200);
    body.parse().expect("a count")
}

#[tokio::test(flavor = "multi_thread")]
async fn responses_are_framed_as_rfc_9112_says_and_connections_reused_only_when_safe() {
    let (_app, bext) = raw_worker();
    let http = client();

    // A kept-alive connection is reused.
    let first = count(&bext).await;
    assert_eq!(count(&bext).await, first + 1, "the connection was reused");

    // Chunked, with an extension and trailers, split at awkward places.
    assert_eq!(get(&bext, "/chunked").await, (200, "hello, world".into()));
    // The chunked body ended where it should: the connection carries on.
    assert!(count(&bext).await > 1, "reused after a chunked body");

    // A HEAD response has a Content-Length and no body. (The first HEAD
    // goes to the worker as a GET, to fill the cache, and its unread body
    // costs that connection; once the cache knows the page is not
    // storable, HEAD passes through as HEAD.)
    for _ in 0..2 {
        let head = http.head(bext.url("/head")).send().await.expect("HEAD");
        assert_eq!(head.status(), 200);
        assert_eq!(head.headers()["content-length"], "5");
    }
    assert!(count(&bext).await > 1, "reused after a HEAD response");

    // An interim 103 is skipped; the final answer arrives.
    assert_eq!(get(&bext, "/hints").await, (200, "ok".into()));

    // A body delimited by the worker closing the connection: all of it
    // arrives, and that connection is never used again.
    assert_eq!(
        get(&bext, "/close-delimited").await,
        (200, "part one, part two".into())
    );
    assert_eq!(count(&bext).await, 1, "a new connection after a close");

    // HTTP/1.0 without keep-alive: answered, then not reused.
    assert_eq!(get(&bext, "/http10").await, (200, "old one".into()));
    assert_eq!(count(&bext).await, 1, "a new connection after HTTP/1.0");

    // Headers named by Connection are hop-by-hop too.
    let private = http.get(bext.url("/private")).send().await.expect("GET");
    assert_eq!(private.status(), 200);
    assert!(private.headers().get("x-private").is_none());
    assert_eq!(private.headers()["x-public"], "yes");
}

#[tokio::test(flavor = "multi_thread")]
async fn request_bodies_are_framed_from_what_the_client_sent() {
    let (_app, bext) = raw_worker();
    let echo = |method: reqwest::Method, body: Option<&'static str>| {
        let bext = &bext;
        async move {
            let mut request = client().request(method, bext.url("/echo"));
            if let Some(body) = body {
                request = request.body(body);
            }
            let response = request.send().await.expect("request");
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.expect("json")
        }
    };
    let seen = echo(reqwest::Method::POST, Some("abc")).await;
    assert_eq!(seen["headers"]["content-length"], "3");
    assert!(seen["headers"]["transfer-encoding"].is_null());
    assert_eq!(seen["body"], "abc");
    let seen = echo(reqwest::Method::PUT, None).await;
    assert_eq!(
        seen["headers"]["content-length"], "0",
        "PUT says it is empty"
    );
    let seen = echo(reqwest::Method::GET, None).await;
    assert!(seen["headers"]["content-length"].is_null(), "{seen}");
    assert_eq!(seen["method"], "GET");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http");
}

#[test]
fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let (_app, bext) = raw_worker();
    let mut stream = connect(&bext);
    stream
        .write_all(
            b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\
              Expect: 100-continue\r\nConnection: close\r\n\r\n",
        )
        .expect("write head");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("interim");
    assert_eq!(line, "HTTP/1.1 100 Continue\r\n");
    stream.write_all(b"hello").expect("write body");
    let mut rest = String::new();
    reader.read_to_string(&mut rest).expect("response");
    assert!(rest.contains("HTTP/1.1 200 OK"), "{rest}");
    assert!(rest.contains(r#""body":"hello""#), "{rest}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_closed_as_it_is_reused_is_retried_once_for_safe_requests() {
    let (_app, bext) = raw_worker();
    // The first request opens a connection; the second reuses it, the
    // worker closes it unanswered, and bext sends the GET again on a new
    // one (one worker: there is no other worker to retry on).
    assert_eq!(get(&bext, "/once").await, (200, "once".into()));
    assert_eq!(get(&bext, "/once").await, (200, "once".into()));
    // A POST is not sent twice: 502.
    let post = client().post(bext.url("/once")).send().await.expect("POST");
    assert_eq!(post.status(), 502);
    // And serving goes on.
    assert_eq!(get(&bext, "/once").await, (200, "once".into()));
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_responses_are_502_or_a_cut_body_and_serving_goes_on() {
    let (_app, bext) = raw_worker();
    assert_eq!(
        get(&bext, "/garbage").await,
        (502, "502 bad gateway\n".into())
    );
    bext.wait_log(Duration::from_secs(5), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("sent an invalid response"))
    });

    // A 101 to a request that asked for no upgrade.
    assert_eq!(
        get(&bext, "/switch").await,
        (502, "502 bad gateway\n".into())
    );

    // A body shorter than its Content-Length: the client's response is cut
    // off, not completed with something else.
    // (The head may or may not reach the client before the cut.)
    if let Ok(short) = client().get(bext.url("/short")).send().await {
        assert_eq!(short.status(), 200);
        assert!(short.bytes().await.is_err(), "the body must fail");
    }

    assert_eq!(get(&bext, "/").await, (200, "raw server".into()));
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_a_worker_closes_while_idle_are_closed_by_bext_too() {
    // Node closes kept-alive connections idle for `keepAliveTimeout`.
    let (_app, bext) = node_app(
        "const server = require('http').createServer((req, res) => \
         setTimeout(() => res.end('ok'), 50));\n\
         server.keepAliveTimeout = 300;\n\
         server.listen(3000);\n",
        60_000,
        &[],
    );
    let sockets = || {
        std::fs::read_dir(format!("/proc/{}/fd", bext.pid()))
            .expect("fds")
            .filter_map(Result::ok)
            .filter(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
            })
            .count()
    };
    let before = sockets();
    {
        let http = client();
        let answers =
            futures_util::future::join_all((0..20).map(|_| http.get(bext.url("/")).send())).await;
        for answer in answers {
            assert_eq!(answer.expect("GET").status(), 200);
        }
        // Concurrent requests each needed a connection to the worker.
        assert!(sockets() >= before + 10, "{} vs {before}", sockets());
    }
    // The client has gone, and the worker closes its side of the idle
    // connections after 300 ms: bext's side must not linger (CLOSE_WAIT)
    // until some later request happens to look at them.
    crate::support::wait_for(
        "idle upstream sockets closed",
        Duration::from_secs(5),
        || (sockets() <= before).then_some(()),
    );
}

#[test]
fn a_worker_may_answer_before_reading_the_body() {
    let (_app, bext) = raw_worker();
    let mut stream = connect(&bext);
    stream
        .write_all(b"POST /reject HTTP/1.1\r\nHost: test\r\nContent-Length: 4000000\r\n\r\n")
        .expect("write head");
    // Part of the body; the rest never comes, and is not needed.
    stream.write_all(&[b'x'; 65536]).expect("write some body");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("status line");
    assert_eq!(line, "HTTP/1.1 413 Payload Too Large\r\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_streams_the_body_back_as_it_reads_it_does_not_stall() {
    // `req.pipe(res)`: the worker answers with the first bytes of the body
    // and reads the rest only as fast as its answer is read.
    let (_app, bext) = echo_worker(5000);
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 256; // 16 MiB: far beyond every socket buffer
    let chunk: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
    let sent = futures_util::stream::iter(
        (0..CHUNKS).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    let response = client()
        .post(bext.url("/"))
        .body(reqwest::Body::wrap_stream(sent))
        .send()
        .await
        .expect("the answer starts before the upload ends");
    assert_eq!(response.status(), 200);
    let mut received = 0usize;
    let mut stream = response.bytes_stream();
    let read_all = async {
        while let Some(piece) = futures_util::StreamExt::next(&mut stream).await {
            let piece = piece.expect("body");
            for (i, byte) in piece.iter().enumerate() {
                assert_eq!(
                    *byte,
                    ((received + i) % CHUNK % 251) as u8,
                    "byte {}",
                    received + i
                );
            }
            received += piece.len();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read_all)
        .await
        .expect("the echo stalled");
    assert_eq!(received, CHUNK * CHUNKS);
}

/// A worker that echoes its request body as it reads it (`req.pipe(res)`),
/// or at `/count` answers with its length at the end.
fn echo_worker(upstream_timeout_ms: u64) -> (tempfile::TempDir, Bext) {
    node_app(
        "require('http').createServer((req, res) => {\n\
           if (req.url === '/count') {\n\
             let n = 0;\n\
             req.on('data', (c) => { n += c.length; });\n\
             return req.on('end', () => res.end(String(n)));\n\
           }\n\
           req.pipe(res);\n\
         }).listen(3000);\n",
        upstream_timeout_ms,
        &[],
    )
}

#[test]
fn a_stalled_upload_to_a_worker_that_already_answered_is_cut_off() {
    // 2 s: a freshly started worker must send its head within the timeout
    // of the last body byte, even on a busy machine.
    let (_app, bext) = echo_worker(2000);
    let mut stream = connect(&bext);
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 1000000\r\n\r\n")
        .expect("write head");
    stream.write_all(&[b'x'; 100_000]).expect("write some body");
    // The client now stalls, and the worker waits for the rest: after the
    // timeout with no progress either way, bext gives up on the exchange
    // and closes the client's connection (the test's read timeout is 10 s).
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("status line");
    assert_eq!(line, "HTTP/1.1 200 OK\r\n");
    let mut rest = Vec::new();
    let ended = reader.read_to_end(&mut rest);
    assert!(
        ended.is_ok()
            || ended
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the connection must be closed, not left hanging: {ended:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_that_keeps_moving_outlasts_the_upstream_timeout() {
    // 30 pieces 100 ms apart: 3 s of upload, three times the timeout, which
    // counts from the last progress while the body goes out.
    let (_app, bext) = echo_worker(1000);
    let pieces = futures_util::stream::unfold(0, |i| async move {
        if i == 30 {
            return None;
        }
        // A slow client is the scenario under test, not a wait.
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((Ok::<_, std::io::Error>(vec![b'x'; 1000]), i + 1))
    });
    let response = client()
        .post(bext.url("/count"))
        .body(reqwest::Body::wrap_stream(pieces))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "30000");
}
