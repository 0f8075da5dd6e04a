//! The relay's own state in PostgreSQL: relay-owned, versioned tables next to the data
//! (`sql/005_relay_state.sql`, in `source.state_schema`).
//!
//! What lives here outlives a process: a new pod, a standby that takes over and a
//! restarted relay read the same rows. Today that is the slot memory (log mode): which
//! slots the relay has had, and the last point at which it vouched that the publication
//! carried the outbox. The tables carry a schema version; the relay creates and migrates
//! them, and refuses to start on tables of a newer version, so a rolling upgrade never
//! runs an old relay on new state.
//!
//! On a hot standby nothing can be written: the relay reads what the primary's relay
//! wrote (it arrives with the WAL) and keeps the rest in memory for the process.

use tokio_postgres::Client;

use super::{quote_ident, SourceError};

/// The version of the tables this relay writes and understands.
/// 2: dead letters, parked aggregates, operator requests and the pause
/// (`sql/006_parking.sql`).
pub const STATE_VERSION: i32 = 2;

/// First key of the advisory lock taken while creating or migrating (`'outr'`).
const MIGRATION_LOCK_CLASS: i32 = 0x6f75_7472;

/// The shipped SQL: the source of truth for the tables, for `setup` and the relay alike.
const DDL: [&str; 2] = [
    include_str!("../../sql/005_relay_state.sql"),
    include_str!("../../sql/006_parking.sql"),
];

/// The relay's tables as SQL, in `schema`.
pub fn ddl(schema: &str) -> String {
    DDL.concat().replace(
        "public.outbox_relay_",
        &format!("{}.outbox_relay_", quote_ident(schema)),
    )
}

/// Where the relay's tables are, once [`prepare`]d.
#[derive(Debug, Clone)]
pub struct State {
    schema: String,
    /// False on a hot standby: the tables are read, never written.
    writable: bool,
}

/// What the relay remembers of one slot.
#[derive(Debug, Clone)]
pub struct SlotMemory {
    pub first_started_at: String,
    pub carried_by: String,
    pub vouched_lsn: String,
    /// The oldest transaction still running when the relay last vouched (a 64-bit
    /// transaction id): rows written by it or later may be unpublished.
    pub vouched_xmin: i64,
    pub vouched_at: String,
    pub forgotten_at: Option<String>,
}

/// Maps a query error on the relay's tables: a missing privilege gets its GRANT.
pub(crate) fn failed<'a>(
    schema: &'a str,
    context: &'static str,
) -> impl FnOnce(tokio_postgres::Error) -> SourceError + 'a {
    move |e| match e.code().map(|c| c.code()) {
        Some("42501") => SourceError::Setup(format!(
            "this role may not use the relay's own tables in schema {schema} \
             (source.state_schema; {context}): GRANT SELECT, INSERT, UPDATE ON \
             {s}.outbox_relay_schema, {s}.outbox_relay_slots and SELECT, INSERT, UPDATE, \
             DELETE ON {s}.outbox_relay_dlq, {s}.outbox_relay_requests, \
             {s}.outbox_relay_control TO <relay role> (as in sql/005_relay_state.sql and \
             sql/006_parking.sql)",
            s = quote_ident(schema)
        )),
        _ => SourceError::Postgres { context, source: e },
    }
}

