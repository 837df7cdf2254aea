//! bext: an application server for JavaScript web apps.
//!
//! The request path runs one way — [`listener`] → [`server`] (request id,
//! access log) → [`statics`] → [`proxy`] → [`pool`] — and only [`server`]
//! knows all of it. [`app`] and [`config`] describe what to run; [`run`] is
//! the lifecycle of `bext run`. [`shards`] runs the request path on one
//! event loop per CPU. See DESIGN.md for where the cache, router, rate
//! limiter and control plane slot in.

pub mod access_log;
pub mod admin;
pub mod alloc;
pub mod app;
pub mod apps;
pub mod body;
pub mod cache;
#[cfg(feature = "bench-ceiling")]
pub mod ceiling;
pub mod check;
pub mod cli;
pub mod compress;
pub mod config;
pub mod control;
pub mod ctl;
pub mod dev;
pub mod fields;
pub mod hooks;
pub mod listener;
pub mod logring;
pub mod memory;
pub mod metrics;
pub mod nextcache;
pub mod notify;
pub mod output;
pub mod platform;
pub mod pool;
pub mod progress;
pub mod proxy;
pub mod ratelimit;
pub mod router;
pub mod run;
pub mod serve;
pub mod server;
pub mod shards;
pub mod statics;
pub mod telemetry;
