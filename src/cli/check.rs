//! `check` and `setup --apply`: talk to both sides and say plainly what is missing.

use std::time::Duration;

use anyhow::Context as _;

use crate::config::Config;
use crate::metrics::Telemetry;
use crate::sink::kafka::schema::ContractError;
use crate::sink::kafka::KafkaSink;
use crate::source::logical;
use crate::source::polling::PollingSource;
use crate::source::Mode;
use crate::source::{dead_letter_table, table};

const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// Prints one line per side and returns whether both are usable; a schema the registry
/// refuses is an error (a configuration to change, as it is for `run`).
pub async fn run(config: &Config) -> Result<bool, ContractError> {
    let (pg, kafka, schemas) = tokio::join!(
        check_postgres(config),
        check_kafka(config),
        super::schemas::report(config)
    );
    match &pg {
        Ok(what) => {
            println!("postgres: ok ({what})");
            if let Some(line) = dead_letters(config).await {
                println!("postgres: {line}");
            }
        }
        Err(e) => println!("postgres: FAILED: {e:#}"),
    }
    match &kafka {
        Ok(n) => println!("kafka: ok ({n} broker(s) at {})", config.sink.brokers),
        Err(e) => println!("kafka: FAILED: {e:#}"),
    }
    Ok(schemas? && pg.is_ok() && kafka.is_ok())
}

/// What waits in the dead-letter queue, and whether publishing is paused (read only;
/// `None` before the relay's tables exist).
async fn dead_letters(config: &Config) -> Option<String> {
    let sql = table::connect(&config.source).await.ok()?;
    let (state, version) = crate::source::state::peek(&sql, &config.source.state_schema)
        .await
        .ok()??;
    if version < 2 {
        return None;
    }
    let parked = state.parked_aggregates(&sql).await.ok()?;
    let loose = state.loose_dead_letters(&sql).await.ok()?.len();
    let paused = state.paused(&sql).await.ok()?;
    let held: i64 = parked.iter().map(|p| p.events).sum();
    Some(format!(
        "{} parked aggregate(s) ({held} event(s)), {loose} other dead letter(s){} \
         (outbox-relay dead-letters list)",
        parked.len(),
        match paused {
            Some(p) => format!("; publishing PAUSED since {} by {}", p.since, p.by),
            None => String::new(),
        }
    ))
}

async fn check_postgres(config: &Config) -> anyhow::Result<String> {
    let src = &config.source;
    println!("postgres: TLS {}", src.tls.describe());
    match src.mode {
        Mode::Polling => {
            // Connecting as the relay would checks table, columns and privileges.
            PollingSource::connect(src, Telemetry::default()).await?;
            Ok(format!(
                "{}, table {} readable and deletable",
                src.redacted_url(),
                src.table_label()
            ))
        }
        Mode::Logical => {
            let mut problems = 0;
            for host in src.each_host() {
                for shard in logical::shard_configs(&host) {
                    problems += report_on(shard).await;
                }
            }
            let client = table::connect(src).await?;
            logical::require_logical_wal(&client).await?;
            let server = logical::server_version(&client).await?;
            logical::require_supported(server, src)?;
            let may_replicate: bool = client
                .query_one(
                    "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
                    &[],
                )
                .await?
                .get(0);
            anyhow::ensure!(
                may_replicate,
                "role {} lacks the REPLICATION attribute: ALTER ROLE {} REPLICATION",
                src.pg.get_user().unwrap_or("?"),
                src.pg.get_user().unwrap_or("?")
            );
            let mut what = format!(
                "{}, PostgreSQL {server}, wal_level=logical, REPLICATION granted",
                src.redacted_url()
            );
            let mut ours = Vec::new();
            if let Some(t) = &src.table {
                let checks = table::Checks::logical(src.logical.cleanup);
                table::describe(&client, t, &src.columns, checks).await?;
                what.push_str(&format!(", table {t} readable"));
                ours = logical::outbox_relations(&client, t).await?;
            }
            logical::require_matching_slots(&client, &src.logical).await?;
            let leftovers = logical::other_shard_publications(&client, &src.logical).await?;
            anyhow::ensure!(
                leftovers.is_empty(),
                "publication(s) {} belong to another source.logical.shards count than {}: \
                 they carry nothing to this configuration; finish the change of shards with \
                 DROP PUBLICATION {}",
                leftovers.join(", "),
                src.logical.shards,
                leftovers.join(", ")
            );
            let shards = logical::shard_configs(src);
            for shard in &shards {
                let publication = &shard.logical.publication;
                let filter = logical::shard_filter(&client, shard).await?;
                if logical::publication_ready(&client, shard, &ours, filter.as_deref()).await? {
                    what.push_str(&format!(", publication {publication} carries it"));
                } else if src.logical.create_if_missing {
                    what.push_str(&format!(
                        ", publication {publication} missing (the relay creates it at start)"
                    ));
                } else {
                    return Err(logical::missing_publication(publication).into());
                }
            }
            if let Some(t) = &src.dead_letter_table {
                let found = dead_letter_table::check(&client, t).await?;
                what.push_str(&format!(", dead-letter table {t} {found}"));
            }
            // Read only: check never creates the relay's tables.
            for shard in &shards {
                what.push_str(&format!(
                    ", {}",
                    logical::describe_carriage(&client, shard, server).await?
                ));
            }
            anyhow::ensure!(problems == 0, "{problems} problem(s) in the report above");
            Ok(what)
        }
    }
}

/// Prints what one server says about everything log mode depends on; returns the
/// number of problems (an unreachable server is one).
async fn report_on(mut host: crate::source::SourceConfig) -> usize {
    use logical::report::Verdict;
    // Every server is reported, standbys too, whatever the URL asks of the relay's own
    // connections.
    host.pg
        .target_session_attrs(tokio_postgres::config::TargetSessionAttrs::Any);
    let name = host.redacted_url();
    let client = match table::connect(&host).await {
        Ok(c) => c,
        Err(e) => {
            println!("postgres {name}: unreachable: {e}");
            return 1;
        }
    };
    let report = match logical::report::report(&client, &host).await {
        Ok(r) => r,
        Err(e) => {
            println!("postgres {name}: could not read its settings: {e}");
            return 1;
        }
    };
    let role = if report.standby { "standby" } else { "primary" };
    println!("postgres {name}: {role}, PostgreSQL {}", report.version);
    let mut problems = 0;
    for f in &report.findings {
        let tag = match f.verdict {
            Verdict::Ok => "ok",
            Verdict::Warning => "WARNING",
            Verdict::Problem => {
                problems += 1;
                "PROBLEM"
            }
        };
        println!("  {tag}: {}", f.text);
    }
    problems
}

async fn check_kafka(config: &Config) -> anyhow::Result<usize> {
    let sink = KafkaSink::new(&config.sink, Telemetry::default())?;
    tokio::task::spawn_blocking(move || sink.ping(KAFKA_TIMEOUT))
        .await?
        .with_context(|| {
            format!(
                "no metadata from {} within {KAFKA_TIMEOUT:?}",
                config.sink.brokers
            )
        })
}

/// Applies the shipped SQL, in order, with the configured connection and names.
pub async fn apply_setup(config: &Config) -> anyhow::Result<()> {
    let client = table::connect(&config.source).await?;
    let names = super::setup::Names::of(&config.source);
    for (name, sql) in crate::SETUP_SQL {
        client
            .batch_execute(&super::setup::render(sql, &names))
            .await
            .with_context(|| format!("applying {name}"))?;
        println!("applied {name}");
    }
    Ok(())
}
