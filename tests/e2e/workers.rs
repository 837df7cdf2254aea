//! Worker processes: supervision, crash restarts under load, memory limits,
//! output tagging, and that no worker outlives bext (issue #2, acceptance 3).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::{
    Bext, Options, PLAIN_NODE_SERVER, alive, client, fixture, signal, temp_app, wait_for,
};

/// Runs GET `url` from `concurrency` tasks until `stop`; returns
/// (successes, failures as "status or error").
async fn load(url: String, concurrency: usize, stop: Arc<AtomicBool>) -> (usize, Vec<String>) {
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (url, http, stop, ok, failures) = (
            url.clone(),
            client(),
            stop.clone(),
            ok.clone(),
            failures.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.bytes().await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures
                        .lock()
                        .expect("lock")
                        .push(format!("status {}", r.status())),
                    Err(e) => failures.lock().expect("lock").push(e.to_string()),
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("load task");
    }
    let failures = failures.lock().expect("lock").clone();
    (ok.load(Ordering::Relaxed), failures)
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_under_load_the_worker_is_back_within_a_second_and_nothing_fails() {
    let bext = Bext::run(&fixture("express"), &["--workers", "2"]);
    let workers = bext.worker_pids();
    assert_eq!(workers.len(), 2, "two workers: {workers:?}");
    let victim = workers[0];

    let stop = Arc::new(AtomicBool::new(false));
    let load_task = tokio::spawn(load(bext.url("/"), 8, stop.clone()));
    // Let the load run, then kill one worker for real.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed_at = Instant::now();
    signal(victim, libc::SIGKILL);

    // The replacement announces itself as ready.
    let ready = bext.wait_log(Duration::from_secs(5), |v| {
        v["message"] == "worker ready"
            && v["span"]["pid"]
                .as_u64()
                .is_some_and(|p| p as u32 != victim)
            && !workers.contains(&(v["span"]["pid"].as_u64().unwrap_or(0) as u32))
    });
    let back_after = killed_at.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failures) = load_task.await.expect("load");

    assert!(
        back_after < Duration::from_secs(1),
        "worker back after {back_after:?}: {ready}"
    );
    assert!(alive(bext.pid()), "the supervisor keeps running");
    assert!(!alive(victim));
    assert!(ok > 100, "the load ran ({ok} requests)");
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the restart: {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(5)]
    );
    // The crash is logged with its signal.
    let logs = bext.logs();
    assert!(
        logs.iter().any(|v| v["message"]
            .as_str()
            .is_some_and(|m| m.contains("killed by signal 9 (SIGKILL)"))
            && v["span"]["pid"].as_u64() == Some(victim as u64)),
        "crash not logged:\n{}",
        bext.log_text()
    );
    assert_eq!(bext.worker_pids().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_one_worker_requests_wait_for_the_restart() {
    let bext = Bext::run(&fixture("hono"), &["--workers", "1"]);
    let victim = bext.worker_pids()[0];
    signal(victim, libc::SIGKILL);
    // Sent while no worker is ready: queued until the replacement is.
    let response = client()
        .get(bext.url("/pid"))
        .send()
        .await
        .expect("GET /pid");
    assert_eq!(response.status(), 200);
    let json: serde_json::Value = response.json().await.expect("json");
    assert_ne!(json["pid"].as_u64(), Some(victim as u64));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_looping_app_gets_503_with_retry_after_and_backs_off() {
    let app = temp_app(&[
        ("package.json", r#"{"name":"crashy","main":"crash.js"}"#),
        (
            "crash.js",
            "console.error('about to fail'); process.exit(3);",
        ),
        (
            "bext.config.toml",
            "[server]\nqueue_timeout_ms = 300\n[isolate]\nworkers = 1\n",
        ),
    ]);
    let bext = Bext::start(
        app.path(),
        &Options {
            ready_timeout: Duration::from_secs(90),
            ..Options::default()
        },
    );
    let response = client().get(bext.url("/")).send().await.expect("GET /");
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert!(
        response.text().await.expect("body").len() < 100,
        "a small body"
    );
    // Exit code and the app's own output are in the log; restarts back off.
    bext.wait_log(Duration::from_secs(10), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("exited before it was ready (exit status 3)"))
    });
    bext.wait_log(Duration::from_secs(10), |v| {
        v["message"] == "about to fail" && v["stream"] == "stderr"
    });
    let starts = |b: &Bext| {
        b.logs()
            .iter()
            .filter(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("worker starting"))
            })
            .count()
    };
    let early = starts(&bext);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = starts(&bext);
    assert!(
        later - early < 8,
        "restarts must back off: {early} then {later} starts"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_output_is_tagged_with_app_worker_and_pid() {
    let bext = Bext::run(&fixture("express"), &["--workers", "2"]);
    for pid in bext.worker_pids() {
        let line = bext.wait_log(Duration::from_secs(5), |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m == format!("express fixture listening on port 3000 (pid {pid})"))
        });
        assert_eq!(line["target"], "bext::app");
        assert_eq!(line["stream"], "stdout");
        assert_eq!(line["span"]["app"], "express");
        assert_eq!(line["span"]["pid"].as_u64(), Some(pid as u64));
        assert!(line["span"]["w"].as_u64().is_some_and(|w| w < 2));
    }
}

