//! CLI entry: parses arguments, sets up logging, dispatches, maps errors to exit codes
//! (78 for an invalid daemon config, 70 when a daemon stage panicked, 1 for any other error).

#![deny(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use edge_inspect::cli::{Cli, Command};
use edge_inspect::commands;
use edge_inspect::config::{ConfigErrors, EXIT_CONFIG};
use edge_inspect::daemon::{EXIT_SOFTWARE, StageFailed};

fn main() -> ExitCode {
    // First, while this is the only thread: a line node must not phone home.
    edge_inspect::infer::runtime::opt_out_of_telemetry();
    edge_inspect::allocator::keep_heap();
    let cli = Cli::parse();
    edge_inspect::logging::init(cli.log_format);
    let result = match cli.command {
        Command::Infer(args) => commands::infer::run(args),
        Command::Run(args) => commands::run::run(args),
        Command::CheckConfig(args) => commands::run::check_config(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Synth(args) => commands::synth::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Label(args) => commands::label::run(args),
        Command::Fleet(args) => commands::fleet::run(args),
        #[cfg(feature = "train")]
        Command::Export(args) => commands::export::run(args),
        #[cfg(feature = "train")]
        Command::Retrain(args) => commands::retrain::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A bad config is EX_CONFIG, so systemd's RestartPreventExitStatus=78 stops retrying.
        Err(e) if e.downcast_ref::<ConfigErrors>().is_some() => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        // A stage panicked: EX_SOFTWARE, which systemd's Restart=on-failure restarts.
        Err(e) if e.downcast_ref::<StageFailed>().is_some() => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_SOFTWARE)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
