//! `bextctl`, the control-plane client: one command line in, one gRPC
//! call to the supervisor over its Unix socket, its reply out, and an exit
//! code that says whose problem a failure is (1: the operation failed,
//! 69: the supervisor could not be reached).
//!
//! [`args`] is the command line, [`connect`] finds and opens the socket,
//! [`pack`] turns a source directory into an upload, [`progress`] shows a
//! long operation as it runs and [`print`] formats replies. Only this
//! module makes calls. It links nothing of the server but the
//! `bext_proto` contract and one default (the data directory).

pub mod args;
pub mod connect;
pub mod pack;
pub mod print;
pub mod progress;

use std::io::{self, Write};
use std::path::PathBuf;

use bext_proto::control::v1::{
    DeployChunk, LogsRequest, Progress, PurgeRequest, ReloadRequest, RestartRequest,
    RollbackRequest, StatusRequest, VersionsRequest,
};

use args::{Cli, Command, DeployArgs, PurgeArgs};
use connect::Session;
use pack::{PackError, PackOptions};
use progress::{Outcome, View};

/// `text` with control characters other than newline and tab (terminal
/// escapes a tenant's build output or worker log could carry) shown as
/// `\u{1b}` instead of acted on by the operator's terminal.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Exit code: the operation failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code (`EX_UNAVAILABLE`): the supervisor could not be reached, or
/// refused this user.
pub const EXIT_UNAVAILABLE: u8 = 69;
/// The command line asks for something impossible (as clap's own errors).
pub const EXIT_USAGE: u8 = 2;

/// Why a `bextctl` command failed; its message is one line for stderr.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("could not read {}: {source}", path.display())]
    ReadConfig { path: PathBuf, source: io::Error },
    #[error("could not parse {}: {reason}", path.display())]
    ParseConfig { path: PathBuf, reason: String },
    #[error("cannot reach the bext supervisor at {at}: {reason}")]
    Unreachable { at: String, reason: String },
    #[error(
        "the bext supervisor at {at} refused this user ({reason}): run bextctl as root or as the user that runs `bext serve`"
    )]
    Refused { at: String, reason: String },
    #[error(
        "the bext supervisor at {at} refused this client ({reason}): --cert must be signed by its [platform.control] client_ca, and --ca must be the CA of its certificate"
    )]
    RefusedCertificate { at: String, reason: String },
    #[error(
        "the certificate of the bext supervisor at {at} is not trusted ({reason}): --ca must be the CA of its certificate, and --connect a name or address it carries"
    )]
    UntrustedServer { at: String, reason: String },
    /// A usage error of `--connect` and its flags.
    #[error("{what}")]
    Remote { what: String },
    /// The server answered a call with an error: its message.
    #[error("{message}")]
    Call { message: String },
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error("could not pack: {0}")]
    PackTask(#[from] tokio::task::JoinError),
    /// A long operation ended with `ok = false`: its message.
    #[error("{0}")]
    Operation(String),
    #[error("the supervisor closed the stream before the operation finished")]
    StreamEnded,
    #[error("could not write the output: {0}")]
    Write(io::Error),
    /// Whoever read the output stopped (`bextctl logs -f | head`): not a
    /// failure, the command just ends.
    #[error("the output was closed")]
    OutputClosed,
}

impl CtlError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Unreachable { .. }
            | Self::Refused { .. }
            | Self::RefusedCertificate { .. }
            | Self::UntrustedServer { .. } => EXIT_UNAVAILABLE,
            Self::Remote { .. } => EXIT_USAGE,
            Self::OutputClosed => 0,
            _ => EXIT_FAILED,
        }
    }
}

/// Where a command's output goes: replies to `out` (stdout), progress
/// to a [`View`] made when an operation starts (stderr).
pub struct Console<'a> {
    pub out: &'a mut dyn Write,
    pub progress: fn() -> View<Box<dyn Write>>,
}

impl std::fmt::Debug for Console<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl Console<'_> {
    /// Writes a reply; a closed output ends the command quietly.
    fn emit(&mut self, text: &str) -> Result<(), CtlError> {
        match self
            .out
            .write_all(printable(text).as_bytes())
            .and_then(|()| self.out.flush())
        {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(CtlError::OutputClosed),
            Err(e) => Err(CtlError::Write(e)),
        }
    }
}

