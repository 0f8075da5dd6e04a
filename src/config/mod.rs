//! Loading and validating the relay's configuration
//! ([design §9](../../docs/design.md#9-configuration); every key is in docs/configuration.md).
//!
//! Configuration is read in two stages, so that an operator sees every problem in one
//! go instead of fixing them one restart at a time:
//!
//! 1. **Raw**: the TOML file, overlaid by `OUTBOX_RELAY__SECTION__KEY` environment
//!    variables ([`env`]), is deserialized into plain serde structs (`Raw*`, each living
//!    beside the component it configures). Unknown keys are collected, not fatal at the
//!    first one.
//! 2. **Validated**: each component turns its raw struct into typed values (`Duration`,
//!    `NonZeroUsize`, parsed templates), pushing every problem it finds into [`Problems`]
//!    with the full key that caused it.
//!
//! Only when both stages report nothing does [`load`] return a [`Config`].
//!
//! A problem with a key an environment variable set names the variable (and its value,
//! unless the key may hold a secret); a variable that names no key is a problem too.

mod env;
mod problems;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use problems::{Problem, Problems};

use crate::http::{HttpConfig, RawHttpConfig};
use crate::relay::{RawRelayConfig, RelayConfig};
use crate::sink::kafka::{KafkaSinkConfig, RawKafkaSinkConfig};
use crate::source::{RawSourceConfig, SourceConfig};

/// Prefix of the environment variables that override file keys:
/// `OUTBOX_RELAY__SOURCE__DATABASE_URL` overrides `source.database_url`.
pub const ENV_PREFIX: &str = "OUTBOX_RELAY";

/// The whole, validated configuration of one relay process.
///
/// Deliberately not `Serialize` and not `Debug`-printed anywhere: it holds the database
/// credentials (see [`SourceConfig::redacted_url`] for what may be shown).
pub struct Config {
    pub source: SourceConfig,
    pub sink: KafkaSinkConfig,
    pub relay: RelayConfig,
    pub http: HttpConfig,
}

/// Why a configuration could not be loaded. Every variant maps to exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} not found (pass an existing file with --config)")]
    NotFound { path: PathBuf },
    #[error("cannot read config {path}: {message}")]
    Unreadable { path: PathBuf, message: String },
    #[error("invalid configuration in {path}{}:\n{problems}", env_note(.problems))]
    Invalid { path: PathBuf, problems: Problems },
}

/// Which overrides a [`ConfigError::Invalid`] is about, beside its file.
fn env_note(problems: &Problems) -> &'static str {
    if problems.any_from_env() {
        " with its OUTBOX_RELAY__ environment overrides"
    } else {
        ""
    }
}

impl ConfigError {
    /// The individual problems, when the file was readable but wrong.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems.as_slice(),
            _ => &[],
        }
    }
}

#[derive(Deserialize)]
struct RawConfig {
    source: Option<RawSourceConfig>,
    sink: Option<RawSinkConfig>,
    #[serde(default)]
    relay: RawRelayConfig,
    #[serde(default)]
    http: RawHttpConfig,
}

#[derive(Deserialize)]
struct RawSinkConfig {
    kafka: Option<RawKafkaSinkConfig>,
}

/// Loads `path`, applies the process environment's `OUTBOX_RELAY__…` overrides and
/// validates the result.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with_env(path, std::env::vars().collect())
}

/// [`load`] with an explicit environment, so tests never touch the process's own.
pub fn load_with_env(path: &Path, env: HashMap<String, String>) -> Result<Config, ConfigError> {
    if !path.is_file() {
        return Err(ConfigError::NotFound {
            path: path.to_path_buf(),
        });
    }
    let file = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize::<serde_json::Value>())
        .map_err(|e| ConfigError::Unreadable {
            path: path.to_path_buf(),
            message: without_source_lines(&e.to_string()),
        })?;
    // Files the configuration names (schemas, a CA file) are relative to its folder.
    let base = path.parent().unwrap_or(Path::new("."));
    validate(file, env::Overrides::from_env(env), base).map_err(|problems| ConfigError::Invalid {
        path: path.to_path_buf(),
        problems,
    })
}

/// A TOML syntax error quotes the offending line, and that line may be the one with
/// the database password in it: keep the position and the complaint, drop the quote.
fn without_source_lines(message: &str) -> String {
    let is_quote = |line: &str| {
        let t = line.trim_start();
        let t = t
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start();
        t.starts_with('|')
    };
    let kept: Vec<&str> = message
        .lines()
        .filter(|l| !is_quote(l) && !l.trim().is_empty())
        .collect();
    kept.join(" ")
}

/// Validates TOML text (no file, no environment): what the fuzz target feeds.
pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
    let value = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize::<serde_json::Value>())
        .map_err(|e| ConfigError::Unreadable {
            path: PathBuf::from("<text>"),
            message: without_source_lines(&e.to_string()),
        })?;
    from_value(value).map_err(|problems| ConfigError::Invalid {
        path: PathBuf::from("<text>"),
        problems,
    })
}

/// Validates an already merged configuration tree.
pub fn from_value(value: serde_json::Value) -> Result<Config, Problems> {
    validate(value, env::Overrides::default(), Path::new("."))
}

/// The raw configuration, or the key where deserializing stopped and why; and the
/// unknown keys met on the way.
type Deserialized = (Result<RawConfig, (String, String)>, Vec<String>);

