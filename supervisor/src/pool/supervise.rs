//! Supervision: one task per slot that launches its worker, waits for the
//! readiness token, publishes the worker to the pool, restarts it with
//! exponential backoff when it dies, recycles it when it outgrows its memory
//! limit (replacement first, then drain), and stops it on shutdown.
//!
//! Sockets belong to the slot, not to the process: a crashed worker's
//! replacement inherits the same listening socket, so connections queued in
//! its backlog are served rather than refused. A recycled worker's
//! replacement gets a fresh socket so the old one can drain on its own.

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span, error, info, info_span, warn};

use super::{
    IDLE_SWEEP_INTERVAL, Pool, PoolConfig, REPLACEMENT_ATTEMPTS, RESTART_BACKOFF_MAX,
    RESTART_BACKOFF_MIN, STABLE_AFTER, WATCHDOG_INTERVAL, Worker, WorkerState, upstream::Upstream,
};
use crate::memory::WorkerGroup;
use crate::output::{self, describe};

/// A running pool and the means to stop it.
#[derive(Debug)]
pub struct PoolHandle {
    pub pool: Arc<Pool>,
    /// Bumped to have every slot replace its worker (new one first).
    recycle: tokio::sync::watch::Sender<u64>,
    shutdown: CancellationToken,
    kill: CancellationToken,
    tasks: TaskTracker,
}

impl PoolHandle {
    /// Replaces every worker, each once its successor is ready (the old one
    /// drains); a successor that fails leaves its slot's worker running.
    pub fn recycle_all(&self) {
        self.recycle.send_modify(|n| *n += 1);
    }

    /// Waits until every slot has a ready worker, or as many launches as
    /// there are slots have failed (a crashing app should not hold up the
    /// listener: it gets 503s while restarts continue), or `timeout`.
    /// Returns how many are ready.
    pub async fn wait_ready(&self, timeout: Duration) -> usize {
        let slots = self.pool.slots.len();
        self.wait_until(timeout, |ready, failed| ready + failed >= slots)
            .await
    }

    /// For workers that are to replace others: waits until every slot has a
    /// ready worker, or `timeout`, or until launches have failed
    /// [`REPLACEMENT_ATTEMPTS`] times per slot (a build that crashes at
    /// start is not worth the whole timeout). True if all are ready.
    pub async fn wait_all_ready(&self, timeout: Duration) -> bool {
        let slots = self.pool.slots.len();
        let ready = self
            .wait_until(timeout, |_, failed| failed >= slots * REPLACEMENT_ATTEMPTS)
            .await;
        ready == slots
    }

    async fn wait_until(&self, timeout: Duration, give_up: impl Fn(usize, usize) -> bool) -> usize {
        let deadline = Instant::now() + timeout;
        let slots = self.pool.slots.len();
        loop {
            let notified = self.pool.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let ready = self.pool.ready_count();
            let failed = self.pool.failed_starts.load(Ordering::Relaxed) as usize;
            if ready == slots || give_up(ready, failed) {
                return ready;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.pool.ready_count();
            }
        }
    }

