//! `setup` with a configuration: the shipped SQL under the configured names.
//!
//! The files in `sql/` (`crate::SETUP_SQL`) name the defaults: the outbox table
//! `public.outbox`, the publication `outbox_relay` and the dead-letter table
//! `public.outbox_relay_dead_letter`. [`render`] puts the configured names in their
//! place, quoted, and touches nothing else: the relay role keeps its name
//! (`outbox_relay`, as in `sql/003_relay_role.sql`), and so do tables that merely start
//! like the outbox's name (`public.outbox_relay_schema`).

use crate::source::{quote_ident, SourceConfig, TableName};

const DEFAULT_TABLE: (&str, &str) = ("public", "outbox");
const DEFAULT_PUBLICATION: &str = "outbox_relay";
const DEFAULT_DEAD_LETTER: (&str, &str) = ("public", "outbox_relay_dead_letter");
/// The relay's own tables (`sql/005_relay_state.sql`, in `source.state_schema`)
/// and `sql/006_parking.sql`.
const STATE_TABLES: [&str; 5] = [
    "outbox_relay_schema",
    "outbox_relay_slots",
    "outbox_relay_dlq",
    "outbox_relay_requests",
    "outbox_relay_control",
];

/// The names the SQL is rendered with.
#[derive(Debug, Clone)]
pub struct Names {
    /// `None`: a table-less outbox; the SQL keeps the default table.
    pub table: Option<TableName>,
    pub publication: String,
    /// `None`: no dead-letter table; the SQL keeps the default one.
    pub dead_letter_table: Option<TableName>,
    /// The schema of the relay's own tables (`source.state_schema`).
    pub state_schema: String,
}

impl Names {
    pub fn of(source: &SourceConfig) -> Names {
        Names {
            table: source.table.clone(),
            publication: source.logical.publication.clone(),
            dead_letter_table: source.dead_letter_table.clone(),
            state_schema: source.state_schema.clone(),
        }
    }
}

