//! `bext dev` (issue 16): an Express app in a temp dir, edited while bext
//! serves it; the cache in preview; bext.config.toml saved while running.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::support::{Bext, Options, client, fixture, wait_for_async};

/// `/` answers `VERSION`; `/isr` is an ISR page (s-maxage + SWR) whose body
/// changes on every render; `/cookie` would be cacheable but sets a cookie.
fn server_js(version: &str) -> String {
    format!(
        r#"const express = require('express');
const app = express();
app.get('/', (req, res) => res.send('{version}'));
app.get('/isr', (req, res) => {{
  res.set('Cache-Control', 's-maxage=60, stale-while-revalidate=3600');
  res.send('rendered ' + process.hrtime.bigint());
}});
app.get('/cookie', (req, res) => {{
  res.set('Cache-Control', 's-maxage=60');
  res.cookie('session', 'x');
  res.send('with a cookie');
}});
app.get('/plain', (req, res) => res.send('plain'));
app.listen(3000);
"#
    )
}

/// An Express app of its own in a temp dir (the fixture's dependencies
/// linked in), without a `dev` script: bext watches it.
fn express_app() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("package.json"),
        r#"{"name":"dev-express","private":true,"main":"server.js","dependencies":{"express":"^5.3.0"}}"#,
    )
    .expect("package.json");
    std::os::unix::fs::symlink(
        fixture("express").join("node_modules"),
        dir.path().join("node_modules"),
    )
    .expect("node_modules");
    write(dir.path(), "server.js", &server_js("v1"));
    dir
}

/// Replaces a file the way editors do: write a backup-named file, rename
/// it over.
fn write(dir: &Path, name: &str, text: &str) {
    let temp = dir.join(format!("{name}~"));
    std::fs::write(&temp, text).expect("write");
    std::fs::rename(&temp, dir.join(name)).expect("rename");
}

fn dev(dir: &Path, args: &[&str]) -> Bext {
    Bext::dev(
        dir,
        &Options {
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Options::default()
        },
    )
}

/// How many workers bext has started so far.
fn worker_starts(bext: &Bext) -> usize {
    bext.logs()
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("worker starting"))
        })
        .count()
}

/// The command line of the first worker bext started.
fn worker_command(bext: &Bext) -> String {
    let started = bext.wait_log(Duration::from_secs(5), |l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("worker starting"))
    });
    started["message"].as_str().unwrap_or("").to_string()
}

