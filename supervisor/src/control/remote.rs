//! The control service on TCP (`[platform.control]`), for managing a host
//! from elsewhere, with mutual TLS and nothing else: the client proves
//! itself with a certificate chaining to `client_ca` during the handshake,
//! and a connection without one never reaches the gRPC service. TLS 1.3
//! only, ALPN `h2`, no session tickets (every connection shows its
//! certificate).
//!
//! The files are looked at again every few seconds and for every new
//! connection, and re-read when one changed (a renewed server certificate,
//! a rotated client CA), so no restart is needed; a broken replacement is
//! logged and the last good configuration kept. A changed `client_ca` also
//! closes the connections opened under the old one (rotating it is how a
//! client is revoked). Handshakes are bounded in time, in number and per
//! client address: a connection beyond the bounds is closed at once rather
//! than queued, so idle connections cannot hold an operator's back for
//! long. Firewall the port all the same.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::RootCertStore;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use super::Service;
use crate::config::platform::RemoteControl;
use crate::listener::tls::{Stamp, expired, load_pair, provider, stamp};

/// Longest a TLS handshake on the control port may take (a mutual-TLS
/// handshake takes milliseconds).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Handshakes under way at once; a connection beyond is closed at once.
pub const MAX_HANDSHAKES: usize = 16;

/// Handshakes under way at once from one client address.
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 4;

/// How often the files are looked at when no connection comes.
const RECHECK: Duration = Duration::from_secs(5);

/// At most one warning per this about refused connections (with a count).
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The certificates in the PEM file `path`, as roots to trust (the client
/// CA here; the server's CA in `bextctl --connect`). Refused: an
/// unreadable file, no certificate in it, a certificate that is not a CA's
/// (a leaf or a server's chain given by mistake would let in whatever it
/// or its issuer signs).
pub fn pem_roots(path: &Path) -> Result<Arc<RootCertStore>, String> {
    let certs = pem_certs(path)?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        let is_ca = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| format!("{}: not a certificate: {e}", path.display()))?
            .1
            .is_ca();
        if !is_ca {
            return Err(format!(
                "{}: holds a certificate that is not a CA's (basicConstraints CA:TRUE): give the CA that signs the clients' certificates",
                path.display()
            ));
        }
        roots
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

/// The certificates of the PEM file `path`, at least one.
fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem =
        crate::config::read_small_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// The TLS server side of the control port: the certificate in `cert` and
/// `key` (not expired), client certificates required and checked against
/// `client_ca`, which must hold none of the intermediates of the server's
/// chain (a public CA's would admit whatever that CA signs; a private root
/// signing both sides is fine).
pub fn server_config(settings: &RemoteControl) -> Result<Arc<ServerConfig>, String> {
    let roots = pem_roots(&settings.client_ca)?;
    let pair = load_pair(&settings.cert, &settings.key)?;
    if let Some(when) = expired(&pair) {
        return Err(format!("{}: {when}", settings.cert.display()));
    }
    let client_ca = pem_certs(&settings.client_ca)?;
    let self_issued = |der: &CertificateDer<'_>| {
        x509_parser::parse_x509_certificate(der.as_ref())
            .is_ok_and(|(_, c)| c.subject().as_raw() == c.issuer().as_raw())
    };
    if pair
        .cert
        .iter()
        .skip(1)
        .any(|c| !self_issued(c) && client_ca.contains(c))
    {
        return Err(format!(
            "{} holds an intermediate CA of the server's own chain ({}): whatever that CA signs would get in; client_ca must be a CA of its own for operators",
            settings.client_ca.display(),
            settings.cert.display()
        ));
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .clear_root_hint_subjects()
        .build()
        .map_err(|e| format!("{}: {e}", settings.client_ca.display()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(pair)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.max_early_data_size = 0;
    // No resumption: a resumed session would skip the certificate check
    // (and outlive a rotated client CA).
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// The server configuration, rebuilt when one of its files changes.
struct Current {
    settings: RemoteControl,
    stamps: [Stamp; 3],
    config: Arc<ServerConfig>,
    /// Bumped when a new client CA is in force: the connections opened
    /// under the old one close.
    generation: watch::Sender<u64>,
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
            generation: watch::Sender::new(0),
        })
    }

    /// The configuration for a new connection: re-read when a file
    /// changed, the last good one while the files are broken.
    fn get(&mut self) -> Arc<ServerConfig> {
        let stamps = Self::stamps(&self.settings);
        if stamps != self.stamps {
            let new_ca = stamps[2] != self.stamps[2];
            // Looked at once per change: a half-written file is reported
            // once, and tried again when it changes again.
            self.stamps = stamps;
            match server_config(&self.settings) {
                Ok(config) => {
                    self.config = config;
                    if new_ca {
                        info!(listen = %self.settings.listen, "control port: a new client CA; connections under the old one are closed");
                        self.generation.send_modify(|g| *g += 1);
                    } else {
                        info!(listen = %self.settings.listen, "control port: certificate re-read");
                    }
                }
                Err(e) => warn!("control port: keeping the previous certificates: {e}"),
            }
        }
        Arc::clone(&self.config)
    }
}

/// Refused connections, warned about at most once per [`WARN_EVERY`].
#[derive(Default)]
struct Refusals {
    count: u64,
    last_warning: Option<Instant>,
}

impl Refusals {
    fn refused(&mut self, peer: SocketAddr, why: &str) {
        self.count += 1;
        debug!(%peer, "control port: refused a connection: {why}");
        if self
            .last_warning
            .is_none_or(|at| at.elapsed() >= WARN_EVERY)
        {
            warn!(%peer, refused = self.count, "control port: refused {} connection(s) since the last warning, latest: {why}", self.count);
            self.count = 0;
            self.last_warning = Some(Instant::now());
        }
    }
}

/// Who is at the other end of a control connection.
#[derive(Debug, Clone)]
pub struct RemotePeer {
    pub addr: SocketAddr,
    /// The client certificate's subject, for the log.
    pub subject: String,
}

/// A control connection that passed the handshake. It ends (reads fail)
/// when a new client CA comes into force.
pub struct RemoteStream {
    tls: TlsStream<TcpStream>,
    peer: RemotePeer,
    revoked: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl std::fmt::Debug for RemoteStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStream")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
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
        // Polled with every read, so a revocation wakes the connection.
        if self.revoked.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the control port's client CA changed",
            )));
        }
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

