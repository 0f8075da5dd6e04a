//! The outbox table as both capture modes read it: connection, shape checks, and the
//! one SELECT list that turns a row into an [`OutboxEvent`] the same way everywhere.

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::{Client, Row};

use super::{quote_ident, quote_ident_opt, Columns, SourceConfig, SourceError, TableName};
use crate::event::{OutboxEvent, Position};

/// Opens a plain (non-replication) connection and drives it in the background.
pub async fn connect(config: &SourceConfig) -> Result<Client, SourceError> {
    connect_noticing(config, None).await
}

/// [`connect`], passing on a signal for each notification the connection receives
/// (after a `LISTEN`).
pub async fn connect_noticing(
    config: &SourceConfig,
    notices: Option<tokio::sync::mpsc::UnboundedSender<()>>,
) -> Result<Client, SourceError> {
    let pg = &config.pg;
    let client = match config.tls.client_config() {
        None => {
            let (client, connection) = pg
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(SourceError::pg("connecting to PostgreSQL"))?;
            tokio::spawn(drive(connection, notices));
            client
        }
        Some(tls) => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
            let (client, connection) = pg
                .connect(tls)
                .await
                .map_err(SourceError::pg("connecting to PostgreSQL"))?;
            tokio::spawn(drive(connection, notices));
            client
        }
    };
    // The server, too, should notice a vanished relay within seconds and release its
    // leader lock, so a standby can take over (source/deadlines.rs).
    client
        .batch_execute(&super::deadlines::server_settings_sql())
        .await
        .map_err(SourceError::pg("setting keepalives"))?;
    Ok(client)
}

/// Runs a connection until it ends.
async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    notices: Option<tokio::sync::mpsc::UnboundedSender<()>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio_postgres::tls::TlsStream + Unpin,
{
    let Some(notices) = notices else {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
        return;
    };
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                let _ = notices.send(());
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::debug!(error = %e, "PostgreSQL connection ended");
                return;
            }
            None => return,
        }
    }
}

/// What the relay learned about the outbox table at start.
pub struct TableShape {
    pub oid: u32,
    pub payload_type: String,
    pub payload_is_json: bool,
    /// SQL type of the id column, for `= ANY($1::text[]::TYPE[])` deletes.
    pub id_type: String,
}

/// Which checks [`describe`] makes beyond "the table and its columns exist".
#[derive(Clone, Copy)]
pub struct Checks {
    /// The role may DELETE (polling, and log mode with cleanup).
    pub delete: bool,
    /// The seq sequence hands out values in order (polling's visibility rule).
    pub seq_cache: bool,
    /// The seq column is needed (polling; log mode's first-start snapshot orders by it).
    pub seq: bool,
}

impl Checks {
    pub const POLLING: Checks = Checks {
        delete: true,
        seq_cache: true,
        seq: true,
    };

    /// Log mode: DELETE only with `cleanup`; `seq` orders the first-start snapshot.
    pub const fn logical(cleanup: bool) -> Checks {
        Checks {
            delete: cleanup,
            seq_cache: false,
            seq: true,
        }
    }
}

