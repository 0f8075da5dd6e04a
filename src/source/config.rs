//! `[source]`: which database, which table, which columns, which capture mode.

use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::deadlines;
use super::logical::{LogicalConfig, OnRowChange, RawLogicalConfig};
use super::names::RawColumns;
pub use super::names::{quote_ident, quote_ident_opt, Columns, TableName};
use super::polling::{PollingConfig, RawPollingConfig};
use crate::config::Problems;

const DEFAULT_TABLE: &str = "public.outbox";
const DEFAULT_STANDBY_RETRY: &str = "1s";
/// Ten seconds: far beyond any statement of the relay's on a healthy server, and short
/// enough that `/readyz` turns 503 within 15 s of PostgreSQL falling silent.
const DEFAULT_QUERY_TIMEOUT: &str = "10s";
const DEFAULT_DEAD_LETTER_TABLE: &str = "public.outbox_relay_dead_letter";
const DEFAULT_STATE_SCHEMA: &str = "public";
/// 8 MiB: large enough for a thousand ordinary events per batch, small enough that a
/// few batches of 1 MB events stay a few tens of MB.
const DEFAULT_MAX_BATCH_BYTES: u64 = 8 << 20;
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Deserialize)]
pub struct RawSourceConfig {
    mode: Option<String>,
    database_url: Option<SecretString>,
    password_file: Option<PathBuf>,
    #[serde(default = "default_table")]
    table: String,
    #[serde(default)]
    columns: RawColumns,
    standby_retry: Option<String>,
    query_timeout: Option<String>,
    dead_letter_table: Option<String>,
    state_schema: Option<String>,
    on_row_change: Option<String>,
    max_batch_bytes: Option<u64>,
    #[serde(default)]
    polling: RawPollingConfig,
    #[serde(default)]
    logical: RawLogicalConfig,
}

fn default_table() -> String {
    DEFAULT_TABLE.to_owned()
}

/// How events are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Select rows in `seq` order, publish, delete.
    Polling,
    /// Tail the write-ahead log through a logical replication slot.
    Logical,
}

/// Validated `[source]` section.
#[derive(Clone)]
pub struct SourceConfig {
    pub mode: Mode,
    /// Connection settings, password included (tokio-postgres redacts it in `Debug`).
    pub pg: tokio_postgres::Config,
    /// TLS for both connections, from `sslmode` / `sslrootcert` in the URL.
    pub tls: super::tls::Tls,
    /// `None` for a table-less outbox (`table = ""`, log mode: logical messages only).
    pub table: Option<TableName>,
    pub columns: Columns,
    /// How often a standby tries to become the leader (lock or slot).
    pub standby_retry: std::time::Duration,
    /// How long the leader waits for PostgreSQL to answer one round trip (a batch read,
    /// an acknowledgement, the control connection's look) before it takes the link for
    /// dead: an answerless server behind a live TCP link (a hung proxy or pooler) is
    /// caught here, where the sockets' keepalives see nothing wrong.
    pub query_timeout: std::time::Duration,
    /// Where the bodies of events too large even for the dead-letter topic are kept;
    /// `None`: nowhere (such an event stops the relay).
    pub dead_letter_table: Option<TableName>,
    /// Event bytes per batch, at most (at least one event per batch): with two batches
    /// in flight and one buffered, what bounds the relay's memory for large events.
    pub max_batch_bytes: usize,
    /// The schema of the relay's own tables (`outbox_relay_schema`,
    /// `outbox_relay_slots`): what it remembers next to the data.
    pub state_schema: String,
    /// An UPDATE or DELETE of an outbox row, seen in the log.
    pub on_row_change: OnRowChange,
    pub polling: PollingConfig,
    pub logical: LogicalConfig,
}

impl SourceConfig {
    /// The outbox table, for code paths that need one.
    pub fn outbox_table(&self) -> Result<&TableName, super::SourceError> {
        self.table.as_ref().ok_or_else(|| {
            super::SourceError::Setup(
                "source.table is empty (table-less outbox): only log mode can run without a table"
                    .into(),
            )
        })
    }

    /// The table for logs and output: its name, or what having none means.
    pub fn table_label(&self) -> String {
        self.table.as_ref().map_or_else(
            || "(none: logical messages only)".to_owned(),
            |t| t.to_string(),
        )
    }

    /// One configuration per host of `database_url`, each with that host alone, in the
    /// URL's order: `check` reports on every server, and the replication client, which
    /// speaks to one server, tries them in turn.
    pub fn each_host(&self) -> Vec<SourceConfig> {
        single_hosts(&self.pg)
            .into_iter()
            .map(|pg| SourceConfig { pg, ..self.clone() })
            .collect()
    }

    /// `user@host:port/dbname`, safe to print: never the password.
    pub fn redacted_url(&self) -> String {
        let host = self
            .pg
            .get_hosts()
            .first()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(s) => s.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .unwrap_or_else(|| "localhost".into());
        let port = self.pg.get_ports().first().copied().unwrap_or(5432);
        format!(
            "{}@{}:{}/{}",
            self.pg.get_user().unwrap_or("?"),
            host,
            port,
            self.pg.get_dbname().unwrap_or("?")
        )
    }
}

