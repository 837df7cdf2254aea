//! TLS termination: rustls on aws-lc-rs (see `bench/tls-provider.sh`),
//! TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`, session tickets, no 0-RTT
//! (early data can be replayed).
//!
//! Certificates are chosen by SNI through the same domain trie the router
//! uses ([`RouteTable`]: exact names before wildcards); a client that
//! sends no SNI (or a name no app has) gets the default certificate. The
//! table is swapped whole (a reload), so a handshake sees the old
//! certificates or the new ones, never a mix.
//!
//! An app's certificate comes from its own files or from ACME
//! ([`super::acme`], one certificate per domain, installed here as it is
//! issued). A ClientHello that offers only `acme-tls/1` gets the
//! TLS-ALPN-01 challenge certificate for its name, if one is pending.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::router::RouteTable;

/// The crypto provider bext's TLS uses, server and test clients alike.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A certificate chain and its private key, from PEM files: `cert` holds
/// the leaf first, then its chain. Refused: unreadable or empty files, a
/// key that is not the certificate's.
pub fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let read = |path: &Path| {
        crate::config::read_small_file(path).map_err(|e| format!("{}: {e}", path.display()))
    };
    let cert_pem = read(cert)?;
    let key_pem = if key == cert {
        cert_pem.clone()
    } else {
        read(key)?
    };
    parse_pair(
        cert_pem.as_bytes(),
        key_pem.as_bytes(),
        &cert.display().to_string(),
        &key.display().to_string(),
    )
}

/// The pair in PEM `cert_pem` (the chain, leaf first) and `key_pem`, if
/// the key is the certificate's; errors name `cert_name` and `key_name`.
pub fn parse_pair(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_name: &str,
    key_name: &str,
) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{cert_name}: not a PEM certificate chain: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{cert_name}: no certificate in it"));
    }
    let private = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("{key_name}: not a PEM private key: {e}"))?;
    let signing = provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| format!("{key_name}: {e}"))?;
    let pair = CertifiedKey::new(chain, signing);
    pair.keys_match()
        .map_err(|_| format!("{key_name} is not the key of the certificate in {cert_name}"))?;
    Ok(pair)
}

/// Whether `pair`'s certificate is valid for `domain` (a name, or a
/// `*.example.com` pattern: then the certificate must cover every name
/// under it, as a wildcard certificate does).
pub fn covers(pair: &CertifiedKey, domain: &str) -> bool {
    let name = match domain.strip_prefix("*.") {
        // A label no certificate names on its own: only a wildcard covers it.
        Some(parent) => format!("bext-wildcard-check.{parent}"),
        None => domain.to_string(),
    };
    let Ok(name) = ServerName::try_from(name) else {
        return false;
    };
    pair.end_entity_cert()
        .ok()
        .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
        .is_some_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
}

/// Where one app's certificate comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct CertSource {
    pub app: String,
    /// The app's domains (`*.` patterns included): the certificate must
    /// cover each.
    pub domains: Vec<String>,
    pub origin: Origin,
    /// Its certificate answers clients without SNI.
    pub default: bool,
}

/// Files the operator keeps, or certificates bext gets itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// PEM files (the chain after the leaf in `cert`), watched.
    Files { cert: PathBuf, key: PathBuf },
    /// One certificate per domain, from ACME; a domain has none until it
    /// is issued, and its handshakes fail meanwhile (they never get another
    /// app's certificate).
    Acme,
}

impl CertSource {
    fn files(&self) -> Option<(&Path, &Path)> {
        match &self.origin {
            Origin::Files { cert, key } => Some((cert, key)),
            Origin::Acme => None,
        }
    }
}

/// The ALPN protocol of TLS-ALPN-01 validation (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Answers to pending ACME challenges: HTTP-01 key authorizations by
/// token, TLS-ALPN-01 certificates by domain. Holds only what bext's own
/// orders put there, and each order takes its entries out when it ends.
#[derive(Debug, Default)]
pub struct Challenges {
    http: std::sync::Mutex<std::collections::HashMap<String, String>>,
    alpn: std::sync::Mutex<std::collections::HashMap<String, Arc<CertifiedKey>>>,
}

