//! One app's worker pool: a fixed number of slots, each holding at most one
//! routable worker process, each supervised by its own task.
//!
//! The request path only calls [`Pool::acquire`] (least-busy ready worker,
//! bounded wait) and gets a [`Lease`] that counts the request as in flight
//! until dropped. Everything else here — launching, readiness, crash restarts
//! with backoff, the memory watchdog, graceful recycling and stopping — runs
//! in the supervision tasks ([`supervise`]) and publishes its result by
//! swapping the slot's current worker. The pool knows nothing about HTTP
//! beyond owning each worker's upstream connection pool ([`upstream`]).

mod exchange;
pub mod h1;
mod plan;
mod supervise;
pub mod upstream;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::Notify;
use tokio::time::Instant;

pub use plan::{DevLaunch, ENV_DENO, ENV_NODE, LaunchPlan, PlanError};
pub use supervise::{PoolHandle, rss_bytes, start};

use crate::config::MemorySize;

/// Requests that may wait for a worker at once (none ready, or all at
/// their in-flight limit); more get a 503 at once.
pub const MAX_WAITING: usize = 1024;
/// How long a stopping worker gets between SIGTERM and SIGKILL.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often each worker's idle upstream connections are checked, to close
/// those the worker closed or that are too old to reuse.
pub const IDLE_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How often the memory watchdog reads each worker's RSS.
pub const WATCHDOG_INTERVAL: Duration = Duration::from_millis(500);
/// A worker that served this long before crashing restarts without delay.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Launch attempts per slot before workers that are to replace others are
/// given up on (before their start timeout, if they fail that fast).
pub const REPLACEMENT_ATTEMPTS: usize = 3;
/// First and largest delay between restarts of a crashing worker.
pub const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How to run an app's workers.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub app: String,
    pub workers: usize,
    pub plan: LaunchPlan,
    /// Private directory for the workers' sockets.
    pub runtime_dir: PathBuf,
    /// The uids that may be listening on a worker's socket (see
    /// `upstream::Upstream::new`).
    pub peer_uids: Vec<u32>,
    pub memory_limit: Option<MemorySize>,
    /// Kernel enforcement of `memory_limit` (cgroups), where available.
    pub memory: Option<crate::memory::AppMemory>,
    pub start_timeout: Duration,
    pub stop_timeout: Duration,
    /// How long a recycled worker may take to finish its requests.
    pub drain_timeout: Duration,
    /// Requests one worker is given at once.
    pub max_inflight: usize,
    /// `bext dev`: a worker that crashes or fails to start is not
    /// restarted until the next change ([`PoolHandle::recycle_all`]);
    /// meanwhile requests are told why at once ([`Pool::down`]).
    pub dev: bool,
    /// The workers' output goes to stderr as it is (colours and all), not
    /// through the log.
    pub raw_output: bool,
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WorkerState {
    Starting = 0,
    Ready = 1,
    Draining = 2,
    Stopped = 3,
}

impl WorkerState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => WorkerState::Starting,
            1 => WorkerState::Ready,
            2 => WorkerState::Draining,
            _ => WorkerState::Stopped,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
            WorkerState::Stopped => "stopped",
        }
    }
}

/// One running worker process, as the request path sees it.
#[derive(Debug)]
pub struct Worker {
    /// Unique within the pool, across restarts.
    pub id: u64,
    /// The slot it occupies (`isolate.workers` slots per app).
    pub index: usize,
    pub pid: u32,
    upstream: upstream::Upstream,
    inflight: AtomicUsize,
    state: AtomicU8,
    /// The pool's limit on `inflight`, and its wake-up for requests that
    /// wait for room.
    max_inflight: usize,
    freed: Arc<Notify>,
}

impl Worker {
    pub fn state(&self) -> WorkerState {
        WorkerState::from_u8(self.state.load(Ordering::Acquire))
    }

    fn set_state(&self, state: WorkerState) {
        self.state.store(state as u8, Ordering::Release);
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    pub fn upstream(&self) -> &upstream::Upstream {
        &self.upstream
    }
}

/// A request's claim on a worker; the worker counts it as in flight until
/// the lease is dropped (after the response body has been sent).
#[derive(Debug)]
pub struct Lease {
    worker: Arc<Worker>,
}

impl Lease {
    fn new(worker: Arc<Worker>) -> Self {
        worker.inflight.fetch_add(1, Ordering::Relaxed);
        Lease { worker }
    }

