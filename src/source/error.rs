//! Errors at the PostgreSQL boundary.

/// What went wrong on the PostgreSQL side.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The database answered, but something the relay needs is not there or not allowed:
    /// retrying will not help until an operator acts.
    #[error("{0}")]
    Setup(String),
    /// The replication connection failed or PostgreSQL refused a replication command.
    #[error("{context}: {source}")]
    Replication {
        context: &'static str,
        #[source]
        source: crate::source::logical::ReplicationError,
    },
    /// The replication slot is lost and `on_slot_lost = "fail"`: the process exits with
    /// its own code, which supervisors are told not to restart.
    #[error("{0}")]
    SlotLost(String),
    /// The publication changed under the running relay but carries the outbox again:
    /// reconnecting republishes what the server may have skipped.
    #[error("{0}")]
    PublicationChanged(String),
    /// Another relay streams from the slot: this one is a standby.
    #[error("replication slot {slot} is in use by another relay ({detail})")]
    SlotBusy { slot: String, detail: String },
    /// PostgreSQL answered nothing within `source.query_timeout`: the link (or a proxy or
    /// pooler on it) is silent although the sockets look alive.
    #[error(
        "PostgreSQL answered nothing while {what} for {} s (source.query_timeout): the link \
         or the server is stuck; reconnecting",
        after.as_secs_f64()
    )]
    Unanswered {
        what: &'static str,
        after: std::time::Duration,
    },
    /// A query or the connection failed.
    #[error("{context}: {}", pg_text(.source))]
    Postgres {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl SourceError {
    pub fn pg(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SourceError {
        move |source| SourceError::Postgres { context, source }
    }

    pub fn repl(
        context: &'static str,
    ) -> impl FnOnce(crate::source::logical::ReplicationError) -> SourceError {
        move |source| SourceError::Replication { context, source }
    }

    /// True when reconnecting and trying again may succeed (network, restart, failover,
    /// lock timeouts), false for problems an operator must fix (missing table, no
    /// privilege, bad password).
    pub fn is_retryable(&self) -> bool {
        match self {
            SourceError::Setup(_) | SourceError::SlotLost(_) => false,
            SourceError::PublicationChanged(_) => true,
            SourceError::SlotBusy { .. } | SourceError::Unanswered { .. } => true,
            SourceError::Replication { source, .. } => source.is_retryable(),
            SourceError::Postgres { source, .. } => match source.code() {
                // No SQLSTATE: retry when the connection itself broke (refused, reset,
                // closed); not for client-side mistakes such as a type mismatch.
                None => {
                    // A refused certificate will be refused again: that is configuration.
                    let tls_refused = chain(source).any(|e| e.is::<rustls::Error>())
                        || chain(source).any(|e| {
                            e.downcast_ref::<std::io::Error>()
                                .and_then(|io| io.get_ref())
                                .is_some_and(|inner| inner.is::<rustls::Error>())
                        });
                    !tls_refused
                        && (source.is_closed()
                            || std::error::Error::source(source)
                                .is_some_and(|s| s.is::<std::io::Error>()))
                }
                Some(code) => retryable_sqlstate(code.code()),
            },
        }
    }
}

/// SQLSTATE classes worth a retry: 08 connection exception, 40 rollback (serialization,
/// deadlock), 53 insufficient resources, 55 object not in prerequisite state (lock not
/// available, object in use), 57 operator intervention (shutdown, restart), 58 system
/// error.
pub fn retryable_sqlstate(code: &str) -> bool {
    matches!(code.get(..2), Some("08" | "40" | "53" | "55" | "57" | "58"))
}

/// tokio-postgres prints only "db error" for server errors: show what the server said.
fn pg_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; {detail}"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text
        }
        // "error performing TLS handshake" says little without what caused it.
        None => chain(e)
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(": "),
    }
}

/// An error and its sources, outermost first.
fn chain<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}
