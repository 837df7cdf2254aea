//! How `isolate.memory_limit` is enforced on a host, decided once per
//! process and logged per app:
//!
//! 1. the runtime's heap flag, always (`--max-old-space-size`);
//! 2. a kernel limit per worker: cgroup v2 `memory.max` where bext's cgroup
//!    is delegated to it, else a cgroup v1 `memory.limit_in_bytes` where the
//!    memory hierarchy is writable; set [`HARD_LIMIT_HEADROOM`] above the
//!    limit, as a hard stop the kernel enforces even for a sudden spike;
//! 3. the RSS watchdog, always: it recycles a worker that passes the limit
//!    gracefully (replacement first, then drain) before the kernel has to
//!    kill it.
//!
//! Every worker process gets a cgroup of its own (a replacement and the
//! worker it replaces must not share one limit), joined between fork and
//! exec, removed once the worker is gone.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use tracing::{info, warn};

use crate::config::MemorySize;

/// The kernel limit is this fraction above the configured limit: the
/// watchdog recycles at the limit, the kernel stops runaways past this.
pub const HARD_LIMIT_HEADROOM: f64 = 0.25;

/// The kernel mechanism available on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kernel {
    /// cgroup v2, under this directory (bext's own, delegated).
    V2(PathBuf),
    /// cgroup v1 memory hierarchy, under this directory.
    V1(PathBuf),
    /// Neither; why.
    Unavailable(String),
}

impl Kernel {
    fn name(&self) -> &'static str {
        match self {
            Kernel::V2(_) => "cgroup-v2",
            Kernel::V1(_) => "cgroup-v1",
            Kernel::Unavailable(_) => "none",
        }
    }
}

static KERNEL: OnceLock<Kernel> = OnceLock::new();

/// Detects (once) what the host allows.
pub fn kernel() -> &'static Kernel {
    KERNEL.get_or_init(|| {
        let found = detect(Path::new("/proc/self/cgroup"), Path::new("/proc/self/mountinfo"));
        match &found {
            Kernel::Unavailable(why) => info!("no cgroup memory limits on this host ({why}); the RSS watchdog enforces memory limits"),
            Kernel::V1(dir) | Kernel::V2(dir) => info!(dir = %dir.display(), "memory limits also enforced by the kernel ({})", found.name()),
        }
        found
    })
}

/// Finds a cgroup directory bext can create per-worker groups in.
fn detect(proc_cgroup: &Path, mountinfo: &Path) -> Kernel {
    let (Ok(cgroups), Ok(mounts)) = (
        std::fs::read_to_string(proc_cgroup),
        std::fs::read_to_string(mountinfo),
    ) else {
        return Kernel::Unavailable("cannot read /proc/self/cgroup".into());
    };
    let base = format!("bext-{}", std::process::id());
    let mut reasons = Vec::new();

    // v2: our own group must offer `memory`, and we must be able to enable
    // it for children, which needs our own process out of that group.
    if let Some(path) = cgroups.lines().find_map(|l| l.strip_prefix("0::"))
        && let Some(mount) = mount_point(&mounts, |fs, _| fs == "cgroup2")
    {
        let own = mount.join(path.trim_start_matches('/'));
        let controllers =
            std::fs::read_to_string(own.join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "memory") {
            match delegate_v2(&own, &base) {
                Ok(dir) => return Kernel::V2(dir),
                Err(e) => reasons.push(format!(
                    "cgroup v2 at {} is not delegated to bext: {e}",
                    own.display()
                )),
            }
        } else {
            reasons.push("cgroup v2 has no memory controller here".to_string());
        }
    }
    // v1: the memory hierarchy, if we may create groups in ours.
    if let Some(path) = cgroups.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then_some(path)
    }) && let Some(mount) = mount_point(&mounts, |fs, options| {
        fs == "cgroup" && options.split(',').any(|o| o == "memory")
    }) {
        let parent = mount.join(path.trim_start_matches('/'));
        remove_stale_groups(&parent);
        let dir = parent.join(&base);
        match std::fs::create_dir_all(&dir) {
            Ok(()) => return Kernel::V1(dir),
            Err(e) => reasons.push(format!("cannot create {}: {e}", dir.display())),
        }
    }
    if reasons.is_empty() {
        reasons.push("no cgroup memory controller is mounted".to_string());
    }
    Kernel::Unavailable(reasons.join("; "))
}

