//! The `svcproxy` binary: logging, then the command line ([`svcproxy::cli`]).

use std::process::ExitCode;

use clap::Parser;
use svcproxy::{
    cli::{Cli, Command},
    run::run,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            // kube's HTTP layer logs every failed request as an error; the watch loop logs the
            // same failures itself, rate-limited, so an outage does not flood the log.
            EnvFilter::try_from_env("SVCPROXY_LOG")
                .unwrap_or_else(|_| EnvFilter::new("info,kube_client::client::builder=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some((request, read)) = cli.command.inspection() {
        // Output on stdout for pipes; a failure is one line on stderr and a non-zero status.
        return match svcproxy::inspect::run(&read.pin_path, &request, read.output) {
            Ok(text) => {
                // A reader that stops early (`| head`) closes the pipe: its choice, not an
                // error, and never a panic.
                let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("svcproxy: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let result = match cli.command {
        Command::Run(args) => {
            let opts = match args.into_options(hostname) {
                Ok(opts) => opts,
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(run(opts)).map_err(anyhow::Error::from))
        }
        Command::Cleanup { pin_path } => match svcproxy::loader::cleanup(&pin_path) {
            Ok(true) => {
                tracing::info!(pin_path = %pin_path.display(), "detached and removed");
                Ok(())
            }
            Ok(false) => {
                tracing::info!(pin_path = %pin_path.display(), "nothing pinned there");
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
        // Answered above.
        Command::Inspect { .. } | Command::Explain { .. } => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}
