//! `[platform.tls] issuer = "internal"`: a certificate authority of bext's
//! own, for staging and development, that issues every domain's
//! certificate at once and on the host (any name: wildcards, `localhost`,
//! IP addresses, names no public CA would sign).
//!
//! The CA is made once and kept in `data_dir/internal-ca/`: `ca.pem` (its
//! certificate and key, 0600) and `root.crt` (its certificate alone,
//! 0644: what clients are told to trust). Its certificates live for
//! [`LEAF_LIFETIME`] and are renewed by the same task that keeps ACME ones.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::sign::CertifiedKey;

use super::tls::{parse_pair, provider};

/// How long an issued certificate is valid (renewed two thirds in).
pub(super) const LEAF_LIFETIME: Duration = Duration::from_secs(7 * 86_400);
/// How long the CA itself is valid.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Issued certificates start this long before now (clients' clocks lag).
const BACKDATE: Duration = Duration::from_secs(3600);

/// The CA: what signs, and its certificate (sent after each leaf).
pub(super) struct LocalCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    root_pem: String,
    root_der: rustls_pki_types::CertificateDer<'static>,
    /// The CA's notAfter: no certificate it signs outlives it.
    not_after: time::OffsetDateTime,
    /// `root.crt`, for the log and the README's advice.
    pub(super) root_path: PathBuf,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("root_path", &self.root_path)
            .finish_non_exhaustive()
    }
}

impl LocalCa {
    /// The CA kept in `dir`, or a new one made and kept there. Whether it
    /// was made now is the second value.
    pub(super) fn open(dir: &Path) -> Result<(LocalCa, bool), String> {
        let kept = dir.join("ca.pem");
        let root_path = dir.join("root.crt");
        let (issuer, root_pem, made) = match crate::config::read_small_file(&kept) {
            Ok(pem) => {
                let failed = |e: &dyn std::fmt::Display| format!("{}: {e}", kept.display());
                // Anyone who could read it could sign for any name on the
                // machines that trust the root.
                use std::os::unix::fs::MetadataExt;
                let mode = std::fs::metadata(&kept).map_err(|e| failed(&e))?.mode();
                if mode & 0o077 != 0 {
                    return Err(failed(&format_args!(
                        "readable by others (mode {:o}): chmod 600 it, or delete it to make a new CA",
                        mode & 0o777
                    )));
                }
                let key = {
                    use rustls_pki_types::pem::PemObject;
                    let der = rustls_pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes())
                        .map_err(|e| failed(&e))?;
                    rcgen::KeyPair::try_from(&der).map_err(|e| failed(&e))?
                };
                let root_pem = root_pem_of(&pem).ok_or_else(|| failed(&"no certificate in it"))?;
                let issuer =
                    rcgen::Issuer::from_ca_cert_pem(&root_pem, key).map_err(|e| failed(&e))?;
                // The key must be the certificate's (a file put together
                // by hand could hold another).
                let pair = parse_pair(pem.as_bytes(), pem.as_bytes(), "the CA", "its key")
                    .map_err(|e| failed(&e))?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
                if super::tls::validity(&pair).is_none_or(|(_, end)| end <= now) {
                    return Err(failed(
                        &"the CA has expired: delete it to make a new one (and trust the new root.crt)",
                    ));
                }
                (issuer, root_pem, false)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (issuer, root_pem, key_pem) = new_ca()?;
                super::acme::save_private(&kept, format!("{root_pem}{key_pem}").as_bytes())?;
                (issuer, root_pem, true)
            }
            Err(e) => return Err(format!("{}: {e}", kept.display())),
        };
        // Written at every start (readable by all: it is public), so a
        // deleted or edited copy comes back as it should be.
        write_public(&root_path, root_pem.as_bytes())?;
        use rustls_pki_types::pem::PemObject;
        let root_der = rustls_pki_types::CertificateDer::from_pem_slice(root_pem.as_bytes())
            .map_err(|e| format!("{}: {e}", kept.display()))?;
        let not_after = x509_parser::parse_x509_certificate(&root_der)
            .map_err(|e| format!("{}: {e}", kept.display()))?
            .1
            .validity()
            .not_after
            .to_datetime();
        Ok((
            LocalCa {
                issuer,
                root_pem,
                root_der,
                not_after,
                root_path,
            },
            made,
        ))
    }

    /// Whether `pair` was signed by this CA (its chain ends with this
    /// CA's certificate, as [`LocalCa::issue`] makes it).
    pub(super) fn signed(&self, pair: &CertifiedKey) -> bool {
        pair.cert.len() == 2 && pair.cert[1] == self.root_der
    }

    /// A certificate for `domain` (a name, a `*.` wildcard or an IP
    /// address), with this CA's certificate after it, and its PEM (chain,
    /// then key) to keep.
    pub(super) fn issue(&self, domain: &str) -> Result<(Arc<CertifiedKey>, Vec<u8>), String> {
        let failed = |e: rcgen::Error| format!("the internal CA, for `{domain}`: {e}");
        let key = rcgen::KeyPair::generate().map_err(failed)?;
        let mut params = rcgen::CertificateParams::new(vec![domain.to_string()]).map_err(failed)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, domain);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = (now + LEAF_LIFETIME).min(self.not_after);
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = params.signed_by(&key, &self.issuer).map_err(failed)?;
        let pem = format!("{}{}{}", leaf.pem(), self.root_pem, key.serialize_pem());
        let pair = parse_pair(
            pem.as_bytes(),
            pem.as_bytes(),
            "the internal CA's",
            "its key",
        )?;
        Ok((Arc::new(pair), pem.into_bytes()))
    }
}