impl Challenges {
    /// The key authorization for an HTTP-01 `token`.
    pub fn http01(&self, token: &str) -> Option<String> {
        self.http.lock().ok()?.get(token).cloned()
    }

    pub(super) fn set_http01(&self, token: &str, key_authorization: Option<String>) {
        if let Ok(mut map) = self.http.lock() {
            match key_authorization {
                Some(value) => map.insert(token.to_string(), value),
                None => map.remove(token),
            };
        }
    }

    fn alpn01(&self, domain: &str) -> Option<Arc<CertifiedKey>> {
        self.alpn.lock().ok()?.get(domain).cloned()
    }

    pub(super) fn set_alpn01(&self, domain: &str, pair: Arc<CertifiedKey>) {
        if let Ok(mut map) = self.alpn.lock() {
            map.insert(domain.to_string(), pair);
        }
    }

    /// Takes `pair` back, unless another order put its own there since.
    pub(super) fn clear_alpn01(&self, domain: &str, pair: &Arc<CertifiedKey>) {
        if let Ok(mut map) = self.alpn.lock()
            && map.get(domain).is_some_and(|p| Arc::ptr_eq(p, pair))
        {
            map.remove(domain);
        }
    }
}

/// What identifies a file's content without reading it: a replaced or
/// rewritten file has another.
/// (The change time too: a copy that keeps the modification time and the
/// size, as `cp -p` makes, still changes it.)
pub type Stamp = Option<(u64, u64, i64, i64, i64, i64, u64)>;

pub fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| {
        (
            m.dev(),
            m.ino(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
            m.size(),
        )
    })
}

/// An app's certificate in use, and the stamps of the files it came from.
#[derive(Debug)]
struct InUse {
    pair: Arc<CertifiedKey>,
    stamps: (Stamp, Stamp),
}

/// When `pair`'s certificate expires (its notAfter), Unix seconds.
pub fn not_after(pair: &CertifiedKey) -> Option<i64> {
    validity(pair).map(|(_, end)| end)
}

