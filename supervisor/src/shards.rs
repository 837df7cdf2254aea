//! Thread-per-core request serving, the way nginx runs one event loop per
//! worker process: `--threads` shards, each an OS thread with its own
//! single-threaded Tokio runtime that accepts client connections and runs
//! every task they start (request handlers, upstream connections,
//! background revalidations) on that thread.
//!
//! A request then never crosses threads: no work-stealing queues, no
//! cross-thread wake-ups between a client connection, its handler and its
//! upstream connection (measured: about 2 µs less CPU per proxied request
//! than one multi-threaded runtime, see bench/RESULTS.md). The main thread
//! keeps its own runtime for everything else: supervising workers, signals,
//! reloads.
//!
//! The shards share all state (apps, caches, pools) through the same
//! `Arc`s; the upstream connection pools keep idle connections per shard
//! ([`current`]), so a connection is reused on the thread that drives it.

use std::cell::Cell;
use std::io;
use std::num::NonZeroUsize;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    /// This thread's shard number, from 1; 0 on every other thread.
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The shards of the process (the first started), for work that must run
/// on each of them.
static HANDLES: std::sync::OnceLock<Vec<Handle>> = std::sync::OnceLock::new();

/// One handle per shard of the process (empty before they start).
pub fn all() -> &'static [Handle] {
    HANDLES.get().map_or(&[], Vec::as_slice)
}

/// The shard the calling thread belongs to (1..=N), or 0 when it is not a
/// shard (the main thread, blocking-pool threads, tests).
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// The default number of shards: the CPUs this process may run on (its
/// affinity mask and cgroup quota included).
pub fn default_count() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

/// The running shards; dropping this stops them (after their tasks have
/// been given the chance to finish, see [`crate::listener::serve`]).
#[derive(Debug)]
pub struct Shards {
    handles: Vec<Handle>,
    stop: CancellationToken,
    threads: Vec<JoinHandle<()>>,
}

impl Shards {
    /// Starts `count` shard threads, each idle until work is spawned on it.
    pub fn start(count: NonZeroUsize) -> io::Result<Shards> {
        let stop = CancellationToken::new();
        let mut shards = Shards {
            handles: Vec::with_capacity(count.get()),
            stop: stop.clone(),
            threads: Vec::with_capacity(count.get()),
        };
        for index in 1..=count.get() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            shards.handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("bext-shard-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(index));
                    runtime.block_on(async {
                        tokio::select! {
                            () = stop.cancelled() => {}
                            () = keep_a_near_timer() => {}
                        }
                    });
                    // Whatever is still running (a connection past the grace
                    // period) is dropped with the runtime, on this thread.
                })?;
            shards.threads.push(thread);
        }
        let _ = HANDLES.set(shards.handles.clone());
        Ok(shards)
    }

    /// One handle per shard, to spawn work on it.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

/// Period of [`keep_a_near_timer`].
const NEAR_TIMER: Duration = Duration::from_secs(1);

/// Keeps a timer due within [`NEAR_TIMER`] in the shard's timer wheel.
///
/// Tokio wakes its driver through an `eventfd` write whenever a timer is
/// registered that is due sooner than every timer already registered, even
/// from the driver's own thread. Without a near timer that is every
/// request: hyper's 30 s header-read timer is re-registered per request,
/// and the only other timers are the upstream connections' 60 s ones
/// (measured with strace: one `write(2)` and one extra `epoll_wait` per
/// proxied request, ~1.4 µs of kernel time, see bench/RESULTS.md session
/// 9). One wake-up a second costs nothing in comparison.
async fn keep_a_near_timer() {
    loop {
        tokio::time::sleep(NEAR_TIMER).await;
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        self.stop.cancel();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_their_own_numbered_shard_thread() {
        let shards = Shards::start(NonZeroUsize::new(2).expect("2")).expect("start");
        let seen: Vec<(usize, String)> = shards
            .handles()
            .iter()
            .map(|handle| {
                let (tx, rx) = std::sync::mpsc::channel();
                handle.spawn(async move {
                    let name = std::thread::current().name().unwrap_or("").to_string();
                    tx.send((current(), name)).expect("send");
                });
                rx.recv().expect("a shard ran the task")
            })
            .collect();
        assert_eq!(
            seen,
            [
                (1, "bext-shard-1".to_string()),
                (2, "bext-shard-2".to_string())
            ]
        );
        assert_eq!(current(), 0, "the test thread is not a shard");
        drop(shards);
    }
}
