//! Finding and opening the supervisor's control socket: which path
//! (`--socket`, `--config`, `BEXT_SOCKET`, the default) and a gRPC channel
//! over it, connected eagerly so that a supervisor that is not there is
//! reported before any work is done. It knows nothing of the RPCs.

use std::error::Error as _;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::ServerName;

use bext_proto::control::v1::control_client::ControlClient;
use hyper_util::rt::TokioIo;
use tonic::Code;
use tonic::transport::{Channel, Endpoint, Uri};

use super::CtlError;
use crate::config::platform::DEFAULT_DATA_DIR;

/// The socket's name inside the platform's data directory.
pub const SOCKET_NAME: &str = "control.sock";

/// Where the socket is: `--socket`, else the data directory of `--config`,
/// else `BEXT_SOCKET`, else the default data directory. An explicit flag
/// wins over the environment.
pub fn resolve_socket(
    socket: Option<&Path>,
    config: Option<&Path>,
    env_socket: Option<&Path>,
) -> Result<PathBuf, CtlError> {
    if let Some(socket) = socket {
        return Ok(socket.to_path_buf());
    }
    if let Some(config) = config {
        return Ok(data_dir(config)?.join(SOCKET_NAME));
    }
    if let Some(socket) = env_socket {
        return Ok(socket.to_path_buf());
    }
    Ok(Path::new(DEFAULT_DATA_DIR).join(SOCKET_NAME))
}

/// The `[platform] data_dir` of a platform file, read minimally: the rest
/// of the file is the server's to validate (`bext check`). A relative
/// data_dir is relative to the current directory, as for `bext serve`.
fn data_dir(config: &Path) -> Result<PathBuf, CtlError> {
    let text = std::fs::read_to_string(config).map_err(|source| CtlError::ReadConfig {
        path: config.to_path_buf(),
        source,
    })?;
    let parse_error = |reason: String| CtlError::ParseConfig {
        path: config.to_path_buf(),
        reason,
    };
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| parse_error(one_line(&text, &e)))?;
    let Some(platform) = table.get("platform") else {
        return Ok(PathBuf::from(DEFAULT_DATA_DIR));
    };
    let Some(platform) = platform.as_table() else {
        return Err(parse_error("`platform` must be a table".into()));
    };
    match platform.get("data_dir") {
        None => Ok(PathBuf::from(DEFAULT_DATA_DIR)),
        Some(toml::Value::String(dir)) => Ok(PathBuf::from(dir)),
        Some(_) => Err(parse_error("`platform.data_dir` must be a string".into())),
    }
}

/// A TOML error as one line (its own rendering spans several, with a
/// snippet): `line L, column C: message`.
fn one_line(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end();
    let Some(span) = error.span() else {
        return message.to_string();
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}: {message}")
}

/// An open connection to the supervisor, and where it is (for messages).
#[derive(Debug, Clone)]
pub struct Session {
    pub client: ControlClient<Channel>,
    /// The socket's path, or `https://HOST:PORT`.
    pub at: String,
    /// Over TCP with mutual TLS (`--connect`).
    pub remote: bool,
}

/// `--cert`, `--key` and `--ca`, read: the client side of `--connect`.
#[derive(Debug)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
}

impl ClientTls {
    /// Reads the three files; each must be given.
    pub fn load(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
    ) -> Result<Self, CtlError> {
        let missing = |flag: &str, env: &str| CtlError::Remote {
            what: format!(
                "--connect needs {flag} ({env}): the control port admits only clients with a certificate"
            ),
        };
        let cert = cert.ok_or_else(|| missing("--cert", "BEXT_CERT"))?;
        let key = key.ok_or_else(|| missing("--key", "BEXT_KEY"))?;
        let ca = ca.ok_or_else(|| CtlError::Remote {
            what: "--connect needs --ca (BEXT_CA): the CA the supervisor's certificate chains to"
                .into(),
        })?;
        let failed = |what: String| CtlError::Remote { what };
        let roots = crate::control::remote::pem_roots(ca).map_err(failed)?;
        let pair = crate::listener::tls::load_pair(cert, key).map_err(failed)?;
        let mut config =
            rustls::ClientConfig::builder_with_provider(crate::listener::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| failed(format!("TLS versions: {e}")))?
                .with_root_certificates(roots)
                .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(pair)));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ClientTls {
            config: Arc::new(config),
        })
    }
}

