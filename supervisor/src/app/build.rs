//! Installing dependencies and building the app before its workers start.
//!
//! Each step's output is streamed to the log line by line as it comes, in a
//! span carrying the app name, so a long `next build` is visible live. A
//! failed step stops bext with a one-line cause.

use std::time::Duration;

use tracing::{Instrument, info, info_span};

use super::{App, DetectError, Step};
use crate::config::platform::AppUser;
use crate::output::{self, Finished, describe};

/// How long one install or build step may run before it is killed (with
/// everything it started).
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

fn describe_ok(status: std::process::ExitStatus) -> Result<(), String> {
    if status.success() {
        Ok(())
    } else {
        Err(describe(status))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Detect(#[from] DetectError),
    #[error("could not run `{step}` for app '{app}': {source}")]
    Spawn {
        app: String,
        step: String,
        source: bext_worker::LaunchError,
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
/// Both run as `user` when set (the app's own code runs in them: package
/// scripts, the framework's build).
/// Each is killed (with everything it started) after `timeout`.
pub async fn prepare(
    app: &App,
    force_build: bool,
    user: Option<&AppUser>,
    timeout: Duration,
) -> Result<(), BuildError> {
    if let Some(step) = app.install_step()? {
        run(app, "install", &step, user, timeout).await?;
    }
    if let Some(step) = app.build_step(force_build) {
        run(app, "build", &step, user, timeout).await?;
    }
    Ok(())
}

/// `bext dev`'s preparation: the install, when dependencies are missing
/// (said in the log), and no build.
pub async fn prepare_install(
    app: &App,
    user: Option<&AppUser>,
    timeout: Duration,
) -> Result<(), BuildError> {
    if let Some(step) = app.install_step()? {
        info!(app = %app.name, "node_modules is missing: installing the dependencies first");
        run(app, "install", &step, user, timeout).await?;
    }
    Ok(())
}

async fn run(
    app: &App,
    phase: &'static str,
    step: &Step,
    user: Option<&AppUser>,
    timeout: Duration,
) -> Result<(), BuildError> {
    let span = info_span!("build", app = %app.name, phase);
    async {
        info!("running `{step}` in {}", app.dir.display());
        crate::progress::step(phase, format!("`{step}`"));
        // The clean environment of the app's processes (bext_worker::env),
        // with the package manager's settings, and the app's own variables.
        let mut env = bext_worker::env::from_supervisor(true);
        if phase == "install" {
            // A production NODE_ENV would make npm skip the devDependencies
            // the build needs.
            env.retain(|(k, _)| k != "NODE_ENV");
        }
        env.extend(app.env.iter().map(|(k, v)| (k.into(), v.into())));
        env.push(("NEXT_TELEMETRY_DISABLED".into(), "1".into()));
        let mut spec = bext_worker::LaunchSpec {
            program: step.program.clone().into(),
            args: step.args.iter().map(Into::into).collect(),
            cwd: app.dir.clone(),
            env,
            listen_fd: None,
            listen_fd_at: bext_worker::LISTEN_FD,
            join_cgroup: None,
            credentials: None,
        };
        super::run_as(&mut spec, user);
        let child = bext_worker::spawn(&spec).map_err(|source| BuildError::Spawn {
            app: app.name.clone(),
            step: step.to_string(),
            source,
        })?;
        let status = match output::run_to_end(child, timeout).await {
            Finished::Exited(status) => describe_ok(status),
            Finished::TimedOut => Err(format!(
                "killed after {}",
                humantime::format_duration(timeout)
            )),
            Finished::WaitFailed(e) => Err(e.to_string()),
        };
        match status {
            Ok(()) => {
                info!("`{step}` done");
                Ok(())
            }
            Err(status) => Err(BuildError::Failed {
                app: app.name.clone(),
                step: step.to_string(),
                status,
            }),
        }
    }
    .instrument(span)
    .await
}
