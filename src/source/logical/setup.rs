//! What log mode needs from the database before it can stream: `wal_level = logical`
//! and a publication that carries the outbox.

use tokio_postgres::Client;

use super::commands::{ServerVersion, FAILOVER_SINCE, MESSAGES_SINCE, OLDEST_SUPPORTED};
use super::publish::{check_row_changes, publish_for};
use crate::source::{quote_ident, SourceConfig, SourceError, TableName};

/// The server's `server_version_num`.
pub async fn server_version(sql: &Client) -> Result<ServerVersion, SourceError> {
    let num: String = sql
        .query_one("SHOW server_version_num", &[])
        .await
        .map_err(SourceError::pg("reading server_version_num"))?
        .get(0);
    num.parse()
        .map(ServerVersion)
        .map_err(|_| SourceError::Setup(format!("server_version_num {num:?} is not a number")))
}

/// Log mode runs on PostgreSQL 13 and later; a table-less outbox (logical decoding
/// messages) needs 14, whose pgoutput sends messages.
pub fn require_supported(server: ServerVersion, config: &SourceConfig) -> Result<(), SourceError> {
    if server.0 < OLDEST_SUPPORTED {
        return Err(SourceError::Setup(format!(
            "PostgreSQL {server} is older than 13, the oldest the relay supports: upgrade it"
        )));
    }
    if config.table.is_none() && server.0 < MESSAGES_SINCE {
        return Err(SourceError::Setup(format!(
            "a table-less outbox (source.table = \"\", pg_logical_emit_message) needs \
             PostgreSQL 14 or later, whose pgoutput sends logical decoding messages; this \
             server is {server}: use an outbox table (source.table), or upgrade"
        )));
    }
    if config.logical.shards > 1 && server.0 < ROW_FILTERS_SINCE {
        return Err(SourceError::Setup(format!(
            "source.logical.shards = {} needs PostgreSQL 15 or later, whose publications have \
             row filters (each shard's publication carries the aggregates of its hash); this \
             server is {server}: set shards = 1, or upgrade",
            config.logical.shards
        )));
    }
    if config.logical.failover && server.0 < FAILOVER_SINCE {
        return Err(SourceError::Setup(format!(
            "source.logical.failover = true needs PostgreSQL 17 or later, which has failover \
             slots; this server is {server}: set it to false, or upgrade"
        )));
    }
    Ok(())
}

/// The first major whose publications have row filters, which shards are made of.
const ROW_FILTERS_SINCE: u32 = 150000;

/// The row filter of a shard's publication, which is also the WHERE of its first-start
/// snapshot and repair: the rows whose aggregate id hashes to this shard. `None` for an
/// unsharded outbox.
///
/// The hash is the type's own built-in hash function, the only kind PostgreSQL allows in a
/// row filter (no casts through text, which are not immutable for every type); a NULL
/// aggregate id goes to shard 0, never to no shard. `& 2147483647` rather than `abs()`,
/// which fails on the lowest integer.
pub async fn shard_filter(
    sql: &Client,
    config: &SourceConfig,
) -> Result<Option<String>, SourceError> {
    let (Some(shard), Some(t)) = (config.logical.shard, &config.table) else {
        return Ok(None);
    };
    let column = &config.columns.aggregate_id;
    let ty: Option<String> = sql
        .query_opt(
            "SELECT format_type(a.atttypid, NULL) FROM pg_attribute a \
             WHERE a.attrelid = $1::text::regclass AND a.attname = $2 AND NOT a.attisdropped",
            &[&t.quoted(), column],
        )
        .await
        .map_err(SourceError::pg("reading the aggregate id column's type"))?
        .map(|r| r.get(0));
    let col = quote_ident(column);
    let hash = match ty.as_deref() {
        Some("text" | "character varying" | "character") => format!("hashtext({col})"),
        Some("uuid") => format!("uuid_hash({col})"),
        Some("bigint") => format!("hashint8({col})"),
        Some("integer" | "smallint") => format!("hashint4({col})"),
        other => {
            return Err(SourceError::Setup(format!(
                "source.logical.shards splits the outbox by a hash of {t}.{column}, whose type \
                 ({}) has no hash function PostgreSQL allows in a publication's row filter: \
                 use a text, varchar, uuid, bigint or integer aggregate id, or shards = 1",
                other.unwrap_or("missing")
            )))
        }
    };
    Ok(Some(format!(
        "(COALESCE({hash}, 0) & 2147483647) % {} = {}",
        shard.count, shard.index
    )))
}

