//! Issue 13, acceptance 2: automatic certificates against a real ACME
//! server, Pebble (Debian package `pebble`), started here with its own
//! config, and `pebble-challtestsrv` as its DNS (every name resolves to
//! 127.0.0.1, where bext listens). Issuance by HTTP-01 and by
//! TLS-ALPN-01, renewal of a short-lived certificate, a failing ACME
//! server leaves the current certificate serving, and the account key
//! survives a restart. Renewal per the CA's renewal information (ARI),
//! which Debian's Pebble lacks, through a front that adds it.
//!
//! Pebble's validator connects to the ports its config names, so bext's
//! two listeners get ports picked free here first (bound, then released).

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::Value;

use crate::support::{Bext, Options, wait_for};

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port")
        .port()
}

/// Pebble and its DNS, killed (by PID) when dropped.
struct Pebble {
    dir: tempfile::TempDir,
    pebble: Option<Child>,
    dns: Child,
    listen: SocketAddr,
    management: SocketAddr,
    dns_addr: SocketAddr,
    /// The root of Pebble's own HTTPS certificate (bext's `acme_ca_root`).
    https_root: PathBuf,
    https_root_der: CertificateDer<'static>,
}

impl Pebble {
    /// Pebble validating against bext's ports, issuing certificates valid
    /// for `validity`.
    fn start(http_port: u16, tls_port: u16, validity: Duration) -> Pebble {
        let dir = tempfile::tempdir().expect("tempdir");
        // Pebble's HTTPS: a CA and a certificate for 127.0.0.1.
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pebble https test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(
            ca_params,
            rcgen::KeyPair::generate().expect("key"),
        )
        .expect("CA");
        let key = rcgen::KeyPair::generate().expect("key");
        let leaf =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("params")
                .signed_by(&key, &ca)
                .expect("leaf");
        let https_root = dir.path().join("root.pem");
        std::fs::write(&https_root, ca.pem()).expect("root");
        std::fs::write(dir.path().join("cert.pem"), leaf.pem()).expect("cert");
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).expect("key");
        let listen: SocketAddr = format!("127.0.0.1:{}", free_tcp_port())
            .parse()
            .expect("addr");
        let management: SocketAddr = format!("127.0.0.1:{}", free_tcp_port())
            .parse()
            .expect("addr");
        let dns_addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port())
            .parse()
            .expect("addr");
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": listen.to_string(),
                "managementListenAddress": management.to_string(),
                "certificate": dir.path().join("cert.pem"),
                "privateKey": dir.path().join("key.pem"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": validity.as_secs(),
            }
        });
        std::fs::write(dir.path().join("pebble.json"), config.to_string()).expect("config");
        let dns_management: SocketAddr = format!("127.0.0.1:{}", free_tcp_port())
            .parse()
            .expect("addr");
        let dns = Command::new("pebble-challtestsrv")
            .args(["-management", &dns_management.to_string()])
            .args(["-dns01", &dns_addr.to_string()])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble-challtestsrv (Debian package pebble)");
        // Up once its management port answers (it opens the DNS port
        // first).
        wait_for("pebble-challtestsrv", Duration::from_secs(20), || {
            std::net::TcpStream::connect(dns_management).ok()
        });
        let https_root_der = CertificateDer::from_pem_file(&https_root).expect("root");
        let mut pebble = Pebble {
            dir,
            pebble: None,
            dns,
            listen,
            management,
            dns_addr,
            https_root,
            https_root_der,
        };
        pebble.launch();
        pebble
    }

    /// Starts Pebble (again: a new CA and no accounts) and waits for its
    /// directory.
    fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("pebble.log")).expect("log");
        let child = Command::new("pebble")
            .arg("-config")
            .arg(self.dir.path().join("pebble.json"))
            .args(["-dnsserver", &self.dns_addr.to_string()])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("pebble (Debian package pebble)");
        self.pebble = Some(child);
        let client = self.client();
        let url = self.directory();
        wait_for("Pebble's directory", Duration::from_secs(20), || {
            let client = client.clone();
            let url = url.clone();
            block(async move { client.get(&url).send().await.ok() }).filter(|r| r.status() == 200)
        });
    }

    /// Ends Pebble (not its DNS).
    fn kill(&mut self) {
        if let Some(mut child) = self.pebble.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn directory(&self) -> String {
        format!("https://{}/dir", self.listen)
    }

    fn client(&self) -> reqwest::Client {
        crate::support::client_builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_der(self.https_root_der.as_ref()).expect("root"),
            )
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client")
    }

    /// The root Pebble issues under now.
    async fn issuing_root(&self) -> CertificateDer<'static> {
        let pem = self
            .client()
            .get(format!("https://{}/roots/0", self.management))
            .send()
            .await
            .expect("roots")
            .text()
            .await
            .expect("pem");
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("root pem")
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.kill();
        let _ = self.dns.kill();
        let _ = self.dns.wait();
    }
}

