//! `hooks.pre_build` and `hooks.post_deploy`: shell commands run on an
//! app's behalf (`sh -c`, cwd = the app's source, `BEXT_APP` and `BEXT_HOOK`
//! in the environment), in a process group of their own, with their output
//! in the log under the app's name, and a timeout.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tracing::{Instrument, info, info_span};

use crate::output::{self, describe};

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
    timeout: Duration,
) -> Result<(), HookError> {
    let span = info_span!("hook", app = %app, hook);
    async {
        info!("running `{command}`");
        let spec = bext_worker::LaunchSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), command.into()],
            cwd: dir.to_path_buf(),
            env: vec![
                ("BEXT_APP".into(), app.into()),
                ("BEXT_HOOK".into(), hook.into()),
            ],
            listen_fd: None,
            join_cgroup: None,
        };
        let mut child = bext_worker::spawn(&spec).map_err(|source| HookError::Spawn {
            app: app.to_string(),
            hook,
            source,
        })?;
        let pgid = child.id().map(|pid| Pid::from_raw(pid as i32));
        let out = child
            .stdout
            .take()
            .map(|s| output::forward(s, |line| info!("{line}")));
        let err = child
            .stderr
            .take()
            .map(|s| output::forward(s, |line| info!("{line}")));
        let waited = tokio::time::timeout(timeout, child.wait()).await;
        if waited.is_err()
            && let Some(pgid) = pgid
        {
            let _ = killpg(pgid, Signal::SIGKILL);
            let _ = child.wait().await;
        }
        for task in [out, err].into_iter().flatten() {
            let _ = task.await;
        }
        match waited {
            Err(_) => Err(HookError::TimedOut {
                app: app.to_string(),
                hook,
                timeout,
            }),
            Ok(Ok(status)) if status.success() => {
                info!("done");
                Ok(())
            }
            Ok(Ok(status)) => Err(HookError::Failed {
                app: app.to_string(),
                hook,
                status: describe(status),
            }),
            Ok(Err(e)) => Err(HookError::Failed {
                app: app.to_string(),
                hook,
                status: e.to_string(),
            }),
        }
    }
    .instrument(span)
    .await
}
