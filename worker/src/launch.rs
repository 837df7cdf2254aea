//! Launching a worker process.
//!
//! The launch happens in the forked child, between `fork` and `exec`, so it
//! costs no extra process: the child starts a session (and process group) of
//! its own (so the supervisor can signal the app and everything it spawned,
//! and a Ctrl-C on the terminal reaches only the supervisor), asks the kernel to kill it when
//! the supervisor dies, and finds the listening socket at [`LISTEN_FD`].

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::PathBuf;
use std::process::Stdio;

/// The descriptor number at which a worker finds its listening socket.
pub const LISTEN_FD: RawFd = 3;
/// Where a worker whose processes pass the socket down to a child (`bext
/// dev`: `next dev`, `node --watch`) finds it: out of the way of the
/// descriptors Node gives its children (stdio, then the IPC channel at 3).
pub const HIGH_LISTEN_FD: RawFd = 64;

/// What to run and how.
#[derive(Debug)]
pub struct LaunchSpec<'a> {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub cwd: PathBuf,
    /// The child's whole environment (later entries win): nothing of the
    /// supervisor's reaches it unless listed here (see [`crate::env`]).
    pub env: Vec<(OsString, OsString)>,
    /// Becomes descriptor `listen_fd_at` in the child. The caller keeps
    /// ownership.
    pub listen_fd: Option<BorrowedFd<'a>>,
    /// [`LISTEN_FD`], or [`HIGH_LISTEN_FD`].
    pub listen_fd_at: RawFd,
    /// A cgroup's `cgroup.procs` file: the child joins that group before
    /// it execs, so the app and everything it spawns are in it.
    pub join_cgroup: Option<std::ffi::CString>,
    /// Run as this user and group (no supplementary groups) instead of the
    /// supervisor's (which must be root to change them).
    pub credentials: Option<Credentials>,
}

/// A user and group to run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("could not start {program}: {source}")]
    Spawn { program: String, source: io::Error },
}

/// Forks and execs the worker. Its stdout and stderr are pipes for the
/// supervisor to read; stdin is `/dev/null`.
///
/// Must be called from a thread that outlives the child (a runtime worker
/// thread, not a blocking-pool thread): Linux delivers the parent-death
/// signal when the *thread* that forked the child exits.
pub fn spawn(spec: &LaunchSpec<'_>) -> Result<tokio::process::Child, LaunchError> {
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .current_dir(&spec.cwd)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);

    let supervisor = std::process::id() as libc::pid_t;
    let listen_fd = spec.listen_fd.map(|fd| fd.as_raw_fd());
    let listen_fd_at = spec.listen_fd_at;
    let join_cgroup = spec.join_cgroup.clone();
    let credentials = spec.credentials;
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe system calls (setsid, prctl, getppid, open,
    // write, close, dup2, fcntl, setgroups, setgid, setuid, _exit); it allocates
    // nothing and takes no locks (the cgroup path was made into a C string
    // before the fork).
    unsafe {
        cmd.pre_exec(move || {
            // A session (and so a process group) of its own: the supervisor
            // signals `-pgid` to reach the app and its children, terminal
            // signals stay with the supervisor, and the app has no
            // controlling terminal to push keystrokes into.
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(procs) = &join_cgroup {
                // "0" moves the writing process.
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(error);
                }
            }
            // Drop to the app's user (after joining the cgroup, which may
            // need the supervisor's rights); groups first, while allowed.
            if let Some(c) = credentials {
                let groups = [c.gid as libc::gid_t];
                if libc::setgroups(1, groups.as_ptr()) != 0
                    || libc::setgid(c.gid as libc::gid_t) != 0
                    || libc::setuid(c.uid as libc::uid_t) != 0
                    // No setuid binary gives the app its rights back.
                    || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            // Die with the supervisor, whatever killed it (set after the
            // user change, which clears it).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The supervisor may have died before prctl took effect.
            if libc::getppid() != supervisor {
                libc::_exit(1);
            }
            if let Some(fd) = listen_fd {
                if fd == listen_fd_at {
                    // dup2 onto itself would keep FD_CLOEXEC: clear it.
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, listen_fd_at) < 0 {
                    // dup2 leaves the new descriptor without FD_CLOEXEC.
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|source| LaunchError::Spawn {
        program: spec.program.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[tokio::test]
    async fn child_gets_its_own_group_and_the_socket_at_fd_3() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = crate::socket::bind(&dir.path().join("t.sock")).expect("bind");
        let spec = LaunchSpec {
            program: "/bin/sh".into(),
            // Prints the child's pgid, the type of fd 3, and a variable of
            // this process's environment that the spec does not list.
            args: vec![
                "-c".into(),
                "ps -o pgid= -p $$; if [ -S /proc/self/fd/3 ]; then echo socket; else echo none; fi; \
                 echo \"${CARGO_MANIFEST_DIR-unset}\""
                    .into(),
            ],
            cwd: dir.path().to_path_buf(),
            env: crate::env::from_supervisor(false),
            listen_fd: Some(listener.as_fd()),
            listen_fd_at: LISTEN_FD,
            join_cgroup: None,
            credentials: None,
        };
        let child = spawn(&spec).expect("spawn");
        let pid = child.id().expect("pid");
        let out = child.wait_with_output().await.expect("wait");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        let pgid: u32 = lines
            .next()
            .expect("pgid line")
            .trim()
            .parse()
            .expect("pgid");
        assert_eq!(pgid, pid, "the worker leads its own process group");
        assert_eq!(lines.next(), Some("socket"), "fd 3 is the listening socket");
        assert!(
            std::env::var_os("CARGO_MANIFEST_DIR").is_some(),
            "cargo sets it"
        );
        assert_eq!(
            lines.next(),
            Some("unset"),
            "the supervisor's environment is not inherited"
        );
    }
}