/// `HOST:PORT` (`[V6]:PORT` for an IPv6 address) split, the host as the
/// name the server's certificate must carry.
fn host_and_port(addr: &str) -> Result<(ServerName<'static>, u16), CtlError> {
    let bad = |why: &str| CtlError::Remote {
        what: format!("--connect `{addr}`: {why} (HOST:PORT, e.g. control.example.com:7443)"),
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let port: u16 = port.parse().map_err(|_| bad("not a port number"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let name =
        ServerName::try_from(host.to_string()).map_err(|_| bad("not a host name or address"))?;
    Ok((name, port))
}

impl Session {
    /// Connects now, so that an absent socket, a refused connection or a
    /// permission problem is reported before anything else happens.
    pub async fn connect(socket: &Path) -> Result<Self, CtlError> {
        let path = socket.to_path_buf();
        // The URI is required by the API and never used: the connector
        // below is the only way out.
        let channel = Endpoint::from_static("http://[::]:50051")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
                }
            }))
            .await
            .map_err(|e| CtlError::Unreachable {
                at: socket.display().to_string(),
                reason: connect_reason(&e),
            })?;
        Ok(Self {
            client: ControlClient::new(channel),
            at: socket.display().to_string(),
            remote: false,
        })
    }

    /// Connects to the control port at `addr` (`HOST:PORT`) with mutual
    /// TLS, now. A refused certificate shows at the first call (TLS 1.3
    /// servers judge the client's certificate after the client's side of
    /// the handshake is done).
    pub async fn connect_remote(addr: &str, tls: ClientTls) -> Result<Self, CtlError> {
        let (name, port) = host_and_port(addr)?;
        let at = format!("https://{addr}");
        let connector = tokio_rustls::TlsConnector::from(tls.config);
        let target = match &name {
            ServerName::DnsName(host) => format!("{}:{port}", host.as_ref()),
            ServerName::IpAddress(ip) => {
                std::net::SocketAddr::new(std::net::IpAddr::from(*ip), port).to_string()
            }
            _ => addr.to_string(),
        };
        let channel = Endpoint::from_static("http://[::]:50051")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let (connector, name, target) = (connector.clone(), name.clone(), target.clone());
                async move {
                    let tcp = tokio::time::timeout(
                        REMOTE_CONNECT_TIMEOUT,
                        tokio::net::TcpStream::connect(target),
                    )
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timed out"))??;
                    let _ = tcp.set_nodelay(true);
                    let tls =
                        tokio::time::timeout(REMOTE_CONNECT_TIMEOUT, connector.connect(name, tcp))
                            .await
                            .map_err(|_| {
                                io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                            })??;
                    Ok::<_, io::Error>(TokioIo::new(tls))
                }
            }))
            .await
            .map_err(|e| match tls_error(&e) {
                Some(tls) => tls.into_error(at.clone()),
                None => CtlError::Unreachable {
                    at: at.clone(),
                    reason: connect_reason(&e),
                },
            })?;
        Ok(Self {
            client: ControlClient::new(channel),
            at,
            remote: true,
        })
    }

    /// What a failed call means for the person who made it: a supervisor
    /// gone away or refusing this user is "unavailable" (exit 69), anything
    /// else is the operation failing with the server's message.
    pub fn call_error(&self, status: &tonic::Status) -> CtlError {
        let socket = self.at.clone();
        if self.remote {
            // On the control port a certificate is the only thing judged:
            // a connection closed at once is its refusal (TLS 1.3 clients
            // learn of it only at their first read, often as a bare close).
            if let Some(tls) = tls_error(status) {
                return tls.into_error(socket);
            }
            // A status made from the connection rather than sent by the
            // service (which carries no source): closed under the call.
            if status.source().is_some() || connection_closed(status) {
                return CtlError::RefusedCertificate {
                    at: socket,
                    reason: "it closed the connection at once; unless it just stopped".into(),
                };
            }
        }
        match status.code() {
            Code::Unavailable => CtlError::Unreachable {
                at: socket,
                reason: status_reason(status),
            },
            Code::PermissionDenied => CtlError::Refused {
                at: socket,
                reason: status_reason(status),
            },
            // The server closes a refused peer's connection at once, before
            // any HTTP/2 exchange: the call then fails with a bare
            // transport error rather than a status of its own.
            // (The same closed connection is what a supervisor that stops
            // at that moment leaves: then the hint is wrong, and says so.)
            Code::Unknown | Code::Internal if connection_closed(status) => CtlError::Refused {
                at: socket,
                reason: "it closed the connection at once; unless it just stopped".into(),
            },
            _ => CtlError::Call {
                message: status_reason(status),
            },
        }
    }

    /// Like [`Self::call_error`], for an error in the middle of a reply
    /// stream: the call was accepted, so a closed connection means the
    /// supervisor went away (it stopped, or restarted).
    pub fn stream_error(&self, status: &tonic::Status) -> CtlError {
        if matches!(
            status.code(),
            Code::Unknown | Code::Internal | Code::Unavailable
        ) && connection_closed(status)
        {
            return CtlError::Unreachable {
                at: self.at.clone(),
                reason: format!("the connection broke: {}", status_reason(status)),
            };
        }
        self.call_error(status)
    }
}