async fn text(bext: &Bext, path: &str) -> (u16, String) {
    match client().get(bext.url(path)).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// Requests `/` back to back until stopped, counting answers that are not
/// 200s.
fn keep_asking(
    bext: &Bext,
) -> (
    Arc<AtomicBool>,
    Arc<AtomicU64>,
    tokio::task::JoinHandle<u64>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let url = bext.url("/");
    let task = {
        let (stop, failed) = (Arc::clone(&stop), Arc::clone(&failed));
        tokio::spawn(async move {
            let client = client();
            let mut asked = 0;
            while !stop.load(Ordering::Relaxed) {
                asked += 1;
                let ok = client
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            asked
        })
    };
    (stop, failed, task)
}

/// Waits for `/` to answer `want`; how long it took.
async fn until_answer(bext: &Bext, want: &str, since: Instant) -> Duration {
    wait_for_async(
        &format!("/ to answer {want}"),
        Duration::from_secs(10),
        || async { (text(bext, "/").await.1 == want).then_some(()) },
    )
    .await;
    since.elapsed()
}

/// Acceptance 1 and 2: an edit is served within a second, with no failed
/// request while the app restarts; a syntax error is shown once and named
/// in the 503 every request gets; fixing it serves again at once.
#[tokio::test]
async fn edits_restart_the_app_and_a_broken_save_is_named_until_fixed() {
    let app = express_app();
    let bext = dev(app.path(), &[]);
    assert_eq!(text(&bext, "/").await, (200, "v1".to_string()));

    let (stop, failed, asking) = keep_asking(&bext);
    let saved = Instant::now();
    write(app.path(), "server.js", &server_js("v2"));
    let took = until_answer(&bext, "v2", saved).await;
    stop.store(true, Ordering::Relaxed);
    let asked = asking.await.expect("asking");
    assert!(
        took < Duration::from_secs(1),
        "the edit took {took:?} to be served"
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the restart ({asked} asked)"
    );
    assert!(asked > 1, "requests were made during the restart");

    // A syntax error: requests are told what it is, at once.
    let broken = server_js("v3").replace("res.send('v3'));", "res.send('v3');");
    write(app.path(), "server.js", &broken);
    let body = wait_for_async(
        "the 503 naming the error",
        Duration::from_secs(10),
        || async {
            let (status, body) = text(&bext, "/").await;
            (status == 503).then_some(body)
        },
    )
    .await;
    assert!(body.contains("SyntaxError"), "{body}");
    assert!(body.contains("server.js:3"), "the file and line: {body}");
    let asked_at = Instant::now();
    let (status, _) = text(&bext, "/").await;
    assert_eq!(status, 503);
    assert!(
        asked_at.elapsed() < Duration::from_secs(1),
        "a broken app answers at once, not after the queue timeout"
    );
    // Shown once: no restart loop while nothing changes.
    let errors = || {
        bext.logs()
            .iter()
            .filter(|l| {
                l["level"] == "ERROR"
                    && l["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("waiting for a change"))
            })
            .count()
    };
    let starts = || worker_starts(&bext);
    let starts_before = starts();
    for _ in 0..5 {
        assert_eq!(text(&bext, "/").await.0, 503);
    }
    assert_eq!(errors(), 1, "{}", bext.log_text());
    assert_eq!(starts(), starts_before, "no restarts without a change");

    // Fixed: served again without a backoff.
    let saved = Instant::now();
    write(app.path(), "server.js", &server_js("v4"));
    let took = until_answer(&bext, "v4", saved).await;
    assert!(
        took < Duration::from_secs(1),
        "the fix took {took:?} to be served"
    );
}

/// Changes bext does not restart for: dependencies, ignored files, editor
/// scratch files.
#[tokio::test]
async fn ignored_files_do_not_restart_the_app() {
    let app = express_app();
    std::fs::write(app.path().join(".gitignore"), "*.log\n").expect(".gitignore");
    let bext = dev(app.path(), &[]);
    assert_eq!(text(&bext, "/").await.0, 200);
    let starts = || worker_starts(&bext);
    assert_eq!(starts(), 1);
    std::fs::write(app.path().join("debug.log"), "noise").expect("log");
    std::fs::write(app.path().join(".server.js.swp"), "swap").expect("swap");
    // A change that does count, after them: the restart it causes is the
    // only one.
    write(app.path(), "server.js", &server_js("v2"));
    until_answer(&bext, "v2", Instant::now()).await;
    assert_eq!(starts(), 2, "{}", bext.log_text());
    let changed: Vec<String> = bext
        .logs()
        .iter()
        .filter_map(|l| {
            l["message"]
                .as_str()
                .and_then(|m| m.strip_prefix("changed: "))
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        changed,
        ["server.js"],
        "only the source was seen as a change"
    );
}

/// Acceptance 4: every answer says what production's cache would do, and
/// none comes from the cache; `--cache` turns it on for real.
#[tokio::test]
async fn the_cache_in_preview_says_what_production_would_do() {
    let app = express_app();
    let bext = dev(app.path(), &[]);
    let status = |r: &reqwest::Response| {
        r.headers()
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let first = client().get(bext.url("/isr")).send().await.expect("GET");
    assert_eq!(
        status(&first),
        "bext; fwd=bypass; detail=preview; would-store; ttl=60; swr=3600"
    );
    assert_eq!(first.headers()["x-bext-cache"], "PREVIEW");
    let first = first.text().await.expect("body");
    let second = client().get(bext.url("/isr")).send().await.expect("GET");
    let second = second.text().await.expect("body");
    assert_ne!(
        first, second,
        "rendered again: nothing is served from the cache"
    );

    let cookie = client().get(bext.url("/cookie")).send().await.expect("GET");
    assert_eq!(
        status(&cookie),
        "bext; fwd=bypass; detail=preview; would-not-store=set-cookie"
    );
    let plain = client().get(bext.url("/plain")).send().await.expect("GET");
    assert!(status(&plain).ends_with("would-not-store=no-lifetime"));
    let post = client().post(bext.url("/isr")).send().await.expect("POST");
    assert!(status(&post).ends_with("would-bypass=method"));
    // The log shows the decision beside the request.
    bext.wait_log(Duration::from_secs(5), |l| {
        l["path"] == "/cookie"
            && l["cache"]
                .as_str()
                .is_some_and(|c| c.ends_with("would-not-store=set-cookie"))
    });

    let cached = dev(app.path(), &["--cache"]);
    let a = client().get(cached.url("/isr")).send().await.expect("GET");
    assert_eq!(a.headers()["x-bext-cache"], "MISS");
    let a = a.text().await.expect("body");
    let b = client().get(cached.url("/isr")).send().await.expect("GET");
    assert_eq!(b.headers()["x-bext-cache"], "HIT");
    assert_eq!(b.text().await.expect("body"), a);
}

/// Acceptance 5: bext.config.toml saved while running: a mistake is logged
/// with its place and changes nothing; a good save applies at once.
#[tokio::test]
async fn a_saved_config_applies_and_a_broken_one_is_named_and_kept_out() {
    let app = express_app();
    let bext = dev(app.path(), &[]);
    let decision = |path: &'static str| {
        let url = bext.url(path);
        async move {
            let r = client().get(url).send().await.expect("GET");
            r.headers()
                .get("cache-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        }
    };
    assert!(
        decision("/plain")
            .await
            .ends_with("would-not-store=no-lifetime")
    );

    write(
        app.path(),
        "bext.config.toml",
        "[[route_rules]]\npath = \"/plain\"\nttl_ms = 30000\nswr_ms = 300000\n\n[cache.isr]\ndefault_tll_ms = 60000\n",
    );
    let error = bext.wait_log(Duration::from_secs(10), |l| {
        l["level"] == "ERROR"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("bext.config.toml:7:1"))
    });
    let message = error["message"].as_str().unwrap_or("");
    assert!(message.contains("default_tll_ms"), "{message}");
    assert!(message.contains("the running config is kept"), "{message}");
    assert!(
        decision("/plain")
            .await
            .ends_with("would-not-store=no-lifetime"),
        "the broken file changed nothing"
    );

    write(
        app.path(),
        "bext.config.toml",
        "[[route_rules]]\npath = \"/plain\"\nttl_ms = 30000\nswr_ms = 300000\n",
    );
    wait_for_async(
        "the saved rule to apply",
        Duration::from_secs(10),
        || async {
            (decision("/plain")
                .await
                .starts_with("bext; fwd=bypass; detail=preview; would-store; ttl=30; swr=300"))
            .then_some(())
        },
    )
    .await;
    assert_eq!(
        text(&bext, "/").await,
        (200, "v1".to_string()),
        "still serving"
    );
}

/// The Next fixture's sources in a temp dir, its dependencies hard-linked
/// (the dev server writes `.next/` and must not touch the fixture's build).
fn next_app() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let from = fixture("next");
    for name in [
        "app",
        "lib",
        "public",
        "next.config.mjs",
        "tsconfig.json",
        "package.json",
        "package-lock.json",
        "next-env.d.ts",
    ] {
        let status = std::process::Command::new("cp")
            .arg("-r")
            .arg(from.join(name))
            .arg(dir.path())
            .status()
            .expect("cp");
        assert!(status.success(), "copy {name}");
    }
    // Hard links where the file system allows (fast), a copy elsewhere.
    let linked = std::process::Command::new("cp")
        .arg("-al")
        .arg(from.join("node_modules"))
        .arg(dir.path())
        .status()
        .expect("cp -al");
    if !linked.success() {
        let _ = std::fs::remove_dir_all(dir.path().join("node_modules"));
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(from.join("node_modules"))
            .arg(dir.path())
            .status()
            .expect("cp -a");
        assert!(copied.success(), "copy node_modules");
    }
    dir
}

/// Acceptance 3: `next dev` behind bext: pages render in dev mode, and
/// Turbopack's HMR WebSocket connects through bext and hears of an edit.
#[tokio::test(flavor = "multi_thread")]
async fn next_dev_serves_and_its_hmr_socket_hears_an_edit() {
    use futures_util::StreamExt;
    let app = next_app();
    let mut bext = dev(app.path(), &[]);
    let command = worker_command(&bext);
    assert!(command.ends_with("next dev"), "{command}");
    let page = client().get(bext.url("/")).send().await.expect("GET /");
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["x-bext-cache"], "PREVIEW");
    assert!(page.text().await.expect("body").contains("hello from next"));

    let (mut hmr, response) =
        tokio_tungstenite::connect_async(format!("ws://{}/_next/hmr?id=bext-test", bext.addr))
            .await
            .expect("the HMR socket through bext");
    assert_eq!(response.status(), 101);
    // Waits for a message of `kind` from the dev server.
    async fn heard(
        hmr: &mut (
                 impl futures_util::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin
             ),
        kind: &str,
    ) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = tokio::time::timeout(left, hmr.next())
                .await
                .unwrap_or_else(|_| panic!("no {kind} message within a minute"))
                .expect("the socket is open")
                .expect("a message");
            let Ok(text) = message.to_text() else {
                continue;
            };
            let value: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
            if value["type"] == kind {
                return;
            }
        }
    }
    heard(&mut hmr, "turbopack-connected").await;

    let page_file = app.path().join("app/page.tsx");
    let source = std::fs::read_to_string(&page_file).expect("page.tsx");
    std::fs::write(
        &page_file,
        source.replace("hello from next", "edited under bext dev"),
    )
    .expect("edit");
    heard(&mut hmr, "serverComponentChanges").await;
    let body = client()
        .get(bext.url("/"))
        .send()
        .await
        .expect("GET /")
        .text()
        .await
        .expect("body");
    assert!(body.contains("edited under bext dev"), "the edit is served");
    assert!(
        !bext.logs().iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("changed: "))),
        "bext left the restarts to next dev"
    );
    drop(hmr);
    assert!(bext.terminate(Duration::from_secs(20)).success());
}

