//! Next.js on bext (issue 15): the app's own revalidations (a route
//! handler's `revalidatePath`, a server action's `revalidateTag`, the Pages
//! Router's `res.revalidate`, a `'use cache'` function's tag) reach every
//! worker and bext's cache at once, and two workers behind bext give the
//! same answers as `next start` alone.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Bext, Options, client, wait_for_async};

/// A Next server under test: bext, or Next's own standalone server.
struct Site<'a> {
    base: String,
    /// The data files the fixture's pages read (`bext-test-data/NAME`).
    data: PathBuf,
    /// Prefix of this run's values (both runs share the data files).
    run: String,
    action: String,
    bext: Option<&'a Bext>,
    http: reqwest::Client,
}

/// What a sequence saw: (step, value without the run's prefix).
type Seen = Vec<(String, String)>;

/// Which worker answered, and which one revalidated, where the two differ.
#[derive(Debug, Default)]
struct Landings {
    route: Vec<(String, String)>,
    action: Vec<(String, String)>,
    pages: Vec<(String, String)>,
}

impl Site<'_> {
    fn write(&self, name: &str, value: &str) {
        std::fs::write(self.data.join(name), format!("{}{value}", self.run)).expect("data");
    }

    /// The page's `value=…;` (without the run's prefix), the worker that
    /// rendered it, and the worker bext's access log names for the request.
    async fn page(&self, path: &str) -> (String, String, Option<i64>) {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("page");
        assert_eq!(response.status(), 200, "{path}");
        let request_id = response
            .headers()
            .get("x-request-id")
            .map(|v| v.to_str().expect("ascii").to_string());
        let body = response.text().await.expect("body").replace("<!-- -->", "");
        let field = |name: &str| {
            let start = body
                .find(&format!("{name}="))
                .unwrap_or_else(|| panic!("{name} in {body}"));
            let rest = &body[start + name.len() + 1..];
            rest[..rest.find(';').expect(";")].to_string()
        };
        let value = field("value");
        let value = value.strip_prefix(&self.run).unwrap_or(&value).to_string();
        // (`uc` values end in `@time`: the time differs between runs.)
        let value = value.split('@').next().unwrap_or_default().to_string();
        let served_by = match (self.bext, request_id) {
            (Some(bext), Some(id)) => Some(
                bext.wait_log(Duration::from_secs(5), |v| {
                    v["target"] == "bext::access" && v["request_id"] == id.as_str()
                })["worker"]
                    .as_i64()
                    .expect("worker"),
            ),
            _ => None,
        };
        (value, field("worker"), served_by)
    }

    async fn get_json(&self, path: &str) -> Value {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("get");
        assert_eq!(response.status(), 200, "{path}");
        response.json().await.expect("json")
    }

    /// The `publish` server action, as a browser's fetch sends it; the
    /// worker that ran it.
    async fn publish(&self, mode: &str) -> String {
        let response = self
            .http
            .post(format!("{}/posts", self.base))
            .header("next-action", &self.action)
            .header("accept", "text/x-component")
            .header("content-type", "text/plain;charset=UTF-8")
            .body(format!("[\"{mode}\"]"))
            .send()
            .await
            .expect("action");
        let revalidated = response.headers().get("x-action-revalidated").cloned();
        let status = response.status();
        let body = response.text().await.expect("action body");
        assert_eq!(status, 200, "{body}");
        // (Next says so for an immediate revalidation; 'max' only marks
        // the tag stale.)
        if mode != "max" {
            assert_eq!(
                revalidated.as_ref().map(|v| v.as_bytes()),
                Some(&b"1"[..]),
                "{body}"
            );
        }
        std::fs::read_to_string(self.data.join("action-worker")).expect("action worker")
    }

    /// The acceptance sequence; what each step saw, and where the request
    /// after a revalidation landed.
    async fn sequence(&self) -> (Seen, Landings) {
        let mut seen = Seen::new();
        let mut landings = Landings::default();
        let mut saw = |step: &str, value: String| seen.push((step.to_string(), value));

        // A route handler's revalidatePath, also seen through a rewrite.
        self.write("rv", "a");
        self.get_json("/api/revalidate?path=/rv").await;
        saw("rv a", self.page("/rv").await.0);
        saw("latest a", self.page("/latest").await.0);
        self.write("rv", "b");
        saw("rv before revalidation", self.page("/rv").await.0);
        saw("latest before revalidation", self.page("/latest").await.0);
        let by = self.get_json("/api/revalidate?path=/rv").await["worker"].to_string();
        let (value, rendered_by, _) = self.page("/latest").await;
        saw("latest after revalidatePath", value);
        landings
            .route
            .push((by.trim_matches('"').to_string(), rendered_by));
        saw("rv after revalidatePath", self.page("/rv").await.0);
        saw("rv again", self.page("/rv").await.0);

        // A server action's revalidateTag (expire 0: the next request
        // waits for the new page).
        self.write("posts", "a");
        self.publish("expire0").await;
        saw("posts a", self.page("/posts").await.0);
        self.write("posts", "b");
        saw("posts before the action", self.page("/posts").await.0);
        let by = self.publish("expire0").await;
        let (value, rendered_by, _) = self.page("/posts").await;
        saw("posts after the action", value);
        landings.action.push((by, rendered_by));
        saw("posts again", self.page("/posts").await.0);

        // The same with the 'max' profile: stale while it regenerates.
        self.write("posts", "c");
        self.publish("max").await;
        saw(
            "posts right after a 'max' action",
            self.page("/posts").await.0,
        );
        let fresh = wait_for_async("the regenerated posts", Duration::from_secs(20), || async {
            let (value, _, _) = self.page("/posts").await;
            (value == "c").then_some(value)
        })
        .await;
        saw("posts once regenerated", fresh);

        // The Pages Router's res.revalidate.
        self.write("pr", "a");
        self.get_json("/api/pr-revalidate").await;
        saw("pr a", self.page("/pr").await.0);
        self.write("pr", "b");
        saw("pr before res.revalidate", self.page("/pr").await.0);
        let by = self.get_json("/api/pr-revalidate").await["worker"].to_string();
        let (value, _, served_by) = self.page("/pr").await;
        saw("pr after res.revalidate", value);
        if let Some(served_by) = served_by {
            landings
                .pages
                .push((by.trim_matches('"').to_string(), served_by.to_string()));
        }
        saw("pr again", self.page("/pr").await.0);

        // A 'use cache' function's tag, revalidated in one worker: fresh in
        // all of them.
        self.write("uc", "b");
        self.get_json("/api/revalidate?tag=uc").await;
        for i in 0..4 {
            saw(
                &format!("uc after revalidateTag ({i})"),
                self.page("/uc").await.0,
            );
        }
        (seen, landings)
    }
}

