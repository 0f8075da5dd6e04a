//! What log mode's publication publishes: inserts, and updates and deletes where the
//! outbox's replica identity lets the server send them; and what the relay says at start
//! when the publication does not carry them.

use tokio_postgres::Client;

use super::commands::ServerVersion;
use crate::source::{quote_ident, SourceConfig, SourceError, TableName};

/// What a new publication publishes: inserts, and updates and deletes where the table's
/// replica identity lets the server send them (without one, PostgreSQL would refuse the
/// application's UPDATEs and DELETEs on a table whose publication publishes them).
pub(super) async fn publish_for(
    sql: &Client,
    table: &TableName,
    config: &SourceConfig,
    server: ServerVersion,
) -> Result<&'static str, SourceError> {
    if config.logical.shard.is_some() && !has_replica_identity(sql, table, true).await? {
        // A row filter's columns must be in the replica identity of a publication that
        // publishes updates or deletes, or PostgreSQL refuses the application's UPDATEs and
        // the cleanup's DELETEs of outbox rows.
        tracing::info!(
            table = %table,
            "sharded: the shards' publications carry inserts only, so an UPDATE or DELETE of \
             an outbox row goes unseen (row filters need the whole row as replica identity to \
             publish them: ALTER TABLE … REPLICA IDENTITY FULL before the first start)"
        );
        return Ok("insert");
    }
    if !has_replica_identity(sql, table, false).await? {
        tracing::warn!(
            table = %table,
            "the outbox has no replica identity (no primary key, REPLICA IDENTITY NOTHING): \
             the publication carries inserts only, so an UPDATE or DELETE of an outbox row \
             goes unseen; add a primary key or ALTER TABLE … REPLICA IDENTITY FULL"
        );
        return Ok("insert");
    }
    Ok(row_changes(config, server))
}

/// Everything a publication with the needed replica identity publishes. 13 gets no
/// deletes when cleanup is on: its pgoutput sends no logical messages, so the relay could
/// not tell its own cleanup from a row change.
fn row_changes(config: &SourceConfig, server: ServerVersion) -> &'static str {
    if config.logical.cleanup && !server.has_messages() {
        "insert, update"
    } else {
        "insert, update, delete"
    }
}

/// Whether the server can send the old key of an UPDATE or DELETE of `table` (with
/// `whole_row`, the whole old row, which a sharded publication's row filter needs).
async fn has_replica_identity(
    sql: &Client,
    table: &TableName,
    whole_row: bool,
) -> Result<bool, SourceError> {
    let row = sql
        .query_one(
            "SELECT c.relreplident, EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid \
               AND (i.indisprimary OR i.indisreplident)) \
             FROM pg_class c WHERE c.oid = $1::text::regclass",
            &[&table.quoted()],
        )
        .await
        .map_err(SourceError::pg("reading the outbox's replica identity"))?;
    let (identity, index): (i8, bool) = (row.get(0), row.get(1));
    Ok(match identity as u8 {
        b'f' => true,
        b'd' | b'i' => index && !whole_row,
        _ => false,
    })
}

/// Says at start what the publication lets the relay see of row changes.
pub(super) async fn check_row_changes(
    sql: &Client,
    config: &SourceConfig,
    server: ServerVersion,
) -> Result<(), SourceError> {
    let Some(table) = &config.table else {
        return Ok(());
    };
    let name = &config.logical.publication;
    let Some(row) = sql
        .query_opt(
            "SELECT pubupdate, pubdelete FROM pg_publication WHERE pubname = $1",
            &[name],
        )
        .await
        .map_err(SourceError::pg("reading what the publication publishes"))?
    else {
        return Ok(());
    };
    let (updates, deletes): (bool, bool) = (row.get(0), row.get(1));
    if deletes && config.logical.cleanup && !server.has_messages() {
        tracing::warn!(
            publication = %name,
            "on PostgreSQL {server} the relay cannot tell its own cleanup deletes from other \
             deletes (13 sends no logical messages): DELETEs of outbox rows are not checked \
             (UPDATEs are)"
        );
    }
    if !updates || (!deletes && (server.has_messages() || !config.logical.cleanup)) {
        let sharded = config.logical.shard.is_some();
        let publish = row_changes(config, server);
        let identity = has_replica_identity(sql, table, sharded).await?;
        let fix = row_change_fix(name, table, publish, identity, sharded);
        tracing::warn!(
            publication = %name,
            updates,
            deletes,
            "the publication does not carry every UPDATE and DELETE of outbox rows, so such a \
             change goes unseen (rows are immutable once written; source.on_row_change applies \
             to what is seen): {fix}"
        );
    }
    Ok(())
}

/// What makes a publication carry `publish`: the table's replica identity first when it
/// lacks the one PostgreSQL needs (publishing updates and deletes without it would make
/// the server refuse the application's UPDATEs and DELETEs of outbox rows).
fn row_change_fix(
    publication: &str,
    table: &TableName,
    publish: &str,
    identity: bool,
    sharded: bool,
) -> String {
    let first = match (identity, sharded) {
        (true, _) => String::new(),
        (false, true) => format!(
            "ALTER TABLE {} REPLICA IDENTITY FULL (a shard's row filter needs the whole old \
             row), then ",
            table.quoted()
        ),
        (false, false) => format!(
            "give {} a primary key (or ALTER TABLE … REPLICA IDENTITY FULL), then ",
            table.quoted()
        ),
    };
    format!(
        "{first}ALTER PUBLICATION {} SET (publish = '{publish}')",
        quote_ident(publication)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_row_change_fix_is_statements_in_the_order_they_can_run() {
        let table = TableName {
            schema: "public".into(),
            name: "outbox".into(),
        };
        let set = "ALTER PUBLICATION \"p\" SET (publish = 'insert, update, delete')";
        let fix = |identity, sharded| {
            row_change_fix("p", &table, "insert, update, delete", identity, sharded)
        };
        assert_eq!(fix(true, false), set);
        assert_eq!(fix(true, true), set);
        assert_eq!(
            fix(false, true),
            format!(
                "ALTER TABLE \"public\".\"outbox\" REPLICA IDENTITY FULL (a shard's row filter \
                 needs the whole old row), then {set}"
            )
        );
        assert_eq!(
            fix(false, false),
            format!(
                "give \"public\".\"outbox\" a primary key (or ALTER TABLE … REPLICA IDENTITY \
                 FULL), then {set}"
            )
        );
    }
}
