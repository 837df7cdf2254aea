//! Automatic certificates (ACME, RFC 8555) through `instant-acme`: one
//! certificate per domain, validated by HTTP-01 (answered by the plain
//! listener) or TLS-ALPN-01 (answered by the HTTPS listener's resolver).
//!
//! Each managed domain has a task that keeps its certificate: it serves
//! the one kept on disk from an earlier run if it is still good, orders a
//! new one when there is none or when it is due for renewal, and after a
//! failure tries again later (sooner as the expiry nears) while the
//! current certificate keeps serving. Renewal is due at a random moment in
//! the window the CA suggests (ACME Renewal Information, RFC 9773) when it
//! offers one, else two thirds into the certificate's lifetime; a renewal
//! order names the certificate it replaces.
//!
//! On disk, under `data_dir/acme/SERVER/` (0700, files 0600): the account
//! (`account.json`) and each domain's `certs/DOMAIN.pem`: the chain, then
//! its key, in one file so that one rename replaces both.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, CertificateIdentifier, ChallengeType,
    Identifier, NewAccount, NewOrder, Order, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Deserialize;
use tracing::{debug, error, info, warn};

use super::tls::{Certificates, Challenges, covers, load_pair, parse_pair, provider, validity};

/// Let's Encrypt's production directory: `acme_directory` when not set.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// A challenge type bext can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ChallengeKind {
    /// A token over plain HTTP on port 80 (`http_listen`).
    #[serde(rename = "http-01")]
    Http01,
    /// A certificate over TLS on port 443 (the HTTPS listener).
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