/// A Deno app with a `dev` task (`deno run --watch`): Deno restarts it on
/// an edit, bext leaves it to Deno and keeps serving it.
#[tokio::test]
async fn a_deno_dev_task_watches_by_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(fixture("deno").join("main.ts"), dir.path().join("main.ts")).expect("main.ts");
    std::fs::write(
        dir.path().join("deno.json"),
        r#"{"tasks":{"start":"deno run --allow-net main.ts","dev":"deno run --watch --allow-net main.ts"}}"#,
    )
    .expect("deno.json");
    let bext = dev(dir.path(), &[]);
    assert!(
        bext.logs().iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("worker starting: deno run --watch"))),
        "{}",
        bext.log_text()
    );
    assert_eq!(text(&bext, "/").await, (200, "hello from deno".to_string()));
    let main = dir.path().join("main.ts");
    let source = std::fs::read_to_string(&main).expect("main.ts");
    std::fs::write(&main, source.replace("hello from deno", "edited deno")).expect("edit");
    until_answer(&bext, "edited deno", Instant::now()).await;
}

/// A static site is served from disk: a saved page is served at once, and
/// open pages (which get a live-reload script) hear of the change.
#[tokio::test]
async fn a_static_site_is_served_from_disk_and_its_pages_reload() {
    use futures_util::StreamExt;
    let site = crate::support::temp_app(&[
        (
            "index.html",
            "<!doctype html><html><body><h1>first</h1></body></html>\n",
        ),
        ("style.css", "h1 { color: red }\n"),
    ]);
    let bext = dev(site.path(), &[]);
    let page = client()
        .get(bext.url("/"))
        .header("accept-encoding", "gzip, br")
        .send()
        .await
        .expect("GET /");
    assert_eq!(page.status(), 200);
    assert!(page.headers().get("content-encoding").is_none());
    let page = page.text().await.expect("body");
    assert!(page.contains("<h1>first</h1>"), "{page}");
    let script = page
        .find("/__bext/dev/reload")
        .expect("the live-reload script");
    assert!(
        script < page.find("</body>").expect("</body>"),
        "before </body>"
    );
    let css = text(&bext, "/style.css").await.1;
    assert_eq!(css, "h1 { color: red }\n", "only pages get the script");

    let events = client()
        .get(bext.url("/__bext/dev/reload"))
        .send()
        .await
        .expect("the event stream");
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let mut events = events.bytes_stream();
    let opened = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("the stream opens")
        .expect("a chunk")
        .expect("ok");
    assert!(opened.starts_with(b":"), "a comment first");
    write(
        site.path(),
        "index.html",
        "<!doctype html><html><body><h1>second</h1></body></html>\n",
    );
    let reload = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("a reload within 10 s")
        .expect("a chunk")
        .expect("ok");
    assert_eq!(&reload[..], b"data: reload\n\n");
    let page = text(&bext, "/").await.1;
    assert!(page.contains("<h1>second</h1>"), "served at once: {page}");
}