/// Checks the table, its columns and the relay's privileges, naming the config key of
/// anything missing.
pub async fn describe(
    client: &Client,
    table: &TableName,
    columns: &Columns,
    checks: Checks,
) -> Result<TableShape, SourceError> {
    let oid: Option<u32> = client
        .query_one("SELECT to_regclass($1)::oid", &[&table.quoted()])
        .await
        .map_err(SourceError::pg("looking up the outbox table"))?
        .get(0);
    let Some(oid) = oid else {
        return Err(SourceError::Setup(format!(
            "table {table} does not exist (source.table): create it with sql/001_outbox.sql \
             or `outbox-relay setup --apply`, or point source.table at your outbox"
        )));
    };
    let rows = client
        .query(
            "SELECT a.attname::text, t.typname::text, format_type(a.atttypid, NULL) FROM pg_attribute a \
             JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&oid],
        )
        .await
        .map_err(SourceError::pg("reading the outbox table's columns"))?;
    let type_of = |name: &str| {
        rows.iter()
            .find(|r| r.get::<_, String>(0) == name)
            .map(|r| r.get::<_, String>(1))
    };
    let mut missing = Vec::new();
    let mut payload_type = String::new();
    for (key, name) in columns.all() {
        if key == "seq" && !checks.seq {
            continue;
        }
        match type_of(name) {
            Some(ty) if key == "payload" => payload_type = ty,
            Some(_) => {}
            None => missing.push(format!("source.columns.{key} = {name:?}")),
        }
    }
    let id_type = rows
        .iter()
        .find(|r| r.get::<_, String>(0) == columns.id)
        .map(|r| r.get::<_, String>(2))
        .unwrap_or_else(|| "text".into());
    if !missing.is_empty() {
        return Err(SourceError::Setup(format!(
            "table {table} has no column for {}: fix the column names under [source.columns] \
             or the table",
            missing.join(", ")
        )));
    }
    // Polling reads `seq > cursor`: a row with a NULL seq would never be read.
    if checks.seq_cache {
        let not_null: bool = client
            .query_opt(
                "SELECT attnotnull FROM pg_attribute WHERE attrelid = $1 AND attname = $2",
                &[&oid, &columns.seq],
            )
            .await
            .map_err(SourceError::pg("checking the seq column"))?
            .is_some_and(|r| r.get(0));
        if !not_null {
            return Err(SourceError::Setup(format!(
                "{table}.{seq} may be NULL, and polling never reads a row without a seq: \
                 ALTER TABLE {} ALTER COLUMN {} SET NOT NULL",
                table.quoted(),
                quote_ident(&columns.seq),
                seq = columns.seq
            )));
        }
    }
    // The visibility rule needs seq values handed out in order across sessions.
    let sequences = if !checks.seq_cache {
        Vec::new()
    } else {
        // The sequence the column owns (identity, serial) and any its default calls
        // (`DEFAULT nextval('s')`): either hands out the values.
        client
            .query(
                "SELECT s.seqrelid::regclass::text, s.seqcache FROM pg_sequence s \
                 WHERE s.seqrelid = pg_get_serial_sequence($1, $2)::regclass \
                    OR s.seqrelid IN ( \
                      SELECT d.refobjid FROM pg_attrdef ad \
                      JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum \
                      JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid \
                       AND d.refclassid = 'pg_class'::regclass \
                      WHERE ad.adrelid = $3 AND a.attname = $2)",
                &[&table.quoted(), &columns.seq, &oid],
            )
            .await
            .map_err(SourceError::pg("checking the seq sequence"))?
    };
    for row in sequences {
        let (name, cache): (String, i64) = (row.get(0), row.get(1));
        if cache > 1 {
            return Err(SourceError::Setup(format!(
                "sequence {name} (behind {table}.{}) caches {cache} values per session, so seq \
                 values can commit out of order in ways the relay cannot see: \
                 ALTER SEQUENCE {name} CACHE 1",
                columns.seq
            )));
        }
    }
    let privileges = if checks.delete {
        "SELECT, DELETE"
    } else {
        "SELECT"
    };
    let allowed: bool = client
        .query_one(
            "SELECT has_table_privilege($1::oid, 'SELECT') \
               AND (NOT $2 OR has_table_privilege($1::oid, 'DELETE'))",
            &[&oid, &checks.delete],
        )
        .await
        .map_err(SourceError::pg("checking privileges on the outbox"))?
        .get(0);
    if !allowed {
        return Err(SourceError::Setup(format!(
            "this role may not {privileges} on {table}: GRANT {privileges} ON {} TO <relay role> \
             (see sql/003_relay_role.sql)",
            table.quoted()
        )));
    }
    Ok(TableShape {
        oid,
        payload_is_json: matches!(payload_type.as_str(), "jsonb" | "json"),
        payload_type,
        id_type,
    })
}

