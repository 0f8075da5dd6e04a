//! `[sink.kafka.schema_registry]` and `[[sink.kafka.schemas]]`: where the registry is,
//! how subjects are named, and which events are encoded with which schema.
//!
//! Schema files are read and compiled while the configuration is validated, so a file
//! that is missing or not a schema is a configuration error (exit 2) in `check` and
//! `run` alike, named by its key, before anything connects.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use super::codec::{Codec, SchemaFormat};
use crate::config::Problems;

const DEFAULT_TIMEOUT: &str = "10s";

#[derive(Deserialize)]
pub struct RawRegistryConfig {
    url: Option<String>,
    username: Option<String>,
    password: Option<SecretString>,
    ca_file: Option<PathBuf>,
    #[serde(default = "default_strategy")]
    subject_strategy: String,
    #[serde(default = "default_register")]
    register: bool,
    #[serde(default = "default_timeout")]
    timeout: String,
}

fn default_strategy() -> String {
    "topic".into()
}
fn default_register() -> bool {
    true
}
fn default_timeout() -> String {
    DEFAULT_TIMEOUT.into()
}

#[derive(Deserialize)]
pub struct RawSchemaEntry {
    aggregate_type: Option<String>,
    event_type: Option<String>,
    format: Option<String>,
    file: Option<PathBuf>,
    version: Option<serde_json::Value>,
    message: Option<String>,
}

/// How a subject is named (Confluent's strategies, for the message value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectStrategy {
    /// `<topic>-value`
    Topic,
    /// `<record's full name>`
    Record,
    /// `<topic>-<record's full name>`
    TopicRecord,
}

impl SubjectStrategy {
    /// The subject for a schema whose record is `record`, on `topic`.
    pub fn subject(self, topic: &str, record: &str) -> String {
        match self {
            SubjectStrategy::Topic => format!("{topic}-value"),
            SubjectStrategy::Record => record.to_owned(),
            SubjectStrategy::TopicRecord => format!("{topic}-{record}"),
        }
    }

    /// Whether the subject depends on the topic.
    pub fn uses_topic(self) -> bool {
        !matches!(self, SubjectStrategy::Record)
    }
}

/// Validated `[sink.kafka.schema_registry]`.
#[derive(Clone)]
pub struct RegistryConfig {
    /// The REST API's base URL, without a trailing slash.
    pub url: String,
    pub username: Option<String>,
    pub password: Option<SecretString>,
    pub ca_file: Option<PathBuf>,
    pub subject_strategy: SubjectStrategy,
    pub register: bool,
    /// How long one request may take.
    pub timeout: Duration,
}

impl std::fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_file", &self.ca_file)
            .field("subject_strategy", &self.subject_strategy)
            .field("register", &self.register)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Where an entry's schema comes from.
#[derive(Debug, Clone)]
pub enum SchemaSource {
    /// A local file, compiled at load time; the registry gives its id.
    File { path: PathBuf, codec: Codec },
    /// A version registered under the subject (`"latest"` is `None`): the registry gives
    /// the schema too.
    Registered { version: Option<u32> },
}

/// One validated `[[sink.kafka.schemas]]` entry.
#[derive(Debug, Clone)]
pub struct SchemaEntry {
    /// `sink.kafka.schemas[N]`, for messages.
    pub key: String,
    pub aggregate_type: String,
    pub event_type: Option<String>,
    pub format: SchemaFormat,
    pub source: SchemaSource,
    /// Protobuf: which message of the file.
    pub message: Option<String>,
}

impl SchemaEntry {
    /// What the entry applies to, for messages: `order` or `order/OrderPlaced`.
    pub fn label(&self) -> String {
        match &self.event_type {
            Some(e) => format!("{}/{e}", self.aggregate_type),
            None => self.aggregate_type.clone(),
        }
    }

    /// Where the schema comes from, for messages.
    pub fn origin(&self) -> String {
        match &self.source {
            SchemaSource::File { path, .. } => path.display().to_string(),
            SchemaSource::Registered { version: Some(v) } => format!("registered version {v}"),
            SchemaSource::Registered { version: None } => "the latest registered version".into(),
        }
    }
}

impl RawRegistryConfig {
    pub fn validate(self, problems: &mut Problems, base: &Path) -> Option<RegistryConfig> {
        let key = |k: &str| format!("sink.kafka.schema_registry.{k}");
        let mut ok = true;
        let url = problems.required(&key("url"), self.url);
        let url = match url.map(|u| u.trim_end_matches('/').to_owned()) {
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
                if reqwest::Url::parse(&u).is_err() {
                    problems.push(key("url"), format!("{u:?} is not a URL"));
                    ok = false;
                }
                if self.ca_file.is_some() && !u.starts_with("https://") {
                    problems.push(
                        key("ca_file"),
                        "only means something with an https:// url: change the url, or \
                         remove the key",
                    );
                    ok = false;
                }
                Some(u)
            }
            Some(u) => {
                problems.push(
                    key("url"),
                    format!("{u:?} must start with http:// or https://"),
                );
                None
            }
            None => None,
        };
        if self.password.is_some() != self.username.is_some() {
            problems.push(
                key("password"),
                "username and password go together (HTTP basic auth): set both or neither",
            );
            ok = false;
        }
        let ca_file = self.ca_file.map(|p| base.join(p));
        if let Some(path) = &ca_file {
            if !path.is_file() {
                problems.push(key("ca_file"), format!("{} is not a file", path.display()));
                ok = false;
            }
        }
        let subject_strategy = match self.subject_strategy.as_str() {
            "topic" => Some(SubjectStrategy::Topic),
            "record" => Some(SubjectStrategy::Record),
            "topic_record" => Some(SubjectStrategy::TopicRecord),
            other => {
                problems.push(
                    key("subject_strategy"),
                    format!(
                        "unknown strategy {other:?}: use \"topic\", \"record\" or \"topic_record\""
                    ),
                );
                None
            }
        };
        let timeout = problems.positive_duration(&key("timeout"), &self.timeout);
        if !ok {
            return None;
        }
        Some(RegistryConfig {
            url: url?,
            username: self.username,
            password: self.password,
            ca_file,
            subject_strategy: subject_strategy?,
            register: self.register,
            timeout: timeout?,
        })
    }
}