/// `pair`'s certificate's notBefore and notAfter, Unix seconds.
pub fn validity(pair: &CertifiedKey) -> Option<(i64, i64)> {
    let der = pair.end_entity_cert().ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let validity = cert.validity();
    Some((
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

/// "expired on DATE" when `pair`'s certificate has expired.
pub fn expired(pair: &CertifiedKey) -> Option<String> {
    let end = not_after(pair)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    let end_secs = u64::try_from(end).unwrap_or(0);
    (end_secs <= now).then(|| {
        let at = std::time::UNIX_EPOCH + Duration::from_secs(end_secs);
        format!("expired on {}", humantime::format_rfc3339_seconds(at))
    })
}

/// Loads the pair in `cert` and `key` and checks it covers `domains`.
fn load_source(domains: &[String], cert: &Path, key: &Path) -> Result<InUse, String> {
    let stamps = (stamp(cert), stamp(key));
    let pair = load_pair(cert, key)?;
    if let Some(domain) = domains.iter().find(|d| !covers(&pair, d)) {
        return Err(format!(
            "the certificate in {} does not cover `{domain}`",
            cert.display()
        ));
    }
    Ok(InUse {
        pair: Arc::new(pair),
        stamps,
    })
}

/// Certificates by server name, swapped whole; each app's is the last
/// good pair its files held, or each of its domains' last ACME issue.
#[derive(Debug)]
pub struct Certificates {
    table: ArcSwap<Published>,
    state: std::sync::Mutex<State>,
    /// Told when a reload brings other sources (the watcher follows).
    sources_changed: tokio::sync::Notify,
    challenges: Arc<Challenges>,
}

/// What handshakes read: certificates by name, and the ACME domains that
/// have none yet (refused rather than given another name's certificate).
#[derive(Debug)]
struct Published {
    routes: RouteTable<CertifiedKey>,
    waiting: std::collections::HashSet<String>,
}

impl Published {
    fn empty() -> Self {
        Published {
            routes: RouteTable::new([], None),
            waiting: std::collections::HashSet::new(),
        }
    }

    fn resolve(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = name else {
            return self.routes.route("").cloned();
        };
        if !self.waiting.is_empty() {
            let waiting = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                self.waiting.contains(&name.to_ascii_lowercase())
            } else {
                self.waiting.contains(name)
            };
            if waiting {
                return None;
            }
        }
        self.routes.route(name).cloned()
    }
}

#[derive(Debug, Default)]
struct State {
    sources: Vec<CertSource>,
    /// File pairs by app.
    in_use: BTreeMap<String, InUse>,
    /// ACME pairs by domain.
    issued: BTreeMap<String, Arc<CertifiedKey>>,
    /// Why a domain's ACME certificate is not (or not freshly) there.
    problems: BTreeMap<String, String>,
}

/// One certificate in use, for `status` and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct CertInfo {
    pub app: String,
    /// The app's domain it serves (for files: the app's first domain).
    pub domain: String,
    pub acme: bool,
    /// notAfter, Unix seconds; `None` while an ACME domain has none.
    pub not_after: Option<i64>,
    /// The last ACME failure, while it lasts.
    pub problem: Option<String>,
}

impl Certificates {
    /// Every source's pair, or the first error.
    pub fn load(sources: Vec<CertSource>) -> Result<Self, String> {
        let certificates = Certificates {
            table: ArcSwap::from_pointee(Published::empty()),
            state: std::sync::Mutex::new(State::default()),
            sources_changed: tokio::sync::Notify::new(),
            challenges: Arc::new(Challenges::default()),
        };
        certificates.set_sources(sources)?;
        Ok(certificates)
    }

    /// The pending ACME challenges the listeners answer.
    pub fn challenges(&self) -> &Arc<Challenges> {
        &self.challenges
    }

    /// The domains whose certificates come from ACME, with their apps.
    pub fn acme_domains(&self) -> Vec<String> {
        let Ok(state) = self.state.lock() else {
            return Vec::new();
        };
        let mut domains: Vec<String> = state
            .sources
            .iter()
            .filter(|s| s.origin == Origin::Acme)
            .flat_map(|s| s.domains.iter().cloned())
            .collect();
        domains.sort();
        domains.dedup();
        domains
    }

    /// Serves `pair` for `domain` from the next handshake on (an ACME
    /// issue or renewal).
    pub fn install(&self, domain: &str, pair: Arc<CertifiedKey>) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.issued.insert(domain.to_string(), pair);
        state.problems.remove(domain);
        self.publish(&state);
    }

    /// The ACME certificate `domain` has now, if any.
    pub fn issued(&self, domain: &str) -> Option<Arc<CertifiedKey>> {
        self.state.lock().ok()?.issued.get(domain).cloned()
    }

    /// Whether `host` is one of the apps' domains (or under one of their
    /// wildcards).
    pub fn claims(&self, host: &str) -> bool {
        let Ok(state) = self.state.lock() else {
            return false;
        };
        state.sources.iter().flat_map(|s| &s.domains).any(|d| {
            d == host
                || d.strip_prefix("*.").is_some_and(|suffix| {
                    host.strip_suffix(suffix)
                        .is_some_and(|head| head.len() > 1 && head.ends_with('.'))
                })
        })
    }

    /// Records (or clears) why `domain`'s ACME certificate could not be
    /// had, for `status`.
    pub fn set_problem(&self, domain: &str, problem: Option<String>) {
        if let Ok(mut state) = self.state.lock() {
            match problem {
                Some(p) => state.problems.insert(domain.to_string(), p),
                None => state.problems.remove(domain),
            };
        }
    }

    /// Every certificate in use or wanted, by app and domain.
    pub fn info(&self) -> Vec<CertInfo> {
        let Ok(state) = self.state.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for source in &state.sources {
            match &source.origin {
                Origin::Files { .. } => out.push(CertInfo {
                    app: source.app.clone(),
                    domain: source.domains.first().cloned().unwrap_or_default(),
                    acme: false,
                    not_after: state
                        .in_use
                        .get(&source.app)
                        .and_then(|u| not_after(&u.pair)),
                    problem: None,
                }),
                Origin::Acme => out.extend(source.domains.iter().map(|d| CertInfo {
                    app: source.app.clone(),
                    domain: d.clone(),
                    acme: true,
                    not_after: state.issued.get(d).and_then(|p| not_after(p)),
                    problem: state.problems.get(d).cloned(),
                })),
            }
        }
        out
    }

    /// Takes over `sources` (a reload): every new or changed source must
    /// load, or nothing changes; one whose files are the same and broken
    /// right now (a tenant's, or a renewal half done) keeps the pair in
    /// use, with a warning, rather than holding up every reload.
    pub fn set_sources(&self, sources: Vec<CertSource>) -> Result<(), String> {
        if sources.is_empty() {
            return Err("no app has a certificate".to_string());
        }
        let mut state = self
            .state
            .lock()
            .map_err(|_| "the certificate table is poisoned")?;
        let mut in_use = BTreeMap::new();
        for source in &sources {
            let Some((cert, key)) = source.files() else {
                continue;
            };
            match load_source(&source.domains, cert, key) {
                Ok(loaded) => {
                    // Served all the same (refusing would stop the listener
                    // for every app), but said.
                    if let Some(when) = expired(&loaded.pair) {
                        tracing::warn!(
                            "app '{}': the certificate in {} {when}: renew it",
                            source.app,
                            cert.display()
                        );
                    }
                    in_use.insert(source.app.clone(), loaded);
                }
                Err(e) => {
                    let same = state.sources.iter().any(|s| s == source);
                    match state.in_use.get(&source.app) {
                        Some(used) if same => {
                            tracing::warn!(
                                "app '{}': {e}; the certificate in use stays",
                                source.app
                            );
                            in_use.insert(
                                source.app.clone(),
                                InUse {
                                    pair: Arc::clone(&used.pair),
                                    stamps: used.stamps,
                                },
                            );
                        }
                        _ => return Err(format!("app '{}': {e}", source.app)),
                    }
                }
            }
        }
        state.sources = sources;
        state.in_use = in_use;
        // Issued certificates of domains no longer managed go.
        let managed: std::collections::BTreeSet<String> = state
            .sources
            .iter()
            .filter(|s| s.origin == Origin::Acme)
            .flat_map(|s| s.domains.iter().cloned())
            .collect();
        let kept: BTreeMap<String, Arc<CertifiedKey>> = state
            .issued
            .iter()
            .filter(|(d, _)| managed.contains(*d))
            .map(|(d, p)| (d.clone(), Arc::clone(p)))
            .collect();
        state.issued = kept;
        state.problems.retain(|d, _| managed.contains(d));
        self.publish(&state);
        self.sources_changed.notify_one();
        Ok(())
    }

    /// Reads the files again (they changed on disk): an app whose files
    /// now hold a good pair that covers its domains gets it; one whose
    /// files are broken (half-written, a key for another certificate)
    /// keeps the pair in use. Returns what changed and what was refused,
    /// one line each, for the log; files that did not change are not read.
    pub fn refresh(&self) -> (Vec<String>, Vec<String>) {
        let (mut changed, mut refused) = (Vec::new(), Vec::new());
        let Ok(mut guard) = self.state.lock() else {
            return (
                changed,
                vec!["the certificate table is poisoned".to_string()],
            );
        };
        let state = &mut *guard;
        let in_use = &mut state.in_use;
        for source in &state.sources {
            let Some((cert, key)) = source.files() else {
                continue;
            };
            let now = (stamp(cert), stamp(key));
            if in_use.get(&source.app).is_some_and(|u| u.stamps == now) {
                continue;
            }
            let loaded = load_source(&source.domains, cert, key).and_then(|loaded| {
                match expired(&loaded.pair) {
                    // A replacement older than it should be (a backup put
                    // back) does not displace a pair in use.
                    Some(when) if in_use.contains_key(&source.app) => {
                        Err(format!("the certificate in {} {when}", cert.display()))
                    }
                    _ => Ok(loaded),
                }
            });
            match loaded {
                Ok(loaded) => {
                    changed.push(format!(
                        "app '{}': new certificate from {}",
                        source.app,
                        cert.display()
                    ));
                    in_use.insert(source.app.clone(), loaded);
                }
                Err(e) => {
                    refused.push(format!(
                        "app '{}': {e}; the certificate in use stays",
                        source.app
                    ));
                    // Not read again until the files change again.
                    if let Some(used) = in_use.get_mut(&source.app) {
                        used.stamps = now;
                    }
                }
            }
        }
        if !changed.is_empty() {
            self.publish(&guard);
        }
        (changed, refused)
    }

    /// The directories holding the certificate files (watched: a file
    /// replaced by a rename is seen there, not on the old file).
    pub fn directories(&self) -> Vec<PathBuf> {
        let Ok(state) = self.state.lock() else {
            return Vec::new();
        };
        let mut dirs: Vec<PathBuf> = state
            .sources
            .iter()
            .filter_map(CertSource::files)
            .flat_map(|(cert, key)| [cert, key])
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }

    fn publish(&self, state: &State) {
        let mut routes = Vec::new();
        let mut waiting = std::collections::HashSet::new();
        let mut default = None;
        for source in &state.sources {
            let pairs: Vec<(String, Arc<CertifiedKey>)> = match source.origin {
                Origin::Files { .. } => match state.in_use.get(&source.app) {
                    Some(used) => source
                        .domains
                        .iter()
                        .map(|d| (d.clone(), Arc::clone(&used.pair)))
                        .collect(),
                    None => continue,
                },
                Origin::Acme => source
                    .domains
                    .iter()
                    .filter_map(|d| match state.issued.get(d) {
                        Some(p) => Some((d.clone(), Arc::clone(p))),
                        None => {
                            waiting.insert(d.clone());
                            None
                        }
                    })
                    .collect(),
            };
            if let Some((_, first)) = pairs.first()
                && (default.is_none() || source.default)
            {
                default = Some(Arc::clone(first));
            }
            routes.extend(pairs);
        }
        self.table.store(Arc::new(Published {
            routes: RouteTable::new(routes, default),
            waiting,
        }));
    }
}

