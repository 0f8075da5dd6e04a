//! `[http]`: where the monitoring endpoints listen.

use std::net::SocketAddr;

use serde::Deserialize;

use crate::config::Problems;

#[derive(Deserialize)]
#[serde(default)]
pub struct RawHttpConfig {
    listen: String,
}

impl Default for RawHttpConfig {
    fn default() -> Self {
        RawHttpConfig {
            listen: "0.0.0.0:9187".into(),
        }
    }
}

/// Validated `[http]`.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
}

impl RawHttpConfig {
    pub fn validate(self, problems: &mut Problems) -> Option<HttpConfig> {
        match self.listen.parse() {
            Ok(listen) => Some(HttpConfig { listen }),
            Err(_) => {
                problems.push(
                    "http.listen",
                    format!(
                        "{:?} is not an address: write IP:PORT, e.g. \"0.0.0.0:9187\"",
                        self.listen
                    ),
                );
                None
            }
        }
    }
}
