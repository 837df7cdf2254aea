//! Turning an app's start command into a worker launch: which binary, which
//! arguments, which environment, and how the runtime adapter gets in.

use std::ffi::OsString;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use bext_worker::LaunchSpec;
use bext_worker::adapter::{self, Adapters, ENV_LISTEN_FD, ENV_PASS_DOWN, ENV_READY_TOKEN};

use crate::app::Start;
use crate::config::MemorySize;

/// Environment variable naming the `node` binary (default: `node` on PATH).
pub const ENV_NODE: &str = "BEXT_NODE";
/// Environment variable naming the `deno` binary (default: `deno` on PATH).
pub const ENV_DENO: &str = "BEXT_DENO";

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("could not find `{binary}` on PATH (set {env} to its path): {source}")]
    NoBinary {
        binary: &'static str,
        env: &'static str,
        source: which::Error,
    },
}

/// How every worker of one app is launched.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    kind: Kind,
    cwd: PathBuf,
    adapters: Adapters,
    memory_limit: Option<MemorySize>,
    /// The app's own variables (`[runtime] env`).
    app_env: Vec<(String, String)>,
    /// Workers run as this user, when set.
    user: Option<crate::config::platform::AppUser>,
    /// `bext dev`: a development environment, and colours when bext's own
    /// output is a terminal.
    dev: Option<DevLaunch>,
    /// bext's own variables for every launch (e.g. [`crate::nextcache`]'s).
    bext_env: BextEnv,
}

/// bext's own variables for the workers; their values (a secret among
/// them) are not in `Debug` output.
#[derive(Clone, Default)]
struct BextEnv(Vec<(String, String)>);

impl std::fmt::Debug for BextEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| k))
            .finish()
    }
}

/// How `bext dev` launches workers differently.
#[derive(Debug, Clone, Copy)]
pub struct DevLaunch {
    /// The app may colour its output (bext shows it on a terminal).
    pub colour: bool,
}

#[derive(Debug, Clone)]
enum Kind {
    Node {
        node: PathBuf,
        node_args: Vec<String>,
        script: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
    },
    Shell {
        command: String,
    },
    Deno {
        deno: PathBuf,
        flags: Vec<String>,
        entry: PathBuf,
        args: Vec<String>,
    },
}

impl LaunchPlan {
    pub fn new(
        start: &Start,
        cwd: &Path,
        adapters: Adapters,
        memory_limit: Option<MemorySize>,
        app_env: Vec<(String, String)>,
        user: Option<crate::config::platform::AppUser>,
    ) -> Result<Self, PlanError> {
        let kind = match start.clone() {
            Start::Node {
                script,
                node_args,
                args,
                env,
            } => Kind::Node {
                node: find_binary("node", ENV_NODE)?,
                node_args,
                script,
                args,
                env,
            },
            Start::Shell { command } => Kind::Shell { command },
            Start::Deno { entry, flags, args } => Kind::Deno {
                deno: find_binary("deno", ENV_DENO)?,
                flags,
                entry,
                args,
            },
        };
        Ok(LaunchPlan {
            kind,
            cwd: cwd.to_path_buf(),
            adapters,
            memory_limit,
            app_env,
            user,
            dev: None,
            bext_env: BextEnv::default(),
        })
    }

    /// Adds bext's own variables to every launch (they win over the app's).
    pub fn with_bext_env(mut self, vars: Vec<(String, String)>) -> Self {
        self.bext_env.0.extend(vars);
        self
    }

    /// For `bext dev`: `NODE_ENV=development` (unless bext's environment
    /// says otherwise), the adapter passed down to the child that serves.
    pub fn for_dev(mut self, dev: DevLaunch) -> Self {
        self.dev = Some(dev);
        self
    }

    /// Whether workers get the listening socket as a descriptor (Node) or
    /// bind the path themselves (Deno).
    pub fn inherits_socket(&self) -> bool {
        !matches!(self.kind, Kind::Deno { .. })
    }

