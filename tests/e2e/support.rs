//! Shared helpers: starting the real `bext` binary on an ephemeral port,
//! reading its JSON log, waiting on conditions with deadlines, raw HTTP.

#![allow(dead_code, reason = "each test module uses a different subset")]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The Next.js fixture, for one test at a time (hold the guard while bext
/// runs it): its standalone server writes the pages it regenerates into
/// the fixture's own `.next`, not atomically, so two servers running it
/// at once could read each other's half-written files.
pub fn next_fixture() -> (PathBuf, NextFixtureTurn) {
    let mut busy = NEXT_BUSY.0.lock().unwrap_or_else(|e| e.into_inner());
    while *busy {
        busy = NEXT_BUSY.1.wait(busy).unwrap_or_else(|e| e.into_inner());
    }
    *busy = true;
    (fixture("next"), NextFixtureTurn(()))
}

static NEXT_BUSY: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

/// A test's turn with the Next.js fixture, until dropped.
pub struct NextFixtureTurn(());

impl Drop for NextFixtureTurn {
    fn drop(&mut self) {
        *NEXT_BUSY.0.lock().unwrap_or_else(|e| e.into_inner()) = false;
        NEXT_BUSY.1.notify_one();
    }
}

/// Path to a fixture app, prepared by `tests/fixtures/setup.sh`.
pub fn fixture(name: &str) -> PathBuf {
    let dir = repo_root().join("tests/fixtures").join(name);
    let needs_modules = dir.join("package-lock.json").exists();
    assert!(
        !needs_modules || dir.join("node_modules").is_dir(),
        "fixture {name} is not installed: run `bash tests/fixtures/setup.sh` (make test does)"
    );
    dir
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// `PATH` for bext's children: the test tools (deno) first.
fn child_path() -> std::ffi::OsString {
    let tools = repo_root().join("tests/tools/bin");
    let mut paths = vec![tools];
    if let Some(path) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(paths).expect("PATH")
}

/// Polls `check` until it returns `Some`, or panics after `timeout`.
/// [`wait_for`] with an async check.
pub async fn wait_for_async<T, F: Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The log lines a bext process wrote, shared with a reader thread.
#[derive(Default)]
struct LogBook {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

/// A running `bext` process.
pub struct Bext {
    child: Option<Child>,
    pub addr: SocketAddr,
    log: Arc<LogBook>,
    /// Private XDG_RUNTIME_DIR: worker sockets live here.
    pub runtime_dir: tempfile::TempDir,
}

/// How to start bext.
pub struct Options {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub ready_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            args: vec![],
            env: vec![],
            ready_timeout: Duration::from_secs(60),
        }
    }
}

impl Bext {
    /// `bext run DIR --listen 127.0.0.1:0 ARGS`, waiting for "listening".
    pub fn run(dir: &Path, args: &[&str]) -> Bext {
        Bext::start(
            dir,
            &Options {
                args: args.iter().map(|a| a.to_string()).collect(),
                ..Options::default()
            },
        )
    }

    pub fn start(dir: &Path, options: &Options) -> Bext {
        Bext::launch(&[OsStr::new("run"), dir.as_os_str()], options)
    }

    /// `bext dev DIR --listen 127.0.0.1:0 ARGS`.
    pub fn dev(dir: &Path, options: &Options) -> Bext {
        Bext::launch(&[OsStr::new("dev"), dir.as_os_str()], options)
    }

    /// `bext serve --config FILE --listen 127.0.0.1:0 ARGS`.
    pub fn serve(config: &Path, options: &Options) -> Bext {
        Bext::launch(
            &[
                OsStr::new("serve"),
                OsStr::new("--config"),
                config.as_os_str(),
            ],
            options,
        )
    }

    /// `bext run DIR ARGS` without waiting for it to listen (for tests of
    /// what happens before).
    pub fn run_unready(dir: &Path, args: &[&str]) -> Bext {
        let options = Options {
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Options::default()
        };
        let (child, log, runtime_dir) = spawn(&[OsStr::new("run"), dir.as_os_str()], &options);
        Bext {
            child: Some(child),
            addr: "127.0.0.1:1".parse().expect("placeholder"),
            log,
            runtime_dir,
        }
    }