impl State {
    /// A relay table's qualified name.
    pub(crate) fn table(&self, name: &str) -> String {
        format!("{}.{name}", quote_ident(&self.schema))
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The slot's memory, if the relay ever had this slot.
    pub async fn recall(
        &self,
        sql: &Client,
        slot: &str,
    ) -> Result<Option<SlotMemory>, SourceError> {
        let row = sql
            .query_opt(
                &format!(
                    "SELECT first_started_at::text, carried_by, vouched_lsn::text, vouched_xmin, \
                            vouched_at::text, forgotten_at::text \
                     FROM {} WHERE slot_name = $1",
                    self.table("outbox_relay_slots")
                ),
                &[&slot],
            )
            .await
            .map_err(failed(&self.schema, "reading the relay's slot memory"))?;
        Ok(row.map(|r| SlotMemory {
            first_started_at: r.get(0),
            carried_by: r.get(1),
            vouched_lsn: r.get(2),
            vouched_xmin: r.get(3),
            vouched_at: r.get(4),
            forgotten_at: r.get(5),
        }))
    }

    /// Records that the relay has the slot (after a first start made it, or when it
    /// finds one it has no memory of), vouched at `lsn` with `xmin` (the first start's
    /// snapshot) or else the current snapshot's.
    pub async fn remember(
        &self,
        sql: &Client,
        slot: &str,
        publication: &str,
        carried_by: &str,
        lsn: &str,
        xmin: Option<i64>,
    ) -> Result<(), SourceError> {
        if !self.writable {
            return Ok(());
        }
        sql.execute(
            &format!(
                "INSERT INTO {} AS m (slot_name, publication, carried_by, vouched_lsn, vouched_xmin) \
                 VALUES ($1, $2, $3, $4::text::pg_lsn, \
                         COALESCE($5::int8, pg_snapshot_xmin(pg_current_snapshot())::text::int8)) \
                 ON CONFLICT (slot_name) DO UPDATE SET publication = EXCLUDED.publication, \
                   carried_by = EXCLUDED.carried_by, vouched_lsn = EXCLUDED.vouched_lsn, \
                   vouched_xmin = EXCLUDED.vouched_xmin, vouched_at = now(), \
                   first_started_at = CASE WHEN m.forgotten_at IS NULL THEN m.first_started_at ELSE now() END, \
                   forgotten_at = NULL",
                self.table("outbox_relay_slots")
            ),
            &[&slot, &publication, &carried_by, &lsn, &xmin],
        )
        .await
        .map_err(failed(&self.schema, "writing the relay's slot memory"))?;
        Ok(())
    }

    /// Moves the vouched point to `lsn`, with the current snapshot's oldest transaction.
    /// Asynchronous commit: losing the last vouch in a server crash only makes the next
    /// check look at a few more rows.
    pub async fn vouch(
        &self,
        sql: &Client,
        slot: &str,
        carried_by: &str,
        lsn: &str,
    ) -> Result<(), SourceError> {
        if !self.writable {
            return Ok(());
        }
        sql.execute(
            &format!(
                "UPDATE {} SET carried_by = $2, vouched_lsn = $3::text::pg_lsn, \
                   vouched_xmin = pg_snapshot_xmin(pg_current_snapshot())::text::int8, vouched_at = now() \
                 WHERE slot_name = $1 AND set_config('synchronous_commit', 'off', true) IS NOT NULL",
                self.table("outbox_relay_slots")
            ),
            &[&slot, &carried_by, &lsn],
        )
        .await
        .map_err(failed(&self.schema, "recording the vouched slot position"))?;
        Ok(())
    }

    /// Marks the slot as dropped on purpose (`outbox-relay slot forget`): the next start
    /// is a first start. False when the relay had no memory of it.
    pub async fn forget(&self, sql: &Client, slot: &str) -> Result<bool, SourceError> {
        let n = sql
            .execute(
                &format!(
                    "UPDATE {} SET forgotten_at = now() WHERE slot_name = $1 AND forgotten_at IS NULL",
                    self.table("outbox_relay_slots")
                ),
                &[&slot],
            )
            .await
            .map_err(failed(&self.schema, "forgetting the slot"))?;
        Ok(n > 0)
    }
}

/// The relay's tables in `schema` as they are, for reports (`check`): never creates or
/// migrates; `None` when they do not exist yet.
pub async fn peek(sql: &Client, schema: &str) -> Result<Option<(State, i32)>, SourceError> {
    let state = State {
        schema: schema.to_owned(),
        writable: false,
    };
    Ok(read_version(sql, &state).await?.map(|v| (state, v)))
}

/// Finds the relay's tables in `schema`, creating or migrating them when `writable`
/// (not a hot standby). Refuses tables of a newer version.
pub async fn prepare(sql: &Client, schema: &str, writable: bool) -> Result<State, SourceError> {
    let state = State {
        schema: schema.to_owned(),
        writable,
    };
    let version = read_version(sql, &state).await?;
    match version {
        Some(v) if v > STATE_VERSION => Err(SourceError::Setup(format!(
            "the relay's tables in schema {schema} (source.state_schema) are at version {v}, \
             written by a newer outbox-relay; this one understands version {STATE_VERSION} at \
             most, and never runs on newer state: run the newer relay (finish the upgrade, or \
             roll it back together with its tables)"
        ))),
        Some(v) if v == STATE_VERSION => Ok(state),
        _ if !writable => {
            tracing::warn!(
                schema,
                "the relay's tables (sql/005_relay_state.sql) are missing or older on this \
                 standby and cannot be created here: slot memory lasts only as long as this \
                 process; create them on the primary (outbox-relay setup --apply)"
            );
            Ok(State {
                writable: false,
                ..state
            })
        }
        found => {
            migrate(sql, &state, found).await?;
            Ok(state)
        }
    }
}

async fn read_version(sql: &Client, state: &State) -> Result<Option<i32>, SourceError> {
    let exists: bool = sql
        .query_one(
            "SELECT to_regclass(format('%I.outbox_relay_schema', $1::text)) IS NOT NULL",
            &[&state.schema],
        )
        .await
        .map_err(failed(&state.schema, "looking up the relay's tables"))?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let version: Option<i32> = sql
        .query_opt(
            &format!(
                "SELECT max(version) FROM {}",
                state.table("outbox_relay_schema")
            ),
            &[],
        )
        .await
        .map_err(failed(&state.schema, "reading the relay's table version"))?
        .and_then(|r| r.get(0));
    Ok(version.or(Some(0)))
}

/// Creates the tables (or brings older ones to [`STATE_VERSION`]) in one transaction,
/// under an advisory lock so that two relays starting together do not race.
async fn migrate(sql: &Client, state: &State, from: Option<i32>) -> Result<(), SourceError> {
    let schema = &state.schema;
    let refused = |e: tokio_postgres::Error| match e.code().map(|c| c.code()) {
        Some("42501") => SourceError::Setup(format!(
            "the relay's own tables (slot memory, dead letters) are missing or older in schema \
             {schema} and this role may not create them: apply sql/005_relay_state.sql and \
             sql/006_parking.sql as the schema's owner (`outbox-relay setup --apply --config …` \
             does it), or GRANT CREATE ON SCHEMA {} TO <relay role>",
            quote_ident(schema)
        )),
        Some("3F000") => SourceError::Setup(format!(
            "schema {schema} (source.state_schema) does not exist: CREATE SCHEMA {}, or point \
             source.state_schema at an existing one",
            quote_ident(schema)
        )),
        _ => SourceError::Postgres {
            context: "creating the relay's own tables",
            source: e,
        },
    };
    let ddl = ddl(schema);
    let created = sql.batch_execute(&format!(
        "BEGIN; SELECT pg_advisory_xact_lock({MIGRATION_LOCK_CLASS}, 0); {ddl} \
         UPDATE {} SET version = {STATE_VERSION}, migrated_at = now() WHERE version < {STATE_VERSION}; COMMIT",
        state.table("outbox_relay_schema")
    ))
    .await;
    if let Err(e) = created {
        // The failed transaction must not linger on the shared connection.
        let _ = sql.batch_execute("ROLLBACK").await;
        return Err(refused(e));
    }
    match from {
        None => tracing::info!(
            schema = %schema,
            version = STATE_VERSION,
            "created the relay's own tables (slot memory, dead letters)"
        ),
        Some(v) => tracing::info!(
            schema = %schema,
            from = v,
            to = STATE_VERSION,
            "migrated the relay's own tables"
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables_go_into_the_configured_schema() {
        let sql = ddl("relay state");
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS \"relay state\".outbox_relay_slots"));
        assert!(!sql.contains("public.outbox_relay_"));
        assert_eq!(
            ddl("public"),
            DDL.concat().replace("public.", "\"public\".")
        );
    }
}