    /// Why the last launch that failed did (for the log of a replacement
    /// that never became ready).
    pub fn last_failure(&self) -> Option<String> {
        self.pool
            .last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops every worker (SIGTERM, then SIGKILL after the stop timeout, or
    /// at once once `kill` is cancelled) and waits for the supervision tasks
    /// to finish.
    pub async fn stop(self, kill: &CancellationToken) {
        self.shutdown.cancel();
        self.tasks.close();
        tokio::select! {
            _ = self.tasks.wait() => {}
            _ = kill.cancelled() => {
                self.kill.cancel();
                self.tasks.wait().await;
            }
        }
    }
}

/// Starts supervising `config.workers` workers. Must run inside the Tokio
/// runtime; each worker is forked from a runtime thread (see
/// [`bext_worker::spawn`]).
pub fn start(config: PoolConfig) -> PoolHandle {
    let pool = Arc::new(Pool::new(&config.app, config.workers, config.max_inflight));
    let config = Arc::new(config);
    let shutdown = CancellationToken::new();
    let kill = CancellationToken::new();
    let tasks = TaskTracker::new();
    let (recycle, recycle_rx) = tokio::sync::watch::channel(0);
    log_memory_mechanism(&config);
    for index in 0..config.workers {
        let slot = Slot {
            recycle: recycle_rx.clone(),
            pool: Arc::clone(&pool),
            config: Arc::clone(&config),
            index,
            shutdown: shutdown.clone(),
            kill: kill.clone(),
            tasks: tasks.clone(),
            socket_seq: 0,
        };
        tasks.spawn(slot.run());
    }
    PoolHandle {
        pool,
        recycle,
        shutdown,
        kill,
        tasks,
    }
}

/// The mechanisms in force are logged by [`crate::memory::AppMemory`] when
/// there is a limit.
fn log_memory_mechanism(config: &PoolConfig) {
    if config.memory_limit.is_none() {
        info!(app = %config.app, "no memory limit set ([isolate] memory_limit)");
    }
}

/// A listening socket owned by the supervisor. Dropping it removes the file.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    /// `None` when the runtime binds the path itself (Deno).
    listener: Option<UnixListener>,
}

impl SocketFile {
    fn create(config: &PoolConfig, index: usize, seq: u64) -> std::io::Result<Self> {
        let path = config.runtime_dir.join(format!("w{index}.{seq}.sock"));
        // sun_path holds 108 bytes with its NUL: say so, rather than let a
        // runtime fail to bind with a vaguer error.
        if path.as_os_str().len() > 107 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the socket path {} is longer than Unix sockets allow (107 bytes): use a shorter data_dir",
                    path.display()
                ),
            ));
        }
        let listener = if config.plan.inherits_socket() {
            Some(bext_worker::socket::bind(&path)?)
        } else {
            None
        };
        Ok(SocketFile { path, listener })
    }

    /// Before each launch: a runtime that binds the path itself needs it
    /// free (a killed Deno leaves its socket file behind).
    fn prepare(&self) -> std::io::Result<()> {
        match self.listener {
            Some(_) => Ok(()),
            None => bext_worker::socket::remove_stale(&self.path),
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = bext_worker::socket::remove_stale(&self.path);
    }
}

/// A launched worker process.
struct Instance {
    worker: Arc<Worker>,
    child: Child,
    pgid: Pid,
    ready: Option<oneshot::Receiver<()>>,
    span: Span,
    /// The worker's own cgroup, when the kernel enforces memory limits.
    group: Option<WorkerGroup>,
    /// The tasks forwarding its stdout and stderr (they end at EOF).
    output: Vec<tokio::task::JoinHandle<()>>,
}

enum Startup {
    Ready,
    Exited(ExitStatus),
    TimedOut,
    Shutdown,
}

struct Slot {
    pool: Arc<Pool>,
    config: Arc<PoolConfig>,
    index: usize,
    shutdown: CancellationToken,
    /// Cancelled when stopping may not wait for SIGTERM to work.
    kill: CancellationToken,
    tasks: TaskTracker,
    /// Changes when every worker is to be replaced.
    recycle: tokio::sync::watch::Receiver<u64>,
    /// Counts the sockets this slot has made (a recycled worker gets a
    /// fresh one). Not a generation: that is a set of workers running one
    /// version (`crate::platform`).
    socket_seq: u64,
}

static NEXT_WORKER_ID: AtomicU64 = AtomicU64::new(1);