impl ChallengeKind {
    fn acme(self) -> ChallengeType {
        match self {
            ChallengeKind::Http01 => ChallengeType::Http01,
            ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// Who issues the certificates of apps without their own
/// (`[platform.tls] issuer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Issuer {
    /// An ACME server (`acme_directory`).
    #[default]
    Acme,
    /// bext's own CA in `data_dir/internal-ca` (staging, development).
    Internal,
}

/// How certificates are had from ACME (or the internal CA).
#[derive(Debug, Clone, PartialEq)]
pub struct AcmeSettings {
    pub issuer: Issuer,
    /// The account's contact (`acme_email`), if any.
    pub email: Option<String>,
    /// The directory URL (`acme_directory`).
    pub directory: String,
    /// A PEM file of the root to trust for the ACME server instead of the
    /// system's (`acme_ca_root`: a private CA such as Pebble).
    pub ca_root: Option<PathBuf>,
    /// The challenge types to use, in order of preference: after a failed
    /// attempt the next is tried.
    pub challenges: Vec<ChallengeKind>,
}

impl Default for AcmeSettings {
    fn default() -> Self {
        AcmeSettings {
            issuer: Issuer::Acme,
            email: None,
            directory: LETS_ENCRYPT.to_string(),
            ca_root: None,
            challenges: vec![ChallengeKind::Http01, ChallengeKind::TlsAlpn01],
        }
    }
}

/// Why a domain cannot have an ACME certificate, if it cannot: wildcards
/// need DNS-01, which bext does not do; ACME servers issue only for public
/// names.
pub fn unusable(domain: &str) -> Option<String> {
    if domain.starts_with("*.") {
        return Some(format!(
            "`{domain}` is a wildcard: automatic certificates cannot cover it (that takes a DNS-01 challenge, which bext does not do); give the app a certificate of its own"
        ));
    }
    if domain.parse::<std::net::IpAddr>().is_ok()
        || !domain.contains('.')
        || domain.ends_with(".localhost")
        || !domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        || domain.starts_with(['.', '-'])
    {
        return Some(format!(
            "`{domain}` is not a public DNS name an ACME server can issue for; give the app a certificate of its own"
        ));
    }
    None
}

/// One ACME request's longest wait (the client has no timeout of its own).
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for validation, and for the certificate after finalizing.
const POLL_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest a whole issue may take.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(300);
/// Orders under way at once, across domains.
const CONCURRENT_ORDERS: usize = 2;
/// The first retry after a failure; it doubles with each further one.
/// (Let's Encrypt allows 5 failed validations per hostname an hour.)
const RETRY_FIRST: Duration = Duration::from_secs(300);
/// The shortest wait between attempts.
const RETRY_FLOOR: Duration = Duration::from_secs(60);
/// The longest wait between attempts.
const RETRY_MAX: Duration = Duration::from_secs(6 * 3600);
/// The largest certificate chain taken from a CA.
const MAX_CHAIN: usize = 1024 * 1024;
/// The longest a kept certificate is slept on before it is looked at again.
const RECHECK: Duration = Duration::from_secs(24 * 3600);
/// The CA's renewal information is asked again after the time it says,
/// within these bounds (RFC 9773 §4.3.2 suggests one minute and one day).
const ARI_RECHECK_MIN: Duration = Duration::from_secs(60);
const ARI_RECHECK_MAX: Duration = Duration::from_secs(24 * 3600);
/// After failing to get the renewal information, asked again after this.
const ARI_RETRY: Duration = Duration::from_secs(3600);

/// The ACME client: one account, one task per managed domain.
pub struct Acme {
    settings: AcmeSettings,
    /// `data_dir/acme/SERVER`.
    store: PathBuf,
    certificates: Arc<Certificates>,
    account: tokio::sync::Mutex<Option<Account>>,
    /// The server no longer knows the stored account: register its key
    /// again.
    account_gone: AtomicBool,
    /// The server says the stored account is deactivated: its key cannot
    /// be used again, so a new account is created.
    account_dead: AtomicBool,
    /// The server has no renewal information (ARI): renewal two thirds
    /// into the lifetime, orders without `replaces`.
    ari_unsupported: AtomicBool,
    /// Each domain's task, and the reload count it watches (a reload
    /// retries a failing domain now).
    tasks: std::sync::Mutex<
        BTreeMap<String, (tokio::task::AbortHandle, tokio::sync::watch::Sender<u64>)>,
    >,
    turns: tokio::sync::Semaphore,
    /// `issuer = "internal"`: the CA that signs instead of an ACME server.
    local: Option<super::local_ca::LocalCa>,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme")
            .field("settings", &self.settings)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Acme {
    /// The client for `settings`, keeping its files under
    /// `data_dir/acme` (created 0700 when there is something to keep); with
    /// the internal issuer, its CA is opened (or made) in
    /// `data_dir/internal-ca`.
    pub fn new(
        settings: AcmeSettings,
        data_dir: &Path,
        certificates: Arc<Certificates>,
    ) -> Result<Arc<Self>, String> {
        let (store, local) = match settings.issuer {
            Issuer::Acme => (
                data_dir.join("acme").join(server_dir(&settings.directory)),
                None,
            ),
            Issuer::Internal => {
                // 0755: `root.crt` is for everyone to read (`ca.pem` in it
                // is 0600).
                let dir = data_dir.join("internal-ca");
                public_dir(&dir)?;
                let (ca, made) = super::local_ca::LocalCa::open(&dir)?;
                info!(
                    root = %ca.root_path.display(),
                    "{} internal CA: its certificates are trusted where this root is (for staging and development, not for the public)",
                    if made { "made a new" } else { "the" }
                );
                (data_dir.join("acme").join("internal"), Some(ca))
            }
        };
        // The ACME client's HTTPS builds on the process's default crypto
        // provider.
        let _ = rustls::crypto::CryptoProvider::install_default(Arc::unwrap_or_clone(provider()));
        let internal = local.is_some();
        Ok(Arc::new(Acme {
            settings,
            store,
            certificates,
            account: tokio::sync::Mutex::new(None),
            account_gone: AtomicBool::new(false),
            account_dead: AtomicBool::new(false),
            ari_unsupported: AtomicBool::new(internal),
            tasks: std::sync::Mutex::new(BTreeMap::new()),
            turns: tokio::sync::Semaphore::new(CONCURRENT_ORDERS),
            local,
        }))
    }

    /// Whether a kept certificate is this issuer's: with the internal CA,
    /// signed by the CA in use now (one made again after the old was
    /// deleted does not serve the old one's certificates).
    fn issued_here(&self, pair: &CertifiedKey) -> bool {
        match &self.local {
            Some(ca) => ca.signed(pair),
            None => true,
        }
    }

    /// Who issues: the ACME directory, or the internal CA.
    fn issuer_name(&self) -> &str {
        match self.local {
            Some(_) => "the internal CA",
            None => &self.settings.directory,
        }
    }

    /// Serves the certificates kept from an earlier run at once (before
    /// the listener takes its first handshake), and clears what a crash
    /// mid-write left.
    pub fn load_kept(&self) {
        let certs = self.store.join("certs");
        if let Ok(entries) = std::fs::read_dir(&certs) {
            for entry in entries.flatten() {
                // tempfile's names: `.tmpXXXXXX`.
                if entry.file_name().to_string_lossy().starts_with(".tmp") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        for domain in self.certificates.acme_domains() {
            if let Some(pair) = stored(&domain, &self.path(&domain)).filter(|p| self.issued_here(p))
            {
                info!(%domain, "certificate from {}, {}", self.store.display(), describe_validity(&pair));
                self.certificates.install(&domain, pair);
            }
        }
    }

    /// Keeps a certificate for each domain `certificates` has from ACME,
    /// and stops keeping those it no longer has (a reload). Domains
    /// waiting to retry a failed order try again now (a reload is how an
    /// operator says "fixed, go").
    pub fn sync(self: &Arc<Self>) {
        let wanted = self.certificates.acme_domains();
        let Ok(mut tasks) = self.tasks.lock() else {
            return;
        };
        tasks.retain(|domain, (task, reloads)| {
            // A task that ended (it should not) is started again below.
            let keep = wanted.contains(domain) && !task.is_finished();
            if keep {
                reloads.send_modify(|n| *n = n.wrapping_add(1));
            } else {
                task.abort();
                info!(%domain, "no longer an ACME domain: its certificate is not renewed");
            }
            keep
        });
        for domain in wanted {
            if tasks.contains_key(&domain) {
                continue;
            }
            let (reloads, watched) = tokio::sync::watch::channel(0);
            let task = tokio::spawn(Arc::clone(self).keep(domain.clone(), watched));
            tasks.insert(domain, (task.abort_handle(), reloads));
        }
    }

    /// Stops every domain's task.
    pub fn stop(&self) {
        if let Ok(mut tasks) = self.tasks.lock() {
            for (_, (task, _)) in std::mem::take(&mut *tasks) {
                task.abort();
            }
        }
    }

    /// Where `domain`'s chain and key are kept (one file; a wildcard's
    /// `*` is `_` there). Domains are checked names (letters, digits, `-`
    /// between dots), so the name stays in `certs/`.
    fn path(&self, domain: &str) -> PathBuf {
        let name = domain.replace('*', "_");
        self.store.join("certs").join(format!("{name}.pem"))
    }

    /// Keeps `domain`'s certificate until aborted; a change of `reloads`
    /// (a reload, during an order or the wait after it failed) cuts short
    /// the wait after a failure, to at least [`RETRY_FLOOR`] after the
    /// attempt began.
    async fn keep(self: Arc<Self>, domain: String, mut reloads: tokio::sync::watch::Receiver<u64>) {
        let mut current = self.certificates.issued(&domain);
        if current.is_none() {
            // A domain a reload added: its kept certificate, if any.
            let path = self.path(&domain);
            let name = domain.clone();
            current = tokio::task::spawn_blocking(move || stored(&name, &path))
                .await
                .ok()
                .flatten()
                .filter(|pair| self.issued_here(pair));
            if let Some(pair) = &current {
                info!(%domain, "certificate from {}, {}", self.store.display(), describe_validity(pair));
                self.certificates.install(&domain, Arc::clone(pair));
            }
        }
        let mut failures: u32 = 0;
        let mut last_error = String::new();
        let mut ari: Option<Ari> = None;
        // Not renewed before this (set after an issue: a certificate that
        // looks due at once, because the clock is off or the CA's window
        // says so, must not make an order a minute).
        let mut hold_until: Option<SystemTime> = None;
        // Orders in a row whose certificate was due again at once (a clock
        // off), and orders in a row made before two thirds of the lifetime
        // (the CA's window asked for it): each doubles the hold.
        let (mut due_at_once, mut early): (u32, u32) = (0, 0);
        // A new certificate the disk refused: written again until it takes.
        let mut unsaved: Option<Vec<u8>> = None;
        loop {
            if let Some(pem) = &unsaved {
                let (path, pem) = (self.path(&domain), pem.clone());
                match tokio::task::spawn_blocking(move || save_private(&path, &pem)).await {
                    Ok(Ok(())) => {
                        info!(%domain, "certificate saved to {}", self.store.display());
                        unsaved = None;
                    }
                    Ok(Err(e)) => debug!(%domain, "certificate still not saved: {e}"),
                    Err(_) => {}
                }
            }
            // (A certificate whose dates cannot be read is due: `issue`
            // takes no such certificate, so it came from the disk.)
            let mut base_due = None;
            let due = match current.as_deref() {
                None => None,
                Some(pair) => match renew_at(pair) {
                    None => Some(UNIX_EPOCH),
                    Some(base) => {
                        base_due = Some(base);
                        Some(self.renewal_due(&domain, pair, base, &mut ari).await)
                    }
                },
            };
            let due = match (due, hold_until) {
                (Some(due), Some(hold)) => Some(due.max(hold)),
                (due, _) => due,
            };
            let now = SystemTime::now();
            if let Some(due) = due
                && due > now
            {
                let mut wait = due.duration_since(now).unwrap_or_default().min(RECHECK);
                if let Some(ari) = &ari {
                    wait = wait.min(ari.next_check.duration_since(now).unwrap_or_default());
                }
                if unsaved.is_some() {
                    wait = wait.min(RETRY_FIRST);
                }
                let wait = wait.max(Duration::from_secs(1));
                debug!(%domain, "certificate renewal due in {}", humantime::format_duration(wait));
                tokio::time::sleep(wait).await;
                continue;
            }
            let renewing = current.is_some();
            let before_base = base_due.is_some_and(|base| base > SystemTime::now());
            let attempt = tokio::time::Instant::now();
            reloads.borrow_and_update();
            let replaces = current
                .as_deref()
                .filter(|_| !self.ari_unsupported.load(Ordering::Relaxed))
                .and_then(certificate_id);
            let kind =
                self.settings.challenges[failures as usize % self.settings.challenges.len().max(1)];
            // The turn first: waiting for it is not the order's time.
            let Ok(turn) = self.turns.acquire().await else {
                return;
            };
            let result = match tokio::time::timeout(
                ISSUE_TIMEOUT,
                self.issue(&domain, kind, replaces.as_ref()),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err(format!(
                    "no certificate within {}",
                    humantime::format_duration(ISSUE_TIMEOUT)
                )),
            };
            drop(turn);
            match result {
                Ok((pair, pem)) => {
                    // Served first, kept on disk second: a full disk does
                    // not throw away a certificate (the CA limits how many
                    // a name gets a week). The line comes after the save and
                    // says whether it was kept.
                    self.certificates.install(&domain, Arc::clone(&pair));
                    let (path, bytes) = (self.path(&domain), pem.clone());
                    let retry = humantime::format_duration(RETRY_FIRST);
                    let saved = match tokio::task::spawn_blocking(move || {
                        save_private(&path, &bytes)
                    })
                    .await
                    {
                        Ok(Ok(())) => true,
                        Ok(Err(e)) => {
                            error!(%domain, "the new certificate serves but could not be saved ({e}); trying again every {retry}");
                            false
                        }
                        Err(e) => {
                            error!(%domain, "the new certificate serves but saving it failed ({e}); trying again every {retry}");
                            false
                        }
                    };
                    unsaved = (!saved).then_some(pem);
                    info!(
                        %domain,
                        challenge = kind.name(),
                        saved,
                        "certificate {} by {}, {}{}",
                        if renewing { "renewed" } else { "issued" },
                        self.issuer_name(),
                        describe_validity(&pair),
                        if saved { "" } else { " (not saved yet)" }
                    );
                    let now = SystemTime::now();
                    let at_once = renew_at(&pair).is_none_or(|due| due <= now);
                    due_at_once = if at_once {
                        due_at_once.saturating_add(1)
                    } else {
                        0
                    };
                    early = if before_base {
                        early.saturating_add(1)
                    } else {
                        0
                    };
                    let hold = hold_after_order(&pair, due_at_once, early);
                    hold_until = Some(now + hold);
                    if at_once {
                        error!(
                            %domain,
                            "the new certificate is already due for renewal ({}): is the system clock right? Not ordering again for {}",
                            describe_validity(&pair),
                            humantime::format_duration(hold),
                        );
                    }
                    current = Some(pair);
                    ari = None;
                    failures = 0;
                    last_error.clear();
                }
                Err(e) => {
                    // The CA's words, in the log and in `status`.
                    let e = printable(&e);
                    failures = failures.saturating_add(1);
                    let wait = retry_after(failures, current.as_deref());
                    let serving = match &current {
                        Some(pair) => format!(
                            "the current certificate keeps serving ({})",
                            describe_validity(pair)
                        ),
                        None => "the domain has no certificate meanwhile".to_string(),
                    };
                    let line = format!(
                        "certificate {} failed ({} challenge): {e}; trying again in {} (or at a reload); {serving}",
                        if renewing { "renewal" } else { "issue" },
                        kind.name(),
                        humantime::format_duration(wait),
                    );
                    // One line per change of state, not one per attempt
                    // (the URLs in the CA's words change with each order).
                    let state = without_urls(&e);
                    if state != last_error {
                        error!(%domain, "{line}");
                    } else {
                        debug!(%domain, "{line}");
                    }
                    self.certificates.set_problem(&domain, Some(e));
                    last_error = state;
                    let reloaded = tokio::select! {
                        () = tokio::time::sleep(wait) => false,
                        changed = reloads.changed() => changed.is_ok(),
                    };
                    if reloaded {
                        // Not sooner than a minute after the last try,
                        // however often the operator reloads.
                        tokio::time::sleep_until(attempt + RETRY_FLOOR).await;
                        info!(%domain, "trying the certificate again now (a reload)");
                    }
                }
            }
        }
    }

    /// When `pair` (due at `base` by its lifetime) should be renewed: per
    /// the CA's renewal information if it offers some, asked again when
    /// the CA says (`ari` remembers the answer for the certificate).
    async fn renewal_due(
        &self,
        domain: &str,
        pair: &CertifiedKey,
        base: SystemTime,
        ari: &mut Option<Ari>,
    ) -> SystemTime {
        if self.ari_unsupported.load(Ordering::Relaxed) {
            *ari = None;
            return base;
        }
        let Some(id) = certificate_id(pair) else {
            *ari = None;
            return base;
        };
        let key = id.to_string();
        let now = SystemTime::now();
        if let Some(known) = ari.as_ref().filter(|a| a.id == key)
            && now < known.next_check
        {
            return known.due;
        }
        let previous = ari.take().filter(|a| a.id == key);
        let answer = match self.account().await {
            Err(e) => Err(e),
            Ok(account) => {
                match tokio::time::timeout(STEP_TIMEOUT, account.renewal_info(&id)).await {
                    Err(_) => Err(format!(
                        "no answer within {}",
                        humantime::format_duration(STEP_TIMEOUT)
                    )),
                    Ok(Err(instant_acme::Error::Unsupported(_))) => {
                        *ari = None;
                        if !self.ari_unsupported.swap(true, Ordering::Relaxed) {
                            info!(
                                directory = %self.settings.directory,
                                "the ACME server gives no renewal information (ARI): certificates are renewed two thirds into their lifetime"
                            );
                        }
                        return base;
                    }
                    Ok(Err(e)) => Err(printable(&with_causes(&e))),
                    Ok(Ok(answer)) => Ok(answer),
                }
            }
        };
        let (start, end) = validity(pair).unwrap_or_default();
        let lifetime = (unix_time(start), unix_time(end));
        let next = match answer {
            Ok((info, retry)) => {
                // Within the epoch and ten years from now (the CA's dates
                // are not trusted to be sane), start before end.
                let sane = |t: time::OffsetDateTime| {
                    SystemTime::from(t)
                        .clamp(UNIX_EPOCH, now + Duration::from_secs(10 * 365 * 86_400))
                };
                let start = sane(info.suggested_window.start);
                let window = (start, sane(info.suggested_window.end).max(start));
                // The same window keeps its moment; a new one gets another.
                let pick = match &previous {
                    Some(p) if p.window == Some(window) => p.pick,
                    _ => pick_in(window, random_fraction()),
                };
                let due = ari_due(pick, lifetime);
                if previous.as_ref().is_none_or(|p| p.window != Some(window)) {
                    info!(
                        %domain,
                        explanation = info.explanation_url.as_deref().map(printable).unwrap_or_default(),
                        "the CA suggests renewing between {} and {}: renewal set for {}",
                        humantime::format_rfc3339_seconds(window.0),
                        humantime::format_rfc3339_seconds(window.1),
                        humantime::format_rfc3339_seconds(due.max(now)),
                    );
                }
                Ari {
                    id: key,
                    window: Some(window),
                    pick,
                    due,
                    next_check: now + retry.clamp(ARI_RECHECK_MIN, ARI_RECHECK_MAX),
                    failed: false,
                }
            }
            Err(e) => {
                let due = previous.as_ref().map_or(base, |p| p.due);
                if previous.as_ref().is_none_or(|p| !p.failed) {
                    warn!(
                        %domain,
                        "the CA's renewal information could not be had ({e}): renewal stays set for {}; asking again in {}",
                        humantime::format_rfc3339_seconds(due.max(now)),
                        humantime::format_duration(ARI_RETRY),
                    );
                }
                Ari {
                    id: key,
                    window: previous.as_ref().and_then(|p| p.window),
                    pick: previous.as_ref().map_or(base, |p| p.pick),
                    due,
                    next_check: now + ARI_RETRY,
                    failed: true,
                }
            }
        };
        let due = next.due;
        *ari = Some(next);
        due
    }

    /// The account, loaded from its file or created (and saved) first.
    async fn account(&self) -> Result<Account, String> {
        let mut slot = self.account.lock().await;
        if let Some(account) = &*slot
            && !self.account_gone.load(Ordering::Relaxed)
            && !self.account_dead.load(Ordering::Relaxed)
        {
            return Ok(account.clone());
        }
        let path = self.store.join("account.json");
        if self.account_dead.swap(false, Ordering::Relaxed) {
            // Kept aside, not deleted: it is the operator's record.
            let aside = path.with_extension(format!("json.deactivated-{}", unix_now()));
            match std::fs::rename(&path, &aside) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    self.account_dead.store(true, Ordering::Relaxed);
                    return Err(format!("{}: {e}", path.display()));
                }
                _ => {}
            }
            self.account_gone.store(false, Ordering::Relaxed);
            error!(old = %aside.display(), "the ACME account is deactivated: creating a new one");
        }
        let saved = match std::fs::read(&path) {
            Ok(bytes) => Some(
                serde_json::from_slice::<AccountCredentials>(&bytes)
                    .map_err(|e| format!("{}: {e}", path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let builder = match &self.settings.ca_root {
            Some(root) => Account::builder_with_root(root),
            None => Account::builder(),
        }
        .map_err(|e| format!("the ACME client: {e}"))?;
        let account = match saved {
            Some(credentials) if self.account_gone.load(Ordering::Relaxed) => {
                let der = credentials.private_key().clone_key();
                let key = instant_acme::Key::from_pkcs8_der(der.clone_key())
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let (account, credentials) = step(
                    "registering the account's key again",
                    builder.create_from_key(
                        (key, PrivateKeyDer::Pkcs8(der)),
                        self.settings.directory.clone(),
                    ),
                )
                .await?;
                if let Err(e) = serialize(&credentials).and_then(|b| save_private(&path, &b)) {
                    error!("the ACME account could not be saved ({e})");
                }
                self.account_gone.store(false, Ordering::Relaxed);
                info!(directory = %self.settings.directory, "ACME account registered again with its key");
                self.set_contact(&account).await;
                account
            }
            Some(credentials) => {
                let account =
                    step("the ACME directory", builder.from_credentials(credentials)).await?;
                self.set_contact(&account).await;
                account
            }
            None => {
                let contact = self.settings.email.as_ref().map(|e| format!("mailto:{e}"));
                let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
                let (account, credentials) = step(
                    "creating the ACME account",
                    builder.create(
                        &NewAccount {
                            contact: &contacts,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        self.settings.directory.clone(),
                        None,
                    ),
                )
                .await?;
                // Kept in memory even if it cannot be saved: a new account
                // per attempt would run into the CA's registration limits.
                if let Err(e) = serialize(&credentials).and_then(|b| save_private(&path, &b)) {
                    error!(
                        "the ACME account could not be saved ({e}): a restart will create another"
                    );
                }
                self.account_gone.store(false, Ordering::Relaxed);
                info!(directory = %self.settings.directory, account = %path.display(), "ACME account created");
                account
            }
        };
        *slot = Some(account.clone());
        Ok(account)
    }

    /// Tells the server the account's contact as `acme_email` says now (it
    /// may have changed since the account was created). A failure is only
    /// logged: certificates do not depend on it.
    async fn set_contact(&self, account: &Account) {
        let contact = self.settings.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        match step("the account's contact", account.update_contacts(&contacts)).await {
            Ok(()) => debug!(contact = ?contact, "ACME account contact set"),
            Err(e) => error!(
                "the ACME account's contact could not be set: {}",
                printable(&e)
            ),
        }
    }

    /// Orders, validates and fetches a certificate for `domain`, and keeps
    /// it on disk.
    /// A renewal names the certificate it `replaces` when the server has
    /// renewal information (some CAs then lift rate limits); if the order
    /// is refused with it, it is made again without.
    async fn issue(
        &self,
        domain: &str,
        kind: ChallengeKind,
        replaces: Option<&CertificateIdentifier<'static>>,
    ) -> Result<(Arc<CertifiedKey>, Vec<u8>), String> {
        if let Some(ca) = &self.local {
            return ca.issue(domain);
        }
        let account = self.account().await?;
        let identifiers = [Identifier::Dns(domain.to_string())];
        let replacing = match replaces {
            Some(id) => step(
                "new order",
                account.new_order(&NewOrder::new(&identifiers).replaces(id.clone())),
            )
            .await
            .inspect_err(|e| {
                debug!(%domain, "a renewal order naming the old certificate was refused ({}): ordering without", printable(e));
            })
            .ok(),
            None => None,
        };
        let mut order = match replacing {
            Some(order) => Ok(order),
            None => step("new order", account.new_order(&NewOrder::new(&identifiers))).await,
        }
        .inspect_err(|e| {
            if e.contains("accountDoesNotExist") {
                self.account_gone.store(true, Ordering::Relaxed);
            } else if e.contains("unauthorized") && e.contains("deactivated") {
                self.account_dead.store(true, Ordering::Relaxed);
            }
        })?;
        let mut pending = Pending {
            challenges: Arc::clone(self.certificates.challenges()),
            tokens: Vec::new(),
            certificates: Vec::new(),
        };
        {
            let mut authorizations = order.authorizations();
            while let Some(authorization) = authorizations.next().await {
                let mut authorization = authorization.map_err(|e| format!("authorization: {e}"))?;
                match authorization.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => return Err(format!("the authorization is {other:?}")),
                }
                let offered: Vec<ChallengeType> = authorization
                    .challenges
                    .iter()
                    .map(|c| c.r#type.clone())
                    .collect();
                let kind = std::iter::once(kind)
                    .chain(self.settings.challenges.iter().copied())
                    .find(|k| offered.contains(&k.acme()))
                    .ok_or_else(|| {
                        format!("the ACME server offers none of the challenges bext answers ({offered:?})")
                    })?;
                let mut challenge = authorization
                    .challenge(kind.acme())
                    .ok_or("the challenge went away")?;
                let key_authorization = challenge.key_authorization();
                match kind {
                    ChallengeKind::Http01 => {
                        pending.http01(&challenge.token, key_authorization.as_str());
                    }
                    ChallengeKind::TlsAlpn01 => {
                        let certificate =
                            challenge_certificate(domain, key_authorization.digest().as_ref())?;
                        pending.alpn01(domain, certificate);
                    }
                }
                step("challenge ready", challenge.set_ready()).await?;
            }
        }
        let status = step_poll(
            "validation",
            order.poll_ready(&RetryPolicy::new().timeout(POLL_TIMEOUT)),
        )
        .await;
        match status {
            Ok(OrderStatus::Ready) => {}
            Ok(other) => {
                return Err(why_invalid(&mut order, format!("the order is {other:?}")).await);
            }
            Err(e) => return Err(why_invalid(&mut order, e).await),
        }
        drop(pending);
        let key = rcgen::KeyPair::generate().map_err(|e| format!("a key: {e}"))?;
        let mut params = rcgen::CertificateParams::new(vec![domain.to_string()])
            .map_err(|e| format!("a request for `{domain}`: {e}"))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let request = params
            .serialize_request(&key)
            .map_err(|e| format!("a request for `{domain}`: {e}"))?;
        step("finalize", order.finalize_csr(request.der())).await?;
        let chain = step_poll(
            "the certificate",
            order.poll_certificate(&RetryPolicy::new().timeout(POLL_TIMEOUT)),
        )
        .await?;
        if chain.len() > MAX_CHAIN {
            return Err(format!(
                "the CA sent a certificate chain of {} bytes (at most {MAX_CHAIN} are taken)",
                chain.len()
            ));
        }
        // Checked whole in memory: what is kept on disk is a good pair.
        let mut pem = chain.trim_end().to_string();
        pem.push('\n');
        pem.push_str(&key.serialize_pem());
        let pair = parse_pair(
            pem.as_bytes(),
            pem.as_bytes(),
            "the CA's certificate",
            "its key",
        )?;
        if !covers(&pair, domain) {
            return Err(format!("the certificate issued does not cover `{domain}`"));
        }
        // Expired by this host's clock is taken (clients judge by theirs;
        // the clock is logged about); dates that make no sense are not.
        if validity(&pair).is_none_or(|(start, end)| start >= end) {
            return Err(format!(
                "the certificate issued has no usable dates ({})",
                describe_validity(&pair)
            ));
        }
        Ok((Arc::new(pair), pem.into_bytes()))
    }
}

/// The challenge answers of one order, taken back when it ends however it
/// ends.
struct Pending {
    challenges: Arc<Challenges>,
    tokens: Vec<String>,
    certificates: Vec<(String, Arc<CertifiedKey>)>,
}

impl Pending {
    fn http01(&mut self, token: &str, key_authorization: &str) {
        self.challenges
            .set_http01(token, Some(key_authorization.to_string()));
        self.tokens.push(token.to_string());
    }

    fn alpn01(&mut self, domain: &str, certificate: Arc<CertifiedKey>) {
        self.challenges.set_alpn01(domain, Arc::clone(&certificate));
        self.certificates.push((domain.to_string(), certificate));
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        for token in &self.tokens {
            self.challenges.set_http01(token, None);
        }
        for (domain, certificate) in &self.certificates {
            self.challenges.clear_alpn01(domain, certificate);
        }
    }
}

/// One ACME request, bounded in time; errors say which step failed.
async fn step<T>(
    what: &str,
    request: impl Future<Output = Result<T, instant_acme::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(STEP_TIMEOUT, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("{what}: {}", with_causes(&e))),
        Err(_) => Err(format!(
            "{what}: no answer within {}",
            humantime::format_duration(STEP_TIMEOUT)
        )),
    }
}

/// A poll (its own policy bounds the number of requests; this, each
/// request's wait).
async fn step_poll<T>(
    what: &str,
    poll: impl Future<Output = Result<T, instant_acme::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(POLL_TIMEOUT + STEP_TIMEOUT, poll).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("{what}: {}", with_causes(&e))),
        Err(_) => Err(format!("{what}: no answer in time")),
    }
}

/// `error` and what caused it ("client error (Connect): tcp connect
/// error: Connection refused"), each cause once.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let line = e.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        cause = e.source();
    }
    text
}

/// `text` (words from the ACME server among them) fit for one log line:
/// control characters become spaces, and it is cut at 512 bytes.
fn printable(text: &str) -> String {
    const MAX: usize = 512;
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > MAX {
        let mut end = MAX;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
}

/// What the server said about a failed validation (the challenge's
/// error), else `fallback`.
async fn why_invalid(order: &mut Order, fallback: String) -> String {
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        let Ok(Ok(state)) = tokio::time::timeout(STEP_TIMEOUT, authorization.refresh()).await
        else {
            continue;
        };
        for challenge in &state.challenges {
            if let Some(problem) = &challenge.error {
                return format!(
                    "validation failed: {}",
                    problem.detail.as_deref().unwrap_or("no detail given")
                );
            }
        }
    }
    fallback
}

/// The self-signed certificate of a TLS-ALPN-01 challenge (RFC 8737 §3):
/// the domain as its one name, the key authorization's digest in the
/// critical acmeIdentifier extension.
fn challenge_certificate(domain: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let failed = |e: rcgen::Error| format!("the tls-alpn-01 certificate: {e}");
    let key = rcgen::KeyPair::generate().map_err(failed)?;
    let mut params = rcgen::CertificateParams::new(vec![domain.to_string()]).map_err(failed)?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let certificate = params.self_signed(&key).map_err(failed)?;
    let signing = provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )))
        .map_err(|e| format!("the tls-alpn-01 key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![certificate.der().clone()],
        signing,
    )))
}

