//! What `check` reports about one server in log mode: each setting the relay depends
//! on, read from the server, with the fix beside anything that is wrong or risky.
//!
//! The start-up checks ([`super::setup`]) stop at the first problem; this report lists
//! everything, for every host of `database_url`, so an operator sees a standby's
//! failover settings beside the primary's.

use tokio_postgres::Client;

use super::commands::{ServerVersion, FAILOVER_SINCE};
use crate::source::SourceConfig;

/// How a finding reads in `check`'s output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Works, with a risk the operator should know.
    Warning,
    /// The relay cannot run against this server as configured.
    Problem,
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub verdict: Verdict,
    pub text: String,
}

/// The findings for one server: its role and version first.
pub struct ServerReport {
    pub standby: bool,
    pub version: ServerVersion,
    pub findings: Vec<Finding>,
}

fn ok(text: impl Into<String>) -> Finding {
    Finding {
        verdict: Verdict::Ok,
        text: text.into(),
    }
}

fn warning(text: impl Into<String>) -> Finding {
    Finding {
        verdict: Verdict::Warning,
        text: text.into(),
    }
}

fn problem(text: impl Into<String>) -> Finding {
    Finding {
        verdict: Verdict::Problem,
        text: text.into(),
    }
}

async fn setting(sql: &Client, name: &str) -> Result<String, tokio_postgres::Error> {
    // current_setting: SHOW cannot take a parameter, and the name is ours.
    Ok(sql
        .query_one("SELECT current_setting($1, true)", &[&name])
        .await?
        .get::<_, Option<String>>(0)
        .unwrap_or_default())
}

/// Reads everything `check` reports from one server.
pub async fn report(
    sql: &Client,
    config: &SourceConfig,
) -> Result<ServerReport, tokio_postgres::Error> {
    let version = ServerVersion(
        setting(sql, "server_version_num")
            .await?
            .parse()
            .unwrap_or(0),
    );
    let standby: bool = sql
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0);
    let mut findings = Vec::new();

    let wal_level = setting(sql, "wal_level").await?;
    findings.push(if wal_level == "logical" {
        ok("wal_level = logical")
    } else {
        problem(format!(
            "wal_level = {wal_level}: log mode needs logical (postgresql.conf, then restart)"
        ))
    });

    let user = config.pg.get_user().unwrap_or("?");
    let may: Option<bool> = sql
        .query_opt(
            "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    findings.push(if may == Some(true) {
        ok(format!("role {user} may replicate"))
    } else {
        problem(format!(
            "role {user} lacks the REPLICATION attribute: ALTER ROLE {user} REPLICATION"
        ))
    });

    findings.push(publication(sql, config).await?);

    let keep = setting(sql, "max_slot_wal_keep_size").await?;
    findings.push(if keep == "-1" {
        warning(
            "max_slot_wal_keep_size = -1 (unlimited): a relay that stops for long makes its \
             slot keep WAL until the disk fills; set a limit (e.g. 10GB) and choose \
             source.logical.on_slot_lost for when it is reached",
        )
    } else {
        ok(format!(
            "max_slot_wal_keep_size = {keep} (beyond it the slot is invalidated: \
             source.logical.on_slot_lost = \"{}\")",
            config.logical.on_slot_lost
        ))
    });

    findings.push(slot(sql, config, version).await?);
    if version.0 >= FAILOVER_SINCE {
        findings.extend(failover(sql, config, standby).await?);
    } else if config.logical.failover {
        findings.push(problem(format!(
            "source.logical.failover = true needs PostgreSQL 17 or later; this server is \
             {version}: set it to false, or upgrade"
        )));
    } else if standby {
        findings.push(warning(
            "slots are not synchronised to standbys before PostgreSQL 17: after a promotion \
             the relay makes a new slot and publishes the rows still in the outbox again",
        ));
    }
    Ok(ServerReport {
        standby,
        version,
        findings,
    })
}

/// The publication's tables and options as the server has them.
async fn publication(
    sql: &Client,
    config: &SourceConfig,
) -> Result<Finding, tokio_postgres::Error> {
    let name = &config.logical.publication;
    let row = sql
        .query_opt(
            "SELECT p.puballtables, p.pubinsert, p.pubupdate OR p.pubdelete, p.pubviaroot, \
               ARRAY(SELECT format('%I.%I', schemaname, tablename) FROM pg_publication_tables t \
                     WHERE t.pubname = p.pubname ORDER BY 1) \
             FROM pg_publication p WHERE p.pubname = $1",
            &[name],
        )
        .await?;
    let Some(row) = row else {
        let creates = if config.logical.create_if_missing {
            "the relay creates it at start (create_if_missing)"
        } else {
            "create it: sql/002_publication.sql"
        };
        return Ok(warning(format!(
            "publication {name} does not exist: {creates}"
        )));
    };
    let (all, inserts, more, via_root, tables): (bool, bool, bool, bool, Vec<String>) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    let listed = if all {
        "FOR ALL TABLES".to_owned()
    } else if tables.is_empty() {
        "no table".to_owned()
    } else {
        tables.join(", ")
    };
    let text = format!(
        "publication {name}: {listed}; publishes {}{}; publish_via_partition_root = {via_root}",
        if inserts { "inserts" } else { "no inserts" },
        if more { " and updates/deletes" } else { "" }
    );
    // Whether the relay accepts it is decided by the start-up check, which names the fix;
    // here the shape is shown, and the obvious misfits flagged.
    Ok(
        if all || !inserts || (config.table.is_some() && tables.len() != 1 && !via_root) {
            problem(format!(
                "{text}: the relay needs exactly the outbox, inserts, and the partition root \
             for a partitioned outbox (start-up names the statement that fixes it)"
            ))
        } else {
            ok(text)
        },
    )
}

