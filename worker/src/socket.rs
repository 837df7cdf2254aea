//! Unix sockets owned by the supervisor.
//!
//! The supervisor binds each worker's socket itself and passes the listening
//! descriptor to the worker, so a worker that is killed with SIGKILL leaves
//! nothing behind and its replacement inherits the same socket (connections
//! queued in the backlog are served by the replacement). The supervisor also
//! removes the file when the worker is retired.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

/// Binds a listening Unix socket at `path`, replacing a stale socket file left
/// by an earlier run. The socket is readable and writable by its owner only.
///
/// Refuses to replace anything that is not a socket.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    remove_stale(path)?;
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Removes a socket file if one exists at `path`. Anything else at that path
/// is an error: bext never deletes files it did not create.
pub fn remove_stale(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_replaces_a_stale_socket_but_not_a_regular_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.sock");
        let first = bind(&path).expect("first bind");
        drop(first); // the file stays behind, as after a SIGKILL
        assert!(path.exists());
        let _second = bind(&path).expect("rebinding over a stale socket");

        let file = dir.path().join("data.txt");
        std::fs::write(&file, b"keep me").expect("write");
        let err = bind(&file).expect_err("must not replace a regular file");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&file).expect("read"), b"keep me");
    }
}
