//! The control socket of `bext run` (single-app mode): status, restart,
//! purge and logs of its one app. There are no versions to deploy or roll
//! back in this mode (a deploy is `bext serve`'s), and no file to reload;
//! those commands are refused with a clear error.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::apps::RunningApp;
use crate::platform::{Command, CommandError};
use bext_proto::control::v1 as pb;

const MULTI_APP_ONLY: &str = "`bext run` (single-app mode) has no versions: deploys, rollbacks, versions and reloads are `bext serve`'s";

/// Answers commands for `app` until the sender side closes.
pub async fn answer(app: &RunningApp, mut commands: mpsc::Receiver<Command>) {
    while let Some(command) = commands.recv().await {
        match command {
            Command::Status { apps, reply } => {
                let _ = reply.send(status(app, &apps));
            }
            Command::Purge {
                app: name, reply, ..
            } if name != app.name => {
                let _ = reply.send(Err(not_this_app(app, &name)));
            }
            Command::Restart {
                app: name,
                reporter,
            } if name != app.name => {
                reporter.finish(Err(not_this_app(app, &name).to_string()));
            }
            Command::Purge {
                selectors,
                soft,
                reply,
                ..
            } => match app.service().cache.clone() {
                Some(cache) => {
                    tokio::spawn(async move {
                        let purged = cache.purge_each_everywhere(&selectors, soft).await;
                        let _ = reply.send(purged.map_err(|e| CommandError::Failed(e.to_string())));
                    });
                }
                None => {
                    let _ = reply.send(Err(CommandError::Failed(
                        "the app has no cache to purge (its cache is off)".to_string(),
                    )));
                }
            },
            Command::Restart { reporter, .. } => {
                let before = app.restarts();
                let workers = app.worker_status().len() as u64;
                if !app.recycle_workers() {
                    reporter.finish(Err("a static site has no workers to restart".to_string()));
                    continue;
                }
                reporter.step(
                    "start",
                    format!("replacing {workers} worker(s), each once its successor is ready"),
                );
                let timeout = app.settings.config.isolate.start_timeout * 2;
                let restarts = app.restarts_counter();
                tokio::spawn(async move {
                    let deadline = tokio::time::Instant::now() + timeout;
                    while restarts() < before + workers && tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    if restarts() >= before + workers {
                        reporter.finish(Ok(format!("{workers} worker(s) replaced")));
                    } else {
                        reporter.finish(Err(format!(
                            "not every worker was replaced within {}; the ones that were not keep serving",
                            humantime::format_duration(timeout)
                        )));
                    }
                });
            }
            Command::Deploy { reporter, .. } | Command::Rollback { reporter, .. } => {
                reporter.finish(Err(MULTI_APP_ONLY.to_string()));
            }
            Command::Versions { reply, .. } => {
                let _ = reply.send(Err(CommandError::Failed(MULTI_APP_ONLY.to_string())));
            }
            Command::Reload { reply } => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(MULTI_APP_ONLY.to_string()));
                }
            }
        }
    }
}

fn not_this_app(app: &RunningApp, other: &str) -> CommandError {
    CommandError::NotFound(format!("this bext runs app '{}', not '{other}'", app.name))
}

fn status(app: &RunningApp, names: &[String]) -> Result<Vec<pb::AppStatus>, CommandError> {
    if let Some(other) = names.iter().find(|n| **n != app.name) {
        return Err(not_this_app(app, other));
    }
    Ok(vec![pb::AppStatus {
        name: app.name.clone(),
        framework: app.framework.to_string(),
        workers: crate::platform::workers_of(app),
        restarts: app.restarts(),
        version: String::new(),
        dir: app.settings.dir.display().to_string(),
        state: "running".to_string(),
        detail: String::new(),
        domains: Vec::new(),
        operation: String::new(),
        certificates: Vec::new(),
    }])
}