/// Runs `future` to completion on a runtime of its own (for `wait_for`'s
/// synchronous checks).
fn block<T: Send + 'static>(future: impl Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(future)
    })
    .join()
    .expect("thread")
}

/// The certificate bext presents for `name`, checked against `root`
/// (the handshake fails on any other).
async fn served(
    addr: SocketAddr,
    name: &str,
    root: &CertificateDer<'static>,
) -> CertificateDer<'static> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).expect("root");
    let mut config = rustls::ClientConfig::builder_with_provider(bext::listener::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(name.to_string()).expect("name"), tcp)
        .await
        .unwrap_or_else(|e| panic!("handshake for {name}: {e}"));
    tls.get_ref().1.peer_certificates().expect("certs")[0].clone()
}

struct Platform {
    dir: tempfile::TempDir,
    file: PathBuf,
    https: u16,
    http: u16,
}

impl Platform {
    /// A platform on these ports, with its file not written yet.
    fn new(https: u16, http: u16) -> Platform {
        let dir = tempfile::tempdir().expect("tempdir");
        Platform {
            file: dir.path().join("platform.toml"),
            dir,
            https,
            http,
        }
    }

    /// The file: one static app per domain, ACME from `pebble` with
    /// `challenges`.
    fn write(&self, pebble: &Pebble, challenges: &str, domains: &[&str]) {
        self.write_with(pebble, &pebble.directory(), challenges, domains);
    }