/// Whether a row filter the server shows is `expected`: it gives it back with its own
/// parentheses, casts, quoting and spacing.
pub(super) fn same_filter(found: &str, expected: &str) -> bool {
    normalized_filter(found) == normalized_filter(expected)
}

fn normalized_filter(filter: &str) -> String {
    filter
        .to_lowercase()
        .replace("::text", "")
        .replace("::integer", "")
        .chars()
        .filter(|c| !c.is_whitespace() && !matches!(c, '(' | ')' | '"'))
        .collect()
}

/// A shard's publication must filter exactly its aggregates: without the filter (or with
/// another shard count's) an aggregate would reach two shards, and its events two
/// streams whose order nothing keeps.
async fn require_shard_filter(
    sql: &Client,
    config: &SourceConfig,
    expected: Option<&str>,
) -> Result<(), SourceError> {
    let (Some(shard), Some(t), Some(expected)) = (config.logical.shard, &config.table, expected)
    else {
        return Ok(());
    };
    let name = &config.logical.publication;
    let found: Option<String> = sql
        .query_opt(
            "SELECT rowfilter FROM pg_publication_tables \
             WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[name, &t.schema, &t.name],
        )
        .await
        .map_err(SourceError::pg("reading the publication's row filter"))?
        .and_then(|r| r.get(0));
    if found.as_deref().is_some_and(|f| same_filter(f, expected)) {
        return Ok(());
    }
    Err(SourceError::Setup(format!(
        "publication {name} is shard {} of {} but its row filter on {t} is {}, not WHERE \
         ({expected}): its slot would receive other shards' aggregates, whose order across \
         two streams nothing keeps. Drop it (DROP PUBLICATION {name}; the relay creates it) \
         or ALTER PUBLICATION {name} SET TABLE {} WHERE ({expected})",
        shard.index,
        shard.count,
        found.map_or("none".to_owned(), |f| format!("WHERE {f}")),
        t.quoted()
    )))
}

/// The first major that decodes on a hot standby.
const STANDBY_DECODING_SINCE: u32 = 160000;

/// Whether the server is a hot standby, and if so whether the relay can tail it as
/// configured: decoding there needs 16+, `hot_standby_feedback` (or the primary vacuums
/// away catalog rows the slot needs, which invalidates it), and no writes (`cleanup`,
/// failover slots, which are the primary's).
pub async fn require_standby_ready(
    sql: &Client,
    server: ServerVersion,
    config: &SourceConfig,
) -> Result<bool, SourceError> {
    let row = sql
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('hot_standby_feedback')",
            &[],
        )
        .await
        .map_err(SourceError::pg("asking whether the server is a standby"))?;
    let (standby, feedback): (bool, String) = (row.get(0), row.get(1));
    if !standby {
        return Ok(false);
    }
    let refuse = |why: String| {
        Err(SourceError::Setup(format!(
            "this server is a standby: {why}"
        )))
    };
    if server.0 < STANDBY_DECODING_SINCE {
        return refuse(format!(
            "PostgreSQL {server} decodes only on a primary (16 and later decode on a standby);              point source.database_url at the primary, or add target_session_attrs=read-write              to a multi-host URL"
        ));
    }
    if config.logical.cleanup {
        return refuse(
            "source.logical.cleanup = true deletes rows, which a standby cannot: set it to              false here, or point source.database_url at the primary"
                .into(),
        );
    }
    if config.logical.failover {
        return refuse(
            "source.logical.failover makes a failover slot, which only a primary has: set it              to false to tail this standby"
                .into(),
        );
    }
    if feedback != "on" {
        return refuse(
            "hot_standby_feedback is off, so the primary may vacuum away catalog rows the slot              needs and the standby then invalidates it: ALTER SYSTEM SET hot_standby_feedback              = on; SELECT pg_reload_conf() on the standby (and give it a physical slot on the              primary, primary_slot_name)"
                .into(),
        );
    }
    Ok(true)
}

/// Log mode needs `wal_level = logical`; says how to get it otherwise.
pub async fn require_logical_wal(sql: &Client) -> Result<(), SourceError> {
    let wal_level: String = sql
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(SourceError::pg("reading wal_level"))?
        .get(0);
    if wal_level != "logical" {
        return Err(SourceError::Setup(format!(
            "wal_level is {wal_level:?}: log mode needs wal_level = logical in postgresql.conf \
             (then restart PostgreSQL), or use source.mode = \"polling\""
        )));
    }
    Ok(())
}