/// How long `--connect` waits for the TCP connection, then the handshake.
const REMOTE_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A TLS failure of `--connect`, by which side judged.
enum TlsFailure {
    /// bextctl did not trust the supervisor's certificate.
    Untrusted(String),
    /// The supervisor refused this client (an alert, or anything else).
    Refused(String),
}

impl TlsFailure {
    fn into_error(self, at: String) -> CtlError {
        match self {
            TlsFailure::Untrusted(reason) => CtlError::UntrustedServer { at, reason },
            TlsFailure::Refused(reason) => CtlError::RefusedCertificate { at, reason },
        }
    }
}

/// The TLS error in `error`'s chain, if the failure was one.
fn tls_error(error: &(dyn std::error::Error + 'static)) -> Option<TlsFailure> {
    let judged = |tls: &rustls::Error| match tls {
        rustls::Error::InvalidCertificate(_) => TlsFailure::Untrusted(tls.to_string()),
        _ => TlsFailure::Refused(tls.to_string()),
    };
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(judged(tls));
        }
        // An io::Error hides what it wraps from `source()`.
        if let Some(io) = e.downcast_ref::<io::Error>()
            && let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(judged(tls));
        }
        next = e.source();
    }
    None
}

/// The status's message, or its code's description when it has none.
fn status_reason(status: &tonic::Status) -> String {
    if status.message().is_empty() {
        status.code().description().to_string()
    } else {
        status.message().to_string()
    }
}

/// Whether a call failed because the connection went away (rather than
/// because the server answered with an error).
fn connection_closed(status: &tonic::Status) -> bool {
    let mut source = status.source();
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<io::Error>()
            && matches!(
                io.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
            )
        {
            return true;
        }
        if let Some(hyper) = error.downcast_ref::<hyper::Error>()
            && (hyper.is_closed() || hyper.is_incomplete_message() || hyper.is_canceled())
        {
            return true;
        }
        source = error.source();
    }
    false
}

