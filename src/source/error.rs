//! Errors at the PostgreSQL boundary.

/// What went wrong on the PostgreSQL side.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The database answered, but something the relay needs is not there or not allowed:
    /// retrying will not help until an operator acts.
    #[error("{0}")]
    Setup(String),
    /// A query or the connection failed.
    #[error("{context}: {source}")]
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

    /// True when reconnecting and trying again may succeed (network, restart, failover,
    /// lock timeouts), false for problems an operator must fix (missing table, no
    /// privilege, bad password).
    pub fn is_retryable(&self) -> bool {
        match self {
            SourceError::Setup(_) => false,
            SourceError::Postgres { source, .. } => match source.code() {
                // No SQLSTATE: retry when the connection itself broke (refused, reset,
                // closed); not for client-side mistakes such as a type mismatch.
                None => {
                    source.is_closed()
                        || std::error::Error::source(source)
                            .is_some_and(|s| s.is::<std::io::Error>())
                }
                Some(code) => {
                    let class = &code.code()[..2];
                    // 08 connection exception, 40 rollback (serialization, deadlock),
                    // 53 insufficient resources, 55 lock not available,
                    // 57 operator intervention (shutdown, restart), 58 system error.
                    matches!(class, "08" | "40" | "53" | "55" | "57" | "58")
                }
            },
        }
    }
}