impl RawSourceConfig {
    pub fn validate(mut self, problems: &mut Problems) -> Option<SourceConfig> {
        let mode = match self.mode.as_deref() {
            Some("polling") => Some(Mode::Polling),
            Some("logical") => Some(Mode::Logical),
            Some(other) => {
                problems.push(
                    "source.mode",
                    format!("unknown mode {other:?}: use \"polling\" or \"logical\""),
                );
                None
            }
            None => {
                problems.push("source.mode", "missing: set \"polling\" or \"logical\"");
                None
            }
        };
        let (pg, tls) = match problems.required("source.database_url", self.database_url) {
            Some(url) => {
                let (rest, mode, root) = super::tls::split_params(url.expose_secret());
                let mut pg = parse_database_url(&rest, problems);
                let local = pg.as_ref().is_none_or(all_hosts_local);
                let tls = super::tls::Tls::new(
                    mode.as_deref(),
                    root.as_deref().map(std::path::Path::new),
                    local,
                )
                .map_err(|e| problems.push("source.database_url", e))
                .ok();
                if let (Some(pg), Some(tls)) = (&mut pg, &tls) {
                    pg.ssl_mode(tls.pg_mode());
                }
                (pg, tls)
            }
            None => (None, None),
        };
        let pg = pg.and_then(|mut pg| {
            if let Some(file) = &self.password_file {
                match std::fs::read_to_string(file) {
                    Ok(pw) => {
                        pg.password(pw.trim_end_matches(['\n', '\r']));
                    }
                    Err(e) => {
                        problems.push(
                            "source.password_file",
                            format!("cannot read {}: {e}", file.display()),
                        );
                        return None;
                    }
                }
            }
            Some(pg)
        });
        let table = if self.table.is_empty() {
            if mode == Some(Mode::Polling) {
                problems.push(
                    "source.table",
                    "must name the outbox table in polling mode (only log mode can be table-less)",
                );
                None
            } else {
                Some(None)
            }
        } else {
            TableName::parse(&self.table)
                .map_err(|e| problems.push("source.table", e))
                .ok()
                .map(Some)
        };
        let columns = self.columns.validate(problems);
        if mode == Some(Mode::Polling) && columns.as_ref().is_some_and(|c| c.seq.is_empty()) {
            problems.push(
                "source.columns.seq",
                "must name a column in polling mode (it is the publication order); only log \
                 mode can do without",
            );
        }
        let standby_retry = match (self.standby_retry, self.polling.standby_retry.take()) {
            (Some(_), Some(_)) => {
                problems.push(
                    "source.polling.standby_retry",
                    "is the old name of source.standby_retry: set only source.standby_retry",
                );
                None
            }
            (Some(raw), None) => problems.positive_duration("source.standby_retry", &raw),
            (None, Some(raw)) => problems.positive_duration("source.polling.standby_retry", &raw),
            (None, None) => {
                problems.positive_duration("source.standby_retry", DEFAULT_STANDBY_RETRY)
            }
        };
        let query_timeout = problems
            .positive_duration(
                "source.query_timeout",
                self.query_timeout
                    .as_deref()
                    .unwrap_or(DEFAULT_QUERY_TIMEOUT),
            )
            .filter(|t| {
                let ok = (std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(600))
                    .contains(t);
                if !ok {
                    problems.push(
                        "source.query_timeout",
                        format!("must be between 1s and 10m, got {t:?}"),
                    );
                }
                ok
            });
        let dead_letter_table = match self.dead_letter_table.as_deref() {
            Some("") => Some(None),
            raw => TableName::parse(raw.unwrap_or(DEFAULT_DEAD_LETTER_TABLE))
                .map_err(|e| problems.push("source.dead_letter_table", e))
                .ok()
                .map(Some),
        };
        let max_batch_bytes = match self.max_batch_bytes.unwrap_or(DEFAULT_MAX_BATCH_BYTES) {
            n @ 1024..=0x4000_0000 => Some(n as usize),
            n => {
                problems.push(
                    "source.max_batch_bytes",
                    format!("must be between 1024 and 1073741824 (1 GiB), got {n}"),
                );
                None
            }
        };
        let state_schema = match self.state_schema.as_deref().unwrap_or(DEFAULT_STATE_SCHEMA) {
            "" => {
                problems.push(
                    "source.state_schema",
                    "is empty: name the schema of the relay's own tables (default \"public\")",
                );
                None
            }
            s if s.contains('"') || s.contains('\0') => {
                problems.push(
                    "source.state_schema",
                    format!("{s:?} is not a schema name the relay accepts (no double quotes)"),
                );
                None
            }
            s => Some(s.to_owned()),
        };
        let on_row_change = match self.on_row_change.as_deref().unwrap_or("warn") {
            "warn" => Some(OnRowChange::Warn),
            "dead_letter" => Some(OnRowChange::DeadLetter),
            "stop" => Some(OnRowChange::Stop),
            other => {
                problems.push(
                    "source.on_row_change",
                    format!("unknown value {other:?}: use \"warn\", \"dead_letter\" or \"stop\""),
                );
                None
            }
        };
        let polling = self.polling.validate(problems);
        let logical = self.logical.validate(problems);
        if let (Some(Mode::Logical), Some(None), Some(l)) = (mode, &table, &logical) {
            if l.shards > 1 {
                problems.push(
                    "source.logical.shards",
                    "a table-less outbox cannot be sharded: shards split the outbox table's rows \
                     by row filters, which logical decoding messages ignore; keep shards = 1",
                );
                return None;
            }
            if l.message_prefix.is_empty() {
                problems.push(
                    "source.logical.message_prefix",
                    "is empty (messages off) and source.table is empty: the relay would have \
                     nothing to publish; name the outbox table, or a message prefix",
                );
                return None;
            }
        }
        Some(SourceConfig {
            mode: mode?,
            pg: pg?,
            tls: tls?,
            table: table?,
            columns: columns?,
            standby_retry: standby_retry?,
            query_timeout: query_timeout?,
            dead_letter_table: dead_letter_table?,
            max_batch_bytes: max_batch_bytes?,
            state_schema: state_schema?,
            on_row_change: on_row_change?,
            polling: polling?,
            logical: logical?,
        })
    }
}