impl Slot {
    async fn run(mut self) {
        let span = info_span!("slot", app = %self.config.app, w = self.index);
        async move {
            let mut socket = match SocketFile::create(&self.config, self.index, self.socket_seq) {
                Ok(socket) => socket,
                Err(e) => {
                    error!("could not create the worker socket: {e}");
                    return;
                }
            };
            let mut backoff = new_backoff();
            'launch: while !self.shutdown.is_cancelled() {
                let started = match self.launch(&socket) {
                    Ok(mut instance) => match self.wait_ready(&mut instance).await {
                        Startup::Ready => Ok(instance),
                        Startup::Shutdown => {
                            self.stop(instance).await;
                            break;
                        }
                        Startup::Exited(status) => {
                            let why = format!("worker exited before it was ready ({})", describe(status));
                            kill_group(instance.pgid, Signal::SIGKILL);
                            if self.config.dev {
                                Err(report(&self.config.app, &mut instance, why).await)
                            } else {
                                error!(parent: &instance.span, "{why}");
                                Err(why)
                            }
                        }
                        Startup::TimedOut => {
                            let why = format!(
                                "worker did not start listening within {:?}",
                                self.config.start_timeout
                            );
                            if self.config.dev {
                                kill_group(instance.pgid, Signal::SIGKILL);
                                let why = format!("{why}; is the app's HTTP server started with listen()?");
                                Err(report(&self.config.app, &mut instance, why).await)
                            } else {
                                error!(parent: &instance.span, "{why}; is the app's HTTP server started with listen()?");
                                self.stop(instance).await;
                                Err(why)
                            }
                        }
                    },
                    Err(e) => {
                        let why = format!("could not launch the worker: {e}");
                        error!("{why}");
                        Err(why)
                    }
                };
                let mut instance = match started {
                    Ok(instance) => instance,
                    Err(why) => {
                        self.pool.start_failed(why.clone());
                        if self.config.dev {
                            if !self.wait_for_change(&why).await {
                                break;
                            }
                            continue;
                        }
                        if !self.pause(next_delay(&mut backoff)).await {
                            break;
                        }
                        continue;
                    }
                };

                instance.worker.set_state(WorkerState::Ready);
                self.pool.publish(self.index, Some(Arc::clone(&instance.worker)));
                self.pool.set_down(None);
                info!(parent: &instance.span, "worker ready");
                let mut up_since = Instant::now();
                let stable = tokio::time::sleep(STABLE_AFTER);
                tokio::pin!(stable);
                let mut stable_seen = false;
                let mut watchdog = tokio::time::interval(WATCHDOG_INTERVAL);
                watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut idle_sweep = tokio::time::interval(IDLE_SWEEP_INTERVAL);
                idle_sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);

                loop {
                    tokio::select! {
                        status = instance.child.wait() => {
                            self.pool.publish(self.index, None);
                            instance.worker.set_state(WorkerState::Stopped);
                            // The app's own children must not keep serving
                            // on the slot's socket.
                            kill_group(instance.pgid, Signal::SIGKILL);
                            let status = status.map_or_else(|e| e.to_string(), describe);
                            if let Some(group) = instance.group.as_ref().filter(|g| g.oom_killed()) {
                                warn!(
                                    parent: &instance.span,
                                    mechanism = group.mechanism(),
                                    "the kernel killed the worker at its cgroup memory limit"
                                );
                            }
                            self.pool.restarts.fetch_add(1, Ordering::Relaxed);
                            self.pool.failures_in_a_row.fetch_add(1, Ordering::Relaxed);
                            if self.config.dev {
                                let why = report(&self.config.app, &mut instance, format!("the app exited ({status})")).await;
                                if !self.wait_for_change(&why).await {
                                    break 'launch;
                                }
                                continue 'launch;
                            }
                            if up_since.elapsed() >= STABLE_AFTER {
                                backoff = new_backoff();
                            }
                            let delay = next_delay(&mut backoff);
                            warn!(parent: &instance.span, "worker exited ({status}); restarting in {delay:?}");
                            if !self.pause(delay).await {
                                break 'launch;
                            }
                            continue 'launch;
                        }
                        _ = watchdog.tick(), if self.config.memory_limit.is_some() => {
                            let limit = self.config.memory_limit.map_or(u64::MAX, |l| l.bytes());
                            let Some(rss) = rss_bytes(instance.worker.pid) else { continue };
                            if rss <= limit {
                                continue;
                            }
                            warn!(
                                parent: &instance.span,
                                rss_mb = rss >> 20,
                                limit_mb = limit >> 20,
                                mechanism = "rss-watchdog",
                                "worker is over its memory limit; recycling it (replacement first, then drain)"
                            );
                            instance = self.recycle(&mut socket, instance).await;
                            up_since = Instant::now();
                        }
                        _ = idle_sweep.tick() => instance.worker.upstream().close_idle(),
                        Ok(()) = self.recycle.changed() => {
                            if self.config.dev {
                                self.restart_for_change(instance).await;
                                continue 'launch;
                            }
                            info!(parent: &instance.span, "restart requested: replacing the worker (new one first)");
                            instance = self.recycle(&mut socket, instance).await;
                            up_since = Instant::now();
                        }
                        _ = &mut stable, if !stable_seen => {
                            stable_seen = true;
                            self.pool.failures_in_a_row.store(0, Ordering::Relaxed);
                        }
                        _ = self.shutdown.cancelled() => {
                            self.pool.publish(self.index, None);
                            self.stop(instance).await;
                            break 'launch;
                        }
                    }
                }
            }
            drop(socket);
        }
        .instrument(span)
        .await;
    }

    fn launch(
        &self,
        socket: &SocketFile,
    ) -> Result<Instance, Box<dyn std::error::Error + Send + Sync>> {
        socket.prepare()?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let id = NEXT_WORKER_ID.fetch_add(1, Ordering::Relaxed);
        let mut spec = self.config.plan.spec(
            &socket.path,
            socket.listener.as_ref().map(|l| l.as_fd()),
            &token,
            (&self.config.app, self.index),
        );
        let memory = self.config.memory.as_ref();
        let mut group = memory.and_then(|m| m.worker_group(&format!("w{}-{id}", self.index)));
        spec.join_cgroup = group.as_ref().map(|g| g.procs.clone());
        let mut child = match bext_worker::spawn(&spec) {
            Ok(child) => child,
            Err(e) if group.is_some() => {
                // Joining the cgroup failed: go on without kernel limits.
                if let Some(memory) = memory {
                    memory.disable(&e.to_string());
                }
                group = None;
                spec.join_cgroup = None;
                bext_worker::spawn(&spec)?
            }
            Err(e) => return Err(e.into()),
        };
        let pid = child.id().ok_or("the worker exited at once")?;
        let worker = Arc::new(Worker {
            id,
            index: self.index,
            pid,
            upstream: Upstream::new(socket.path.clone(), self.config.peer_uids.clone()),
            inflight: AtomicUsize::new(0),
            state: AtomicU8::new(WorkerState::Starting as u8),
            max_inflight: self.pool.max_inflight,
            freed: Arc::clone(&self.pool.changed),
        });
        let span = info_span!("worker", app = %self.config.app, w = self.index, pid);
        let (ready_tx, ready_rx) = oneshot::channel();
        let _enter = span.enter();
        info!("worker starting: {}", self.config.plan.describe());
        let index = self.index;
        let raw = self.config.raw_output;
        let mut output = Vec::with_capacity(2);
        if let Some(stdout) = child.stdout.take() {
            let mut ready_tx = Some(ready_tx);
            let logs = crate::logring::for_app(&self.config.app);
            output.push(output::forward(stdout, move |line| {
                if line.contains(&token) {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                } else {
                    app_line(raw, "stdout", line);
                    logs.push(index, pid, "stdout", line);
                }
            }));
        }
        if let Some(stderr) = child.stderr.take() {
            let logs = crate::logring::for_app(&self.config.app);
            output.push(output::forward(stderr, move |line| {
                app_line(raw, "stderr", line);
                logs.push(index, pid, "stderr", line);
            }));
        }
        drop(_enter);
        Ok(Instance {
            worker,
            child,
            pgid: Pid::from_raw(pid as i32),
            ready: Some(ready_rx),
            span,
            group,
            output,
        })
    }

    async fn wait_ready(&self, instance: &mut Instance) -> Startup {
        let deadline = Instant::now() + self.config.start_timeout;
        loop {
            let ready = async {
                match instance.ready.as_mut() {
                    Some(rx) => rx.await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ok = ready => {
                    if ok {
                        return Startup::Ready;
                    }
                    // stdout closed without the token: wait for the exit.
                    instance.ready = None;
                }
                status = instance.child.wait() => {
                    return match status {
                        Ok(status) => Startup::Exited(status),
                        Err(_) => Startup::TimedOut,
                    };
                }
                _ = tokio::time::sleep_until(deadline) => return Startup::TimedOut,
                _ = self.shutdown.cancelled() => return Startup::Shutdown,
            }
        }
    }

    /// Starts a replacement on a fresh socket; once it is ready, routes to it
    /// and drains and stops `old` in the background. Keeps `old` if the
    /// replacement fails.
    async fn recycle(&mut self, socket: &mut SocketFile, old: Instance) -> Instance {
        self.socket_seq += 1;
        let fresh = match SocketFile::create(&self.config, self.index, self.socket_seq) {
            Ok(fresh) => fresh,
            Err(e) => {
                error!("could not create a socket for the replacement worker: {e}");
                return old;
            }
        };
        let mut new = match self.launch(&fresh) {
            Ok(new) => new,
            Err(e) => {
                error!("could not launch the replacement worker: {e}");
                return old;
            }
        };
        match self.wait_ready(&mut new).await {
            Startup::Ready => {}
            _ => {
                error!(parent: &new.span, "the replacement worker did not become ready; keeping the old one");
                self.stop(new).await;
                return old;
            }
        }
        new.worker.set_state(WorkerState::Ready);
        self.pool.publish(self.index, Some(Arc::clone(&new.worker)));
        self.pool.restarts.fetch_add(1, Ordering::Relaxed);
        info!(parent: &new.span, "replacement worker ready; draining pid {}", old.worker.pid);
        old.worker.set_state(WorkerState::Draining);
        // Requests still on the old worker finish; their connections are
        // closed rather than kept for requests that will not come.
        old.worker.upstream().close();
        let old_socket = std::mem::replace(socket, fresh);
        let drain_timeout = self.config.drain_timeout;
        let stop_timeout = self.config.stop_timeout;
        let kill = self.kill.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(
            async move {
                let deadline = Instant::now() + drain_timeout;
                while old.worker.inflight() > 0
                    && Instant::now() < deadline
                    && !shutdown.is_cancelled()
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                stop_instance(old, stop_timeout, &kill).await;
                drop(old_socket);
            }
            .in_current_span(),
        );
        new
    }

    async fn stop(&self, instance: Instance) {
        stop_instance(instance, self.config.stop_timeout, &self.kill).await;
    }

    /// `bext dev`, after a crash or a failed start: says why (once), tells
    /// requests so, and waits for the next change. False on shutdown.
    async fn wait_for_change(&mut self, why: &str) -> bool {
        // The app's own output is in the log already: the first line says
        // what happened; the answers to requests carry the rest.
        let first = why.lines().next().unwrap_or(why);
        error!("{first}; waiting for a change to start it again");
        self.pool.set_down(Some(why));
        tokio::select! {
            changed = self.recycle.changed() => {
                info!("change seen: starting the app again");
                // Requests wait for the new worker from now on.
                self.pool.set_down(None);
                changed.is_ok()
            }
            _ = self.shutdown.cancelled() => false,
        }
    }

    /// `bext dev`, after a change: new requests wait while the worker's
    /// running ones get [`DEV_DRAIN`] to finish; then it stops, and the
    /// slot launches the new code on the same socket.
    async fn restart_for_change(&self, old: Instance) {
        info!(parent: &old.span, "change seen: restarting the app");
        self.pool.publish(self.index, None);
        old.worker.set_state(WorkerState::Draining);
        let deadline = Instant::now() + DEV_DRAIN;
        while old.worker.inflight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.pool.restarts.fetch_add(1, Ordering::Relaxed);
        self.stop(old).await;
    }

    /// Sleeps for `delay`; false if shutdown came first.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = self.shutdown.cancelled() => false,
        }
    }
}

