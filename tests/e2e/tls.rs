//! Issue 13: HTTPS. Certificates from a test CA made here (rcgen), three
//! apps (an exact domain, a wildcard, a third as the default), real TLS
//! clients (rustls through tokio-rustls and reqwest).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;

use crate::support::{Bext, Options, bext_command, temp_app};

/// A CA, and leaf certificates it signs, as PEM files in a temp dir.
struct TestCa {
    dir: tempfile::TempDir,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "bext test CA");
        let key = rcgen::KeyPair::generate().expect("CA key");
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key).expect("CA");
        TestCa {
            dir: tempfile::tempdir().expect("tempdir"),
            issuer,
        }
    }

    fn root(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Writes `NAME.pem` and `NAME.key` for a certificate of `names`;
    /// returns (cert path, key path, the leaf's DER).
    fn leaf(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf, CertificateDer<'static>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(
            names.iter().map(ToString::to_string).collect::<Vec<_>>(),
        )
        .expect("params")
        .signed_by(&key, &self.issuer)
        .expect("leaf");
        let (cert_path, key_path) = (
            self.dir.path().join(format!("{file}.pem")),
            self.dir.path().join(format!("{file}.key")),
        );
        // The chain: leaf, then the CA.
        std::fs::write(&cert_path, format!("{}{}", cert.pem(), self.issuer.pem()))
            .expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path, cert.der().clone())
    }
}

/// A Node app that answers with what it was sent, as JSON.
fn echo_app(name: &str) -> tempfile::TempDir {
    temp_app(&[
        (
            "package.json",
            &format!(
                r#"{{"name": "{name}", "private": true, "scripts": {{"start": "node server.js"}}}}"#
            ),
        ),
        (
            "server.js",
            &format!(
                r#"
const http = require('http');
http.createServer((req, res) => {{
  res.setHeader('content-type', 'application/json');
  if (req.url === '/vary') {{
    res.setHeader('cache-control', 'public, max-age=60');
    res.setHeader('vary', 'Cookie');
  }}
  res.end(JSON.stringify({{
    app: '{name}',
    proto: req.headers['x-forwarded-proto'] || null,
    cookies: req.rawHeaders.filter((h, i) => i % 2 === 0 && h.toLowerCase() === 'cookie').length,
    cookie: req.headers['cookie'] || null,
  }}));
}}).listen(process.env.PORT || 3000);
"#
            ),
        ),
    ])
}

/// A TLS client trusting only `ca`, offering h2 and http/1.1.
fn client_config(ca: &TestCa) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.root()).expect("root");
    let mut config = rustls::ClientConfig::builder_with_provider(bext::listener::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

/// One handshake with `sni` (or none): the server's leaf and the ALPN
/// protocol it chose.
async fn handshake(
    addr: SocketAddr,
    ca: &TestCa,
    sni: Option<&str>,
) -> (CertificateDer<'static>, Option<Vec<u8>>) {
    let mut config = client_config(ca);
    let name = match sni {
        Some(name) => ServerName::try_from(name.to_string()).expect("name"),
        None => {
            // No SNI sent; the client still checks the certificate it
            // gets against a name: the default app's.
            config.enable_sni = false;
            ServerName::try_from("c.test").expect("name")
        }
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("handshake");
    let (_, session) = tls.get_ref();
    let leaf = session.peer_certificates().expect("certs")[0].clone();
    (leaf, session.alpn_protocol().map(<[u8]>::to_vec))
}

fn https_client(ca: &TestCa, addr: SocketAddr, names: &[&str]) -> reqwest::Client {
    let mut builder = crate::support::client_builder()
        .use_preconfigured_tls(client_config(ca))
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20));
    for name in names {
        builder = builder.resolve(name, addr);
    }
    builder.build().expect("client")
}

