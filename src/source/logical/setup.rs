//! What log mode needs from the database before it can stream: `wal_level = logical`
//! and a publication that carries the outbox.

use tokio_postgres::Client;

use crate::source::{quote_ident, SourceConfig, SourceError, TableName};

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

/// Checks that the publication exists and carries the outbox table, without changing
/// anything (`check` uses it as is); `Ok(false)` when it does not exist.
pub async fn publication_ready(sql: &Client, config: &SourceConfig) -> Result<bool, SourceError> {
    let name = &config.logical.publication;
    let (schema, table) = config
        .table
        .as_ref()
        .map(|t| (t.schema.clone(), t.name.clone()))
        .unwrap_or_default();
    let row = sql
        .query_opt(
            "SELECT p.puballtables, \
               EXISTS (SELECT 1 FROM pg_publication_tables t WHERE t.pubname = p.pubname \
                       AND t.schemaname = $2 AND t.tablename = $3) \
             FROM pg_publication p WHERE p.pubname = $1",
            &[name, &schema, &table],
        )
        .await
        .map_err(SourceError::pg("looking up the publication"))?;
    let Some(row) = row else {
        return Ok(false);
    };
    if let Some(t) = &config.table {
        let (all, has): (bool, bool) = (row.get(0), row.get(1));
        if !all && !has {
            return Err(SourceError::Setup(format!(
                "publication {name} does not publish {t}: ALTER PUBLICATION {name} ADD TABLE {}",
                t.quoted()
            )));
        }
    }
    Ok(true)
}

/// Creates the publication when it is missing and allowed; checks it covers the table.
pub(super) async fn ensure_publication(
    sql: &Client,
    config: &SourceConfig,
) -> Result<(), SourceError> {
    if publication_ready(sql, config).await? {
        return Ok(());
    }
    let name = &config.logical.publication;
    if !config.logical.create_if_missing {
        return Err(missing_publication(name));
    }
    let target = table_clause(config.table.as_ref());
    sql.batch_execute(&format!(
        "CREATE PUBLICATION {} {target} WITH (publish = 'insert')",
        quote_ident(name)
    ))
    .await
    .map_err(|e| match e.code().map(|c| c.code()) {
        Some("42501") => SourceError::Setup(format!(
            "may not create publication {name}: create it as the table's owner \
             (sql/002_publication.sql) or grant this role ownership of the table"
        )),
        _ => SourceError::Postgres {
            context: "creating the publication",
            source: e,
        },
    })?;
    tracing::info!(publication = %name, "created the publication");
    Ok(())
}

/// The error for a publication that is missing and may not be created.
pub fn missing_publication(name: &str) -> SourceError {
    SourceError::Setup(format!(
        "publication {name} does not exist and source.logical.create_if_missing = false: \
         CREATE PUBLICATION {name} FOR TABLE <outbox> WITH (publish = 'insert') (see sql/002_publication.sql)"
    ))
}

fn table_clause(table: Option<&TableName>) -> String {
    table.map_or_else(String::new, |t| format!("FOR TABLE {}", t.quoted()))
}
