//! Issue 11 (hardening), single-app mode: each fault a review found, shown
//! against the real binary. The multi-app ones are in `platform.rs`.

use std::time::Duration;

use serde_json::Value;

use crate::support::{Bext, Options, alive, client, fixture, temp_app, wait_for};

/// The origin fixture, copied into a temp dir with this config.
fn origin(config: &str) -> (tempfile::TempDir, Bext) {
    let dir = tempfile::tempdir().expect("tempdir");
    for file in ["package.json", "server.js"] {
        std::fs::copy(fixture("origin").join(file), dir.path().join(file)).expect("copy");
    }
    std::fs::write(dir.path().join("bext.config.toml"), config).expect("config");
    let bext = Bext::run(dir.path(), &["--workers", "1"]);
    (dir, bext)
}

/// Fault 2: a `max-age` past u64 neither resets the connection nor leaves an
/// entry served as HIT with a negative ttl; it is 2^31 seconds.
#[tokio::test(flavor = "multi_thread")]
async fn issue11_a_huge_max_age_is_capped_not_a_reset() {
    let (_dir, bext) = origin("");
    let http = client();
    for cc in [
        "public,%20max-age=18446744073709551615",
        "public,%20max-age=99999999999999999999999,%20stale-while-revalidate=18446744073709551615",
    ] {
        let path = format!("/page/huge-{}?cc={cc}", cc.len());
        let first = http.get(bext.url(&path)).send().await.expect("first GET");
        assert_eq!(first.status(), 200, "{cc}");
        assert_eq!(first.headers()["x-bext-cache"], "MISS");
        let second = http.get(bext.url(&path)).send().await.expect("second GET");
        assert_eq!(second.headers()["x-bext-cache"], "HIT", "{cc}");
        let status = second.headers()["cache-status"]
            .to_str()
            .expect("ascii")
            .to_string();
        let ttl: i64 = status
            .split("ttl=")
            .nth(1)
            .and_then(|t| t.split(';').next())
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ttl in {status}"));
        assert!(
            (2_147_483_000..=2_147_483_648).contains(&ttl),
            "ttl is 2^31 s: {status}"
        );
    }
    let health = http
        .get(bext.url("/__bext/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 200, "still serving");
}

/// An app that answers `/env` with its environment's names and a few values.
const ENV_APP: &str = r#"
const http = require('http');
http.createServer((req, res) => {
  res.setHeader('content-type', 'application/json');
  res.setHeader('cache-control', 'no-store');
  res.end(JSON.stringify(process.env));
}).listen(process.env.PORT || 3000);
"#;

/// Fault 3: a worker sees a clean environment (PATH, HOME, its own
/// `[runtime] env`, bext's per-worker variables) and nothing of bext's own.
#[tokio::test(flavor = "multi_thread")]
async fn issue11_workers_get_a_clean_environment() {
    let app = temp_app(&[
        ("package.json", r#"{"main":"server.js"}"#),
        ("server.js", ENV_APP),
        (
            "bext.config.toml",
            "[runtime.env]\nAPI_URL = \"https://api.example\"\n",
        ),
    ]);
    let bext = Bext::start(
        app.path(),
        &Options {
            args: vec!["--workers".into(), "1".into()],
            env: vec![
                ("BEXT_PURGE_TOKEN".into(), "supervisor-secret".into()),
                ("REDIS_URL".into(), "redis://:secret@127.0.0.1:1".into()),
                ("AWS_SECRET_ACCESS_KEY".into(), "very-secret".into()),
                ("LANG".into(), "C.UTF-8".into()),
            ],
            ..Options::default()
        },
    );
    let env: Value = client()
        .get(bext.url("/env"))
        .send()
        .await
        .expect("GET /env")
        .json()
        .await
        .expect("json");
    let env = env.as_object().expect("object");
    for secret in [
        "BEXT_PURGE_TOKEN",
        "REDIS_URL",
        "AWS_SECRET_ACCESS_KEY",
        "XDG_RUNTIME_DIR",
        "BEXT_LOG",
        "BEXT_READY_TOKEN",
        "BEXT_LISTEN_FD",
    ] {
        assert!(!env.contains_key(secret), "{secret} reached the worker");
    }
    assert!(
        !env.values()
            .any(|v| v.as_str().is_some_and(|v| v.contains("secret"))),
        "no value of bext's reached the worker: {env:?}"
    );
    assert_eq!(env["API_URL"], "https://api.example", "the app's own env");
    assert_eq!(env["LANG"], "C.UTF-8", "the locale passes");
    assert_eq!(env["NODE_ENV"], "production");
    assert!(env.contains_key("PATH"));
    assert!(env.contains_key("BEXT_APP") && env.contains_key("BEXT_WORKER"));
}

/// Fault 3, config side: a variable named like bext's own is refused with
/// its location.
#[test]
fn issue11_an_app_may_not_set_bext_variables() {
    let app = temp_app(&[
        ("package.json", r#"{"main":"server.js"}"#),
        ("server.js", ENV_APP),
        (
            "bext.config.toml",
            "[runtime.env]\nBEXT_PURGE_TOKEN = \"x\"\n",
        ),
    ]);
    let (code, _, stderr) =
        crate::support::bext_command(&["check", app.path().to_str().expect("utf8")]);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("bext.config.toml:1:1: key `runtime.env`"),
        "{stderr}"
    );
    assert!(stderr.contains("BEXT_ are bext's own"), "{stderr}");
}

/// Fault 8: a SIGTERM while the app builds stops the build and bext
/// cleanly, instead of killing bext with the build left running.
#[test]
fn issue11_sigterm_during_the_build_stops_it() {
    let marker = tempfile::tempdir().expect("tempdir");
    let pidfile = marker.path().join("build.pid");
    let app = temp_app(&[
        (
            "package.json",
            r#"{"main":"server.js","scripts":{"build":"node build.js"}}"#,
        ),
        ("server.js", ENV_APP),
        (
            "build.js",
            &format!(
                "require('fs').writeFileSync({:?}, String(process.pid)); setInterval(() => {{}}, 1000);",
                pidfile.to_str().expect("utf8")
            ),
        ),
    ]);
    let mut bext = Bext::run_unready(app.path(), &["--build"]);
    let build_pid: u32 = wait_for("the build to start", Duration::from_secs(60), || {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    });
    let status = bext.terminate(Duration::from_secs(20));
    assert_eq!(
        status.code(),
        Some(0),
        "a handled SIGTERM: {}",
        bext.log_text()
    );
    wait_for("the build to be gone", Duration::from_secs(10), || {
        (!alive(build_pid)).then_some(())
    });
    assert!(
        bext.log_text()
            .contains("stopped before the app was started"),
        "{}",
        bext.log_text()
    );
}

/// Reads until the server closes the connection (true) or `within` passes
/// (false); returns the bytes read too.
fn closed_within(stream: &mut std::net::TcpStream, within: Duration) -> (bool, usize) {
    use std::io::Read;
    let deadline = std::time::Instant::now() + within;
    let mut total = 0;
    let mut buf = [0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return (false, total);
        }
        stream.set_read_timeout(Some(left)).expect("timeout");
        match stream.read(&mut buf) {
            Ok(0) => return (true, total),
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (true, total),
            Err(_) => return (false, total),
        }
    }
}

/// An app whose `/stall` sends part of a body and then nothing.
const STALLING_APP: &str = r#"
const http = require('http');
http.createServer((req, res) => {
  if (req.url === '/stall') {
    res.writeHead(200, { 'content-type': 'text/plain', 'cache-control': 'no-store' });
    return res.write('partial ');
  }
  if (req.url === '/big') {
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'cache-control': 'no-store' });
    return res.end(Buffer.alloc(32 * 1024 * 1024, 120));
  }
  res.end('ok');
}).listen(process.env.PORT || 3000);
"#;

