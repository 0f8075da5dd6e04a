//! `source.dead_letter_table`: where the body of an event too large even for the
//! dead-letter topic is kept. The relay makes the table at start when it is missing and
//! the role may (as it makes its own state tables), so an upgrade from a version
//! without it needs no step; `check` only looks.

use tokio_postgres::Client;

use super::{OutboxEvent, SourceError, TableName};

/// The shipped definition, the one `setup` prints: the relay creates the same table.
const SHIPPED: &str = include_str!("../../sql/004_dead_letter.sql");
const SHIPPED_NAME: &str = "public.outbox_relay_dead_letter";
/// Serialises two relays creating the table at once (the state tables' lock class,
/// another key).
const CREATE_LOCK: (i32, i32) = (0x6f75_7472, 1);

/// What the database has under the configured name.
enum Found {
    Writable,
    NotWritable,
    Missing,
}

async fn look(client: &Client, table: &TableName) -> Result<Found, SourceError> {
    let allowed: Option<bool> = client
        .query_one(
            "SELECT has_table_privilege(to_regclass($1), 'INSERT')",
            &[&table.quoted()],
        )
        .await
        .map_err(SourceError::pg("looking up the dead-letter table"))?
        .get(0);
    Ok(match allowed {
        Some(true) => Found::Writable,
        Some(false) => Found::NotWritable,
        None => Found::Missing,
    })
}

fn not_writable(table: &TableName) -> SourceError {
    SourceError::Setup(format!(
        "this role may not INSERT into the dead-letter table {table} (source.dead_letter_table): \
         GRANT INSERT ON {} TO <relay role>",
        table.quoted()
    ))
}

fn missing(table: &TableName, why: &str) -> SourceError {
    SourceError::Setup(format!(
        "dead-letter table {table} does not exist (source.dead_letter_table) and {why}: create it \
         with sql/004_dead_letter.sql (or `outbox-relay setup --apply`), or set \
         source.dead_letter_table = \"\" to do without (an event too large even for the \
         dead-letter topic then stops the relay)"
    ))
}

/// `CREATE TABLE IF NOT EXISTS` of the shipped file under the configured name, without
/// its GRANT (the relay's role creates it, so owns it).
fn ddl(table: &TableName) -> String {
    let create: String = SHIPPED
        .lines()
        .filter(|l| !l.starts_with("--") && !l.starts_with("GRANT"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        create.contains(SHIPPED_NAME),
        "sql/004_dead_letter.sql names {SHIPPED_NAME}"
    );
    create.replace(SHIPPED_NAME, &table.quoted())
}

/// For `run`: the table exists and takes this role's inserts, made here when it is
/// missing and the role may create it (logged), so that an event too large for every
/// topic finds its place when it comes.
pub async fn ensure(client: &Client, table: &TableName) -> Result<(), SourceError> {
    match look(client, table).await? {
        Found::Writable => return Ok(()),
        Found::NotWritable => return Err(not_writable(table)),
        Found::Missing => {}
    }
    let (class, key) = CREATE_LOCK;
    let created = client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({class}, {key}); {} COMMIT",
            ddl(table)
        ))
        .await;
    if let Err(e) = created {
        // The failed transaction must not linger on the shared connection.
        let _ = client.batch_execute("ROLLBACK").await;
        let why = match e.code().map(|c| c.code()) {
            Some("42501") => format!("this role may not create it in schema {}", table.schema),
            Some("3F000") => format!("schema {} does not exist", table.schema),
            Some("25006") => "this server is read-only (a standby)".to_owned(),
            _ => {
                return Err(SourceError::Postgres {
                    context: "creating the dead-letter table",
                    source: e,
                })
            }
        };
        return Err(missing(table, &why));
    }
    tracing::info!(
        table = %table,
        "created the dead-letter table (source.dead_letter_table; sql/004_dead_letter.sql): \
         it was missing, as after an upgrade from a version without it"
    );
    match look(client, table).await? {
        Found::Writable => Ok(()),
        _ => Err(not_writable(table)),
    }
}

/// For `check`: what `run` will find or do, creating nothing.
pub async fn check(client: &Client, table: &TableName) -> Result<&'static str, SourceError> {
    match look(client, table).await? {
        Found::Writable => Ok("writable"),
        Found::NotWritable => Err(not_writable(table)),
        Found::Missing => {
            let may_create: bool = client
                .query_one(
                    "SELECT coalesce(has_schema_privilege(to_regnamespace($1)::oid, 'CREATE'), false) \
                     AND NOT pg_is_in_recovery()",
                    &[&crate::source::quote_ident(&table.schema)],
                )
                .await
                .map_err(SourceError::pg("looking up the dead-letter table's schema"))?
                .get(0);
            if may_create {
                Ok("missing: the relay creates it at start")
            } else {
                Err(missing(table, "this role may not create it"))
            }
        }
    }
}

/// Keeps the bodies of events the dead-letter topic took only as metadata (too large
/// for it), with what identifies them: called before those events are acknowledged.
pub async fn keep_dead_letters(
    client: &Client,
    table: Option<&TableName>,
    events: &[(&OutboxEvent, &str)],
) -> Result<(), SourceError> {
    if events.is_empty() {
        return Ok(());
    }
    let Some(table) = table else {
        return Err(SourceError::Setup(
            "an event too large even for the dead-letter topic has nowhere to be kept: set \
             source.dead_letter_table (sql/004_dead_letter.sql) or raise the dead-letter topic's \
             max.message.bytes"
                .into(),
        ));
    };
    let insert = format!(
        "INSERT INTO {} (source_position, event_id, aggregate_type, aggregate_id, event_type, \
         headers, error, body) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        table.quoted()
    );
    for (event, error) in events {
        let body = event.original.as_deref().or(event.payload.as_deref());
        client
            .execute(
                &insert,
                &[
                    &event.position.to_string(),
                    &event.id.as_deref(),
                    &event.aggregate_type.as_deref(),
                    &event.aggregate_id.as_deref(),
                    &event.event_type.as_deref(),
                    &event.headers.as_deref(),
                    error,
                    &body,
                ],
            )
            .await
            .map_err(SourceError::pg("keeping a dead letter's body"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_the_shipped_one_under_the_configured_name_without_the_grant() {
        let sql = ddl(&TableName::parse("audit.Dead Letters").unwrap());
        assert!(
            sql.contains("CREATE TABLE IF NOT EXISTS \"audit\".\"Dead Letters\" ("),
            "{sql}"
        );
        assert!(!sql.contains(SHIPPED_NAME), "{sql}");
        assert!(!sql.contains("GRANT"), "{sql}");
        for column in ["source_position", "event_id", "error", "body"] {
            assert!(sql.contains(column), "{column} in {sql}");
        }
    }
}
