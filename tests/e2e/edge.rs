//! Issue 14: edge mode. Two `bext run` instances of the origin fixture share
//! a real `redis-server` (started here on a free port): one configured by
//! `[redis]`, the other by `REDIS_URL` alone.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::{Bext, Options, client, fixture, wait_for};

/// A `redis-server` of the test's own, stopped (killed) on drop.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut redis = Redis {
            child: None,
            port,
            dir,
        };
        redis.run();
        redis
    }

    /// Starts (or restarts) the server on its port.
    fn run(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (tests/fixtures/setup.sh installs it)");
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().expect("addr");
        wait_for("redis-server to answer", Duration::from_secs(10), || {
            ping(addr).then_some(())
        });
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// SIGKILL, as a crash would.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until A's write of `count` objects has reached Redis (a fill
    /// stores its object as its body ends, just after the client has it).
    fn wait_objects(&self, count: usize) {
        wait_for("the objects in Redis", Duration::from_secs(10), || {
            let keys = self.cli(&["--scan", "--pattern", "bext:*:o:*"]);
            (keys.lines().count() >= count).then_some(())
        });
    }

    /// GET commands Redis has run so far.
    fn gets(&self) -> u64 {
        self.calls("get")
    }

    /// `command`s Redis has run so far.
    fn calls(&self, command: &str) -> u64 {
        let stats = self.cli(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{command}:calls=");
        stats
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// A command through `redis-cli`, its output.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a Redis answers PING at `addr`.
fn ping(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// An instance of the origin fixture with `config` and `env`.
fn instance(config: &str, env: &[(&str, String)]) -> (tempfile::TempDir, Bext) {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = fixture("origin");
    for file in ["package.json", "server.js"] {
        std::fs::copy(origin.join(file), dir.path().join(file)).expect("copy");
    }
    std::fs::write(dir.path().join("bext.config.toml"), config).expect("config");
    let bext = Bext::start(
        dir.path(),
        &Options {
            args: vec!["--workers".into(), "1".into()],
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            ..Options::default()
        },
    );
    (dir, bext)
}

/// Two instances sharing `redis`: A by `[redis]` (with the default
/// prefix spelled out), B by `REDIS_URL` alone. Both purge with a token.
fn pair(redis: &Redis) -> ((tempfile::TempDir, Bext), (tempfile::TempDir, Bext)) {
    let token = ("BEXT_PURGE_TOKEN", "edge-token".to_string());
    let a = instance(
        &format!(
            "[redis]\nurl = \"{}\"\nprefix = \"bext:\"\ntimeout_ms = 200\n",
            redis.url()
        ),
        std::slice::from_ref(&token),
    );
    let b = instance("", &[("REDIS_URL", redis.url()), token]);
    (a, b)
}

/// GET `path` with Host `site.test` (the same URL on every instance, as
/// behind a load balancer): (x-bext-cache, body).
async fn get(bext: &Bext, path: &str, headers: &[(&str, &str)]) -> (String, String) {
    let mut request = client().get(bext.url(path)).header("host", "site.test");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("GET");
    let state = response
        .headers()
        .get("x-bext-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (state, response.text().await.expect("body"))
}

/// Renders of `path` by this instance's app.
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

async fn purge(bext: &Bext, body: &str) -> Value {
    client()
        .post(bext.url("/__bext/cache/invalidate"))
        .header("host", "site.test")
        .header("authorization", "Bearer edge-token")
        .body(body.to_string())
        .send()
        .await
        .expect("purge")
        .json()
        .await
        .expect("purge json")
}

/// Issue 14, acceptance 1: a page rendered through A is a HIT on B with no
/// render there; a page that varies (as every App Router page does on
/// `rsc`) too, per variant.
#[tokio::test(flavor = "multi_thread")]
async fn issue14_a_page_rendered_on_one_instance_is_a_hit_on_the_other() {
    let redis = Redis::start();
    let ((_a_dir, a), (_b_dir, b)) = pair(&redis);

    let page = "/page/shared?cc=public,max-age=600";
    let (state, body) = get(&a, page, &[]).await;
    assert_eq!(state, "MISS");
    assert!(body.starts_with("/page/shared render 1"), "{body}");
    redis.wait_objects(1);
    let (gets, mgets) = (redis.calls("get"), redis.calls("mget"));
    let (state, body) = get(&b, page, &[]).await;
    assert_eq!(state, "HIT", "{body}");
    assert!(
        body.starts_with("/page/shared render 1"),
        "A's render: {body}"
    );
    // One round trip: the URL's Vary names and its object together.
    assert_eq!(
        (redis.calls("get") - gets, redis.calls("mget") - mgets),
        (0, 1),
        "one MGET for an L2 hit"
    );
    assert_eq!(renders(&b, "/page/shared").await, 0, "no render on B");
    // Promoted into B's memory: the next hits need no Redis at all.
    let gets = redis.gets();
    for _ in 0..5 {
        let (state, _) = get(&b, page, &[]).await;
        assert_eq!(state, "HIT");
    }
    assert_eq!(redis.gets(), gets, "hits in memory ask Redis nothing");

    // Varied: B finds the URL's Vary names in Redis, and each variant.
    let varied = "/page/rsc?cc=public,max-age=600&vary=rsc";
    let (state, body) = get(&a, varied, &[("rsc", "1")]).await;
    assert_eq!(state, "MISS");
    assert!(body.contains("rsc=1"), "{body}");
    redis.wait_objects(2);
    let (state, body) = get(&b, varied, &[("rsc", "1")]).await;
    assert_eq!(state, "HIT", "{body}");
    assert!(body.starts_with("/page/rsc render 1 rsc=1"), "{body}");
    let (state, body) = get(&b, varied, &[]).await;
    assert_eq!(state, "MISS", "another variant: {body}");
    assert!(body.contains("rsc="), "{body}");
    assert!(!body.contains("rsc=1"), "{body}");
    assert_eq!(renders(&b, "/page/rsc").await, 1, "only the new variant");

    // What Redis holds is namespaced: prefix, app, kind.
    let keys = redis.cli(&["--scan", "--pattern", "bext:*"]);
    assert!(keys.lines().any(|k| k.contains(":o:")), "{keys}");
    assert!(keys.lines().all(|k| k.starts_with("bext:")), "{keys}");
}

/// Issue 14, acceptance 2 (the behaviour; the 100-purge latency figure is
/// for bench/edge.sh): a tag purge on A reaches B's memory.
#[tokio::test(flavor = "multi_thread")]
async fn issue14_a_purge_on_one_instance_purges_the_other() {
    let redis = Redis::start();
    let ((_a_dir, a), (_b_dir, b)) = pair(&redis);
    let page = "/page/tagged?cc=public,max-age=600&tags=posts";
    // B's app renders the path once unstored first: its renders count from
    // 2, A's from 1, so each body says whose it is.
    get(&b, "/page/tagged?cc=no-store", &[]).await;
    assert_eq!(get(&a, page, &[]).await.0, "MISS");
    redis.wait_objects(1);
    assert_eq!(get(&b, page, &[]).await.0, "HIT");
    assert_eq!(get(&b, page, &[]).await.0, "HIT", "now in B's memory");

    let purged = purge(&a, r#"{"tags":["posts"]}"#).await;
    assert!(purged["purged"].as_u64().unwrap_or(0) >= 1, "{purged}");
    // B drops its copy when the message arrives: its next request renders.
    let body = crate::support::wait_for_async(
        "B to drop the purged page",
        Duration::from_secs(5),
        || async {
            let (state, body) = get(&b, page, &[]).await;
            (state == "MISS").then_some(body)
        },
    )
    .await;
    assert!(
        body.starts_with("/page/tagged render 2"),
        "B's own render: {body}"
    );
    // A's copy went too: it now serves the page B rendered after the
    // purge (shared through Redis), not its own from before it.
    redis.wait_objects(1);
    let (state, body) = get(&a, page, &[]).await;
    assert_eq!(state, "HIT", "{body}");
    assert!(
        body.starts_with("/page/tagged render 2"),
        "B's render: {body}"
    );
    assert_eq!(
        renders(&a, "/page/tagged").await,
        1,
        "no second render on A"
    );
}

/// Issue 14, acceptance 5 (in part): Redis killed with -9 — every request
/// is still answered (memory, then the app); Redis back — shared again,
/// with no restart, and an instance that was cut off drops what it held.
#[tokio::test(flavor = "multi_thread")]
async fn issue14_losing_redis_loses_no_request_and_it_is_shared_again_when_back() {
    let mut redis = Redis::start();
    let ((_a_dir, a), (_b_dir, b)) = pair(&redis);
    let page = "/page/before?cc=public,max-age=600";
    assert_eq!(get(&a, page, &[]).await.0, "MISS");
    redis.wait_objects(1);
    assert_eq!(get(&b, page, &[]).await.0, "HIT");

    redis.kill();
    for round in 0..20 {
        let started = std::time::Instant::now();
        let (state, _) = get(&b, page, &[]).await;
        assert_eq!(state, "HIT", "round {round}: memory still serves");
        let fresh = format!("/page/down-{round}?cc=public,max-age=600");
        let (state, body) = get(&a, &fresh, &[]).await;
        assert_eq!(state, "MISS", "{body}");
        assert!(body.contains("render 1"), "renders still work: {body}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "round {round} took {:?}",
            started.elapsed()
        );
    }

    // Said in health and metrics: serving, degraded.
    let health: Value = client()
        .get(a.url("/__bext/health"))
        .send()
        .await
        .expect("health")
        .json()
        .await
        .expect("json");
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["cache"]["redis"], "down", "{health}");
    let metrics = client()
        .get(a.url("/__bext/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("bext_redis_up{app=\""), "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("bext_redis_up{") && l.ends_with(" 0")),
        "{metrics}"
    );

    // A purge while Redis is away is done here, and says it went no
    // further (503: the other instances still serve it; retry).
    let response = client()
        .post(a.url("/__bext/cache/invalidate"))
        .header("host", "site.test")
        .header("authorization", "Bearer edge-token")
        .body(r#"{"paths":["/page/before"]}"#)
        .send()
        .await
        .expect("purge");
    assert_eq!(response.status(), 503);
    let purged: Value = response.json().await.expect("json");
    assert_eq!(purged["purged"], 1, "{purged}");
    assert!(
        purged["error"]
            .as_str()
            .is_some_and(|e| e.contains("did not reach Redis")),
        "{purged}"
    );
    assert_eq!(get(&a, page, &[]).await.0, "MISS", "purged here");

    redis.run();
    // Shared again, by itself (after the skip that follows failures).
    let body = crate::support::wait_for_async(
        "the L2 to be shared again",
        Duration::from_secs(60),
        || async {
            let path = format!("/page/after-{}?cc=public,max-age=600", rand_suffix());
            let (state, _) = get(&a, &path, &[]).await;
            if state != "MISS" {
                return None;
            }
            let (state, body) = get(&b, &path, &[]).await;
            (state == "HIT").then_some(body)
        },
    )
    .await;
    assert!(body.contains("render 1"), "{body}");
    let health: Value = client()
        .get(a.url("/__bext/health"))
        .send()
        .await
        .expect("health")
        .json()
        .await
        .expect("json");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["cache"]["redis"], "up", "{health}");
    // B was cut off from the purge channel: what it held is dropped.
    b.wait_log(Duration::from_secs(60), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("redis: purge channel back"))
    });
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed).to_string()
}

/// `[redis]` mistakes are config errors naming the key; a tenant's file
/// in multi-app mode may not have the table.
#[test]
fn issue14_redis_config_errors_name_the_key() {
    let check = |config: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("index.html"), "<h1>site</h1>").expect("write");
        let file = dir.path().join("bext.config.toml");
        std::fs::write(&file, config).expect("write");
        let (code, out, err) = crate::support::bext_command(&[
            "check",
            dir.path().to_str().expect("utf8"),
            "--config",
            file.to_str().expect("utf8"),
        ]);
        (code, format!("{out}{err}"))
    };
    let (code, text) = check("[redis]\nprefix = \"x:\"\n");
    assert_ne!(code, 0);
    assert!(
        text.contains("redis.url") && text.contains("missing"),
        "{text}"
    );
    let (code, text) = check("[redis]\nurl = \"http://localhost:6379\"\n");
    assert_ne!(code, 0);
    assert!(
        text.contains("redis.url") && text.contains("redis://"),
        "{text}"
    );
    let (code, text) = check("[redis]\nurl = \"redis://localhost:6379\"\ntimeout_ms = 60000\n");
    assert_ne!(code, 0);
    assert!(text.contains("redis.timeout_ms"), "{text}");
    let (code, text) = check("[redis]\nurl = \"redis://localhost:6379\"\nwrite = \"later\"\n");
    assert_ne!(code, 0);
    assert!(text.contains("write"), "{text}");
    let (code, text) = check("[redis]\nurl = \"redis://localhost:6379\"\nwrite = \"async\"\n");
    assert_eq!(code, 0, "{text}");
}

/// `bext check` says whether Redis answers, without failing when it does
/// not (bext serves without it), and never prints the URL's password.
#[test]
fn issue14_bext_check_asks_redis() {
    let mut redis = Redis::start();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("index.html"), "<h1>site</h1>").expect("write");
    let url = format!("redis://:hunter2@127.0.0.1:{}/", redis.port);
    std::fs::write(
        dir.path().join("bext.config.toml"),
        format!("[redis]\nurl = \"{url}\"\n"),
    )
    .expect("write");
    let check = || crate::support::bext_command(&["check", dir.path().to_str().expect("utf8")]);
    let (code, out, err) = check();
    assert_eq!(code, 0, "{err}");
    // (No password is set on this Redis: AUTH fails, and says so.)
    assert!(out.contains("redis: 127.0.0.1:"), "{out}");
    assert!(
        !out.contains("hunter2") && !err.contains("hunter2"),
        "{out}{err}"
    );
    std::fs::write(
        dir.path().join("bext.config.toml"),
        format!("[redis]\nurl = \"{}\"\n", redis.url()),
    )
    .expect("write");
    let (code, out, _) = check();
    assert_eq!(code, 0);
    assert!(out.contains("answers (edge mode"), "{out}");
    redis.kill();
    let (code, out, _) = check();
    assert_eq!(code, 0, "Redis away is no reason not to start");
    assert!(out.contains("does not answer"), "{out}");
}

/// GET `path` on `bext`: (status, `ratelimit-remaining`).
async fn limited(bext: &Bext, path: &str) -> (u16, Option<u64>) {
    let response = client()
        .get(bext.url(path))
        .header("host", "site.test")
        .send()
        .await
        .expect("GET");
    let remaining = response
        .headers()
        .get("ratelimit-remaining")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (response.status().as_u16(), remaining)
}

/// Issue 14, acceptance 4: `[rate_limit] rpm = 60` (single-app mode) holds
/// across two instances: the minute's allowance is one for the fleet, not
/// one per instance (GCRA in Redis, by Redis's clock: no window whose
/// boundary a burst could straddle).
#[tokio::test(flavor = "multi_thread")]
async fn issue14_a_rate_limit_holds_across_the_fleet() {
    let redis = Redis::start();
    let (_a_dir, a) = instance(
        &format!(
            "[redis]\nurl = \"{}\"\n[rate_limit]\nrpm = 60\n",
            redis.url()
        ),
        &[],
    );
    let (_b_dir, b) = instance("[rate_limit]\nrpm = 60\n", &[("REDIS_URL", redis.url())]);
    // The whole minute's burst, alternating between the instances: each
    // answer counts what both have let through.
    let mut last = None;
    for i in 0..60 {
        let bext = if i % 2 == 0 { &a } else { &b };
        let (status, remaining) = limited(bext, "/pid").await;
        assert_eq!(status, 200, "request {i} is within the allowance");
        last = remaining;
    }
    // Alone, each instance would still have half of its own 60 left.
    assert!(last.is_some_and(|r| r <= 5), "fleet-wide count: {last:?}");
    // More right away: refused on both (at most the one request a second
    // that the limit refills gets through).
    let mut refused = 0;
    for i in 0..10 {
        let bext = if i % 2 == 0 { &a } else { &b };
        if limited(bext, "/pid").await.0 == 429 {
            refused += 1;
        }
    }
    assert!(refused >= 8, "{refused} of 10 refused");
    // The limit lives in Redis, under the prefix.
    let keys = redis.cli(&["--scan", "--pattern", "bext:bext-fixture-origin:rl:*"]);
    assert_eq!(keys.lines().count(), 1, "{keys}");
}

/// Issue 14, acceptance 3: an entry gone stale (within its
/// stale-while-revalidate window) requested from three instances at once
/// is rendered again once for the whole fleet; every instance then serves
/// that render.
#[tokio::test(flavor = "multi_thread")]
async fn issue14_a_stale_page_is_rendered_again_once_for_the_fleet() {
    let redis = Redis::start();
    let fleet = fleet(&redis);
    let [a, b, c] = [&fleet[0].1, &fleet[1].1, &fleet[2].1];
    // A render takes 300 ms: the three requests come while it runs.
    let page = "/page/swr?cc=public,max-age=600,stale-while-revalidate=600&tags=swr&delay=300";
    assert_eq!(get(a, page, &[]).await.0, "MISS");
    redis.wait_objects(1);
    assert_eq!(get(b, page, &[]).await.0, "HIT");
    assert_eq!(get(c, page, &[]).await.0, "HIT");

    // Stale everywhere at once: a soft purge on A, applied by B and C.
    let purged = purge(a, r#"{"tags":["swr"],"soft":true}"#).await;
    assert_eq!(purged["soft"], true, "{purged}");
    for other in [b, c] {
        other.wait_log(Duration::from_secs(10), |v| {
            v["message"] == "cache purge (from another instance)"
        });
    }
    let (ra, rb, rc) = tokio::join!(get(a, page, &[]), get(b, page, &[]), get(c, page, &[]));
    assert!(
        [&ra, &rb, &rc].iter().all(|(state, _)| state == "STALE"),
        "all three during the one render: {ra:?} {rb:?} {rc:?}"
    );

    // Then each serves the one new render, as a hit (from its memory, or
    // from Redis where the winner put it).
    for bext in [a, b, c] {
        crate::support::wait_for_async(
            "the new render everywhere",
            Duration::from_secs(15),
            || async {
                let (state, _) = get(bext, page, &[]).await;
                (state == "HIT" && renders_sum(&fleet).await >= 2).then_some(())
            },
        )
        .await;
    }
    assert_eq!(
        renders_sum(&fleet).await,
        2,
        "the first render and one revalidation"
    );
}

/// Three instances sharing `redis` by `[redis]`, purging with a token.
fn fleet(redis: &Redis) -> [(tempfile::TempDir, Bext); 3] {
    let token = ("BEXT_PURGE_TOKEN", "edge-token".to_string());
    let config = format!("[redis]\nurl = \"{}\"\n", redis.url());
    std::array::from_fn(|_| instance(&config, std::slice::from_ref(&token)))
}

/// Renders of `/page/swr` by every instance's app.
async fn renders_sum(fleet: &[(tempfile::TempDir, Bext)]) -> u64 {
    renders_of(fleet, "/page/swr").await
}

/// Renders of `path` by every instance's app.
async fn renders_of(fleet: &[(tempfile::TempDir, Bext)], path: &str) -> u64 {
    let mut sum = 0;
    for (_, bext) in fleet {
        sum += renders(bext, path).await;
    }
    sum
}

/// A page no instance holds (never rendered, or purged hard), asked of
/// three instances at once: one render for the fleet; the other two wait
/// for it in Redis and answer it (a collapsed miss).
#[tokio::test(flavor = "multi_thread")]
async fn issue14_a_missing_page_is_rendered_once_for_the_fleet() {
    let redis = Redis::start();
    let fleet = fleet(&redis);
    let [a, b, c] = [&fleet[0].1, &fleet[1].1, &fleet[2].1];
    // A render takes 300 ms: the three requests come while it runs.
    let page = "/page/cold?cc=public,max-age=600&tags=cold&delay=300";
    for round in 1..=2 {
        let (ra, rb, rc) = tokio::join!(get(a, page, &[]), get(b, page, &[]), get(c, page, &[]));
        assert_eq!(
            renders_of(&fleet, "/page/cold").await,
            round,
            "round {round}: one render for three instances: {ra:?} {rb:?} {rc:?}"
        );
        for (state, body) in [&ra, &rb, &rc] {
            assert_eq!(state, "MISS", "{body}");
            assert_eq!(body, &ra.1, "the one render everywhere");
        }
        // The lease was given back with the store (not left to run out).
        assert_eq!(
            redis.cli(&["--scan", "--pattern", "bext:*:lease:*"]),
            "",
            "no lease left"
        );
        // Purged hard everywhere: missing again.
        let purged = purge(a, r#"{"tags":["cold"]}"#).await;
        assert!(purged["purged"].as_u64().unwrap_or(0) >= 1, "{purged}");
        for other in [b, c] {
            crate::support::wait_for_async(
                "the purge to reach the others",
                Duration::from_secs(5),
                || async {
                    let applied = other
                        .logs()
                        .iter()
                        .filter(|v| v["message"] == "cache purge (from another instance)")
                        .count();
                    (applied >= round as usize).then_some(())
                },
            )
            .await;
        }
    }
}

/// The same for a page that varies (as every App Router page does, on
/// `rsc`): the others wait for the variant the render stored, which they
/// find through the URL's Vary names in Redis.
#[tokio::test(flavor = "multi_thread")]
async fn issue14_a_missing_varied_page_is_rendered_once_for_the_fleet() {
    let redis = Redis::start();
    let fleet = fleet(&redis);
    let [a, b, c] = [&fleet[0].1, &fleet[1].1, &fleet[2].1];
    let page = "/page/varied?cc=public,max-age=600&vary=rsc&delay=300";
    let rsc = [("rsc", "1")];
    let (ra, rb, rc) = tokio::join!(get(a, page, &rsc), get(b, page, &rsc), get(c, page, &rsc));
    assert_eq!(
        renders_of(&fleet, "/page/varied").await,
        1,
        "one render for three instances: {ra:?} {rb:?} {rc:?}"
    );
    for (state, body) in [&ra, &rb, &rc] {
        assert_eq!(state, "MISS", "{body}");
        assert_eq!(body, &ra.1, "the one render everywhere");
        assert!(body.contains("rsc=1"), "{body}");
    }
    // The other variant is a page of its own: one more render, once.
    let (ra, rb) = tokio::join!(get(a, page, &[]), get(b, page, &[]));
    assert_eq!(renders_of(&fleet, "/page/varied").await, 2, "{ra:?} {rb:?}");
    assert_eq!(ra.1, rb.1);
    assert_eq!(
        redis.cli(&["--scan", "--pattern", "bext:*:lease:*"]),
        "",
        "no lease left"
    );
}

/// A page that turns out not storable, asked of three instances at once:
/// the instance that took the lease tells the others (a marker in Redis
/// beside the lease it gives back), so they ask their apps at once instead
/// of one after another with the lease.
#[tokio::test(flavor = "multi_thread")]
async fn issue14_an_uncacheable_page_does_not_make_the_fleet_take_turns() {
    let redis = Redis::start();
    let fleet = fleet(&redis);
    let [a, b, c] = [&fleet[0].1, &fleet[1].1, &fleet[2].1];
    let delay = Duration::from_millis(2000);
    let page = format!("/page/dynamic?cc=private&delay={}", delay.as_millis());
    let started = std::time::Instant::now();
    let (ra, rb, rc) = tokio::join!(get(a, &page, &[]), get(b, &page, &[]), get(c, &page, &[]));
    let took = started.elapsed();
    assert_eq!(
        renders_of(&fleet, "/page/dynamic").await,
        3,
        "each asked its app"
    );
    for (state, body) in [&ra, &rb, &rc] {
        assert_eq!(state, "BYPASS", "{body}");
    }
    assert_ne!(
        redis.cli(&["--scan", "--pattern", "bext:*:pass:*"]),
        "",
        "the marker the others were told by"
    );
    // The first render, then the other two at once: twice the delay (in
    // turns, three times).
    assert!(
        took < delay * 5 / 2,
        "the last two renders overlapped: {took:?} for three of {delay:?}"
    );
    assert_eq!(
        redis.cli(&["--scan", "--pattern", "bext:*:lease:*"]),
        "",
        "no lease left"
    );
}

/// A soft purge marks the page stale on every instance (served STALE while
/// one revalidation runs), and a second one of the same tag, with nothing
/// left to mark in Redis, still reaches the others.
#[tokio::test(flavor = "multi_thread")]
async fn issue14_soft_purges_reach_every_instance() {
    let redis = Redis::start();
    let ((_a_dir, a), (_b_dir, b)) = pair(&redis);
    let page = "/page/soft?cc=public,max-age=600,stale-while-revalidate=600&tags=soft&delay=200";
    assert_eq!(get(&a, page, &[]).await.0, "MISS");
    redis.wait_objects(1);
    assert_eq!(get(&b, page, &[]).await.0, "HIT");
    let heard = |bext: &Bext| {
        bext.logs()
            .iter()
            .filter(|v| {
                v["message"] == "cache purge (from another instance)"
                    && v["soft"] == true
                    && v["selector"].as_str().is_some_and(|s| s.contains("soft"))
            })
            .count()
    };
    for round in 1..=2 {
        let purged = purge(&a, r#"{"tags":["soft"],"soft":true}"#).await;
        assert_eq!(purged["soft"], true, "{purged}");
        wait_for("B to hear of the purge", Duration::from_secs(10), || {
            (heard(&b) >= round).then_some(())
        });
    }
    // Stale on B, not gone: answered at once while it is rendered again.
    let (state, body) = get(&b, page, &[]).await;
    assert_eq!(state, "STALE", "{body}");
    assert!(
        !a.log_text().contains("did not reach Redis"),
        "{}",
        a.log_text()
    );
}

/// A TCP proxy in front of `upstream` that holds every answer back by
/// `delay` (a slow Redis, or a slow network to it). Runs until dropped.
struct SlowProxy {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl SlowProxy {
    async fn start(upstream: u16, delay: Duration) -> SlowProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let up = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                    });
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = server_read.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        // The fault itself, not a synchronisation.
                        tokio::time::sleep(delay).await;
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    up.abort();
                });
            }
        });
        SlowProxy { port, task }
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Issue 14, acceptance 6: Redis answering 200 ms late — requests keep
/// their latency within the operation timeout (50 ms here): misses are
/// rendered without waiting for Redis longer than that, hits never ask it.
#[tokio::test(flavor = "multi_thread")]
async fn issue14_a_slow_redis_adds_at_most_the_timeout() {
    let redis = Redis::start();
    let proxy = SlowProxy::start(redis.port, Duration::from_millis(200)).await;
    let (_dir, a) = instance(
        &format!(
            "[redis]\nurl = \"redis://127.0.0.1:{}/\"\ntimeout_ms = 50\n",
            proxy.port
        ),
        &[],
    );
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let page = format!("/page/slow-{i}?cc=public,max-age=600");
        let started = std::time::Instant::now();
        let (state, body) = get(&a, &page, &[]).await;
        let took = started.elapsed();
        assert_eq!(state, "MISS", "{body}");
        assert!(body.contains("render 1"), "{body}");
        slowest = slowest.max(took);
        let started = std::time::Instant::now();
        let (state, _) = get(&a, &page, &[]).await;
        assert_eq!(state, "HIT");
        slowest = slowest.max(started.elapsed());
    }
    // Three Redis operations at 200 ms each would be 600 ms; bounded by
    // the 50 ms timeout (and skipped after a failure), a miss stays far
    // below that.
    assert!(
        slowest < Duration::from_millis(400),
        "slowest request: {slowest:?}"
    );
    // Redis was asked, found late, and skipped from then on.
    a.wait_log(Duration::from_secs(10), |v| {
        v["message"].as_str().is_some_and(|m| {
            m.starts_with("redis: ")
                && (m.contains("took longer than 50ms") || m.contains("failed"))
        })
    });
}

