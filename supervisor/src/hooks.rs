//! `hooks.pre_build` and `hooks.post_deploy`: shell commands run on an
//! app's behalf (`sh -c`, cwd = the app's source, the clean environment of
//! the app's build plus `BEXT_APP` and `BEXT_HOOK`), in a process group of
//! their own, with their output in the log under the app's name, and a
//! timeout.

use std::path::Path;
use std::time::Duration;

use tracing::{Instrument, info, info_span};

use crate::output::{self, Finished, describe};

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("could not run hooks.{hook} of app '{app}': {source}")]
    Spawn {
        app: String,
        hook: &'static str,
        source: bext_worker::LaunchError,
    },
    #[error("hooks.{hook} of app '{app}' failed ({status}); its output is above")]
    Failed {
        app: String,
        hook: &'static str,
        status: String,
    },
    #[error("hooks.{hook} of app '{app}' did not finish within {timeout:?}; it was killed")]
    TimedOut {
        app: String,
        hook: &'static str,
        timeout: Duration,
    },
}

/// Runs one hook to completion.
pub async fn run(
    app: &str,
    hook: &'static str,
    command: &str,
    dir: &Path,
    app_env: &[(String, String)],
    user: Option<&crate::config::platform::AppUser>,
    timeout: Duration,
) -> Result<(), HookError> {
    let span = info_span!("hook", app = %app, hook);
    async {
        info!("running `{command}`");
        crate::progress::step(hook, format!("`{command}`"));
        let mut spec = bext_worker::LaunchSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), command.into()],
            cwd: dir.to_path_buf(),
            env: {
                let mut env = bext_worker::env::from_supervisor(true);
                env.extend(app_env.iter().map(|(k, v)| (k.into(), v.into())));
                env.push(("BEXT_APP".into(), app.into()));
                env.push(("BEXT_HOOK".into(), hook.into()));
                env
            },
            listen_fd: None,
            listen_fd_at: bext_worker::LISTEN_FD,
            join_cgroup: None,
            credentials: None,
        };
        // Hooks run in the app's source, often its own scripts: as its user.
        crate::app::run_as(&mut spec, user);
        let child = bext_worker::spawn(&spec).map_err(|source| HookError::Spawn {
            app: app.to_string(),
            hook,
            source,
        })?;
        match output::run_to_end(child, timeout).await {
            Finished::TimedOut => Err(HookError::TimedOut {
                app: app.to_string(),
                hook,
                timeout,
            }),
            Finished::Exited(status) if status.success() => {
                info!("done");
                Ok(())
            }
            Finished::Exited(status) => Err(HookError::Failed {
                app: app.to_string(),
                hook,
                status: describe(status),
            }),
            Finished::WaitFailed(e) => Err(HookError::Failed {
                app: app.to_string(),
                hook,
                status: e.to_string(),
            }),
        }
    }
    .instrument(span)
    .await
}