/// Checks that the publication exists and carries exactly what the relay expects,
/// without changing anything (`check` uses it as is); `Ok(false)` when it does not exist.
///
/// "Exactly" matters: every insert the publication sends must be an outbox row, or the
/// relay would have to skip rows it does not understand. So it must carry the outbox
/// (through its root when partitioned, so partitions' rows arrive as the outbox's), and
/// no other table: not `FOR ALL TABLES`, not a second table beside the outbox.
/// `ours` is the outbox and its partitions ([`outbox_relations`]; empty when table-less);
/// `filter` the shard's row filter ([`shard_filter`]; `None` unsharded).
pub async fn publication_ready(
    sql: &Client,
    config: &SourceConfig,
    ours: &[(String, String)],
    filter: Option<&str>,
) -> Result<bool, SourceError> {
    let name = &config.logical.publication;
    let table = config.table.as_ref().map(|t| t.quoted());
    // Compared by name: casting every published name to regclass can trip over
    // schemas the role may not see.
    let (schemas, names): (Vec<String>, Vec<String>) = ours.iter().cloned().unzip();
    // Listed by name too: a `FOR TABLES IN SCHEMA` publication (15+) has no row per table.
    let (schema, relname) = config
        .table
        .as_ref()
        .map(|t| (t.schema.clone(), t.name.clone()))
        .unwrap_or_default();
    let row = sql
        .query_opt(
            "SELECT p.puballtables, p.pubinsert, p.pubviaroot, \
               EXISTS (SELECT 1 FROM pg_publication_rel r \
                       WHERE r.prpubid = p.oid AND r.prrelid = $2::text::regclass) \
               OR EXISTS (SELECT 1 FROM pg_publication_tables t WHERE t.pubname = p.pubname \
                          AND t.schemaname = $5 AND t.tablename = $6), \
               COALESCE((SELECT c.relkind = 'p' FROM pg_class c WHERE c.oid = $2::text::regclass), false), \
               ARRAY(SELECT format('%I.%I', schemaname, tablename) FROM pg_publication_tables \
                     WHERE pubname = p.pubname \
                       AND NOT EXISTS (SELECT 1 FROM unnest($3::text[], $4::text[]) o(s, n) \
                                       WHERE o.s = schemaname AND o.n = tablename)) \
             FROM pg_publication p WHERE p.pubname = $1",
            &[name, &table, &schemas, &names, &schema, &relname],
        )
        .await
        .map_err(SourceError::pg("looking up the publication"))?;
    let Some(row) = row else {
        return Ok(false);
    };
    let (all_tables, inserts, via_root, has_table, partitioned, others): (
        bool,
        bool,
        bool,
        bool,
        bool,
        Vec<String>,
    ) = (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
    );
    let own = |t: &str| {
        format!(
            "CREATE PUBLICATION <name> FOR TABLE {t} WITH (publish = 'insert', publish_via_partition_root = true) \
             and set source.logical.publication to it"
        )
    };
    let target = table.as_deref().unwrap_or("<no table: table-less outbox>");
    if all_tables {
        return Err(SourceError::Setup(format!(
            "publication {name} is FOR ALL TABLES: the relay would receive every table's inserts \
             and can map only the outbox's; give it a publication of its own: {}",
            own(target)
        )));
    }
    if !others.is_empty() {
        return Err(SourceError::Setup(format!(
            "publication {name} also publishes {}: the relay can map only the outbox's rows; \
             ALTER PUBLICATION {name} DROP TABLE {}, or {}",
            others.join(", "),
            others.join(", "),
            own(target)
        )));
    }
    if let Some(t) = &config.table {
        if !has_table {
            return Err(SourceError::Setup(format!(
                "publication {name} does not publish {t}: ALTER PUBLICATION {name} ADD TABLE {}",
                t.quoted()
            )));
        }
        if !inserts {
            return Err(SourceError::Setup(format!(
                "publication {name} does not publish inserts: \
                 ALTER PUBLICATION {name} SET (publish = 'insert')"
            )));
        }
        if partitioned && !via_root {
            return Err(SourceError::Setup(format!(
                "{t} is partitioned and publication {name} publishes its partitions under \
                 their own names: ALTER PUBLICATION {name} SET (publish_via_partition_root = true)"
            )));
        }
        require_shard_filter(sql, config, filter).await?;
    }
    Ok(true)
}

