//! The `bext` binary: arguments → telemetry → command → exit code.

use std::process::ExitCode;

use clap::Parser;

use bext::cli::{Cli, Command, LogFormat};
use bext::run::RunError;

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
        Command::Run(args) => daemon(cli.log_format, bext::run::run(args)),
        Command::Serve(args) => daemon(cli.log_format, bext::serve::serve(args)),
    }
}

/// Runs a long-lived command: logging, the async runtime, and the exit code.
fn daemon(format: LogFormat, command: impl Future<Output = Result<(), RunError>>) -> ExitCode {
    let log = bext::telemetry::init(format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&format!("could not start the async runtime: {e}"), 1),
    };
    let result = runtime.block_on(command);
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
// in bench/RESULTS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
