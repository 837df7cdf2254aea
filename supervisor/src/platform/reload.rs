//! Reloads (SIGHUP, `bextctl reload`): the platform file is read again and
//! the running apps are brought in line with it, without dropping a
//! request: added apps start, changed ones get a new generation that takes
//! over once ready, removed ones drain. An app in the middle of an
//! operation keeps its settings until the operation is over.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::{Effect, Platform, settings_for};
use crate::apps::{Gate, RunningApp};
use crate::config::platform::PlatformConfig;
use crate::run::RunError;

impl Platform {
    /// SIGHUP or `bextctl reload`: re-reads the platform file, then starts
    /// what is new or changed as one effect (a file that does not validate
    /// changes nothing).
    pub(super) fn reload(&mut self, reply: Option<oneshot::Sender<Result<String, String>>>) {
        if self.reloading || self.busy.values().any(|op| *op == "starting") {
            if !self.reload_due {
                info!("reload: waits until the starts under way are over");
            }
            self.reload_due = true;
            self.reload_waiting.extend(reply);
            return;
        }
        info!(config = %self.config_path.display(), "reloading");
        crate::notify::reloading();
        let mut replies: Vec<_> = std::mem::take(&mut self.reload_waiting);
        replies.extend(reply);
        // New certificates take effect now (not once the starts are over);
        // a broken pair refuses the whole reload.
        let loaded = self.load_new_config().and_then(|new| {
            self.service
                .set_certificates(&new)
                .map(|()| new)
                .map_err(|e| format!("TLS: {e}"))
        });
        let new = match loaded {
            Ok(new) => new,
            Err(e) => {
                self.announce();
                error!("reload refused, the running configuration is unchanged: {e}");
                for reply in replies {
                    let _ = reply.send(Err(format!("reload refused: {e}")));
                }
                return;
            }
        };
        let (wanted, broken) = settings_for(&new, &self.state);
        for (name, e) in broken {
            if self.apps.contains_key(&name) {
                error!(app = %name, "reload: {e}; the app keeps running as it was");
            } else {
                error!(app = %name, "app not started: {e}");
            }
        }
        let mut to_start = BTreeMap::new();
        for (name, settings) in wanted {
            if let Some(op) = self.busy.get(&name) {
                if self.apps.get(&name).is_some_and(|a| a.settings != settings) {
                    info!(app = %name, "reload: {op} under way; the app's new settings apply when it is over");
                    self.stale.insert(name);
                }
                continue;
            }
            match self.apps.get(&name) {
                None => {
                    info!(app = %name, "reload: new app");
                    to_start.insert(name, (settings, Gate::AnyReady));
                }
                Some(running) if running.settings.needs_restart(&settings) => {
                    info!(app = %name, "reload: app changed; starting new workers (the old ones serve until all are ready)");
                    to_start.insert(name, (settings, Gate::AllReady));
                }
                Some(_) => {}
            }
        }
        for name in to_start.keys() {
            self.busy.insert(name.clone(), "reload");
        }
        self.reloading = true;
        let metrics = Arc::clone(&self.metrics);
        self.spawn_effect(async move {
            let starts = to_start.into_iter().map(|(name, (settings, gate))| {
                let metrics = Arc::clone(&metrics);
                async move { (name, RunningApp::start(settings, metrics, gate).await) }
            });
            let started = futures_util::future::join_all(starts)
                .await
                .into_iter()
                .collect();
            Effect::Reloaded {
                config: Box::new(new),
                started,
                replies,
            }
        });
    }

    fn load_new_config(&self) -> Result<PlatformConfig, String> {
        let current = &self.config;
        // Read as bext listens now (the listen address, and whether it is
        // HTTPS, are settled at start): an edit of `listen` alone must not
        // make the rest of the file fail (e.g. port 443 asking apps for
        // certificates) and lose the other edits.
        let mut new = PlatformConfig::load_for_reload(
            &self.config_path,
            Some(self.listen_override.unwrap_or(current.listen)),
        )
        .map_err(|e| e.to_string())?
        .with_env_redis()?;
        if self.listen_override.is_none()
            && let Ok(file) = PlatformConfig::load_for_reload(&self.config_path, None)
            && file.listen != current.listen
        {
            warn!(old = %current.listen, new = %file.listen, "[platform] listen changed; restart bext to apply it");
        }
        new.listen = current.listen;
        if new.data_dir != current.data_dir {
            warn!(old = %current.data_dir.display(), new = %new.data_dir.display(), "[platform] data_dir changed; restart bext to apply it");
            new.data_dir = current.data_dir.clone();
        }
        if new.control_group != current.control_group {
            warn!(
                old = current
                    .control_group
                    .as_ref()
                    .map_or("(none)", |g| g.0.as_str()),
                new = new
                    .control_group
                    .as_ref()
                    .map_or("(none)", |g| g.0.as_str()),
                "[platform] control_group changed; restart bext to apply it"
            );
            new.control_group.clone_from(&current.control_group);
        }
        if new.remote_control != current.remote_control {
            warn!(
                "[platform.control] changed; restart bext to apply it (its certificate files are re-read without one)"
            );
            new.remote_control.clone_from(&current.remote_control);
        }
        if new.redis != current.redis {
            warn!("[platform.redis] changed; restart bext to apply it");
            new.redis.clone_from(&current.redis);
        }
        if new.tls != current.tls {
            warn!(
                "[platform] the [platform.tls] table changed; restart bext to apply it (certificates of apps are reloaded)"
            );
            new.tls.clone_from(&current.tls);
        }
        // Still HTTPS (the listener is): an app without a certificate of
        // its own gets its domains' from ACME, as the file was not checked
        // with [platform.tls].
        if new
            .tls
            .as_ref()
            .is_some_and(|t| t.acme.issuer == crate::listener::acme::Issuer::Acme)
        {
            for app in new.apps.iter().filter(|a| a.tls.is_none()) {
                if let Some(why) = app
                    .domains
                    .iter()
                    .find_map(|d| crate::listener::acme::unusable(d))
                {
                    return Err(format!(
                        "app `{}`: {why} ([apps.{}.tls]); the listener is HTTPS",
                        app.name, app.name
                    ));
                }
            }
        }
        Ok(new)
    }

