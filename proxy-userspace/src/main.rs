//! The `svcproxy` binary: logging, then the command line ([`svcproxy::cli`]).

use std::process::ExitCode;

use clap::Parser;
use svcproxy::{
    cli::{Cli, Command},
    run::run,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // Before any thread starts: glibc gives each new thread its own arena.
    tune_malloc();
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

/// glibc malloc settings for a long-running controller, unless the operator set them through
/// glibc's own environment variables.
///
/// By default glibc gives each thread an arena of its own, and raises its mmap threshold each
/// time a large block is freed, after which large transient buffers (a list page of the API
/// server, a `/metrics` page naming 10,000 Services) come from the arenas and stay there as
/// free space the kernel cannot take back. The live data is planned to be small (see
/// `objects.rs`); these settings keep the resident set close to it: with 10,000 Services, about
/// 64 MiB resident became about 53 MiB (bench/results/control-plane.md). One arena is enough:
/// the threads allocate little once the first sync is done. A fixed threshold sends blocks of
/// 128 KiB and more to mmap, which returns them to the kernel when freed.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const ARENAS: libc::c_int = 1;
        const MMAP_THRESHOLD: libc::c_int = 128 * 1024;
        for (env, param, value) in [
            ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, ARENAS),
            (
                "MALLOC_MMAP_THRESHOLD_",
                libc::M_MMAP_THRESHOLD,
                MMAP_THRESHOLD,
            ),
        ] {
            if std::env::var_os(env).is_none() {
                // SAFETY: mallopt only changes allocator parameters; called before any other
                // thread exists. A refusal (0) leaves glibc's default, which only costs memory.
                unsafe { libc::mallopt(param, value) };
            }
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}