/// The order of rows read from the table: `seq`; without one (log mode's first-start
/// snapshot of a Debezium-style table), `created_at`, else the physical order (`ctid`:
/// insertion order for a table whose rows are only inserted and deleted, until vacuumed
/// space is reused).
pub fn order_key(c: &Columns) -> String {
    match (c.seq.is_empty(), &c.created_at) {
        (false, _) => quote_ident(&c.seq),
        (true, Some(created)) => format!("{}, ctid", quote_ident(created)),
        (true, None) => "ctid".to_owned(),
    }
}

/// `SELECT <event columns> FROM <table>`: the columns in the order [`rows_to_events`] reads.
///
/// Text casts keep the mapping independent of the exact column types (uuid, varchar,
/// text…), and jsonb's text form is exactly what log mode receives.
pub fn select_sql(table: &TableName, c: &Columns, shape: &TableShape) -> String {
    format!("SELECT {} FROM {}", select_list(c, shape), table.quoted())
}

/// The column list of [`select_sql`].
pub fn select_list(c: &Columns, shape: &TableShape) -> String {
    let q = |name: &str| quote_ident(name);
    let payload = match shape.payload_type.as_str() {
        "jsonb" | "json" => format!("{}::text", q(&c.payload)),
        "bytea" => q(&c.payload),
        // Text kept as its UTF-8 bytes: a `::bytea` cast would decode backslash escapes.
        _ => format!("convert_to({}::text, 'UTF8')", q(&c.payload)),
    };
    // 'infinity' (or a date before 1970) has no Kafka timestamp: such a row goes out
    // with the broker's time rather than failing the whole read.
    let created = match &c.created_at {
        Some(col) => format!(
            "CASE WHEN isfinite({col}) AND {col} >= 'epoch' \
             THEN (extract(epoch FROM {col}) * 1000)::int8 END",
            col = q(col)
        ),
        None => "NULL::int8".to_owned(),
    };
    // Without a seq column (log mode only), a row's position in the first-start
    // snapshot is its number in the snapshot's order.
    let seq = if c.seq.is_empty() {
        format!("row_number() OVER (ORDER BY {})", order_key(c))
    } else {
        q(&c.seq)
    };
    format!(
        "{seq}::int8, {id}::text, {at}::text, {ai}::text, {et}::text, {payload}, \
         {headers}::text, {created}, {topic}::text",
        id = q(&c.id),
        at = q(&c.aggregate_type),
        ai = q(&c.aggregate_id),
        et = q(&c.event_type),
        headers = quote_ident_opt(c.headers.as_deref()),
        topic = quote_ident_opt(c.topic.as_deref()),
    )
}

/// Whether a failed read failed on the data of a row (SQLSTATE class 22, data
/// exception: an untranslatable character, a value out of range) rather than on the
/// connection or the query.
pub fn is_bad_row(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code().starts_with("22"))
}

/// Like [`select_sql`], every text column as its bytes in the database's own encoding
/// (a conversion to that same encoding is none): bytea is never converted for the
/// client, so the server can always send it.
pub fn raw_select_sql(table: &TableName, c: &Columns, shape: &TableShape) -> String {
    let bytes = |col: Option<&str>| match col {
        Some(col) => format!(
            "convert_to({}::text, getdatabaseencoding())",
            quote_ident(col)
        ),
        None => "NULL::bytea".to_owned(),
    };
    format!(
        "SELECT {seq}::int8, {id}, {at}, {ai}, {et}, {payload}, {headers}, {topic} FROM {table}",
        seq = quote_ident(&c.seq),
        id = bytes(Some(&c.id)),
        at = bytes(Some(&c.aggregate_type)),
        ai = bytes(Some(&c.aggregate_id)),
        et = bytes(Some(&c.event_type)),
        // bytea is bytes already: its text form would be hex.
        payload = if shape.payload_type == "bytea" {
            quote_ident(&c.payload)
        } else {
            bytes(Some(&c.payload))
        },
        headers = bytes(c.headers.as_deref()),
        topic = bytes(c.topic.as_deref()),
        table = table.quoted(),
    )
}