    /// A reload's starts are over: swap what started in, apply new
    /// settings to the rest, retire what the file no longer names.
    pub(super) fn reloaded(
        &mut self,
        new: PlatformConfig,
        mut started: BTreeMap<String, Result<RunningApp, RunError>>,
        replies: Vec<oneshot::Sender<Result<String, String>>>,
    ) {
        self.reloading = false;
        for name in started.keys() {
            self.busy.remove(name);
        }
        // Settings as of now: a deploy may have finished meanwhile.
        let (mut wanted, broken) = settings_for(&new, &self.state);
        for name in broken.keys() {
            if let Some(running) = self.apps.get(name) {
                wanted.insert(name.clone(), running.settings.clone());
            }
        }
        let grace = new
            .shutdown_grace
            .unwrap_or(crate::config::DEFAULT_SHUTDOWN_GRACE);
        let mut retired = Vec::new();
        let mut fresh = Vec::new();
        let mut changes = Vec::new();
        for (name, running) in std::mem::take(&mut self.apps) {
            match (wanted.remove(&name), started.remove(&name)) {
                (None, replacement) => {
                    info!(app = %name, "reload: app removed; draining");
                    changes.push(format!("{name} removed"));
                    retired.push(running);
                    if let Some(Ok(replacement)) = replacement {
                        retired.push(replacement);
                    }
                }
                (Some(_), Some(Ok(mut replacement))) => {
                    replacement.inherit_limiter(&running);
                    replacement.version = self.active_version(&name);
                    replacement.set_older_statics(self.older_statics(&name));
                    changes.push(format!("{name} restarted"));
                    retired.push(running);
                    self.apps.insert(name, replacement);
                }
                (Some(settings), failed) => {
                    let mut running = running;
                    if let Some(Err(e)) = failed {
                        error!(app = %name, "{e}; the app keeps serving on its old workers");
                        changes.push(format!("{name} kept its old workers ({e})"));
                    } else if running.settings != settings {
                        if running.settings.needs_restart(&settings) {
                            // Busy when the reload began: the next one applies it.
                        } else {
                            info!(app = %name, "reload: applying new domains, limits or cache settings");
                            changes.push(format!("{name} updated"));
                            running.apply(settings);
                        }
                    }
                    self.apps.insert(name, running);
                }
            }
        }
        for (name, result) in started {
            match result {
                Ok(mut app) if wanted.contains_key(&name) => {
                    app.version = self.active_version(&name);
                    app.set_older_statics(self.older_statics(&name));
                    changes.push(format!("{name} added"));
                    self.not_running.remove(&name);
                    fresh.push(name.clone());
                    self.apps.insert(name, app);
                }
                Ok(app) => retired.push(app),
                Err(e) => {
                    error!(app = %name, "app not started: {e}");
                    self.not_running
                        .insert(name, format!("failed to start: {e}"));
                }
            }
        }
        self.not_running
            .retain(|name, _| new.apps.iter().any(|a| a.name == *name));
        for entry in &new.apps {
            if !self.apps.contains_key(&entry.name) && !self.busy.contains_key(&entry.name) {
                self.not_running
                    .entry(entry.name.clone())
                    .or_insert_with(|| "not started".to_string());
            }
        }
        self.config = new;
        self.service.set_access(&self.config);
        self.publish();
        for name in fresh {
            if let Some(app) = self.apps.get(&name) {
                app.post_deploy();
            }
        }
        for app in retired {
            self.retire(app, grace);
        }
        let summary = if changes.is_empty() {
            "reloaded: nothing to change".to_string()
        } else {
            format!("reloaded: {}", changes.join(", "))
        };
        info!("{summary}");
        self.announce();
        for reply in replies {
            let _ = reply.send(Ok(summary.clone()));
        }
        if std::mem::take(&mut self.reload_due) {
            self.reload(None);
        }
    }
}