/// Removes the (empty) groups of bext processes that are gone: a bext
/// killed with SIGKILL cannot clean up after itself.
fn remove_stale_groups(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("bext-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        remove_tree(&entry.path());
    }
}

/// `rmdir` a cgroup and its descendants, deepest first.
fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The mount point of the first mount whose fs type and super options
/// satisfy `want`.
fn mount_point(mountinfo: &str, want: impl Fn(&str, &str) -> bool) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split_whitespace();
        let (fs, _source, options) = (right.next()?, right.next()?, right.next().unwrap_or(""));
        if !want(fs, options) {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// Moves bext into `own/supervisor` and enables `memory` for `own`'s
/// children (cgroup v2 allows controllers only on groups without
/// processes), then makes `own/base`.
fn delegate_v2(own: &Path, base: &str) -> std::io::Result<PathBuf> {
    let supervisor = own.join("supervisor");
    std::fs::create_dir_all(&supervisor)?;
    std::fs::write(
        supervisor.join("cgroup.procs"),
        std::process::id().to_string(),
    )?;
    std::fs::write(own.join("cgroup.subtree_control"), "+memory")?;
    let dir = own.join(base);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("cgroup.subtree_control"), "+memory")?;
    Ok(dir)
}

/// One app's memory enforcement.
#[derive(Debug, Clone)]
pub struct AppMemory {
    inner: Arc<AppMemoryInner>,
}

#[derive(Debug)]
struct AppMemoryInner {
    app: String,
    limit: MemorySize,
    /// The app's group in the kernel hierarchy, while usable.
    group: Mutex<Option<(Kernel, PathBuf)>>,
}

impl AppMemory {
    pub fn new(app: &str, limit: MemorySize) -> Self {
        Self::with_kernel(app, limit, kernel())
    }

    fn with_kernel(app: &str, limit: MemorySize, kernel: &Kernel) -> Self {
        let group = match kernel {
            Kernel::V1(dir) | Kernel::V2(dir) => {
                let group = dir.join(app);
                let made = std::fs::create_dir_all(&group).and_then(|()| match kernel {
                    Kernel::V2(_) => {
                        std::fs::write(group.join("cgroup.subtree_control"), "+memory")
                    }
                    _ => Ok(()),
                });
                match made {
                    Ok(()) => Some((kernel.clone(), group)),
                    Err(e) => {
                        warn!(
                            app,
                            "could not create the app's cgroup {}: {e}",
                            group.display()
                        );
                        None
                    }
                }
            }
            Kernel::Unavailable(_) => None,
        };
        let memory = AppMemory {
            inner: Arc::new(AppMemoryInner {
                app: app.to_string(),
                limit,
                group: Mutex::new(group),
            }),
        };
        memory.log_mechanism();
        memory
    }

    fn log_mechanism(&self) {
        let inner = &self.inner;
        let hard = hard_limit(inner.limit);
        let group = inner.group.lock().unwrap_or_else(|e| e.into_inner());
        match group.as_ref() {
            Some((kernel, _)) => info!(
                app = %inner.app,
                memory_limit = %inner.limit,
                mechanism = kernel.name(),
                "memory limit {}: runtime heap flag (--max-old-space-size={}), {} per worker at {} (hard stop), \
                 RSS watchdog at {} (graceful recycle)",
                inner.limit,
                inner.limit.mebibytes(),
                match kernel { Kernel::V2(_) => "cgroup v2 memory.max", _ => "cgroup v1 memory.limit_in_bytes" },
                MemorySize::from_bytes(hard),
                inner.limit,
            ),
            None => info!(
                app = %inner.app,
                memory_limit = %inner.limit,
                mechanism = "rss-watchdog",
                "memory limit {}: runtime heap flag (--max-old-space-size={}) and RSS watchdog (graceful recycle); \
                 no cgroup limit ({})",
                inner.limit,
                inner.limit.mebibytes(),
                match kernel() { Kernel::Unavailable(why) => why.as_str(), _ => "the app's cgroup could not be made" },
            ),
        }
    }

