//! The client against an in-process fake supervisor on a Unix socket in a
//! temp dir: what goes over the wire, what comes out, and the exit codes.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bext_proto::control::v1::control_server::{Control, ControlServer};
use bext_proto::control::v1::{
    DeployChunk, LogLine, LogsRequest, Progress, PurgeReply, PurgeRequest, ReloadReply,
    ReloadRequest, RestartRequest, RollbackRequest, StatusReply, StatusRequest, VersionsReply,
    VersionsRequest,
};
use futures_util::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::args::{Command, DeployArgs, PurgeArgs};
use super::connect::Session;
use super::progress::View;
use super::{Console, CtlError, execute};

type Events<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Answers by app name: `missing` → NotFound, `down` → Unavailable,
/// `locked` → PermissionDenied, `broken` → a stream that stops early,
/// `failing` → a failed operation; anything else succeeds.
#[derive(Debug, Default, Clone)]
struct Fake {
    uploads: Arc<Mutex<Vec<DeployChunk>>>,
    purges: Arc<Mutex<Vec<PurgeRequest>>>,
}

fn refuse(app: &str) -> Result<(), Status> {
    match app {
        "missing" => Err(Status::not_found(format!("no app is named `{app}`"))),
        "down" => Err(Status::unavailable("the supervisor is shutting down")),
        "locked" => Err(Status::permission_denied("uid 1000 may not control bext")),
        _ => Ok(()),
    }
}

fn progress(app: &str) -> Events<Progress> {
    let step = |step: &str, message: &str| Progress {
        step: step.into(),
        message: message.into(),
        ..Progress::default()
    };
    let mut events = vec![step("unpack", "12 files"), step("build", "npm run build")];
    match app {
        "broken" => {}
        "failing" => events.push(Progress {
            finished: true,
            ..step("failed", "npm run build exited with status 1")
        }),
        _ => events.push(Progress {
            finished: true,
            ok: true,
            version: "v2".into(),
            ..step("done", &format!("{app} is serving v2"))
        }),
    }
    Box::pin(futures_util::stream::iter(events.into_iter().map(Ok)))
}

#[tonic::async_trait]
impl Control for Fake {
    type DeployStream = Events<Progress>;
    type RollbackStream = Events<Progress>;
    type RestartStream = Events<Progress>;
    type LogsStream = Events<LogLine>;

    async fn deploy(
        &self,
        request: Request<Streaming<DeployChunk>>,
    ) -> Result<Response<Self::DeployStream>, Status> {
        let mut chunks = request.into_inner();
        let mut app = String::new();
        while let Some(chunk) = chunks.message().await? {
            if app.is_empty() {
                app.clone_from(&chunk.app);
            }
            self.uploads.lock().expect("lock").push(chunk);
        }
        refuse(&app)?;
        Ok(Response::new(progress(&app)))
    }

    async fn rollback(
        &self,
        request: Request<RollbackRequest>,
    ) -> Result<Response<Self::RollbackStream>, Status> {
        let app = request.into_inner().app;
        refuse(&app)?;
        Ok(Response::new(progress(&app)))
    }

    async fn restart(
        &self,
        request: Request<RestartRequest>,
    ) -> Result<Response<Self::RestartStream>, Status> {
        let app = request.into_inner().app;
        refuse(&app)?;
        Ok(Response::new(progress(&app)))
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        for app in &request.get_ref().apps {
            refuse(app)?;
        }
        Ok(Response::new(StatusReply::default()))
    }

    async fn versions(
        &self,
        request: Request<VersionsRequest>,
    ) -> Result<Response<VersionsReply>, Status> {
        let app = request.into_inner().app;
        refuse(&app)?;
        Ok(Response::new(VersionsReply {
            app,
            versions: vec![],
        }))
    }

    async fn purge(&self, request: Request<PurgeRequest>) -> Result<Response<PurgeReply>, Status> {
        let request = request.into_inner();
        refuse(&request.app)?;
        self.purges.lock().expect("lock").push(request);
        Ok(Response::new(PurgeReply { purged: 3 }))
    }

    async fn logs(
        &self,
        request: Request<LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let request = request.into_inner();
        refuse(&request.app)?;
        let lines = (0..request.lines.min(3)).map(|i| {
            Ok(LogLine {
                worker: i,
                pid: 100 + i,
                stream: if i == 2 { "bext" } else { "stdout" }.into(),
                line: format!("line {i}"),
                ..LogLine::default()
            })
        });
        Ok(Response::new(Box::pin(futures_util::stream::iter(lines))))
    }

    async fn reload(&self, _: Request<ReloadRequest>) -> Result<Response<ReloadReply>, Status> {
        Ok(Response::new(ReloadReply {
            message: "platform.toml has an error at line 3".into(),
            ok: false,
        }))
    }
}

/// A fake supervisor serving on `dir/control.sock`.
struct Server {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    fake: Fake,
}

fn serve() -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("control.sock");
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
    let incoming = futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    });
    let fake = Fake::default();
    let service = ControlServer::new(fake.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
    });
    Server {
        _dir: dir,
        socket,
        fake,
    }
}

