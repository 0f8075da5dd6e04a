//! A client for the Confluent Schema Registry REST API (Confluent's, Apicurio's
//! `/apis/ccompat/v7`, Karapace…): the four calls the relay makes.
//!
//! Every answer is read strictly: a status or body the relay does not recognise is an
//! error naming the URL, never taken as "not found" or "compatible".

use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;

use super::codec::{Codec, SchemaFormat};
use super::config::RegistryConfig;

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("the schema registry at {url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the schema registry answered {status} to {url}: {message} (error code {code})")]
    Refused {
        url: String,
        status: u16,
        code: i64,
        message: String,
    },
    #[error(
        "the schema registry's answer to {url} is not one the relay understands ({status}): \
         {body}"
    )]
    Unrecognised {
        url: String,
        status: u16,
        body: String,
    },
    #[error("cannot set up the schema registry client: {0}")]
    Client(String),
}

impl RegistryError {
    /// Worth asking again later: the registry is down, overloaded or failing inside.
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. } => true,
            RegistryError::Refused { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    /// The registry's error code, when it gave one.
    fn code(&self) -> Option<i64> {
        match self {
            RegistryError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A schema as registered under a subject.
#[derive(Debug, Clone)]
pub struct Registered {
    pub id: u32,
    pub version: Option<i64>,
}

/// A registered version with its text, as `GET /subjects/S/versions/V` gives it.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub id: u32,
    pub version: i64,
    pub format: SchemaFormat,
    pub text: String,
}

/// What the compatibility endpoint says of a schema for a subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compatibility {
    Compatible,
    /// The subject has no version yet: nothing to break.
    NewSubject,
    /// The registry's reasons.
    Incompatible(Vec<String>),
}

pub struct Registry {
    client: reqwest::Client,
    base: Url,
    /// The URL as configured, for messages (never with credentials).
    shown: String,
    auth: Option<(String, SecretString)>,
}

/// The registry's error body: `{"error_code": 40401, "message": "…"}`.
#[derive(Deserialize)]
struct ErrorBody {
    error_code: i64,
    message: Option<String>,
}

impl Registry {
    pub fn new(config: &RegistryConfig) -> Result<Registry, RegistryError> {
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)));
        // Always a TLS setup of the relay's own (ring, these roots): reqwest built without a
        // crypto provider has no default to fall back on. Plain http never uses it.
        let roots = if config.url.starts_with("https://") {
            crate::source::tls::roots(
                config.ca_file.as_deref(),
                "sink.kafka.schema_registry.ca_file",
            )
            .map_err(RegistryError::Client)?
        } else {
            rustls::RootCertStore::empty()
        };
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| RegistryError::Client(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        builder = builder.tls_backend_preconfigured(tls);
        let client = builder
            .build()
            .map_err(|e| RegistryError::Client(e.to_string()))?;
        let base = Url::parse(&format!("{}/", config.url))
            .map_err(|e| RegistryError::Client(format!("{}: {e}", config.url)))?;
        Ok(Registry {
            client,
            base,
            shown: config.url.clone(),
            auth: config.username.clone().zip(config.password.clone()),
        })
    }

    /// `POST /subjects/S/versions`: registers (or finds) the schema; its id.
    pub async fn register(&self, subject: &str, codec: &Codec) -> Result<u32, RegistryError> {
        #[derive(Deserialize)]
        struct Answer {
            id: u32,
        }
        let url = self.url(&["subjects", subject, "versions"]);
        let answer: Answer = self
            .call(Method::POST, url, Some(schema_body(codec)))
            .await?;
        Ok(answer.id)
    }

    /// `POST /subjects/S`: the schema's id and version under the subject, if registered.
    pub async fn lookup(
        &self,
        subject: &str,
        codec: &Codec,
    ) -> Result<Option<Registered>, RegistryError> {
        #[derive(Deserialize)]
        struct Answer {
            id: u32,
            version: Option<i64>,
        }
        let url = self.url(&["subjects", subject]);
        match self
            .call::<Answer>(Method::POST, url, Some(schema_body(codec)))
            .await
        {
            Ok(a) => Ok(Some(Registered {
                id: a.id,
                version: a.version,
            })),
            // Subject not found, schema not found.
            Err(e) if matches!(e.code(), Some(40401 | 40403)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET /subjects/S/versions/V` (`None`: latest).
    pub async fn version(
        &self,
        subject: &str,
        version: Option<u32>,
    ) -> Result<Option<Fetched>, RegistryError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Answer {
            id: u32,
            version: i64,
            schema: String,
            schema_type: Option<String>,
        }
        let v = version.map_or("latest".to_owned(), |v| v.to_string());
        let url = self.url(&["subjects", subject, "versions", &v]);
        let a = match self.call::<Answer>(Method::GET, url.clone(), None).await {
            Ok(a) => a,
            // Subject not found, version not found.
            Err(e) if matches!(e.code(), Some(40401 | 40402)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let format =
            SchemaFormat::from_registry_type(a.schema_type.as_deref()).ok_or_else(|| {
                RegistryError::Unrecognised {
                    url: url.to_string(),
                    status: 200,
                    body: format!("schemaType {:?}", a.schema_type),
                }
            })?;
        Ok(Some(Fetched {
            id: a.id,
            version: a.version,
            format,
            text: a.schema,
        }))
    }

    /// `POST /compatibility/subjects/S/versions/latest?verbose=true`: would the registry
    /// take this schema as the subject's next version?
    pub async fn compatibility(
        &self,
        subject: &str,
        codec: &Codec,
    ) -> Result<Compatibility, RegistryError> {
        #[derive(Deserialize)]
        struct Answer {
            is_compatible: bool,
            #[serde(default)]
            messages: Vec<String>,
        }
        let mut url = self.url(&["compatibility", "subjects", subject, "versions", "latest"]);
        url.query_pairs_mut().append_pair("verbose", "true");
        match self
            .call::<Answer>(Method::POST, url, Some(schema_body(codec)))
            .await
        {
            Ok(a) if a.is_compatible => Ok(Compatibility::Compatible),
            Ok(a) => Ok(Compatibility::Incompatible(a.messages)),
            Err(e) if matches!(e.code(), Some(40401 | 40402)) => Ok(Compatibility::NewSubject),
            Err(e) => Err(e),
        }
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("an http(s) URL has a path")
            .pop_if_empty()
            .extend(segments);
        url
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<serde_json::Value>,
    ) -> Result<T, RegistryError> {
        let shown = url.to_string();
        let mut request = self
            .client
            .request(method, url)
            .header(reqwest::header::ACCEPT, CONTENT_TYPE);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
                .body(body.to_string());
        }
        if let Some((user, password)) = &self.auth {
            request = request.basic_auth(user, Some(password.expose_secret()));
        }
        let response = request
            .send()
            .await
            .map_err(|e| RegistryError::Unreachable {
                url: self.shown.clone(),
                reason: error_chain(&e),
            })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| RegistryError::Unreachable {
                url: self.shown.clone(),
                reason: error_chain(&e),
            })?;
        if status == StatusCode::OK {
            return serde_json::from_str(&text).map_err(|_| RegistryError::Unrecognised {
                url: shown,
                status: status.as_u16(),
                body: clip(&text),
            });
        }
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(e) => Err(RegistryError::Refused {
                url: shown,
                status: status.as_u16(),
                code: e.error_code,
                message: e.message.unwrap_or_default(),
            }),
            Err(_) if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS => {
                Err(RegistryError::Refused {
                    url: shown,
                    status: status.as_u16(),
                    code: 0,
                    message: clip(&text),
                })
            }
            Err(_) => Err(RegistryError::Unrecognised {
                url: shown,
                status: status.as_u16(),
                body: clip(&text),
            }),
        }
    }
}

fn schema_body(codec: &Codec) -> serde_json::Value {
    json!({
        "schema": codec.text(),
        "schemaType": codec.format().registry_type(),
    })
}

/// An error with its causes: reqwest's own text is only "error sending request".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The start of a body, for a message.
fn clip(text: &str) -> String {
    let mut end = text.len().min(300);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if end < text.len() {
        format!("{}…", &text[..end])
    } else if text.is_empty() {
        "(empty body)".into()
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::kafka::schema::config::SubjectStrategy;

    /// Answers every request on a free port with `status` and `body`; its URL.
    async fn fake(status: &'static str, body: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 8192];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            }
        });
        url
    }

    fn registry(url: &str) -> Registry {
        Registry::new(&RegistryConfig {
            url: url.to_owned(),
            username: None,
            password: None,
            ca_file: None,
            subject_strategy: SubjectStrategy::Topic,
            register: true,
            timeout: Duration::from_secs(2),
        })
        .unwrap()
    }

    fn codec() -> Codec {
        Codec::compile(SchemaFormat::JsonSchema, r#"{"type": "object"}"#, None).unwrap()
    }

    #[tokio::test]
    async fn answers_it_does_not_understand_are_errors_naming_the_url_never_guesses() {
        for (status, body) in [
            ("200 OK", "<html>hi</html>"),
            ("200 OK", "{}"),
            ("404 Not Found", "no such page"),
            ("302 Found", ""),
            ("401 Unauthorized", "go away"),
        ] {
            let url = fake(status, body).await;
            let e = registry(&url)
                .lookup("orders-value", &codec())
                .await
                .unwrap_err();
            assert!(
                matches!(e, RegistryError::Unrecognised { .. }),
                "{status} {body:?}: {e}"
            );
            assert!(e.to_string().contains(&url), "{e}");
            assert!(!e.is_retryable());
        }
    }

    #[tokio::test]
    async fn not_found_is_only_the_registrys_own_codes() {
        let url = fake(
            "404 Not Found",
            r#"{"error_code":40401,"message":"Subject not found"}"#,
        )
        .await;
        assert!(registry(&url)
            .lookup("s", &codec())
            .await
            .unwrap()
            .is_none());
        let url = fake(
            "409 Conflict",
            r#"{"error_code":409,"message":"incompatible: [a]"}"#,
        )
        .await;
        let e = registry(&url).register("s", &codec()).await.unwrap_err();
        assert!(
            matches!(e, RegistryError::Refused { status: 409, .. }),
            "{e}"
        );
        assert!(!e.is_retryable());
        let url = fake("503 Service Unavailable", "busy").await;
        let e = registry(&url).register("s", &codec()).await.unwrap_err();
        assert!(e.is_retryable(), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_registry_is_retryable_and_named() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let e = registry(&url).lookup("s", &codec()).await.unwrap_err();
        assert!(e.is_retryable() && e.to_string().contains(&url), "{e}");
    }
}
