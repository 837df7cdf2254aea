//! The control plane, end to end (issue #12): `bext serve` with its control
//! socket, driven by the real `bextctl` binary; deploys, rollbacks and
//! failures of real (dependency-free) Node apps, under load.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::support::{Bext, Options, temp_app, wait_for};

/// An app whose `/` answers `NAME` and `/health` answers `HEALTH` (a
/// status code), listening on PORT as any Node app does.
fn app_source(name: &str, health: u16) -> String {
    format!(
        r#"
const http = require('http');
const server = http.createServer((req, res) => {{
  if (req.url === '/health') {{ res.statusCode = {health}; return res.end('health'); }}
  if (req.url !== '/') {{ res.statusCode = 404; return res.end('no such page'); }}
  res.end('{name}');
}});
server.listen(process.env.PORT || 3000, () => console.log('{name} listening'));
"#
    )
}

fn node_app(name: &str) -> tempfile::TempDir {
    node_app_with(name, 200, &[])
}

fn node_app_with(name: &str, health: u16, extra: &[(&str, &str)]) -> tempfile::TempDir {
    let server = app_source(name, health);
    let mut files: Vec<(&str, &str)> = vec![
        (
            "package.json",
            r#"{"name": "ctl-app", "private": true, "scripts": {"start": "node server.js"}}"#,
        ),
        ("server.js", &server),
    ];
    files.extend_from_slice(extra);
    temp_app(&files)
}

/// A platform with one app `site` on `site.test`, its data in a temp dir.
struct Platform {
    dir: tempfile::TempDir,
    file: PathBuf,
}

impl Platform {
    fn new(source: &Path, app_extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("platform.toml");
        let data = dir.path().join("data");
        std::fs::write(
            &file,
            format!(
                r#"
[platform]
listen = "127.0.0.1:0"
data_dir = "{data}"
shutdown_grace = "5s"

[apps.site]
source = "{source}"
domains = ["site.test"]
isolate.workers = 2
{app_extra}
"#,
                data = data.display(),
                source = source.display(),
            ),
        )
        .expect("write");
        Platform { dir, file }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn socket(&self) -> PathBuf {
        self.data().join("control.sock")
    }

    fn serve(&self) -> Bext {
        let bext = Bext::serve(
            &self.file,
            &Options {
                ready_timeout: Duration::from_secs(60),
                ..Options::default()
            },
        );
        bext.wait_log(Duration::from_secs(60), |v| v["message"] == "apps started");
        bext
    }

    /// `bextctl --socket S ARGS`: (exit code, stdout, stderr).
    fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        bextctl(&self.socket(), args)
    }
}