/// The outbox and, when it is partitioned, every partition of it (and intermediate
/// partitioned tables): the relations whose inserts are outbox rows.
pub async fn outbox_relations(
    sql: &Client,
    table: &TableName,
) -> Result<Vec<(String, String)>, SourceError> {
    let rows = sql
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = $1::text::regclass \
                OR c.oid IN (SELECT relid FROM pg_partition_tree($1::text::regclass))",
            &[&table.quoted()],
        )
        .await
        .map_err(SourceError::pg("listing the outbox's partitions"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Creates the publication when it is missing and allowed (never for a slot with
/// history: see [`super::carriage`]); checks it covers the table, and says whether row
/// changes can be seen.
pub(super) async fn ensure_publication(
    sql: &Client,
    config: &SourceConfig,
    ours: &[(String, String)],
    filter: Option<&str>,
    server: ServerVersion,
    history: Option<&crate::source::state::SlotMemory>,
) -> Result<(), SourceError> {
    if publication_ready(sql, config, ours, filter).await? {
        return check_row_changes(sql, config, server).await;
    }
    let name = &config.logical.publication;
    if let Some(m) = history {
        let table = config.table_label();
        return Err(SourceError::Setup(format!(
            "publication {name} does not exist, but replication slot {slot} has streamed from              it (since {first}; last checked {checked}): rows committed while it was missing              were skipped by the server, so the relay does not create it silently. Create it              again: CREATE PUBLICATION {name} FOR TABLE {table} WITH (publish = 'insert,              update, delete', publish_via_partition_root = true); the next start publishes the              rows written since {checked} from the table first (duplicates possible, none lost)",
            slot = config.logical.slot,
            first = m.first_started_at,
            checked = m.vouched_at,
        )));
    }
    if !config.logical.create_if_missing {
        return Err(missing_publication(name));
    }
    // Via the root: a partitioned outbox's rows then arrive as the outbox's own.
    let mut target = table_clause(config.table.as_ref());
    if let Some(filter) = filter {
        target.push_str(&format!(" WHERE ({filter})"));
    }
    let options = match &config.table {
        Some(t) => format!(
            "publish = '{}', publish_via_partition_root = true",
            publish_for(sql, t, config, server).await?
        ),
        None => "publish = 'insert'".to_owned(),
    };
    let created = sql
        .batch_execute(&format!(
            "CREATE PUBLICATION {} {target} WITH ({options})",
            quote_ident(name)
        ))
        .await;
    if let Err(e) = &created {
        // Another relay starting at the same moment made it first (23505 on the catalog's
        // unique index, or 42710): theirs is checked like one found at start.
        if matches!(e.code().map(|c| c.code()), Some("23505" | "42710"))
            && publication_ready(sql, config, ours, filter).await?
        {
            tracing::info!(publication = %name, "another relay created the publication first");
            return check_row_changes(sql, config, server).await;
        }
    }
    created.map_err(|e| match e.code().map(|c| c.code()) {
        Some("25006") => SourceError::Setup(format!(
            "publication {name} does not exist, and this server is a standby, where nothing \
             can be created: create it on the primary (sql/002_publication.sql); it reaches \
             the standby with the WAL"
        )),
        Some("42501") => SourceError::Setup(format!(
            "may not create publication {name}: create it as the table's owner \
             (sql/002_publication.sql) or grant this role ownership of the table"
        )),
        _ => SourceError::Postgres {
            context: "creating the publication",
            source: e,
        },
    })?;
    tracing::info!(publication = %name, %options, "created the publication");
    check_row_changes(sql, config, server).await
}

/// The error for a publication that is missing and may not be created.
pub fn missing_publication(name: &str) -> SourceError {
    SourceError::Setup(format!(
        "publication {name} does not exist and source.logical.create_if_missing = false: \
         CREATE PUBLICATION {name} FOR TABLE <outbox> WITH (publish = 'insert', publish_via_partition_root = true) \
         (see sql/002_publication.sql)"
    ))
}

fn table_clause(table: Option<&TableName>) -> String {
    table.map_or_else(String::new, |t| format!("FOR TABLE {}", t.quoted()))
}