struct Site {
    file: PathBuf,
    bext: Bext,
    ca: TestCa,
    plain: SocketAddr,
    leaves: [CertificateDer<'static>; 4],
    _apps: Vec<tempfile::TempDir>,
    _config: tempfile::TempDir,
}

fn platform_file(
    ca: &TestCa,
    apps: &[tempfile::TempDir],
) -> (tempfile::TempDir, PathBuf, [CertificateDer<'static>; 4]) {
    let (a_cert, a_key, a) = ca.leaf("a", &["a.test"]);
    let (b_cert, b_key, b) = ca.leaf("b", &["*.b.test", "b.test"]);
    let (c_cert, c_key, c) = ca.leaf("c", &["c.test"]);
    // An exact name under b's wildcard, with its own certificate.
    let (d_cert, d_key, d) = ca.leaf("d", &["exact.b.test"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("platform.toml");
    let p = |p: &Path| p.display().to_string();
    std::fs::write(
        &file,
        format!(
            r#"
[platform]
listen = "127.0.0.1:0"
data_dir = "{data}"
default_app = "c"
client_header_timeout = "2s"

[platform.tls]
http_listen = "127.0.0.1:0"

[apps.a]
source = "{a_src}"
domains = ["a.test"]
tls = {{ cert = "{a_cert}", key = "{a_key}", hsts = "1y" }}

[apps.b]
source = "{b_src}"
domains = ["*.b.test", "b.test"]
tls = {{ cert = "{b_cert}", key = "{b_key}" }}

[apps.c]
source = "{c_src}"
domains = ["c.test"]
tls = {{ cert = "{c_cert}", key = "{c_key}" }}

[apps.d]
source = "{d_src}"
domains = ["exact.b.test"]
tls = {{ cert = "{d_cert}", key = "{d_key}" }}
"#,
            data = dir.path().join("data").display(),
            a_src = p(apps[0].path()),
            b_src = p(apps[1].path()),
            c_src = p(apps[2].path()),
            a_cert = p(&a_cert),
            a_key = p(&a_key),
            b_cert = p(&b_cert),
            b_key = p(&b_key),
            c_cert = p(&c_cert),
            c_key = p(&c_key),
            d_src = p(&crate::support::fixture("static")),
            d_cert = p(&d_cert),
            d_key = p(&d_key),
        ),
    )
    .expect("write");
    (dir, file, [a, b, c, d])
}

fn start() -> Site {
    let ca = TestCa::new();
    let apps = vec![echo_app("a"), echo_app("b"), echo_app("c")];
    let (dir, file, leaves) = platform_file(&ca, &apps);
    let bext = Bext::serve(&file, &Options::default());
    bext.wait_log(Duration::from_secs(60), |v| v["message"] == "apps started");
    let line = bext.wait_log(Duration::from_secs(5), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("redirecting"))
    });
    let plain = line["addr"].as_str().expect("addr").parse().expect("addr");
    Site {
        file,
        bext,
        ca,
        plain,
        leaves,
        _apps: apps,
        _config: dir,
    }
}

/// Acceptance 1 (SNI, ALPN, redirect, request facts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue13_sni_picks_each_apps_certificate_and_alpn_gives_h2() {
    let site = start();
    let addr = site.bext.addr;
    for (sni, leaf) in [
        (Some("a.test"), &site.leaves[0]),
        (Some("x.b.test"), &site.leaves[1]),
        (Some("b.test"), &site.leaves[1]),
        (Some("c.test"), &site.leaves[2]),
        // An exact name beats the wildcard that also matches it.
        (Some("exact.b.test"), &site.leaves[3]),
        // No SNI: the default app's certificate.
        (None, &site.leaves[2]),
    ] {
        let (got, alpn) = handshake(addr, &site.ca, sni).await;
        assert!(got == *leaf, "SNI {sni:?} got another certificate");
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "ALPN for {sni:?}");
    }

