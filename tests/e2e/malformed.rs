//! Malformed and hostile requests (issue 11): each gets the right 4xx or a
//! closed connection, and a normal client served alongside sees no error.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::support::{Bext, PLAIN_NODE_SERVER, client, temp_app};

fn app() -> (tempfile::TempDir, Bext) {
    let dir = temp_app(&[
        ("package.json", r#"{"main":"server.js"}"#),
        ("server.js", PLAIN_NODE_SERVER),
        (
            "bext.config.toml",
            "[server]\nclient_header_timeout_ms = 1500\n[isolate]\nworkers = 1\n",
        ),
    ]);
    let bext = Bext::run(dir.path(), &[]);
    (dir, bext)
}

/// Sends `bytes` on a fresh connection and reads what comes back until the
/// server closes it or 10 s pass.
fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.write_all(bytes).expect("write");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The status of the first response in `text` (0: none, the connection was
/// closed without one).
fn status(text: &str) -> u16 {
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

async fn normal_client_is_served(bext: &Bext) {
    let response = client().get(bext.url("/")).send().await.expect("GET /");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "plain node");
}

#[tokio::test(flavor = "multi_thread")]
async fn issue11_malformed_http1_requests_get_a_4xx_or_a_close() {
    let (_dir, bext) = app();
    let big_header = format!("x-big: {}\r\n", "a".repeat(70 * 1024));
    let many_headers: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
        // RFC 9112 §6.1: framed by Transfer-Encoding alone, and the
        // connection closed after the answer, so what follows it (a
        // smuggled second request) is never read. Only one answer comes.
        (
            "Content-Length with Transfer-Encoding",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /die HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
            &[200, 400],
        ),
        (
            "two different Content-Lengths",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!".to_vec(),
            &[400],
        ),
        (
            "bare CR",
            b"GET / HTTP/1.1\rhost: x\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "obs-fold",
            b"GET / HTTP/1.1\r\nhost: x\r\nx-folded: a\r\n b\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "NUL in a header value",
            b"GET / HTTP/1.1\r\nhost: x\r\nx-nul: a\0b\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "control byte in a header name",
            b"GET / HTTP/1.1\r\nhost: x\r\nx-\x01bad: v\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "space before the colon",
            b"GET / HTTP/1.1\r\nhost: x\r\nx-space : v\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "oversized head",
            format!("GET / HTTP/1.1\r\nhost: x\r\n{big_header}\r\n").into_bytes(),
            &[431],
        ),
        (
            "too many headers",
            format!("GET / HTTP/1.1\r\nhost: x\r\n{many_headers}\r\n").into_bytes(),
            &[431],
        ),
        (
            "two Host headers",
            b"GET / HTTP/1.1\r\nhost: x\r\nhost: y\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "no Host in HTTP/1.1",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "invalid chunk size",
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(),
            &[400],
        ),
    ];
    for (name, bytes, expected) in cases {
        let answer = exchange(bext.addr, &bytes);
        let got = status(&answer);
        assert!(
            expected.contains(&got),
            "{name}: expected {expected:?}, got {got}: {}",
            answer
                .lines()
                .next()
                .unwrap_or("(closed without an answer)")
        );
        assert_eq!(
            answer.matches("HTTP/1.1 ").count(),
            usize::from(got != 0),
            "{name}: one answer at most, then the connection closes: {answer}"
        );
        normal_client_is_served(&bext).await;
    }
}

/// HTTP/2 frames, written by hand: a client that does what no library
/// would let it do.
mod h2 {
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    pub fn settings() -> Vec<u8> {
        frame(0x4, 0, 0, &[])
    }

    /// GET / on `stream` (HPACK: static :method GET, :scheme http, :path /,
    /// and a literal :authority).
    pub fn get(stream: u32, end_headers: bool) -> Vec<u8> {
        let mut block = vec![0x82, 0x86, 0x84, 0x41, 6];
        block.extend_from_slice(b"x.test");
        let flags = 0x1 | if end_headers { 0x4 } else { 0 };
        frame(0x1, flags, stream, &block)
    }

    pub fn rst(stream: u32) -> Vec<u8> {
        frame(0x3, 0, stream, &8u32.to_be_bytes())
    }

    /// A CONTINUATION carrying one more literal header.
    pub fn continuation(stream: u32, n: usize) -> Vec<u8> {
        let name = format!("x-flood-{n}");
        let value = "v".repeat(200);
        let mut block = vec![0x00, name.len() as u8];
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8 & 0x7f);
        block.extend_from_slice(value.as_bytes());
        frame(0x9, 0, stream, &block)
    }

    /// Reads frames until a GOAWAY (its error code) or the end.
    pub fn until_goaway(stream: &mut std::net::TcpStream) -> Option<u32> {
        use std::io::Read;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            while buf.len() >= 9 {
                let len =
                    (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                if buf[3] == 0x7 && len >= 8 {
                    let code = u32::from_be_bytes([buf[13], buf[14], buf[15], buf[16]]);
                    return Some(code);
                }
                buf.drain(..9 + len);
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// CVE-2023-44487: streams opened and reset at once, by the thousand, get
/// the connection closed (GOAWAY), not the app flooded.
#[tokio::test(flavor = "multi_thread")]
async fn issue11_h2_rapid_reset_is_cut_off() {
    let (_dir, bext) = app();
    let mut stream = TcpStream::connect(bext.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut burst = h2::PREFACE.to_vec();
    burst.extend(h2::settings());
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        burst.extend(h2::get(id, true));
        burst.extend(h2::rst(id));
    }
    // The server may close while we still write: that is the point.
    let _ = stream.write_all(&burst);
    let code = h2::until_goaway(&mut stream);
    assert!(
        code.is_some(),
        "no GOAWAY after 2000 reset streams (the connection just ended or stalled)"
    );
    normal_client_is_served(&bext).await;
}

/// CONTINUATION flood: a header block that never ends is cut off at the
/// header-list limit, not buffered without bound.
#[tokio::test(flavor = "multi_thread")]
async fn issue11_h2_continuation_flood_is_cut_off() {
    let (_dir, bext) = app();
    let before = crate::support::rss(bext.pid());
    let mut stream = TcpStream::connect(bext.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut start = h2::PREFACE.to_vec();
    start.extend(h2::settings());
    start.extend(h2::get(1, false));
    stream.write_all(&start).expect("write");
    // 20,000 × ~220 bytes ≈ 4.4 MB of headers for one request.
    let mut cut_off = false;
    for n in 0..20_000 {
        if stream.write_all(&h2::continuation(1, n)).is_err() {
            cut_off = true;
            break;
        }
    }
    let goaway = h2::until_goaway(&mut stream);
    assert!(
        cut_off || goaway.is_some(),
        "4 MB of CONTINUATION frames were taken in"
    );
    let after = crate::support::rss(bext.pid());
    assert!(
        after < before + (32 << 20),
        "memory grew by {} MiB",
        (after.saturating_sub(before)) >> 20
    );
    normal_client_is_served(&bext).await;
}

/// A slowloris of 1,000 connections, each a request head that never ends:
/// a normal client is served meanwhile, and every one of them is closed
/// after client_header_timeout.
#[tokio::test(flavor = "multi_thread")]
async fn issue11_a_slowloris_of_1000_connections_is_shed() {
    let (_dir, bext) = app();
    let mut lorises: Vec<TcpStream> = (0..1000)
        .map(|i| {
            let mut s = TcpStream::connect(bext.addr).expect("connect");
            let _ = write!(s, "GET /{i} HTTP/1.1\r\nhost: x\r\nx-slow: ");
            s
        })
        .collect();
    let started = Instant::now();
    normal_client_is_served(&bext).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "served alongside, in {:?}",
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut open = 0;
    for s in &mut lorises {
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        let mut buf = [0u8; 512];
        // A 408 may come first; then the close.
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(_) => {
                    open += 1;
                    break;
                }
            }
        }
    }
    assert_eq!(
        open, 0,
        "{open} slowloris connections still open after 20 s"
    );
    normal_client_is_served(&bext).await;
}

/// A client that reads its response a byte at a time holds only its own
/// connection: others are served at full speed meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn issue11_a_slow_reader_does_not_slow_others() {
    let (_dir, bext) = app();
    let mut slow = TcpStream::connect(bext.addr).expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .expect("write");
    slow.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    for _ in 0..10 {
        // One byte, then a pause: a client reading at 10 bytes/s.
        slow.read_exact(&mut byte).expect("a byte");
        let started = Instant::now();
        normal_client_is_served(&bext).await;
        assert!(started.elapsed() < Duration::from_secs(2));
        std::thread::sleep(Duration::from_millis(100)); // the slow reader's pace
    }
}