    /// [`write`](Self::write), with the ACME directory at `directory`
    /// (served under Pebble's HTTPS certificate).
    fn write_with(&self, pebble: &Pebble, directory: &str, challenges: &str, domains: &[&str]) {
        let mut text = format!(
            r#"
[platform]
listen = "127.0.0.1:{https}"
data_dir = "{data}"

[platform.tls]
http_listen = "127.0.0.1:{http}"
acme_email = "ops@example.com"
acme_directory = "{directory}"
acme_ca_root = "{root}"
acme_challenges = [{challenges}]
"#,
            https = self.https,
            http = self.http,
            data = self.data_dir().display(),
            root = pebble.https_root.display(),
        );
        for (i, domain) in domains.iter().enumerate() {
            text.push_str(&format!(
                "\n[apps.app{i}]\nsource = \"{}\"\ndomains = [\"{domain}\"]\n",
                crate::support::fixture("static").display()
            ));
        }
        std::fs::write(&self.file, text).expect("write");
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn start(&self) -> Bext {
        let bext = Bext::serve(
            &self.file,
            &Options {
                args: vec!["--listen".into(), format!("127.0.0.1:{}", self.https)],
                ..Options::default()
            },
        );
        assert_eq!(bext.addr.port(), self.https);
        bext
    }

    /// `data_dir/acme/SERVER`, Pebble's.
    fn store(&self, pebble: &Pebble) -> PathBuf {
        self.data_dir().join("acme").join(format!(
            "{}-dir",
            pebble.listen.to_string().replace(':', "_")
        ))
    }
}

/// The log line saying `domain`'s certificate was `what` ("issued",
/// "renewed"), the `nth` such line (from 1).
fn certificate_line(bext: &Bext, domain: &str, what: &str, nth: usize, timeout: Duration) -> Value {
    let prefix = format!("certificate {what} by ");
    let domain = domain.to_string();
    wait_for(
        &format!("certificate {what} for {domain} (#{nth})"),
        timeout,
        || {
            bext.logs()
                .into_iter()
                .filter(|v| {
                    v["domain"] == domain.as_str()
                        && v["message"]
                            .as_str()
                            .is_some_and(|m| m.starts_with(&prefix))
                })
                .nth(nth - 1)
        },
    )
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// HTTP-01 issuance; renewal of a short-lived certificate; Pebble gone at
/// renewal time (the current certificate keeps serving, status and the
/// log say why); Pebble back (a new CA that no longer knows the account:
/// its key is registered again) and the renewal goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue13_acme_http01_issues_renews_and_outlives_a_failing_server() {
    const DOMAIN: &str = "h1.example.com";
    // Renewal is due two thirds in: 30 s after issue.
    let validity = Duration::from_secs(45);
    let (https, http) = (free_tcp_port(), free_tcp_port());
    let mut pebble = Pebble::start(http, https, validity);
    let platform = Platform::new(https, http);
    platform.write(&pebble, "\"http-01\"", &[DOMAIN]);
    let bext = platform.start();
    let issued = certificate_line(&bext, DOMAIN, "issued", 1, Duration::from_secs(60));
    assert_eq!(issued["challenge"], "http-01", "{issued}");
    let root = pebble.issuing_root().await;
    let first = served(bext.addr, DOMAIN, &root).await;

    // Served over HTTPS, and its expiry is in the metrics and the status.
    let client = crate::support::client_builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_der(root.as_ref()).expect("root"))
        .resolve(DOMAIN, bext.addr)
        .build()
        .expect("client");
    let metrics = client
        .get(format!("https://{DOMAIN}:{https}/__bext/platform/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("bext_tls_cert_expiry_seconds{") && l.contains(DOMAIN)),
        "{metrics}"
    );
    let failing = |metrics: &str, value: &str| {
        metrics.lines().any(|l| {
            l.starts_with("bext_tls_acme_failing{") && l.contains(DOMAIN) && l.ends_with(value)
        })
    };
    assert!(failing(&metrics, " 0"), "{metrics}");
    let store = platform.store(&pebble);
    assert_eq!(mode(&store), 0o700);
    assert_eq!(mode(&store.join("account.json")), 0o600);
    assert_eq!(
        mode(&store.join("certs").join(format!("{DOMAIN}.pem"))),
        0o600
    );

    // Renewal of the short-lived certificate.
    certificate_line(&bext, DOMAIN, "renewed", 1, Duration::from_secs(60));
    let renewed = served(bext.addr, DOMAIN, &root).await;
    assert!(renewed != first, "the renewed certificate is served");

    // The ACME server goes away: the next renewal fails, and the current
    // certificate keeps serving.
    pebble.kill();
    let failed = wait_for("a failed renewal", Duration::from_secs(60), || {
        bext.logs().into_iter().find(|v| {
            v["domain"] == DOMAIN
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("certificate renewal failed"))
        })
    });
    assert!(
        failed["message"]
            .as_str()
            .is_some_and(|m| m.contains("the current certificate keeps serving")),
        "{failed}"
    );
    assert!(
        served(bext.addr, DOMAIN, &root).await == renewed,
        "the current certificate serves while the ACME server is down"
    );
    let (code, out, err) = crate::control::bextctl(
        &platform.data_dir().join("control.sock"),
        &["status", "--json"],
    );
    assert_eq!(code, 0, "{err}");
    let status: Value = serde_json::from_str(&out).expect("json");
    let certificate = &status["apps"][0]["certificates"][0];
    assert_eq!(certificate["domain"], DOMAIN, "{status}");
    assert_eq!(certificate["source"], "acme");
    assert!(certificate["not_after"].is_string(), "{status}");
    assert!(
        certificate["problem"].is_string(),
        "the failure shows: {status}"
    );
    let metrics = client
        .get(format!("https://{DOMAIN}:{https}/__bext/platform/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(failing(&metrics, " 1"), "{metrics}");

    // Back (a new Pebble: new CA, the account unknown): renewed again.
    pebble.launch();
    certificate_line(&bext, DOMAIN, "renewed", 2, Duration::from_secs(60));
    let new_root = pebble.issuing_root().await;
    let after = served(bext.addr, DOMAIN, &new_root).await;
    assert!(after != renewed);
    assert!(
        bext.logs().iter().any(|v| v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("ACME account registered again"))),
        "{}",
        bext.log_text()
    );
    drop(bext);
}

/// TLS-ALPN-01 issuance; a restart keeps the account (its file is the
/// same, no new account is made) and the certificate (not ordered again),
/// and a domain added then is ordered with the same account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue13_acme_tls_alpn01_issues_and_a_restart_keeps_the_account() {
    const FIRST: &str = "t1.example.com";
    const ADDED: &str = "t2.example.com";
    let (https, http) = (free_tcp_port(), free_tcp_port());
    let pebble = Pebble::start(http, https, Duration::from_secs(3600));
    let platform = Platform::new(https, http);
    platform.write(&pebble, "\"tls-alpn-01\"", &[FIRST]);
    let bext = platform.start();
    let issued = certificate_line(&bext, FIRST, "issued", 1, Duration::from_secs(60));
    assert_eq!(issued["challenge"], "tls-alpn-01", "{issued}");
    let root = pebble.issuing_root().await;
    let first = served(bext.addr, FIRST, &root).await;
    let store = platform.store(&pebble);
    let account = std::fs::read(store.join("account.json")).expect("account");
    // Kept on disk just after it is served (a restart before that would
    // order it again).
    let kept = store.join("certs").join(format!("{FIRST}.pem"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !kept.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never written",
            kept.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(bext);

    platform.write(&pebble, "\"tls-alpn-01\"", &[FIRST, ADDED]);
    let bext = platform.start();
    // From the first handshake on (not once a task has read the disk).
    assert!(
        served(bext.addr, FIRST, &root).await == first,
        "the kept certificate serves after the restart"
    );
    certificate_line(&bext, ADDED, "issued", 1, Duration::from_secs(60));
    served(bext.addr, ADDED, &root).await;
    let logs = bext.logs();
    assert!(
        !logs.iter().any(|v| v["domain"] == FIRST
            && v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("certificate issued"))),
        "the kept certificate is not ordered again"
    );
    assert!(
        !logs.iter().any(|v| v["message"] == "ACME account created"),
        "no second account"
    );
    assert_eq!(
        std::fs::read(store.join("account.json")).expect("account"),
        account,
        "the account file is the same"
    );
}

/// The status line of a plain-HTTP GET of `target` with `host`.
async fn plain_status(addr: SocketAddr, host: &str, target: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// `issuer = "internal"`: bext's own CA signs every domain at start, a
/// wildcard and `localhost` too, and each chain verifies against
/// `data_dir/internal-ca/root.crt`; a restart keeps the CA and the
/// certificates (served from the first handshake, not issued again). On
/// the plain port, a challenge token for a name no app has gets 404, one
/// for an app's name the usual redirect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue13_internal_issuer_signs_every_domain_and_keeps_them() {
    let (https, http) = (free_tcp_port(), free_tcp_port());
    let platform = Platform::new(https, http);
    let text = format!(
        r#"
[platform]
listen = "127.0.0.1:{https}"
data_dir = "{data}"

[platform.tls]
http_listen = "127.0.0.1:{http}"
issuer = "internal"

[apps.a]
source = "{source}"
domains = ["a.test", "*.w.test"]

[apps.local]
source = "{source}"
domains = ["localhost"]
"#,
        data = platform.data_dir().display(),
        source = crate::support::fixture("static").display(),
    );
    std::fs::write(&platform.file, text).expect("write");
    let bext = platform.start();
    for domain in ["a.test", "*.w.test", "localhost"] {
        let line = certificate_line(&bext, domain, "issued", 1, Duration::from_secs(30));
        assert!(
            line["message"]
                .as_str()
                .is_some_and(|m| m.contains("the internal CA")),
            "{line}"
        );
    }
    let ca = platform.data_dir().join("internal-ca");
    let root_pem = std::fs::read(ca.join("root.crt")).expect("root.crt");
    let root = CertificateDer::from_pem_slice(&root_pem).expect("root");
    assert_eq!(
        mode(&ca.join("ca.pem")),
        0o600,
        "the CA key is bext's alone"
    );
    assert_eq!(mode(&ca.join("root.crt")), 0o644, "the root is public");
    let mut leaves = Vec::new();
    for name in ["a.test", "deep.w.test", "localhost"] {
        leaves.push(served(bext.addr, name, &root).await);
    }
    assert!(
        leaves[0] != leaves[1],
        "each domain has its own certificate"
    );
    let plain: SocketAddr = format!("127.0.0.1:{http}").parse().expect("addr");
    let challenge = "/.well-known/acme-challenge/not-ours";
    assert!(
        plain_status(plain, "unclaimed.test", challenge)
            .await
            .contains(" 404 "),
        "an unknown token for a name no app has"
    );
    assert!(
        plain_status(plain, "a.test", challenge)
            .await
            .contains(" 308 "),
        "an unknown token for an app's name is redirected"
    );
    // (Each is kept on disk before its line is logged; checked here too,
    // since a restart before that would rightly issue another.)
    let certs = platform.data_dir().join("acme/internal/certs");
    for file in ["a.test.pem", "_.w.test.pem", "localhost.pem"] {
        crate::support::wait_for(file, Duration::from_secs(10), || {
            certs.join(file).exists().then_some(())
        });
    }
    drop(bext);

    let bext = platform.start();
    for (name, leaf) in ["a.test", "deep.w.test", "localhost"].iter().zip(&leaves) {
        assert!(
            served(bext.addr, name, &root).await == *leaf,
            "{name}: the kept certificate serves after the restart"
        );
    }
    assert_eq!(
        std::fs::read(ca.join("root.crt")).expect("root.crt"),
        root_pem,
        "the same CA"
    );
    let logs = bext.logs();
    assert!(
        !logs.iter().any(|v| v["message"].as_str().is_some_and(|m| m
            .starts_with("certificate issued")
            || m.contains("made a new internal CA"))),
        "nothing made again"
    );
}

/// Single-app mode: `[server.tls]` in `bext.config.toml` with domains and
/// no `cert`/`key` gets each domain's certificate from the ACME server
/// (HTTP-01 on `http_listen`), kept under `[server] data_dir` (0600).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue13_acme_single_app_gets_its_certificate() {
    const DOMAIN: &str = "single.example.com";
    let (https, http) = (free_tcp_port(), free_tcp_port());
    let pebble = Pebble::start(http, https, Duration::from_secs(3600));
    let app = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        crate::support::fixture("static").join("index.html"),
        app.path().join("index.html"),
    )
    .expect("copy");
    // Not inside the app's directory: a static site would serve it.
    let data = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        app.path().join("bext.config.toml"),
        format!(
            r#"
[server]
data_dir = "{data}"

[server.tls]
domains = ["{DOMAIN}"]
http_listen = "127.0.0.1:{http}"
acme_email = "ops@example.com"
acme_directory = "{directory}"
acme_ca_root = "{root}"
acme_challenges = ["http-01"]
"#,
            data = data.path().display(),
            directory = pebble.directory(),
            root = pebble.https_root.display(),
        ),
    )
    .expect("config");
    let bext = crate::support::Bext::run(app.path(), &["--listen", &format!("127.0.0.1:{https}")]);
    let issued = certificate_line(&bext, DOMAIN, "issued", 1, Duration::from_secs(60));
    assert_eq!(issued["challenge"], "http-01", "{issued}");
    let root = pebble.issuing_root().await;
    served(bext.addr, DOMAIN, &root).await;
    let kept = data
        .path()
        .join("acme")
        .join(format!(
            "{}-dir",
            pebble.listen.to_string().replace(':', "_")
        ))
        .join("certs")
        .join(format!("{DOMAIN}.pem"));
    assert_eq!(mode(&kept), 0o600, "{}", kept.display());
}