    let client = https_client(&site.ca, addr, &["a.test", "x.b.test"]);
    let response = client
        .get(format!("https://x.b.test:{}/hello", addr.port()))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .send()
        .await
        .expect("GET over h2");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["app"], "b");
    assert_eq!(body["proto"], "https", "the app sees https");
    // A client's own X-Forwarded-Proto changes nothing.
    let spoofed: Value = client
        .get(format!("https://a.test:{}/", addr.port()))
        .header("x-forwarded-proto", "http")
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert_eq!(spoofed["proto"], "https");
    assert_eq!(
        body["cookies"], 1,
        "one cookie header reaches the app: {body}"
    );
    assert_eq!(body["cookie"], "a=1; b=2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue13_the_plain_listener_redirects_to_https() {
    let site = start();
    let client = crate::support::client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let response = client
        .post(format!("http://{}/path/x?q=1&r", site.plain))
        .header("host", "a.test")
        .body("kept by a 308")
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 308);
    assert_eq!(
        response.headers()["location"],
        format!("https://a.test:{}/path/x?q=1&r", site.bext.addr.port()).as_str()
    );
    assert!(
        response
            .headers()
            .get("strict-transport-security")
            .is_none(),
        "never HSTS over plain HTTP"
    );
    // The redirect's target answers, with a's HSTS (`tls.hsts = "1y"`);
    // b has none.
    let https = https_client(&site.ca, site.bext.addr, &["a.test", "b.test"]);
    let followed = https
        .get(response.headers()["location"].to_str().expect("ascii"))
        .send()
        .await
        .expect("GET");
    assert_eq!(followed.status(), 200);
    assert_eq!(
        followed.headers()["strict-transport-security"],
        "max-age=31557600"
    );
    let b = https
        .get(format!("https://b.test:{}/", site.bext.addr.port()))
        .send()
        .await
        .expect("GET b");
    assert!(b.headers().get("strict-transport-security").is_none());
    let body: Value = followed.json().await.expect("json");
    assert_eq!(body["app"], "a");
}

/// Config errors name the key: a certificate that does not cover the
/// app's domain, a key of another certificate, an app without one.
#[test]
fn issue13_bad_certificates_are_config_errors() {
    let ca = TestCa::new();
    let (cert, key, _) = ca.leaf("only-a", &["a.test"]);
    let (_, other_key, _) = ca.leaf("other", &["a.test"]);
    let source = tempfile::tempdir().expect("tempdir");
    let check = |app: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("platform.toml");
        std::fs::write(
            &file,
            format!(
                "[platform]\nlisten = \"127.0.0.1:0\"\n[platform.tls]\n[apps.x]\nsource = \"{}\"\n{app}\n",
                source.path().display()
            ),
        )
        .expect("write");
        let (code, out, err) = bext_command(&["check", "--config", file.to_str().expect("utf8")]);
        (code, format!("{out}{err}"))
    };
    let (code, text) = check(&format!(
        "domains = [\"b.test\"]\ntls = {{ cert = \"{}\", key = \"{}\" }}",
        cert.display(),
        key.display()
    ));
    assert_ne!(code, 0);
    assert!(
        text.contains("apps.x.domains[0]") && text.contains("does not cover `b.test`"),
        "{text}"
    );
    let (code, text) = check(&format!(
        "domains = [\"a.test\"]\ntls = {{ cert = \"{}\", key = \"{}\" }}",
        cert.display(),
        other_key.display()
    ));
    assert_ne!(code, 0);
    assert!(
        text.contains("apps.x.tls.cert") && text.contains("is not the key"),
        "{text}"
    );
    // Without a certificate of its own, an app's domains get theirs from
    // ACME: a wildcard cannot.
    let (code, text) = check("domains = [\"*.a.test\"]");
    assert_ne!(code, 0);
    assert!(
        text.contains("apps.x.domains[0]") && text.contains("DNS-01"),
        "{text}"
    );
    let (code, text) = check(&format!(
        "domains = [\"a.test\"]\ntls = {{ cert = \"{}\", key = \"{}\" }}",
        cert.display(),
        key.display()
    ));
    assert_eq!(code, 0, "{text}");
}

