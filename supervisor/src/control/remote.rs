//! The control service on TCP (`[platform.control]`), for managing a host
//! from elsewhere, with mutual TLS and nothing else: the client proves
//! itself with a certificate signed by `client_ca` during the handshake,
//! and a connection without one never reaches the gRPC service. TLS 1.3
//! only, ALPN `h2`.
//!
//! The files are looked at again for every new connection and re-read when
//! one changed (a renewed server certificate, a rotated client CA), so no
//! restart is needed; a broken replacement is logged and the last good
//! configuration kept. Handshakes are bounded in time and in number, so a
//! flood of idle connections on the port costs nothing beyond them.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use super::Service;
use crate::config::platform::RemoteControl;
use crate::listener::tls::{Stamp, load_pair, provider, stamp};

/// Longest a TLS handshake on the control port may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes under way at once; further connections wait in the kernel's
/// backlog until one is over.
pub const MAX_HANDSHAKES: usize = 16;

/// The certificates in the PEM file `path`, as roots to trust (the client
/// CA here; the server's CA in `bextctl --connect`). Refused: an
/// unreadable file, no certificate in it, one that is not a usable CA
/// certificate.
pub fn pem_roots(path: &Path) -> Result<Arc<RootCertStore>, String> {
    let pem =
        crate::config::read_small_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

/// The TLS server side of the control port: the certificate in `cert` and
/// `key`, client certificates required and checked against `client_ca`.
pub fn server_config(settings: &RemoteControl) -> Result<Arc<ServerConfig>, String> {
    let roots = pem_roots(&settings.client_ca)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| format!("{}: {e}", settings.client_ca.display()))?;
    let pair = load_pair(&settings.cert, &settings.key)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(pair)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// The server configuration, rebuilt when one of its files changes.
struct Current {
    settings: RemoteControl,
    stamps: [Stamp; 3],
    config: Arc<ServerConfig>,
}

impl Current {
    fn stamps(settings: &RemoteControl) -> [Stamp; 3] {
        [
            stamp(&settings.cert),
            stamp(&settings.key),
            stamp(&settings.client_ca),
        ]
    }

    fn load(settings: RemoteControl) -> Result<Self, String> {
        let stamps = Self::stamps(&settings);
        let config = server_config(&settings)?;
        Ok(Current {
            settings,
            stamps,
            config,
        })
    }

    /// The configuration for a new connection: re-read when a file
    /// changed, the last good one while the files are broken.
    fn get(&mut self) -> Arc<ServerConfig> {
        let stamps = Self::stamps(&self.settings);
        if stamps != self.stamps {
            // Looked at once per change: a half-written file is reported
            // once, and tried again when it changes again.
            self.stamps = stamps;
            match server_config(&self.settings) {
                Ok(config) => {
                    info!(listen = %self.settings.listen, "control port: certificates re-read");
                    self.config = config;
                }
                Err(e) => warn!("control port: keeping the previous certificates: {e}"),
            }
        }
        Arc::clone(&self.config)
    }
}

/// Who is at the other end of a control connection.
#[derive(Debug, Clone)]
pub struct RemotePeer {
    pub addr: SocketAddr,
    /// The client certificate's subject, for the log.
    pub subject: String,
}

/// A control connection that passed the handshake.
#[derive(Debug)]
pub struct RemoteStream {
    tls: TlsStream<TcpStream>,
    peer: RemotePeer,
}

impl tonic::transport::server::Connected for RemoteStream {
    type ConnectInfo = RemotePeer;

    fn connect_info(&self) -> RemotePeer {
        self.peer.clone()
    }
}

impl AsyncRead for RemoteStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for RemoteStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// The subject of the client certificate `tls` was opened with.
fn subject(tls: &TlsStream<TcpStream>) -> String {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|der| {
            x509_parser::parse_x509_certificate(der.as_ref())
                .ok()
                .map(|(_, cert)| cert.subject().to_string())
        })
        .unwrap_or_else(|| "?".to_string())
}

/// Binds `settings.listen` and serves `service` there, with mutual TLS,
/// until the task is aborted. Returns the bound address (the port, when
/// `listen` asks for port 0).
pub fn serve(
    settings: &RemoteControl,
    service: Service,
) -> io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let mut current = Current::load(settings.clone()).map_err(io::Error::other)?;
    let listener = std::net::TcpListener::bind(settings.listen)?;
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener)?;
    let addr = listener.local_addr()?;
    let (ready, connections) = mpsc::channel::<RemoteStream>(MAX_HANDSHAKES);
    let accepting = async move {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
                return;
            };
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        debug!("control port: accept failed: {e}");
                        // Out of descriptors: give the others a moment.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = ready.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(current.get());
            let ready = ready.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let peer = RemotePeer {
                            addr: peer,
                            subject: subject(&tls),
                        };
                        info!(peer = %peer.addr, client = %peer.subject, "control port: a client connected");
                        let _ = ready.send(RemoteStream { tls, peer }).await;
                    }
                    // Scanners and clients without a certificate: not worth
                    // a line each at the default level.
                    Ok(Err(e)) => debug!(%peer, "control port: refused a handshake: {e}"),
                    Err(_) => debug!(%peer, "control port: a handshake timed out"),
                }
            });
        }
    };
    let incoming = futures_util::stream::unfold(connections, |mut connections| async move {
        connections
            .recv()
            .await
            .map(|stream| (Ok::<_, io::Error>(stream), connections))
    });
    let task = tokio::spawn(async move {
        let serving = tonic::transport::Server::builder()
            .add_service(service.server())
            .serve_with_incoming(incoming);
        tokio::select! {
            served = serving => if let Err(e) = served {
                warn!("the control port stopped: {e}");
            },
            () = accepting => {}
        }
    });
    Ok((addr, task))
}
