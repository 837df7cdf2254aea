//! How an app's worker process is started: the command from `[runtime]
//! start`, package.json or deno.json, turned into something bext can launch
//! directly (never through npm or npx, which would put a process between the
//! supervisor's signals and the app).

use std::path::{Path, PathBuf};

use crate::config::{Engine, Framework};

use super::App;
use super::detect::script;

/// What a worker runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// `node [node_args] script [args]`.
    Node {
        script: PathBuf,
        node_args: Vec<String>,
        args: Vec<String>,
        env: Vec<(String, String)>,
    },
    /// `sh -c "exec <command>"` for start commands that need a shell; the
    /// adapter still reaches Node through `NODE_OPTIONS`.
    Shell { command: String },
    /// `deno run [flags] <entry> [args]`.
    Deno {
        entry: PathBuf,
        flags: Vec<String>,
        args: Vec<String>,
    },
}

/// What `bext dev` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevStart {
    pub start: Start,
    /// The command watches the app's files and restarts (or hot-reloads)
    /// by itself; otherwise bext restarts it on changes.
    pub watches: bool,
}

impl DevStart {
    fn watched(start: Start) -> Self {
        DevStart {
            start,
            watches: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not parse the start command `{command}`: {reason}")]
    Parse { command: String, reason: String },
    #[error(
        "no start command for {}: add a \"start\" script or \"main\" to package.json, \
         or set [runtime] start in bext.config.toml",
        .0.display()
    )]
    Missing(PathBuf),
    #[error(
        "no Deno entry for {}: add a \"start\" task (`deno run ... main.ts`) to deno.json, \
         create main.ts, or set [runtime] start",
        .0.display()
    )]
    NoDenoEntry(PathBuf),
    #[error("the Deno start command must be `deno run [flags] <entry>`, got `{0}`")]
    NotDenoRun(String),
    #[error("a static site has no start command")]
    Static,
}

/// Node flags that take their value as the next argument.
const NODE_FLAGS_WITH_VALUE: &[&str] = &[
    "-r",
    "--require",
    "--import",
    "--loader",
    "--experimental-loader",
    "--env-file",
    "--conditions",
    "-C",
    "--title",
];

/// Deno flags that take their value as the next argument.
const DENO_FLAGS_WITH_VALUE: &[&str] = &[
    "-c",
    "--config",
    "--import-map",
    "--lock",
    "--cert",
    "--location",
    "--seed",
    "--env-file",
];

impl App {
    /// The command a worker runs, evaluated after the build (which may
    /// create the files it names).
    pub fn start(&self) -> Result<Start, StartError> {
        match (self.framework, self.engine) {
            (Framework::Static, _) | (_, None) => Err(StartError::Static),
            (_, Some(Engine::Deno)) => self.deno_start(),
            (Framework::Nextjs, _) if self.start_override.is_none() => {
                let standalone = self.dir.join(".next/standalone/server.js");
                Ok(if standalone.exists() {
                    node(standalone, vec![])
                } else {
                    node(
                        self.dir.join("node_modules/next/dist/bin/next"),
                        vec!["start".into()],
                    )
                })
            }
            _ => {
                if let Some(command) = &self.start_override {
                    return self.node_command(command);
                }
                let package = self.package();
                if let Some(command) = package.and_then(|p| script(p, "start")) {
                    return self.node_command(command);
                }
                if let Some(main) = package.and_then(|p| p.get("main")).and_then(|m| m.as_str()) {
                    return Ok(node(self.dir.join(main), vec![]));
                }
                Err(StartError::Missing(self.dir.clone()))
            }
        }
    }

    /// Turns a start command into a direct `node` launch where possible.
    fn node_command(&self, command: &str) -> Result<Start, StartError> {
        const SHELL_SYNTAX: &[char] = &['&', '|', ';', '$', '`', '>', '<', '(', ')', '*', '?'];
        if command.contains(SHELL_SYNTAX) {
            return Ok(Start::Shell {
                command: command.to_string(),
            });
        }
        let words = shell_words::split(command).map_err(|e| StartError::Parse {
            command: command.to_string(),
            reason: e.to_string(),
        })?;
        let mut words = words.into_iter().peekable();
        let mut env = Vec::new();
        while let Some((key, value)) = words.peek().and_then(|w| env_assignment(w)) {
            env.push((key, value));
            words.next();
        }
        let Some(program) = words.next() else {
            return Err(StartError::Parse {
                command: command.to_string(),
                reason: "it is empty".into(),
            });
        };
        let rest: Vec<String> = words.collect();
        if program == "node" || program.ends_with("/node") {
            let (node_args, script, args) = split_flags(&rest, NODE_FLAGS_WITH_VALUE);
            if let Some(script) = script {
                return Ok(Start::Node {
                    script: self.dir.join(script),
                    node_args,
                    args,
                    env,
                });
            }
        } else if let Some(script) = self.node_bin(&program) {
            // `next start`, `tsx server.ts`: the package's own JS entry, run
            // by node directly.
            return Ok(Start::Node {
                script,
                node_args: vec![],
                args: rest,
                env,
            });
        }
        Ok(Start::Shell {
            command: command.to_string(),
        })
    }