/// Acceptance 1 (rotation): a certificate replaced on disk while clients
/// keep asking is used for new handshakes within a second (asserted with
/// room for a loaded machine), with no failed request; a half-written
/// pair is refused and the old one kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue13_a_replaced_certificate_is_taken_without_a_failed_request() {
    let site = start();
    let addr = site.bext.addr;
    let (first, _) = handshake(addr, &site.ca, Some("a.test")).await;
    assert!(first == site.leaves[0]);
    let cert_path = site.ca.dir.path().join("a.pem");
    let key_path = site.ca.dir.path().join("a.key");

    // Load: new connections and kept-alive ones, all along.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, clients) = (
            Arc::clone(&stop),
            [
                https_client(&site.ca, addr, &["a.test"]),
                https_client(&site.ca, addr, &["a.test"]),
            ],
        );
        let config = client_config(&site.ca);
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // A fresh client each round: a new handshake.
                let fresh = crate::support::client_builder()
                    .use_preconfigured_tls(config.clone())
                    .resolve("a.test", addr)
                    .build()
                    .expect("client");
                for client in clients.iter().chain([&fresh]) {
                    match client
                        .get(format!("https://a.test:{}/", addr.port()))
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == 200 => ok += 1,
                        Ok(r) => failed.push(format!("status {}", r.status())),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
            }
            (ok, failed)
        })
    };

    // Half-written: refused, the old certificate stays.
    let pem = std::fs::read_to_string(&cert_path).expect("read");
    std::fs::write(&cert_path, &pem[..pem.len() / 3]).expect("truncate");
    site.bext.wait_log(Duration::from_secs(10), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("app 'a'") && m.contains("the certificate in use stays"))
    });
    let (still, _) = handshake(addr, &site.ca, Some("a.test")).await;
    assert!(still == site.leaves[0], "the old certificate is kept");

    // A new pair, each file replaced whole (written aside, renamed).
    let (new_cert, new_key, new_leaf) = site.ca.leaf("a-next", &["a.test"]);
    std::fs::rename(&new_key, &key_path).expect("key");
    std::fs::rename(&new_cert, &cert_path).expect("cert");
    let replaced = std::time::Instant::now();
    loop {
        let (leaf, _) = handshake(addr, &site.ca, Some("a.test")).await;
        if leaf == new_leaf {
            break;
        }
        assert!(
            replaced.elapsed() < Duration::from_secs(3),
            "the new certificate was not taken within 3 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let taken = replaced.elapsed();
    eprintln!("new certificate in use {taken:?} after the files were replaced");
    // Some more requests on the new certificate, then stop.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.expect("load");
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(ok > 10, "the load ran ({ok} requests)");
}

/// Review: a browser's split HTTP/2 `cookie` fields are one line for the
/// cache too: a page stored with `Vary: Cookie` for one user is never
/// served to another who shares only their first cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue13_split_cookies_select_the_cached_variant_whole() {
    let site = start();
    let client = https_client(&site.ca, site.bext.addr, &["a.test"]);
    let url = format!("https://a.test:{}/vary", site.bext.addr.port());
    let get = |cookies: &'static [&'static str]| {
        let mut request = client.get(&url);
        for cookie in cookies {
            request = request.header("cookie", *cookie);
        }
        async move {
            let response = request.send().await.expect("GET");
            assert_eq!(response.version(), reqwest::Version::HTTP_2);
            let cache = response.headers()["x-bext-cache"]
                .to_str()
                .expect("ascii")
                .to_string();
            let body: Value = response.json().await.expect("json");
            (
                body["cookie"].as_str().unwrap_or_default().to_string(),
                cache,
            )
        }
    };
    let victim = "lang=en; session=victim".to_string();
    assert_eq!(get(&["lang=en", "session=victim"]).await.0, victim);
    let (page, cache) = get(&["lang=en", "session=victim"]).await;
    assert_eq!(page, victim, "the victim's own page");
    assert!(cache.starts_with("HIT"), "stored for the victim: {cache}");
    let (page, cache) = get(&["lang=en"]).await;
    assert_eq!(page, "lang=en", "not the victim's page ({cache})");
}