/// What `bextctl` takes from its environment: `BEXT_SOCKET`,
/// `BEXT_CONNECT`, `BEXT_CERT`, `BEXT_KEY`, `BEXT_CA` (read by the caller,
/// so tests never touch the environment).
#[derive(Debug, Default)]
pub struct Env {
    pub socket: Option<PathBuf>,
    pub connect: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

impl Env {
    /// The process's own, empty values left out.
    pub fn from_process() -> Self {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        Env {
            socket: var("BEXT_SOCKET").map(PathBuf::from),
            connect: var("BEXT_CONNECT").map(|v| v.to_string_lossy().into_owned()),
            cert: var("BEXT_CERT").map(PathBuf::from),
            key: var("BEXT_KEY").map(PathBuf::from),
            ca: var("BEXT_CA").map(PathBuf::from),
        }
    }
}

/// Runs one command line against the supervisor, printing to stdout and
/// stderr. An explicit `--connect`, `--socket` or `--config` wins over the
/// environment, and `BEXT_CONNECT` over `BEXT_SOCKET`; the certificate
/// flags win over their variables.
pub async fn run(cli: Cli, env: Env) -> Result<(), CtlError> {
    // (clap checks conflicts per subcommand level, before global flags
    // are merged: checked again here.)
    if cli.connect.is_some() && (cli.socket.is_some() || cli.config.is_some()) {
        return Err(CtlError::Remote {
            what: "--connect cannot go with --socket or --config: one supervisor at a time".into(),
        });
    }
    let remote = match &cli.connect {
        Some(addr) => Some(addr.clone()),
        None if cli.socket.is_none() && cli.config.is_none() => env.connect,
        None => None,
    };
    if remote.is_none() && (cli.cert.is_some() || cli.key.is_some() || cli.ca.is_some()) {
        return Err(CtlError::Remote {
            what: "--cert, --key and --ca are for --connect (the control port); the control socket needs none".into(),
        });
    }
    let session = match remote {
        Some(addr) => {
            let tls = connect::ClientTls::load(
                cli.cert.as_deref().or(env.cert.as_deref()),
                cli.key.as_deref().or(env.key.as_deref()),
                cli.ca.as_deref().or(env.ca.as_deref()),
            )?;
            Session::connect_remote(&addr, tls).await?
        }
        None => {
            let socket = connect::resolve_socket(
                cli.socket.as_deref(),
                cli.config.as_deref(),
                env.socket.as_deref(),
            )?;
            Session::connect(&socket).await?
        }
    };
    let mut stdout = io::stdout().lock();
    let mut console = Console {
        out: &mut stdout,
        progress: View::stderr,
    };
    match execute(session, cli.command, &mut console).await {
        Err(CtlError::OutputClosed) => Ok(()),
        result => result,
    }
}

/// Runs one command on an open session.
pub async fn execute(
    mut session: Session,
    command: Command,
    console: &mut Console<'_>,
) -> Result<(), CtlError> {
    match command {
        Command::Deploy(args) => deploy(session, args, console).await,
        Command::Rollback { app, to } => {
            let request = RollbackRequest {
                app,
                to: to.unwrap_or_default(),
            };
            let stream = session.client.rollback(request).await;
            watch(&session, stream, console).await
        }
        Command::Restart { app } => {
            let stream = session.client.restart(RestartRequest { app }).await;
            watch(&session, stream, console).await
        }
        Command::Status { app, json } => {
            let request = StatusRequest {
                apps: app.into_iter().collect(),
            };
            let reply = session
                .client
                .status(request)
                .await
                .map_err(|s| session.call_error(&s))?
                .into_inner();
            console.emit(&if json {
                print::status_json(&reply)
            } else {
                print::status_table(&reply)
            })
        }
        Command::Versions { app, json } => {
            let reply = session
                .client
                .versions(VersionsRequest { app })
                .await
                .map_err(|s| session.call_error(&s))?
                .into_inner();
            console.emit(&if json {
                print::versions_json(&reply)
            } else {
                print::versions_table(&reply)
            })
        }
        Command::Purge(args) => purge(session, args, console).await,
        Command::Logs { app, follow, lines } => logs(session, app, follow, lines, console).await,
        Command::Reload => {
            let reply = session
                .client
                .reload(ReloadRequest {})
                .await
                .map_err(|s| session.call_error(&s))?
                .into_inner();
            if reply.ok {
                console.emit(&format!("{}\n", reply.message))
            } else {
                Err(CtlError::Operation(reply.message))
            }
        }
    }
}

/// Packs the directory, uploads it and follows the deploy.
async fn deploy(
    mut session: Session,
    args: DeployArgs,
    console: &mut Console<'_>,
) -> Result<(), CtlError> {
    let options = PackOptions {
        include_node_modules: args.include_node_modules,
        include_build: args.include_build,
        ..PackOptions::default()
    };
    let dir = args.dir.clone();
    // Walking and compressing is blocking work.
    let packed = tokio::task::spawn_blocking(move || pack::pack(&dir, &options)).await??;
    for warning in &packed.warnings {
        eprintln!("bextctl: warning: {warning}");
    }
    for path in &packed.skipped {
        eprintln!(
            "bextctl: skipped {} (not a file, directory or symlink)",
            path.display()
        );
    }
    eprintln!(
        "packed {}: {} {}, {} compressed",
        std::fs::canonicalize(&args.dir)
            .unwrap_or_else(|_| args.dir.clone())
            .display(),
        packed.files,
        if packed.files == 1 { "file" } else { "files" },
        megabytes(packed.bytes)
    );
    let app = args.app;
    let chunks = packed
        .chunks
        .into_iter()
        .enumerate()
        .map(move |(i, data)| DeployChunk {
            // The first message names the app.
            app: if i == 0 { app.clone() } else { String::new() },
            data,
        });
    let stream = session
        .client
        .deploy(futures_util::stream::iter(chunks))
        .await;
    watch(&session, stream, console).await
}

/// Follows a long operation's progress to its end.
async fn watch(
    session: &Session,
    started: Result<tonic::Response<tonic::Streaming<Progress>>, tonic::Status>,
    console: &mut Console<'_>,
) -> Result<(), CtlError> {
    let mut stream = started.map_err(|s| session.call_error(&s))?.into_inner();
    let mut view = (console.progress)();
    while let Some(event) = stream
        .message()
        .await
        .map_err(|s| session.stream_error(&s))?
    {
        let event = Progress {
            step: printable(&event.step).into_owned(),
            message: printable(&event.message).into_owned(),
            log_lines: event
                .log_lines
                .iter()
                .map(|l| printable(l).into_owned())
                .collect(),
            ..event
        };
        match view.event(&event) {
            None => {}
            Some(Outcome::Done(message)) => {
                // Clear the spinner before the last word.
                drop(view);
                return console.emit(&format!("{message}\n"));
            }
            Some(Outcome::Failed(message)) => return Err(CtlError::Operation(message)),
        }
    }
    Err(CtlError::StreamEnded)
}

async fn purge(
    mut session: Session,
    args: PurgeArgs,
    console: &mut Console<'_>,
) -> Result<(), CtlError> {
    let soft = args.soft;
    let request = PurgeRequest {
        app: args.app,
        tags: args.tags,
        paths: args.paths,
        prefixes: args.prefixes,
        all: args.all,
        soft,
    };
    let purged = session
        .client
        .purge(request)
        .await
        .map_err(|s| session.call_error(&s))?
        .into_inner()
        .purged;
    let entries = if purged == 1 { "entry" } else { "entries" };
    console.emit(&if soft {
        format!("marked {purged} {entries} stale\n")
    } else {
        format!("purged {purged} {entries}\n")
    })
}

/// Prints the app's recent lines, then (following) new ones until the
/// stream ends or Ctrl-C.
async fn logs(
    mut session: Session,
    app: String,
    follow: bool,
    lines: u32,
    console: &mut Console<'_>,
) -> Result<(), CtlError> {
    let request = LogsRequest { app, lines, follow };
    let mut stream = session
        .client
        .logs(request)
        .await
        .map_err(|s| session.call_error(&s))?
        .into_inner();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let next = tokio::select! {
            next = stream.message() => next,
            _ = &mut interrupted => return Ok(()),
        };
        match next.map_err(|s| session.stream_error(&s))? {
            Some(line) => console.emit(&print::log_line(&line))?,
            None => return Ok(()),
        }
    }
}

/// Bytes as decimal megabytes, two decimals.
fn megabytes(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss, reason = "a display value")]
    let mb = bytes as f64 / 1e6;
    format!("{mb:.2} MB")
}

#[cfg(test)]
mod tests;
