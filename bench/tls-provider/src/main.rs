//! Server-side CPU per full TLS 1.3 handshake (ECDSA P-256 certificate),
//! client and server in one process, for the provider chosen at build time
//! (`--features ring` or `--features aws`). `tls-provider N [x25519]`:
//! N handshakes with the provider's default key exchange groups, or with
//! X25519 alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

fn provider(x25519_only: bool) -> Arc<rustls::crypto::CryptoProvider> {
    // Deprecated by rustls for having no post-quantum key exchange: that
    // is part of what is measured here.
    #[cfg(feature = "ring")]
    #[allow(deprecated)]
    let (mut provider, x25519) = (
        rustls::crypto::ring::default_provider(),
        rustls::crypto::ring::kx_group::X25519,
    );
    #[cfg(feature = "aws")]
    let (mut provider, x25519) = (
        rustls::crypto::aws_lc_rs::default_provider(),
        rustls::crypto::aws_lc_rs::kx_group::X25519,
    );
    if x25519_only {
        provider.kx_groups = vec![x25519];
    }
    Arc::new(provider)
}

/// Moves every pending record from `from` to `to`.
fn pump(from: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl rustls::SideData>>, to: &mut Vec<u8>) {
    while from.wants_write() {
        from.write_tls(to).expect("write_tls");
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let x25519_only = args.next().is_some_and(|a| a == "x25519");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let cert = rcgen::CertificateParams::new(vec!["bench.test".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let der = CertificateDer::from(cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let server = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider(x25519_only))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .expect("server config"),
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).expect("root");
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider(x25519_only))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let name = ServerName::try_from("bench.test").expect("name");
    let mut server_time = Duration::ZERO;
    let mut group = None;
    for _ in 0..n {
        let mut c = rustls::ClientConnection::new(Arc::clone(&client), name.clone()).expect("client");
        let mut s = rustls::ServerConnection::new(Arc::clone(&server)).expect("server");
        while c.is_handshaking() || s.is_handshaking() {
            let mut to_server = Vec::new();
            pump(&mut c, &mut to_server);
            let started = Instant::now();
            let mut records = &to_server[..];
            while !records.is_empty() {
                s.read_tls(&mut records).expect("read_tls");
            }
            s.process_new_packets().expect("server");
            let mut to_client = Vec::new();
            pump(&mut s, &mut to_client);
            server_time += started.elapsed();
            let mut records = &to_client[..];
            while !records.is_empty() {
                c.read_tls(&mut records).expect("read_tls");
            }
            c.process_new_packets().expect("client");
        }
        group = s.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name()));
    }
    println!(
        "{n} handshakes, key exchange {}: {:.1} µs of server CPU each ({:.0} per second per core)",
        group.unwrap_or_default(),
        server_time.as_secs_f64() * 1e6 / f64::from(n),
        f64::from(n) / server_time.as_secs_f64()
    );
}
