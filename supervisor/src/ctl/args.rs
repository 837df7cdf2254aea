//! `bextctl`'s command line, as clap types. It only describes the words a
//! person types; what they do lives in [`super`], and nothing here talks to
//! the supervisor.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};

/// How many lines of recent output `bextctl logs` asks for when not told.
pub const DEFAULT_LOG_LINES: u32 = 100;

/// Control a running bext supervisor (multi-app mode, `bext serve`).
#[derive(Debug, Parser)]
#[command(name = "bextctl", version)]
pub struct Cli {
    /// The supervisor's control socket. BEXT_SOCKET works too (an explicit
    /// --socket or --config wins over it); else DATA_DIR/control.sock from
    /// --config, else /var/lib/bext/control.sock.
    #[arg(long, value_name = "PATH", global = true, conflicts_with = "config")]
    pub socket: Option<PathBuf>,
    /// The platform file `bext serve` runs with: the socket is
    /// DATA_DIR/control.sock, where DATA_DIR is its `[platform] data_dir`.
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// The supervisor's control port on TCP (`[platform.control] listen`)
    /// instead of its socket, with mutual TLS: needs --cert, --key and
    /// --ca. BEXT_CONNECT works too (after --socket and --config, before
    /// BEXT_SOCKET).
    #[arg(long, value_name = "HOST:PORT", global = true, conflicts_with_all = ["socket", "config"])]
    pub connect: Option<String>,
    /// With --connect: this client's certificate (PEM, signed by the
    /// platform's `client_ca`). BEXT_CERT works too.
    #[arg(long, value_name = "FILE", global = true)]
    pub cert: Option<PathBuf>,
    /// With --connect: the key of --cert (PEM; may be the same file).
    /// BEXT_KEY works too.
    #[arg(long, value_name = "FILE", global = true)]
    pub key: Option<PathBuf>,
    /// With --connect: the CA the supervisor's certificate chains to (PEM).
    /// BEXT_CA works too.
    #[arg(long, value_name = "FILE", global = true)]
    pub ca: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Upload DIR (default: the current directory) and deploy it as APP's
    /// new version; streams progress.
    Deploy(DeployArgs),
    /// Go back to the previous retained version, or to the one named by --to.
    Rollback {
        /// The app, as named in platform.toml.
        app: String,
        /// The version to activate.
        #[arg(long, value_name = "ID")]
        to: Option<String>,
    },
    /// The apps, their active versions, their workers and restarts.
    Status {
        /// Only this app (as named in platform.toml).
        app: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// An app's versions, newest first.
    Versions {
        /// The app, as named in platform.toml.
        app: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// New workers for the active version, health-gated; the old ones drain.
    Restart {
        /// The app, as named in platform.toml.
        app: String,
    },
    /// Drop cached pages of an app (or mark them stale with --soft).
    Purge(PurgeArgs),
    /// The app's recent worker output, then (with -f) new lines.
    Logs {
        /// The app, as named in platform.toml.
        app: String,
        /// Keep printing new lines until Ctrl-C.
        #[arg(short, long)]
        follow: bool,
        /// How many recent lines to print first.
        #[arg(short = 'n', long, value_name = "N", default_value_t = DEFAULT_LOG_LINES)]
        lines: u32,
    },
    /// Re-read the platform file (the same as SIGHUP).
    Reload,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The app, as named in platform.toml.
    pub app: String,
    /// The app's source directory. `.gitignore` and `.bextignore` are
    /// honoured; `node_modules`, `.next` and `.git` are never uploaded
    /// unless asked.
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// Upload the top-level `node_modules` too (the server then skips `npm ci`).
    #[arg(long)]
    pub include_node_modules: bool,
    /// Upload the top-level `.next` build output too (a built Next.js app is not rebuilt).
    #[arg(long)]
    pub include_build: bool,
}

#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("what")
        .required(true)
        .multiple(false)
        .args(["tags", "paths", "prefixes", "all"])
))]
pub struct PurgeArgs {
    /// The app, as named in platform.toml.
    pub app: String,
    /// Pages carrying this cache tag (repeatable).
    #[arg(long = "tag", value_name = "T")]
    pub tags: Vec<String>,
    /// This exact path (repeatable).
    #[arg(long = "path", value_name = "P")]
    pub paths: Vec<String>,
    /// Every path starting with this (repeatable).
    #[arg(long = "prefix", value_name = "P")]
    pub prefixes: Vec<String>,
    /// Every cached page of the app.
    #[arg(long)]
    pub all: bool,
    /// Mark the pages stale (served while revalidating) instead of dropping
    /// them.
    #[arg(long)]
    pub soft: bool,
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::{CommandFactory, Parser};

    use super::{Cli, Command};

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn purge_needs_exactly_one_kind() {
        let parse =
            |args: &[&str]| Cli::try_parse_from(["bextctl", "purge", "blog"].iter().chain(args));
        let Ok(cli) = parse(&["--tag", "a", "--tag", "b", "--soft"]) else {
            panic!("repeated --tag is one kind");
        };
        let Command::Purge(purge) = cli.command else {
            panic!("not a purge");
        };
        assert_eq!(purge.tags, ["a", "b"]);
        assert!(purge.soft);
        assert!(parse(&["--all"]).is_ok());
        for bad in [
            &[][..],
            &["--soft"],
            &["--tag", "a", "--path", "/x"],
            &["--all", "--prefix", "/b"],
        ] {
            let err = parse(bad).err().map(|e| e.kind());
            assert!(
                matches!(
                    err,
                    Some(ErrorKind::MissingRequiredArgument | ErrorKind::ArgumentConflict)
                ),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[test]
    fn socket_and_config_exclude_each_other() {
        let both = Cli::try_parse_from(["bextctl", "--socket", "/s", "--config", "/c", "reload"]);
        assert_eq!(
            both.err().map(|e| e.kind()),
            Some(ErrorKind::ArgumentConflict)
        );
        // Global: allowed after the subcommand too.
        let Ok(cli) = Cli::try_parse_from(["bextctl", "status", "--socket", "/s"]) else {
            panic!("--socket after the subcommand");
        };
        assert_eq!(cli.socket.as_deref(), Some(std::path::Path::new("/s")));
    }

    #[test]
    fn logs_defaults() {
        let Ok(Cli {
            command: Command::Logs { follow, lines, .. },
            ..
        }) = Cli::try_parse_from(["bextctl", "logs", "blog"])
        else {
            panic!("logs");
        };
        assert!(!follow);
        assert_eq!(lines, super::DEFAULT_LOG_LINES);
    }
}
