//! The control socket: the gRPC service of `proto/bext.proto` on
//! `data_dir/control.sock`, the only way in to the platform's commands
//! besides signals.
//!
//! Who may connect is decided twice: the socket is mode 0660 (owner bext's
//! user, group `platform.control_group` if set), and each accepted peer is
//! checked with `SO_PEERCRED` (root, bext's own uid, or a member of the
//! control group); anyone else is closed on at once. This module turns
//! calls into [`Command`]s for the platform and their answers into replies;
//! it decides nothing about apps itself. Uploads are bounded in size and in
//! time between chunks.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use sha2::Digest;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

pub mod remote;
pub mod single;

use crate::cache::store::Selector;
use crate::platform::{Command, CommandError, Upload};
use crate::progress::Reporter;
use bext_proto::control::v1 as pb;
use bext_proto::control::v1::control_server::{Control, ControlServer};

/// The socket's name in `data_dir`.
pub const SOCKET_NAME: &str = "control.sock";

/// Largest upload (the compressed archive).
pub const MAX_UPLOAD: u64 = 1024 * 1024 * 1024;

/// Lines `logs` sends from the ring when the client does not say.
pub const DEFAULT_LOG_LINES: u32 = 100;

/// Uploads received at once (each up to [`MAX_UPLOAD`] on disk).
pub const MAX_UPLOADS: usize = 4;

/// Longest wait for the next chunk of an upload.
pub const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);

/// The control service, to serve on more than the socket
/// ([`remote::serve`]): every copy shares the upload table.
#[derive(Debug, Clone)]
pub struct Service(ControlService);

impl Service {
    fn server(self) -> ControlServer<ControlService> {
        ControlServer::new(self.0)
    }
}

/// Binds `path` and serves the control service on it until the task is
/// aborted. A live socket at `path` (another supervisor on the same
/// data_dir) is an error; a stale one is replaced. Uploads (deploys) go to
/// `uploads`; without it, deploys are refused. Returns the task and the
/// service, to serve elsewhere too.
pub fn serve(
    path: &Path,
    group: Option<&(String, u32)>,
    uploads: Option<PathBuf>,
    commands: mpsc::Sender<Command>,
) -> std::io::Result<(tokio::task::JoinHandle<()>, Service)> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another bext supervisor serves it (one data_dir per supervisor)",
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "something other than a socket is in the way",
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    let gid = group.map(|(_, gid)| *gid);
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    if let Some(uploads) = &uploads {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(uploads)?;
        // What is there is a dead supervisor's (this one holds the socket).
        for entry in std::fs::read_dir(uploads)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with("upload-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let service = ControlService {
        commands,
        uploads,
        receiving: Arc::new(std::sync::Mutex::new(HashSet::new())),
    };
    let incoming = futures_util::stream::unfold(listener, move |listener| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => match allowed(&stream, gid) {
                    Ok(()) => return Some((Ok::<_, std::io::Error>(stream), listener)),
                    Err(who) => warn!("control socket: refused a connection from {who}"),
                },
                Err(e) => {
                    debug!("control socket: accept failed: {e}");
                    // Out of descriptors: give the others a moment.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    let shared = Service(service.clone());
    let task = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(ControlServer::new(service))
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = served {
            warn!("the control socket stopped: {e}");
        }
    });
    Ok((task, shared))
}

/// One line per command that changes something, naming who asked when it
/// came over the control port (the client certificate's subject); the
/// socket's peers are root, bext's user or the control group.
fn audit<T>(request: &Request<T>, command: &str, app: &str) {
    if let Some(peer) = request.extensions().get::<remote::RemotePeer>() {
        info!(command, app, client = %peer.subject, peer = %peer.addr, "control port: {command} asked");
    }
}

