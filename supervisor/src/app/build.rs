//! Installing dependencies and building the app before its workers start.
//!
//! Each step's output is streamed to the log line by line as it comes, in a
//! span carrying the app name, so a long `next build` is visible live. A
//! failed step stops bext with a one-line cause.

use std::process::Stdio;

use tracing::{Instrument, info, info_span};

use super::{App, DetectError, Step};
use crate::output::{self, describe};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Detect(#[from] DetectError),
    #[error("could not run `{step}` for app '{app}': {source}")]
    Spawn {
        app: String,
        step: String,
        source: std::io::Error,
    },
    #[error("`{step}` failed for app '{app}' ({status}); its output is above")]
    Failed {
        app: String,
        step: String,
        status: String,
    },
}

/// Installs dependencies when a lockfile exists and `node_modules` does not,
/// then builds when the app has a build and is not built (or `force_build`).
pub async fn prepare(app: &App, force_build: bool) -> Result<(), BuildError> {
    if let Some(step) = app.install_step()? {
        run(app, "install", &step).await?;
    }
    if let Some(step) = app.build_step(force_build) {
        run(app, "build", &step).await?;
    }
    Ok(())
}

async fn run(app: &App, phase: &'static str, step: &Step) -> Result<(), BuildError> {
    let span = info_span!("build", app = %app.name, phase);
    async {
        info!("running `{step}` in {}", app.dir.display());
        let mut command = tokio::process::Command::new(&step.program);
        command
            .args(&step.args)
            .current_dir(&app.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("NEXT_TELEMETRY_DISABLED", "1")
            .kill_on_drop(true);
        if phase == "install" {
            // A production NODE_ENV would make npm skip the devDependencies
            // the build needs.
            command.env_remove("NODE_ENV");
        }
        let mut child = command.spawn().map_err(|source| BuildError::Spawn {
            app: app.name.clone(),
            step: step.to_string(),
            source,
        })?;
        let stdout = child
            .stdout
            .take()
            .map(|out| output::forward(out, |line| info!("{line}")));
        let stderr = child
            .stderr
            .take()
            .map(|err| output::forward(err, |line| info!("{line}")));
        let status = child.wait().await.map_err(|source| BuildError::Spawn {
            app: app.name.clone(),
            step: step.to_string(),
            source,
        })?;
        for task in [stdout, stderr].into_iter().flatten() {
            let _ = task.await;
        }
        if status.success() {
            info!("`{step}` done");
            Ok(())
        } else {
            Err(BuildError::Failed {
                app: app.name.clone(),
                step: step.to_string(),
                status: describe(status),
            })
        }
    }
    .instrument(span)
    .await
}