/// Handshakes under way, in all and per client address.
#[derive(Default)]
struct InFlight {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// One handshake's place in [`InFlight`], given back on drop.
struct Slot {
    table: Arc<Mutex<InFlight>>,
    ip: IpAddr,
}

impl Slot {
    /// A place for a handshake from `ip`, if the bounds allow one.
    fn take(table: &Arc<Mutex<InFlight>>, ip: IpAddr) -> Result<Slot, &'static str> {
        let mut inflight = table.lock().unwrap_or_else(|e| e.into_inner());
        if inflight.total >= MAX_HANDSHAKES {
            return Err("too many handshakes under way");
        }
        let mine = inflight.by_address.entry(ip).or_default();
        if *mine >= MAX_HANDSHAKES_PER_ADDRESS {
            return Err("too many handshakes under way from this address");
        }
        *mine += 1;
        inflight.total += 1;
        Ok(Slot {
            table: Arc::clone(table),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inflight = self.table.lock().unwrap_or_else(|e| e.into_inner());
        inflight.total = inflight.total.saturating_sub(1);
        if let Some(mine) = inflight.by_address.get_mut(&self.ip) {
            *mine -= 1;
            if *mine == 0 {
                inflight.by_address.remove(&self.ip);
            }
        }
    }
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
    let refusals = Arc::new(Mutex::new(Refusals::default()));
    let accepting = async move {
        let inflight = Arc::new(Mutex::new(InFlight::default()));
        let mut recheck = tokio::time::interval(RECHECK);
        loop {
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
                _ = recheck.tick() => {
                    current.get();
                    continue;
                }
                () = ready.closed() => return,
            };
            let slot = match Slot::take(&inflight, peer.ip()) {
                Ok(slot) => slot,
                Err(why) => {
                    // Closed at once, never queued: a flood cannot hold an
                    // operator's connection back for long.
                    drop(tcp);
                    refusals
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .refused(peer, why);
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(current.get());
            let mut generation = current.generation.subscribe();
            let (ready, refusals) = (ready.clone(), Arc::clone(&refusals));
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(slot);
                match handshake {
                    Ok(Ok(tls)) => {
                        let peer = RemotePeer {
                            addr: peer,
                            subject: subject(&tls),
                        };
                        info!(peer = %peer.addr, client = %peer.subject, "control port: a client connected");
                        let revoked = Box::pin(async move {
                            // A closed sender (the port stopping) is no
                            // revocation: the connection ends with the task.
                            if generation.changed().await.is_err() {
                                std::future::pending::<()>().await;
                            }
                        });
                        let _ = ready.send(RemoteStream { tls, peer, revoked }).await;
                    }
                    Ok(Err(e)) => refusals
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .refused(peer, &format!("handshake failed: {e}")),
                    Err(_) => refusals
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .refused(peer, "handshake timed out"),
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
            // A client gone without a word is noticed.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
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