/// A new CA: its issuer, certificate PEM and key PEM.
fn new_ca() -> Result<(rcgen::Issuer<'static, rcgen::KeyPair>, String, String), String> {
    let failed = |e: rcgen::Error| format!("making the internal CA: {e}");
    let key = rcgen::KeyPair::generate().map_err(failed)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string());
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("bext internal CA ({host})"),
    );
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "bext");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params.key_identifier_method = rcgen::KeyIdMethod::Sha256;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_LIFETIME;
    params.serial_number = Some(random_serial()?);
    let certificate = params.self_signed(&key).map_err(failed)?;
    let root_pem = certificate.pem();
    let key_pem = key.serialize_pem();
    Ok((rcgen::Issuer::new(params, key), root_pem, key_pem))
}

/// The first certificate of `pem`, as PEM.
fn root_pem_of(pem: &str) -> Option<String> {
    let start = pem.find("-----BEGIN CERTIFICATE-----")?;
    let end_marker = "-----END CERTIFICATE-----";
    let end = start + pem[start..].find(end_marker)? + end_marker.len();
    Some(format!("{}\n", &pem[start..end]))
}

/// 16 random bytes, the top bit clear (a positive serial number).
fn random_serial() -> Result<rcgen::SerialNumber, String> {
    let mut bytes = [0u8; 16];
    provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| "no random numbers for a serial number".to_string())?;
    bytes[0] &= 0x7f;
    Ok(rcgen::SerialNumber::from_slice(&bytes))
}

/// Writes `bytes` to `path` whole, readable by everyone.
fn write_public(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let failed = |e: std::io::Error| format!("{}: {e}", path.display());
    let dir = path
        .parent()
        .ok_or_else(|| format!("{}: no directory", path.display()))?;
    let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(failed)?;
    temp.write_all(bytes).map_err(failed)?;
    temp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(failed)?;
    temp.persist(path).map_err(|e| failed(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustls_pki_types::pem::PemObject;

    #[test]
    fn the_ca_is_made_once_and_signs_any_name() {
        let dir = tempfile::tempdir().expect("dir");
        let ca_dir = dir.path().join("internal-ca");
        let (ca, made) = LocalCa::open(&ca_dir).expect("made");
        assert!(made);
        let root = std::fs::read(&ca.root_path).expect("root.crt");
        let (again, made) = LocalCa::open(&ca_dir).expect("kept");
        assert!(!made, "the CA is kept, not made again");
        assert_eq!(std::fs::read(&again.root_path).expect("root.crt"), root);
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&ca_dir.join("ca.pem")), 0o600);
        assert_eq!(mode(&ca.root_path), 0o644);

        // Each name verifies against the root, as a client would check it.
        let root_der = rustls_pki_types::CertificateDer::from_pem_slice(&root).expect("root der");
        let anchor = webpki::anchor_from_trusted_cert(&root_der).expect("anchor");
        for (domain, client_name) in [
            ("a.test", "a.test"),
            ("*.w.test", "x.w.test"),
            ("localhost", "localhost"),
            ("127.0.0.1", "127.0.0.1"),
        ] {
            let (pair, pem) = again.issue(domain).expect("issued");
            assert!(super::super::tls::covers(&pair, domain), "{domain}");
            let leaf = webpki::EndEntityCert::try_from(&pair.cert[0]).expect("leaf");
            let name = rustls_pki_types::ServerName::try_from(client_name).expect("name");
            leaf.verify_is_valid_for_subject_name(&name)
                .expect("valid for the name");
            leaf.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                std::slice::from_ref(&anchor),
                &pair.cert[1..],
                rustls_pki_types::UnixTime::now(),
                webpki::KeyUsage::server_auth(),
                None,
                None,
            )
            .expect("chains to the root");
            // What is kept on disk is the same pair.
            let kept = parse_pair(&pem, &pem, "kept", "key").expect("parses");
            assert_eq!(kept.cert, pair.cert);
        }
    }

    #[test]
    fn a_ca_file_with_another_key_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let (ca, _) = LocalCa::open(dir.path()).expect("made");
        let other = rcgen::KeyPair::generate().expect("key").serialize_pem();
        std::fs::write(dir.path().join("ca.pem"), format!("{}{other}", ca.root_pem))
            .expect("write");
        let error = LocalCa::open(dir.path()).expect_err("refused");
        assert!(error.contains("ca.pem"), "{error}");
    }

    #[test]
    fn a_ca_file_others_can_read_is_refused_and_another_cas_certificates_are_not_its() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let (ca, _) = LocalCa::open(dir.path()).expect("made");
        let (pair, _) = ca.issue("a.test").expect("issued");
        assert!(ca.signed(&pair));
        let other_dir = tempfile::tempdir().expect("dir");
        let (other, _) = LocalCa::open(other_dir.path()).expect("made");
        assert!(
            !other.signed(&pair),
            "a CA made again does not own the old certificates"
        );
        let kept = dir.path().join("ca.pem");
        std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let error = LocalCa::open(dir.path()).expect_err("refused");
        assert!(error.contains("chmod 600"), "{error}");
    }
}