/// Root, bext's own user, or a member of the control group may connect.
fn allowed(stream: &UnixStream, group: Option<u32>) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("a peer of unknown credentials ({e})"))?;
    let uid = cred.uid();
    let me = nix::unistd::geteuid().as_raw();
    if uid == 0 || uid == me {
        return Ok(());
    }
    if let Some(group) = group {
        if cred.gid() == group {
            return Ok(());
        }
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten();
        if let Some(user) = user
            && let Ok(name) = std::ffi::CString::new(user.name.as_bytes())
            && let Ok(groups) = nix::unistd::getgrouplist(&name, user.gid)
            && groups.iter().any(|g| g.as_raw() == group)
        {
            return Ok(());
        }
    }
    Err(format!("uid {uid} (pid {:?})", cred.pid()))
}

#[derive(Debug, Clone)]
struct ControlService {
    commands: mpsc::Sender<Command>,
    uploads: Option<PathBuf>,
    /// Apps whose upload is being received: one at a time each, and at
    /// most [`MAX_UPLOADS`] in all.
    receiving: Arc<std::sync::Mutex<HashSet<String>>>,
}

/// An app's place in [`ControlService::receiving`], given up on drop.
struct Receiving {
    apps: Arc<std::sync::Mutex<HashSet<String>>>,
    app: String,
}

impl Drop for Receiving {
    fn drop(&mut self) {
        if let Ok(mut apps) = self.apps.lock() {
            apps.remove(&self.app);
        }
    }
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::Progress, Status>> + Send>>;

/// A reporter's events as a reply stream.
fn progress_stream(mut events: mpsc::Receiver<pb::Progress>) -> ProgressStream {
    Box::pin(futures_util::stream::poll_fn(move |cx| {
        events.poll_recv(cx).map(|e| e.map(Ok))
    }))
}

fn gone() -> Status {
    Status::unavailable("the supervisor is shutting down")
}

fn status_of(e: CommandError) -> Status {
    match e {
        CommandError::NotFound(m) => Status::not_found(m),
        CommandError::Busy(m) => Status::aborted(m),
        CommandError::Failed(m) => Status::failed_precondition(m),
    }
}

impl ControlService {
    async fn send(&self, command: Command) -> Result<(), Status> {
        self.commands.send(command).await.map_err(|_| gone())
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, CommandError>>) -> Command,
    ) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await.map_err(|_| gone())?.map_err(status_of)
    }

    /// Takes `app`'s place among the uploads being received.
    fn receiving(&self, app: &str) -> Result<Receiving, Status> {
        let mut apps = self
            .receiving
            .lock()
            .map_err(|_| Status::internal("the upload table is poisoned"))?;
        if apps.contains(app) {
            return Err(Status::aborted(format!(
                "a deploy of app '{app}' is in progress (uploading); try again when it is over"
            )));
        }
        if apps.len() >= MAX_UPLOADS {
            return Err(Status::resource_exhausted(format!(
                "{MAX_UPLOADS} uploads are being received; try again when one is over"
            )));
        }
        apps.insert(app.to_string());
        Ok(Receiving {
            apps: Arc::clone(&self.receiving),
            app: app.to_string(),
        })
    }

    /// Reads an upload into a file in `uploads`, hashing it.
    async fn receive(
        &self,
        first: pb::DeployChunk,
        mut chunks: Streaming<pb::DeployChunk>,
    ) -> Result<Upload, Status> {
        let Some(uploads) = &self.uploads else {
            return Err(Status::failed_precondition(
                "deploys are multi-app mode's (`bext serve`)",
            ));
        };
        let file = tempfile::Builder::new()
            .prefix("upload-")
            .tempfile_in(uploads)
            .map_err(|e| Status::internal(format!("could not store the upload: {e}")))?;
        let (std_file, path) = file.into_parts();
        let mut out = tokio::fs::File::from_std(std_file);
        let mut hash = sha2::Sha256::new();
        let mut bytes = 0u64;
        let mut chunk = Some(first);
        loop {
            if let Some(chunk) = chunk.take() {
                bytes = bytes.saturating_add(chunk.data.len() as u64);
                if bytes > MAX_UPLOAD {
                    return Err(Status::resource_exhausted(format!(
                        "the upload is larger than {} MiB",
                        MAX_UPLOAD / (1024 * 1024)
                    )));
                }
                hash.update(&chunk.data);
                out.write_all(&chunk.data)
                    .await
                    .map_err(|e| Status::internal(format!("could not store the upload: {e}")))?;
            }
            match tokio::time::timeout(CHUNK_TIMEOUT, chunks.message()).await {
                Ok(Ok(Some(next))) => chunk = Some(next),
                Ok(Ok(None)) => break,
                Ok(Err(status)) => return Err(status),
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "no part of the upload came for {}",
                        humantime::format_duration(CHUNK_TIMEOUT)
                    )));
                }
            }
        }
        out.flush()
            .await
            .map_err(|e| Status::internal(format!("could not store the upload: {e}")))?;
        if bytes == 0 {
            return Err(Status::invalid_argument("the upload is empty"));
        }
        Ok(Upload {
            file: path,
            digest: hash.finalize().iter().map(|b| format!("{b:02x}")).collect(),
            bytes,
        })
    }
}

