//! `OUTBOX_RELAY__SECTION__KEY` environment variables laid over the file's keys.
//!
//! Each variable names one key: `OUTBOX_RELAY__SOURCE__POLLING__BATCH_SIZE` is
//! `source.polling.batch_size` (lower case, levels joined by `__`). Its value is taken
//! as a boolean, an integer or a number when it reads as one, else as a string; a key
//! that wants a string gets the text as written (`OUTBOX_RELAY__SOURCE__TABLE=2024`).
//!
//! What goes wrong with a variable is reported against the variable, not the file: a
//! variable that names no key, a value of the wrong type, a value the key refuses.

use std::collections::{BTreeMap, HashSet};

use super::{Problems, ENV_PREFIX};

/// One `OUTBOX_RELAY__…` variable.
#[derive(Debug, Clone)]
pub(super) struct Override {
    var: String,
    value: String,
    /// The key's path, lower case.
    path: Vec<String>,
}

impl Override {
    /// The key as the file would write it: `source.polling.batch_size`.
    pub(super) fn key(&self) -> String {
        self.path.join(".")
    }

    /// `NAME="value"`, or just `NAME` for a key that may hold a secret.
    pub(super) fn shown(&self) -> String {
        let key = self.key();
        let secret = ["url", "password", "secret", "sasl", "ssl", "token", "key"]
            .iter()
            .any(|s| key.contains(s));
        if secret {
            self.var.clone()
        } else {
            format!("{}={:?}", self.var, self.value)
        }
    }

    /// The value as the variable's text suggests.
    fn guessed(&self) -> Option<serde_json::Value> {
        let v = &self.value;
        if let Ok(b) = v.to_lowercase().parse::<bool>() {
            return Some(b.into());
        }
        if let Ok(i) = v.parse::<i64>() {
            return Some(i.into());
        }
        v.parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(serde_json::Value::Number)
    }
}

/// The variables of one environment, in name order.
#[derive(Debug, Default)]
pub(super) struct Overrides {
    vars: Vec<Override>,
    /// Variables that name no key at all (an empty level: `OUTBOX_RELAY__SOURCE____X`).
    malformed: Vec<String>,
    /// Indexes into `vars` of those whose value goes in as a string although it reads as
    /// a number or boolean.
    as_text: HashSet<usize>,
    /// Indexes into `vars` of those left out: their value is of the wrong type (and
    /// reported).
    set_aside: HashSet<usize>,
}

impl Overrides {
    /// The `OUTBOX_RELAY__…` variables of `env`; the others are none of the relay's
    /// business.
    pub(super) fn from_env(env: impl IntoIterator<Item = (String, String)>) -> Overrides {
        let prefix = format!("{ENV_PREFIX}__");
        let vars: BTreeMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .collect();
        let mut overrides = Overrides::default();
        for (var, value) in vars {
            let path: Vec<String> = var[prefix.len()..]
                .split("__")
                .map(str::to_lowercase)
                .collect();
            if path.iter().any(String::is_empty) {
                overrides.malformed.push(var);
            } else {
                overrides.vars.push(Override { var, value, path });
            }
        }
        overrides
    }

    /// Sets every variable's key in `tree` (the file's keys), creating the tables on
    /// the way.
    pub(super) fn apply(&self, tree: &mut serde_json::Value) {
        for (i, o) in self.vars.iter().enumerate() {
            if self.set_aside.contains(&i) {
                continue;
            }
            let value = match o.guessed() {
                Some(v) if !self.as_text.contains(&i) => v,
                _ => serde_json::Value::String(o.value.clone()),
            };
            let mut node = &mut *tree;
            for level in &o.path {
                if !node.is_object() {
                    *node = serde_json::Value::Object(Default::default());
                }
                node = node
                    .as_object_mut()
                    .expect("made an object above")
                    .entry(level.clone())
                    .or_insert(serde_json::Value::Null);
            }
            *node = value;
        }
    }

    /// After a type error at `key`: when a variable set it to a value guessed as a
    /// number or boolean, it goes in as text from now on (true when it changed).
    pub(super) fn retry_as_text(&mut self, key: &str) -> bool {
        match self.index_of(key) {
            Some(i) if self.vars[i].guessed().is_some() && !self.as_text.contains(&i) => {
                self.as_text.insert(i);
                true
            }
            _ => false,
        }
    }

    /// The variable that set `key` (the last one, when several name it).
    pub(super) fn setting(&self, key: &str) -> Option<&Override> {
        self.index_of(key).map(|i| &self.vars[i])
    }

    fn index_of(&self, key: &str) -> Option<usize> {
        (0..self.vars.len())
            .rev()
            .find(|i| !self.set_aside.contains(i) && self.vars[*i].key() == key)
    }

    /// Leaves out the variable that set `key`: the key keeps the file's value.
    pub(super) fn set_aside(&mut self, key: &str) -> Option<Override> {
        let i = self.index_of(key)?;
        self.set_aside.insert(i);
        Some(self.vars[i].clone())
    }

    /// The variable whose key lies in the unknown key `unknown` (serde names the first
    /// unknown level: `foo` for `OUTBOX_RELAY__FOO__BAR`).
    pub(super) fn under(&self, unknown: &str) -> Option<&Override> {
        self.vars.iter().rev().find(|o| {
            let key = o.key();
            key == unknown || key.starts_with(&format!("{unknown}."))
        })
    }

    /// Reports the variables that name no key.
    pub(super) fn report_malformed(&self, problems: &mut Problems) {
        for var in &self.malformed {
            problems.push_from_env(
                var[ENV_PREFIX.len() + 2..]
                    .to_lowercase()
                    .replace("__", "."),
                var.clone(),
                format!(
                    "names no configuration key: write {ENV_PREFIX}__ and the key's path in \
                     upper case, levels joined by __ (e.g. {ENV_PREFIX}__SOURCE__DATABASE_URL)"
                ),
            );
        }
    }
}