pub fn bextctl(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bextctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run bextctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn answer(bext: &Bext) -> (u16, String) {
    let response = bext.get_host("site.test", "/").await;
    (
        response.status().as_u16(),
        response.text().await.expect("body"),
    )
}

fn versions(platform: &Platform) -> Value {
    let (code, out, err) = platform.ctl(&["versions", "site", "--json"]);
    assert_eq!(code, 0, "versions: {err}");
    serde_json::from_str(&out).expect("versions json")
}

fn version_state(versions: &Value, id: &str) -> (String, String) {
    let v = versions["versions"]
        .as_array()
        .expect("array")
        .iter()
        .find(|v| v["id"] == id)
        .unwrap_or_else(|| panic!("no version {id} in {versions}"));
    (
        v["state"].as_str().unwrap_or("").to_string(),
        v["reason"].as_str().unwrap_or("").to_string(),
    )
}

/// Issue 12, acceptance 1: under load from several clients, a deploy and a
/// rollback lose no request, and each client sees the answer change once
/// per operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_deploy_then_rollback_under_load_fails_no_request() {
    let one = node_app("one");
    let two = node_app("two");
    let platform = Platform::new(one.path(), "deploy.health_path = \"/health\"");
    let bext = Arc::new(platform.serve());
    assert_eq!(answer(&bext).await, (200, "one".to_string()));

    const CLIENTS: usize = 4;
    let stop = Arc::new(AtomicBool::new(false));
    let counters =
        || -> Arc<Vec<AtomicU64>> { Arc::new((0..CLIENTS).map(|_| AtomicU64::new(0)).collect()) };
    let (seen_one, seen_two) = (counters(), counters());
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let (bext, stop) = (Arc::clone(&bext), Arc::clone(&stop));
        let (seen_one, seen_two) = (Arc::clone(&seen_one), Arc::clone(&seen_two));
        clients.push(tokio::spawn(async move {
            let mut answers: Vec<String> = Vec::new();
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (status, body) = answer(&bext).await;
                if status != 200 {
                    failures.push(format!("{status} {body}"));
                    continue;
                }
                match body.as_str() {
                    "one" => seen_one[i].fetch_add(1, Ordering::Relaxed),
                    _ => seen_two[i].fetch_add(1, Ordering::Relaxed),
                };
                if answers.last() != Some(&body) {
                    answers.push(body);
                }
            }
            (answers, failures)
        }));
    }

    let (code, out, err) = {
        let two = two.path().to_path_buf();
        let socket = platform.socket();
        tokio::task::spawn_blocking(move || {
            bextctl(&socket, &["deploy", "site", two.to_str().expect("utf8")])
        })
        .await
        .expect("deploy")
    };
    assert_eq!(code, 0, "deploy failed:\n{out}\n{err}");
    // Every client sees the new version before the rollback.
    wait_for("every client to see v1", Duration::from_secs(20), || {
        seen_two
            .iter()
            .all(|n| n.load(Ordering::Relaxed) > 0)
            .then_some(())
    });
    assert_eq!(version_state(&versions(&platform), "v1").0, "active");

    let (code, out, err) = {
        let socket = platform.socket();
        tokio::task::spawn_blocking(move || bextctl(&socket, &["rollback", "site"]))
            .await
            .expect("rollback")
    };
    assert_eq!(code, 0, "rollback failed:\n{out}\n{err}");
    // Requests sent from now on reach the old version: each client gets
    // a few of them before the load stops.
    let before: Vec<u64> = seen_one.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    wait_for(
        "every client to see the rollback",
        Duration::from_secs(20),
        || {
            seen_one
                .iter()
                .zip(&before)
                .all(|(n, b)| n.load(Ordering::Relaxed) > b + 2)
                .then_some(())
        },
    );
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let (answers, failures) = client.await.expect("client");
        assert!(failures.is_empty(), "failed requests: {failures:?}");
        assert_eq!(
            answers,
            ["one", "two", "one"],
            "each client sees one switch per operation"
        );
    }
    let versions = versions(&platform);
    assert_eq!(version_state(&versions, "v1").0, "retained");
    assert_eq!(version_state(&versions, "source").0, "active");
    assert_eq!(answer(&bext).await, (200, "one".to_string()));
}

/// Issue 12, acceptance 2: a deploy whose build fails, whose workers
/// crash, whose health path answers 500, or whose `pre_build` hook fails:
/// the old version serves through each, `bextctl` exits 1 with the reason,
/// and `versions` shows the failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_failed_deploys_keep_the_old_version_serving() {
    let one = node_app_with("one", 200, &[("ok-to-build", "")]);
    let platform = Platform::new(
        one.path(),
        r#"deploy.health_path = "/health"
deploy.health_timeout = "3s"
isolate.start_timeout = "10s"
hooks.pre_build = "test -f ok-to-build || { echo 'no ok-to-build here' >&2; exit 4; }"
"#,
    );
    let bext = platform.serve();

    let build_fails = temp_app(&[
        (
            "package.json",
            r#"{"name": "x", "private": true, "scripts": {"build": "node build.js", "start": "node dist/server.js"}}"#,
        ),
        (
            "build.js",
            "console.error('syntax trouble in page.tsx'); process.exit(1);",
        ),
        ("ok-to-build", ""),
    ]);
    let crashes = temp_app(&[
        (
            "package.json",
            r#"{"name": "x", "private": true, "scripts": {"start": "node server.js"}}"#,
        ),
        (
            "server.js",
            "console.error('cannot start'); process.exit(3);",
        ),
        ("ok-to-build", ""),
    ]);
    let unhealthy = node_app_with("sick", 500, &[("ok-to-build", "")]);
    let no_hook_file = node_app("hookless");

    let cases: [(&str, &Path, &str); 4] = [
        ("build", build_fails.path(), "(exit status 1)"),
        ("crash", crashes.path(), "exit status 3"),
        ("health", unhealthy.path(), "500"),
        ("pre_build", no_hook_file.path(), "hooks.pre_build"),
    ];
    for (i, (case, dir, reason)) in cases.iter().enumerate() {
        let id = format!("v{}", i + 1);
        let (code, out, err) = {
            let (socket, dir) = (platform.socket(), dir.to_path_buf());
            tokio::task::spawn_blocking(move || {
                bextctl(&socket, &["deploy", "site", dir.to_str().expect("utf8")])
            })
            .await
            .expect("deploy")
        };
        assert_eq!(code, 1, "{case}: a failed deploy exits 1:\n{out}\n{err}");
        assert!(
            err.contains(reason),
            "{case}: the reason ({reason}) is printed:\n{err}"
        );
        assert_eq!(
            answer(&bext).await,
            (200, "one".to_string()),
            "{case}: the old version serves"
        );
        let (state, why) = version_state(&versions(&platform), &id);
        assert_eq!(state, "failed", "{case}");
        assert!(why.contains(reason), "{case}: {why}");
        assert!(
            !platform
                .data()
                .join("apps/site/versions")
                .join(&id)
                .exists(),
            "{case}: a failed version's files are removed"
        );
        assert!(
            platform
                .data()
                .join(format!("apps/site/logs/{id}.log"))
                .exists(),
            "{case}: its build log is kept"
        );
    }
    // The build's own output reached the client and the log.
    let log = std::fs::read_to_string(platform.data().join("apps/site/logs/v1.log")).expect("log");
    assert!(log.contains("syntax trouble in page.tsx"), "{log}");
}