/// A reload takes new certificate files at once; one that would leave an
/// app of the HTTPS listener without a certificate is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue13_a_reload_swaps_certificates_or_is_refused() {
    let site = start();
    let addr = site.bext.addr;
    let original = std::fs::read_to_string(&site.file).expect("read");
    // The operator turns HTTPS off in the file (no [platform.tls], no
    // certificates): refused, the listener stays HTTPS until a restart and
    // its apps need their certificates (ACME cannot give b's wildcard one).
    let stripped: String = original
        .replace("[platform.tls]\nhttp_listen = \"127.0.0.1:0\"\n", "")
        .lines()
        .filter(|l| !l.starts_with("tls = "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&site.file, &stripped).expect("write");
    site.bext.signal(libc::SIGHUP);
    let refused = site.bext.wait_log(Duration::from_secs(30), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("reload refused"))
    });
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("app `b`") && m.contains("wildcard")),
        "{refused}"
    );
    let (leaf, _) = handshake(addr, &site.ca, Some("x.b.test")).await;
    assert!(leaf == site.leaves[1], "b keeps its certificate");

    // A new certificate for a, named in the file: taken by the reload.
    let (cert, key, new_leaf) = site.ca.leaf("a-renamed", &["a.test"]);
    let renamed = original
        .replace(
            &site.ca.dir.path().join("a.pem").display().to_string(),
            &cert.display().to_string(),
        )
        .replace(
            &site.ca.dir.path().join("a.key").display().to_string(),
            &key.display().to_string(),
        );
    std::fs::write(&site.file, renamed).expect("write");
    site.bext.signal(libc::SIGHUP);
    crate::support::wait_for_async(
        "the reload's certificate",
        Duration::from_secs(30),
        || async {
            let (leaf, _) = handshake(addr, &site.ca, Some("a.test")).await;
            (leaf == new_leaf).then_some(())
        },
    )
    .await;
}

/// A client that opens a connection and never finishes its handshake is
/// closed after `client_header_timeout` (2 s here), and others are served
/// meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue13_a_stalled_handshake_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let site = start();
    let addr = site.bext.addr;
    let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut partial = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // The first bytes of a ClientHello record, then nothing.
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .expect("write");
    let started = std::time::Instant::now();
    let (leaf, _) = handshake(addr, &site.ca, Some("a.test")).await;
    assert!(leaf == site.leaves[0], "others are served meanwhile");
    for stream in [&mut silent, &mut partial] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(15), stream.read(&mut buf))
            .await
            .expect("closed by bext, not by this test's timeout");
        // A close (0) or a reset; an alert record is fine too.
        assert!(read.is_err() || read.is_ok_and(|n| n == 0 || buf[0] == 0x15));
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(12),
        "closed after {waited:?}, not near client_header_timeout"
    );
}

/// Single-app HTTPS (`[server.tls]` in bext.config.toml): the app over
/// TLS with its HSTS, the scheme it sees, and the plain listener's 308.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue13_bext_run_serves_https_with_server_tls() {
    let ca = TestCa::new();
    let (cert, key, _) = ca.leaf("site", &["site.test"]);
    let app = echo_app("single");
    std::fs::write(
        app.path().join("bext.config.toml"),
        format!(
            "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\ndomains = [\"site.test\"]\nhttp_listen = \"127.0.0.1:0\"\nhsts = \"1d\"\n",
            cert.display(),
            key.display()
        ),
    )
    .expect("config");
    let bext = Bext::run(app.path(), &["--workers", "1"]);
    let line = bext.wait_log(Duration::from_secs(5), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("redirecting"))
    });
    let plain: SocketAddr = line["addr"].as_str().expect("addr").parse().expect("addr");
    let https = https_client(&ca, bext.addr, &["site.test"]);
    let url = format!("https://site.test:{}/hello?x=1", bext.addr.port());
    let response = https.get(&url).send().await.expect("GET over TLS");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["strict-transport-security"],
        "max-age=86400"
    );
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["app"], "single");
    assert_eq!(body["proto"], "https");
    let redirect = crate::support::client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .get(format!("http://{plain}/hello?x=1"))
        .header("host", "site.test")
        .send()
        .await
        .expect("GET over plain HTTP");
    assert_eq!(redirect.status(), 308);
    assert_eq!(redirect.headers()["location"], url.as_str());
}

