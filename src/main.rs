//! CLI entry: parses arguments, sets up logging, dispatches, maps errors to exit codes
//! (78 for an invalid daemon config, 70 when a daemon stage panicked, 1 for any other error).

use std::process::ExitCode;

use clap::Parser;
use edge_inspect::cli::{Cli, Command};
use edge_inspect::commands;
use edge_inspect::config::{ConfigErrors, EXIT_CONFIG};
use edge_inspect::daemon::{EXIT_SOFTWARE, StageFailed};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(
                // The embedded demo broker logs every connection, and an ERROR on each clean
                // disconnect; RUST_LOG=info,rumqttd=info shows it when needed.
                "info,ort=warn,rumqttd=off",
            )
        }))
        .with_writer(std::io::stderr)
        // journald and log files get plain text; colours only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Infer(args) => commands::infer::run(args),
        Command::Run(args) => commands::run::run(args),
        Command::CheckConfig(args) => commands::run::check_config(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Synth(args) => commands::synth::run(args),
        Command::Bench(args) => commands::bench::run(args),
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