/// Watches `certificates`' directories and refreshes them when a file
/// there changes (within [`SETTLE`] of the last change: a copy in several
/// writes is read once it is whole, or refused and read again at its next
/// change). Runs until the task is aborted.
pub fn watch(certificates: Arc<Certificates>) -> notify::Result<tokio::task::JoinHandle<()>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            // Full: a refresh is already due.
            let _ = tx.try_send(());
        }
    })?;
    let mut watched = Vec::new();
    sync_watches(&certificates, &mut watcher, &mut watched);
    // A backstop for what inotify cannot see (a symlinked directory
    // swapped, a watch that could not be set): the files' stamps, now and
    // then.
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                event = rx.recv() => {
                    if event.is_none() {
                        return;
                    }
                    // Let a burst of writes settle, but not for long: a
                    // busy directory must not hold refreshes off.
                    let until = tokio::time::Instant::now() + SETTLE * 5;
                    loop {
                        let next = until.min(tokio::time::Instant::now() + SETTLE);
                        match tokio::time::timeout_at(next, rx.recv()).await {
                            Ok(Some(())) if tokio::time::Instant::now() < until => {}
                            Ok(None) => return,
                            _ => break,
                        }
                    }
                }
                _ = poll.tick() => {}
                // A reload named other files.
                () = certificates.sources_changed.notified() => {
                    sync_watches(&certificates, &mut watcher, &mut watched);
                    continue;
                }
            }
            // Reading and parsing files is blocking work.
            let reading = Arc::clone(&certificates);
            let Ok((changed, refused)) =
                tokio::task::spawn_blocking(move || reading.refresh()).await
            else {
                continue;
            };
            for line in changed {
                tracing::info!("{line}");
            }
            for line in refused {
                tracing::error!("{line}");
            }
        }
    }))
}