    pub fn worker(&self) -> &Worker {
        &self.worker
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let before = self.worker.inflight.fetch_sub(1, Ordering::Relaxed);
        if before >= self.worker.max_inflight {
            // Room on a full worker: one waiting request may take it.
            self.worker.freed.notify_one();
        }
    }
}

/// The routable side of an app's workers.
#[derive(Debug)]
pub struct Pool {
    app: Arc<str>,
    slots: Box<[ArcSwapOption<Worker>]>,
    /// Woken whenever a worker becomes ready, or has room again.
    changed: Arc<Notify>,
    max_inflight: usize,
    next: AtomicUsize,
    waiting: AtomicUsize,
    restarts: AtomicU64,
    /// Launches that never became ready.
    failed_starts: AtomicU64,
    /// Why the last of them failed.
    last_failure: std::sync::Mutex<Option<String>>,
    /// Failed starts and crashes since a worker last stayed up for
    /// [`STABLE_AFTER`]: a crash loop shows as a growing number.
    failures_in_a_row: AtomicU64,
    /// `bext dev`: why the app is not running (it crashed or failed to
    /// start, and waits for a change): requests get this at once instead
    /// of waiting for a worker.
    down: std::sync::Mutex<Option<Arc<str>>>,
}

/// A worker as reported by health checks and logs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerStatus {
    pub index: usize,
    pub pid: Option<u32>,
    pub state: &'static str,
    pub inflight: usize,
}