/// A `dev` script (`node --watch`, a parent that watches and a child that
/// serves) is run directly; the child gets the socket, and node restarts
/// it on an edit without bext.
#[tokio::test]
async fn a_dev_script_runs_and_watches_by_itself() {
    let app = express_app();
    std::fs::write(
        app.path().join("package.json"),
        r#"{"name":"dev-express","private":true,"main":"server.js","scripts":{"dev":"node --watch server.js"},"dependencies":{"express":"^5.3.0"}}"#,
    )
    .expect("package.json");
    let bext = dev(app.path(), &[]);
    let command = worker_command(&bext);
    assert!(command.ends_with("server.js"), "{command}");
    assert_eq!(text(&bext, "/").await, (200, "v1".to_string()));
    write(app.path(), "server.js", &server_js("v2"));
    until_answer(&bext, "v2", Instant::now()).await;
    assert!(
        !bext.logs().iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("changed: "))),
        "bext left the restarts to node --watch"
    );
    // The worker is node --watch itself (its child serves).
    let workers = bext.worker_pids();
    assert_eq!(workers.len(), 1);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", workers[0])).expect("cmdline");
    assert!(
        String::from_utf8_lossy(&cmdline).contains("--watch"),
        "{}",
        String::from_utf8_lossy(&cmdline)
    );
}