/// What the sequence must see.
fn expected() -> Seen {
    [
        ("rv a", "a"),
        ("latest a", "a"),
        ("rv before revalidation", "a"),
        ("latest before revalidation", "a"),
        ("latest after revalidatePath", "b"),
        ("rv after revalidatePath", "b"),
        ("rv again", "b"),
        ("posts a", "a"),
        ("posts before the action", "a"),
        ("posts after the action", "b"),
        ("posts again", "b"),
        ("posts right after a 'max' action", "b"),
        ("posts once regenerated", "c"),
        ("pr a", "a"),
        ("pr before res.revalidate", "a"),
        ("pr after res.revalidate", "b"),
        ("pr again", "b"),
        ("uc after revalidateTag (0)", "b"),
        ("uc after revalidateTag (1)", "b"),
        ("uc after revalidateTag (2)", "b"),
        ("uc after revalidateTag (3)", "b"),
    ]
    .iter()
    .map(|(s, v)| (s.to_string(), v.to_string()))
    .collect()
}

/// The id of the fixture's server action `name` in its build.
fn action_id(next: &Path, name: &str) -> String {
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(next.join(".next/standalone/.next/server/server-reference-manifest.json"))
            .expect("server reference manifest"),
    )
    .expect("json");
    manifest["node"]
        .as_object()
        .expect("node actions")
        .iter()
        .find(|(_, a)| a["exportedName"] == name)
        .map(|(id, _)| id.clone())
        .unwrap_or_else(|| panic!("the {name} action"))
}

/// `node .next/standalone/server.js` alone, as `next start` serves.
struct NextAlone(Child);

