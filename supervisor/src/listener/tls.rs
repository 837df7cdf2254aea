//! TLS termination: rustls on aws-lc-rs (see `bench/tls-provider.sh`),
//! TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`, session tickets, no 0-RTT
//! (early data can be replayed).
//!
//! Certificates are chosen by SNI through the same domain trie the router
//! uses ([`RouteTable`]: exact names before wildcards); a client that
//! sends no SNI (or a name no app has) gets the default certificate. The
//! table is swapped whole (a reload), so a handshake sees the old
//! certificates or the new ones, never a mix.

use std::path::Path;
use std::sync::Arc;

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
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let key_pem = read(key)?;
    let private = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("{}: not a PEM private key: {e}", key.display()))?;
    let signing = provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let pair = CertifiedKey::new(chain, signing);
    pair.keys_match().map_err(|_| {
        format!(
            "{} is not the key of the certificate in {}",
            key.display(),
            cert.display()
        )
    })?;
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

/// Certificates by server name, swapped whole.
#[derive(Debug)]
pub struct Certificates {
    table: ArcSwap<RouteTable<CertifiedKey>>,
}

impl Certificates {
    /// `routes`: (domain pattern, certificate); `default` answers clients
    /// without SNI or with a name no pattern matches.
    pub fn new(
        routes: Vec<(String, Arc<CertifiedKey>)>,
        default: Option<Arc<CertifiedKey>>,
    ) -> Self {
        Certificates {
            table: ArcSwap::from_pointee(RouteTable::new(routes, default)),
        }
    }

    /// Takes over `routes` for the handshakes that follow.
    pub fn replace(
        &self,
        routes: Vec<(String, Arc<CertifiedKey>)>,
        default: Option<Arc<CertifiedKey>>,
    ) {
        self.table.store(Arc::new(RouteTable::new(routes, default)));
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let table = self.table.load();
        match hello.server_name() {
            Some(name) => table.route(name).cloned(),
            None => table.route("").cloned(),
        }
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
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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
