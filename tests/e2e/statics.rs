//! Static files served by the supervisor: representations, validators,
//! ranges, precompressed siblings, and traversal that must be impossible
//! (issue #2, acceptance 6).

use std::os::unix::fs::symlink;

use crate::support::{Bext, client, fixture, raw_get, temp_app};

#[tokio::test(flavor = "multi_thread")]
async fn precompressed_siblings_validators_ranges_and_head() {
    let site = fixture("static");
    let bext = Bext::run(&site, &[]);
    let http = client();
    let asset = "/assets/app.3f9a1c2b.js";
    let plain = std::fs::read(site.join("assets/app.3f9a1c2b.js")).expect("asset");
    let brotli = std::fs::read(site.join("assets/app.3f9a1c2b.js.br")).expect("br");
    let gzip = std::fs::read(site.join("assets/app.3f9a1c2b.js.gz")).expect("gz");

    // reqwest without compression features sends no Accept-Encoding and
    // decodes nothing: bytes on the wire are what we assert.
    let br = http
        .get(bext.url(asset))
        .header("accept-encoding", "gzip, br")
        .send()
        .await
        .expect("br");
    assert_eq!(br.headers()["content-encoding"], "br");
    assert_eq!(br.headers()["vary"], "accept-encoding");
    assert_eq!(
        br.headers()["cache-control"],
        "public, max-age=31536000, immutable",
        "hashed name"
    );
    assert!(
        br.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .contains("javascript")
    );
    assert_eq!(br.bytes().await.expect("body"), brotli);

    let gz = http
        .get(bext.url(asset))
        .header("accept-encoding", "gzip, br;q=0")
        .send()
        .await
        .expect("gz");
    assert_eq!(gz.headers()["content-encoding"], "gzip");
    assert_eq!(gz.bytes().await.expect("body"), gzip);

    let identity = http.get(bext.url(asset)).send().await.expect("identity");
    assert!(identity.headers().get("content-encoding").is_none());
    let etag = identity.headers()["etag"].clone();
    let last_modified = identity.headers()["last-modified"].clone();
    assert_eq!(identity.bytes().await.expect("body"), plain);

    let revalidated = http
        .get(bext.url(asset))
        .header("if-none-match", etag.clone())
        .send()
        .await
        .expect("304");
    assert_eq!(revalidated.status(), 304);
    assert!(revalidated.bytes().await.expect("body").is_empty());
    let by_date = http
        .get(bext.url(asset))
        .header("if-modified-since", last_modified)
        .send()
        .await
        .expect("ims");
    assert_eq!(by_date.status(), 304);
    let changed = http
        .get(bext.url(asset))
        .header("if-none-match", "\"other\"")
        .send()
        .await
        .expect("200");
    assert_eq!(changed.status(), 200);

    let range = http
        .get(bext.url(asset))
        .header("range", "bytes=10-19")
        .send()
        .await
        .expect("range");
    assert_eq!(range.status(), 206);
    assert_eq!(
        range.headers()["content-range"],
        format!("bytes 10-19/{}", plain.len())
    );
    assert_eq!(range.bytes().await.expect("body"), plain[10..20]);
    let stale_range = http
        .get(bext.url(asset))
        .header("range", "bytes=10-19")
        .header("if-range", "\"stale\"")
        .send()
        .await
        .expect("if-range");
    assert_eq!(
        stale_range.status(),
        200,
        "If-Range mismatch sends the whole file"
    );
    let unsatisfiable = http
        .get(bext.url(asset))
        .header("range", "bytes=999999-")
        .send()
        .await
        .expect("416");
    assert_eq!(unsatisfiable.status(), 416);
    assert_eq!(
        unsatisfiable.headers()["content-range"],
        format!("bytes */{}", plain.len())
    );

    let head = http.head(bext.url(asset)).send().await.expect("HEAD");
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], plain.len().to_string());
    assert!(head.bytes().await.expect("body").is_empty());

    let css = http
        .get(bext.url("/css/site.css"))
        .send()
        .await
        .expect("css");
    assert_eq!(
        css.headers()["cache-control"],
        "public, max-age=0, must-revalidate",
        "unhashed"
    );
    assert_eq!(css.headers()["content-type"], "text/css; charset=utf-8");
}

