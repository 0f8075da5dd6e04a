//! The command line: `run`, `check`, `status`, `setup`, `--version`.
//!
//! Exit codes: 0 ok, 2 bad configuration or usage, 1 anything that failed at run time.

mod check;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::config::{self, ConfigError};

#[derive(Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Relays a PostgreSQL transactional outbox to Kafka"
)]
pub struct Cli {
    /// Log format on stderr. The level comes from RUST_LOG (default: info).
    #[arg(long, global = true, value_enum, default_value = "human")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Relay the outbox until SIGTERM or Ctrl-C.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate the configuration, then connect to PostgreSQL and Kafka and report what
    /// is missing.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print leader, backlog (or slot lag) and last activity; exit 1 when unhealthy, so
    /// it serves as an exec probe.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// Unhealthy when the oldest waiting event is older than this.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        max_lag: std::time::Duration,
    },
    /// Print the SQL for the outbox table, publication and relay role; `--apply` runs it
    /// against `source.database_url`.
    Setup {
        #[arg(long, short, required_if_eq("apply", "true"))]
        config: Option<PathBuf>,
        #[arg(long)]
        apply: bool,
    },
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_tracing(cli.log_format);
    match try_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("outbox-relay: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn try_main(cli: Cli) -> anyhow::Result<ExitCode> {
    // Configuration errors are reported before any thread or connection exists.
    match cli.command {
        Command::Run { config } => {
            let config = config::load(&config)?;
            runtime()?.block_on(async {
                let shutdown = CancellationToken::new();
                tokio::spawn(forward_signals(shutdown.clone()));
                // On a worker thread, beside the tasks it talks to all the time (database
                // connections, the replication stream, delivery collectors): from the
                // main thread, every one of those wake-ups would cross threads.
                tokio::spawn(crate::daemon::run(config, shutdown))
                    .await
                    .map_err(|e| anyhow::anyhow!("the relay task failed: {e}"))?
                    .map_err(anyhow::Error::from)
            })?;
            tracing::info!("relay stopped cleanly");
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => {
            let config = config::load(&config)?;
            println!("config: ok");
            let healthy = runtime()?.block_on(check::run(&config));
            Ok(if healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Status { config, max_lag } => {
            let config = config::load(&config)?;
            let healthy = runtime()?.block_on(status::run(&config, max_lag))?;
            Ok(if healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Setup { config, apply } => {
            if !apply {
                for (name, sql) in crate::SETUP_SQL {
                    println!("-- {name}\n{sql}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let config = config::load(&config.expect("clap requires --config with --apply"))?;
            runtime()?.block_on(check::apply_setup(&config))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Turns SIGTERM and SIGINT (Ctrl-C) into one cancellation: the relay stops reading,
/// finishes its in-flight batch and acknowledges it.
async fn forward_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the relay with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight events, then stopping"),
        _ = int.recv() => tracing::info!("SIGINT: finishing in-flight events, then stopping"),
    }
    shutdown.cancel();
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
