//! The registry behind https and basic auth, as it usually runs in production: a TLS
//! front with a CA of the test's own that checks the credentials and passes requests on
//! to the real registry. The relay trusts that CA through `ca_file`; a wrong password is
//! a configuration error that names the registry's URL.

use std::sync::Arc;

use base64::prelude::{Engine as _, BASE64_STANDARD};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::schemas::{decode_independently, entry, shared_registry, write_file};
use crate::support::{insert_event, load_toml, run_error, Env, RunningRelay};

const V1: &str = r#"{"type": "record", "name": "Order", "namespace": "shop",
  "fields": [{"name": "id", "type": "string"}]}"#;

/// Serves https on a free port with `dir`'s server.crt/server.key, lets through requests
/// whose basic auth is `user:password`, answers 401 to the others; returns the port.
async fn tls_front(dir: &std::path::Path, upstream: String, user_password: &str) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(dir.join("server.crt"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let expected = format!("basic {}", BASE64_STANDARD.encode(user_password)).to_lowercase();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let upstream = upstream.clone();
            let expected = expected.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = pass_on(tls, &upstream, &expected).await;
                }
            });
        }
    });
    port
}

/// One request: checked, sent on with `Connection: close`, the answer sent back.
async fn pass_on(
    mut client: tokio_rustls::server::TlsStream<TcpStream>,
    upstream: &str,
    expected_auth: &str,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let authorized = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.eq_ignore_ascii_case("authorization") && v.trim().to_lowercase() == expected_auth
        })
    });
    if !authorized {
        let body = r#"{"error_code":401,"message":"Unauthorized"}"#;
        let answer = format!(
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        client.write_all(answer.as_bytes()).await?;
        return client.shutdown().await;
    }
    let mut forwarded = String::new();
    for line in head.lines().filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
        if name != "connection" && name != "host" {
            forwarded.push_str(line);
            forwarded.push_str("\r\n");
        }
    }
    forwarded.push_str(&format!("Host: {upstream}\r\nConnection: close\r\n\r\n"));
    let mut server = TcpStream::connect(upstream).await?;
    server.write_all(forwarded.as_bytes()).await?;
    server.write_all(&buf[head_end..]).await?;
    let mut answer = Vec::new();
    server.read_to_end(&mut answer).await?;
    client.write_all(&answer).await?;
    client.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_ca_file_and_basic_auth_reach_the_registry() {
    let env = Env::start().await;
    let registry = shared_registry();
    let dir = tempfile::tempdir().unwrap();
    crate::tls::make_certs(dir.path(), "registry-ca");
    // http://127.0.0.1:PORT/apis/ccompat/v7 → 127.0.0.1:PORT and the path.
    let rest = registry.url.strip_prefix("http://").unwrap();
    let (upstream, path) = rest.split_once('/').unwrap();
    let port = tls_front(dir.path(), upstream.to_owned(), "relay:s3cret").await;
    let url = format!("https://localhost:{port}/{path}");
    let file = write_file(dir.path(), "order.avsc", V1);
    let ca = dir.path().join("ca.pem");
    let section = |password: &str| {
        format!(
            "[sink.kafka.schema_registry]\nurl = \"{url}\"\nca_file = \"{}\"\nusername = \"relay\"\npassword = \"{password}\"\ntimeout = \"5s\"\n{}",
            ca.display(),
            entry("order", "avro", &file, "")
        )
    };
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    insert_event(&db, "order", "o-1", "Placed", r#"{"id": "o-1"}"#).await;

    let wrong = env.config_toml("polling", "", &section("guess"));
    let error = run_error(load_toml(&wrong)).await;
    assert!(error.contains("401") && error.contains(&url), "{error}");
    assert!(
        !error.contains("guess"),
        "the password is never shown: {error}"
    );
    assert_eq!(env.outbox_count().await, 1);

    let right = env.config_toml("polling", "", &section("s3cret"));
    let relay = RunningRelay::start(load_toml(&right));
    let got = env.consume(&["outbox.order"], 1, 30).await;
    relay.stop().await;
    let decoded = decode_independently(&registry.url, &got.iter().collect::<Vec<_>>());
    assert_eq!(decoded[0]["value"], json!({"id": "o-1"}));
}
