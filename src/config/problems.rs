//! The list of configuration problems that validation accumulates.

use std::fmt;
use std::time::Duration;

/// One thing wrong with the configuration: the full key and what is allowed instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key as written in the TOML file, e.g. `source.polling.interval`.
    pub key: String,
    pub message: String,
    /// The environment variable that set the key, when one did: `NAME="value"`, or just
    /// `NAME` for a key that may hold a secret.
    pub from_env: Option<String>,
}

/// Every problem found while validating, in the order found.
#[derive(Debug, Default, Clone)]
pub struct Problems(Vec<Problem>);

impl Problems {
    pub fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
            from_env: None,
        });
    }

    /// A problem with a key an environment variable set (`var`: how to show it).
    pub fn push_from_env(
        &mut self,
        key: impl Into<String>,
        var: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
            from_env: Some(var.into()),
        });
    }

    /// Whether an environment variable caused any of the problems.
    pub fn any_from_env(&self) -> bool {
        self.0.iter().any(|p| p.from_env.is_some())
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Problem> {
        self.0.iter_mut()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_slice(&self) -> &[Problem] {
        &self.0
    }

    /// Returns the value, or records that the key is missing.
    pub fn required<T>(&mut self, key: &str, value: Option<T>) -> Option<T> {
        if value.is_none() {
            self.push(key, "missing: this key is required");
        }
        value
    }

    /// Parses a human duration such as `100ms`, `10s` or `1m 30s`.
    pub fn duration(&mut self, key: &str, raw: &str) -> Option<Duration> {
        match humantime::parse_duration(raw.trim()) {
            Ok(d) => Some(d),
            Err(e) => {
                self.push(
                    key,
                    format!("invalid duration {raw:?} ({e}); write it like \"100ms\", \"10s\" or \"1m\""),
                );
                None
            }
        }
    }

    /// Like [`Problems::duration`], but zero is refused.
    pub fn positive_duration(&mut self, key: &str, raw: &str) -> Option<Duration> {
        let d = self.duration(key, raw)?;
        if d.is_zero() {
            self.push(key, format!("must be greater than zero, got {raw:?}"));
            return None;
        }
        Some(d)
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match &p.from_env {
                Some(var) if p.key.is_empty() => write!(f, "  - {var}: {}", p.message)?,
                Some(var) => write!(f, "  - {var}: {}: {}", p.key, p.message)?,
                None => write!(f, "  - {}: {}", p.key, p.message)?,
            }
        }
        Ok(())
    }
}