impl TestCa {
    /// A client certificate (for mutual TLS) named `cn`: `NAME.pem`
    /// (leaf only) and `NAME.key`.
    fn client(&self, file: &str, cn: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).expect("client");
        let (cert_path, key_path) = (
            self.dir.path().join(format!("{file}.pem")),
            self.dir.path().join(format!("{file}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }

    /// An intermediate CA this one signs.
    fn intermediate(&self) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "bext test intermediate");
        let key = rcgen::KeyPair::generate().expect("intermediate key");
        let issuer =
            rcgen::CertifiedIssuer::signed_by(params, key, &self.issuer).expect("intermediate");
        TestCa {
            dir: tempfile::tempdir().expect("tempdir"),
            issuer,
        }
    }

    /// The CA's certificate as a PEM file.
    fn root_file(&self) -> PathBuf {
        let path = self.dir.path().join("ca.pem");
        std::fs::write(&path, self.issuer.pem()).expect("write CA");
        path
    }
}

/// `bextctl --connect ADDR ARGS`: (exit code, stdout, stderr).
fn bextctl_remote(addr: &str, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bextctl"))
        .arg("--connect")
        .arg(addr)
        .args(args)
        .env_remove("BEXT_CERT")
        .env_remove("BEXT_KEY")
        .env_remove("BEXT_CA")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run bextctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Issue 13, last point: the control service on TCP, with mutual TLS only.
/// A client certificate of the configured CA gets in; none, or one of
/// another CA, is refused in the handshake, as is plain HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue13_the_control_port_admits_only_client_certificates_of_its_ca() {
    let ca = TestCa::new();
    let (server_cert, server_key, _) = ca.leaf("control", &["localhost", "127.0.0.1"]);
    let (client_cert, client_key) = ca.client("operator", "ops@example.test");
    let stranger_ca = TestCa::new();
    let (stranger_cert, stranger_key) = stranger_ca.client("stranger", "stranger");
    let roots = ca.root_file();
    // The server's client CA: a file of its own, to rotate below.
    let client_ca = tempfile::tempdir().expect("tempdir");
    std::fs::copy(&roots, client_ca.path().join("ca.pem")).expect("copy");
    let client_ca_file = client_ca.path().join("ca.pem");

    let source = echo_app("site");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("platform.toml");
    std::fs::write(
        &file,
        format!(
            r#"[platform]
listen = "127.0.0.1:0"
data_dir = "{data}"

[platform.control]
listen = "127.0.0.1:0"
cert = "{cert}"
key = "{key}"
client_ca = "{ca}"

[apps.site]
source = "{source}"
domains = ["site.test"]
"#,
            data = dir.path().join("data").display(),
            cert = server_cert.display(),
            key = server_key.display(),
            ca = client_ca_file.display(),
            source = source.path().display(),
        ),
    )
    .expect("write");
    let bext = Bext::serve(&file, &Options::default());
    let line = bext.wait_log(Duration::from_secs(30), |v| {
        v["message"] == "control port: listening (mutual TLS)"
    });
    let addr: SocketAddr = line["addr"].as_str().expect("addr").parse().expect("addr");
    bext.wait_log(Duration::from_secs(60), |v| v["message"] == "apps started");
    let port = addr.port().to_string();
    let at = format!("127.0.0.1:{port}");
    let files = |cert: &Path, key: &Path| {
        vec![
            "--cert".to_string(),
            cert.display().to_string(),
            "--key".to_string(),
            key.display().to_string(),
            "--ca".to_string(),
            roots.display().to_string(),
        ]
    };
    let with = |mut tls: Vec<String>, args: &[&str]| {
        tls.extend(args.iter().map(ToString::to_string));
        let args: Vec<&str> = tls.iter().map(String::as_str).collect();
        bextctl_remote(&at, &args)
    };

    // The operator's certificate: every command works, by IP and by name.
    let (code, out, err) = with(files(&client_cert, &client_key), &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: Value = serde_json::from_str(&out).expect("status JSON");
    assert!(out.contains("\"site\""), "{status}");
    let by_name = bextctl_remote(
        &format!("localhost:{port}"),
        &[
            "--cert",
            client_cert.to_str().expect("utf8"),
            "--key",
            client_key.to_str().expect("utf8"),
            "--ca",
            roots.to_str().expect("utf8"),
            "purge",
            "site",
            "--all",
        ],
    );
    assert_eq!(by_name.0, 0, "{}", by_name.2);
    bext.wait_log(Duration::from_secs(10), |v| {
        v["message"] == "control port: a client connected"
            && v["client"]
                .as_str()
                .is_some_and(|c| c.contains("ops@example.test"))
    });

    bext.wait_log(Duration::from_secs(10), |v| {
        v["message"] == "control port: purge asked"
            && v["app"] == "site"
            && v["client"]
                .as_str()
                .is_some_and(|c| c.contains("ops@example.test"))
    });

    // No certificate: bextctl says what is missing before connecting.
    let (code, out, err) = bextctl_remote(&at, &["--ca", roots.to_str().expect("utf8"), "status"]);
    assert_eq!(code, 2, "a usage error: {err}");
    assert!(out.is_empty());
    assert!(err.contains("--cert"), "{err}");

    // Another CA's client certificate: refused, and said so.
    let (code, out, err) = with(files(&stranger_cert, &stranger_key), &["status"]);
    assert_eq!(code, 69, "{err}");
    assert!(out.is_empty(), "nothing for a stranger: {out}");
    assert!(err.contains("refused this client"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");

    // A server certificate bextctl does not trust: refused on its side.
    let (code, _, err) = bextctl_remote(
        &at,
        &[
            "--cert",
            client_cert.to_str().expect("utf8"),
            "--key",
            client_key.to_str().expect("utf8"),
            "--ca",
            stranger_ca.root_file().to_str().expect("utf8"),
            "status",
        ],
    );
    assert_eq!(code, 69, "{err}");

    // Plain HTTP/2 (h2c) never reaches the service: the answer is a TLS
    // alert, not an HTTP/2 SETTINGS frame.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut plain = tokio::net::TcpStream::connect(addr).await.expect("connect");
    plain
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut answer)).await;
    assert!(
        answer.is_empty() || answer[0] == 0x15,
        "a TLS alert or nothing, got {answer:?}"
    );

    // A client following the logs, connected under the current CA.
    let connected = || {
        bext.logs()
            .iter()
            .filter(|v| v["message"] == "control port: a client connected")
            .count()
    };
    let before = connected();
    let mut follower = std::process::Command::new(env!("CARGO_BIN_EXE_bextctl"))
        .args(["--connect", &at])
        .args(files(&client_cert, &client_key))
        .args(["logs", "site", "-f"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("bextctl logs -f");
    crate::support::wait_for("the follower to connect", Duration::from_secs(10), || {
        (connected() > before).then_some(())
    });

    // The client CA rotated on disk: the next connection goes by the new
    // one, with no restart, and the follower's connection is closed.
    let stranger_root = stranger_ca.root_file();
    std::fs::copy(&stranger_root, &client_ca_file).expect("rotate");
    let (code, _, err) = with(files(&stranger_cert, &stranger_key), &["status"]);
    assert_eq!(code, 0, "the new CA's client gets in: {err}");
    let (code, _, err) = with(files(&client_cert, &client_key), &["status"]);
    assert_eq!(code, 69, "the old CA's client is refused: {err}");
    let status = crate::support::wait_for(
        "the follower to be cut off",
        Duration::from_secs(15),
        || follower.try_wait().expect("try_wait"),
    );
    let mut err = String::new();
    std::io::Read::read_to_string(follower.stderr.as_mut().expect("stderr"), &mut err)
        .expect("stderr");
    assert_eq!(status.code(), Some(69), "{err}");
    // A broken replacement keeps the last good configuration.
    std::fs::write(&client_ca_file, "not a certificate").expect("break");
    let (code, _, err) = with(files(&stranger_cert, &stranger_key), &["status"]);
    assert_eq!(code, 0, "still the last good CA: {err}");
    bext.wait_log(Duration::from_secs(10), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("control port: keeping the previous certificates"))
    });
}

/// `[platform.control]` without mutual TLS, or with a broken file, is a
/// config error naming the key.
#[test]
fn issue13_the_control_port_needs_its_certificates_in_the_config() {
    let ca = TestCa::new();
    let (cert, key, _) = ca.leaf("control", &["localhost"]);
    let (_, other_key, _) = ca.leaf("other", &["localhost"]);
    let roots = ca.root_file();
    let source = tempfile::tempdir().expect("tempdir");
    let check = |control: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("platform.toml");
        std::fs::write(
            &file,
            format!(
                "[platform]\nlisten = \"127.0.0.1:0\"\n[platform.control]\n{control}\n[apps.x]\nsource = \"{}\"\ndomains = [\"x.test\"]\n",
                source.path().display()
            ),
        )
        .expect("write");
        let (code, out, err) = bext_command(&["check", "--config", file.to_str().expect("utf8")]);
        (code, format!("{out}{err}"))
    };
    let (code, text) = check(&format!(
        "listen = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"",
        cert.display(),
        key.display()
    ));
    assert_ne!(code, 0);
    assert!(
        text.contains("platform.control.client_ca") && text.contains("mutual TLS"),
        "{text}"
    );
    let (code, text) = check(&format!(
        "listen = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"",
        cert.display(),
        other_key.display(),
        roots.display()
    ));
    assert_ne!(code, 0);
    assert!(
        text.contains("platform.control.key") && text.contains("is not the key"),
        "{text}"
    );
    let (code, text) = check(&format!(
        "listen = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"",
        cert.display(),
        key.display(),
        key.display()
    ));
    assert_ne!(code, 0);
    assert!(
        text.contains("platform.control.client_ca") && text.contains("no certificate"),
        "{text}"
    );
    // A leaf is no CA; an intermediate of the server's own chain would
    // admit whatever it signs.
    let (client, _) = ca.client("someone", "someone");
    let (code, text) = check(&format!(
        "listen = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"",
        cert.display(),
        key.display(),
        client.display()
    ));
    assert_ne!(code, 0);
    assert!(
        text.contains("platform.control.client_ca") && text.contains("not a CA's"),
        "{text}"
    );
    let intermediate = ca.intermediate();
    let (via, via_key, _) = intermediate.leaf("via", &["localhost"]);
    let (code, text) = check(&format!(
        "listen = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"",
        via.display(),
        via_key.display(),
        intermediate.root_file().display()
    ));
    assert_ne!(code, 0);
    assert!(
        text.contains("platform.control.client_ca") && text.contains("intermediate CA"),
        "{text}"
    );
    // One private root signing both sides is fine.
    let (code, text) = check(&format!(
        "listen = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"",
        cert.display(),
        key.display(),
        roots.display()
    ));
    assert_eq!(code, 0, "{text}");
}
