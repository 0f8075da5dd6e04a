//! TLS to PostgreSQL, libpq style: `sslmode` (disable, prefer, require, verify-ca,
//! verify-full) and `sslrootcert` in `source.database_url`, for the ordinary and the
//! replication connection alike (rustls with the *ring* provider).
//!
//! As in libpq, `require` encrypts without checking the certificate (unless
//! `sslrootcert` is given: then it is `verify-ca`), `verify-ca` checks it against the
//! roots (`sslrootcert`, or the system's), `verify-full` also checks that it names the
//! host.
//!
//! Unlike libpq, the default is not `prefer` everywhere: it is `verify-full` (with the
//! system's roots) for any host that is not loopback or a Unix socket, so a password is
//! never sent in clear, or to an impostor, across a network unless the URL says so.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error, RootCertStore, SignatureScheme,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// The TLS settings of the database connections.
#[derive(Clone)]
pub struct Tls {
    pub mode: SslMode,
    /// Why this mode: what the URL said, or the default and its reason.
    origin: &'static str,
    config: Option<Arc<ClientConfig>>,
}

impl Tls {
    /// Builds the settings from libpq's `sslmode` and `sslrootcert`. Without `sslmode`:
    /// `prefer` when every host is `local` (loopback or a Unix socket), else
    /// `verify-full`.
    pub fn new(mode: Option<&str>, root_cert: Option<&Path>, local: bool) -> Result<Tls, String> {
        let origin = match (mode, local) {
            (Some(_), _) => "set by sslmode in source.database_url",
            (None, true) => "the default for a loopback host or Unix socket",
            (None, false) => "the default for a host that is not loopback",
        };
        let default = if local { "prefer" } else { "verify-full" };
        let mode = match mode.unwrap_or(default) {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other} is not known: use disable, prefer, require, verify-ca or verify-full"
                ))
            }
        };
        // libpq: with a root certificate given, `require` verifies the chain.
        let mode = if mode == SslMode::Require && root_cert.is_some() {
            SslMode::VerifyCa
        } else {
            mode
        };
        if mode == SslMode::Disable {
            return Ok(Tls {
                mode,
                origin,
                config: None,
            });
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let config = match mode {
            SslMode::Prefer | SslMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
                .with_no_client_auth(),
            _ => {
                let roots = Arc::new(roots(root_cert, "sslrootcert")?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| e.to_string())?;
                let verifier: Arc<dyn ServerCertVerifier> = if mode == SslMode::VerifyCa {
                    Arc::new(AnyName(webpki))
                } else {
                    webpki
                };
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_no_client_auth()
            }
        };
        Ok(Tls {
            mode,
            origin,
            config: Some(Arc::new(config)),
        })
    }

    /// The mode in effect and why, for `check`.
    pub fn describe(&self) -> String {
        let mode = match self.mode {
            SslMode::Disable => "disable (no TLS)",
            SslMode::Prefer => "prefer (TLS if the server offers it, certificate not checked)",
            SslMode::Require => "require (TLS, certificate not checked)",
            SslMode::VerifyCa => "verify-ca (TLS, certificate chain checked)",
            SslMode::VerifyFull => "verify-full (TLS, certificate and host name checked)",
        };
        format!("{mode}, {}", self.origin)
    }

    /// The rustls configuration, unless TLS is disabled.
    pub fn client_config(&self) -> Option<Arc<ClientConfig>> {
        self.config.clone()
    }

    /// The mode as tokio-postgres understands it (it verifies nothing itself).
    pub fn pg_mode(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }
}