/// One line on why connecting failed, with a hint where there is one.
fn connect_reason(error: &tonic::transport::Error) -> String {
    let mut source = error.source();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return match io.kind() {
                io::ErrorKind::NotFound => "no such file (is `bext serve` running?)".into(),
                io::ErrorKind::ConnectionRefused => {
                    "connection refused (is `bext serve` running?)".into()
                }
                io::ErrorKind::PermissionDenied => "permission denied (run bextctl as root or as \
                                                     the user that runs `bext serve`)"
                    .into(),
                _ => io.to_string(),
            };
        }
        source = e.source();
    }
    error.to_string()
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use bext_proto::control::v1::StatusRequest;

    use super::{Session, resolve_socket};

    fn write_config(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("platform.toml");
        std::fs::write(&path, text).expect("write config");
        (dir, path)
    }

    #[test]
    fn socket_from_config_data_dir() {
        let (_dir, config) = write_config(
            "[platform]\nlisten = \"0.0.0.0:80\"\ndata_dir = \"/srv/bext\"\n\n[apps.blog]\nsource = \"/srv/blog\"\n",
        );
        let socket = resolve_socket(None, Some(&config), None).expect("resolves");
        assert_eq!(socket, Path::new("/srv/bext/control.sock"));
    }

    #[test]
    fn socket_from_config_defaults_and_relative() {
        let (_dir, config) = write_config("[apps.blog]\nsource = \"/srv/blog\"\n");
        let socket = resolve_socket(None, Some(&config), None).expect("resolves");
        assert_eq!(socket, Path::new("/var/lib/bext/control.sock"));

        // Relative to the current directory (not to the file), as the
        // server does.
        let (_dir, config) = write_config("[platform]\ndata_dir = \"state\"\n");
        let socket = resolve_socket(None, Some(&config), None).expect("resolves");
        assert_eq!(socket, Path::new("state/control.sock"));
    }

    #[test]
    fn socket_precedence() {
        let (_dir, config) = write_config("[platform]\ndata_dir = \"/srv/bext\"\n");
        let env = Path::new("/env.sock");
        let flag = Path::new("/flag.sock");
        assert_eq!(
            resolve_socket(Some(flag), None, Some(env)).expect("flag"),
            flag
        );
        assert_eq!(
            resolve_socket(None, Some(&config), Some(env)).expect("config"),
            Path::new("/srv/bext/control.sock")
        );
        assert_eq!(resolve_socket(None, None, Some(env)).expect("env"), env);
        assert_eq!(
            resolve_socket(None, None, None).expect("default"),
            Path::new("/var/lib/bext/control.sock")
        );
    }

    #[test]
    fn bad_config_is_an_error() {
        let (_dir, config) = write_config("[platform]\ndata_dir = \"/x\"\nlisten = \n");
        let err = resolve_socket(None, Some(&config), None).expect_err("not TOML");
        assert!(!err.to_string().contains('\n'), "{err}");
        assert!(err.to_string().contains("line 3, column 10"), "{err}");

        let (_dir, config) = write_config("[platform]\ndata_dir = 3\n");
        let err = resolve_socket(None, Some(&config), None).expect_err("not a string");
        assert_eq!(err.exit_code(), 1);
        assert!(err.to_string().contains("data_dir"), "{err}");

        let (dir, _) = write_config("");
        let err =
            resolve_socket(None, Some(&dir.path().join("absent.toml")), None).expect_err("absent");
        assert_eq!(err.exit_code(), 1);
    }

    #[tokio::test]
    async fn absent_socket_is_unavailable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("control.sock");
        let err = Session::connect(&socket)
            .await
            .expect_err("nothing listens");
        assert_eq!(err.exit_code(), 69);
        let message = err.to_string();
        assert!(
            message.contains("cannot reach the bext supervisor"),
            "{message}"
        );
        assert!(message.contains(&socket.display().to_string()), "{message}");
        assert!(message.contains("no such file"), "{message}");
    }

    #[tokio::test]
    async fn stale_socket_is_unavailable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("control.sock");
        // Bound, then closed: the file stays, nobody listens.
        drop(tokio::net::UnixListener::bind(&socket).expect("bind"));
        let err = Session::connect(&socket).await.expect_err("nobody listens");
        assert_eq!(err.exit_code(), 69);
        assert!(err.to_string().contains("connection refused"), "{err}");
    }

    #[tokio::test]
    async fn peer_closed_at_once_is_unavailable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("control.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        // What the server does with a peer whose uid it refuses.
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        let err = match Session::connect(&socket).await {
            Ok(mut session) => {
                let status = session
                    .client
                    .status(StatusRequest::default())
                    .await
                    .expect_err("a closed connection cannot answer");
                session.call_error(&status)
            }
            Err(e) => e,
        };
        assert_eq!(err.exit_code(), 69, "{err}");
        assert!(err.to_string().contains("refused"), "{err}");
    }
}
