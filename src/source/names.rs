//! The outbox's names in SQL: its table (`source.table`) and its columns
//! (`source.columns.*`), checked when the configuration loads and quoted safely
//! wherever the relay writes them into a statement.

use serde::Deserialize;

use crate::config::Problems;

/// A schema-qualified table name, quoted safely for SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn parse(raw: &str) -> Result<TableName, String> {
        let parts: Vec<&str> = raw.split('.').collect();
        let (schema, name) = match parts.as_slice() {
            [name] => ("public", *name),
            [schema, name] => (*schema, *name),
            _ => {
                return Err(format!(
                    "{raw:?} is not a table name: write \"table\" or \"schema.table\""
                ))
            }
        };
        if schema.is_empty() || name.is_empty() {
            return Err(format!(
                "{raw:?} is not a table name: write \"table\" or \"schema.table\""
            ));
        }
        Ok(TableName {
            schema: schema.to_owned(),
            name: name.to_owned(),
        })
    }

    /// `"schema"."name"`, for use inside SQL text.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Quotes an SQL identifier, doubling embedded quotes.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

#[derive(Deserialize)]
#[serde(default)]
pub(crate) struct RawColumns {
    id: String,
    seq: String,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    payload: String,
    headers: String,
    created_at: String,
    topic: String,
}

impl Default for RawColumns {
    fn default() -> Self {
        RawColumns {
            id: "id".into(),
            seq: "seq".into(),
            aggregate_type: "aggregate_type".into(),
            aggregate_id: "aggregate_id".into(),
            event_type: "event_type".into(),
            payload: "payload".into(),
            headers: "headers".into(),
            created_at: "created_at".into(),
            topic: String::new(),
        }
    }
}

/// The outbox's column names. Optional columns are `None` when configured as `""`.
#[derive(Debug, Clone)]
pub struct Columns {
    pub id: String,
    pub seq: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: String,
    pub headers: Option<String>,
    pub created_at: Option<String>,
    pub topic: Option<String>,
}

impl RawColumns {
    pub(crate) fn validate(self, problems: &mut Problems) -> Option<Columns> {
        let mut ok = true;
        for (key, value) in [
            ("id", &self.id),
            ("aggregate_type", &self.aggregate_type),
            ("aggregate_id", &self.aggregate_id),
            ("event_type", &self.event_type),
            ("payload", &self.payload),
        ] {
            if value.is_empty() {
                problems.push(
                    format!("source.columns.{key}"),
                    "must name a column (this one is required)",
                );
                ok = false;
            }
        }
        let optional = |s: String| (!s.is_empty()).then_some(s);
        ok.then(|| Columns {
            id: self.id,
            seq: self.seq,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            event_type: self.event_type,
            payload: self.payload,
            headers: optional(self.headers),
            created_at: optional(self.created_at),
            topic: optional(self.topic),
        })
    }
}

/// A quoted column name, or SQL `NULL` for an optional column that is not configured.
pub fn quote_ident_opt(ident: Option<&str>) -> String {
    ident.map(quote_ident).unwrap_or_else(|| "NULL".to_owned())
}

impl Columns {
    /// Every configured column with its config key, required ones first.
    pub fn all(&self) -> Vec<(&'static str, &str)> {
        let mut all = vec![("id", self.id.as_str())];
        if !self.seq.is_empty() {
            all.push(("seq", self.seq.as_str()));
        }
        all.extend([
            ("aggregate_type", self.aggregate_type.as_str()),
            ("aggregate_id", self.aggregate_id.as_str()),
            ("event_type", self.event_type.as_str()),
            ("payload", self.payload.as_str()),
        ]);
        for (key, col) in [
            ("headers", &self.headers),
            ("created_at", &self.created_at),
            ("topic", &self.topic),
        ] {
            if let Some(col) = col {
                all.push((key, col.as_str()));
            }
        }
        all
    }
}

/// Default column names, for tests elsewhere in the crate.
#[cfg(test)]
#[derive(Default)]
pub struct RawColumnsForTest;

#[cfg(test)]
impl RawColumnsForTest {
    pub fn into_columns(self) -> Columns {
        RawColumns::default()
            .validate(&mut Problems::default())
            .expect("defaults are valid")
    }
}
