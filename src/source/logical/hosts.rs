//! Which server of a multi-host `database_url` the replication connection goes to.

use super::protocol::{ReplicationClient, ReplicationError};

/// A replication connection to the server a possibly multi-host `database_url` names.
///
/// Like libpq, tries the hosts of a multi-host URL in order, and with
/// `target_session_attrs=read-write` passes over servers in recovery: after a
/// promotion the relay finds the new primary the way the ordinary connection does.
pub async fn connect(
    pg: &tokio_postgres::Config,
    tls: &crate::source::tls::Tls,
) -> Result<ReplicationClient, ReplicationError> {
    use tokio_postgres::config::TargetSessionAttrs;
    let mut last = None;
    for one in crate::source::config::single_hosts(pg) {
        let mut client = match ReplicationClient::connect_one(&one, tls).await {
            Ok(c) => c,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        if pg.get_target_session_attrs() != TargetSessionAttrs::ReadWrite {
            return Ok(client);
        }
        let rows = client.simple_query("SELECT pg_is_in_recovery()").await?;
        let standby = rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .is_some_and(|v| v == "t");
        if !standby {
            return Ok(client);
        }
        last = Some(ReplicationError::Protocol(
            "every host is in recovery, and target_session_attrs=read-write asks for a primary"
                .into(),
        ));
    }
    Err(last.unwrap_or_else(|| ReplicationError::Protocol("no host to connect to".into())))
}