/// The columns of [`raw_select_sql`], by their config keys.
const RAW_SELECTED: [&str; 8] = [
    "seq",
    "id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "payload",
    "headers",
    "topic",
];

/// Reads a row selected with [`raw_select_sql`]: an invalid event that carries `why` and
/// whatever the row holds, for the dead-letter topic.
pub fn raw_row_to_event(row: &Row, why: &tokio_postgres::Error) -> OutboxEvent {
    let text =
        |i: usize| raw(row, i).map(|b| ByteString::from(String::from_utf8_lossy(&b).into_owned()));
    let seq = row.try_get::<_, Option<i64>>(0).ok().flatten();
    let position = Position::Seq(seq.unwrap_or(i64::MAX));
    let reason = why
        .as_db_error()
        .map_or_else(|| why.to_string(), |db| db.message().to_owned());
    let not_utf8: Vec<String> = (1..RAW_SELECTED.len())
        .filter(|&i| raw(row, i).is_some_and(|b| std::str::from_utf8(&b).is_err()))
        .map(|i| format!("source.columns.{}", RAW_SELECTED[i]))
        .collect();
    OutboxEvent {
        position,
        id: text(1),
        aggregate_type: text(2),
        aggregate_id: text(3),
        event_type: text(4),
        payload: raw(row, 5).map(Bytes::from),
        payload_is_json: false,
        headers: text(6),
        timestamp_ms: None,
        topic: text(7),
        invalid: Some(format!(
            "outbox row {position} cannot be read as text ({reason}; not valid UTF-8: {}): \
             its bytes are sent as they are stored; fix the row's encoding",
            if not_utf8.is_empty() {
                "?".to_owned()
            } else {
                not_utf8.join(", ")
            }
        )),
        original: None,
        redriven: false,
    }
}

/// A column's bytes exactly as the server sent them, whatever its type: what is left of
/// a value that does not decode (text that is not UTF-8, from a `SQL_ASCII` database).
struct RawBytes(Vec<u8>);

impl<'a> FromSql<'a> for RawBytes {
    fn from_sql(
        _: &Type,
        raw: &'a [u8],
    ) -> Result<RawBytes, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawBytes(raw.to_vec()))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// The columns of [`select_sql`], by their config keys, for error messages.
pub(crate) const SELECTED: [&str; 9] = [
    "seq",
    "id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "payload",
    "headers",
    "created_at",
    "topic",
];

/// Reads rows selected with [`select_sql`], in order.
///
/// Never fails and never panics: a value that does not decode makes its event invalid
/// (it goes to the dead-letter topic with what could be read, the payload's bytes as
/// they are), so one bad row cannot stop the pipeline. A NULL `seq` (possible only in
/// log mode's first-start snapshot, which orders by it) sorts last.
///
/// tokio-postgres lends a column only as a borrow of its row, so the columns are copied
/// once, all rows into one buffer, and the events' fields are slices of it: two
/// allocations per batch (the buffer and its shared count) rather than two per row. The
/// buffer lives as long as the batch's last event; a batch is read, published and
/// acknowledged as one, so that is the batch's own bytes for the batch's own time.
pub fn rows_to_events(rows: &[Row], payload_is_json: bool) -> Vec<OutboxEvent> {
    let borrowed: Vec<[Option<&[u8]>; 7]> = rows.iter().map(borrowed_columns).collect();
    let columns = || borrowed.iter().flatten().flatten();
    let mut buffer = BytesMut::with_capacity(columns().map(|c| c.len()).sum());
    for column in columns() {
        buffer.extend_from_slice(column);
    }
    let buffer = buffer.freeze();
    let mut at = 0;
    rows.iter()
        .zip(&borrowed)
        .map(|(row, borrowed)| {
            let columns = borrowed.map(|column| {
                column.map(|c| {
                    at += c.len();
                    buffer.slice(at - c.len()..at)
                })
            });
            row_to_event(row, columns, borrowed, payload_is_json)
        })
        .collect()
}