/// Issue 12, acceptance 3, and the state's survival: with
/// `keep_versions = 2`, five deploys leave the active version and two
/// more, on disk too; a restarted supervisor serves the active version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_keep_versions_prunes_and_a_restart_keeps_the_active_version() {
    let source = node_app("source");
    let platform = Platform::new(source.path(), "deploy.keep_versions = 2");
    let mut bext = platform.serve();
    for n in 1..=5 {
        let app = node_app(&format!("n{n}"));
        let (code, out, err) = {
            let (socket, dir) = (platform.socket(), app.path().to_path_buf());
            tokio::task::spawn_blocking(move || {
                bextctl(&socket, &["deploy", "site", dir.to_str().expect("utf8")])
            })
            .await
            .expect("deploy")
        };
        assert_eq!(code, 0, "deploy {n}:\n{out}\n{err}");
        assert_eq!(answer(&bext).await, (200, format!("n{n}")));
    }
    let versions = versions(&platform);
    let states: Vec<(String, String)> = ["v5", "v4", "v3", "v2", "v1", "source"]
        .iter()
        .map(|id| (id.to_string(), version_state(&versions, id).0))
        .collect();
    assert_eq!(
        states,
        [
            ("v5".to_string(), "active".to_string()),
            ("v4".to_string(), "retained".to_string()),
            ("v3".to_string(), "retained".to_string()),
            ("v2".to_string(), "pruned".to_string()),
            ("v1".to_string(), "pruned".to_string()),
            ("source".to_string(), "retained".to_string()),
        ]
    );
    let mut on_disk: Vec<String> = std::fs::read_dir(platform.data().join("apps/site/versions"))
        .expect("versions dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    assert_eq!(on_disk, ["v3", "v4", "v5"]);

    // status names the version and where it runs from.
    let (code, out, err) = platform.ctl(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(status["apps"][0]["name"], "site");
    assert_eq!(status["apps"][0]["version"], "v5");
    assert_eq!(
        status["apps"][0]["workers"].as_array().map(Vec::len),
        Some(2)
    );

    // A restart: new workers for v5, the same version.
    let before = worker_pids(&platform);
    let (code, out, err) = platform.ctl(&["restart", "site"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let after = worker_pids(&platform);
    assert_eq!(after.len(), 2);
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} -> {after:?}"
    );
    assert_eq!(answer(&bext).await, (200, "n5".to_string()));
    assert_eq!(
        version_state(&super::control::versions(&platform), "v5").0,
        "active"
    );

    // The workers' output, from the app's ring.
    let (code, out, err) = platform.ctl(&["logs", "site", "-n", "10"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("n5 listening"), "{out}");

    // A restarted supervisor comes back on v5, without a deploy.
    bext.terminate(Duration::from_secs(20));
    let bext = platform.serve();
    assert_eq!(answer(&bext).await, (200, "n5".to_string()));
    assert!(
        bext.log_text().contains("serving deployed version v5"),
        "the start says which version wins"
    );
}

/// Issue 12, acceptance 6: `bextctl` against a supervisor that is not
/// running exits 69 with one line; the control socket refuses other users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_the_control_socket_refuses_strangers() {
    let nowhere = tempfile::tempdir().expect("tempdir");
    let (code, _, err) = bextctl(&nowhere.path().join("control.sock"), &["status"]);
    assert_eq!(code, 69, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");

    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping the uid part: needs root to drop privileges in a child");
        return;
    }
    let source = node_app("one");
    let platform = Platform::new(source.path(), "");
    let _bext = platform.serve();
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).expect("meta").permissions().mode() & 0o777
    };
    assert_eq!(mode(&platform.socket()), 0o660);
    // Let anyone reach and open the socket: only SO_PEERCRED stands.
    for dir in [platform.dir.path(), &platform.data()] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(platform.socket(), std::fs::Permissions::from_mode(0o666))
            .expect("chmod");
    }
    use std::os::unix::process::CommandExt;
    let out = Command::new(env!("CARGO_BIN_EXE_bextctl"))
        .arg("--socket")
        .arg(platform.socket())
        .arg("status")
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .output()
        .expect("run bextctl as nobody");
    assert_ne!(out.status.code(), Some(0), "a stranger gets nothing");
    assert!(out.stdout.is_empty(), "no status for a stranger");
    let (code, out, err) = platform.ctl(&["status", "--json"]);
    assert_eq!(code, 0, "root still gets in: {err}");
    assert!(out.contains("\"site\""));
}

