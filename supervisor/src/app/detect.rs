//! Framework detection.
//!
//! Precedence, first match wins (documented in the README):
//!
//! 1. `[runtime] framework` in the config;
//! 2. `next` in package.json dependencies → `nextjs`;
//! 3. `[runtime] engine = "deno"`, or a `deno.json` / `deno.jsonc` → `deno`;
//! 4. `hono` in package.json dependencies → `hono`;
//! 5. `express` in package.json dependencies → `express`;
//! 6. package.json with a `start` script or a `main` file → `node`;
//! 7. an `index.html` in the app dir or its `dist/`, `build/`, `out/` or
//!    `public/` → `static`;
//! 8. otherwise: an error saying what was looked for.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::{Config, Engine, Framework};

/// A detected app, before it is built.
#[derive(Debug, Clone)]
pub struct App {
    pub name: String,
    /// Canonical app directory.
    pub dir: PathBuf,
    pub framework: Framework,
    /// `None` for static sites (no workers).
    pub engine: Option<Engine>,
    /// Why bext thinks so, for the log.
    pub reason: String,
    pub(crate) package: Option<Value>,
    pub(crate) deno_config: Option<Value>,
    pub(crate) start_override: Option<String>,
    pub(crate) build_override: Option<String>,
    /// The app's own environment (`[runtime] env`), for its processes.
    pub env: Vec<(String, String)>,
    pub(crate) static_dir: Option<PathBuf>,
    /// Next.js: the preview mode id of the build the workers run (set
    /// once built; see [`App::next_preview_id`]).
    pub preview_id: Option<String>,
}

/// A command bext runs on the app's behalf (install, build).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub program: String,
    pub args: Vec<String>,
}

impl Step {
    fn new(program: &str, args: &[&str]) -> Self {
        Step {
            program: program.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn shell(command: &str) -> Self {
        Step::new("sh", &["-c", command])
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.program == "sh" && self.args.first().map(String::as_str) == Some("-c") {
            return f.write_str(self.args.get(1).map_or("", String::as_str));
        }
        f.write_str(&self.program)?;
        for arg in &self.args {
            write!(f, " {arg}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("app directory {} does not exist", .0.display())]
    MissingDir(PathBuf),
    #[error("{} is not a directory", .0.display())]
    NotADir(PathBuf),
    #[error("could not read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not parse {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "no app found in {}: expected a package.json (Next.js, Hono, Express or a start script), \
         a deno.json, or an index.html; set [runtime] framework in bext.config.toml to override",
        .0.display()
    )]
    Unknown(PathBuf),
    #[error(
        "{} has dependencies but neither node_modules nor a lockfile; \
         run `npm install` there once and commit package-lock.json",
        .0.display()
    )]
    NoLockfile(PathBuf),
}

/// Reads `dir` and decides what kind of app it holds.
pub fn detect(dir: &Path, config: &Config) -> Result<App, DetectError> {
    if !dir.exists() {
        return Err(DetectError::MissingDir(dir.to_path_buf()));
    }
    if !dir.is_dir() {
        return Err(DetectError::NotADir(dir.to_path_buf()));
    }
    let dir = dir.canonicalize().map_err(|source| DetectError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let package = read_json(&dir.join("package.json"), false)?;
    let deno_config = match read_json(&dir.join("deno.json"), false)? {
        Some(v) => Some(v),
        None => read_json(&dir.join("deno.jsonc"), true)?,
    };
    let has_deno_file = dir.join("deno.json").exists() || dir.join("deno.jsonc").exists();
    let depends_on = |name: &str| {
        package.as_ref().is_some_and(|p| {
            ["dependencies", "devDependencies"]
                .iter()
                .any(|section| p.get(section).and_then(|d| d.get(name)).is_some())
        })
    };
    let runtime = &config.runtime;

    let (framework, reason) = if let Some(framework) = runtime.framework {
        (framework, "set by [runtime] framework".to_string())
    } else if depends_on("next") {
        (
            Framework::Nextjs,
            "package.json depends on next".to_string(),
        )
    } else if runtime.engine == Some(Engine::Deno) {
        (Framework::Deno, "set by [runtime] engine".to_string())
    } else if has_deno_file {
        (Framework::Deno, "found deno.json".to_string())
    } else if depends_on("hono") {
        (Framework::Hono, "package.json depends on hono".to_string())
    } else if depends_on("express") {
        (
            Framework::Express,
            "package.json depends on express".to_string(),
        )
    } else if package
        .as_ref()
        .is_some_and(|p| script(p, "start").is_some() || p.get("main").is_some())
    {
        (
            Framework::Node,
            "package.json has a start script or main".to_string(),
        )
    } else if runtime.start.is_some() {
        (Framework::Node, "set by [runtime] start".to_string())
    } else if site_root(&dir).is_some() {
        (Framework::Static, "found index.html".to_string())
    } else {
        return Err(DetectError::Unknown(dir));
    };

    let engine = match framework {
        Framework::Static => None,
        Framework::Deno => Some(Engine::Deno),
        Framework::Nextjs => Some(Engine::Node),
        _ => Some(
            runtime
                .engine
                .unwrap_or(if has_deno_file && package.is_none() {
                    Engine::Deno
                } else {
                    Engine::Node
                }),
        ),
    };

    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "app".to_string());

    Ok(App {
        name,
        dir,
        framework,
        engine,
        reason,
        package,
        deno_config,
        start_override: runtime.start.clone(),
        build_override: runtime.build.clone(),
        env: runtime
            .env
            .0
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        static_dir: config.server.static_dir.clone(),
        preview_id: None,
    })
}

impl App {
    /// The `name` of its package.json, if it has a usable one (letters,
    /// digits and `@/._-`, at most 100 characters).
    pub fn package_name(&self) -> Option<String> {
        let name = self.package.as_ref()?.get("name")?.as_str()?;
        (!name.is_empty()
            && name.len() <= 100
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"@/._-".contains(&b)))
        .then(|| name.to_string())
    }