    /// Where workers find their socket: out of the way of what Node gives
    /// its children when the adapter is passed down to one.
    fn listen_fd_at(&self) -> std::os::fd::RawFd {
        match self.dev {
            Some(_) => bext_worker::HIGH_LISTEN_FD,
            None => bext_worker::LISTEN_FD,
        }
    }

    /// The command line, for the log.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Node { script, args, .. } => {
                let mut s = format!("node {}", script.display());
                for a in args {
                    s.push(' ');
                    s.push_str(a);
                }
                s
            }
            Kind::Shell { command } => command.clone(),
            Kind::Deno { flags, entry, .. } => {
                format!("deno run {} {}", flags.join(" "), entry.display())
            }
        }
    }

    /// The launch of one worker.
    pub(super) fn spec<'a>(
        &self,
        socket: &Path,
        listen_fd: Option<BorrowedFd<'a>>,
        token: &str,
        labels: (&str, usize),
    ) -> LaunchSpec<'a> {
        let (app, index) = labels;
        // A clean environment (bext_worker::env), the app's own variables,
        // then bext's per-launch ones, which win.
        let mut env = bext_worker::env::from_supervisor(false);
        if !env.iter().any(|(k, _)| k == "NODE_ENV") {
            let mode = if self.dev.is_some() {
                "development"
            } else {
                "production"
            };
            env.push(("NODE_ENV".into(), mode.into()));
        }
        if self.dev.is_some_and(|dev| dev.colour) {
            env.push(("FORCE_COLOR".into(), "1".into()));
        }
        env.extend(
            self.app_env
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        );
        // Only `bext dev` passes the adapter down (its socket is where
        // Node's children do not put theirs); the app's own variables
        // cannot turn it on.
        env.retain(|(k, _)| k != ENV_PASS_DOWN);
        if self.dev.is_some() {
            env.push((ENV_PASS_DOWN.into(), "1".into()));
        }
        env.extend([
            (ENV_READY_TOKEN.into(), token.into()),
            ("BEXT_APP".into(), app.into()),
            ("BEXT_WORKER".into(), index.to_string().into()),
        ]);
        env.extend(
            self.bext_env
                .0
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        );
        let (program, args) = match &self.kind {
            Kind::Node { .. } | Kind::Shell { .. } => {
                env.push((ENV_LISTEN_FD.into(), self.listen_fd_at().to_string().into()));
                env.push(("NODE_OPTIONS".into(), self.node_options().into()));
                match &self.kind {
                    Kind::Node {
                        node,
                        node_args,
                        script,
                        args,
                        env: extra,
                    } => {
                        env.extend(extra.iter().map(|(k, v)| (k.into(), v.into())));
                        let mut argv: Vec<OsString> = node_args.iter().map(Into::into).collect();
                        argv.push(script.into());
                        argv.extend(args.iter().map(Into::into));
                        (node.clone(), argv)
                    }
                    Kind::Shell { command } => (
                        PathBuf::from("/bin/sh"),
                        vec!["-c".into(), shell_command(command).into()],
                    ),
                    Kind::Deno { .. } => unreachable!("matched above"),
                }
            }
            Kind::Deno {
                deno,
                flags,
                entry,
                args,
            } => {
                let mut argv: Vec<OsString> = vec!["run".into()];
                argv.extend(deno_flags(flags, socket).into_iter().map(Into::into));
                argv.push("--preload".into());
                argv.push(adapter::deno_preload_url(&self.adapters, socket, token).into());
                if let Some(limit) = self.memory_limit {
                    argv.push(
                        format!("--v8-flags=--max-old-space-size={}", limit.mebibytes()).into(),
                    );
                }
                argv.push(entry.into());
                argv.extend(args.iter().map(Into::into));
                (deno.clone(), argv)
            }
        };
        let mut spec = LaunchSpec {
            program,
            args,
            cwd: self.cwd.clone(),
            env,
            listen_fd,
            listen_fd_at: self.listen_fd_at(),
            join_cgroup: None,
            credentials: None,
        };
        crate::app::run_as(&mut spec, self.user.as_ref());
        spec
    }

    /// The adapter preload, the heap limit, and the app's own NODE_OPTIONS
    /// (else whatever NODE_OPTIONS the supervisor was given).
    fn node_options(&self) -> String {
        let mut options = format!("--require \"{}\"", self.adapters.node.display());
        if let Some(limit) = self.memory_limit {
            options.push_str(&format!(" --max-old-space-size={}", limit.mebibytes()));
        }
        let own = self
            .app_env
            .iter()
            .find(|(k, _)| k == "NODE_OPTIONS")
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var("NODE_OPTIONS").ok());
        if let Some(existing) = own {
            options.push(' ');
            options.push_str(&existing);
        }
        options
    }
}

