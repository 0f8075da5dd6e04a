//! A thin client for PostgreSQL's streaming replication protocol
//! (<https://www.postgresql.org/docs/current/protocol-replication.html>).
//!
//! tokio-postgres cannot open a `replication=database` connection, so this speaks the
//! few messages the relay needs itself, with `postgres_protocol` encoding the frontend
//! messages and doing the md5 and SCRAM-SHA-256 arithmetic: startup and authentication,
//! simple queries (IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT) and START_REPLICATION here;
//! then the CopyBoth stream of XLogData and keepalives one way, standby status updates the
//! other, in [`copy_both`].

mod copy_both;

use bytes::{Buf, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder, Framed};

pub use copy_both::{fuzz_stream_bytes, pg_ts_to_unix_ms, ReplicationStream, StreamMessage};

/// Messages larger than this are refused rather than buffered.
const MAX_MESSAGE: usize = 1 << 30;

/// What went wrong on the replication connection.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("replication connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("PostgreSQL said: {message} (SQLSTATE {code}){}", detail_suffix(.detail, .hint))]
    Server {
        code: String,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    #[error("replication protocol: {0}")]
    Protocol(String),
    #[error("authentication: {0}")]
    Auth(String),
    #[error("TLS: {0}")]
    Tls(String),
}

fn detail_suffix(detail: &Option<String>, hint: &Option<String>) -> String {
    let mut s = String::new();
    if let Some(d) = detail {
        s.push_str(&format!("; {d}"));
    }
    if let Some(h) = hint {
        s.push_str(&format!("; hint: {h}"));
    }
    s
}

impl ReplicationError {
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    /// True when reconnecting may help: the connection broke, or the server refused for
    /// a passing reason (see [`crate::source::retryable_sqlstate`]). Credentials and
    /// certificates are refused again on every retry.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReplicationError::Io(_) | ReplicationError::Protocol(_) => true,
            ReplicationError::Auth(_) | ReplicationError::Tls(_) => false,
            ReplicationError::Server { code, .. } => crate::source::retryable_sqlstate(code),
        }
    }
}

/// One backend message: its tag and body.
struct Frame {
    tag: u8,
    body: Bytes,
}

/// Frames the wire protocol: `tag, i32 length (self-inclusive), body`.
struct Codec;

impl Decoder for Codec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        if src.len() < 5 {
            return Ok(None);
        }
        let len = i32::from_be_bytes([src[1], src[2], src[3], src[4]]);
        let len = usize::try_from(len)
            .ok()
            .filter(|l| (4..=MAX_MESSAGE).contains(l))
            .ok_or_else(|| std::io::Error::other(format!("invalid message length {len}")))?;
        if src.len() < len + 1 {
            src.reserve(len + 1 - src.len());
            return Ok(None);
        }
        let mut frame = src.split_to(len + 1);
        let tag = frame.get_u8();
        frame.advance(4);
        Ok(Some(Frame {
            tag,
            body: frame.freeze(),
        }))
    }
}

impl Encoder<Bytes> for Codec {
    type Error = std::io::Error;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        dst.extend_from_slice(&item);
        Ok(())
    }
}

/// The byte stream under the protocol: plain TCP or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync> Io for T {}

type Transport = Framed<Box<dyn Io>, Codec>;

/// Bytes per socket read: tokio-util's 8 KiB meant a `recv` per ~25 rows (9 % of a profile).
const READ_BUFFER: usize = 128 * 1024;

/// A replication connection in command mode.
pub struct ReplicationClient {
    io: Transport,
}