#[tokio::test(flavor = "multi_thread")]
async fn large_files_stream_with_ranges() {
    let site = temp_app(&[("index.html", "<h1>big</h1>")]);
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(site.path().join("big.bin"), &big).expect("write");
    let bext = Bext::run(site.path(), &[]);
    let body = client()
        .get(bext.url("/big.bin"))
        .send()
        .await
        .expect("GET")
        .bytes()
        .await
        .expect("body");
    assert_eq!(body.len(), big.len());
    assert!(body == big, "streamed bytes match");
    let tail = client()
        .get(bext.url("/big.bin"))
        .header("range", "bytes=-1000")
        .send()
        .await
        .expect("suffix range");
    assert_eq!(tail.status(), 206);
    assert!(tail.bytes().await.expect("body") == big[big.len() - 1000..]);
}

/// A site whose root sits beside a secret, with symlinks that point out.
fn traversal_site() -> (tempfile::TempDir, std::path::PathBuf) {
    let outer = tempfile::tempdir().expect("tempdir");
    std::fs::write(outer.path().join("secret.txt"), "TOP-SECRET-CONTENT").expect("secret");
    std::fs::create_dir_all(outer.path().join("outside-dir")).expect("dir");
    std::fs::write(
        outer.path().join("outside-dir/also-secret.txt"),
        "TOP-SECRET-CONTENT",
    )
    .expect("secret");
    let root = outer.path().join("site");
    std::fs::create_dir_all(root.join("assets")).expect("root");
    std::fs::write(root.join("index.html"), "<h1>site</h1>").expect("index");
    std::fs::write(root.join("assets/real.txt"), "inside").expect("inside");
    std::fs::write(root.join(".env"), "TOP-SECRET-CONTENT").expect("dotfile");
    symlink(outer.path().join("secret.txt"), root.join("link-file.txt")).expect("symlink");
    symlink("../secret.txt", root.join("relative-link.txt")).expect("symlink");
    symlink(outer.path().join("outside-dir"), root.join("link-dir")).expect("symlink");
    symlink("/etc/passwd", root.join("passwd")).expect("symlink");
    symlink("assets/real.txt", root.join("inside-link.txt")).expect("symlink");
    (outer, root)
}

#[test]
fn traversal_is_impossible_in_every_spelling() {
    let (_outer, root) = traversal_site();
    let bext = Bext::run(&root, &[]);
    let attacks = [
        "/../secret.txt",
        "/assets/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/.%2e/secret.txt",
        "/assets/%2e%2e/%2e%2e/secret.txt",
        "/%2e%2e%2fsecret.txt",
        "/assets%2f..%2f..%2fsecret.txt",
        "/..%5csecret.txt",
        "/assets/real.txt%00.html",
        "/%00/../secret.txt",
        "/link-file.txt",
        "/relative-link.txt",
        "/link-dir/also-secret.txt",
        "/passwd",
        "/.env",
        "//../secret.txt",
    ];
    for target in attacks {
        let (status, _, body) = raw_get(bext.addr, target);
        assert!(
            status == 400 || status == 404,
            "{target}: expected a refusal, got {status}"
        );
        let body = String::from_utf8_lossy(&body);
        assert!(
            !body.contains("TOP-SECRET") && !body.contains("root:"),
            "{target} leaked: {body}"
        );
    }
    // Still serving, and symlinks that stay inside work.
    let (status, _, body) = raw_get(bext.addr, "/inside-link.txt");
    assert_eq!((status, &body[..]), (200, &b"inside"[..]));
    let (status, _, _) = raw_get(bext.addr, "/");
    assert_eq!(status, 200);
}
