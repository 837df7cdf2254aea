//! The `bextctl` binary: arguments → one call to the supervisor → exit
//! code. Everything else is in [`bext::ctl`].
//!
//! Exit codes: 0 done, 1 the operation failed, 2 usage (clap),
//! 69 (`EX_UNAVAILABLE`) the supervisor could not be reached.

use std::process::ExitCode;

use clap::Parser;

use bext::ctl::args::Cli;
use bext::ctl::{CtlError, EXIT_FAILED};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = bext::ctl::Env::from_process();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bextctl: could not start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match runtime.block_on(Box::pin(bext::ctl::run(cli, env))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(error: &CtlError) -> ExitCode {
    eprintln!("bextctl: {}", bext::ctl::printable(&error.to_string()));
    ExitCode::from(error.exit_code())
}