impl ReplicationClient {
    /// Connects to the one server `pg` names (its first host) with
    /// `replication=database` and authenticates (trust, password, md5, SCRAM-SHA-256),
    /// using the same settings as the ordinary connection. [`super::hosts::connect`] picks
    /// the server of a multi-host URL.
    pub async fn connect_one(
        pg: &tokio_postgres::Config,
        tls: &crate::source::tls::Tls,
    ) -> Result<ReplicationClient, ReplicationError> {
        use tokio_postgres::config::Host;
        let host =
            match pg.get_hosts().first() {
                Some(Host::Tcp(h)) => h.clone(),
                Some(Host::Unix(_)) => return Err(ReplicationError::Protocol(
                    "log mode connects over TCP: give source.database_url a host name or address"
                        .into(),
                )),
                None => "localhost".into(),
            };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let connect = TcpStream::connect((host.as_str(), port));
        let stream = match pg.get_connect_timeout() {
            Some(t) => tokio::time::timeout(*t, connect).await.map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??,
            None => connect.await?,
        };
        stream.set_nodelay(true)?;
        crate::source::deadlines::set_client_socket(&stream)?;
        let io = negotiate_tls(stream, &host, tls).await?;
        let mut client = ReplicationClient {
            io: Framed::with_capacity(io, Codec, READ_BUFFER),
        };
        let user = pg.get_user().unwrap_or_default();
        let mut params = vec![
            ("user", user),
            ("database", pg.get_dbname().unwrap_or(user)),
            ("replication", "database"),
            (
                "application_name",
                pg.get_application_name().unwrap_or("outbox-relay"),
            ),
            // The server's deadlines and wal_sender_timeout (set by the slot code).
            ("options", pg.get_options().unwrap_or_default()),
        ];
        params.retain(|(_, v)| !v.is_empty());
        let mut buf = BytesMut::new();
        frontend::startup_message(params.iter().copied(), &mut buf)?;
        client.send(buf).await?;
        client.authenticate(user, pg.get_password()).await?;
        client.wait_ready().await?;
        Ok(client)
    }

    async fn send(&mut self, buf: BytesMut) -> Result<(), ReplicationError> {
        self.io.send(buf.freeze()).await?;
        Ok(())
    }

    async fn recv(&mut self) -> Result<Frame, ReplicationError> {
        match self.io.next().await {
            Some(frame) => Ok(frame?),
            None => Err(ReplicationError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "server closed the replication connection",
            ))),
        }
    }

    async fn authenticate(
        &mut self,
        user: &str,
        password: Option<&[u8]>,
    ) -> Result<(), ReplicationError> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = self.recv().await?;
            match frame.tag {
                b'R' => {}
                b'E' => return Err(server_error(frame.body)),
                other => return Err(unexpected(other, "authentication")),
            }
            let mut body = frame.body;
            if body.len() < 4 {
                return Err(ReplicationError::Protocol(
                    "short authentication message".into(),
                ));
            }
            let need_password = || {
                password.ok_or_else(|| {
                    ReplicationError::Auth(
                        "the server asks for a password: put it in source.database_url or source.password_file".into(),
                    )
                })
            };
            let mut buf = BytesMut::new();
            match body.get_i32() {
                0 => return Ok(()),
                3 => frontend::password_message(need_password()?, &mut buf)?,
                5 => {
                    let salt: [u8; 4] = body
                        .get(..4)
                        .and_then(|s| s.try_into().ok())
                        .ok_or_else(|| ReplicationError::Protocol("short md5 salt".into()))?;
                    let hash = postgres_protocol::authentication::md5_hash(user.as_bytes(), need_password()?, salt);
                    frontend::password_message(hash.as_bytes(), &mut buf)?;
                }
                10 => {
                    let mechanisms = String::from_utf8_lossy(&body).to_string();
                    if !mechanisms.split('\0').any(|m| m == "SCRAM-SHA-256") {
                        return Err(ReplicationError::Auth(format!(
                            "server offers only SASL mechanisms {mechanisms:?}; SCRAM-SHA-256 is supported"
                        )));
                    }
                    let s = ScramSha256::new(need_password()?, ChannelBinding::unsupported());
                    frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut buf)?;
                    scram = Some(s);
                }
                11 => {
                    let s = scram.as_mut().ok_or_else(|| ReplicationError::Protocol("SASL continue before start".into()))?;
                    s.update(&body).map_err(|e| ReplicationError::Auth(e.to_string()))?;
                    frontend::sasl_response(s.message(), &mut buf)?;
                }
                12 => {
                    let s = scram.as_mut().ok_or_else(|| ReplicationError::Protocol("SASL final before start".into()))?;
                    s.finish(&body).map_err(|e| ReplicationError::Auth(e.to_string()))?;
                    continue;
                }
                other => {
                    return Err(ReplicationError::Auth(format!(
                        "unsupported authentication method {other} (trust, password, md5 and SCRAM-SHA-256 are)"
                    )))
                }
            }
            self.send(buf).await?;
        }
    }

    /// Skips parameter status, backend key data and notices until ReadyForQuery.
    async fn wait_ready(&mut self) -> Result<(), ReplicationError> {
        self.finish_command(|_| Ok(())).await
    }

    /// Runs one replication command and returns its rows as text.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf)?;
        self.send(buf).await?;
        let mut rows = Vec::new();
        self.finish_command(|body| {
            rows.push(data_row(body)?);
            Ok(())
        })
        .await?;
        Ok(rows)
    }

    /// Reads a command's responses up to ReadyForQuery, handing each DataRow to `on_row`.
    /// A server error is returned once the server is ready again — or when it hangs up,
    /// as it does after a FATAL one.
    async fn finish_command(
        &mut self,
        mut on_row: impl FnMut(Bytes) -> Result<(), ReplicationError>,
    ) -> Result<(), ReplicationError> {
        let mut error = None;
        loop {
            let frame = match self.recv().await {
                Ok(frame) => frame,
                Err(e) => return Err(error.unwrap_or(e)),
            };
            match frame.tag {
                b'D' => on_row(frame.body)?,
                b'E' => error = Some(server_error(frame.body)),
                b'Z' => return error.map_or(Ok(()), Err),
                _ => {}
            }
        }
    }

    /// Sends START_REPLICATION and turns the connection into a replication stream.
    pub async fn start_replication(
        mut self,
        sql: &str,
    ) -> Result<ReplicationStream, ReplicationError> {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf)?;
        self.send(buf).await?;
        loop {
            let frame = self.recv().await?;
            match frame.tag {
                b'W' => break,
                b'E' => {
                    let e = server_error(frame.body);
                    // The server still sends ReadyForQuery; the connection is dropped anyway.
                    return Err(e);
                }
                b'N' => {}
                other => return Err(unexpected(other, "START_REPLICATION")),
            }
        }
        let parts = self.io.into_parts();
        Ok(ReplicationStream::new(parts.io, &parts.read_buf))
    }
}

