//! The `bext` binary: arguments → telemetry → command → exit code.

use std::num::NonZeroUsize;
use std::process::ExitCode;

use clap::Parser;

use bext::cli::{Cli, Command, LogFormat};
use bext::run::RunError;
use bext::shards::Shards;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => match bext::check::check(&args) {
            Ok(report) => {
                #[allow(clippy::print_stdout, reason = "bext check reports on stdout")]
                {
                    println!("{}", report.config);
                    if !report.app.is_empty() {
                        println!("{}", report.app);
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.to_string(), e.exit_code()),
        },
        Command::Run(args) => daemon(cli.log_format, cli.threads, |shards| {
            bext::run::run(args, shards)
        }),
        Command::Serve(args) => daemon(cli.log_format, cli.threads, |shards| {
            bext::serve::serve(args, shards)
        }),
        Command::Dev(args) => daemon(cli.log_format, cli.threads, |shards| {
            bext::dev::dev(args, shards)
        }),
    }
}

/// Runs a long-lived command: logging, the runtimes, and the exit code.
/// Requests are served by the shards ([`bext::shards`]); the main thread's
/// runtime supervises.
fn daemon<F>(
    format: LogFormat,
    threads: Option<NonZeroUsize>,
    command: impl FnOnce(Shards) -> F,
) -> ExitCode
where
    F: Future<Output = Result<(), RunError>>,
{
    let log = bext::telemetry::init(format);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&format!("could not start the async runtime: {e}"), 1),
    };
    let shards = match Shards::start(threads.unwrap_or_else(bext::shards::default_count)) {
        Ok(shards) => shards,
        Err(e) => return fail(&format!("could not start the serving threads: {e}"), 1),
    };
    let result = runtime.block_on(command(shards));
    if let Err(e) = &result {
        tracing::error!("{e}");
    }
    // Workers and tasks are gone; flush the log before the verdict.
    drop(runtime);
    drop(log);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string(), e.exit_code()),
    }
}

fn fail(message: &str, code: u8) -> ExitCode {
    eprintln!("bext: error: {message}");
    ExitCode::from(code)
}

// The request path allocates small, short-lived buffers and header maps on
// every request; mimalloc's per-thread free lists make them cheap (measured
// in bench/RESULTS.md). See `bext::alloc` for why it has its own entry.
#[global_allocator]
static ALLOCATOR: bext::alloc::Allocator = bext::alloc::Allocator;
