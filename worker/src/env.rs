//! The environment an app's processes get: its workers, its build and its
//! hooks.
//!
//! Never the supervisor's whole environment: bext's own variables (a purge
//! token, a Redis URL, its log settings) are secrets or settings of the
//! platform, and in multi-app mode the app is another customer's code. A
//! process bext launches for an app starts from an empty environment and
//! gets, from the supervisor's, only the variables named here: where to find
//! programs and a home, the locale and time zone, the host's proxy and CA
//! settings. The caller adds the app's own variables and bext's per-launch
//! ones on top.

use std::ffi::{OsStr, OsString};

/// Passed to every process bext launches for an app, when the supervisor
/// has them.
pub const PASSED: [&str; 20] = [
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "NODE_ENV",
    "DENO_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "NODE_EXTRA_CA_CERTS",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// Passed by prefix: the locale categories.
pub const PASSED_PREFIXES: [&str; 1] = ["LC_"];

/// Passed to installs and builds only: the package manager's settings
/// (registry, cache), which a running app has no use for; never one that
/// holds a credential (see [`CREDENTIAL_WORDS`]): the app's own install
/// scripts run with them.
pub const BUILD_PREFIXES: [&str; 2] = ["npm_config_", "NPM_CONFIG_"];

/// Package-manager settings whose name holds one of these (in any case)
/// carry a credential (`//registry/:_authToken`, `_auth`, `_password`,
/// `certfile`, `keyfile`, a proxy URL with a user in it) and are not passed
/// on.
pub const CREDENTIAL_WORDS: [&str; 6] = ["auth", "token", "password", "cert", "key", "proxy"];

/// What a process gets of `vars` (the supervisor's environment): the
/// [`PASSED`] names and prefixes, and for a build also [`BUILD_PREFIXES`].
pub fn inherited(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
    build: bool,
) -> Vec<(OsString, OsString)> {
    vars.into_iter()
        .filter(|(name, _)| passes(name, build))
        .collect()
}

/// [`inherited`] of this process's environment.
pub fn from_supervisor(build: bool) -> Vec<(OsString, OsString)> {
    let mut env = inherited(std::env::vars_os(), build);
    if let Some(mark) = MARK.get() {
        env.push((MARK_VAR.into(), mark.into()));
    }
    env
}

/// The variable that marks every process a supervisor starts (and, as
/// processes inherit their environment, whatever those start): a
/// supervisor that was killed left them running, and its successor finds
/// them by it.
pub const MARK_VAR: &str = "BEXT_SUPERVISOR_MARK";

static MARK: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Marks every process started from now on with `mark` (set once).
pub fn set_mark(mark: String) {
    let _ = MARK.set(mark);
}

fn passes(name: &OsStr, build: bool) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    let credential = || {
        let lower = name.to_ascii_lowercase();
        CREDENTIAL_WORDS.iter().any(|w| lower.contains(w))
    };
    PASSED.contains(&name)
        || PASSED_PREFIXES.iter().any(|p| name.starts_with(p))
        || (build && BUILD_PREFIXES.iter().any(|p| name.starts_with(p)) && !credential())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(names: &[&str]) -> Vec<(OsString, OsString)> {
        names.iter().map(|n| ((*n).into(), "v".into())).collect()
    }

    fn names(v: Vec<(OsString, OsString)>) -> Vec<String> {
        v.into_iter()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn only_named_variables_pass() {
        let all = vars(&[
            "PATH",
            "HOME",
            "LC_ALL",
            "BEXT_PURGE_TOKEN",
            "REDIS_URL",
            "AWS_SECRET_ACCESS_KEY",
            "XDG_RUNTIME_DIR",
            "npm_config_registry",
            "npm_config_//registry.example/:_authToken",
            "NPM_CONFIG__AUTH",
            "PATHX",
        ]);
        assert_eq!(
            names(inherited(all.clone(), false)),
            ["PATH", "HOME", "LC_ALL"]
        );
        assert_eq!(
            names(inherited(all, true)),
            ["PATH", "HOME", "LC_ALL", "npm_config_registry"]
        );
    }
}