/// A development server that watches its files (here a stand-in `vite`)
/// but dies (a syntax error at start) is started again by bext at the next
/// change: its own watcher died with it.
#[tokio::test]
async fn a_dead_dev_server_starts_again_at_the_next_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = dir.path();
    std::fs::write(
        app.join("package.json"),
        r#"{"name":"dev-vite","private":true,"main":"server.js","scripts":{"dev":"vite"},"dependencies":{"express":"^5.3.0"}}"#,
    )
    .expect("package.json");
    std::fs::create_dir_all(app.join("node_modules/.bin")).expect("node_modules");
    std::fs::create_dir_all(app.join("node_modules/fake-vite")).expect("fake-vite");
    std::os::unix::fs::symlink(
        fixture("express").join("node_modules/express"),
        app.join("node_modules/express"),
    )
    .expect("express");
    std::fs::write(
        app.join("node_modules/fake-vite/cli.js"),
        "require(require('path').join(process.cwd(), 'server.js'));\n",
    )
    .expect("cli.js");
    std::os::unix::fs::symlink("../fake-vite/cli.js", app.join("node_modules/.bin/vite"))
        .expect(".bin/vite");
    write(
        app,
        "server.js",
        &server_js("v1").replace("res.send('v1'));", "res.send('v1');"),
    );

    let bext = dev(app, &[]);
    assert!(
        bext.logs().iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("worker starting") && m.ends_with("fake-vite/cli.js"))),
        "the dev script runs: {}",
        bext.log_text()
    );
    let (status, body) = text(&bext, "/").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("SyntaxError"), "{body}");
    write(app, "server.js", &server_js("v2"));
    until_answer(&bext, "v2", Instant::now()).await;
}
