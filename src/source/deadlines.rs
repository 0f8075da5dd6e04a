//! How soon each end of a PostgreSQL connection gives up on a silent link, and why in
//! this order.
//!
//! A leader cut off from PostgreSQL (a partition, a black-holed route) must stop
//! publishing, and a standby must take over. Three clocks decide how fast:
//!
//! 1. **The relay gives up first** ([`CLIENT_GIVE_UP`], 9 s): its sockets probe an idle
//!    link after 5 s and call it dead after two unanswered probes 2 s apart, and
//!    `TCP_USER_TIMEOUT` drops a link whose sent data stays unacknowledged as long. The
//!    leader then stops reading, purges what its producer still queues (at least once)
//!    and reconnects as a candidate.
//! 2. **The server lets go next** ([`SERVER_RELEASE`], 19 s): set on every session the
//!    relay opens (`tcp_keepalives_*` and `tcp_user_timeout`, which unlike keepalives
//!    also fires while the server has unacknowledged data in flight — a walsender
//!    streaming, a backend answering), so the backend holding the leader lock or the
//!    replication slot ends; on the replication connection `wal_sender_timeout`
//!    (`source.logical.wal_sender_timeout`, 20 s by default) ends the walsender too.
//! 3. **The standby finds the lock or slot free** at its next try
//!    (`source.standby_retry`, 1 s by default): about 20 s after the cut, within the 30 s
//!    promised.
//!
//! The gap between 1 and 2 is what keeps a cut-off leader from publishing after the new
//! one starts: by the time the server releases, the old leader has stopped.

use std::time::Duration;

pub const CLIENT_KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
pub const CLIENT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
pub const CLIENT_KEEPALIVE_RETRIES: u32 = 2;
/// The relay's sockets give up on a silent link after this long.
pub const CLIENT_GIVE_UP: Duration = Duration::from_secs(
    CLIENT_KEEPALIVE_IDLE.as_secs()
        + CLIENT_KEEPALIVE_INTERVAL.as_secs() * CLIENT_KEEPALIVE_RETRIES as u64,
);

pub const SERVER_KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
pub const SERVER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3);
pub const SERVER_KEEPALIVE_RETRIES: u32 = 3;
/// The server ends the relay's sessions (and so frees its lock or slot) after this long.
pub const SERVER_RELEASE: Duration = Duration::from_secs(
    SERVER_KEEPALIVE_IDLE.as_secs()
        + SERVER_KEEPALIVE_INTERVAL.as_secs() * SERVER_KEEPALIVE_RETRIES as u64,
);

/// The default `source.logical.wal_sender_timeout`: just after [`SERVER_RELEASE`].
pub const DEFAULT_WAL_SENDER_TIMEOUT: Duration = Duration::from_secs(20);

/// The settings a session of the relay's gets on the server, as `-c` options.
fn server_settings() -> String {
    format!(
        "-c tcp_keepalives_idle={} -c tcp_keepalives_interval={} -c tcp_keepalives_count={} \
         -c tcp_user_timeout={}",
        SERVER_KEEPALIVE_IDLE.as_secs(),
        SERVER_KEEPALIVE_INTERVAL.as_secs(),
        SERVER_KEEPALIVE_RETRIES,
        SERVER_RELEASE.as_millis()
    )
}

/// The same as `SET` statements, for the ordinary sessions (sent after connecting, so
/// that a pooler in front of PostgreSQL need not pass startup options on).
pub fn server_settings_sql() -> String {
    format!(
        "SET tcp_keepalives_idle = {}; SET tcp_keepalives_interval = {}; \
         SET tcp_keepalives_count = {}; SET tcp_user_timeout = {}",
        SERVER_KEEPALIVE_IDLE.as_secs(),
        SERVER_KEEPALIVE_INTERVAL.as_secs(),
        SERVER_KEEPALIVE_RETRIES,
        SERVER_RELEASE.as_millis()
    )
}

/// The replication connection's startup `options`: the server settings, its
/// `wal_sender_timeout`, then whatever the connection string's own `options` say (last,
/// so they win).
pub fn replication_options(wal_sender_timeout: Duration, own: Option<&str>) -> String {
    let mut options = format!(
        "{} -c wal_sender_timeout={}",
        server_settings(),
        wal_sender_timeout.as_millis()
    );
    if let Some(own) = own.filter(|o| !o.trim().is_empty()) {
        options.push(' ');
        options.push_str(own);
    }
    options
}

/// The relay's side on a socket it opens itself (the replication connection; the SQL
/// connections get the same through `tokio_postgres::Config`).
pub fn set_client_socket(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    let ka = socket2::TcpKeepalive::new()
        .with_time(CLIENT_KEEPALIVE_IDLE)
        .with_interval(CLIENT_KEEPALIVE_INTERVAL)
        .with_retries(CLIENT_KEEPALIVE_RETRIES);
    sock.set_tcp_keepalive(&ka)?;
    sock.set_tcp_user_timeout(Some(CLIENT_GIVE_UP))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_gives_up_before_the_server_lets_go_before_thirty_seconds() {
        assert_eq!(CLIENT_GIVE_UP, Duration::from_secs(9));
        assert_eq!(SERVER_RELEASE, Duration::from_secs(19));
        assert!(CLIENT_GIVE_UP < SERVER_RELEASE);
        assert!(SERVER_RELEASE <= DEFAULT_WAL_SENDER_TIMEOUT);
        // The standby's default retry (1 s) on top still lands within 30 s.
        assert!(DEFAULT_WAL_SENDER_TIMEOUT + Duration::from_secs(1) < Duration::from_secs(30));
    }

    #[test]
    fn replication_options_keep_the_connection_strings_own_last() {
        let o = replication_options(Duration::from_secs(20), Some("-c search_path=app"));
        assert!(o.starts_with("-c tcp_keepalives_idle=10 "), "{o}");
        assert!(
            o.contains("-c tcp_user_timeout=19000 -c wal_sender_timeout=20000"),
            "{o}"
        );
        assert!(o.ends_with(" -c search_path=app"), "{o}");
        assert!(!replication_options(Duration::from_secs(20), Some("  ")).ends_with(' '));
    }
}