/// The app's last `lines` lines, then (with `follow`) new ones as they come.
pub fn log_stream(
    app: &str,
    lines: u32,
    follow: bool,
) -> Pin<Box<dyn Stream<Item = Result<pb::LogLine, Status>> + Send>> {
    use crate::logring::{self, Line};
    use futures_util::StreamExt;
    let ring = logring::for_app(app);
    // Subscribed first: no line falls between the tail and the follow.
    let live = follow.then(|| ring.follow());
    let wanted = if lines == 0 { DEFAULT_LOG_LINES } else { lines };
    let tail = ring.tail(usize::try_from(wanted).unwrap_or(usize::MAX));
    let seen = tail.last().map_or(0, |l| l.seq);
    let to_pb = |line: &Line| pb::LogLine {
        time_ms: line.time_ms,
        worker: line.worker,
        pid: line.pid,
        stream: line.stream.to_string(),
        line: line.text.clone(),
    };
    let head = futures_util::stream::iter(tail.iter().map(|l| Ok(to_pb(l))).collect::<Vec<_>>());
    let Some(live) = live else {
        return Box::pin(head);
    };
    let rest = futures_util::stream::unfold(live, move |mut live| async move {
        loop {
            match live.recv().await {
                Ok(line) if line.seq <= seen => {}
                Ok(line) => return Some((Ok(to_pb(&line)), live)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(skipped)) => {
                    let note = pb::LogLine {
                        stream: "bext".to_string(),
                        line: format!("… {skipped} lines skipped (this client fell behind)"),
                        ..pb::LogLine::default()
                    };
                    return Some((Ok(note), live));
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Box::pin(head.chain(rest))
}

#[tonic::async_trait]
impl Control for ControlService {
    type DeployStream = ProgressStream;
    type RollbackStream = ProgressStream;
    type RestartStream = ProgressStream;
    type LogsStream = Pin<Box<dyn Stream<Item = Result<pb::LogLine, Status>> + Send>>;

    async fn deploy(
        &self,
        request: Request<Streaming<pb::DeployChunk>>,
    ) -> Result<Response<Self::DeployStream>, Status> {
        audit(&request, "deploy", "");
        let mut chunks = request.into_inner();
        let first = match tokio::time::timeout(CHUNK_TIMEOUT, chunks.message()).await {
            Ok(Ok(Some(first))) => first,
            Ok(Ok(None)) => return Err(Status::invalid_argument("the upload is empty")),
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no upload came")),
        };
        let app = first.app.clone();
        if app.is_empty() {
            return Err(Status::invalid_argument(
                "the first message of a deploy names the app",
            ));
        }
        // An unknown or busy app is refused before its upload is read (the
        // platform checks again when the upload is in).
        let status = self
            .ask(|reply| Command::Status {
                apps: vec![app.clone()],
                reply,
            })
            .await?;
        if let Some(under_way) = status
            .first()
            .map(|s| &s.operation)
            .filter(|o| !o.is_empty())
        {
            return Err(Status::aborted(crate::platform::busy_message(
                &app, under_way,
            )));
        }
        let receiving = self.receiving(&app)?;
        let upload = self.receive(first, chunks).await?;
        drop(receiving);
        info!(%app, bytes = upload.bytes, digest = %upload.digest, "control: deploy uploaded");
        let (reporter, events) = Reporter::new();
        reporter.step(
            "upload",
            format!("received {:.1} MB", upload.bytes as f64 / 1e6),
        );
        self.send(Command::Deploy {
            app,
            upload,
            reporter,
        })
        .await?;
        Ok(Response::new(progress_stream(events)))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<Self::RollbackStream>, Status> {
        audit(&request, "rollback", &request.get_ref().app);
        let request = request.into_inner();
        let (reporter, events) = Reporter::new();
        reporter.step("rollback", format!("app '{}'", request.app));
        self.send(Command::Rollback {
            app: request.app,
            to: Some(request.to).filter(|t| !t.is_empty()),
            reporter,
        })
        .await?;
        Ok(Response::new(progress_stream(events)))
    }

    async fn restart(
        &self,
        request: Request<pb::RestartRequest>,
    ) -> Result<Response<Self::RestartStream>, Status> {
        audit(&request, "restart", &request.get_ref().app);
        let request = request.into_inner();
        let (reporter, events) = Reporter::new();
        reporter.step("restart", format!("app '{}'", request.app));
        self.send(Command::Restart {
            app: request.app,
            reporter,
        })
        .await?;
        Ok(Response::new(progress_stream(events)))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let apps = request.into_inner().apps;
        let apps = self.ask(|reply| Command::Status { apps, reply }).await?;
        Ok(Response::new(pb::StatusReply { apps }))
    }

    async fn versions(
        &self,
        request: Request<pb::VersionsRequest>,
    ) -> Result<Response<pb::VersionsReply>, Status> {
        let app = request.into_inner().app;
        let versions = self
            .ask(|reply| Command::Versions {
                app: app.clone(),
                reply,
            })
            .await?;
        Ok(Response::new(pb::VersionsReply { app, versions }))
    }

    async fn purge(
        &self,
        request: Request<pb::PurgeRequest>,
    ) -> Result<Response<pb::PurgeReply>, Status> {
        audit(&request, "purge", &request.get_ref().app);
        let request = request.into_inner();
        let mut selectors = Vec::new();
        if request.all {
            selectors.push(Selector {
                all: true,
                ..Selector::default()
            });
        }
        if !request.tags.is_empty() {
            selectors.push(Selector {
                tags: request.tags,
                ..Selector::default()
            });
        }
        if !request.paths.is_empty() {
            selectors.push(Selector {
                paths: request.paths,
                ..Selector::default()
            });
        }
        for prefix in request.prefixes {
            selectors.push(Selector {
                prefix: Some(prefix),
                ..Selector::default()
            });
        }
        if selectors.is_empty() {
            return Err(Status::invalid_argument(
                "say what to purge: tags, paths, prefixes, or all",
            ));
        }
        let (app, soft) = (request.app, request.soft);
        let purged = self
            .ask(|reply| Command::Purge {
                app,
                selectors,
                soft,
                reply,
            })
            .await?;
        Ok(Response::new(pb::PurgeReply { purged }))
    }

    async fn logs(
        &self,
        request: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let request = request.into_inner();
        let app = request.app;
        self.ask(|reply| Command::Status {
            apps: vec![app.clone()],
            reply,
        })
        .await?;
        Ok(Response::new(log_stream(
            &app,
            request.lines,
            request.follow,
        )))
    }

    async fn reload(
        &self,
        request: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadReply>, Status> {
        audit(&request, "reload", "");
        let (tx, rx) = oneshot::channel();
        self.send(Command::Reload { reply: Some(tx) }).await?;
        let reply = rx.await.map_err(|_| gone())?;
        Ok(Response::new(match reply {
            Ok(message) => pb::ReloadReply { message, ok: true },
            Err(message) => pb::ReloadReply { message, ok: false },
        }))
    }
}