/// Runs `command` against the fake; returns stdout and the result.
async fn call(socket: &Path, command: Command) -> (String, Result<(), CtlError>) {
    let session = Session::connect(socket).await.expect("connects");
    let mut out = Vec::new();
    let mut console = Console {
        out: &mut out,
        progress: || View::plain(Box::new(io::sink())),
    };
    let result = execute(session, command, &mut console).await;
    (String::from_utf8(out).expect("UTF-8"), result)
}

fn exit_code(result: &Result<(), CtlError>) -> u8 {
    result.as_ref().map_or_else(CtlError::exit_code, |()| 0)
}

fn deploy(app: &str, dir: &Path) -> Command {
    Command::Deploy(DeployArgs {
        app: app.into(),
        dir: dir.to_path_buf(),
        include_node_modules: false,
        include_build: false,
    })
}

#[tokio::test]
async fn deploy_uploads_and_follows() {
    let server = serve();
    let source = tempfile::tempdir().expect("temp dir");
    std::fs::write(source.path().join("server.js"), "ok").expect("write");
    std::fs::create_dir(source.path().join("node_modules")).expect("mkdir");
    std::fs::write(source.path().join("node_modules/x.js"), "no").expect("write");

    let (out, result) = call(&server.socket, deploy("blog", source.path())).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(out, "blog is serving v2\n");

    let uploads = server.fake.uploads.lock().expect("lock").clone();
    assert_eq!(uploads[0].app, "blog");
    assert!(uploads[1..].iter().all(|c| c.app.is_empty()));
    let archive: Vec<u8> = uploads.iter().flat_map(|c| c.data.clone()).collect();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(archive.as_slice()));
    let names: Vec<String> = archive
        .entries()
        .expect("entries")
        .map(|e| {
            e.expect("entry")
                .path()
                .expect("path")
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(names, ["server.js"]);
}

#[tokio::test]
async fn operation_outcomes() {
    let server = serve();
    let source = tempfile::tempdir().expect("temp dir");

    let (_, result) = call(&server.socket, deploy("failing", source.path())).await;
    assert_eq!(exit_code(&result), 1);
    let message = result.expect_err("failed").to_string();
    assert_eq!(message, "npm run build exited with status 1");

    let (_, result) = call(
        &server.socket,
        Command::Restart {
            app: "broken".into(),
        },
    )
    .await;
    assert_eq!(exit_code(&result), 1);
    assert!(matches!(result, Err(CtlError::StreamEnded)), "{result:?}");

    let rollback = Command::Rollback {
        app: "blog".into(),
        to: Some("v1".into()),
    };
    let (out, result) = call(&server.socket, rollback).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(out, "blog is serving v2\n");
}

#[tokio::test]
async fn server_errors_map_to_exit_codes() {
    let server = serve();
    let status = |app: &str| Command::Status {
        app: Some(app.into()),
        json: false,
    };

    let (_, result) = call(&server.socket, status("missing")).await;
    assert_eq!(exit_code(&result), 1);
    assert_eq!(
        result.expect_err("not found").to_string(),
        "no app is named `missing`"
    );

    let (_, result) = call(&server.socket, status("down")).await;
    assert_eq!(exit_code(&result), 69);

    let (_, result) = call(&server.socket, status("locked")).await;
    assert_eq!(exit_code(&result), 69);
    assert!(result.expect_err("refused").to_string().contains("refused"));

    let (_, result) = call(
        &server.socket,
        Command::Restart {
            app: "missing".into(),
        },
    )
    .await;
    assert_eq!(exit_code(&result), 1);

    let (_, result) = call(&server.socket, Command::Reload).await;
    assert_eq!(exit_code(&result), 1);
    assert_eq!(
        result.expect_err("refused reload").to_string(),
        "platform.toml has an error at line 3"
    );
}

#[tokio::test]
async fn replies_are_printed() {
    let server = serve();

    let (out, result) = call(
        &server.socket,
        Command::Status {
            app: None,
            json: true,
        },
    )
    .await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(out, "{\n  \"apps\": []\n}\n");

    let purge = Command::Purge(PurgeArgs {
        app: "blog".into(),
        tags: vec!["posts".into()],
        paths: vec![],
        prefixes: vec![],
        all: false,
        soft: true,
    });
    let (out, result) = call(&server.socket, purge).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(out, "marked 3 entries stale\n");
    let purges = server.fake.purges.lock().expect("lock").clone();
    assert_eq!(purges[0].tags, ["posts"]);
    assert!(purges[0].soft);

    let logs = Command::Logs {
        app: "blog".into(),
        follow: true,
        lines: 100,
    };
    let (out, result) = call(&server.socket, logs).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(
        out,
        "[worker 0 pid 100] line 0\n[worker 1 pid 101] line 1\n[bext] line 2\n"
    );
}

#[test]
fn terminal_escapes_from_the_server_are_shown_not_acted_on() {
    assert_eq!(super::printable("plain\tline\n"), "plain\tline\n");
    assert_eq!(
        super::printable("\u{1b}]0;pwned\u{7}red\u{1b}[31m \u{9b}2J"),
        "\\u{1b}]0;pwned\\u{7}red\\u{1b}[31m \\u{9b}2J"
    );
}
