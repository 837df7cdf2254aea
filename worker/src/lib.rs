//! Everything that runs inside an app's process, and nothing that runs in the
//! supervisor's request path.
//!
//! * [`launch`] forks and execs a worker: its own process group, a
//!   parent-death signal, the supervisor-owned listening socket handed over as
//!   an inherited file descriptor, a clean environment for the runtime
//!   ([`env`] says what it holds).
//! * [`socket`] creates and removes the Unix sockets the supervisor owns.
//! * [`adapter`] holds the small JavaScript adapters that make an unmodified
//!   app's `listen(port)` / `Deno.serve({port})` serve on that socket and
//!   report readiness.
//!
//! This crate knows nothing about HTTP, routing or restarts: the supervisor
//! decides when to launch and stop; this crate only knows how.

pub mod adapter;
pub mod env;
pub mod launch;
pub mod socket;

pub use launch::{Credentials, HIGH_LISTEN_FD, LISTEN_FD, LaunchError, LaunchSpec, spawn};