/// Splits libpq's `sslmode` and `sslrootcert` out of a connection string (URL or
/// key=value form), since tokio-postgres knows only some of their values.
pub fn split_params(url: &str) -> (String, Option<String>, Option<String>) {
    let (mut mode, mut root) = (None, None);
    let mut take = |key: &str, value: &str| match key {
        "sslmode" => {
            mode = Some(value.to_owned());
            true
        }
        "sslrootcert" => {
            root = Some(value.to_owned());
            true
        }
        _ => false,
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|kv| !kv.split_once('=').is_some_and(|(k, v)| take(k, v)))
                    .collect();
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            None => url.to_owned(),
        }
    } else {
        url.split_whitespace()
            .filter(|kv| !kv.split_once('=').is_some_and(|(k, v)| take(k, v)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    (rest, mode, root)
}

/// The roots in the PEM file at `path` (named `what` in errors), else the system's.
pub(crate) fn roots(path: Option<&Path>, what: &str) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match path {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("{what} {}: {e}", path.display()))?;
                store
                    .add(cert)
                    .map_err(|e| format!("{what} {}: {e}", path.display()))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = store.add(cert);
            }
        }
    }
    if store.is_empty() {
        return Err(format!(
            "no root certificate to verify the server with: set {what}"
        ));
    }
    Ok(store)
}

/// `sslmode=require`/`prefer`: encrypted, certificate not checked (libpq's meaning).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must be trusted; the name need not match.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(Error::InvalidCertificate(CertificateError::NotValidForName))
            | Err(Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_tls_params_from_both_forms() {
        let (rest, mode, root) = split_params(
            "postgres://u:p@h:5/db?sslmode=verify-full&application_name=x&sslrootcert=/ca.pem",
        );
        assert_eq!(rest, "postgres://u:p@h:5/db?application_name=x");
        assert_eq!(
            (mode.as_deref(), root.as_deref()),
            (Some("verify-full"), Some("/ca.pem"))
        );
        let (rest, mode, _) = split_params("host=h user=u sslmode=require dbname=d");
        assert_eq!(rest, "host=h user=u dbname=d");
        assert_eq!(mode.as_deref(), Some("require"));
        assert_eq!(split_params("postgres://u@h/db").0, "postgres://u@h/db");
    }

    #[test]
    fn unknown_modes_and_missing_roots_are_errors() {
        assert!(Tls::new(Some("maybe"), None, true)
            .err()
            .unwrap()
            .contains("sslmode=maybe"));
        let e = Tls::new(
            Some("verify-full"),
            Some(Path::new("/nonexistent/ca.pem")),
            true,
        )
        .err()
        .unwrap();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn the_default_verifies_every_host_that_is_not_local() {
        let local = Tls::new(None, None, true).unwrap();
        assert_eq!(local.mode, SslMode::Prefer);
        assert!(
            local.describe().contains("loopback"),
            "{}",
            local.describe()
        );
        if rustls_native_certs::load_native_certs().certs.is_empty() {
            return; // no system roots on this machine: verify-full cannot be built
        }
        let remote = Tls::new(None, None, false).unwrap();
        assert_eq!(remote.mode, SslMode::VerifyFull);
        assert!(remote.describe().starts_with("verify-full"));
        let explicit = Tls::new(Some("disable"), None, false).unwrap();
        assert_eq!(explicit.mode, SslMode::Disable, "the URL wins");
    }

    #[test]
    fn require_with_a_root_certificate_verifies_the_chain_as_libpq_does() {
        let pem = std::env::temp_dir().join(format!("outbox-relay-ca-{}.pem", std::process::id()));
        // Any certificate will do for building the verifier: the system bundle's.
        let Some(cert) = rustls_native_certs::load_native_certs()
            .certs
            .into_iter()
            .next()
        else {
            return;
        };
        let body = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &cert);
        std::fs::write(
            &pem,
            format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"),
        )
        .unwrap();
        let tls = Tls::new(Some("require"), Some(&pem), false);
        let _ = std::fs::remove_file(&pem);
        assert_eq!(tls.unwrap().mode, SslMode::VerifyCa);
        assert_eq!(
            Tls::new(Some("require"), None, false).unwrap().mode,
            SslMode::Require
        );
    }
}
