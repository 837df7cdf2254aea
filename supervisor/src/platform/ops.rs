//! The platform's operations on one app: deploy, rollback, restart (a new
//! generation, gated, then the switch), and the queries: status, versions,
//! purge. Each applies at once to the platform's state and leaves the slow
//! part to an effect from [`super::deploy`].

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;
use tracing::{error, info};

use super::deploy;
use super::state::VersionState;
use super::{CommandError, Effect, Platform, SOURCE_VERSION, Upload, app_settings};
use crate::apps::RunningApp;
use crate::cache::store::Selector;
use crate::progress::Reporter;
use crate::statics::StaticFiles;
use bext_proto::control::v1 as pb;

/// What makes a new generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Deploy,
    Rollback,
    Restart,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Deploy => "deploy",
            Op::Rollback => "rollback",
            Op::Restart => "restart",
        }
    }
}

impl Platform {
    /// Refuses `op` on an app that is not configured or already busy.
    fn claim(&mut self, app: &str, op: Op) -> Result<(), String> {
        if self.configured(app).is_none() {
            return Err(format!("no app is named '{app}' in the platform file"));
        }
        if let Some(under_way) = self.busy.get(app) {
            return Err(busy_message(app, under_way));
        }
        self.busy.insert(app.to_string(), op.as_str());
        Ok(())
    }