/// SSLRequest, then the TLS handshake when the server agrees (and the mode asks for it).
async fn negotiate_tls(
    mut stream: TcpStream,
    host: &str,
    tls: &crate::source::tls::Tls,
) -> Result<Box<dyn Io>, ReplicationError> {
    use crate::source::tls::SslMode;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(config) = tls.client_config() else {
        return Ok(Box::new(stream));
    };
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    stream.write_all(&buf).await?;
    let answer = stream.read_u8().await?;
    if answer != b'S' {
        if tls.mode == SslMode::Prefer {
            return Ok(Box::new(stream));
        }
        return Err(ReplicationError::Tls(format!(
            "the server does not offer TLS, but sslmode={:?} requires it",
            tls.mode
        )));
    }
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| ReplicationError::Tls(format!("{host:?} is not a TLS server name: {e}")))?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| ReplicationError::Tls(format!("handshake with {host}: {e}")))?;
    Ok(Box::new(stream))
}

fn data_row(mut body: Bytes) -> Result<Vec<Option<String>>, ReplicationError> {
    let short = || ReplicationError::Protocol("short DataRow".into());
    if body.len() < 2 {
        return Err(short());
    }
    let n = body.get_i16();
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        if body.len() < 4 {
            return Err(short());
        }
        let len = body.get_i32();
        if len < 0 {
            row.push(None);
            continue;
        }
        let len = len as usize;
        if body.len() < len {
            return Err(short());
        }
        row.push(Some(
            String::from_utf8_lossy(&body.split_to(len)).into_owned(),
        ));
    }
    Ok(row)
}

fn server_error(body: Bytes) -> ReplicationError {
    let (mut code, mut message, mut detail, mut hint) = (String::new(), String::new(), None, None);
    for field in body.split(|b| *b == 0) {
        let Some((&kind, value)) = field.split_first() else {
            continue;
        };
        let value = String::from_utf8_lossy(value).into_owned();
        match kind {
            b'C' => code = value,
            b'M' => message = value,
            b'D' => detail = Some(value),
            b'H' => hint = Some(value),
            _ => {}
        }
    }
    ReplicationError::Server {
        code,
        message,
        detail,
        hint,
    }
}

fn unexpected(tag: u8, during: &str) -> ReplicationError {
    ReplicationError::Protocol(format!(
        "unexpected message {:?} during {during}",
        tag as char
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_refuses_absurd_lengths_and_waits_for_whole_frames() {
        let mut c = Codec;
        let mut buf = BytesMut::from(&b"d\x00\x00\x00\x09abc"[..]);
        assert!(c.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"de");
        let f = c.decode(&mut buf).unwrap().unwrap();
        assert_eq!((f.tag, &f.body[..]), (b'd', &b"abcde"[..]));
        let mut bad = BytesMut::from(&b"d\xff\xff\xff\xff"[..]);
        assert!(c.decode(&mut bad).is_err());
    }
}
