//! The `berth` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;

use berth_server::cli::{self, Cli};
use berth_server::telemetry;

fn main() -> ExitCode {
    // The isolated provider's internal steps (`berth sandbox enter|init|exec`) run before anything else: no logging,
    // no runtime, no command-line parser between the sandbox and its command.
    let args: Vec<_> = std::env::args_os().collect();
    if let Some(code) = berth_isolation::init::dispatch(&args) {
        return code;
    }
    let cli = Cli::parse();
    telemetry::init(cli.log_format, cli.default_log_filter());
    // Client commands make a handful of requests: a single-threaded runtime starts faster and is plenty.
    let mut builder = if cli.is_server() {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