    fn launch(command: &[&OsStr], options: &Options) -> Bext {
        let (child, log, runtime_dir) = spawn(command, options);
        let mut bext = Bext {
            child: Some(child),
            addr: "127.0.0.1:1".parse().expect("placeholder"),
            log,
            runtime_dir,
        };
        let line = bext.wait_log(options.ready_timeout, |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("listening on"))
        });
        bext.addr = line["addr"]
            .as_str()
            .expect("addr field")
            .parse()
            .expect("socket address");
        bext
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Every log line so far, parsed.
    pub fn logs(&self) -> Vec<Value> {
        let lines = self.log.lines.lock().expect("log lock");
        lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for a JSON log line matching `pred`.
    pub fn wait_log(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        let mut lines = self.log.lines.lock().expect("log lock");
        loop {
            for line in &lines[seen..] {
                if let Ok(v) = serde_json::from_str::<Value>(line)
                    && pred(&v)
                {
                    return v;
                }
            }
            seen = lines.len();
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for a log line; log so far:\n{}",
                    lines.join("\n")
                );
            }
            lines = self
                .log
                .grew
                .wait_timeout(lines, deadline - now)
                .expect("log lock")
                .0;
        }
    }

    /// The log as text, for assertion messages.
    pub fn log_text(&self) -> String {
        self.log.lines.lock().expect("log lock").join("\n")
    }

    /// PIDs of bext's direct children (the workers).
    pub fn worker_pids(&self) -> Vec<u32> {
        children(self.pid())
    }

    /// Sends a signal to bext itself.
    pub fn signal(&self, sig: i32) {
        signal(self.pid(), sig);
    }

    /// A GET with an explicit Host header.
    pub async fn get_host(&self, host: &str, path: &str) -> reqwest::Response {
        client()
            .get(self.url(path))
            .header("host", host)
            .send()
            .await
            .expect("GET")
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let pid = self.pid();
        signal(pid, libc::SIGTERM);
        self.wait_exit(timeout)
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let status = wait_for("bext to exit", timeout, || {
            child.try_wait().expect("try_wait")
        });
        // Let the reader thread collect the last lines.
        std::thread::sleep(Duration::from_millis(50));
        status
    }
}

impl Drop for Bext {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut()
            && child.try_wait().ok().flatten().is_none()
        {
            // Workers die with bext (parent-death signal).
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn(subcommand: &[&OsStr], options: &Options) -> (Child, Arc<LogBook>, tempfile::TempDir) {
    let runtime_dir = tempfile::tempdir().expect("runtime dir");
    let mut command = Command::new(env!("CARGO_BIN_EXE_bext"));
    command.args(["--log-format", "json"]).args(subcommand);
    // An ephemeral port unless the test names one.
    if !options.args.iter().any(|a| a == "--listen") {
        command.args(["--listen", "127.0.0.1:0"]);
    }
    command
        .args(&options.args)
        .env("PATH", child_path())
        .env("XDG_RUNTIME_DIR", runtime_dir.path())
        .env("BEXT_LOG", "info")
        .env_remove("NODE_OPTIONS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in &options.env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("spawn bext");
    let stderr = child.stderr.take().expect("stderr");
    let log = Arc::new(LogBook::default());
    let book = Arc::clone(&log);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if std::env::var_os("BEXT_TEST_LOG").is_some() {
                eprintln!("{line}");
            }
            book.lines.lock().expect("log lock").push(line);
            book.grew.notify_all();
        }
    });
    (child, log, runtime_dir)
}

/// Runs `bext ARGS` to completion: (exit code, stdout, stderr).
pub fn bext_command(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bext"))
        .args(args)
        .env("PATH", child_path())
        .env("BEXT_LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .output()
        .expect("run bext");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: plain kill(2) on a PID this test started.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

pub fn alive(pid: u32) -> bool {
    // A zombie is dead for our purposes.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// Direct children of `pid`, from /proc.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Resident set size of `pid` in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// A raw HTTP/1.1 exchange, for request targets an HTTP client would
/// normalise (`/../x`, `%2e%2e`). Returns (status, headers, body).
pub fn raw_get(addr: SocketAddr, target: &str) -> (u16, String, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, head, response[split + 4..].to_vec())
}

/// A reqwest client builder. reqwest's rustls takes the process's default
/// crypto provider: bext's (aws-lc-rs), installed once here.
pub fn client_builder() -> reqwest::ClientBuilder {
    static PROVIDER: std::sync::Once = std::sync::Once::new();
    PROVIDER.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
    reqwest::Client::builder()
}

/// An HTTP client that never uses a proxy.
pub fn client() -> reqwest::Client {
    client_builder().no_proxy().build().expect("client")
}

/// Writes `files` into a fresh temp dir (an app made up by a test).
pub fn temp_app(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, body) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, body).expect("write");
    }
    dir
}

/// A dependency-free Node HTTP server for failure tests: `/` answers,
/// `/hang` never does, `/die` exits before answering, `/pid` reports,
/// `/slow` logs that it started and answers 1.5 s later.
pub const PLAIN_NODE_SERVER: &str = r#"
const http = require('http');
const server = http.createServer((req, res) => {
  if (req.url === '/hang') return;
  if (req.url === '/slow') {
    console.log('slow request started');
    return setTimeout(() => res.end('slow done'), 1500);
  }
  if (req.url === '/die') { process.exit(7); }
  if (req.url === '/pid') { res.setHeader('content-type', 'application/json'); return res.end(JSON.stringify({ pid: process.pid })); }
  res.end('plain node');
});
server.listen(process.env.PORT || 3000, () => console.log('plain server up'));
"#;