/// What [`AriFront`] saw and answers.
#[derive(Default)]
struct AriState {
    /// The certificate identifiers asked about, in order.
    asked: Vec<String>,
    /// The first certificate asked about: the CA wants it renewed now.
    /// Every other gets a window far ahead.
    first: Option<String>,
}

/// Pebble as a CA with renewal information (ARI, RFC 9773): Debian's
/// Pebble (2.4) has none, so this front serves Pebble's directory with a
/// `renewalInfo` URL added, and answers that URL as a CA would. Every
/// other URL of the directory is Pebble's own: orders, challenges and
/// certificates are Pebble's. Served under Pebble's HTTPS certificate, on
/// a thread and runtime of its own (the test's checks block theirs).
struct AriFront {
    addr: SocketAddr,
    state: Arc<std::sync::Mutex<AriState>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AriFront {
    async fn start(pebble: &Pebble) -> AriFront {
        use hyper::service::service_fn;
        use hyper_util::rt::TokioIo;

        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let mut directory: Value = pebble
            .client()
            .get(pebble.directory())
            .send()
            .await
            .expect("Pebble's directory")
            .json()
            .await
            .expect("json");
        assert!(
            directory.get("renewalInfo").is_none(),
            "this Pebble has renewal information of its own: test it directly"
        );
        directory["renewalInfo"] = Value::from(format!("https://{addr}/renewal-info"));
        let directory = bytes::Bytes::from(directory.to_string());
        let certs = CertificateDer::pem_file_iter(pebble.dir.path().join("cert.pem"))
            .expect("cert")
            .collect::<Result<Vec<_>, _>>()
            .expect("cert");
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_file(pebble.dir.path().join("key.pem"))
                .expect("key");
        let config = rustls::ServerConfig::builder_with_provider(bext::listener::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("certificate");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let state = Arc::new(std::sync::Mutex::new(AriState::default()));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = Arc::clone(&state);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let stream = tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => match accepted {
                            Ok((stream, _)) => stream,
                            // (Out of descriptors, say: not a busy loop.)
                            Err(_) => {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        },
                    };
                    let (acceptor, directory, state) =
                        (acceptor.clone(), directory.clone(), Arc::clone(&shared));
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(stream).await else {
                            return;
                        };
                        let service =
                            service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                                let answer = AriFront::answer(req.uri().path(), &directory, &state);
                                async move { Ok::<_, std::convert::Infallible>(answer) }
                            });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    });
                }
            });
        });
        AriFront {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn answer(
        path: &str,
        directory: &bytes::Bytes,
        state: &std::sync::Mutex<AriState>,
    ) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
        let response = hyper::Response::builder().header("content-type", "application/json");
        if path == "/dir" {
            return response
                .body(http_body_util::Full::new(directory.clone()))
                .expect("response");
        }
        let Some(id) = path.strip_prefix("/renewal-info/") else {
            return response
                .status(404)
                .body(http_body_util::Full::default())
                .expect("response");
        };
        let now = std::time::SystemTime::now();
        let window = {
            let mut state = state.lock().expect("state");
            state.asked.push(id.to_string());
            let first = state.first.get_or_insert_with(|| id.to_string());
            if first == id {
                // Renew now (a window already open, as after a revocation).
                (now - Duration::from_secs(60), now - Duration::from_secs(30))
            } else {
                (
                    now + Duration::from_secs(30 * 86_400),
                    now + Duration::from_secs(31 * 86_400),
                )
            }
        };
        let body = serde_json::json!({
            "suggestedWindow": {
                "start": humantime::format_rfc3339_seconds(window.0).to_string(),
                "end": humantime::format_rfc3339_seconds(window.1).to_string(),
            },
            "explanationURL": "https://ca.example/why",
        });
        response
            .header("retry-after", "3600")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .expect("response")
    }

    fn directory(&self) -> String {
        format!("https://{}/dir", self.addr)
    }

    fn asked(&self) -> Vec<String> {
        self.state.lock().expect("state").asked.clone()
    }
}