/// `bext dev`: how long requests running on a worker get to finish when a
/// change restarts it (a stream or WebSocket is cut after this).
const DEV_DRAIN: Duration = Duration::from_millis(500);

/// Lines of a failed worker's output that `bext dev` shows with its error.
const REPORT_LINES: usize = 40;

/// One line of a worker's output, to the log (or as it is, to stderr).
fn app_line(raw: bool, stream: &'static str, line: &str) {
    if raw {
        // In order with the log's own lines, through its writer.
        let mut text = Vec::with_capacity(line.len() + 1);
        text.extend_from_slice(line.as_bytes());
        text.push(b'\n');
        crate::telemetry::write_line(&text);
    } else {
        info!(target: "bext::app", stream, "{line}");
    }
}

/// `why`, with the last lines the worker wrote (its stack trace, the
/// syntax error), once its output has been read to the end.
async fn report(app: &str, instance: &mut Instance, why: String) -> String {
    for task in instance.output.drain(..) {
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
    let pid = instance.worker.pid;
    let logs = crate::logring::for_app(app);
    let lines: Vec<_> = logs
        .tail(crate::logring::MAX_LINES)
        .into_iter()
        .filter(|l| l.pid == pid)
        .collect();
    let mut text = why;
    let skip = lines.len().saturating_sub(REPORT_LINES);
    if !lines.is_empty() {
        text.push_str("\n\nits last output:\n");
    }
    for line in &lines[skip..] {
        text.push_str("  ");
        text.push_str(&line.text);
        text.push('\n');
    }
    text
}

/// SIGTERM to the worker's process group; SIGKILL if it is still there after
/// `timeout`; then SIGKILL to whatever is left of the group.
async fn stop_instance(mut instance: Instance, timeout: Duration, kill: &CancellationToken) {
    let span = instance.span.clone();
    async move {
        instance.worker.set_state(WorkerState::Stopped);
        // A graceful worker (Next's `server.close()`) waits for every open
        // connection to end; bext's idle ones must not hold it up.
        instance.worker.upstream().close();
        kill_group(instance.pgid, Signal::SIGTERM);
        let waited = tokio::select! {
            waited = tokio::time::timeout(timeout, instance.child.wait()) => waited.ok(),
            _ = kill.cancelled() => None,
        };
        match waited {
            Some(Ok(status)) => info!("worker stopped ({})", describe(status)),
            Some(Err(e)) => warn!("could not wait for the worker: {e}"),
            None => {
                warn!("worker did not stop within {timeout:?} of SIGTERM (or was told to hurry); killing it");
                kill_group(instance.pgid, Signal::SIGKILL);
                let _ = instance.child.wait().await;
            }
        }
        kill_group(instance.pgid, Signal::SIGKILL);
    }
    .instrument(span)
    .await;
}

fn kill_group(pgid: Pid, signal: Signal) {
    // ESRCH: the group is already gone, which is the goal.
    let _ = killpg(pgid, signal);
}

/// The next restart delay (the backoff never runs out).
fn next_delay(backoff: &mut ExponentialBackoff) -> Duration {
    backoff.next().unwrap_or(RESTART_BACKOFF_MAX)
}

fn new_backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(RESTART_BACKOFF_MIN)
        .with_max_delay(RESTART_BACKOFF_MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Resident set size of `pid`, from /proc.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()??;
    Some(pages * page_size as u64)
}
