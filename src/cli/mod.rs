//! The command line: `run`, `check`, `status`, `setup`, `slot`, `schemas`,
//! `dead-letters`, `pause`, `resume`, `--version`.
//!
//! Exit codes: 0 ok, 2 bad configuration or usage (an `http.listen` that cannot be bound
//! included, or a schema the registry refuses: a restart cannot fix them), 3 a lost
//! replication slot, 1 anything that failed at run time.
//!
//! Everything the process writes to stderr goes through `tracing` in the chosen log
//! format (the fatal error too), so with `--log-format json` every line is a JSON
//! object; colours only when stderr is a terminal.

mod check;
mod schemas;
mod setup;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::config::{self, ConfigError};
use crate::control::dead_letters::{self as control, ControlError, Selection};
use crate::control::requests::Action;

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
    /// against `source.database_url`. With `--config`, under the configured names
    /// (`source.table`, `source.logical.publication`, `source.dead_letter_table`).
    Setup {
        #[arg(long, short, required_if_eq("apply", "true"))]
        config: Option<PathBuf>,
        #[arg(long)]
        apply: bool,
    },
    /// Operator commands on the replication slot (log mode).
    Slot {
        #[command(subcommand)]
        action: SlotAction,
    },
    /// Event contracts: ask the schema registry, or validate sample payloads, without
    /// registering anything (for an application's CI).
    Schemas {
        #[command(subcommand)]
        action: SchemasAction,
    },
    /// Dead letters and parked aggregates: list, show, redrive, discard. Acting records a
    /// request that the leading relay carries out; exit 2 for a bad argument.
    #[command(name = "dead-letters")]
    DeadLetters {
        #[command(subcommand)]
        action: DeadLettersAction,
    },
    /// Stop publishing without stopping the process (durable: restarts and a standby
    /// taking over stay paused). /readyz answers 503 "paused".
    Pause {
        #[arg(long, short)]
        config: PathBuf,
        /// How long to wait for the leader to confirm.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
    /// Publish again after `pause`.
    Resume {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
}

#[derive(Subcommand)]
enum DeadLettersAction {
    /// Parked aggregates (count, first error, age) and dead letters.
    List {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// One dead letter or parked event, with its body.
    Show {
        #[arg(long, short)]
        config: PathBuf,
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Publish again, in the original order: an aggregate's parked queue, a queue up to
    /// and including one id, or everything.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["aggregate", "id", "all"])))]
    Redrive {
        #[arg(long, short)]
        config: PathBuf,
        /// The parked aggregate's id.
        #[arg(long)]
        aggregate: Option<String>,
        /// Its type, when the id is parked under several.
        #[arg(long, requires = "aggregate")]
        aggregate_type: Option<String>,
        /// The queue up to and including this dead letter (never it alone, out of order).
        #[arg(long)]
        id: Option<i64>,
        /// Every parked aggregate and every dead letter.
        #[arg(long)]
        all: bool,
        /// How long to wait for the leader's outcome.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
    /// Drop on purpose (recorded): an aggregate's whole queue, or one event (discarding
    /// a queue's head makes the next event its head).
    #[command(group(clap::ArgGroup::new("what").required(true).args(["aggregate", "id"])))]
    Discard {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        aggregate: Option<String>,
        #[arg(long, requires = "aggregate")]
        aggregate_type: Option<String>,
        #[arg(long)]
        id: Option<i64>,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
}

#[derive(Subcommand)]
enum SchemasAction {
    /// Would the registry take each schema file as its subject's next version? Exit 0
    /// compatible, 1 a break (or the registry did not answer), 2 a bad configuration.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Do these sample payloads (JSON files) fit the schema of their events? Exit 0 all
    /// fit, 1 one does not, 2 a bad configuration.
    Validate {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        aggregate_type: String,
        #[arg(long)]
        event_type: Option<String>,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum SlotAction {
    /// Say that the slot was dropped on purpose: the next start is a first start (the
    /// rows still in the outbox are published again) instead of a lost slot.
    Forget {
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() && json_requested(std::env::args_os()) => {
            init_tracing(LogFormat::Json);
            tracing::error!(exit_code = 2, "{}", e.render().to_string().trim_end());
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let format = cli.log_format;
    init_tracing(format);
    match try_main(cli) {
        Ok(code) => code,
        Err(e) => {
            let code = exit_code(&e);
            match format {
                LogFormat::Human => eprintln!("outbox-relay: {e:#}"),
                LogFormat::Json => tracing::error!(exit_code = code, "{e:#}"),
            }
            ExitCode::from(code)
        }
    }
}

/// The exit code of a fatal error.
fn exit_code(e: &anyhow::Error) -> u8 {
    let listen = matches!(
        e.downcast_ref::<crate::relay::RelayError>(),
        Some(crate::relay::RelayError::Listen { .. } | crate::relay::RelayError::Contract(_))
    ) || e
        .downcast_ref::<crate::sink::kafka::schema::ContractError>()
        .is_some_and(|e| !e.is_retryable())
        || e.downcast_ref::<schemas::Usage>().is_some()
        || matches!(
            e.downcast_ref::<ControlError>(),
            Some(ControlError::Refused(_))
        );
    if e.downcast_ref::<ConfigError>().is_some() || listen {
        // A supervisor restarting the relay would fail the same way: both need an
        // operator (a listen address in use, or a schema the registry refuses, is a
        // configuration to change).
        2
    } else if is_slot_lost(e) {
        SLOT_LOST_EXIT_CODE
    } else {
        1
    }
}

/// Whether the command line asks for JSON logs, read before clap could parse it (for
/// a usage error's message).
fn json_requested(args: impl IntoIterator<Item = std::ffi::OsString>) -> bool {
    let mut previous_was_flag = false;
    for arg in args {
        let arg = arg.to_string_lossy();
        if arg == "--log-format=json" || (previous_was_flag && arg == "json") {
            return true;
        }
        previous_was_flag = arg == "--log-format";
    }
    false
}

/// The exit code of "the replication slot is lost and `on_slot_lost = \"fail\"`": a
/// supervisor must not restart the relay, since a restart cannot bring the slot back
/// (the systemd unit lists it in `RestartPreventExitStatus`).
pub const SLOT_LOST_EXIT_CODE: u8 = 3;

fn is_slot_lost(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<crate::relay::RelayError>(),
        Some(crate::relay::RelayError::Source(
            crate::source::SourceError::SlotLost(_)
        ))
    )
}

fn try_main(cli: Cli) -> anyhow::Result<ExitCode> {
    // Configuration errors are reported before any thread or connection exists.
    match cli.command {
        Command::Run { config } => {
            let config = config::load(&config)?;
            runtime()?.block_on(async {
                let shutdown = CancellationToken::new();
                // Installed before the relay starts: from here on no signal it answers
                // takes its default action (SIGHUP's is to end the process).
                tokio::spawn(forward_signals(Signals::install(), shutdown.clone()));
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
            let healthy = runtime()?.block_on(check::run(&config))?;
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
                let names = match config {
                    Some(path) => Some(setup::Names::of(&config::load(&path)?.source)),
                    None => None,
                };
                for (name, sql) in crate::SETUP_SQL {
                    match &names {
                        Some(names) => println!("-- {name}\n{}", setup::render(sql, names)),
                        None => println!("-- {name}\n{sql}"),
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            let config = config::load(&config.expect("clap requires --config with --apply"))?;
            runtime()?.block_on(check::apply_setup(&config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Slot {
            action: SlotAction::Forget { config },
        } => {
            let config = config::load(&config)?;
            let said = runtime()?.block_on(crate::control::forget_slot(&config))?;
            println!("{said}");
            Ok(ExitCode::SUCCESS)
        }
        Command::DeadLetters { action } => {
            let said = match action {
                DeadLettersAction::List { config, json } => {
                    let config = config::load(&config)?;
                    runtime()?.block_on(control::list(&config, json))?
                }
                DeadLettersAction::Show { config, id, json } => {
                    let config = config::load(&config)?;
                    runtime()?.block_on(control::show(&config, id, json))?
                }
                DeadLettersAction::Redrive {
                    config,
                    aggregate,
                    aggregate_type,
                    id,
                    all,
                    wait,
                } => {
                    let config = config::load(&config)?;
                    let selection = Selection {
                        aggregate,
                        aggregate_type,
                        id,
                        all,
                    };
                    runtime()?.block_on(control::act(&config, Action::Redrive, &selection, wait))?
                }
                DeadLettersAction::Discard {
                    config,
                    aggregate,
                    aggregate_type,
                    id,
                    wait,
                } => {
                    let config = config::load(&config)?;
                    let selection = Selection {
                        aggregate,
                        aggregate_type,
                        id,
                        all: false,
                    };
                    runtime()?.block_on(control::act(&config, Action::Discard, &selection, wait))?
                }
            };
            println!("{said}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Pause { config, wait } => {
            let config = config::load(&config)?;
            println!(
                "{}",
                runtime()?.block_on(control::pause(&config, true, wait))?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume { config, wait } => {
            let config = config::load(&config)?;
            println!(
                "{}",
                runtime()?.block_on(control::pause(&config, false, wait))?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Schemas {
            action: SchemasAction::Check { config },
        } => {
            let config = config::load(&config)?;
            runtime()?.block_on(schemas::check(&config))
        }
        Command::Schemas {
            action:
                SchemasAction::Validate {
                    config,
                    aggregate_type,
                    event_type,
                    files,
                },
        } => {
            let config = config::load(&config)?;
            runtime()?.block_on(schemas::validate(
                &config,
                &aggregate_type,
                event_type.as_deref(),
                &files,
            ))
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// The signals `run` answers.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// `None` (logged) when the handlers cannot be installed.
    fn install() -> Option<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(term), Ok(int), Ok(hup)) => Some(Signals { term, int, hup }),
            _ => {
                tracing::error!("cannot install signal handlers; stop the relay with SIGKILL");
                None
            }
        }
    }
}

/// Turns SIGTERM and SIGINT (Ctrl-C) into one cancellation: the relay stops reading,
/// finishes its in-flight batch and acknowledges it. SIGHUP, which supervisors and
/// tools send to mean "reload", is answered with a warning: the relay goes on with the
/// configuration it started with.
async fn forward_signals(signals: Option<Signals>, shutdown: CancellationToken) {
    let Some(Signals {
        mut term,
        mut int,
        mut hup,
    }) = signals
    else {
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: finishing in-flight events, then stopping");
                break;
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: finishing in-flight events, then stopping");
                break;
            }
            _ = hup.recv() => tracing::warn!(
                "SIGHUP: configuration reload is not supported; restart the relay to apply \
                 a changed configuration"
            ),
        }
    }
    shutdown.cancel();
}

fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Colours for a person at a terminal, never in a file, pipe or journal.
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => {
            builder.json().with_ansi(false).init();
            // A panic's message is one JSON line too.
            std::panic::set_hook(Box::new(|info| {
                let location = info.location().map(|l| l.to_string()).unwrap_or_default();
                let message = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into());
                let backtrace = std::backtrace::Backtrace::capture();
                if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
                    tracing::error!(%location, %backtrace, "panic: {message}");
                } else {
                    tracing::error!(%location, "panic: {message}");
                }
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_seen_in_either_spelling_of_the_flag() {
        let json = |a: &[&str]| json_requested(a.iter().map(std::ffi::OsString::from));
        assert!(json(&["x", "--log-format", "json", "bogus"]));
        assert!(json(&["x", "bogus", "--log-format=json"]));
        assert!(!json(&["x", "--log-format", "human", "json"]));
        assert!(!json(&["x", "json"]));
    }
}
