//! The replication commands, in the syntax the connected server speaks.
//!
//! `CREATE_REPLICATION_SLOT` took bare keywords (`EXPORT_SNAPSHOT`, `NOEXPORT_SNAPSHOT`)
//! until PostgreSQL 14 and a parenthesised option list from 15, which 13 and 14 refuse as
//! a syntax error. pgoutput's `messages` option (logical decoding messages, the
//! table-less outbox) exists from 14; on 13 asking for it fails the stream at start.
//! Protocol version 1 is what every supported major speaks and all the relay needs:
//! versions 2–4 add streaming and two-phase decoding of transactions still in progress,
//! and the relay publishes only committed ones.

use crate::event::Lsn;

/// The oldest major the relay supports.
pub const OLDEST_SUPPORTED: u32 = 130000;
/// The first major whose pgoutput sends logical decoding messages.
pub const MESSAGES_SINCE: u32 = 140000;
/// The first major that takes `CREATE_REPLICATION_SLOT … (option, …)`.
const OPTION_LIST_SINCE: u32 = 150000;

/// The first major with failover slots.
pub const FAILOVER_SINCE: u32 = 170000;

/// A server's `server_version_num` (e.g. 170010 for 17.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion(pub u32);

impl ServerVersion {
    pub fn major(self) -> u32 {
        self.0 / 10000
    }

    pub fn has_messages(self) -> bool {
        self.0 >= MESSAGES_SINCE
    }
}

impl std::fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major(), self.0 % 10000)
    }
}

/// Whether a new slot exports a snapshot (first start with a table to read) or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Snapshot {
    Export,
    Nothing,
}

/// `CREATE_REPLICATION_SLOT` for a pgoutput slot.
pub fn create_slot(
    version: ServerVersion,
    slot: &str,
    temporary: bool,
    snapshot: Snapshot,
) -> String {
    let temporary = if temporary { "TEMPORARY " } else { "" };
    let option = match (version.0 >= OPTION_LIST_SINCE, snapshot) {
        (true, Snapshot::Export) => "(SNAPSHOT 'export')",
        (true, Snapshot::Nothing) => "(SNAPSHOT 'nothing')",
        (false, Snapshot::Export) => "EXPORT_SNAPSHOT",
        (false, Snapshot::Nothing) => "NOEXPORT_SNAPSHOT",
    };
    format!("CREATE_REPLICATION_SLOT \"{slot}\" {temporary}LOGICAL pgoutput {option}")
}

/// Turns a slot into a failover slot (17+), synchronised to standbys that ask for it.
pub fn make_failover(slot: &str) -> String {
    format!("ALTER_REPLICATION_SLOT \"{slot}\" ( FAILOVER true )")
}

/// `START_REPLICATION` of a pgoutput slot from `from` (0: where the slot stands).
pub fn start_replication(
    version: ServerVersion,
    slot: &str,
    from: Lsn,
    publication: &str,
) -> String {
    let messages = if version.has_messages() {
        ", messages 'true'"
    } else {
        ""
    };
    format!(
        "START_REPLICATION SLOT \"{slot}\" LOGICAL {from} \
         (proto_version '1', publication_names '\"{publication}\"'{messages})"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_created_in_each_majors_syntax() {
        for (num, export, nothing) in [
            (
                130023,
                "CREATE_REPLICATION_SLOT \"s\" TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT",
                "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            ),
            (
                140023,
                "CREATE_REPLICATION_SLOT \"s\" TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT",
                "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            ),
            (
                150018,
                "CREATE_REPLICATION_SLOT \"s\" TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')",
                "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput (SNAPSHOT 'nothing')",
            ),
            (
                180004,
                "CREATE_REPLICATION_SLOT \"s\" TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')",
                "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput (SNAPSHOT 'nothing')",
            ),
        ] {
            let v = ServerVersion(num);
            assert_eq!(create_slot(v, "s", true, Snapshot::Export), export, "{v}");
            assert_eq!(
                create_slot(v, "s", false, Snapshot::Nothing),
                nothing,
                "{v}"
            );
        }
    }

    #[test]
    fn messages_are_asked_for_only_where_pgoutput_has_them() {
        let start = |num| start_replication(ServerVersion(num), "s", Lsn(0), "p");
        assert!(!start(130023).contains("messages"));
        for num in [140000, 150018, 170010, 180004] {
            assert!(start(num).ends_with(", messages 'true')"), "{}", start(num));
        }
        assert_eq!(
            start(130023),
            "START_REPLICATION SLOT \"s\" LOGICAL 0/0 (proto_version '1', publication_names '\"p\"')"
        );
    }

    #[test]
    fn versions_print_as_major_dot_minor() {
        assert_eq!(ServerVersion(170010).to_string(), "17.10");
        assert_eq!(ServerVersion(130023).major(), 13);
    }
}