/// `pg` split per host, every other setting kept. libpq pairs ports with hosts one to
/// one, or gives one port to all.
pub(crate) fn single_hosts(pg: &tokio_postgres::Config) -> Vec<tokio_postgres::Config> {
    use tokio_postgres::config::Host;
    let ports = pg.get_ports();
    let hosts: Vec<Host> = match pg.get_hosts() {
        [] => vec![Host::Tcp("localhost".into())],
        hosts => hosts.to_vec(),
    };
    hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let mut one = tokio_postgres::Config::new();
            match host {
                Host::Tcp(h) => one.host(h),
                Host::Unix(p) => one.host_path(p),
            };
            one.port(match ports {
                [] => 5432,
                [only] => *only,
                many => many.get(i).copied().unwrap_or(5432),
            });
            if let Some(v) = pg.get_user() {
                one.user(v);
            }
            if let Some(v) = pg.get_password() {
                one.password(v);
            }
            if let Some(v) = pg.get_dbname() {
                one.dbname(v);
            }
            if let Some(v) = pg.get_options() {
                one.options(v);
            }
            if let Some(v) = pg.get_application_name() {
                one.application_name(v);
            }
            if let Some(v) = pg.get_connect_timeout() {
                one.connect_timeout(*v);
            }
            if let Some(v) = pg.get_tcp_user_timeout() {
                one.tcp_user_timeout(*v);
            }
            one.ssl_mode(pg.get_ssl_mode())
                .channel_binding(pg.get_channel_binding())
                .keepalives(pg.get_keepalives())
                .keepalives_idle(pg.get_keepalives_idle())
                .target_session_attrs(pg.get_target_session_attrs());
            if let Some(v) = pg.get_keepalives_interval() {
                one.keepalives_interval(v);
            }
            if let Some(v) = pg.get_keepalives_retries() {
                one.keepalives_retries(v);
            }
            one
        })
        .collect()
}

/// Whether every host of the connection is this machine: a Unix socket, `localhost` or
/// a loopback address (no host at all means the local socket).
fn all_hosts_local(pg: &tokio_postgres::Config) -> bool {
    use tokio_postgres::config::Host;
    pg.get_hosts().iter().all(|h| match h {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name == "localhost"
                || name
                    .trim_matches(|c| c == '[' || c == ']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    })
}

fn parse_database_url(url: &str, problems: &mut Problems) -> Option<tokio_postgres::Config> {
    match url.parse::<tokio_postgres::Config>() {
        Ok(mut pg) => {
            if pg.get_user().is_none() {
                problems.push(
                    "source.database_url",
                    "names no user: write postgres://USER@HOST:PORT/DBNAME",
                );
                return None;
            }
            if pg.get_dbname().is_none() {
                let user = pg.get_user().unwrap_or_default().to_owned();
                pg.dbname(user);
            }
            if pg.get_application_name().is_none() {
                pg.application_name("outbox-relay");
            }
            // Notice a dead peer in seconds rather than the kernel's two hours, and before
            // the server does (source/deadlines.rs): a leader cut off from PostgreSQL
            // must stop before a standby can take over.
            if pg.get_connect_timeout().is_none() {
                pg.connect_timeout(CONNECT_TIMEOUT);
            }
            pg.keepalives(true)
                .keepalives_idle(deadlines::CLIENT_KEEPALIVE_IDLE)
                .keepalives_interval(deadlines::CLIENT_KEEPALIVE_INTERVAL)
                .keepalives_retries(deadlines::CLIENT_KEEPALIVE_RETRIES)
                .tcp_user_timeout(deadlines::CLIENT_GIVE_UP);
            Some(pg)
        }
        Err(e) => {
            // The parser's message never echoes the URL, so no secret leaks through it.
            problems.push(
                "source.database_url",
                format!(
                    "not a PostgreSQL connection URL ({e}); write postgres://USER@HOST:PORT/DBNAME"
                ),
            );
            None
        }
    }
}