async fn slot(
    sql: &Client,
    config: &SourceConfig,
    version: ServerVersion,
) -> Result<Finding, tokio_postgres::Error> {
    let name = &config.logical.slot;
    let extra = if version.0 >= FAILOVER_SINCE {
        "failover::text, synced::text"
    } else {
        "NULL::text, NULL::text"
    };
    let row = sql
        .query_opt(
            &format!(
                "SELECT wal_status, active, \
                   pg_size_pretty(pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() \
                     THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, \
                     confirmed_flush_lsn)), {extra} \
                 FROM pg_replication_slots WHERE slot_name = $1"
            ),
            &[name],
        )
        .await?;
    let Some(row) = row else {
        return Ok(ok(format!(
            "slot {name} does not exist yet{}",
            if config.logical.create_if_missing {
                " (the first start creates it)"
            } else {
                ": create_if_missing = false, so create it (outbox-relay setup prints the SQL)"
            }
        )));
    };
    let status: Option<String> = row.get(0);
    let active: bool = row.get(1);
    let lag: Option<String> = row.get(2);
    let failover: Option<String> = row.get(3);
    let synced: Option<String> = row.get(4);
    let mut text = format!(
        "slot {name}: wal_status {}, {}, {} behind",
        status.as_deref().unwrap_or("unknown"),
        if active { "in use" } else { "idle" },
        lag.as_deref().unwrap_or("?")
    );
    if let Some(f) = failover {
        text.push_str(&format!(", failover {f}"));
    }
    if synced.as_deref() == Some("true") {
        text.push_str(", synced from the primary");
    }
    Ok(if status.as_deref() == Some("lost") {
        problem(format!(
            "{text}: invalidated; on_slot_lost = \"{}\" decides at start (\"recreate\" makes a \
             new one, or drop it: SELECT pg_drop_replication_slot('{name}'))",
            config.logical.on_slot_lost
        ))
    } else {
        ok(text)
    })
}

/// PostgreSQL 17+: what a failover slot needs on a primary and on a standby.
async fn failover(
    sql: &Client,
    config: &SourceConfig,
    standby: bool,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let mut findings = Vec::new();
    if !standby {
        let standby_slots = setting(sql, "synchronized_standby_slots").await?;
        if !config.logical.failover {
            findings.push(ok(
                "source.logical.failover = false: the slot stays on this server; a promoted \
                 standby has none (set it to true to keep a copy on standbys)",
            ));
        } else if standby_slots.is_empty() {
            findings.push(warning(
                "synchronized_standby_slots is empty: the relay may receive (and publish) \
                 changes a standby has not received yet, which a promotion then loses from \
                 the database but not from Kafka; name the standbys' physical slots: \
                 ALTER SYSTEM SET synchronized_standby_slots = '<slot>'; SELECT pg_reload_conf()",
            ));
        } else {
            findings.push(ok(format!(
                "synchronized_standby_slots = {standby_slots}: changes reach the relay only \
                 after those standbys have them"
            )));
        }
        return Ok(findings);
    }
    let sync = setting(sql, "sync_replication_slots").await?;
    let feedback = setting(sql, "hot_standby_feedback").await?;
    let primary_slot = setting(sql, "primary_slot_name").await?;
    if sync != "on" {
        findings.push(warning(
            "sync_replication_slots = off: this standby keeps no copy of failover slots; \
             ALTER SYSTEM SET sync_replication_slots = on (with hot_standby_feedback = on, \
             primary_slot_name and dbname in primary_conninfo), then SELECT pg_reload_conf()",
        ));
    } else if feedback != "on" || primary_slot.is_empty() {
        findings.push(problem(format!(
            "sync_replication_slots = on needs hot_standby_feedback = on (is {feedback}) and \
             primary_slot_name (is {:?}): set both",
            primary_slot
        )));
    } else {
        findings.push(ok(format!(
            "sync_replication_slots = on, hot_standby_feedback = on, primary_slot_name = \
             {primary_slot}: failover slots are copied here"
        )));
    }
    Ok(findings)
}