/// Validates the entries; `base` is the config file's folder (files are relative to it).
pub fn validate_entries(
    raw: Vec<RawSchemaEntry>,
    strategy: Option<SubjectStrategy>,
    problems: &mut Problems,
    base: &Path,
) -> Option<Vec<SchemaEntry>> {
    let mut entries = Vec::with_capacity(raw.len());
    let mut ok = true;
    for (i, raw) in raw.into_iter().enumerate() {
        let key = format!("sink.kafka.schemas[{i}]");
        match raw.validate(&key, strategy, problems, base) {
            Some(entry) => {
                if let Some(earlier) = entries.iter().find(|e: &&SchemaEntry| {
                    e.aggregate_type == entry.aggregate_type && e.event_type == entry.event_type
                }) {
                    problems.push(
                        &key,
                        format!(
                            "applies to {} like {} does: merge them, or narrow one with \
                             event_type",
                            entry.label(),
                            earlier.key
                        ),
                    );
                    ok = false;
                }
                entries.push(entry);
            }
            None => ok = false,
        }
    }
    ok.then_some(entries)
}

impl RawSchemaEntry {
    fn validate(
        self,
        key: &str,
        strategy: Option<SubjectStrategy>,
        problems: &mut Problems,
        base: &Path,
    ) -> Option<SchemaEntry> {
        let sub = |k: &str| format!("{key}.{k}");
        let aggregate_type = problems.required(&sub("aggregate_type"), self.aggregate_type);
        if aggregate_type.as_deref() == Some("") || self.event_type.as_deref() == Some("") {
            problems.push(
                key,
                "aggregate_type and event_type must not be empty: name the events it applies to",
            );
            return None;
        }
        let format = match problems.required(&sub("format"), self.format)?.as_str() {
            "avro" => SchemaFormat::Avro,
            "protobuf" => SchemaFormat::Protobuf,
            "json_schema" => SchemaFormat::JsonSchema,
            other => {
                problems.push(
                    sub("format"),
                    format!(
                        "unknown format {other:?}: use \"avro\", \"protobuf\" or \"json_schema\""
                    ),
                );
                return None;
            }
        };
        if self.message.is_some() && format != SchemaFormat::Protobuf {
            problems.push(
                sub("message"),
                "names a message of a .proto file: only for format = \"protobuf\"; remove it",
            );
            return None;
        }
        let source = match (self.file, self.version) {
            (Some(_), Some(_)) => {
                problems.push(
                    key,
                    "has both file and version: the schema comes from one of them; remove one",
                );
                return None;
            }
            (None, None) => {
                problems.push(
                    key,
                    "needs file = \"path\" (a schema file, relative to the config file) or \
                     version = N | \"latest\" (a schema already registered)",
                );
                return None;
            }
            (Some(file), None) => {
                let path = base.join(file);
                let text = match std::fs::read_to_string(&path) {
                    Ok(text) => text,
                    Err(e) => {
                        problems.push(sub("file"), format!("cannot read {}: {e}", path.display()));
                        return None;
                    }
                };
                match Codec::compile(format, &text, self.message.as_deref()) {
                    Ok(codec) => SchemaSource::File { path, codec },
                    Err(e) => {
                        problems.push(sub("file"), format!("{}: {e}", path.display()));
                        return None;
                    }
                }
            }
            (None, Some(version)) => {
                let version = match &version {
                    serde_json::Value::String(s) if s == "latest" => None,
                    serde_json::Value::Number(n) => match n.as_u64() {
                        Some(v @ 1..=0x7fff_ffff) => Some(v as u32),
                        _ => {
                            problems
                                .push(sub("version"), format!("{n} is not a version: 1 or more"));
                            return None;
                        }
                    },
                    other => {
                        problems.push(
                            sub("version"),
                            format!("must be a version number or \"latest\", not {other}"),
                        );
                        return None;
                    }
                };
                // The subject of a registered version must be known without the schema:
                // the topic's, or (record strategies) the message that `message` names.
                let named = format == SchemaFormat::Protobuf && self.message.is_some();
                if strategy.is_some_and(|s| s != SubjectStrategy::Topic) && !named {
                    problems.push(
                        sub("version"),
                        "a registered version is found by its subject, and with this \
                         subject_strategy the subject names the record, which only the schema \
                         knows: use subject_strategy = \"topic\", a file, or (protobuf) \
                         message = \"package.Message\"",
                    );
                    return None;
                }
                SchemaSource::Registered { version }
            }
        };
        Some(SchemaEntry {
            key: key.to_owned(),
            aggregate_type: aggregate_type?,
            event_type: self.event_type,
            format,
            source,
            message: self.message,
        })
    }
}
