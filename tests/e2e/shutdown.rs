//! SIGTERM drains: in-flight requests finish, workers stop, nothing is left
//! behind (issue #2, acceptance 4).

use std::net::TcpStream;
use std::time::Duration;

use crate::support::{Bext, PLAIN_NODE_SERVER, alive, client, fixture, temp_app};

fn leftovers(dir: &std::path::Path) -> Vec<String> {
    walk(dir)
        .into_iter()
        .map(|p| p.display().to_string())
        .collect()
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        out.push(entry.path());
        if entry.path().is_dir() {
            out.extend(walk(&entry.path()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_the_slow_request_finish_then_exits_clean() {
    let app = temp_app(&[
        ("package.json", r#"{"main":"server.js"}"#),
        ("server.js", PLAIN_NODE_SERVER),
    ]);
    let mut bext = Bext::run(app.path(), &["--workers", "2"]);
    let workers = bext.worker_pids();
    assert_eq!(workers.len(), 2);
    assert!(
        !leftovers(bext.runtime_dir.path()).is_empty(),
        "sockets exist while running"
    );

    let slow = tokio::spawn(client().get(bext.url("/slow")).send());
    bext.wait_log(Duration::from_secs(10), |v| {
        v["message"] == "slow request started"
    });
    crate::support::signal(bext.pid(), libc::SIGTERM);

    // New connections are refused once draining starts...
    bext.wait_log(Duration::from_secs(5), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("stopped accepting"))
    });
    assert!(
        TcpStream::connect(bext.addr).is_err(),
        "the listener is closed"
    );
    // ...while the one in flight completes.
    let response = slow
        .await
        .expect("join")
        .expect("the slow request completes");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "slow done");

    let status = bext.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", bext.log_text());
    for pid in workers {
        assert!(!alive(pid), "worker {pid} outlived bext");
    }
    assert_eq!(
        leftovers(bext.runtime_dir.path()),
        Vec::<String>::new(),
        "no socket files left"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_deno_workers_and_removes_their_sockets() {
    let mut bext = Bext::run(&fixture("deno"), &["--workers", "2"]);
    let workers = bext.worker_pids();
    assert_eq!(workers.len(), 2);
    assert_eq!(
        client()
            .get(bext.url("/"))
            .send()
            .await
            .expect("GET")
            .status(),
        200
    );
    let status = bext.terminate(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0));
    for pid in workers {
        assert!(!alive(pid), "deno worker {pid} outlived bext");
    }
    assert_eq!(leftovers(bext.runtime_dir.path()), Vec::<String>::new());
}