impl NextAlone {
    async fn start(next: &Path) -> (NextAlone, String) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("port")
            .local_addr()
            .expect("addr")
            .port();
        let child = Command::new("node")
            .arg("server.js")
            .current_dir(next.join(".next/standalone"))
            .env("PORT", port.to_string())
            .env("HOSTNAME", "127.0.0.1")
            .env("NODE_ENV", "production")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("node");
        let base = format!("http://127.0.0.1:{port}");
        let http = client();
        wait_for_async("next start", Duration::from_secs(30), || async {
            http.get(format!("{base}/api/hello"))
                .send()
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        (NextAlone(child), base)
    }
}

impl Drop for NextAlone {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn data_dir(next: &Path) -> PathBuf {
    let data = next.join(".next/standalone/bext-test-data");
    std::fs::create_dir_all(&data).expect("data dir");
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_app_revalidation_reaches_every_worker_and_the_cache_as_under_next_start() {
    let (next, _one_at_a_time) = crate::support::next_fixture();
    let data = data_dir(&next);
    let action = action_id(&next, "publish");
    let nonce = format!(
        "{}-{}-",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    );

    // Next's own server, one process.
    let (alone, base) = NextAlone::start(&next).await;
    let site = Site {
        base,
        data: data.clone(),
        run: format!("alone{nonce}"),
        action: action.clone(),
        bext: None,
        http: client(),
    };
    let (by_next, _) = site.sequence().await;
    drop(alone);
    assert_eq!(by_next, expected(), "next start alone");

    // bext, two workers, its cache on.
    let bext = Bext::start(
        &next,
        &Options {
            args: vec!["--workers".into(), "2".into()],
            ..Options::default()
        },
    );
    bext.wait_log(Duration::from_secs(30), |v| {
        v["message"].as_str().is_some_and(|m| m.contains("Next.js"))
    });
    let site = Site {
        base: format!("http://{}", bext.addr),
        data,
        run: format!("bext{nonce}"),
        action,
        bext: Some(&bext),
        http: client(),
    };
    let (by_bext, landings) = site.sequence().await;
    assert_eq!(
        by_bext, by_next,
        "bext with two workers, as next start alone"
    );

    // The requests after each revalidation went to the worker that had not
    // made it (bext spreads consecutive requests over its workers).
    for (what, pairs) in [
        ("revalidatePath", &landings.route),
        ("server action", &landings.action),
        ("res.revalidate", &landings.pages),
    ] {
        assert!(
            pairs.iter().any(|(by, on)| by != on && on != "none"),
            "{what}: {pairs:?}"
        );
    }
    // bext's log names what the app revalidated and what it purged.
    // (The second revalidation of /rv: bext held /rv and /latest.)
    let purges: Vec<u64> = bext
        .logs()
        .iter()
        .filter(|v| v["message"] == "next cache: the app revalidated" && v["tags"] == "_N_T_/rv")
        .map(|v| v["purged"].as_u64().expect("purged"))
        .collect();
    assert_eq!(purges.get(1), Some(&2), "{purges:?}");
}

/// A server action whose client leaves right after sending it still runs to
/// its end at the app (bext does not cut a request the app has whole; the
/// mutation would be left half done), and its revalidation still reaches
/// bext's cache. The access log says the client left: status 499, not
/// complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_action_whose_client_leaves_still_runs_and_is_logged_as_abandoned() {
    use std::io::Write;
    let (next, _one_at_a_time) = crate::support::next_fixture();
    let data = data_dir(&next);
    let done = data.join("slow-done");
    let _ = std::fs::remove_file(&done);
    let action = action_id(&next, "slowPublish");
    let bext = Bext::start(
        &next,
        &Options {
            args: vec!["--workers".into(), "2".into()],
            ..Options::default()
        },
    );
    // bext holds the posts page.
    let http = client();
    for _ in 0..2 {
        http.get(bext.url("/posts")).send().await.expect("posts");
    }
    // (A connection closed right after its request may be dropped before
    // bext takes the request at all: then nothing reaches the app, nothing
    // is logged, and the test tries again.)
    let abandoned =
        |v: &Value| v["target"] == "bext::access" && v["method"] == "POST" && v["path"] == "/posts";
    let mut taken = None;
    for _ in 0..5 {
        let mut stream = std::net::TcpStream::connect(bext.addr).expect("connect");
        let body = "[]";
        write!(
            stream,
            "POST /posts HTTP/1.1\r\nHost: {}\r\nnext-action: {action}\r\naccept: text/x-component\r\ncontent-type: text/plain;charset=UTF-8\r\ncontent-length: {}\r\n\r\n{body}",
            bext.addr,
            body.len()
        )
        .expect("send");
        stream.flush().expect("flush");
        let sent = Instant::now();
        drop(stream);
        // The request was taken: it is logged once its client is gone.
        let deadline = Instant::now() + Duration::from_secs(3);
        while taken.is_none() && Instant::now() < deadline {
            taken = bext
                .logs()
                .into_iter()
                .find(|v| abandoned(v))
                .map(|v| (v, sent));
            std::thread::sleep(Duration::from_millis(10));
        }
        if taken.is_some() {
            break;
        }
    }
    let (line, sent) = taken.expect("bext never took the action in five tries");
    // The action ran to its end, a second later.
    crate::support::wait_for("the action's end", Duration::from_secs(15), || {
        done.exists().then_some(())
    });
    assert!(sent.elapsed() >= Duration::from_millis(900));
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["complete"], false, "{line}");
    // Its revalidation purged bext's copy of the page.
    bext.wait_log(Duration::from_secs(10), |v| {
        v["message"] == "next cache: the app revalidated"
            && v["tags"] == "posts"
            && v["purged"].as_u64().is_some_and(|n| n >= 1)
    });
}