/// One deploy per app at a time: a second gets a clear error; status and
/// purge answer while a build runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_one_deploy_per_app_and_the_platform_answers_meanwhile() {
    let source = node_app("one");
    let platform = Platform::new(
        source.path(),
        r#"hooks.pre_build = "while [ -f gate ] && [ ! -f release ]; do sleep 0.05; done""#,
    );
    let bext = platform.serve();
    // The hook waits in the new version's directory until released.
    let slow = node_app_with("two", 200, &[("gate", "")]);
    let first = {
        let (socket, dir) = (platform.socket(), slow.path().to_path_buf());
        tokio::task::spawn_blocking(move || {
            bextctl(&socket, &["deploy", "site", dir.to_str().expect("utf8")])
        })
    };
    let building = platform.data().join("apps/site/versions/v1");
    wait_for("the first deploy to build", Duration::from_secs(20), || {
        building.join("gate").exists().then_some(())
    });
    let other = node_app("three");
    let (code, _, err) = platform.ctl(&["deploy", "site", other.path().to_str().expect("utf8")]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("in progress"), "{err}");
    let (code, out, err) = platform.ctl(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deploy in progress"), "{out}");
    assert_eq!(answer(&bext).await, (200, "one".to_string()));
    std::fs::write(building.join("release"), "").expect("release");
    let (code, out, err) = first.await.expect("first deploy");
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(answer(&bext).await, (200, "two".to_string()));
}