/// The purge channel's keep-alive ping is answered (on a subscribed
/// connection Redis answers with an array), so a healthy channel is never
/// taken for a lost one — which would drop every instance's memory at each
/// ping.
#[tokio::test(flavor = "multi_thread")]
async fn issue14_a_healthy_purge_channel_stays_up() {
    let redis = Redis::start();
    let settings = bext::config::RedisSettings::from_url(&redis.url()).expect("url");
    let l2 = bext::cache::l2::L2::new(&settings, "pings", 1 << 20).expect("l2");
    let purges = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::clone(&purges);
    let task = l2.listen(Duration::from_millis(50), move |selector, soft, _| {
        seen.lock().expect("lock").push((selector, soft));
        true
    });
    crate::support::wait_for_async("five pings answered", Duration::from_secs(10), || async {
        (l2.pings() >= 5).then_some(())
    })
    .await;
    task.abort();
    assert!(
        purges.lock().expect("lock").is_empty(),
        "no purge of everything: {:?}",
        purges.lock().expect("lock")
    );
}

/// A platform of two apps of the origin fixture (`one.test`, `two.test`),
/// its `[platform]` table's extra lines `platform`, served with `env`.
fn platform(platform: &str, env: &[(&str, String)]) -> (tempfile::TempDir, Bext) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("platform.toml");
    let origin = fixture("origin");
    std::fs::write(
        &file,
        format!(
            "[platform]\ndata_dir = \"{data}\"\n{platform}\n\
             [apps.one]\nsource = \"{origin}\"\ndomains = [\"one.test\"]\n\
             [apps.one.cache]\npurge_token = \"t1\"\n\
             [apps.two]\nsource = \"{origin}\"\ndomains = [\"two.test\"]\n\
             [apps.two.cache]\npurge_token = \"t2\"\n",
            data = dir.path().join("data").display(),
            origin = origin.display(),
        ),
    )
    .expect("platform.toml");
    let bext = Bext::serve(
        &file,
        &Options {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            ready_timeout: Duration::from_secs(120),
            ..Options::default()
        },
    );
    bext.wait_log(Duration::from_secs(120), |v| v["message"] == "apps started");
    (dir, bext)
}