/// Watches the directories `certificates` names now, and no others.
fn sync_watches(
    certificates: &Certificates,
    watcher: &mut notify::RecommendedWatcher,
    watched: &mut Vec<PathBuf>,
) {
    use notify::Watcher;
    let wanted = certificates.directories();
    for dir in watched.iter().filter(|d| !wanted.contains(d)) {
        let _ = watcher.unwatch(dir);
    }
    watched.retain(|d| wanted.contains(d));
    for dir in &wanted {
        if watched.contains(dir) {
            continue;
        }
        match watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            Ok(()) => watched.push(dir.clone()),
            // Tried again at the next reload; the poll covers it meanwhile.
            Err(e) => tracing::warn!(dir = %dir.display(), "cannot watch certificate files: {e}"),
        }
    }
}

/// Quiet time after a change to certificate files before they are read
/// (at most five times this after the first change).
pub const SETTLE: Duration = Duration::from_millis(200);
/// How often the files' stamps are looked at without an event.
pub const POLL: Duration = Duration::from_secs(10);

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // An ACME validator (it offers `acme-tls/1` alone): the challenge
        // certificate, and nothing else.
        if let Some(mut offered) = hello.alpn()
            && offered.next() == Some(ACME_TLS_ALPN)
            && offered.next().is_none()
        {
            return hello
                .server_name()
                .and_then(|name| self.challenges.alpn01(name));
        }
        self.table.load().resolve(hello.server_name())
    }
}

