//! The proxy: forwarded headers, request ids, hop-by-hop headers, h2c, and
//! upstream failures mapped to 502/503/504 with the server still serving.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::support::{Bext, PLAIN_NODE_SERVER, client, fixture, temp_app};

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_sees_forwarded_headers_and_never_hop_by_hop_ones() {
    let bext = Bext::run(&fixture("express"), &["--workers", "1"]);
    let response = client()
        .get(bext.url("/headers"))
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-request-id", "client-chosen-id.42")
        .header("connection", "keep-alive, x-private, host")
        .header("x-private", "must not pass")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .send()
        .await
        .expect("GET /headers");
    assert_eq!(response.headers()["x-request-id"], "client-chosen-id.42");
    let seen: serde_json::Value = response.json().await.expect("json");
    assert_eq!(
        seen["x-forwarded-for"], "127.0.0.1",
        "the peer, not the client's claim"
    );
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], bext.addr.to_string());
    assert_eq!(seen["host"], bext.addr.to_string());
    assert_eq!(seen["x-request-id"], "client-chosen-id.42");
    assert!(seen.get("x-private").is_none(), "{seen}");
    assert!(seen.get("proxy-authorization").is_none(), "{seen}");

    // A bad id is replaced by a fresh one, echoed to the client.
    let response = client()
        .get(bext.url("/headers"))
        .header("x-request-id", "no spaces allowed")
        .send()
        .await
        .expect("GET");
    let id = response.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_string();
    let seen: serde_json::Value = response.json().await.expect("json");
    assert_eq!(seen["x-request-id"], id.as_str());
    assert_eq!(id.len(), 32);
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_are_served_by_the_number_of_threads_asked_for() {
    let bext = Bext::run(&fixture("hono"), &["--workers", "1", "--threads", "3"]);
    let line = bext.wait_log(Duration::from_secs(5), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("listening on"))
    });
    assert_eq!(line["threads"], 3);
    let shards: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", bext.pid()))
        .expect("tasks")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .filter(|name| name.starts_with("bext-shard-"))
        .collect();
    assert_eq!(shards.len(), 3, "{shards:?}");
    // Many connections at once, each answered whichever thread took it.
    let answers = futures_util::future::join_all((0..60).map(|_| {
        let url = bext.url("/");
        async move {
            // A client each: a connection each.
            let response = client().get(url).send().await.expect("GET /");
            (
                response.status().as_u16(),
                response.text().await.expect("body"),
            )
        }
    }))
    .await;
    assert!(
        answers
            .iter()
            .all(|(status, body)| *status == 200 && body == "Hello Hono!"),
        "{answers:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn h2c_prior_knowledge_is_served() {
    let bext = Bext::run(&fixture("hono"), &["--workers", "1"]);
    let h2 = crate::support::client_builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let response = h2.get(bext.url("/")).send().await.expect("h2c GET");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.text().await.expect("body"), "Hello Hono!");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_failures_map_to_502_and_504_and_serving_goes_on() {
    let app = temp_app(&[
        ("package.json", r#"{"main":"server.js"}"#),
        ("server.js", PLAIN_NODE_SERVER),
        (
            "bext.config.toml",
            "[server]\nupstream_timeout_ms = 400\n[isolate]\nworkers = 2\n",
        ),
    ]);
    let bext = Bext::run(app.path(), &[]);
    let http = client();

    let hung = http.get(bext.url("/hang")).send().await.expect("GET /hang");
    assert_eq!(hung.status(), 504);
    assert_eq!(hung.text().await.expect("body"), "504 gateway timeout\n");

    // The timeout is a timer per upstream connection, moved to each
    // request's deadline: a pooled connection that sat idle past its last
    // deadline still serves (its old deadline must not fire), and a hung
    // request on it still times out, no sooner than the timeout.
    let get_root = || async {
        let response = http.get(bext.url("/")).send().await.expect("GET /");
        response.status()
    };
    assert_eq!(get_root().await, 200);
    assert_eq!(get_root().await, 200);
    // Idle longer than the timeout: the scenario under test, not a wait.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(get_root().await, 200);
    let started = std::time::Instant::now();
    let hung = http.get(bext.url("/hang")).send().await.expect("GET /hang");
    assert_eq!(hung.status(), 504);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "timed out early: {:?}",
        started.elapsed()
    );

    // A POST is never retried: the worker died mid-request → 502.
    let died = http
        .post(bext.url("/die"))
        .body("x")
        .send()
        .await
        .expect("POST /die");
    assert_eq!(died.status(), 502);
    assert_eq!(
        died.text().await.expect("body"),
        "502 bad gateway\n",
        "details stay in the log"
    );
    bext.wait_log(Duration::from_secs(5), |v| {
        v["message"].as_str().is_some_and(|m| {
            m.starts_with("upstream failure: worker") && m.contains("closed the connection")
        })
    });

    assert_eq!(
        http.get(bext.url("/"))
            .send()
            .await
            .expect("GET /")
            .status(),
        200
    );
}

#[test]
fn malformed_requests_get_a_4xx_and_the_server_keeps_serving() {
    let app = temp_app(&[
        ("package.json", r#"{"main":"server.js"}"#),
        ("server.js", PLAIN_NODE_SERVER),
    ]);
    let bext = Bext::run(app.path(), &["--workers", "1"]);
    let exchange = |request: &[u8]| -> String {
        let mut stream = TcpStream::connect(bext.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream.write_all(request).expect("write");
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        String::from_utf8_lossy(&response).into_owned()
    };
    assert!(exchange(b"NOT HTTP AT ALL\r\n\r\n").starts_with("HTTP/1.1 400"));
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(128 * 1024)
    );
    assert!(exchange(huge.as_bytes()).starts_with("HTTP/1.1 431"));
    let ok = exchange(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(
        ok.starts_with("HTTP/1.1 200") && ok.ends_with("plain node"),
        "{ok}"
    );
}