/// A certificate kept from an earlier run (chain and key in `path`), if it
/// is whole, covers `domain` and has not expired.
fn stored(domain: &str, path: &Path) -> Option<Arc<CertifiedKey>> {
    if !path.exists() {
        return None;
    }
    let pair = match load_pair(path, path) {
        Ok(pair) => pair,
        Err(e) => {
            error!(%domain, "the kept certificate is unusable ({e}): a new one is ordered");
            return None;
        }
    };
    let now = unix_now();
    let fresh = validity(&pair).is_some_and(|(_, end)| end > now);
    (covers(&pair, domain) && fresh).then(|| Arc::new(pair))
}

/// When `pair` should be renewed: two thirds into its lifetime.
fn renew_at(pair: &CertifiedKey) -> Option<SystemTime> {
    let (start, end) = validity(pair)?;
    let lifetime = u64::try_from(end.saturating_sub(start)).ok()?;
    let start = u64::try_from(start).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(start.saturating_add(lifetime / 3 * 2)))
}

/// What the CA said of one certificate's renewal (ARI).
struct Ari {
    /// The certificate (its ARI identifier).
    id: String,
    /// The suggested window, once had.
    window: Option<(SystemTime, SystemTime)>,
    /// The moment picked in the window.
    pick: SystemTime,
    /// When renewal is due (the pick, bounded by the lifetime).
    due: SystemTime,
    /// When to ask the CA again.
    next_check: SystemTime,
    /// The last question failed (logged once until one succeeds).
    failed: bool,
}