    /// `node_modules/.bin/<name>` resolved to a JavaScript file.
    fn node_bin(&self, name: &str) -> Option<PathBuf> {
        if name.contains('/') {
            return None;
        }
        let target = self
            .dir
            .join("node_modules/.bin")
            .join(name)
            .canonicalize()
            .ok()?;
        is_javascript(&target).then_some(target)
    }

    /// What `bext dev` runs: the app's `dev` script (package.json) or task
    /// (deno.json); for Next.js without one, `next dev` (or the custom
    /// server of `[runtime] start`, which runs Next in development mode);
    /// else the production start command. bext restarts it on changes
    /// unless it watches the files itself ([`watches_itself`]).
    pub fn dev_start(&self) -> Result<DevStart, StartError> {
        let dev = |start, command: &str| DevStart {
            start,
            watches: watches_itself(command),
        };
        match (self.framework, self.engine) {
            (Framework::Static, _) | (_, None) => Err(StartError::Static),
            (_, Some(Engine::Deno)) => match self.deno_task("dev") {
                Some(task) => match self.deno_run(Some(task.clone())) {
                    Ok(start) => Ok(dev(start, &task)),
                    Err(e) => {
                        tracing::warn!(
                            "the deno.json dev task is not used ({e}): bext runs the start command and restarts it on changes"
                        );
                        self.start().map(DevStart::watched)
                    }
                },
                None => self.start().map(DevStart::watched),
            },
            _ => match self.package().and_then(|p| script(p, "dev")) {
                Some(command) => self.node_command(command).map(|s| dev(s, command)),
                None if self.framework == Framework::Nextjs => {
                    Ok(match &self.start_override {
                        // A custom server: Next in development mode, with
                        // its own HMR.
                        Some(command) => DevStart {
                            start: self.node_command(command)?,
                            watches: true,
                        },
                        None => dev(
                            node(
                                self.dir.join("node_modules/next/dist/bin/next"),
                                vec!["dev".into()],
                            ),
                            "next dev",
                        ),
                    })
                }
                None => self.start().map(DevStart::watched),
            },
        }
    }

    /// A deno.json task: a string or `{ "command": "..." }`.
    fn deno_task(&self, name: &str) -> Option<String> {
        let task = self.deno_config.as_ref()?.get("tasks")?.get(name)?;
        task.as_str()
            .or_else(|| task.get("command")?.as_str())
            .map(str::to_string)
    }

    fn deno_start(&self) -> Result<Start, StartError> {
        self.deno_run(
            self.start_override
                .clone()
                .or_else(|| self.deno_task("start")),
        )
    }

    /// `deno run [flags] <entry>` from `task`, else the usual entry files.
    fn deno_run(&self, task: Option<String>) -> Result<Start, StartError> {
        if let Some(task) = task {
            let words = shell_words::split(&task).map_err(|e| StartError::Parse {
                command: task.clone(),
                reason: e.to_string(),
            })?;
            if words.first().map(String::as_str) != Some("deno")
                || words.get(1).map(String::as_str) != Some("run")
            {
                return Err(StartError::NotDenoRun(task));
            }
            let (flags, entry, args) = split_flags(&words[2..], DENO_FLAGS_WITH_VALUE);
            let entry = entry.ok_or_else(|| StartError::NotDenoRun(task.clone()))?;
            return Ok(Start::Deno {
                entry: self.dir.join(entry),
                flags,
                args,
            });
        }
        [
            "main.ts",
            "main.js",
            "mod.ts",
            "server.ts",
            "index.ts",
            "index.js",
        ]
        .iter()
        .map(|f| self.dir.join(f))
        .find(|p| p.is_file())
        .map(|entry| Start::Deno {
            entry,
            flags: vec!["--allow-net".into()],
            args: vec![],
        })
        .ok_or_else(|| StartError::NoDenoEntry(self.dir.clone()))
    }
}

fn node(script: PathBuf, args: Vec<String>) -> Start {
    Start::Node {
        script,
        node_args: vec![],
        args,
        env: vec![],
    }
}

/// Does a development command watch the app's files itself (restart or
/// hot-reload on changes)? Then bext only restarts it after a crash.
fn watches_itself(command: &str) -> bool {
    const PROGRAMS: &[&str] = &["nodemon", "ts-node-dev", "node-dev"];
    const WITH_COMMAND: &[(&str, &str)] = &[
        ("tsx", "watch"),
        ("next", "dev"),
        ("astro", "dev"),
        ("nuxt", "dev"),
        ("nuxi", "dev"),
        ("remix", "dev"),
        ("react-router", "dev"),
        ("svelte-kit", "dev"),
        ("wrangler", "dev"),
        ("webpack", "serve"),
    ];
    let words: Vec<&str> = command
        .split(|c: char| c.is_whitespace() || matches!(c, ';' | '&' | '|' | '(' | ')'))
        .filter(|w| !w.is_empty())
        .collect();
    words.iter().enumerate().any(|(i, &word)| {
        let next = words.get(i + 1).copied();
        word.starts_with("--watch")
            || word == "--hot"
            || PROGRAMS.contains(&word)
            || WITH_COMMAND.iter().any(|&(p, c)| word == p && next == Some(c))
            // `vite` alone (or `vite dev`, `vite --port N`) serves and
            // watches; `vite build` and `vite preview` do not.
            || word == "vite" && !matches!(next, Some("build" | "preview" | "optimize"))
    })
}