/// A row's [`VARIABLE`] columns as the row holds them (NULL, or not there: `None`).
fn borrowed_columns(row: &Row) -> [Option<&[u8]>; 7] {
    VARIABLE.map(|i| {
        row.try_get::<_, Option<Borrowed>>(i)
            .ok()
            .flatten()
            .map(|b| b.0)
    })
}

/// One event of [`rows_to_events`]: `columns` are the row's [`VARIABLE`] columns, copied,
/// and `borrowed` the same columns in the row.
fn row_to_event(
    row: &Row,
    mut columns: [Option<Bytes>; 7],
    borrowed: &[Option<&[u8]>; 7],
    payload_is_json: bool,
) -> OutboxEvent {
    let mut unreadable: Vec<&str> = Vec::new();
    // Every column but `payload` was selected as text, and so is a JSON payload. A column
    // that is not UTF-8 is read again from the row, lossily, for the dead-letter topic.
    let mut text = |k: usize| -> Option<ByteString> {
        ByteString::try_from(columns[k].take()?).ok().or_else(|| {
            unreadable.push(SELECTED[VARIABLE[k]]);
            let bytes = borrowed[k].unwrap_or_default();
            Some(ByteString::from(
                String::from_utf8_lossy(bytes).into_owned(),
            ))
        })
    };
    let id = text(0);
    let aggregate_type = text(1);
    let aggregate_id = text(2);
    let event_type = text(3);
    let headers = text(5);
    let topic = text(6);
    if payload_is_json
        && columns[4]
            .as_deref()
            .is_some_and(|p| std::str::from_utf8(p).is_err())
    {
        unreadable.push(SELECTED[5]);
    }
    let payload = columns[4].take();
    let seq = row.try_get::<_, Option<i64>>(0).ok().flatten();
    let position = Position::Seq(seq.unwrap_or(i64::MAX));
    let invalid = not_utf8(position, &unreadable);
    OutboxEvent {
        position,
        id,
        aggregate_type,
        aggregate_id,
        event_type,
        payload,
        payload_is_json,
        headers,
        timestamp_ms: row.try_get(7).ok().flatten(),
        topic,
        invalid,
        original: None,
        redriven: false,
    }
}

/// Why a row whose `columns` (config keys, in select order) are not UTF-8 is a dead
/// letter; `None` when all are.
pub(crate) fn not_utf8(position: Position, columns: &[&str]) -> Option<String> {
    (!columns.is_empty()).then(|| {
        format!(
            "outbox row {position}: {} not valid UTF-8 text (a SQL_ASCII database, or bytes \
             written with an escape): fix the row's encoding",
            columns
                .iter()
                .map(|k| format!("source.columns.{k}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// The columns of [`select_sql`] that [`rows_to_events`] copies into the events, by index:
/// `id`, `aggregate_type`, `aggregate_id`, `event_type`, `payload`, `headers`, `topic`.
const VARIABLE: [usize; 7] = [1, 2, 3, 4, 5, 6, 8];

/// A column's bytes as the server sent them, borrowed from the row, whatever its type.
struct Borrowed<'a>(&'a [u8]);

impl<'a> FromSql<'a> for Borrowed<'a> {
    fn from_sql(
        _: &Type,
        raw: &'a [u8],
    ) -> Result<Borrowed<'a>, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Borrowed(raw))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

fn raw(row: &Row, i: usize) -> Option<Vec<u8>> {
    row.try_get::<_, Option<RawBytes>>(i)
        .ok()
        .flatten()
        .map(|r| r.0)
}