/// The ARI identifier of `pair`'s certificate (its issuer's key
/// identifier and its serial number), if it has one.
fn certificate_id(pair: &CertifiedKey) -> Option<CertificateIdentifier<'static>> {
    let leaf = pair.cert.first()?;
    CertificateIdentifier::try_from(leaf)
        .ok()
        .map(CertificateIdentifier::into_owned)
}

fn unix_time(seconds: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

/// A uniformly random number in [0, 1).
fn random_fraction() -> f64 {
    let mut bytes = [0u8; 8];
    if provider().secure_random.fill(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// The moment `fraction` of the way into `window` (its start if the window
/// is empty or backwards).
fn pick_in(window: (SystemTime, SystemTime), fraction: f64) -> SystemTime {
    let (start, end) = window;
    let width = end.duration_since(start).unwrap_or_default();
    start + width.mul_f64(fraction.clamp(0.0, 1.0))
}

/// When to renew given the moment picked in the CA's window: that moment,
/// but never later than five sixths into the certificate's `lifetime`
/// (a window the CA gets wrong cannot let the certificate run out).
fn ari_due(pick: SystemTime, lifetime: (SystemTime, SystemTime)) -> SystemTime {
    let (start, end) = lifetime;
    let latest = start + end.duration_since(start).unwrap_or_default() / 6 * 5;
    pick.min(latest)
}

/// How long after an order (of `pair`) the next may be made: a tenth of
/// the certificate's lifetime, between a second and an hour; after
/// `due_at_once` orders in a row whose certificate was due again at once
/// (the clock is off), six hours doubling; doubled for each of `early`
/// orders in a row made before two thirds of the lifetime (the CA's
/// window). At most a week.
fn hold_after_order(pair: &CertifiedKey, due_at_once: u32, early: u32) -> Duration {
    const WEEK: Duration = Duration::from_secs(7 * 86_400);
    let lifetime = validity(pair)
        .and_then(|(start, end)| u64::try_from(end.saturating_sub(start)).ok())
        .unwrap_or(0);
    let mut hold =
        Duration::from_secs(lifetime / 10).clamp(Duration::from_secs(1), RETRY_FLOOR * 60);
    if due_at_once > 0 {
        hold = hold.max(RETRY_MAX.saturating_mul(1 << (due_at_once - 1).min(5)));
    }
    hold.saturating_mul(1 << early.min(10)).min(WEEK)
}

/// `text` with its URLs taken out: what stays the same from one failed
/// order to the next.
fn without_urls(text: &str) -> String {
    text.split(' ')
        .map(|word| if word.contains("://") { "URL" } else { word })
        .collect::<Vec<_>>()
        .join(" ")
}

/// How long to wait after the `failures`-th failure in a row: doubling
/// from five minutes up to six hours, but at most a quarter of the time the
/// current certificate has left, so a renewal gets several tries before it
/// expires; never less than a minute (a tenth of the lifetime for
/// certificates shorter than ten minutes).
fn retry_after(failures: u32, current: Option<&CertifiedKey>) -> Duration {
    let doubling = RETRY_FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(10))
        .min(RETRY_MAX);
    let dates = current.and_then(validity);
    let floor = dates
        .and_then(|(start, end)| u64::try_from(end.saturating_sub(start)).ok())
        .map_or(RETRY_FLOOR, |lifetime| {
            Duration::from_secs(lifetime / 10).clamp(Duration::from_secs(1), RETRY_FLOOR)
        });
    let left = dates
        .map(|(_, end)| end.saturating_sub(unix_now()))
        .filter(|left| *left > 0);
    let wait = match left {
        Some(left) => {
            doubling.min(Duration::from_secs(u64::try_from(left / 4).unwrap_or(0)).max(floor))
        }
        None => doubling,
    };
    // Up to a tenth more, so domains that failed together do not retry
    // together.
    wait + wait.mul_f64(random_fraction() / 10.0)
}

fn describe_validity(pair: &CertifiedKey) -> String {
    match validity(pair) {
        Some((_, end)) => {
            let end = UNIX_EPOCH + Duration::from_secs(u64::try_from(end).unwrap_or(0));
            format!("valid until {}", humantime::format_rfc3339_seconds(end))
        }
        None => "validity unknown".to_string(),
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A directory name for the ACME server of `url`: its host, port and path
/// (two directories on one host are two CAs, e.g. step-ca provisioners).
fn server_dir(url: &str) -> String {
    let name = url
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| {
            let authority = u.authority()?.as_str().to_string();
            let path = u.path().trim_matches('/').replace('/', "-");
            Some(if path.is_empty() {
                authority
            } else {
                format!("{authority}-{path}")
            })
        })
        .unwrap_or_else(|| "acme".to_string());
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn serialize(credentials: &AccountCredentials) -> Result<Vec<u8>, String> {
    serde_json::to_vec_pretty(credentials).map_err(|e| format!("the ACME account: {e}"))
}

/// Creates `dir` (its parents 0700) readable by all, 0755.
fn public_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = dir.parent() {
        private_dir(parent)?;
    }
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(format!("{}: {e}", dir.display()));
        }
        _ => {}
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// Creates `dir` and its parents, 0700.
pub(super) fn private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// Writes `bytes` to `path` whole or not at all, readable by bext only.
pub(super) fn save_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let failed = |e: std::io::Error| format!("{}: {e}", path.display());
    let dir = path
        .parent()
        .ok_or_else(|| format!("{}: no directory", path.display()))?;
    private_dir(dir)?;
    // NamedTempFile is created 0600.
    let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(failed)?;
    temp.write_all(bytes).map_err(failed)?;
    temp.as_file().sync_all().map_err(failed)?;
    temp.persist(path).map_err(|e| failed(e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_and_private_names_are_refused() {
        assert!(unusable("example.com").is_none());
        assert!(unusable("www.example-1.com").is_none());
        let wildcard = unusable("*.example.com").expect("refused");
        assert!(wildcard.contains("DNS-01"), "{wildcard}");
        for name in [
            "localhost",
            "app.localhost",
            "127.0.0.1",
            "::1",
            "../x.com",
            "a_b.com",
        ] {
            assert!(unusable(name).is_some(), "{name}");
        }
    }

    #[test]
    fn the_server_directory_names_its_host_and_port() {
        assert_eq!(
            server_dir(LETS_ENCRYPT),
            "acme-v02.api.letsencrypt.org-directory"
        );
        assert_eq!(
            server_dir("https://127.0.0.1:14000/dir"),
            "127.0.0.1_14000-dir"
        );
        assert_eq!(
            server_dir("https://ca.test/acme/b/directory"),
            "ca.test-acme-b-directory"
        );
        assert_eq!(server_dir("https://ca.test"), "ca.test");
        assert_eq!(server_dir("not a url"), "acme");
    }

    fn certificate(days_before: i64, days_after: i64) -> CertifiedKey {
        certificate_secs(days_before * 86_400, days_after * 86_400)
    }

    fn certificate_secs(before: i64, after: i64) -> CertifiedKey {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["a.test".to_string()]).expect("params");
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::seconds(before);
        params.not_after = now + time::Duration::seconds(after);
        let cert = params.self_signed(&key).expect("cert");
        let signing = provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            )))
            .expect("key");
        CertifiedKey::new(vec![cert.der().clone()], signing)
    }

    #[test]
    fn renewal_is_due_two_thirds_into_the_lifetime() {
        let fresh = certificate(1, 89);
        let due = renew_at(&fresh).expect("due");
        let in_days = due
            .duration_since(SystemTime::now())
            .expect("future")
            .as_secs_f64()
            / 86_400.0;
        assert!((58.5..=59.5).contains(&in_days), "{in_days}");
        let old = certificate(80, 10);
        assert!(renew_at(&old).expect("due") < SystemTime::now());
    }

    #[test]
    fn retries_double_up_to_an_hour_and_quicken_near_expiry() {
        let within = |d: Duration, base: u64| {
            d >= Duration::from_secs(base) && d <= Duration::from_secs(base + base / 10 + 1)
        };
        assert!(within(retry_after(1, None), 300));
        assert!(within(retry_after(2, None), 600));
        assert!(within(retry_after(30, None), 6 * 3600));
        // Ten days left: six hours at most still.
        let ten_days = certificate(80, 10);
        assert!(within(retry_after(30, Some(&ten_days)), 6 * 3600));
        // Expired: no hurry beyond the doubling.
        let expired = certificate(90, -1);
        assert!(within(retry_after(3, Some(&expired)), 1200));
        // An hour left: a quarter of it, then no less than a minute.
        let hour = certificate_secs(90 * 86_400, 3600);
        assert!(within(retry_after(30, Some(&hour)), 900));
        let minute = certificate_secs(90 * 86_400, 30);
        assert!(within(retry_after(30, Some(&minute)), 60));
        // A certificate of a few minutes: a tenth of its lifetime.
        let short = certificate_secs(36, 4);
        assert!(within(retry_after(30, Some(&short)), 4));
    }

    #[test]
    fn orders_are_spaced_more_when_a_new_certificate_is_due_at_once() {
        let hour = Duration::from_secs(3600);
        // Let's Encrypt's 90 days: an hour; a 45 s test certificate: 4 s.
        assert_eq!(hold_after_order(&certificate(0, 90), 0, 0), hour);
        assert_eq!(
            hold_after_order(&certificate_secs(0, 45), 0, 0),
            Duration::from_secs(4)
        );
        // A clock off: six hours, doubling, at most a week.
        assert_eq!(hold_after_order(&certificate(0, 90), 1, 0), 6 * hour);
        assert_eq!(hold_after_order(&certificate(0, 90), 2, 0), 12 * hour);
        assert_eq!(hold_after_order(&certificate(0, 90), 30, 0), 7 * 24 * hour);
        // Early orders in a row (the CA's window each time): doubling.
        assert_eq!(hold_after_order(&certificate(0, 90), 0, 3), 8 * hour);
        // A certificate of a second: still a second apart.
        assert!(hold_after_order(&certificate_secs(0, 1), 0, 0) >= Duration::from_secs(1));
    }

    #[test]
    fn renewal_follows_the_cas_window_within_the_lifetime() {
        let day = Duration::from_secs(86_400);
        let issued = UNIX_EPOCH + 20_000 * day;
        let lifetime = (issued, issued + 90 * day);
        let window = (issued + 60 * day, issued + 62 * day);
        // A uniform pick across the window, ends included.
        assert_eq!(pick_in(window, 0.0), window.0);
        assert_eq!(pick_in(window, 0.5), issued + 61 * day);
        assert!(pick_in(window, 0.999_999) <= window.1);
        // A backwards window means its start.
        assert_eq!(pick_in((window.1, window.0), 0.7), window.1);
        // An early window (the CA wants the certificate replaced) is kept.
        let early = pick_in((issued + day, issued + 2 * day), 0.0);
        assert_eq!(ari_due(early, lifetime), issued + day);
        // A window past five sixths of the lifetime is cut there.
        let late = pick_in((issued + 89 * day, issued + 95 * day), 0.5);
        assert_eq!(ari_due(late, lifetime), issued + 75 * day);
        let picks: Vec<f64> = (0..64).map(|_| random_fraction()).collect();
        assert!(picks.iter().all(|f| (0.0..1.0).contains(f)));
        assert!(
            picks.windows(2).any(|w| w[0] != w[1]),
            "the picks are not random"
        );
    }

    #[test]
    fn an_issued_certificate_has_an_ari_identifier() {
        // A certificate signed by a CA carries the CA's key identifier.
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_identifier_method = rcgen::KeyIdMethod::Sha256;
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let mut leaf = rcgen::CertificateParams::new(vec!["a.test".to_string()]).expect("params");
        leaf.use_authority_key_identifier_extension = true;
        leaf.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x01, 0x02, 0x03]));
        let cert = leaf.signed_by(&key, &issuer).expect("leaf");
        let signing = provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            )))
            .expect("key");
        let pair = CertifiedKey::new(vec![cert.der().clone(), ca_cert.der().clone()], signing);
        let id = certificate_id(&pair).expect("an identifier");
        assert_eq!(id.serial, "AQID");
        assert!(!id.authority_key_identifier.is_empty());
        // A self-signed one without the extension has none.
        assert!(certificate_id(&certificate(1, 89)).is_none());
    }

    #[test]
    fn words_from_the_server_fit_one_log_line() {
        assert_eq!(
            printable("validation failed:\nfake\x1b[31m line"),
            "validation failed: fake [31m line"
        );
        let long = printable(&"é".repeat(1000));
        assert!(long.len() <= 512 + '…'.len_utf8(), "{}", long.len());
        assert!(long.ends_with('…'));
    }
}