    #[allow(
        clippy::needless_pass_by_value,
        reason = "the reporter is the operation's: it ends with it"
    )]
    pub(super) fn deploy(&mut self, name: String, upload: Upload, reporter: Reporter) {
        if let Err(e) = self.claim(&name, Op::Deploy) {
            reporter.finish(Err(e));
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let id = self.state.app_mut(&name).begin(upload.digest.clone(), now);
        // Recorded before any file is made: a crash from here on is found
        // at the next start.
        if let Err(e) = self.save_state() {
            self.state.app_mut(&name).versions.retain(|v| v.id != id);
            self.busy.remove(&name);
            reporter.finish(Err(format!("could not record the new version: {e}")));
            return;
        }
        let reporter = reporter.for_version(&id);
        let dir = self.state.version_dir(&name, &id);
        let log = self.state.build_log(&name, &id);
        info!(app = %name, version = %id, bytes = upload.bytes, "deploy: new version {id}");
        let entry = self
            .configured(&name)
            .cloned()
            .expect("claimed: configured");
        let config = self.config.clone();
        let metrics = Arc::clone(&self.metrics);
        let user = entry.user.clone();
        let stop = self.shutdown.graceful.clone();
        let keep_logs = self.state.app_mut(&name).logs_to_keep();
        self.spawn_effect(async move {
            let reporter_for_effect = reporter.clone();
            let result = reporter
                .clone()
                .scope(async move {
                    let app_dir = log
                        .parent()
                        .and_then(std::path::Path::parent)
                        .ok_or("a build log is in an app's directory")?;
                    deploy::app_dirs(app_dir)?;
                    deploy::forget_logs(&app_dir.join("logs"), &keep_logs);
                    deploy::open_log(&reporter, &log)?;
                    deploy::unpack(&reporter, upload, &dir, user.as_ref(), stop).await?;
                    let settings = app_settings(&config, &entry, dir).map_err(|e| e.to_string())?;
                    let host = deploy::health_host(&entry.domains);
                    Box::pin(deploy::start_gated(settings, &entry.deploy, host, metrics)).await
                })
                .await;
            Effect::Replaced {
                name,
                op: Op::Deploy,
                version: id,
                reporter: reporter_for_effect,
                result,
            }
        });
    }

    pub(super) fn rollback(&mut self, name: String, to: Option<String>, reporter: &Reporter) {
        if let Err(e) = self.claim(&name, Op::Rollback) {
            reporter.finish(Err(e));
            return;
        }
        let target = match self.rollback_target(&name, to) {
            Ok(target) => target,
            Err(e) => {
                self.busy.remove(&name);
                reporter.finish(Err(e));
                return;
            }
        };
        let entry = self
            .configured(&name)
            .cloned()
            .expect("claimed: configured");
        let dir = if target == SOURCE_VERSION {
            entry.source.clone()
        } else {
            self.state.version_dir(&name, &target)
        };
        info!(app = %name, version = %target, "rollback to {target}");
        self.start_generation(name, Op::Rollback, target, dir, reporter);
    }

    /// The version a rollback goes to, if it can.
    fn rollback_target(&self, name: &str, to: Option<String>) -> Result<String, String> {
        let app = self.state.app(name);
        let active = app
            .and_then(|a| a.active.clone())
            .unwrap_or_else(|| SOURCE_VERSION.to_string());
        let target = match to {
            Some(to) => to,
            None => app
                .and_then(|a| a.previous())
                .ok_or_else(|| format!("app '{name}' has no earlier version to roll back to"))?,
        };
        if target == active {
            return Err(format!(
                "version {target} of app '{name}' is already active"
            ));
        }
        if target == SOURCE_VERSION {
            return Ok(target);
        }
        match app.and_then(|a| a.version(&target)) {
            Some(v) if v.state == VersionState::Retained => Ok(target),
            Some(v) => Err(format!(
                "version {target} of app '{name}' is {}; only retained versions can be rolled back to",
                v.state.as_str()
            )),
            None => Err(format!("app '{name}' has no version {target}")),
        }
    }

    pub(super) fn restart(&mut self, name: String, reporter: &Reporter) {
        if let Err(e) = self.claim(&name, Op::Restart) {
            reporter.finish(Err(e));
            return;
        }
        let entry = self
            .configured(&name)
            .cloned()
            .expect("claimed: configured");
        let (version, dir) = self.state.active_dir(&name, &entry.source);
        info!(app = %name, %version, "restart");
        self.start_generation(name, Op::Restart, version, dir, reporter);
    }

    /// Starts a generation of `version` (already built) as an effect.
    fn start_generation(
        &mut self,
        name: String,
        op: Op,
        version: String,
        dir: std::path::PathBuf,
        reporter: &Reporter,
    ) {
        let entry = self
            .configured(&name)
            .cloned()
            .expect("claimed: configured");
        let config = self.config.clone();
        let metrics = Arc::clone(&self.metrics);
        let reporter = reporter.for_version(&version);
        self.spawn_effect(async move {
            let reporter_for_effect = reporter.clone();
            let result = reporter
                .scope(async move {
                    let settings = app_settings(&config, &entry, dir).map_err(|e| e.to_string())?;
                    let host = deploy::health_host(&entry.domains);
                    Box::pin(deploy::start_gated(settings, &entry.deploy, host, metrics)).await
                })
                .await;
            Effect::Replaced {
                name,
                op,
                version,
                reporter: reporter_for_effect,
                result,
            }
        });
    }

    /// A new generation is ready (switch to it) or failed (keep the old).
    #[allow(
        clippy::needless_pass_by_value,
        reason = "the reporter and version are the operation's: they end with it"
    )]
    pub(super) fn replaced(
        &mut self,
        name: String,
        op: Op,
        version: String,
        reporter: Reporter,
        result: Result<RunningApp, String>,
    ) {
        let mut new = match result {
            Ok(new) => new,
            Err(reason) => {
                error!(app = %name, %version, "{} failed: {reason}; the app keeps serving as it was", op.as_str());
                if op == Op::Deploy {
                    self.state.app_mut(&name).fail(&version, reason.clone());
                    let _ = self.save_state();
                    let dir = self.state.version_dir(&name, &version);
                    tokio::task::spawn_blocking(move || deploy::remove_tree(&dir));
                }
                self.busy.remove(&name);
                reporter.finish(Err(format!(
                    "{} of app '{name}' failed: {reason}",
                    op.as_str()
                )));
                self.after_operation(&name);
                return;
            }
        };
        let Some(entry) = self.configured(&name).cloned() else {
            // Removed from the platform file meanwhile.
            self.busy.remove(&name);
            if op == Op::Deploy {
                self.state.app_mut(&name).fail(
                    &version,
                    "the app was removed from the platform file".to_string(),
                );
                let _ = self.save_state();
            }
            self.retire(new, Duration::ZERO);
            reporter.finish(Err(format!(
                "app '{name}' was removed from the platform file"
            )));
            self.after_operation(&name);
            return;
        };
        let cache = if entry.deploy.purge_cache && op != Op::Restart {
            "; its cache starts empty"
        } else {
            "; it keeps the cached pages"
        };
        reporter.step(
            "switch",
            format!("routing app '{name}' to {version}{cache}"),
        );
        let old = self.apps.remove(&name);
        // The old generation's version may not be pruned while it drains.
        let draining = old
            .as_ref()
            .map(|o| o.version.clone())
            .filter(|v| !v.is_empty() && *v != version);
        if let Some(v) = &draining {
            self.draining
                .entry(name.clone())
                .or_default()
                .push(v.clone());
        }
        let pruned = if op == Op::Restart {
            Vec::new()
        } else {
            let protect = self.draining.get(&name).cloned().unwrap_or_default();
            let app = self.state.app_mut(&name);
            app.activate(&version);
            app.prune(entry.deploy.keep_versions, &protect)
        };
        new.version.clone_from(&version);
        if let Some(old) = &old {
            new.inherit_limiter(old);
            // A restart runs the same version: its pages stay good.
            if !entry.deploy.purge_cache || op == Op::Restart {
                new.adopt_cache(old);
            }
        }
        // Edge mode: the pages the other version stored in Redis go too,
        // on every instance (this one would promote them otherwise).
        if entry.deploy.purge_cache
            && op != Op::Restart
            && let Some(cache) = new.service().cache.clone().filter(|c| c.l2().is_some())
        {
            let app = name.clone();
            tokio::spawn(async move {
                let all = Selector {
                    all: true,
                    ..Selector::default()
                };
                match cache.purge_everywhere(&all, false).await {
                    Ok(purged) => {
                        info!(app = %app, purged, "deploy: the app's shared cache purged on every instance");
                    }
                    Err(e) => tracing::warn!(app = %app, "deploy: {e}"),
                }
            });
        }
        // Hashed assets of the versions still retained stay reachable.
        new.set_older_statics(self.older_statics(&name));
        self.apps.insert(name.clone(), new);
        self.not_running.remove(&name);
        let saved = self.save_state();
        self.publish();
        info!(app = %name, %version, "{}: {version} is live", op.as_str());
        // The app takes operations again (a rollback right after a deploy
        // must not wait for the old generation's drain).
        self.busy.remove(&name);
        self.announce();
        let drain = entry
            .deploy
            .drain_timeout
            .unwrap_or_else(|| self.shutdown_grace());
        // Files go only once the state says so: a version the state file
        // still calls retained keeps them.
        let pruned = if saved.is_ok() { pruned } else { Vec::new() };
        let dirs: Vec<_> = pruned
            .iter()
            .map(|id| self.state.version_dir(&name, id))
            .filter(|dir| dir.exists())
            .collect();
        let pruned: Vec<_> = pruned
            .into_iter()
            .filter(|id| self.state.version_dir(&name, id).exists())
            .collect();
        let hook = self
            .apps
            .get(&name)
            .and_then(RunningApp::post_deploy_hook)
            .map(|h| Box::pin(h) as _);
        let tail = deploy::Tail {
            reporter,
            old,
            drain,
            hurry: self.shutdown.graceful.clone(),
            kill: self.shutdown.immediate.clone(),
            hook,
            pruned,
            dirs,
            saved,
            live: format!("{version} of app '{name}' is live"),
        };
        // Tracked, so a shutdown waits for the old generation to stop.
        let running = self.tails.spawn(deploy::finish(tail));
        self.after_operation(&name);
        self.spawn_effect(async move {
            let _ = running.await;
            Effect::Finished {
                name,
                drained: draining,
            }
        });
    }

    /// Static files of `name`'s retained versions (newest first, at most
    /// `keep_versions`), whose hashed assets its active version serves.
    pub(super) fn older_statics(&self, name: &str) -> Vec<(String, Arc<StaticFiles>)> {
        let Some(entry) = self.configured(name) else {
            return Vec::new();
        };
        let Some(app) = self.state.app(name) else {
            return Vec::new();
        };
        let mut retained: Vec<(String, std::path::PathBuf)> = app
            .versions
            .iter()
            .rev()
            .filter(|v| v.state == VersionState::Retained)
            .map(|v| (v.id.clone(), self.state.version_dir(name, &v.id)))
            .collect();
        if app.active.is_some() {
            retained.push((SOURCE_VERSION.to_string(), entry.source.clone()));
        }
        retained.truncate(entry.deploy.keep_versions);
        retained
            .into_iter()
            .filter_map(|(id, dir)| {
                let settings = app_settings(&self.config, entry, dir).ok()?;
                let detected = crate::app::detect(&settings.dir, &settings.config).ok()?;
                let files = StaticFiles::open(&detected.mounts(), Some(detected.dir.as_path()))
                    .ok()?
                    .with_compression(settings.config.compression);
                Some((id, Arc::new(files)))
            })
            .collect()
    }

    /// An operation on `name` is over: settings a reload skipped while it
    /// ran are applied now.
    pub(super) fn after_operation(&mut self, name: &str) {
        if self.stale.remove(name) {
            info!(app = %name, "applying the platform file's new settings, skipped during the operation");
            self.reload(None);
        }
    }

    pub(super) fn status(&self, names: &[String]) -> Result<Vec<pb::AppStatus>, CommandError> {
        for name in names {
            if self.configured(name).is_none() {
                return Err(CommandError::NotFound(format!(
                    "no app is named '{name}' in the platform file"
                )));
            }
        }
        Ok(self
            .config
            .apps
            .iter()
            .filter(|e| names.is_empty() || names.contains(&e.name))
            .map(|entry| {
                let (version, dir) = self.state.active_dir(&entry.name, &entry.source);
                let running = self.apps.get(&entry.name);
                let (state, detail) = match (self.busy.get(&entry.name), running) {
                    (Some(&"starting"), _) => ("starting", String::new()),
                    (Some(op), Some(_)) => ("running", format!("{op} in progress")),
                    (Some(op), None) => ("starting", format!("{op} in progress")),
                    (None, Some(_)) => ("running", String::new()),
                    (None, None) => (
                        "failed",
                        self.not_running
                            .get(&entry.name)
                            .cloned()
                            .unwrap_or_default(),
                    ),
                };
                let detail = if version != SOURCE_VERSION && detail.is_empty() {
                    format!("deployed version {version} wins over `source`")
                } else {
                    detail
                };
                pb::AppStatus {
                    name: entry.name.clone(),
                    framework: running.map(|a| a.framework.to_string()).unwrap_or_default(),
                    workers: running.map(workers_of).unwrap_or_default(),
                    restarts: running.map_or(0, RunningApp::restarts),
                    version,
                    dir: dir.display().to_string(),
                    state: state.to_string(),
                    detail,
                    domains: entry.domains.clone(),
                    certificates: self.service.certificates_of(&entry.name),
                    operation: self
                        .busy
                        .get(&entry.name)
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                }
            })
            .collect())
    }

    pub(super) fn versions(&self, name: &str) -> Result<Vec<pb::Version>, CommandError> {
        let entry = self.configured(name).ok_or_else(|| {
            CommandError::NotFound(format!("no app is named '{name}' in the platform file"))
        })?;
        let app = self.state.app(name);
        let mut versions: Vec<pb::Version> = app
            .map(|a| {
                a.versions
                    .iter()
                    .rev()
                    .map(|v| {
                        let log = self.state.build_log(name, &v.id);
                        pb::Version {
                            id: v.id.clone(),
                            state: v.state.as_str().to_string(),
                            created: v.created,
                            reason: v.reason.clone(),
                            digest: v.digest.clone(),
                            build_log: if log.exists() {
                                log.display().to_string()
                            } else {
                                String::new()
                            },
                            dir: if matches!(v.state, VersionState::Active | VersionState::Retained)
                            {
                                self.state.version_dir(name, &v.id).display().to_string()
                            } else {
                                String::new()
                            },
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let source_active = app.and_then(|a| a.active.as_ref()).is_none();
        versions.push(pb::Version {
            id: SOURCE_VERSION.to_string(),
            state: if source_active { "active" } else { "retained" }.to_string(),
            created: 0,
            reason: String::new(),
            digest: String::new(),
            build_log: String::new(),
            dir: entry.source.display().to_string(),
        });
        Ok(versions)
    }

    pub(super) fn purge(
        &self,
        name: &str,
        selectors: Vec<Selector>,
        soft: bool,
        reply: oneshot::Sender<Result<u64, CommandError>>,
    ) {
        if self.configured(name).is_none() {
            let _ = reply.send(Err(CommandError::NotFound(format!(
                "no app is named '{name}' in the platform file"
            ))));
            return;
        }
        let Some(cache) = self.apps.get(name).and_then(|a| a.service().cache.clone()) else {
            let _ = reply.send(Err(CommandError::Failed(format!(
                "app '{name}' has no cache to purge (not running, or its cache is off)"
            ))));
            return;
        };
        tokio::spawn(async move {
            let purged = cache.purge_each_everywhere(&selectors, soft).await;
            let _ = reply.send(purged.map_err(|e| CommandError::Failed(e.to_string())));
        });
    }
}

/// An app's workers as `status` shows them.
pub fn workers_of(app: &RunningApp) -> Vec<pb::WorkerStatus> {
    app.worker_status()
        .into_iter()
        .map(|w| pb::WorkerStatus {
            index: u32::try_from(w.index).unwrap_or(u32::MAX),
            pid: w.pid.unwrap_or(0),
            state: w.state.to_string(),
            inflight: u32::try_from(w.inflight).unwrap_or(u32::MAX),
            rss_bytes: w.pid.and_then(crate::pool::rss_bytes).unwrap_or(0),
        })
        .collect()
}

/// Why an operation is refused while `under_way` runs on `app`.
pub fn busy_message(app: &str, under_way: &str) -> String {
    let under_way = if under_way == "starting" {
        "start"
    } else {
        under_way
    };
    format!("a {under_way} of app '{app}' is in progress; try again when it is over")
}