fn timed_app() -> (tempfile::TempDir, Bext) {
    let app = temp_app(&[
        ("package.json", r#"{"main":"server.js"}"#),
        ("server.js", STALLING_APP),
        (
            "bext.config.toml",
            "[server]\nclient_header_timeout_ms = 1000\nkeepalive_timeout_ms = 3000\n\
             send_timeout_ms = 1000\nupstream_timeout_ms = 1000\n",
        ),
    ]);
    let bext = Bext::run(app.path(), &["--workers", "1"]);
    (app, bext)
}

/// Fault 4: connections are bounded in time, with nginx's names: a silent
/// one, a half-sent HTTP/2 preface and an idle h2c connection are closed;
/// HTTP/1.1 keep-alive outlives the header timeout but not its own.
#[tokio::test(flavor = "multi_thread")]
async fn issue11_idle_and_silent_connections_are_closed() {
    use std::io::Write;
    let (_app, bext) = timed_app();
    let connect = || std::net::TcpStream::connect(bext.addr).expect("connect");

    let mut silent = connect();
    let mut half_preface = connect();
    half_preface
        .write_all(b"PRI * HTTP/2.0\r\n")
        .expect("write");
    let mut h2_idle = connect();
    h2_idle
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .expect("preface and SETTINGS");
    for (name, stream) in [
        ("silent", &mut silent),
        ("half-sent h2 preface", &mut half_preface),
        ("idle h2c", &mut h2_idle),
    ] {
        let (closed, _) = closed_within(stream, Duration::from_secs(10));
        assert!(closed, "{name} connection still open after 10 s");
    }

    // Keep-alive: idle past the header timeout (1 s), a second request on
    // the same connection is still served; idle past 3 s, it is closed.
    let mut kept = connect();
    let request = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
    let read_ok = |stream: &mut std::net::TcpStream| {
        use std::io::Read;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).expect("response");
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("ok"),
            "{text}"
        );
    };
    kept.write_all(request).expect("first request");
    read_ok(&mut kept);
    std::thread::sleep(Duration::from_millis(1600)); // idle, on purpose
    kept.write_all(request).expect("second request");
    read_ok(&mut kept);
    let (closed, _) = closed_within(&mut kept, Duration::from_secs(10));
    assert!(closed, "idle keep-alive connection still open after 10 s");

    let health = client()
        .get(bext.url("/__bext/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 200, "still serving");
}

/// Fault 4: a client that stops reading is cut off after send_timeout, and
/// a worker that stalls mid-body after upstream_timeout; others are served.
#[tokio::test(flavor = "multi_thread")]
async fn issue11_slow_readers_and_stalled_bodies_are_cut_off() {
    use std::io::Write;
    let (_app, bext) = timed_app();
    let mut reader = std::net::TcpStream::connect(bext.addr).expect("connect");
    reader
        .write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        .expect("request");
    // Read nothing for a while: the socket buffers fill, bext's writes
    // stall, and send_timeout (1 s) ends the connection.
    std::thread::sleep(Duration::from_secs(3)); // a client that does not read
    let (closed, read) = closed_within(&mut reader, Duration::from_secs(20));
    assert!(closed, "the connection was not closed");
    assert!(
        read < 32 * 1024 * 1024,
        "the whole body ({read} bytes) was sent to a client that did not read"
    );

    let started = std::time::Instant::now();
    let stalled = client()
        .get(bext.url("/stall"))
        .send()
        .await
        .expect("head arrives");
    assert_eq!(stalled.status(), 200);
    let body = stalled.bytes().await;
    assert!(body.is_err(), "a stalled body ends in an error: {body:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "cut off after the upstream timeout, not held: {:?}",
        started.elapsed()
    );
    let ok = client().get(bext.url("/")).send().await.expect("GET /");
    assert_eq!(ok.text().await.expect("body"), "ok");
}

/// Fault 6: what a client claims about itself, or Next's internal
/// middleware marker, never reaches the app from an untrusted peer.
#[tokio::test(flavor = "multi_thread")]
async fn issue11_client_claims_do_not_reach_the_app() {
    let app = temp_app(&[
        ("package.json", r#"{"main":"server.js"}"#),
        (
            "server.js",
            "require('http').createServer((q, s) => { s.setHeader('cache-control', 'no-store'); \
             s.end(JSON.stringify(q.headers)); }).listen(3000);",
        ),
    ]);
    let bext = Bext::run(app.path(), &["--workers", "1"]);
    let seen: Value = client()
        .get(bext.url("/"))
        .header("x-real-ip", "6.6.6.6")
        .header("x-forwarded-port", "443")
        .header("x-forwarded-prefix", "/admin")
        .header(
            "x-middleware-subrequest",
            "middleware:middleware:middleware",
        )
        .header("x-forwarded-for", "6.6.6.6")
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    for name in [
        "x-real-ip",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-middleware-subrequest",
    ] {
        assert!(seen.get(name).is_none(), "{name} reached the app: {seen}");
    }
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
}

/// Fault 7: pids, memory and counters are for admin networks only; the
/// world gets the health status alone. Behind a local proxy every peer is
/// 127.0.0.1, so the client is what `trusted_proxies` make of it.
#[tokio::test(flavor = "multi_thread")]
async fn issue11_admin_detail_is_for_admin_networks_only() {
    let (_dir, bext) = origin("[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n");
    let get = |path: &'static str, from: Option<&'static str>| {
        let mut request = client().get(bext.url(path));
        if let Some(ip) = from {
            request = request.header("x-forwarded-for", ip);
        }
        request.send()
    };
    let local: Value = get("/__bext/health", None)
        .await
        .expect("health")
        .json()
        .await
        .expect("json");
    assert!(local["workers"][0]["pid"].is_u64(), "full report: {local}");
    assert_eq!(
        get("/__bext/metrics", None)
            .await
            .expect("metrics")
            .status(),
        200
    );

    let outside = get("/__bext/health", Some("203.0.113.5"))
        .await
        .expect("health");
    assert_eq!(outside.status(), 200);
    let outside: Value = outside.json().await.expect("json");
    assert_eq!(outside, serde_json::json!({"status": "ok"}), "status only");
    let metrics = get("/__bext/metrics", Some("203.0.113.5"))
        .await
        .expect("metrics");
    assert_eq!(metrics.status(), 403);
}

/// Fault 8: `//docs` on a static site redirects to `/docs/`, never to the
/// protocol-relative `//docs/` (another site, to a browser).
#[test]
fn issue11_a_directory_redirect_is_never_protocol_relative() {
    let bext = Bext::run(&fixture("static"), &[]);
    for target in ["//docs", "///docs", "/docs"] {
        let (status, headers, _) = crate::support::raw_get(bext.addr, target);
        assert_eq!(status, 301, "{target}");
        let location = headers
            .lines()
            .find_map(|l| l.strip_prefix("location: "))
            .unwrap_or_else(|| panic!("no location for {target}: {headers}"));
        assert_eq!(location.trim(), "/docs/", "{target}");
    }
}

/// A POST runs to its end once a worker has it, even if its client leaves
/// (see `nextjs::a_server_action_whose_client_leaves_…`); but one whose
/// client leaves while it still waits for a worker is dropped, so that
/// posting and hanging up cannot fill an app's queue with work no one
/// waits for. The access log says 499.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_whose_client_leaves_while_queued_never_reaches_the_app() {
    use std::io::Write;
    const SERVER: &str = r#"
const http = require('http');
http.createServer((req, res) => {
  console.log(`got ${req.method} ${req.url}`);
  if (req.url.startsWith('/slow')) return setTimeout(() => res.end('slow done'), 1500);
  req.resume();
  req.on('end', () => res.end('ok'));
}).listen(3000);
"#;
    let app = temp_app(&[
        (
            "package.json",
            r#"{"name": "queue", "private": true, "scripts": {"start": "node server.js"}}"#,
        ),
        ("server.js", SERVER),
        ("bext.config.toml", "[isolate]\nmax_inflight = 1\n"),
    ]);
    let bext = Bext::run(app.path(), &["--workers", "1"]);
    let http = client();
    // (A connection closed right after its request may be dropped before
    // bext takes the request at all: then there is nothing to see, and the
    // test tries again.)
    let mut queued = false;
    for attempt in 0..5 {
        let slow = format!("/slow?{attempt}");
        let busy = tokio::spawn(http.get(bext.url(&slow)).send());
        let started = format!("got GET {slow}");
        bext.wait_log(Duration::from_secs(10), |v| {
            v["message"] == started.as_str()
        });

        // Queued behind /slow; its client leaves at once.
        let mut stream = std::net::TcpStream::connect(bext.addr).expect("connect");
        write!(
            stream,
            "POST /form HTTP/1.1\r\nHost: x\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nhi"
        )
        .expect("send");
        stream.flush().expect("flush");
        drop(stream);

        let slow = busy.await.expect("join").expect("slow");
        assert_eq!(slow.text().await.expect("body"), "slow done");
        let abandoned = bext
            .logs()
            .into_iter()
            .find(|v| v["target"] == "bext::access" && v["path"] == "/form");
        if let Some(line) = abandoned {
            assert_eq!(line["status"], 499, "{line}");
            queued = true;
            break;
        }
    }
    assert!(queued, "bext never took the post in five tries");
    // The next request reaches the app; the POST never did.
    let after = http.get(bext.url("/after")).send().await.expect("after");
    assert_eq!(after.status(), 200);
    bext.wait_log(Duration::from_secs(10), |v| {
        v["message"] == "got GET /after"
    });
    assert!(
        !bext.log_text().contains("got POST /form"),
        "{}",
        bext.log_text()
    );
}