/// The server side of every TLS connection: TLS 1.2 and 1.3, ALPN `h2`
/// then `http/1.1`, stateless session tickets, certificates from `certs`.
pub fn server_config(certs: Arc<Certificates>) -> Result<Arc<ServerConfig>, String> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    // `acme-tls/1` last: only a client that offers nothing else gets it
    // (an ACME validator), and its connection is closed after the
    // handshake.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    // The server's order of cipher suites (AEAD, strongest first), not the
    // client's: as nginx's `ssl_prefer_server_ciphers on`.
    config.ignore_client_order = true;
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
        .map_err(|e| format!("TLS session tickets: {e}"))?;
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(names: &[&str]) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(
            names.iter().map(ToString::to_string).collect::<Vec<_>>(),
        )
        .expect("params")
        .self_signed(&key)
        .expect("cert");
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&c, cert.pem()).expect("cert");
        std::fs::write(&k, key.serialize_pem()).expect("key");
        (dir, c, k)
    }

    #[test]
    fn a_pair_loads_and_covers_its_names() {
        let (_dir, cert, key) = pair(&["example.com", "*.example.com"]);
        let loaded = load_pair(&cert, &key).expect("loads");
        assert!(covers(&loaded, "example.com"));
        assert!(covers(&loaded, "www.example.com"));
        assert!(covers(&loaded, "*.example.com"));
        assert!(!covers(&loaded, "example.org"));
        assert!(
            !covers(&loaded, "a.b.example.com"),
            "a wildcard is one label"
        );
    }

    #[test]
    fn a_named_certificate_does_not_cover_a_wildcard_domain() {
        let (_dir, cert, key) = pair(&["www.example.com"]);
        let loaded = load_pair(&cert, &key).expect("loads");
        assert!(!covers(&loaded, "*.example.com"));
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let (_a, cert, _) = pair(&["a.test"]);
        let (_b, _, other_key) = pair(&["b.test"]);
        let error = load_pair(&cert, &other_key).expect_err("mismatch");
        assert!(
            error.contains("is not the key of the certificate"),
            "{error}"
        );
    }

    /// Writes a certificate of `names` (expired when `expired`) and its key
    /// at `cert` and `key`.
    fn write_pair(cert: &Path, key: &Path, names: &[&str], expired: bool) -> Vec<u8> {
        let pair = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(ToString::to_string).collect::<Vec<_>>(),
        )
        .expect("params");
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let made = params.self_signed(&pair).expect("cert");
        std::fs::write(cert, made.pem()).expect("cert");
        std::fs::write(key, pair.serialize_pem()).expect("key");
        made.der().to_vec()
    }

    #[test]
    fn an_expired_replacement_does_not_displace_the_pair_in_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("a.pem"), dir.path().join("a.key"));
        let good = write_pair(&cert, &key, &["a.test"], false);
        let certificates = Certificates::load(vec![CertSource {
            app: "a".into(),
            domains: vec!["a.test".into()],
            origin: Origin::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            default: true,
        }])
        .expect("loads");
        let in_use = |c: &Certificates| {
            c.table
                .load()
                .resolve(Some("a.test"))
                .map(|p| p.end_entity_cert().expect("leaf").as_ref().to_vec())
        };
        assert_eq!(in_use(&certificates), Some(good.clone()));
        write_pair(&cert, &key, &["a.test"], true);
        let (changed, refused) = certificates.refresh();
        assert!(changed.is_empty());
        assert!(refused[0].contains("expired on 2021-01-01"), "{refused:?}");
        assert_eq!(in_use(&certificates), Some(good), "the good pair stays");
        let newer = write_pair(&cert, &key, &["a.test"], false);
        let (changed, _) = certificates.refresh();
        assert_eq!(changed.len(), 1);
        assert_eq!(in_use(&certificates), Some(newer));
    }

    #[test]
    fn an_acme_domain_without_a_certificate_is_refused_not_given_another() {
        let (_dir, cert, key) = pair(&["a.test"]);
        let files = CertSource {
            app: "a".into(),
            domains: vec!["a.test".into()],
            origin: Origin::Files { cert, key },
            default: true,
        };
        let acme = CertSource {
            app: "b".into(),
            domains: vec!["b.test".into()],
            origin: Origin::Acme,
            default: false,
        };
        let certificates = Certificates::load(vec![files.clone(), acme]).expect("loads");
        let names = |c: &Certificates, name: &str| {
            c.table.load().resolve(Some(name)).map(|p| {
                let der = p.end_entity_cert().expect("leaf").as_ref().to_vec();
                let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
                cert.subject_alternative_name()
                    .ok()
                    .flatten()
                    .map(|san| format!("{:?}", san.value.general_names))
                    .unwrap_or_default()
            })
        };
        assert!(names(&certificates, "a.test").is_some_and(|n| n.contains("a.test")));
        assert_eq!(names(&certificates, "b.test"), None, "none yet: refused");
        assert_eq!(names(&certificates, "B.Test"), None);
        assert!(
            names(&certificates, "c.test").is_some_and(|n| n.contains("a.test")),
            "a name no app has gets the default"
        );

        let (_dir_b, cert_b, key_b) = pair(&["b.test"]);
        let issued = Arc::new(load_pair(&cert_b, &key_b).expect("loads"));
        certificates.set_problem("b.test", Some("the CA said no".into()));
        certificates.install("b.test", issued);
        assert!(names(&certificates, "b.test").is_some_and(|n| n.contains("b.test")));
        assert!(names(&certificates, "B.TEST").is_some_and(|n| n.contains("b.test")));

        // A reload without the ACME app forgets its certificate and its
        // problem.
        certificates.set_problem("b.test", Some("the CA said no".into()));
        certificates.set_sources(vec![files]).expect("reload");
        let state = certificates.state.lock().expect("state");
        assert!(
            state.issued.is_empty() && state.problems.is_empty(),
            "{state:?}"
        );
        drop(state);
        assert!(names(&certificates, "b.test").is_some_and(|n| n.contains("a.test")));
    }

    #[test]
    fn half_written_files_are_refused() {
        let (_dir, cert, key) = pair(&["a.test"]);
        let text = std::fs::read_to_string(&cert).expect("read");
        std::fs::write(&cert, &text[..text.len() / 2]).expect("truncate");
        assert!(load_pair(&cert, &key).is_err());
        std::fs::write(&cert, "").expect("empty");
        let error = load_pair(&cert, &key).expect_err("empty");
        assert!(error.contains("no certificate"), "{error}");
    }
}
