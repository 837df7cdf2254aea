//! What the platform must remember across restarts: each app's versions
//! and which one is active, in `data_dir/state.json`.
//!
//! Written whole and atomically (a temp file in the same directory, fsync,
//! rename, fsync of the directory), so a supervisor killed at any moment
//! finds either the old state or the new one. A version is recorded as
//! `building` before its files are made: one still `building` when the
//! state is loaded was cut off by a crash, and is marked failed (its files
//! removed) before anything starts. This module only keeps records and
//! paths; it starts nothing.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The version that is the app's `source` directory in platform.toml.
pub const SOURCE_VERSION: &str = "source";

/// The state file's format; a newer one is refused, not misread.
const FORMAT: u32 = 1;

/// Versions' records kept per app (pruned and failed ones included);
/// the oldest pruned or failed records go first beyond this.
const MAX_RECORDS: usize = 200;
/// Build logs of failed versions kept per app (each at most 16 MiB).
pub const FAILED_LOGS: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("could not read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a state file bext can read: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    #[error("could not write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionState {
    /// Being unpacked, built or started.
    Building,
    Active,
    /// Kept for rollbacks (and for its hashed assets).
    Retained,
    Failed,
    /// Removed by `keep_versions`; the record stays.
    Pruned,
}

impl VersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Building => "building",
            VersionState::Active => "active",
            VersionState::Retained => "retained",
            VersionState::Failed => "failed",
            VersionState::Pruned => "pruned",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub id: String,
    /// Unix time, seconds.
    pub created: i64,
    /// sha256 of the uploaded archive.
    pub digest: String,
    pub state: VersionState,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AppState {
    /// `None`: the configured `source` serves.
    pub active: Option<String>,
    /// The number of the next version.
    pub next: u64,
    /// Oldest first.
    pub versions: Vec<VersionRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct File {
    format: u32,
    apps: BTreeMap<String, AppState>,
}

/// The platform's records, and where they live.
#[derive(Debug)]
pub struct State {
    data_dir: PathBuf,
    pub apps: BTreeMap<String, AppState>,
}

impl State {
    /// Loads `data_dir/state.json` (none yet: empty). Versions a crash cut
    /// off are marked failed, and returned so their files can go.
    pub fn load(data_dir: &Path) -> Result<(Self, Vec<(String, String)>), StateError> {
        let path = data_dir.join("state.json");
        let mut apps = match std::fs::read(&path) {
            Ok(bytes) => {
                let file: File = serde_json::from_slice(&bytes).map_err(|e| StateError::Parse {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                if file.format > FORMAT {
                    return Err(StateError::Parse {
                        path,
                        reason: format!(
                            "format {} is newer than this bext's ({FORMAT})",
                            file.format
                        ),
                    });
                }
                file.apps
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        let mut interrupted = Vec::new();
        for (name, app) in &mut apps {
            for version in &mut app.versions {
                if version.state == VersionState::Building {
                    version.state = VersionState::Failed;
                    version.reason =
                        "interrupted: the supervisor stopped during its deploy".to_string();
                    interrupted.push((name.clone(), version.id.clone()));
                }
            }
        }
        let state = State {
            data_dir: data_dir.to_path_buf(),
            apps,
        };
        Ok((state, interrupted))
    }

    /// Writes the records atomically.
    pub fn save(&mut self) -> Result<(), StateError> {
        for app in self.apps.values_mut() {
            trim(app);
        }
        let path = self.data_dir.join("state.json");
        let failed = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        let file = File {
            format: FORMAT,
            apps: self.apps.clone(),
        };
        let text = serde_json::to_vec_pretty(&file).map_err(|e| failed(e.into()))?;
        let mut temp = tempfile::NamedTempFile::new_in(&self.data_dir).map_err(failed)?;
        temp.write_all(&text).map_err(failed)?;
        temp.as_file().sync_all().map_err(failed)?;
        temp.persist(&path).map_err(|e| failed(e.error))?;
        std::fs::File::open(&self.data_dir)
            .and_then(|d| d.sync_all())
            .map_err(failed)?;
        Ok(())
    }

    pub fn app(&self, name: &str) -> Option<&AppState> {
        self.apps.get(name)
    }

    pub fn app_mut(&mut self, name: &str) -> &mut AppState {
        self.apps.entry(name.to_string()).or_default()
    }

    /// `data_dir/apps/NAME`.
    pub fn app_dir(&self, name: &str) -> PathBuf {
        self.data_dir.join("apps").join(name)
    }

    /// Where a version's files are.
    pub fn version_dir(&self, name: &str, id: &str) -> PathBuf {
        self.app_dir(name).join("versions").join(id)
    }

    /// Where a version's build and hook output is kept.
    pub fn build_log(&self, name: &str, id: &str) -> PathBuf {
        self.app_dir(name).join("logs").join(format!("{id}.log"))
    }

    /// The directory the app serves from: its active version's, or `source`.
    pub fn active_dir(&self, name: &str, source: &Path) -> (String, PathBuf) {
        match self.app(name).and_then(|a| a.active.clone()) {
            Some(id) => {
                let dir = self.version_dir(name, &id);
                (id, dir)
            }
            None => (SOURCE_VERSION.to_string(), source.to_path_buf()),
        }
    }
}

impl AppState {
    pub fn version(&self, id: &str) -> Option<&VersionRecord> {
        self.versions.iter().find(|v| v.id == id)
    }

    pub fn version_mut(&mut self, id: &str) -> Option<&mut VersionRecord> {
        self.versions.iter_mut().find(|v| v.id == id)
    }

    /// Versions whose build logs are worth keeping: every one with files,
    /// and the newest [`FAILED_LOGS`] failures (their logs say why).
    pub fn logs_to_keep(&self) -> std::collections::HashSet<String> {
        let mut failed = 0;
        self.versions
            .iter()
            .rev()
            .filter(|v| match v.state {
                VersionState::Pruned => false,
                VersionState::Failed => {
                    failed += 1;
                    failed <= FAILED_LOGS
                }
                _ => true,
            })
            .map(|v| v.id.clone())
            .collect()
    }

    /// Records a new version as `building`, and returns its id.
    pub fn begin(&mut self, digest: String, now: i64) -> String {
        self.next = self.next.max(1);
        let id = format!("v{}", self.next);
        self.next += 1;
        self.versions.push(VersionRecord {
            id: id.clone(),
            created: now,
            digest,
            state: VersionState::Building,
            reason: String::new(),
        });
        id
    }

    /// Makes `id` the active version (the one before becomes retained).
    pub fn activate(&mut self, id: &str) {
        for version in &mut self.versions {
            if version.state == VersionState::Active {
                version.state = VersionState::Retained;
            }
        }
        if id == SOURCE_VERSION {
            self.active = None;
        } else {
            if let Some(version) = self.version_mut(id) {
                version.state = VersionState::Active;
            }
            self.active = Some(id.to_string());
        }
    }

    pub fn fail(&mut self, id: &str, reason: String) {
        if let Some(version) = self.version_mut(id) {
            version.state = VersionState::Failed;
            version.reason = reason;
        }
    }

    /// The version a rollback without `--to` goes back to: the newest
    /// retained one older than the active one (the configured source,
    /// oldest of all, when none is).
    pub fn previous(&self) -> Option<String> {
        let active = self.active.as_deref()?;
        let position = self.versions.iter().position(|v| v.id == active)?;
        Some(
            self.versions[..position]
                .iter()
                .rev()
                .find(|v| v.state == VersionState::Retained)
                .map_or_else(|| SOURCE_VERSION.to_string(), |v| v.id.clone()),
        )
    }

    /// Versions beyond the newest `keep` retained ones, which `keep_versions`
    /// removes (never the active one, the one a rollback would pick, nor
    /// those in `protect`: generations still draining),
    /// and failed versions whose files are still there: marked pruned (or
    /// left failed), and returned so their files can go.
    pub fn prune(&mut self, keep: usize, protect: &[String]) -> Vec<String> {
        let previous = self.previous();
        let mut kept = 0;
        let mut gone = Vec::new();
        for version in self.versions.iter_mut().rev() {
            match version.state {
                VersionState::Retained => {
                    if kept < keep
                        || previous.as_deref() == Some(version.id.as_str())
                        || protect.contains(&version.id)
                    {
                        kept += 1;
                    } else {
                        version.state = VersionState::Pruned;
                        gone.push(version.id.clone());
                    }
                }
                VersionState::Failed => gone.push(version.id.clone()),
                _ => {}
            }
        }
        gone
    }
}

/// Drops the oldest records of pruned and failed versions past
/// [`MAX_RECORDS`].
fn trim(app: &mut AppState) {
    let mut excess = app.versions.len().saturating_sub(MAX_RECORDS);
    app.versions.retain(|v| {
        let droppable = matches!(v.state, VersionState::Pruned | VersionState::Failed);
        if excess > 0 && droppable {
            excess -= 1;
            false
        } else {
            true
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployed(app: &mut AppState, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let id = app.begin(format!("d{i}"), i as i64);
                app.activate(&id);
                id
            })
            .collect()
    }

    #[test]
    fn prune_keeps_the_active_and_the_newest_retained() {
        let mut app = AppState::default();
        let ids = deployed(&mut app, 5);
        assert_eq!(ids, ["v1", "v2", "v3", "v4", "v5"]);
        let gone = app.prune(2, &[]);
        assert_eq!(gone, ["v2", "v1"]);
        let states: Vec<_> = app.versions.iter().map(|v| v.state.as_str()).collect();
        assert_eq!(
            states,
            ["pruned", "pruned", "retained", "retained", "active"]
        );
        assert_eq!(app.previous().as_deref(), Some("v4"));
    }

    #[test]
    fn build_logs_are_kept_for_versions_with_files_and_the_newest_failures() {
        let mut app = AppState::default();
        deployed(&mut app, 3);
        for i in 0..(FAILED_LOGS + 2) {
            let id = app.begin(format!("f{i}"), 100);
            app.fail(&id, "build failed".into());
        }
        app.prune(1, &[]);
        let keep = app.logs_to_keep();
        // v1 pruned; v2 retained, v3 active; v4 and v5 the oldest failures.
        assert!(!keep.contains("v1"));
        assert!(keep.contains("v2") && keep.contains("v3"));
        assert!(!keep.contains("v4") && !keep.contains("v5"));
        assert!(keep.contains("v6") && keep.contains(&format!("v{}", FAILED_LOGS + 5)));
        assert_eq!(keep.len(), 2 + FAILED_LOGS);
    }

    #[test]
    fn prune_never_removes_the_rollback_target() {
        let mut app = AppState::default();
        deployed(&mut app, 3);
        // Rolled back to v1: v2 and v3 are newer, v1 active, previous is source.
        app.activate("v1");
        let gone = app.prune(1, &[]);
        assert_eq!(gone, ["v2"], "v3 is the newest retained");
        assert_eq!(app.previous().as_deref(), Some(SOURCE_VERSION));
    }

    #[test]
    fn a_draining_version_is_not_pruned() {
        let mut app = AppState::default();
        deployed(&mut app, 4);
        assert_eq!(app.prune(1, &["v2".to_string()]), ["v1"]);
        assert_eq!(
            app.version("v2").map(|v| v.state),
            Some(VersionState::Retained)
        );
    }

    #[test]
    fn failed_versions_lose_their_files_but_keep_their_record() {
        let mut app = AppState::default();
        deployed(&mut app, 1);
        let bad = app.begin("x".into(), 9);
        app.fail(&bad, "build failed".into());
        assert_eq!(app.prune(5, &[]), std::slice::from_ref(&bad));
        assert_eq!(
            app.version(&bad).map(|v| v.state),
            Some(VersionState::Failed)
        );
        assert_eq!(app.active.as_deref(), Some("v1"));
    }

    #[test]
    fn a_deploy_cut_off_by_a_crash_is_failed_on_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut state, interrupted) = State::load(dir.path()).expect("empty");
        assert!(interrupted.is_empty());
        let app = state.app_mut("blog");
        let v1 = app.begin("a".into(), 1);
        app.activate(&v1);
        let v2 = app.begin("b".into(), 2);
        state.save().expect("save");

        let (state, interrupted) = State::load(dir.path()).expect("load");
        assert_eq!(interrupted, [("blog".to_string(), v2.clone())]);
        let app = state.app("blog").expect("app");
        assert_eq!(app.active.as_deref(), Some("v1"));
        assert_eq!(
            app.version(&v2).map(|v| v.state),
            Some(VersionState::Failed)
        );
        let (id, dir_now) = state.active_dir("blog", Path::new("/src"));
        assert_eq!(id, "v1");
        assert!(dir_now.ends_with("apps/blog/versions/v1"));
    }

    #[test]
    fn a_newer_format_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("state.json"),
            r#"{"format": 99, "apps": {}}"#,
        )
        .expect("write");
        let err = State::load(dir.path()).expect_err("newer");
        assert!(err.to_string().contains("newer"), "{err}");
    }
}