impl Drop for AriFront {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The ARI identifier of `certificate`: base64url of its authority key
/// identifier, a dot, base64url of its serial number's DER bytes (RFC
/// 9773 §4.1). Worked out here, not with the ACME client bext uses, so
/// that an encoding wrong in both would not go unseen.
fn ari_id(certificate: &CertificateDer<'static>) -> String {
    use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(certificate.as_ref()).expect("certificate");
    let key_id = parsed
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .expect("an authority key identifier");
    format!(
        "{}.{}",
        base64url(&key_id),
        base64url(parsed.tbs_certificate.raw_serial())
    )
}

/// Base64url without padding (RFC 4648 §5).
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = byte(0) << 16 | byte(1) << 8 | byte(2);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

#[test]
fn base64url_matches_rfc_4648() {
    // RFC 4648 §10's vectors, unpadded; and both URL-safe letters.
    for (input, expected) in [
        ("", ""),
        ("f", "Zg"),
        ("fo", "Zm8"),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg"),
        ("fooba", "Zm9vYmE"),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64url(input.as_bytes()), expected);
    }
    assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
}

/// A CA with renewal information: bext asks it about each certificate it
/// holds, renews when the CA's window says so (here at once, long before
/// two thirds of the lifetime), and asks again about the new certificate,
/// whose window is a month away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue13_acme_renews_when_the_cas_renewal_information_says_so() {
    const DOMAIN: &str = "ari.example.com";
    // By its lifetime alone, renewal is due 160 s after issue; a tenth of
    // the lifetime (24 s) must pass between two orders, time enough to
    // see the first certificate served.
    let validity = Duration::from_secs(240);
    let (https, http) = (free_tcp_port(), free_tcp_port());
    let pebble = Pebble::start(http, https, validity);
    let front = AriFront::start(&pebble).await;
    let platform = Platform::new(https, http);
    platform.write_with(&pebble, &front.directory(), "\"http-01\"", &[DOMAIN]);
    let bext = platform.start();
    let issued = certificate_line(&bext, DOMAIN, "issued", 1, Duration::from_secs(60));
    let root = pebble.issuing_root().await;
    let first = served(bext.addr, DOMAIN, &root).await;

    // Asked about the certificate, told to renew now: renewed.
    let renewed = certificate_line(&bext, DOMAIN, "renewed", 1, Duration::from_secs(120));
    assert_eq!(
        front.asked().first(),
        Some(&ari_id(&first)),
        "bext asks about the certificate it serves"
    );
    let at = |line: &Value| {
        humantime::parse_rfc3339(line["timestamp"].as_str().expect("timestamp")).expect("timestamp")
    };
    let after = at(&renewed).duration_since(at(&issued)).expect("later");
    assert!(
        after < Duration::from_secs(120),
        "renewed {after:?} after issue: per the CA's window, not two thirds into the lifetime"
    );
    let suggested = bext
        .logs()
        .into_iter()
        .find(|v| {
            v["domain"] == DOMAIN
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("the CA suggests renewing between"))
        })
        .unwrap_or_else(|| panic!("the CA's window is logged: {}", bext.log_text()));
    assert_eq!(
        suggested["explanation"], "https://ca.example/why",
        "{suggested}"
    );
    let second = served(bext.addr, DOMAIN, &root).await;
    assert!(second != first, "the renewed certificate is served");

    // The new certificate is asked about too (its window is a month
    // away, and it is not renewed).
    let second_id = ari_id(&second);
    wait_for(
        "bext to ask about the new certificate",
        Duration::from_secs(30),
        || front.asked().contains(&second_id).then_some(()),
    );
    assert!(
        !bext.logs().iter().any(|v| v["message"]
            .as_str()
            .is_some_and(|m| m.contains("no renewal information"))),
        "{}",
        bext.log_text()
    );
    drop(bext);
}