/// A request's place among those waiting for a worker, given back when
/// dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    fn new(app: &str, workers: usize, max_inflight: usize) -> Self {
        Pool {
            app: app.into(),
            slots: (0..workers).map(|_| ArcSwapOption::empty()).collect(),
            changed: Arc::new(Notify::new()),
            max_inflight: max_inflight.max(1),
            next: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            restarts: AtomicU64::new(0),
            failed_starts: AtomicU64::new(0),
            last_failure: std::sync::Mutex::new(None),
            failures_in_a_row: AtomicU64::new(0),
            down: std::sync::Mutex::new(None),
        }
    }

    /// `bext dev`: why the app is not running, while it waits for a change.
    pub fn down(&self) -> Option<Arc<str>> {
        self.down.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Marks the app down (waking the requests that wait for a worker, to
    /// be told why) or up again.
    fn set_down(&self, why: Option<&str>) {
        *self.down.lock().unwrap_or_else(|e| e.into_inner()) = why.map(Arc::from);
        if why.is_some() {
            self.changed.notify_waiters();
        }
    }

    pub fn app(&self) -> &str {
        &self.app
    }

    /// How many workers the app runs (`isolate.workers`), ready or not.
    pub fn size(&self) -> usize {
        self.slots.len()
    }

    /// The least-busy ready worker, other than `exclude`, at once.
    pub fn try_acquire(&self, exclude: Option<u64>) -> Option<Lease> {
        let n = self.slots.len();
        // Rotating the starting slot spreads ties.
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<Arc<Worker>> = None;
        for i in 0..n {
            let guard = self.slots[(start + i) % n].load();
            let Some(worker) = guard.as_ref() else {
                continue;
            };
            if worker.state() != WorkerState::Ready
                || Some(worker.id) == exclude
                || worker.inflight() >= self.max_inflight
            {
                continue;
            }
            if best
                .as_ref()
                .is_none_or(|b| worker.inflight() < b.inflight())
            {
                best = Some(Arc::clone(worker));
            }
        }
        best.map(Lease::new)
    }

    /// Like [`try_acquire`](Self::try_acquire), but waits up to `wait` for a
    /// worker to become ready. `None` when none did, or when too many
    /// requests are already waiting ([`MAX_WAITING`]).
    pub async fn acquire(&self, wait: Duration, exclude: Option<u64>) -> Option<Lease> {
        if let Some(lease) = self.try_acquire(exclude) {
            return Some(lease);
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= MAX_WAITING {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        // A waiter dropped on the way (its client left) gives its place
        // back too.
        let place = Waiting(&self.waiting);
        let deadline = Instant::now() + wait;
        let lease = loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(lease) = self.try_acquire(exclude) {
                break Some(lease);
            }
            if self.down().is_some() {
                break None;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break None;
            }
        };
        // Room is announced once per full worker that gets some: pass the
        // word on, in case more than this request's worth freed up.
        std::mem::forget(place);
        if self.waiting.fetch_sub(1, Ordering::Relaxed) > 1 && lease.is_some() {
            self.changed.notify_one();
        }
        lease
    }

    /// Workers that are ready now.
    pub fn ready_count(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| {
                s.load()
                    .as_ref()
                    .is_some_and(|w| w.state() == WorkerState::Ready)
            })
            .count()
    }

    /// Restarts after crashes and recycles, since start.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Failed starts and crashes since a worker last stayed up for
    /// [`STABLE_AFTER`].
    pub fn consecutive_failures(&self) -> u64 {
        self.failures_in_a_row.load(Ordering::Relaxed)
    }

    /// The workers in their slots now.
    pub fn workers(&self) -> Vec<Arc<Worker>> {
        self.slots.iter().filter_map(|s| s.load_full()).collect()
    }

    pub fn status(&self) -> Vec<WorkerStatus> {
        self.slots
            .iter()
            .enumerate()
            .map(|(index, slot)| match slot.load().as_ref() {
                Some(w) => WorkerStatus {
                    index,
                    pid: Some(w.pid),
                    state: w.state().as_str(),
                    inflight: w.inflight(),
                },
                None => WorkerStatus {
                    index,
                    pid: None,
                    state: "stopped",
                    inflight: 0,
                },
            })
            .collect()
    }

    /// A launch failed before readiness: wakes whoever waits for startup.
    fn start_failed(&self, why: String) {
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        self.failed_starts.fetch_add(1, Ordering::Relaxed);
        self.failures_in_a_row.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    fn publish(&self, index: usize, worker: Option<Arc<Worker>>) {
        let ready = worker.is_some();
        self.slots[index].store(worker);
        if ready {
            self.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: u64, index: usize, state: WorkerState) -> Arc<Worker> {
        Arc::new(Worker {
            id,
            index,
            pid: 1,
            upstream: upstream::Upstream::new("/nonexistent.sock".into(), vec![]),
            inflight: AtomicUsize::new(0),
            state: AtomicU8::new(state as u8),
            max_inflight: 2,
            freed: Arc::new(Notify::new()),
        })
    }

    #[tokio::test]
    async fn the_least_busy_ready_worker_wins() {
        let pool = Pool::new("t", 3, 8);
        pool.publish(0, Some(worker(10, 0, WorkerState::Ready)));
        pool.publish(1, Some(worker(11, 1, WorkerState::Ready)));
        pool.publish(2, Some(worker(12, 2, WorkerState::Draining)));
        let first = pool.try_acquire(None).expect("a worker");
        let second = pool.try_acquire(None).expect("a worker");
        assert_ne!(
            first.worker().id,
            second.worker().id,
            "the idle one is chosen"
        );
        let third = pool.try_acquire(Some(10)).expect("a worker");
        assert_eq!(
            third.worker().id,
            11,
            "exclusion is honoured, draining is skipped"
        );
        drop((first, second, third));
        assert_eq!(pool.ready_count(), 2);
    }

    /// Issue 11 (overload): a worker at its in-flight limit takes no more;
    /// a request waiting for room gets it when a lease ends.
    #[tokio::test]
    async fn a_full_worker_takes_no_more_until_a_lease_ends() {
        let pool = Arc::new(Pool::new("t", 1, 2));
        let w = worker(10, 0, WorkerState::Ready);
        let w = Arc::new(Worker {
            freed: Arc::clone(&pool.changed),
            ..Arc::into_inner(w).expect("sole owner")
        });
        pool.publish(0, Some(w));
        let a = pool.try_acquire(None).expect("room");
        let _b = pool.try_acquire(None).expect("room");
        assert!(pool.try_acquire(None).is_none(), "at its limit");
        let waiter = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move { pool.acquire(Duration::from_secs(10), None).await })
        };
        tokio::task::yield_now().await;
        drop(a);
        let lease = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("task");
        assert!(lease.is_some(), "the freed room went to the waiter");
    }

    /// `bext dev`: a pool marked down answers the waiting requests at once
    /// (they are told why), and waits again once it is up.
    #[tokio::test]
    async fn a_down_pool_wakes_its_waiters_at_once() {
        let pool = Arc::new(Pool::new("t", 1, 8));
        let waiter = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move { pool.acquire(Duration::from_secs(30), None).await })
        };
        tokio::task::yield_now().await;
        pool.set_down(Some("SyntaxError"));
        let lease = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken before its 30 s")
            .expect("task");
        assert!(lease.is_none());
        assert_eq!(pool.down().as_deref(), Some("SyntaxError"));
        pool.set_down(None);
        assert!(pool.down().is_none());
        assert!(
            pool.acquire(Duration::from_millis(20), None)
                .await
                .is_none(),
            "up again, it waits for a worker"
        );
    }

    #[tokio::test]
    async fn acquire_waits_for_readiness_then_gives_up() {
        let pool = Arc::new(Pool::new("t", 1, 8));
        assert!(
            pool.acquire(Duration::from_millis(20), None)
                .await
                .is_none()
        );
        let waiter = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move { pool.acquire(Duration::from_secs(10), None).await })
        };
        tokio::task::yield_now().await;
        pool.publish(0, Some(worker(1, 0, WorkerState::Ready)));
        let lease = waiter.await.expect("join").expect("woken by readiness");
        assert_eq!(lease.worker().id, 1);
    }
}