/// Issue 12, acceptance 1 (tunnels): a WebSocket opened on the old version
/// stays open through the switch and is closed only at the drain timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_a_websocket_outlives_the_switch_until_the_drain_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (one, two) = (echo_app("one", &[]), echo_app("two", &[]));
    const DRAIN: Duration = Duration::from_secs(3);
    let platform = Platform::new(one.path(), "deploy.drain_timeout = \"3s\"");
    let bext = platform.serve();
    let mut socket = open_tunnel(&bext).await;
    let mut buf = vec![0u8; 4096];
    let mut echo_once = async |socket: &mut tokio::net::TcpStream, what: &str| -> String {
        socket.write_all(what.as_bytes()).await.expect("write");
        let n = socket.read(&mut buf).await.expect("read");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(echo_once(&mut socket, "a").await, "one:a");

    let deploy = {
        let (socket, dir) = (platform.socket(), two.path().to_path_buf());
        tokio::task::spawn_blocking(move || {
            bextctl(&socket, &["deploy", "site", dir.to_str().expect("utf8")])
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while answer(&bext).await.1 != "two" {
        assert!(
            std::time::Instant::now() < deadline,
            "the deploy did not switch"
        );
    }
    let switched = std::time::Instant::now();
    // The old worker still answers on the tunnel after the switch.
    assert_eq!(echo_once(&mut socket, "b").await, "one:b");
    let closed = tokio::time::timeout(Duration::from_secs(30), socket.read(&mut buf))
        .await
        .expect("the tunnel is closed at the drain timeout");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    let open_for = switched.elapsed();
    assert!(
        open_for >= DRAIN - Duration::from_millis(300),
        "the tunnel lived {open_for:?} after the switch; the drain timeout is {DRAIN:?}"
    );
    let (code, out, err) = deploy.await.expect("deploy");
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("[drain]"),
        "the drain is a step of the deploy: {err}"
    );
}

/// Issue 12, acceptance 7: under systemd (`NOTIFY_SOCKET`), READY=1 comes
/// only once the port answers with every app started; SIGHUP brings
/// RELOADING=1 (with MONOTONIC_USEC) and READY=1 again; SIGTERM STOPPING=1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_systemd_hears_ready_once_serving_and_reloading_on_sighup() {
    let source = node_app("one");
    // The first start waits for a file, so "not ready yet" can be seen.
    let platform = Platform::new(
        source.path(),
        r#"hooks.pre_build = "while [ ! -f go ]; do sleep 0.05; done""#,
    );
    let notify_path = platform.dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("bind");
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut bext = Bext::serve(
        &platform.file,
        &Options {
            env: vec![(
                "NOTIFY_SOCKET".to_string(),
                notify_path.to_str().expect("utf8").to_string(),
            )],
            ..Options::default()
        },
    );
    let next = || {
        let mut buf = vec![0u8; 4096];
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // Listening, but the app is still starting: nothing sent yet.
    assert_eq!(answer(&bext).await.0, 503);
    notify.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 64];
    assert!(
        notify.recv(&mut buf).is_err(),
        "READY=1 before every app started"
    );
    notify.set_nonblocking(false).expect("blocking");
    std::fs::write(source.path().join("go"), "").expect("release the start");
    let ready = next();
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(ready.contains("STATUS=1 of 1 apps running"), "{ready}");
    assert_eq!(
        answer(&bext).await,
        (200, "one".to_string()),
        "the app serves once READY=1 is sent"
    );

    bext.signal(libc::SIGHUP);
    let reloading = next();
    assert!(reloading.contains("RELOADING=1"), "{reloading}");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let again = next();
    assert!(again.contains("READY=1"), "after the reload: {again}");

    bext.signal(libc::SIGTERM);
    let stopping = next();
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
    bext.wait_exit(Duration::from_secs(30));
}

/// Issue 12, acceptance 5 (version skew): after v2 goes live, v1's
/// content-hashed asset is still served (a browser may hold v1's HTML);
/// v1's other files are not; once v1 is pruned, its asset is a 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_hashed_assets_of_retained_versions_outlive_the_switch() {
    let source = node_app("source");
    let platform = Platform::new(source.path(), "deploy.keep_versions = 1");
    let bext = platform.serve();
    let deploy = async |dir: &Path| {
        let (socket, dir) = (platform.socket(), dir.to_path_buf());
        let (code, out, err) = tokio::task::spawn_blocking(move || {
            bextctl(&socket, &["deploy", "site", dir.to_str().expect("utf8")])
        })
        .await
        .expect("deploy");
        assert_eq!(code, 0, "{out}\n{err}");
    };
    let get = async |path: &str| {
        let response = bext.get_host("site.test", path).await;
        let status = response.status().as_u16();
        let cache_control = response
            .headers()
            .get("cache-control")
            .map(|v| v.to_str().unwrap_or("").to_string());
        (status, response.text().await.expect("body"), cache_control)
    };
    let v1 = node_app_with(
        "n1",
        200,
        &[
            ("public/app.3f9a1c2b.js", "v1 bundle"),
            ("public/notes.txt", "v1 notes"),
        ],
    );
    let v2 = node_app_with("n2", 200, &[("public/app.77aa88bb.js", "v2 bundle")]);
    let v3 = node_app_with("n3", 200, &[("public/app.0c0c0c0c.js", "v3 bundle")]);
    deploy(v1.path()).await;
    assert_eq!(get("/app.3f9a1c2b.js").await.1, "v1 bundle");
    deploy(v2.path()).await;
    assert_eq!(get("/").await.1, "n2");
    let (status, body, cache_control) = get("/app.3f9a1c2b.js").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "v1 bundle"),
        "v1's asset after the switch"
    );
    assert!(
        cache_control.is_some_and(|c| c.contains("immutable")),
        "a hashed asset is immutable"
    );
    assert_eq!(
        get("/notes.txt").await.0,
        404,
        "only hashed assets of older versions are served"
    );
    assert_eq!(get("/app.77aa88bb.js").await.1, "v2 bundle");
    // keep_versions = 1: v3 retains v2 and prunes v1.
    deploy(v3.path()).await;
    assert_eq!(version_state(&versions(&platform), "v1").0, "pruned");
    assert_eq!(get("/app.3f9a1c2b.js").await.0, 404, "v1 is gone");
    assert_eq!(
        get("/app.77aa88bb.js").await.1,
        "v2 bundle",
        "v2 is retained"
    );
}

