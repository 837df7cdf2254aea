//! End-to-end tests: the real `bext` binary, on an ephemeral port, in front
//! of real fixture apps built from npm packages (tests/fixtures, prepared by
//! tests/fixtures/setup.sh). One test binary; one module per area.

#![allow(unreachable_pub, reason = "a test binary has no public API")]

mod support;

mod acme;
mod apps;
mod cache;
mod compression;
mod control;
mod dev;
mod edge;
mod errors;
mod hardening;
mod http1;
mod malformed;
mod nextjs;
mod platform;
mod proxying;
mod shutdown;
mod statics;
mod streaming;
mod tls;
mod worker_http;
mod workers;