    /// The dependency install to run first, if `node_modules` is missing.
    pub fn install_step(&self) -> Result<Option<Step>, DetectError> {
        let Some(package) = &self.package else {
            return Ok(None);
        };
        if self.engine == Some(Engine::Deno) || self.dir.join("node_modules").exists() {
            return Ok(None);
        }
        let has = |file: &str| self.dir.join(file).exists();
        let step = if has("package-lock.json") || has("npm-shrinkwrap.json") {
            Step::new("npm", &["ci", "--no-audit", "--no-fund"])
        } else if has("pnpm-lock.yaml") {
            Step::new("pnpm", &["install", "--frozen-lockfile"])
        } else if has("yarn.lock") {
            Step::new("yarn", &["install", "--frozen-lockfile"])
        } else if has("bun.lock") || has("bun.lockb") {
            Step::new("bun", &["install", "--frozen-lockfile"])
        } else if ["dependencies", "devDependencies"].iter().any(|s| {
            package
                .get(s)
                .and_then(Value::as_object)
                .is_some_and(|d| !d.is_empty())
        }) {
            return Err(DetectError::NoLockfile(self.dir.clone()));
        } else {
            return Ok(None);
        };
        Ok(Some(step))
    }

    /// The build to run, if the app has one and is not built yet (or
    /// `force`). "Built" means: Next.js has `.next/BUILD_ID`; a Node app's
    /// start file exists; a static site has its `index.html`.
    pub fn build_step(&self, force: bool) -> Option<Step> {
        let command = self.build_command()?;
        let built = match self.framework {
            Framework::Nextjs => self.dir.join(".next/BUILD_ID").exists(),
            Framework::Static => site_root(&self.dir).is_some() || self.static_dir.is_some(),
            Framework::Deno => true,
            _ => match self.start() {
                Ok(super::Start::Node { script, .. }) => script.exists(),
                _ => true,
            },
        };
        (force || !built).then_some(command)
    }