/// The app's own Deno flags plus what serving on `socket` needs: read,
/// write and `unix:` net access to that exact path. Scoped grants add up
/// across repeated flags, but a scoped flag next to an unrestricted one
/// would *narrow* it, so nothing is added where the app already has the
/// unrestricted permission (or `-A`).
/// The `sh -c` text of a start command, with `exec` where the shell would
/// otherwise stay between the supervisor and the app (its signals, its
/// pid, its memory): in front of a simple command, and in front of the
/// last command of a list (`tsc && exec node dist/x.js`: in front of the
/// first, the list would stop after it). A pipeline or a command sent to
/// the background is left as it is: the shell stays.
fn shell_command(command: &str) -> String {
    let at = match last_list_command(command) {
        ListEnd::Simple => 0,
        ListEnd::At(at) => at,
        ListEnd::Keep => return command.to_string(),
    };
    // After the command's own variable assignments (`A=1 exec node`;
    // `exec A=1 node` would look for a program named `A=1`).
    let at = at + assignments_len(&command[at..]);
    format!("{}exec {}", &command[..at], &command[at..])
}

/// The length of the `NAME=value` words (and the blanks after them) at the
/// start of a simple command.
fn assignments_len(command: &str) -> usize {
    let bytes = command.as_bytes();
    let mut end = 0;
    loop {
        let word = end + (command[end..].len() - command[end..].trim_start().len());
        let name = bytes[word..]
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
            .count();
        let assignment =
            name > 0 && !bytes[word].is_ascii_digit() && bytes.get(word + name) == Some(&b'=');
        if !assignment {
            return if end == 0 { 0 } else { word };
        }
        // The value, to the next unquoted blank.
        let mut quotes = Quotes::default();
        let mut i = word + name + 1;
        while i < bytes.len() && !(quotes.bare(bytes[i]) && bytes[i].is_ascii_whitespace()) {
            i += 1;
        }
        end = i;
    }
}

/// Where a left-to-right read of a shell command is: inside quotes, or
/// after a backslash.
#[derive(Default)]
struct Quotes {
    single: bool,
    double: bool,
    escaped: bool,
}

impl Quotes {
    /// Reads byte `b`: true if it stands bare (not quoted, not escaped, not
    /// itself a quote or a backslash), so the shell sees it as syntax.
    fn bare(&mut self, b: u8) -> bool {
        if self.escaped {
            self.escaped = false;
        } else if self.single {
            self.single = b != b'\'';
        } else if b == b'\\' {
            self.escaped = true;
        } else if self.double {
            self.double = b != b'"';
        } else if b == b'\'' {
            self.single = true;
        } else if b == b'"' {
            self.double = true;
        } else {
            return true;
        }
        false
    }
}

enum ListEnd {
    Simple,
    /// The last command of a list starts at this byte.
    At(usize),
    Keep,
}

