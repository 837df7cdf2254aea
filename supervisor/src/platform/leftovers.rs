//! What a supervisor killed with SIGKILL leaves behind, cleared before its
//! successor starts anything: processes it started whose parent-death
//! signal did not reach them (a build's grandchildren, a hook's background
//! job), and its runtime directories.
//!
//! Every process a multi-app supervisor starts carries
//! `BEXT_SUPERVISOR_MARK=<mark>` in its environment (see
//! `bext_worker::env`), where the mark names the data_dir; processes
//! inherit it, so the whole tree is found by it in `/proc`. This runs
//! only once the control socket is bound, so no other live supervisor
//! owns the same data_dir.

use std::path::Path;

use sha2::Digest;
use tracing::{info, warn};

/// The mark of the processes of the supervisor of `data_dir`.
pub fn mark(data_dir: &Path) -> String {
    let dir = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_path_buf());
    let digest = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
    digest[..12].iter().map(|b| format!("{b:02x}")).collect()
}

/// SIGKILLs every process that carries `mark`; returns how many.
pub fn reap(mark: &str) -> usize {
    let needle = format!("{}={mark}", bext_worker::env::MARK_VAR).into_bytes();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|&b| b == 0)
            .any(|var| var == needle.as_slice())
        {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok() {
                killed += 1;
            }
        }
    }
    if killed > 0 {
        warn!(
            killed,
            "killed processes left running by a supervisor that was killed"
        );
    }
    killed
}

/// Removes the runtime directories (`bext-PID-…`) of supervisors other
/// than this one under `run`.
pub fn clear_runtime_dirs(run: &Path) {
    let me = format!("bext-{}-", std::process::id());
    let Ok(entries) = std::fs::read_dir(run) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("bext-") && !name.starts_with(&me) {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => {
                    info!(dir = %entry.path().display(), "removed a runtime directory left by a previous supervisor");
                }
                Err(e) => {
                    warn!(dir = %entry.path().display(), "could not remove a stale runtime directory: {e}");
                }
            }
        }
    }
}
