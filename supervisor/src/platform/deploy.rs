//! The slow parts of putting a version live, run as effects of the
//! platform: unpacking an upload into the version's own directory (a
//! build never touches the live version), starting a generation of workers
//! on it and holding it to the health gate, and, after the switch, the
//! tail: the old generation's drain, `post_deploy`, and pruning. Nothing
//! here touches the platform's state; results go back as effects.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, header};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::Upload;
use crate::apps::{AppSettings, Gate, RunningApp};
use crate::config::platform::{AppUser, DeploySettings};
use crate::metrics::Metrics;
use crate::progress::Reporter;

/// Largest unpacked size of a version.
pub(super) const MAX_UNPACKED: u64 = 8 * 1024 * 1024 * 1024;
/// Most entries (files, directories, links) in one upload.
pub(super) const MAX_ENTRIES: u64 = 1_000_000;
/// Largest long-name or pax header entry an upload may carry: the tar
/// crate reads each whole into memory before any entry is seen.
const MAX_META_ENTRY: u64 = 64 * 1024;

/// `data_dir/apps/NAME` and what is in it, each with its own mode: an app
/// of its own user passes through `apps/NAME/versions/` (0711) to its own
/// version directory (0700, its user's); `logs/` and `staging/` are
/// bext's alone (0700).
pub(super) fn app_dirs(app_dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let apps = app_dir.parent().ok_or("an app directory has a parent")?;
    for (dir, mode) in [
        (apps.to_path_buf(), 0o711),
        (app_dir.to_path_buf(), 0o711),
        (app_dir.join("versions"), 0o711),
        (app_dir.join("logs"), 0o700),
        (app_dir.join(STAGING), 0o700),
    ] {
        match std::fs::DirBuilder::new().mode(mode).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("could not create {}: {e}", dir.display())),
        }
        let meta = std::fs::symlink_metadata(&dir)
            .map_err(|e| format!("could not read {}: {e}", dir.display()))?;
        if !meta.is_dir() {
            return Err(format!("{} is not a directory", dir.display()));
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("could not set the mode of {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Where a version is unpacked before it is moved into `versions/`: no
/// one but bext can reach it while it is being handed to the app's user.
const STAGING: &str = "staging";

/// The version's build log: every step and line of output goes there too.
pub(super) fn open_log(reporter: &Reporter, log: &Path) -> Result<(), String> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(log)
        .map_err(|e| format!("could not create the build log {}: {e}", log.display()))?;
    reporter.log_to(file);
    Ok(())
}

/// Removes the build logs in `logs` of versions not in `keep` (pruned
/// ones, and failures past the newest few): without this they would pile
/// up with every deploy.
pub(super) fn forget_logs(logs: &Path, keep: &std::collections::HashSet<String>) {
    let Ok(entries) = std::fs::read_dir(logs) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        if path.extension().is_some_and(|e| e == "log")
            && stem.is_some_and(|id| !keep.contains(&id))
        {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Unpacks the upload (a gzip'd tar) into `dir`, which must not exist,
/// owned by the app's user when it has one.
pub(super) async fn unpack(
    reporter: &Reporter,
    upload: Upload,
    dir: &Path,
    user: Option<&AppUser>,
    stop: CancellationToken,
) -> Result<(), String> {
    reporter.step(
        "unpack",
        format!("{:.1} MB into {}", upload.bytes as f64 / 1e6, dir.display()),
    );
    let dir = dir.to_path_buf();
    let owner = user.map(|u| (u.uid, u.gid));
    let unpacked =
        tokio::task::spawn_blocking(move || unpack_blocking(&upload.file, &dir, owner, &stop))
            .await
            .map_err(|e| format!("the unpacking task failed: {e}"))??;
    reporter.step(
        "unpack",
        format!("{} files, {:.1} MB", unpacked.0, unpacked.1 as f64 / 1e6),
    );
    Ok(())
}

/// Files and bytes unpacked.
fn unpack_blocking(
    archive: &Path,
    dir: &Path,
    owner: Option<(u32, u32)>,
    stop: &CancellationToken,
) -> Result<(u64, u64), String> {
    check_archive(archive, stop)?;
    let versions = dir.parent().ok_or("a version directory has a parent")?;
    let id = dir.file_name().ok_or("a version directory has a name")?;
    let app_dir = versions.parent().ok_or("versions/ has a parent")?;
    // Unpacked and handed over where the app's user cannot reach (no race
    // with its running workers), then moved into place.
    let staged = app_dir.join(STAGING).join(id);
    for leftover in [&staged, &dir.to_path_buf()] {
        remove_tree(leftover)
            .map_err(|e| format!("could not clear {}: {e}", leftover.display()))?;
    }
    let result = unpack_into(archive, &staged, owner, stop).and_then(|counts| {
        std::fs::rename(&staged, dir)
            .map_err(|e| format!("could not move the version into {}: {e}", dir.display()))?;
        Ok(counts)
    });
    if result.is_err() {
        let _ = remove_tree(&staged);
    }
    result
}

fn open_archive(
    archive: &Path,
) -> Result<tar::Archive<flate2::read::GzDecoder<std::io::BufReader<std::fs::File>>>, String> {
    let file =
        std::fs::File::open(archive).map_err(|e| format!("could not read the upload: {e}"))?;
    Ok(tar::Archive::new(flate2::read::GzDecoder::new(
        std::io::BufReader::new(file),
    )))
}

#[allow(
    clippy::needless_pass_by_value,
    reason = "used as map_err(not_an_archive)"
)]
fn not_an_archive(e: std::io::Error) -> String {
    format!("the upload is not a gzip-compressed tar archive: {e}")
}

const STOPPED: &str = "bext is stopping; the deploy was abandoned";

/// A first pass over the archive's raw entries, before anything is
/// unpacked: refuses long-name and pax entries larger than
/// [`MAX_META_ENTRY`] (the tar crate would read each whole into memory: a
/// few compressed megabytes could ask for gigabytes), and archives over
/// the entry and size limits.
fn check_archive(archive: &Path, stop: &CancellationToken) -> Result<(), String> {
    let mut tar = open_archive(archive)?;
    let (mut entries, mut bytes) = (0u64, 0u64);
    for entry in tar.entries().map_err(not_an_archive)?.raw(true) {
        let entry = entry.map_err(not_an_archive)?;
        if stop.is_cancelled() {
            return Err(STOPPED.to_string());
        }
        let size = entry.header().entry_size().map_err(not_an_archive)?;
        use tar::EntryType as T;
        if matches!(
            entry.header().entry_type(),
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
        ) && size > MAX_META_ENTRY
        {
            return Err(format!(
                "the upload has a long-name or pax header entry of {size} bytes (at most {MAX_META_ENTRY})"
            ));
        }
        entries += 1;
        bytes = bytes.saturating_add(size);
        if entries > MAX_ENTRIES.saturating_mul(2) || bytes > MAX_UNPACKED {
            return Err(format!(
                "the upload unpacks to more than {MAX_ENTRIES} entries or {} GB",
                MAX_UNPACKED / 1_000_000_000
            ));
        }
    }
    Ok(())
}

/// Unpacks `archive` into the new directory `dir` (0700), owned by
/// `owner` when given.
fn unpack_into(
    archive: &Path,
    dir: &Path,
    owner: Option<(u32, u32)>,
    stop: &CancellationToken,
) -> Result<(u64, u64), String> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("could not create {}: {e}", dir.display()))?;
    let mut tar = open_archive(archive)?;
    tar.set_preserve_permissions(false);
    tar.set_preserve_ownerships(false);
    tar.set_unpack_xattrs(false);
    tar.set_overwrite(true);
    tar.set_mask(0o022);
    let bad = not_an_archive;
    let (mut files, mut bytes) = (0u64, 0u64);
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if stop.is_cancelled() {
            return Err(STOPPED.to_string());
        }
        let kind = entry.header().entry_type();
        use tar::EntryType as T;
        match kind {
            T::Regular | T::Continuous | T::Directory | T::Symlink => {}
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => continue,
            other => {
                let path = entry
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                return Err(format!(
                    "the upload has `{path}` of a kind bext does not unpack ({other:?}); only files, directories and symlinks are"
                ));
            }
        }
        files += 1;
        // The entry's size as read (a pax header may set it, not only the
        // ustar field).
        bytes = bytes.saturating_add(entry.size());
        if files > MAX_ENTRIES || bytes > MAX_UNPACKED {
            return Err(format!(
                "the upload unpacks to more than {MAX_ENTRIES} entries or {} GB",
                MAX_UNPACKED / 1_000_000_000
            ));
        }
        // Refuses absolute paths, `..`, and paths through symlinks that
        // lead out of `dir`.
        let inside = entry
            .unpack_in(dir)
            .map_err(|e| format!("could not unpack the upload into {}: {e}", dir.display()))?;
        if !inside {
            let path = entry
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            return Err(format!("the upload has a path outside its root: `{path}`"));
        }
    }
    if let Some((uid, gid)) = owner {
        chown_tree(dir, uid, gid)
            .map_err(|e| format!("could not hand {} to the app's user: {e}", dir.display()))?;
    }
    Ok((files, bytes))
}