/// An app whose `/` answers NAME and whose upgraded connections echo what
/// they get, prefixed with NAME (a tunnel is bytes both ways).
fn echo_app(name: &str, extra: &[(&str, &str)]) -> tempfile::TempDir {
    let server = format!(
        r#"
const http = require('http');
const server = http.createServer((req, res) => res.end('{name}'));
server.on('upgrade', (req, socket) => {{
  socket.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n');
  socket.on('data', (d) => socket.write('{name}:' + d));
}});
server.listen(process.env.PORT || 3000);
"#
    );
    let mut files: Vec<(&str, &str)> = vec![
        (
            "package.json",
            r#"{"name": "ws", "private": true, "scripts": {"start": "node server.js"}}"#,
        ),
        ("server.js", &server),
    ];
    files.extend_from_slice(extra);
    temp_app(&files)
}

/// A WebSocket-style upgraded connection to `site.test`, past its 101.
async fn open_tunnel(bext: &Bext) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(bext.addr)
        .await
        .expect("connect");
    socket
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: site.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .expect("upgrade request");
    let mut buf = vec![0u8; 4096];
    let n = socket.read(&mut buf).await.expect("101");
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    socket
}

fn worker_pids(platform: &Platform) -> Vec<u32> {
    let (code, out, err) = platform.ctl(&["status", "site", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: Value = serde_json::from_str(&out).expect("json");
    status["apps"][0]["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["pid"].as_u64())
        .map(|p| p as u32)
        .collect()
}

/// Issue 12, acceptance 4: a supervisor killed with SIGKILL during a
/// deploy's build comes back on the old version, the half-made one marked
/// failed, its files gone, and nothing it started still running (not even
/// what the build left in the background, which no parent-death signal
/// reaches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_a_supervisor_killed_during_a_build_comes_back_clean() {
    let source = node_app_with("source", 200, &[("go", "")]);
    let platform = Platform::new(
        source.path(),
        r#"hooks.pre_build = "sleep 1000 & echo $! > bg.pid; while [ ! -f go ]; do sleep 0.05; done""#,
    );
    let mut bext = platform.serve();
    let stuck = node_app("never");
    let deploy = {
        let (socket, dir) = (platform.socket(), stuck.path().to_path_buf());
        std::thread::spawn(move || {
            bextctl(&socket, &["deploy", "site", dir.to_str().expect("utf8")])
        })
    };
    let version_dir = platform.data().join("apps/site/versions/v1");
    let background: u32 = wait_for("the build to start", Duration::from_secs(30), || {
        std::fs::read_to_string(version_dir.join("bg.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
    });
    assert!(crate::support::alive(background));
    bext.signal(libc::SIGKILL);
    bext.wait_exit(Duration::from_secs(10));
    let (code, _, _) = deploy.join().expect("deploy thread");
    assert_ne!(code, 0, "the deploy did not finish");
    assert!(
        crate::support::alive(background),
        "the build's background job outlives a SIGKILLed supervisor (until its successor)"
    );
    // An upload a crash cut off (the deploy's own was removed once
    // unpacked) is removed at the next start.
    let cut_off = platform.data().join("uploads/upload-cut-off");
    std::fs::write(&cut_off, b"half an archive").expect("write");

    let bext = platform.serve();
    assert!(!cut_off.exists(), "a dead supervisor's upload is removed");
    wait_for("the leftover to be killed", Duration::from_secs(10), || {
        (!crate::support::alive(background)).then_some(())
    });
    assert_eq!(answer(&bext).await, (200, "source".to_string()));
    let (state, reason) = version_state(&versions(&platform), "v1");
    assert_eq!(state, "failed");
    assert!(reason.contains("interrupted"), "{reason}");
    assert!(
        !version_dir.exists(),
        "the half-made version's files are gone"
    );
    let mine = format!("bext-{}-", bext.pid());
    let leftovers: Vec<_> = std::fs::read_dir(platform.data().join("run"))
        .expect("run dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(&mine))
        .collect();
    assert!(
        leftovers.is_empty(),
        "runtime dirs of the dead supervisor: {leftovers:?}"
    );
}

/// Issue 12, acceptance 4: killed with SIGKILL while the old generation
/// drains (a WebSocket holds it), the supervisor comes back on the new
/// version, with the old workers gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_a_supervisor_killed_during_a_drain_comes_back_on_the_new_version() {
    let (one, two) = (echo_app("one", &[]), echo_app("two", &[]));
    let platform = Platform::new(one.path(), "deploy.drain_timeout = \"60s\"");
    let mut bext = platform.serve();
    let old_workers = worker_pids(&platform);
    assert_eq!(old_workers.len(), 2);
    let _tunnel = open_tunnel(&bext).await;
    let deploy = {
        let (socket, dir) = (platform.socket(), two.path().to_path_buf());
        std::thread::spawn(move || {
            bextctl(&socket, &["deploy", "site", dir.to_str().expect("utf8")])
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while answer(&bext).await.1 != "two" {
        assert!(
            std::time::Instant::now() < deadline,
            "the deploy did not switch"
        );
    }
    assert!(
        old_workers.iter().any(|p| crate::support::alive(*p)),
        "the old generation drains (the tunnel holds it)"
    );
    bext.signal(libc::SIGKILL);
    bext.wait_exit(Duration::from_secs(10));
    let _ = deploy.join().expect("deploy thread");

    let bext = platform.serve();
    assert_eq!(answer(&bext).await, (200, "two".to_string()));
    assert_eq!(version_state(&versions(&platform), "v1").0, "active");
    wait_for(
        "the old workers to be gone",
        Duration::from_secs(10),
        || {
            old_workers
                .iter()
                .all(|p| !crate::support::alive(*p))
                .then_some(())
        },
    );
}

/// Single-app mode serves the control socket too: status, restart (every
/// worker replaced, new one first), purge and logs; deploys are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_bext_run_serves_status_restart_purge_and_logs() {
    let app = temp_app(&[
        (
            "package.json",
            r#"{"name": "solo", "private": true, "scripts": {"start": "node server.js"}}"#,
        ),
        (
            "server.js",
            r#"
const http = require('http');
http.createServer((req, res) => { console.log('served ' + req.url); res.end('solo'); })
  .listen(process.env.PORT || 3000, () => console.log('solo up'));
"#,
        ),
    ]);
    let bext = Bext::run(app.path(), &["--workers", "2"]);
    let line = bext.wait_log(Duration::from_secs(30), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("control socket"))
    });
    let socket = PathBuf::from(line["socket"].as_str().expect("socket field"));
    let pids = |socket: &Path| -> Vec<u64> {
        let (code, out, err) = bextctl(socket, &["status", "--json"]);
        assert_eq!(code, 0, "{err}");
        let status: Value = serde_json::from_str(&out).expect("json");
        status["apps"][0]["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .filter_map(|w| w["pid"].as_u64())
            .collect()
    };
    let before = pids(&socket);
    assert_eq!(before.len(), 2);

    let response = crate::support::client()
        .get(bext.url("/hello-ring"))
        .send()
        .await
        .expect("get");
    assert_eq!(response.text().await.expect("body"), "solo");
    let name = app
        .path()
        .file_name()
        .expect("name")
        .to_str()
        .expect("utf8")
        .to_string();
    let logs = wait_for("the line in the ring", Duration::from_secs(10), || {
        let (code, out, _) = bextctl(&socket, &["logs", &name, "-n", "20"]);
        (code == 0 && out.contains("served /hello-ring")).then_some(out)
    });
    assert!(logs.contains("solo up"), "{logs}");

    let (code, out, err) = bextctl(&socket, &["restart", &name]);
    assert_eq!(code, 0, "{out}\n{err}");
    let after = pids(&socket);
    assert_eq!(after.len(), 2);
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "every worker replaced: {before:?} -> {after:?}"
    );
    let (code, _, err) = bextctl(&socket, &["purge", &name, "--all"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = bextctl(
        &socket,
        &["deploy", &name, app.path().to_str().expect("utf8")],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("bext serve"), "{err}");
}