/// `KEY=value` at the front of a command.
fn env_assignment(word: &str) -> Option<(String, String)> {
    let (key, value) = word.split_once('=')?;
    let valid = !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    valid.then(|| (key.to_string(), value.to_string()))
}

/// Splits `[flags…] entry [args…]`.
fn split_flags(
    words: &[String],
    with_value: &[&str],
) -> (Vec<String>, Option<String>, Vec<String>) {
    let mut flags = Vec::new();
    let mut iter = words.iter();
    while let Some(word) = iter.next() {
        if word.starts_with('-') {
            flags.push(word.clone());
            if with_value.contains(&word.as_str())
                && let Some(value) = iter.next()
            {
                flags.push(value.clone());
            }
        } else {
            return (flags, Some(word.clone()), iter.cloned().collect());
        }
    }
    (flags, None, vec![])
}

fn is_javascript(path: &Path) -> bool {
    let by_extension = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e, "js" | "cjs" | "mjs"));
    by_extension || {
        let mut head = [0u8; 64];
        let n = crate::config::open_regular(path)
            .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
            .unwrap_or(0);
        let head = String::from_utf8_lossy(&head[..n]);
        head.starts_with("#!") && head.lines().next().is_some_and(|l| l.contains("node"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn development_commands_that_watch_themselves_are_told_apart() {
        for command in [
            "node --watch server.js",
            "nodemon server.js",
            "tsx watch src/index.ts",
            "next dev --turbopack",
            "vite",
            "deno run --watch main.ts",
        ] {
            assert!(watches_itself(command), "{command}");
        }
        for command in [
            "node server.js",
            "tsx src/index.ts",
            "deno run -A main.ts",
            "vite build && node server.js",
            "vitest",
            "node scripts/nodemon-like.js",
        ] {
            assert!(!watches_itself(command), "{command}");
        }
    }
    use crate::config::Config;

    fn start_of(files: &[(&str, &str)]) -> Start {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, body) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, body).expect("write");
        }
        let config = Config::parse(Path::new("x.toml"), "").expect("config");
        let app = super::super::detect(dir.path(), &config).expect("app");
        let start = app.start().expect("start");
        // Paths are canonical: compare relative to the app dir.
        match start {
            Start::Node {
                script,
                node_args,
                args,
                env,
            } => Start::Node {
                script: script.strip_prefix(&app.dir).expect("inside").to_path_buf(),
                node_args,
                args,
                env,
            },
            Start::Deno { entry, flags, args } => Start::Deno {
                entry: entry.strip_prefix(&app.dir).expect("inside").to_path_buf(),
                flags,
                args,
            },
            other => other,
        }
    }

    #[test]
    fn node_start_scripts_run_node_directly() {
        let start = start_of(&[(
            "package.json",
            r#"{"scripts":{"start":"NODE_ENV=production node --enable-source-maps -r dotenv/config dist/index.js --verbose"}}"#,
        )]);
        assert_eq!(
            start,
            Start::Node {
                script: "dist/index.js".into(),
                node_args: vec![
                    "--enable-source-maps".into(),
                    "-r".into(),
                    "dotenv/config".into()
                ],
                args: vec!["--verbose".into()],
                env: vec![("NODE_ENV".into(), "production".into())],
            }
        );
    }

    #[test]
    fn shell_syntax_goes_through_a_shell() {
        let start = start_of(&[(
            "package.json",
            r#"{"scripts":{"start":"cd dist && node index.js"}}"#,
        )]);
        assert_eq!(
            start,
            Start::Shell {
                command: "cd dist && node index.js".into()
            }
        );
    }

    #[test]
    fn main_is_the_fallback() {
        let start = start_of(&[("package.json", r#"{"main":"server.js"}"#)]);
        assert!(
            matches!(start, Start::Node { ref script, .. } if script == Path::new("server.js"))
        );
    }

    #[test]
    fn deno_tasks_are_parsed() {
        let start = start_of(&[(
            "deno.json",
            r#"{"tasks":{"start":"deno run --allow-net --allow-env=FOO main.ts 8000"}}"#,
        )]);
        assert_eq!(
            start,
            Start::Deno {
                entry: "main.ts".into(),
                flags: vec!["--allow-net".into(), "--allow-env=FOO".into()],
                args: vec!["8000".into()],
            }
        );
    }
}