/// Where the last command of a list starts, reading `command` as the shell
/// does: quotes and backslashes hide operators; `>&`, `<&` and `&>` are
/// redirections, not the background operator.
fn last_list_command(command: &str) -> ListEnd {
    let bytes = command.as_bytes();
    let mut quotes = Quotes::default();
    let mut last = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if quotes.bare(b) {
            match b {
                b'&' | b'|' if bytes.get(i + 1) == Some(&b) => {
                    i += 1;
                    last = Some(i + 1);
                }
                b';' | b'\n' => last = Some(i + 1),
                b'|' => return ListEnd::Keep,
                b'&' => {
                    let redirect = i > 0 && matches!(bytes[i - 1], b'>' | b'<')
                        || bytes.get(i + 1) == Some(&b'>');
                    if !redirect {
                        return ListEnd::Keep;
                    }
                }
                _ => {}
            }
        }
        i += 1;
    }
    match last {
        None => ListEnd::Simple,
        Some(at) => {
            let rest = &command[at..];
            let start = at + (rest.len() - rest.trim_start().len());
            if command[start..].trim().is_empty() {
                // A trailing `;`: the last command is before it.
                match last_list_command(&command[..at - 1]) {
                    ListEnd::Simple => ListEnd::At(0),
                    end => end,
                }
            } else {
                ListEnd::At(start)
            }
        }
    }
}

fn deno_flags(flags: &[String], socket: &Path) -> Vec<String> {
    let has = |names: &[&str]| flags.iter().any(|f| names.contains(&f.as_str()));
    if has(&["-A", "--allow-all"]) {
        return flags.to_vec();
    }
    let socket = socket.display();
    let mut out = flags.to_vec();
    for (long, short, grant) in [
        ("--allow-read", "-R", socket.to_string()),
        ("--allow-write", "-W", socket.to_string()),
        ("--allow-net", "-N", format!("unix:{socket}")),
    ] {
        if !has(&[long, short]) {
            out.push(format!("{long}={grant}"));
        }
    }
    out
}

fn find_binary(binary: &'static str, env: &'static str) -> Result<PathBuf, PlanError> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    which::which(binary).map_err(|source| PlanError::NoBinary {
        binary,
        env,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exec` in front of a list would run its first command alone (`tsc
    /// && node dist/x.js` would stop after tsc).
    #[test]
    fn a_shell_list_execs_its_last_command() {
        assert_eq!(
            shell_command("tsc && node dist/x.js"),
            "tsc && exec node dist/x.js"
        );
        assert_eq!(shell_command("a; b"), "a; exec b");
        assert_eq!(shell_command("a || b && c"), "a || b && exec c");
        assert_eq!(shell_command("node $ENTRY"), "exec node $ENTRY");
        assert_eq!(
            shell_command("NODE_ENV=production D='a b' node s.js > log"),
            "NODE_ENV=production D='a b' exec node s.js > log"
        );
        assert_eq!(
            shell_command("tsc && A=1 node x.js"),
            "tsc && A=1 exec node x.js"
        );
        // Redirections and quoted operators are not lists.
        assert_eq!(shell_command("node s.js 2>&1"), "exec node s.js 2>&1");
        assert_eq!(shell_command("node s.js &>log"), "exec node s.js &>log");
        assert_eq!(
            shell_command("DB='x?a=1&b=2' node --title \"a;b\" s.js"),
            "DB='x?a=1&b=2' exec node --title \"a;b\" s.js"
        );
        assert_eq!(shell_command("node s.js a\\;b"), "exec node s.js a\\;b");
        // A pipeline, or the background: the shell stays.
        assert_eq!(shell_command("node s.js | tee log"), "node s.js | tee log");
        assert_eq!(shell_command("worker & node s.js"), "worker & node s.js");
        assert_eq!(shell_command("node s.js;"), "exec node s.js;");
        assert_eq!(shell_command("a; node s.js;"), "a; exec node s.js;");
    }

    #[test]
    fn deno_socket_permissions_merge_into_the_apps_own() {
        let sock = Path::new("/run/b/w.sock");
        assert_eq!(
            deno_flags(&["--allow-net".into()], sock),
            [
                "--allow-net",
                "--allow-read=/run/b/w.sock",
                "--allow-write=/run/b/w.sock"
            ]
        );
        assert_eq!(
            deno_flags(&["--allow-net=0.0.0.0:8000".into(), "-W".into()], sock),
            [
                "--allow-net=0.0.0.0:8000",
                "-W",
                "--allow-read=/run/b/w.sock",
                "--allow-net=unix:/run/b/w.sock"
            ]
        );
        assert_eq!(deno_flags(&["-A".into()], sock), ["-A"]);
    }
}