/// The express fixture with a config of our own.
fn express_with(config: &str) -> tempfile::TempDir {
    let app = temp_app(&[("bext.config.toml", config)]);
    let express = fixture("express");
    for entry in ["server.js", "package.json", "node_modules", "public"] {
        std::os::unix::fs::symlink(express.join(entry), app.path().join(entry)).expect("link");
    }
    app
}

async fn pid_of(bext: &Bext) -> u64 {
    let json: serde_json::Value = client()
        .get(bext.url("/pid"))
        .send()
        .await
        .expect("pid")
        .json()
        .await
        .expect("json");
    json["pid"].as_u64().expect("pid")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_growing_past_its_memory_limit_is_recycled_gracefully() {
    let app = express_with("[isolate]\nworkers = 1\nmemory_limit = \"120mb\"\n");
    let bext = Bext::run(app.path(), &[]);
    let mechanisms = bext.wait_log(Duration::from_secs(5), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("memory limit 120mb"))
    });
    assert!(
        mechanisms["message"]
            .as_str()
            .expect("text")
            .contains("--max-old-space-size=120")
    );
    let before = pid_of(&bext).await;

    // Grow 10 MB at a time, as a leak would, until the watchdog acts. Every
    // request succeeds: the replacement starts before the old one drains.
    let deadline = Instant::now() + Duration::from_secs(30);
    let recycled = loop {
        let r = client()
            .get(bext.url("/alloc?mb=10"))
            .send()
            .await
            .expect("alloc");
        assert_eq!(r.status(), 200, "a request failed while the worker grew");
        if let Some(line) = bext
            .logs()
            .into_iter()
            .find(|v| v["mechanism"] == "rss-watchdog" && v["rss_mb"].is_u64())
        {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "the watchdog never acted:\n{}",
            bext.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(recycled["span"]["pid"].as_u64(), Some(before));
    wait_for(
        "the old worker to be stopped",
        Duration::from_secs(10),
        || (!alive(before as u32)).then_some(()),
    );
    assert_ne!(pid_of(&bext).await, before, "a fresh worker answers");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sudden_spike_past_the_limit_is_stopped_and_the_app_keeps_answering() {
    let app = express_with("[isolate]\nworkers = 1\nmemory_limit = \"100mb\"\n");
    let bext = Bext::run(app.path(), &[]);
    let before = pid_of(&bext).await;
    // 300 MB at once: past the kernel's hard stop where cgroups exist, past
    // the watchdog's limit everywhere.
    let _ = client().get(bext.url("/alloc?mb=300")).send().await;
    let acted = bext.wait_log(Duration::from_secs(15), |v| {
        v["mechanism"]
            .as_str()
            .is_some_and(|m| m == "rss-watchdog" || m.starts_with("cgroup"))
            && v["span"]["pid"].as_u64() == Some(before)
    });
    let mechanism = acted["mechanism"].as_str().expect("mechanism").to_string();
    let deadline = Instant::now() + Duration::from_secs(15);
    let after = loop {
        if let Ok(r) = client().get(bext.url("/pid")).send().await
            && r.status() == 200
            && let Ok(json) = r.json::<serde_json::Value>().await
            && let Some(pid) = json["pid"].as_u64().filter(|p| *p != before)
        {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "no fresh worker after {mechanism} acted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(
        after, before,
        "stopped by {mechanism}; a fresh worker answers"
    );
}

#[test]
fn no_worker_outlives_a_killed_supervisor() {
    let app = temp_app(&[
        ("package.json", r#"{"main":"server.js"}"#),
        ("server.js", PLAIN_NODE_SERVER),
    ]);
    let mut bext = Bext::run(app.path(), &["--workers", "2"]);
    let workers = bext.worker_pids();
    assert_eq!(workers.len(), 2);
    signal(bext.pid(), libc::SIGKILL);
    bext.wait_exit(Duration::from_secs(5));
    for pid in workers {
        wait_for("the orphaned worker to die", Duration::from_secs(5), || {
            (!alive(pid)).then_some(())
        });
    }
}