    fn build_command(&self) -> Option<Step> {
        if let Some(build) = &self.build_override {
            return Some(Step::shell(build));
        }
        let package = self.package.as_ref()?;
        if script(package, "build").is_some() {
            let manager = self.package_manager();
            return Some(Step::new(manager, &["run", "build"]));
        }
        (self.framework == Framework::Nextjs)
            .then(|| Step::new("node", &["node_modules/next/dist/bin/next", "build"]))
    }

    fn package_manager(&self) -> &'static str {
        let has = |file: &str| self.dir.join(file).exists();
        if has("pnpm-lock.yaml") {
            "pnpm"
        } else if has("yarn.lock") {
            "yarn"
        } else if has("bun.lock") || has("bun.lockb") {
            "bun"
        } else {
            "npm"
        }
    }

    /// The static directories served without a worker hop. Evaluated after
    /// the build, which may create them.
    pub fn mounts(&self) -> Vec<super::Mount> {
        let mut mounts = Vec::new();
        let canonical = |p: PathBuf| p.canonicalize().ok().filter(|p| p.is_dir());
        let configured = self.static_dir.as_ref().map(|d| self.dir.join(d));
        if self.framework == Framework::Static {
            let root = configured
                .or_else(|| site_root(&self.dir))
                .and_then(canonical);
            if let Some(root) = root {
                mounts.push(super::Mount {
                    prefix: "/".into(),
                    root,
                    immutable: false,
                    site: true,
                });
            }
            return mounts;
        }
        if self.framework == Framework::Nextjs
            && let Some(root) = canonical(self.dir.join(".next/static"))
        {
            {
                mounts.push(super::Mount {
                    prefix: "/_next/static/".into(),
                    root,
                    immutable: true,
                    site: false,
                });
            }
        }
        if let Some(root) = canonical(configured.unwrap_or_else(|| self.dir.join("public"))) {
            mounts.push(super::Mount {
                prefix: "/".into(),
                root,
                immutable: false,
                site: false,
            });
        }
        mounts
    }

    /// A built Next.js app's preview mode id (the value of its draft-mode
    /// cookie): from `.next/server/preview-props.json` (small; Next 15 and
    /// later), else `.next/prerender-manifest.json`. Read when the app's
    /// workers start: the build they run is the one it belongs to. A link
    /// as the file itself is not followed (a tenant's files).
    pub fn next_preview_id(&self) -> Option<String> {
        if self.framework != Framework::Nextjs {
            return None;
        }
        let read = |file: &str, pointer: &str| {
            let path = self.dir.join(".next").join(file);
            let text = crate::config::open_regular_nofollow(&path)
                .and_then(crate::config::read_small)
                .ok()?;
            let value: Value = serde_json::from_str(&text).ok()?;
            value
                .pointer(pointer)
                .and_then(Value::as_str)
                .filter(|id| !id.is_empty())
                .map(str::to_string)
        };
        read("server/preview-props.json", "/previewModeId")
            .or_else(|| read("prerender-manifest.json", "/preview/previewModeId"))
    }

    pub(crate) fn package(&self) -> Option<&Value> {
        self.package.as_ref()
    }
}

pub(crate) fn script<'a>(package: &'a Value, name: &str) -> Option<&'a str> {
    package.get("scripts")?.get(name)?.as_str()
}

/// Where a static site's `index.html` is.
fn site_root(dir: &Path) -> Option<PathBuf> {
    ["dist", "build", "out", "public", ""]
        .iter()
        .map(|sub| dir.join(sub))
        .find(|root| root.join("index.html").is_file())
}