/// Where a default name may be replaced.
#[derive(Debug, Clone, Copy)]
enum After {
    /// Anywhere it stands as a whole name.
    Anything,
    /// Right after this keyword (any case) and white space: `PUBLICATION outbox_relay`.
    Keyword(&'static str),
    /// After this text and optional white space: `pubname = 'outbox_relay'`.
    Text(&'static str),
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '$' || c == '.' || c == '"'
}

fn is(table: &TableName, (schema, name): (&str, &str)) -> bool {
    table.schema == schema && table.name == name
}

fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `sql` (one of the shipped files) with the configured names for the defaults. With
/// the default names it returns `sql` unchanged.
pub fn render(sql: &str, names: &Names) -> String {
    let mut subs: Vec<(String, String, After)> = Vec::new();
    let mut schemas: Vec<String> = Vec::new();
    if let Some(t) = names.table.as_ref().filter(|t| !is(t, DEFAULT_TABLE)) {
        subs.push(("public.outbox".into(), t.quoted(), After::Anything));
        schemas.push(t.schema.clone());
    }
    if let Some(t) = names
        .dead_letter_table
        .as_ref()
        .filter(|t| !is(t, DEFAULT_DEAD_LETTER))
    {
        subs.push((
            "public.outbox_relay_dead_letter".into(),
            t.quoted(),
            After::Anything,
        ));
        schemas.push(t.schema.clone());
    }
    if names.state_schema != "public" {
        for table in STATE_TABLES {
            subs.push((
                format!("public.{table}"),
                format!("{}.{table}", quote_ident(&names.state_schema)),
                After::Anything,
            ));
        }
        schemas.push(names.state_schema.clone());
    }
    if names.publication != DEFAULT_PUBLICATION {
        let p = &names.publication;
        subs.push((
            DEFAULT_PUBLICATION.into(),
            quote_ident(p),
            After::Keyword("PUBLICATION"),
        ));
        subs.push((
            literal(DEFAULT_PUBLICATION),
            literal(p),
            After::Text("pubname ="),
        ));
    }
    // The relay role's USAGE on the schemas of its tables.
    schemas.retain(|s| s != "public");
    schemas.sort();
    schemas.dedup();
    if !schemas.is_empty() {
        let more: Vec<String> = schemas.iter().map(|s| quote_ident(s)).collect();
        subs.push((
            "public".into(),
            format!("public, {}", more.join(", ")),
            After::Keyword("USAGE ON SCHEMA"),
        ));
    }
    if subs.is_empty() {
        return sql.to_owned();
    }

    // One pass, so that a replacement is never replaced again.
    let mut out = String::with_capacity(sql.len() + 64);
    let mut i = 0;
    'scan: while i < sql.len() {
        let before = &sql[..i];
        let whole_start = !before.ends_with(is_name_char);
        for (from, to, after) in &subs {
            let end = i + from.len();
            let whole = whole_start
                && sql[i..].starts_with(from.as_str())
                && !sql[end..].starts_with(is_name_char);
            if whole && follows(before, *after) {
                out.push_str(to);
                i = end;
                continue 'scan;
            }
        }
        let c = sql[i..].chars().next().expect("i is below the length");
        out.push(c);
        i += c.len_utf8();
    }
    out
}

fn follows(before: &str, after: After) -> bool {
    match after {
        After::Anything => true,
        After::Keyword(keyword) => {
            let trimmed = before.trim_end();
            trimmed.len() < before.len()
                && trimmed.len() >= keyword.len()
                && trimmed[trimmed.len() - keyword.len()..].eq_ignore_ascii_case(keyword)
                && !trimmed[..trimmed.len() - keyword.len()].ends_with(is_name_char)
        }
        After::Text(text) => {
            let compact = |s: &str| s.split_whitespace().collect::<String>();
            let tail: String = compact(&before[before.len().saturating_sub(64)..]);
            tail.ends_with(&compact(text))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(raw: &str) -> Option<TableName> {
        Some(TableName::parse(raw).unwrap())
    }

    fn defaults() -> Names {
        Names {
            table: table("public.outbox"),
            publication: "outbox_relay".into(),
            dead_letter_table: table("public.outbox_relay_dead_letter"),
            state_schema: "public".into(),
        }
    }

    fn configured() -> Names {
        Names {
            table: table("app.Events"),
            publication: "events_pub".into(),
            dead_letter_table: table("audit.dead_letters"),
            state_schema: "public".into(),
        }
    }

    /// Whether `name` stands in `sql` as a whole name (not as part of a longer one).
    fn names_whole(sql: &str, name: &str) -> bool {
        sql.match_indices(name).any(|(i, _)| {
            !sql[..i].ends_with(is_name_char) && !sql[i + name.len()..].starts_with(is_name_char)
        })
    }

    fn file(name: &str) -> &'static str {
        crate::SETUP_SQL
            .iter()
            .find(|(n, _)| n.ends_with(name))
            .map(|(_, sql)| *sql)
            .unwrap_or_else(|| panic!("no {name} in SETUP_SQL"))
    }

    #[test]
    fn the_default_names_leave_every_file_as_shipped() {
        for (name, sql) in crate::SETUP_SQL {
            assert_eq!(render(sql, &defaults()), sql, "{name}");
            let unqualified = Names {
                table: table("outbox"),
                ..defaults()
            };
            assert_eq!(render(sql, &unqualified), sql, "{name}");
        }
    }

    #[test]
    fn no_file_keeps_a_default_name_the_configuration_replaced() {
        for (name, sql) in crate::SETUP_SQL {
            let out = render(sql, &configured());
            assert!(!names_whole(&out, "public.outbox"), "{name}:\n{out}");
            assert!(
                !names_whole(&out, "public.outbox_relay_dead_letter"),
                "{name}:\n{out}"
            );
            assert!(!out.contains("pubname = 'outbox_relay'"), "{name}:\n{out}");
            assert!(
                !out.to_uppercase().contains("PUBLICATION OUTBOX_RELAY"),
                "{name}:\n{out}"
            );
        }
    }

    #[test]
    fn the_configured_names_are_quoted_where_the_defaults_were() {
        let n = configured();
        let outbox = render(file("001_outbox.sql"), &n);
        assert!(outbox.contains("CREATE TABLE IF NOT EXISTS \"app\".\"Events\" ("));
        let publication = render(file("002_publication.sql"), &n);
        assert!(
            publication.contains("pubname = 'events_pub'"),
            "{publication}"
        );
        assert!(
            publication.contains("CREATE PUBLICATION \"events_pub\" FOR TABLE \"app\".\"Events\""),
            "{publication}"
        );
        let role = render(file("003_relay_role.sql"), &n);
        for kept in [
            "rolname = 'outbox_relay'",
            "CREATE ROLE outbox_relay LOGIN REPLICATION",
            "GRANT USAGE ON SCHEMA public, \"app\", \"audit\" TO outbox_relay;",
            "GRANT SELECT, DELETE ON \"app\".\"Events\" TO outbox_relay;",
        ] {
            assert!(role.contains(kept), "{kept:?} not in {role}");
        }
        let dead = render(file("004_dead_letter.sql"), &n);
        assert!(dead.contains("CREATE TABLE IF NOT EXISTS \"audit\".\"dead_letters\" ("));
        assert!(dead.contains("GRANT INSERT ON \"audit\".\"dead_letters\" TO outbox_relay;"));
    }

    #[test]
    fn names_that_need_quoting_are_quoted_safely() {
        let n = Names {
            table: table("we\"ird"),
            publication: "it's".into(),
            dead_letter_table: None,
            state_schema: "public".into(),
        };
        let sql = "CREATE TABLE public.outbox (x int);\n\
                   SELECT 1 FROM pg_publication WHERE pubname = 'outbox_relay';\n\
                   CREATE PUBLICATION outbox_relay FOR TABLE public.outbox;\n\
                   GRANT USAGE ON SCHEMA public TO outbox_relay;";
        assert_eq!(
            render(sql, &n),
            "CREATE TABLE \"public\".\"we\"\"ird\" (x int);\n\
             SELECT 1 FROM pg_publication WHERE pubname = 'it''s';\n\
             CREATE PUBLICATION \"it's\" FOR TABLE \"public\".\"we\"\"ird\";\n\
             GRANT USAGE ON SCHEMA public TO outbox_relay;"
        );
    }

    #[test]
    fn the_relay_tables_go_into_the_state_schema() {
        let n = Names {
            state_schema: "relay".into(),
            ..defaults()
        };
        let state = render(file("005_relay_state.sql"), &n);
        assert!(!names_whole(&state, "public.outbox_relay_slots"), "{state}");
        assert!(
            state.contains("CREATE TABLE IF NOT EXISTS \"relay\".outbox_relay_slots ("),
            "{state}"
        );
        assert!(state.contains(
            "GRANT SELECT, INSERT, UPDATE ON \"relay\".outbox_relay_schema, \"relay\".outbox_relay_slots TO outbox_relay;"
        ));
        let parking = render(file("006_parking.sql"), &n);
        for table in [
            "outbox_relay_dlq",
            "outbox_relay_requests",
            "outbox_relay_control",
        ] {
            assert!(
                parking.contains(&format!("CREATE TABLE IF NOT EXISTS \"relay\".{table} (")),
                "{parking}"
            );
            assert!(
                !names_whole(&parking, &format!("public.{table}")),
                "{parking}"
            );
        }
        assert!(parking.contains("UPDATE \"relay\".outbox_relay_schema SET version = 2"));
        let role = render(file("003_relay_role.sql"), &n);
        assert!(
            role.contains("GRANT USAGE ON SCHEMA public, \"relay\" TO outbox_relay;"),
            "{role}"
        );
    }

    #[test]
    fn names_that_only_start_like_a_default_are_kept() {
        let sql = "CREATE TABLE public.outbox_relay_schema (); GRANT SELECT ON \
                   public.outbox_relay_slots, public.outboxes, x.public.outbox TO outbox_relay; \
                   SELECT 'outbox_relay', rolname = 'outbox_relay';";
        assert_eq!(render(sql, &configured()), sql);
    }
}
