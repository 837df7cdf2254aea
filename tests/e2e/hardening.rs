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