fn read_json(path: &Path, comments: bool) -> Result<Option<Value>, DetectError> {
    let text = match crate::config::read_small_file(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(DetectError::Read {
                path: path.into(),
                source,
            });
        }
    };
    let parsed = if comments {
        serde_json::from_reader(json_comments::StripComments::new(text.as_bytes()))
    } else {
        serde_json::from_str(&text)
    };
    parsed.map(Some).map_err(|source| DetectError::Parse {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Detects an app made of `files`; the directory lives as long as the
    /// returned guard.
    fn app_in(
        files: &[(&str, &str)],
        config: &str,
    ) -> (tempfile::TempDir, Result<App, DetectError>) {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, body) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, body).expect("write");
        }
        let config = Config::parse(Path::new("bext.config.toml"), config).expect("config");
        let result = detect(dir.path(), &config);
        (dir, result)
    }

    fn app(files: &[(&str, &str)], config: &str) -> Result<App, DetectError> {
        app_in(files, config).1
    }

    #[test]
    fn precedence_follows_the_documented_order() {
        let next_and_deno = [
            (
                "package.json",
                r#"{"dependencies":{"next":"16","express":"5"}}"#,
            ),
            ("deno.json", "{}"),
        ];
        assert_eq!(
            app(&next_and_deno, "").expect("app").framework,
            Framework::Nextjs
        );
        let hono_and_express = [(
            "package.json",
            r#"{"dependencies":{"express":"5","hono":"4"}}"#,
        )];
        assert_eq!(
            app(&hono_and_express, "").expect("app").framework,
            Framework::Hono
        );
        let express = [("package.json", r#"{"dependencies":{"express":"5"}}"#)];
        assert_eq!(
            app(&express, "").expect("app").framework,
            Framework::Express
        );
        let node = [("package.json", r#"{"scripts":{"start":"node s.js"}}"#)];
        assert_eq!(app(&node, "").expect("app").framework, Framework::Node);
        let deno = [("deno.jsonc", "// comment\n{\"tasks\":{}}")];
        let deno = app(&deno, "").expect("app");
        assert_eq!(
            (deno.framework, deno.engine),
            (Framework::Deno, Some(Engine::Deno))
        );
        let site = [("dist/index.html", "<h1>hi</h1>")];
        let site = app(&site, "").expect("app");
        assert_eq!((site.framework, site.engine), (Framework::Static, None));
    }

    #[test]
    fn the_config_overrides_detection() {
        let express = [("package.json", r#"{"dependencies":{"express":"5"}}"#)];
        let forced = app(&express, "[runtime]\nframework = \"node\"\n").expect("app");
        assert_eq!(forced.framework, Framework::Node);
        assert_eq!(forced.reason, "set by [runtime] framework");
    }

    #[test]
    fn nothing_recognisable_is_a_clear_error() {
        let err = app(&[("README.md", "hi")], "").expect_err("unknown");
        assert!(err.to_string().starts_with("no app found in "), "{err}");
        let err =
            detect(Path::new("/definitely/not/here"), &config_defaults()).expect_err("missing");
        assert_eq!(
            err.to_string(),
            "app directory /definitely/not/here does not exist"
        );
    }

    #[test]
    fn install_uses_the_lockfile_or_refuses_without_one() {
        let locked = [
            ("package.json", r#"{"dependencies":{"express":"5"}}"#),
            ("package-lock.json", "{}"),
        ];
        let (_dir, locked) = app_in(&locked, "");
        let step = locked.expect("app").install_step().expect("step");
        assert_eq!(
            step.map(|s| s.to_string()).as_deref(),
            Some("npm ci --no-audit --no-fund")
        );
        let unlocked = [("package.json", r#"{"dependencies":{"express":"5"}}"#)];
        let (_dir, unlocked) = app_in(&unlocked, "");
        let err = unlocked
            .expect("app")
            .install_step()
            .expect_err("no lockfile");
        assert!(matches!(err, DetectError::NoLockfile(_)));
    }

    fn config_defaults() -> Config {
        Config::parse(Path::new("x.toml"), "").expect("defaults")
    }
}