/// `rm -rf` that also gets through directories made read-only (a tenant's
/// `chmod 0555`, a build tool's cache): on a permission error it makes the
/// tree's directories writable to their owner and tries again. Symlinks
/// are removed, never followed. A missing `path` is fine.
pub(super) fn remove_tree(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let _ = make_writable(path);
            match std::fs::remove_dir_all(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// `chmod -R u+rwx` on the directories under `dir`, each opened with
/// `O_NOFOLLOW` and changed through its descriptor (a directory swapped for
/// a symlink is skipped, not followed).
fn make_writable(dir: &Path) -> std::io::Result<()> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::{Mode, fchmod, fstat};
    let fd = open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mode = Mode::from_bits_truncate(fstat(&fd)?.st_mode);
    fchmod(&fd, mode | Mode::S_IRWXU)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            let _ = make_writable(&entry.path());
        }
    }
    Ok(())
}

/// `lchown -R`: symlinks themselves, never what they point to. Only on a
/// tree no one else can reach (see [`STAGING`]).
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            chown_tree(&path, uid, gid)?;
        } else {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

/// Starts a generation on `settings` (hooks, install, build, workers):
/// ready only when every worker is, and answers `deploy.health_path`.
pub(super) async fn start_gated(
    settings: AppSettings,
    deploy: &DeploySettings,
    host: &str,
    metrics: Arc<Metrics>,
) -> Result<RunningApp, String> {
    let app = RunningApp::start(settings, metrics, Gate::AllReady)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(path) = &deploy.health_path {
        crate::progress::step(
            "health",
            format!(
                "GET {path} on every new worker (up to {})",
                humantime::format_duration(deploy.health_timeout)
            ),
        );
        if let Err(e) = health_gate(&app, path, host, deploy.health_timeout).await {
            let kill = CancellationToken::new();
            kill.cancel();
            app.stop(Duration::ZERO, &kill).await;
            return Err(e);
        }
    }
    Ok(app)
}

/// The Host a health check sends: the app's first exact domain (a wildcard
/// names no host a request could carry), or `localhost`.
pub(super) fn health_host(domains: &[String]) -> &str {
    domains
        .iter()
        .find(|d| !d.contains('*'))
        .map_or("localhost", String::as_str)
}

/// Asks each worker for `path` until it answers 2xx or 3xx, for at most
/// `timeout` in all.
async fn health_gate(
    app: &RunningApp,
    path: &str,
    host: &str,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    for worker in app.workers() {
        let mut last = String::from("no answer");
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(format!(
                    "worker {} (pid {}) did not pass the health check GET {path} within {}: {last}",
                    worker.index,
                    worker.pid,
                    humantime::format_duration(timeout)
                ));
            }
            let req = Request::get(path)
                .header(header::HOST, host)
                .header(header::USER_AGENT, "bext-health-check")
                .body(crate::body::empty())
                .map_err(|e| format!("bad health path {path}: {e}"))?;
            match worker.upstream().send(req, deadline - now).await {
                Ok(response)
                    if response.status().is_success() || response.status().is_redirection() =>
                {
                    break;
                }
                Ok(response) => last = format!("it answered {}", response.status()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(
                HEALTH_RETRY.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
            )
            .await;
        }
    }
    Ok(())
}

/// Pause between two health checks of a worker that did not pass yet.
const HEALTH_RETRY: Duration = Duration::from_millis(250);

/// The new generation's `post_deploy`, to run once it serves.
pub(super) type Hook =
    std::pin::Pin<Box<dyn Future<Output = Result<(), crate::hooks::HookError>> + Send>>;

/// What is left to do once a new generation is live.
pub(super) struct Tail {
    pub(super) reporter: Reporter,
    /// The generation it replaced.
    pub(super) old: Option<RunningApp>,
    pub(super) drain: Duration,
    /// Cancelled at shutdown: the drain and the hook are cut short.
    pub(super) hurry: CancellationToken,
    pub(super) kill: CancellationToken,
    pub(super) hook: Option<Hook>,
    pub(super) pruned: Vec<String>,
    pub(super) dirs: Vec<PathBuf>,
    /// Whether the state file was written at the switch.
    pub(super) saved: Result<(), String>,
    /// The final message.
    pub(super) live: String,
}

/// Drains the old generation, runs `post_deploy`, removes pruned versions,
/// and says how it ended.
pub(super) async fn finish(tail: Tail) {
    let reporter = tail.reporter.clone();
    reporter
        .clone()
        .scope(async move {
            let mut notes = Vec::new();
            if let Some(old) = tail.old {
                reporter.step(
                    "drain",
                    format!(
                        "the old workers finish their requests (up to {})",
                        humantime::format_duration(tail.drain)
                    ),
                );
                old.drain_and_stop(tail.drain, &tail.hurry, &tail.kill)
                    .await;
            }
            if let Some(hook) = tail.hook {
                // A shutdown drops the hook (its process group is killed).
                let ran = tokio::select! {
                    ran = hook => Some(ran),
                    () = tail.hurry.cancelled() => None,
                };
                match ran {
                    Some(Ok(())) => {}
                    Some(Err(e)) => {
                        warn!("{e}");
                        notes.push(e.to_string());
                    }
                    None => notes.push("post_deploy was cut short by a shutdown".to_string()),
                }
            }
            if !tail.dirs.is_empty() {
                reporter.step("prune", format!("removing {}", tail.pruned.join(", ")));
                let dirs = tail.dirs;
                let _ = tokio::task::spawn_blocking(move || {
                    for dir in dirs {
                        if let Err(e) = remove_tree(&dir) {
                            error!(dir = %dir.display(), "could not remove a pruned version: {e}");
                        }
                    }
                })
                .await;
            }
            if let Err(e) = tail.saved {
                notes.push(format!("the state file was not written ({e}); a restart would come back on the version before"));
            }
            let message = if notes.is_empty() {
                tail.live
            } else {
                format!("{} ({})", tail.live, notes.join("; "))
            };
            reporter.finish(Ok(message));
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gzip'd tar of `entries` (header, body) at `path`.
    fn archive(path: &Path, entries: Vec<(tar::Header, Vec<u8>)>) {
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(path).expect("archive"),
            flate2::Compression::fast(),
        );
        let mut tar = tar::Builder::new(gz);
        for (mut header, body) in entries {
            header.set_size(body.len() as u64);
            header.set_cksum();
            tar.append(&header, body.as_slice()).expect("append");
        }
        tar.into_inner().expect("tar").finish().expect("gzip");
    }

    fn file(path: &str, body: &[u8]) -> (tar::Header, Vec<u8>) {
        let mut header = tar::Header::new_gnu();
        header.set_path(path).expect("path");
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        (header, body.to_vec())
    }

    fn unpack_test(
        entries: Vec<(tar::Header, Vec<u8>)>,
    ) -> (tempfile::TempDir, Result<(u64, u64), String>) {
        let root = tempfile::tempdir().expect("tempdir");
        let app_dir = root.path().join("apps").join("a");
        std::fs::create_dir_all(&app_dir).expect("app dir");
        app_dirs(&app_dir).expect("app dirs");
        let upload = root.path().join("upload.tar.gz");
        archive(&upload, entries);
        let dir = app_dir.join("versions").join("v1");
        let result = unpack_blocking(&upload, &dir, None, &CancellationToken::new());
        (root, result)
    }

    #[test]
    fn an_upload_unpacks_into_its_version() {
        let (root, result) = unpack_test(vec![file("server.js", b"ok"), file("lib/a.js", b"a")]);
        assert_eq!(result, Ok((2, 3)));
        let dir = root.path().join("apps/a/versions/v1");
        assert_eq!(std::fs::read(dir.join("lib/a.js")).expect("read"), b"a");
    }

    #[test]
    fn a_huge_long_name_entry_is_refused_before_it_is_read() {
        let mut long = tar::Header::new_gnu();
        long.set_entry_type(tar::EntryType::GNULongName);
        long.set_path("././@LongLink").expect("path");
        let (root, result) = unpack_test(vec![(long, vec![b'a'; 1 << 20]), file("x", b"x")]);
        let error = result.expect_err("refused");
        assert!(error.contains("long-name or pax header"), "{error}");
        assert!(!root.path().join("apps/a/versions/v1").exists());
        assert_eq!(
            std::fs::read_dir(root.path().join("apps/a/staging"))
                .expect("staging")
                .count(),
            0,
            "nothing is left in staging"
        );
    }

    #[test]
    fn a_stopping_supervisor_abandons_an_unpack() {
        let root = tempfile::tempdir().expect("tempdir");
        let app_dir = root.path().join("apps").join("a");
        std::fs::create_dir_all(&app_dir).expect("app dir");
        app_dirs(&app_dir).expect("app dirs");
        let upload = root.path().join("upload.tar.gz");
        archive(&upload, vec![file("server.js", b"ok")]);
        let stop = CancellationToken::new();
        stop.cancel();
        let result = unpack_blocking(&upload, &app_dir.join("versions/v1"), None, &stop);
        assert_eq!(result, Err(STOPPED.to_string()));
    }

    #[test]
    fn a_read_only_tree_is_removed() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("tempdir");
        let tree = root.path().join("v1");
        std::fs::create_dir_all(tree.join("d/e")).expect("dirs");
        std::fs::write(tree.join("d/e/f"), "f").expect("file");
        for d in ["d/e", "d"] {
            std::fs::set_permissions(tree.join(d), std::fs::Permissions::from_mode(0o555))
                .expect("chmod");
        }
        remove_tree(&tree).expect("removed");
        assert!(!tree.exists());
        remove_tree(&tree).expect("a missing tree is fine");
    }

    #[test]
    fn a_health_check_names_an_exact_domain() {
        let domains = |d: &[&str]| d.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            health_host(&domains(&["*.example.com", "example.com"])),
            "example.com"
        );
        assert_eq!(health_host(&domains(&["*.example.com"])), "localhost");
        assert_eq!(health_host(&[]), "localhost");
        assert_eq!(health_host(&domains(&["a.test", "b.test"])), "a.test");
    }
}