fn deserialize(value: &serde_json::Value) -> Deserialized {
    let mut unknown = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let raw: Result<RawConfig, _> = serde_ignored::deserialize(
        serde_path_to_error::Deserializer::new(value, &mut track),
        |path| unknown.push(dotted(&path)),
    );
    let raw = raw.map_err(|e| (track.path().to_string(), e.to_string()));
    (raw, unknown)
}

/// Validates the file's tree with the environment's overrides laid over it.
fn validate(
    file: serde_json::Value,
    mut overrides: env::Overrides,
    base: &Path,
) -> Result<Config, Problems> {
    let mut problems = Problems::default();
    overrides.report_malformed(&mut problems);
    let (raw, unknown) = loop {
        let mut value = file.clone();
        overrides.apply(&mut value);
        match deserialize(&value) {
            // A variable's text that read as a number or boolean, where a string is
            // wanted (`OUTBOX_RELAY__SOURCE__TABLE=2024`): it is the text.
            (Err((key, _)), _) if overrides.retry_as_text(&key) => continue,
            // A variable's value of the wrong type: reported, and the variable set aside
            // so that the others are checked too.
            (Err((key, message)), _) if overrides.setting(&key).is_some() => {
                let o = overrides.set_aside(&key).expect("a variable sets the key");
                let message = match in_words(&message) {
                    Some((expected, _)) => {
                        let single =
                            if expected.starts_with("a list") || expected.starts_with("a table") {
                                " (set it in the file: a variable holds a single value)"
                            } else {
                                ""
                            };
                        format!("must be {expected}{single}")
                    }
                    None => message,
                };
                problems.push_from_env(&key, o.shown(), message);
            }
            done => break done,
        }
    };
    for key in unknown {
        match overrides.under(&key) {
            Some(o) => problems.push_from_env(
                o.key(),
                o.shown(),
                "names no configuration key: remove the variable or fix its name (every key \
                 is listed in docs/configuration.md)",
            ),
            None => problems.push(
                key,
                "unknown key: remove it or fix its spelling (every key is listed in docs/configuration.md)",
            ),
        }
    }
    let result = match raw {
        Ok(raw) => validate_raw(raw, &mut problems, base),
        // The file's own value of the wrong type.
        Err((key, message)) => {
            match in_words(&message) {
                Some((expected, got)) => {
                    problems.push(&key, format!("must be {expected}, not {got}"))
                }
                None => problems.push(key, message),
            }
            None
        }
    };
    // Problems the components found with keys a variable set.
    for p in problems.iter_mut().filter(|p| p.from_env.is_none()) {
        if let Some(o) = overrides.setting(&p.key) {
            p.from_env = Some(o.shown());
        }
    }
    match result {
        Some(config) if problems.is_empty() => Ok(config),
        _ => Err(problems),
    }
}

/// serde's "invalid type: string \"abc\", expected usize" in words: what the key must be
/// ("a positive integer") and what it got (`string "abc"`).
fn in_words(message: &str) -> Option<(&'static str, &str)> {
    let rest = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))?;
    let (got, expected) = rest.rsplit_once(", expected ")?;
    let expected = match expected {
        // Every integer key of the relay is a count or size of at least 1; its range is
        // checked once it is a number.
        "usize" | "u64" | "u32" | "u16" | "u8" => "a positive integer",
        "isize" | "i64" | "i32" | "i16" | "i8" => "an integer",
        "f64" | "f32" => "a number",
        "a boolean" => "true or false",
        "a string" | "a borrowed string" | "path string" => "a string",
        "a sequence" => "a list of strings",
        e if e.starts_with("struct ") || e == "a map" => "a table of keys",
        _ => return None,
    };
    Some((expected, got))
}

/// Stage 2: each component validates its raw section.
fn validate_raw(raw: RawConfig, problems: &mut Problems, base: &Path) -> Option<Config> {
    let source = problems
        .required("source", raw.source)
        .and_then(|s| s.validate(problems));
    let sink = problems
        .required("sink", raw.sink)
        .and_then(|s| problems.required("sink.kafka", s.kafka))
        .and_then(|k| k.validate(problems, base));
    let relay = raw.relay.validate(problems);
    let http = raw.http.validate(problems);

    match (source, sink, relay, http) {
        (Some(source), Some(sink), Some(_), Some(_))
            if source.mode == crate::source::Mode::Logical
                && source.logical.shards > 1
                && sink.delivery == crate::sink::kafka::DeliveryMode::ExactlyOnce =>
        {
            // The checkpoint holds one position per outbox; a sharded outbox has one per
            // slot.
            problems.push(
                "source.logical.shards",
                format!(
                    "{} shards with sink.kafka.delivery = \"exactly_once\": exactly-once \
                     keeps one log position per outbox in its checkpoint and cannot yet keep \
                     one per shard; use shards = 1 with exactly-once, or at_least_once",
                    source.logical.shards
                ),
            );
            None
        }
        (Some(source), Some(mut sink), Some(relay), Some(http)) => {
            // A body too large for the dead-letter topic has somewhere to go only with a
            // dead-letter table: without one the sink must not report it dead-lettered.
            sink.metadata_dead_letters = source.dead_letter_table.is_some();
            Some(Config {
                source,
                sink,
                relay,
                http,
            })
        }
        _ => None,
    }
}

/// `source.polling.intervall` rather than serde_ignored's `source.?.polling.intervall`:
/// the key as the operator wrote it.
fn dotted(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", dotted(parent)),
        Path::Map { parent, key } => {
            let parent = dotted(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => dotted(parent),
    }
}

#[cfg(test)]
mod tests;
