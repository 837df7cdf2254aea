//! Each fixture framework answers correctly through bext (issue #2,
//! acceptance 1).

use crate::support::{Bext, client, fixture};

#[tokio::test(flavor = "multi_thread")]
async fn express_5_answers_through_bext() {
    let bext = Bext::run(&fixture("express"), &["--workers", "2"]);
    let text = client()
        .get(bext.url("/"))
        .send()
        .await
        .expect("GET /")
        .text()
        .await
        .expect("body");
    assert_eq!(text, "hello from express");
    // The app's public/ is served by bext itself.
    let hello = client()
        .get(bext.url("/hello.txt"))
        .send()
        .await
        .expect("GET /hello.txt");
    assert_eq!(hello.status(), 200);
    assert!(hello.headers().get("etag").is_some());
    assert!(hello.text().await.expect("body").contains("hello"));
}

#[tokio::test(flavor = "multi_thread")]
async fn hono_4_on_node_server_answers_through_bext() {
    let bext = Bext::run(&fixture("hono"), &["--workers", "1"]);
    let response = client().get(bext.url("/")).send().await.expect("GET /");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "Hello Hono!");
    let json: serde_json::Value = client()
        .get(bext.url("/json"))
        .send()
        .await
        .expect("GET /json")
        .json()
        .await
        .expect("json");
    assert_eq!(json["framework"], "hono");
    // The template's listen callback logs info.port: the adapter reports the
    // port the app asked for.
    bext.wait_log(std::time::Duration::from_secs(5), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("Server is running on http://localhost:3000"))
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn deno_2_serve_answers_through_bext() {
    let bext = Bext::run(&fixture("deno"), &["--workers", "1"]);
    let text = client()
        .get(bext.url("/"))
        .send()
        .await
        .expect("GET /")
        .text()
        .await
        .expect("body");
    assert_eq!(text, "hello from deno");
    let json: serde_json::Value = client()
        .get(bext.url("/pid"))
        .send()
        .await
        .expect("GET /pid")
        .json()
        .await
        .expect("json");
    let pid = json["pid"].as_u64().expect("pid") as u32;
    assert!(
        bext.worker_pids().contains(&pid),
        "the Deno worker is bext's own child"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nextjs_16_standalone_answers_through_bext() {
    let (next, _one_at_a_time) = crate::support::next_fixture();
    let bext = Bext::run(&next, &["--workers", "1"]);
    let http = client();

    let home = http.get(bext.url("/")).send().await.expect("GET /");
    assert_eq!(home.status(), 200);
    let html = home.text().await.expect("body");
    assert!(html.contains("bext Next.js fixture"), "{html}");

    // A static chunk the page links to is served by bext from .next/static,
    // without Next (no X-Powered-By), with a long immutable lifetime.
    let asset = html
        .split('"')
        .find(|s| s.starts_with("/_next/static/") && (s.ends_with(".js") || s.ends_with(".css")))
        .expect("a /_next/static asset in the page")
        .to_string();
    let asset = http.get(bext.url(&asset)).send().await.expect("GET asset");
    assert_eq!(asset.status(), 200);
    assert_eq!(
        asset.headers()["cache-control"],
        "public, max-age=31536000, immutable"
    );
    assert!(
        asset.headers().get("x-powered-by").is_none(),
        "served without a worker hop"
    );

    let isr = http.get(bext.url("/isr")).send().await.expect("GET /isr");
    assert_eq!(isr.status(), 200);
    assert!(
        isr.headers()["cache-control"]
            .to_str()
            .expect("ascii")
            .contains("s-maxage=5")
    );
    let body = isr.text().await.expect("body");
    assert!(body.contains("ISR page"), "{body}");

    let dynamic = http
        .get(bext.url("/dynamic"))
        .send()
        .await
        .expect("GET /dynamic");
    assert_eq!(dynamic.status(), 200);
    let cc = dynamic.headers()["cache-control"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(cc.contains("private") && cc.contains("no-store"), "{cc}");

    let api: serde_json::Value = http
        .get(bext.url("/api/hello"))
        .send()
        .await
        .expect("GET /api/hello")
        .json()
        .await
        .expect("json");
    assert_eq!(api, serde_json::json!({"hello": "world"}));

    let robots = http
        .get(bext.url("/robots.txt"))
        .send()
        .await
        .expect("GET /robots.txt");
    assert_eq!(robots.status(), 200);
    assert!(robots.headers().get("x-powered-by").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn static_sites_are_served_without_workers() {
    let bext = Bext::run(&fixture("static"), &[]);
    assert!(
        bext.worker_pids().is_empty(),
        "a static site has no workers"
    );
    let http = client();
    let index = http.get(bext.url("/")).send().await.expect("GET /");
    assert_eq!(index.status(), 200);
    assert!(
        index.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/html")
    );
    assert!(
        index
            .text()
            .await
            .expect("body")
            .contains("hello from static")
    );

    // Clean URLs and directory indexes.
    let about = http
        .get(bext.url("/about"))
        .send()
        .await
        .expect("GET /about");
    assert_eq!(about.status(), 200);
    let no_redirect = crate::support::client_builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let docs = no_redirect
        .get(bext.url("/docs?x=1"))
        .send()
        .await
        .expect("GET /docs");
    assert_eq!(docs.status(), 301);
    assert_eq!(docs.headers()["location"], "/docs/?x=1");
    assert_eq!(
        http.get(bext.url("/docs/"))
            .send()
            .await
            .expect("GET /docs/")
            .status(),
        200
    );

    // Its own 404 page, and no other methods.
    let missing = http.get(bext.url("/nope")).send().await.expect("GET /nope");
    assert_eq!(missing.status(), 404);
    assert!(
        missing
            .text()
            .await
            .expect("body")
            .contains("custom 404 page")
    );
    let post = http.post(bext.url("/")).send().await.expect("POST /");
    assert_eq!(post.status(), 405);
    assert_eq!(post.headers()["allow"], "GET, HEAD");
}
