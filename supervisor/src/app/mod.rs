//! The app on disk: what it is, how to install and build it, how to start
//! it, and which of its directories are served as static files.
//!
//! [`detect`] reads the directory (and the config's `[runtime]` overrides)
//! and never runs anything; [`build`] runs the install and build steps with
//! their output streamed to the log. Neither knows about workers or HTTP.

pub mod build;
pub mod detect;
mod start;

pub use build::{BuildError, prepare, prepare_install};
pub use detect::{App, DetectError, Step, detect};
pub use start::{DevStart, Start, StartError};

/// Makes `spec` run as `user` (its uid, its group, its home), when set.
pub fn run_as(
    spec: &mut bext_worker::LaunchSpec<'_>,
    user: Option<&crate::config::platform::AppUser>,
) {
    let Some(user) = user else { return };
    // Already that user (bext itself runs as it): nothing to switch, and
    // without root, setgroups would fail.
    if nix::unistd::geteuid().as_raw() != user.uid {
        spec.credentials = Some(bext_worker::Credentials {
            uid: user.uid,
            gid: user.gid,
        });
    }
    spec.env.extend([
        ("HOME".into(), user.home.clone().into_os_string()),
        ("USER".into(), user.name.clone().into()),
        ("LOGNAME".into(), user.name.clone().into()),
    ]);
}

/// A static directory and the URL prefix it is served at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// URL path prefix, `/` or ending in `/`.
    pub prefix: String,
    /// Canonical directory.
    pub root: std::path::PathBuf,
    /// Every file under this mount has a content hash in its name.
    pub immutable: bool,
    /// A whole static site: directory indexes, `.html` fallback, `404.html`,
    /// and no worker behind it.
    pub site: bool,
}