    pub fn limit(&self) -> MemorySize {
        self.inner.limit
    }

    /// A fresh cgroup for one worker process, if the kernel enforces
    /// limits here.
    pub fn worker_group(&self, name: &str) -> Option<WorkerGroup> {
        let group = self.inner.group.lock().unwrap_or_else(|e| e.into_inner());
        let (kernel, app_dir) = group.as_ref()?;
        let dir = app_dir.join(name);
        let limit_file = match kernel {
            Kernel::V2(_) => "memory.max",
            _ => "memory.limit_in_bytes",
        };
        let made = std::fs::create_dir_all(&dir).and_then(|()| {
            std::fs::write(
                dir.join(limit_file),
                hard_limit(self.inner.limit).to_string(),
            )
        });
        match made {
            Ok(()) => {
                let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).ok()?;
                Some(WorkerGroup {
                    dir,
                    procs,
                    v2: matches!(kernel, Kernel::V2(_)),
                })
            }
            Err(e) => {
                warn!(app = %self.inner.app, "could not set up the worker cgroup {}: {e}", dir.display());
                let _ = std::fs::remove_dir(&dir);
                None
            }
        }
    }

    /// Stops using the kernel for this app (joining failed).
    pub fn disable(&self, why: &str) {
        let mut group = self.inner.group.lock().unwrap_or_else(|e| e.into_inner());
        if group.take().is_some() {
            warn!(app = %self.inner.app, mechanism = "rss-watchdog", "cgroup limits disabled ({why}); the RSS watchdog alone enforces the memory limit");
        }
    }

    /// Removes the app's (now empty) group.
    pub fn cleanup(&self) {
        if let Some((_, dir)) = self
            .inner
            .group
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Removes bext's own (now empty) groups under the hierarchy, at exit.
pub fn release() {
    if let Some(Kernel::V1(dir) | Kernel::V2(dir)) = KERNEL.get() {
        remove_tree(dir);
    }
}

fn hard_limit(limit: MemorySize) -> u64 {
    (limit.bytes() as f64 * (1.0 + HARD_LIMIT_HEADROOM)) as u64
}

/// One worker's cgroup; removed when dropped (after the worker is gone).
#[derive(Debug)]
pub struct WorkerGroup {
    dir: PathBuf,
    /// `…/cgroup.procs`, for the child to join between fork and exec.
    pub procs: CString,
    v2: bool,
}

impl WorkerGroup {
    /// Did the kernel kill a process of this group for exceeding its limit?
    pub fn oom_killed(&self) -> bool {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse::<u64>().ok())
            })
            .is_some_and(|n| n > 0)
    }

    pub fn mechanism(&self) -> &'static str {
        if self.v2 { "cgroup-v2" } else { "cgroup-v1" }
    }
}

impl Drop for WorkerGroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_found_by_type_and_options() {
        let mountinfo = "\
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            mount_point(mountinfo, |fs, o| fs == "cgroup"
                && o.split(',').any(|x| x == "memory")),
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
        assert_eq!(
            mount_point(mountinfo, |fs, _| fs == "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn a_host_without_a_memory_controller_falls_back_to_the_watchdog() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("cgroup"), "0::/\n").expect("write");
        std::fs::write(
            dir.path().join("mountinfo"),
            "1 0 0:1 / /proc rw - proc proc rw\n",
        )
        .expect("write");
        let found = detect(&dir.path().join("cgroup"), &dir.path().join("mountinfo"));
        assert!(matches!(found, Kernel::Unavailable(_)), "{found:?}");
    }

    #[test]
    fn hard_limits_leave_headroom_above_the_watchdog() {
        assert_eq!(hard_limit(MemorySize::from_bytes(100 << 20)), 125 << 20);
    }
}