/// GET `path` on `host`: (x-bext-cache, body).
async fn get_on(bext: &Bext, host: &str, path: &str) -> (String, String) {
    let response = bext.get_host(host, path).await;
    let state = response
        .headers()
        .get("x-bext-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (state, response.text().await.expect("body"))
}

/// Multi-app edge mode: `[platform.redis]` on A, `REDIS_URL` alone on B.
/// Each app shares with its namesake on the other instance, and only with
/// it: the same path of another app is its own, and a purge of one app's
/// tag leaves the other's pages.
#[tokio::test(flavor = "multi_thread")]
async fn issue14_multi_app_mode_shares_each_app_with_its_namesake_only() {
    let redis = Redis::start();
    let (_a_dir, a) = platform(
        &format!(
            "[platform.redis]\nurl = \"{}\"\ntimeout_ms = 200\n",
            redis.url()
        ),
        &[],
    );
    let (_b_dir, b) = platform("", &[("REDIS_URL", redis.url())]);
    let page = "/page/fleet?cc=public,max-age=600&tags=news";

    let (state, body) = get_on(&a, "one.test", page).await;
    assert_eq!(state, "MISS");
    assert!(body.starts_with("/page/fleet render 1"), "{body}");
    redis.wait_objects(1);
    let (state, body) = get_on(&b, "one.test", page).await;
    assert_eq!(state, "HIT", "A's app one rendered it: {body}");
    assert!(body.starts_with("/page/fleet render 1"), "{body}");
    // App two's same path is its own: not app one's page.
    let (state, _) = get_on(&b, "two.test", page).await;
    assert_eq!(state, "MISS", "another app's namespace");
    redis.wait_objects(2);
    assert_eq!(get_on(&a, "two.test", page).await.0, "HIT", "shared too");
    let keys = redis.cli(&["--scan", "--pattern", "bext:*:o:*"]);
    assert!(keys.lines().any(|k| k.starts_with("bext:one:o:")), "{keys}");
    assert!(keys.lines().any(|k| k.starts_with("bext:two:o:")), "{keys}");

    // App one's purge on A: B's app one drops the page, B's app two keeps it.
    let purged: Value = client()
        .post(a.url("/__bext/cache/invalidate"))
        .header("host", "one.test")
        .header("authorization", "Bearer t1")
        .body(r#"{"tags":["news"]}"#)
        .send()
        .await
        .expect("purge")
        .json()
        .await
        .expect("json");
    assert!(purged["purged"].as_u64().unwrap_or(0) >= 1, "{purged}");
    crate::support::wait_for_async(
        "B's app one to drop the purged page",
        Duration::from_secs(5),
        || async { (get_on(&b, "one.test", page).await.0 == "MISS").then_some(()) },
    )
    .await;
    assert_eq!(get_on(&b, "two.test", page).await.0, "HIT", "not app two's");
    assert!(
        !redis
            .cli(&["--scan", "--pattern", "bext:two:o:*"])
            .is_empty(),
        "app two's page is still in Redis"
    );

    // Each app's Redis link is watched, under its name.
    let metrics = client()
        .get(b.url("/__bext/platform/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for app in ["one", "two"] {
        assert!(
            metrics.contains(&format!("bext_redis_up{{app=\"{app}\"}} 1")),
            "{metrics}"
        );
    }
    // And timed: B asked Redis for app one's page (a GET, answered), and
    // its purge channel pings.
    let count = |metrics: &str, app: &str, op: &str| -> u64 {
        let series = format!("bext_redis_op_duration_seconds_count{{app=\"{app}\",op=\"{op}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series}in {metrics}"))
    };
    assert!(count(&metrics, "one", "get") >= 1, "{metrics}");
    assert!(
        metrics
            .contains("bext_redis_op_duration_seconds_bucket{le=\"0.05\",app=\"one\",op=\"get\"}")
            || metrics.contains(
                "bext_redis_op_duration_seconds_bucket{app=\"one\",op=\"get\",le=\"0.05\"}"
            ),
        "{metrics}"
    );
    // A's purge was timed under `purge`.
    let a_metrics = client()
        .get(a.url("/__bext/platform/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(count(&a_metrics, "one", "purge") >= 1, "{a_metrics}");
    assert_eq!(count(&a_metrics, "two", "purge"), 0, "{a_metrics}");
}

/// An app's cache rebuilt by a reload (new cache settings) leaves Redis
/// with one purge listener per app, not one more per reload: the old
/// cache's link goes with it.
#[tokio::test(flavor = "multi_thread")]
async fn issue14_a_reloaded_app_keeps_one_link_to_redis() {
    let redis = Redis::start();
    let (dir, bext) = platform(
        &format!("[platform.redis]\nurl = \"{}\"\n", redis.url()),
        &[],
    );
    let listeners = |app: &str| {
        let out = redis.cli(&["PUBSUB", "NUMSUB", &format!("bext:{app}:purge")]);
        out.lines()
            .nth(1)
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    wait_for("both apps listening", Duration::from_secs(10), || {
        (listeners("one") == 1 && listeners("two") == 1).then_some(())
    });
    let clients = || redis.cli(&["CLIENT", "LIST"]).lines().count();
    let before = clients();
    let file = dir.path().join("platform.toml");
    let text = std::fs::read_to_string(&file).expect("read");
    for (round, ttl) in ["30s", "40s", "50s"].into_iter().enumerate() {
        let edited = text.replace(
            "purge_token = \"t1\"",
            &format!("purge_token = \"t1\"\ndefault_ttl = \"{ttl}\""),
        );
        std::fs::write(&file, edited).expect("write");
        let published = || {
            bext.logs()
                .iter()
                .filter(|v| v["message"] == "routes published")
                .count()
        };
        let seen = published();
        bext.signal(libc::SIGHUP);
        wait_for("the reload", Duration::from_secs(30), || {
            (published() > seen).then_some(())
        });
        wait_for(
            "the old cache's listener to go",
            Duration::from_secs(10),
            || (listeners("one") == 1 && clients() <= before + 1).then_some(()),
        );
        assert_eq!(listeners("two"), 1, "round {round}: app two untouched");
    }
    // The reloaded app's cache is still shared.
    assert_eq!(
        get_on(&bext, "one.test", "/page/r?cc=public,max-age=600")
            .await
            .0,
        "MISS"
    );
    redis.wait_objects(1);
}

/// A deploy (with the default `deploy.purge_cache`) purges the app's
/// shared cache on every instance: the new version never serves a page
/// the old one stored in Redis.
#[tokio::test(flavor = "multi_thread")]
async fn issue14_a_deploy_purges_the_app_across_the_fleet() {
    let redis = Redis::start();
    let table = format!(
        "[platform.redis]\nurl = \"{}\"\ntimeout_ms = 200\n",
        redis.url()
    );
    let (a_dir, a) = platform(&table, &[]);
    let (_b_dir, b) = platform(&table, &[]);
    let page = "/page/deployed?cc=public,max-age=600";
    // A's old version renders the path once unstored first: its page says
    // "render 2", what a new worker renders says "render 1".
    get_on(&a, "one.test", "/page/deployed?cc=no-store").await;
    let (state, body) = get_on(&a, "one.test", page).await;
    assert_eq!(state, "MISS");
    assert!(body.starts_with("/page/deployed render 2"), "{body}");
    redis.wait_objects(1);
    assert_eq!(get_on(&b, "one.test", page).await.0, "HIT");

    let source = tempfile::tempdir().expect("tempdir");
    for file in ["package.json", "server.js"] {
        std::fs::copy(fixture("origin").join(file), source.path().join(file)).expect("copy");
    }
    let socket = a_dir.path().join("data").join("control.sock");
    let source_path = source.path().to_path_buf();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        crate::control::bextctl(
            &socket,
            &["deploy", "one", source_path.to_str().expect("utf8")],
        )
    })
    .await
    .expect("deploy");
    assert_eq!(code, 0, "deploy failed:\n{out}\n{err}");
    a.wait_log(Duration::from_secs(30), |v| {
        v["message"] == "deploy: the app's shared cache purged on every instance"
    });
    let (state, body) = get_on(&a, "one.test", page).await;
    assert_eq!(
        state, "MISS",
        "not the old version's page from Redis: {body}"
    );
    assert!(body.starts_with("/page/deployed render 1"), "{body}");
    let body = crate::support::wait_for_async(
        "B to drop the old version's page",
        Duration::from_secs(5),
        || async {
            let (_, body) = get_on(&b, "one.test", page).await;
            (!body.starts_with("/page/deployed render 2")).then_some(body)
        },
    )
    .await;
    assert!(body.starts_with("/page/deployed render 1"), "{body}");
}

/// A render holding the fleet's lease whose client goes away gives the
/// lease back at once: the other instances do not wait for it to run out.
#[tokio::test(flavor = "multi_thread")]
async fn issue14_a_render_abandoned_by_its_client_gives_the_lease_back() {
    let redis = Redis::start();
    let ((_a_dir, a), (_b_dir, _b)) = pair(&redis);
    let leases = || redis.cli(&["--scan", "--pattern", "bext:*:lease:*"]);
    let url = a.url("/page/abandoned?cc=public,max-age=600&delay=20000");
    let request = tokio::spawn(async move {
        crate::support::client()
            .get(url)
            .header("host", "site.test")
            .timeout(Duration::from_millis(1500))
            .send()
            .await
    });
    wait_for("the lease to be taken", Duration::from_secs(5), || {
        (!leases().is_empty()).then_some(())
    });
    assert!(request.await.expect("join").is_err(), "the client gave up");
    // Well before the render (20 s) or the lease (the upstream timeout)
    // would end.
    wait_for("the lease to be given back", Duration::from_secs(3), || {
        leases().is_empty().then_some(())
    });
}
