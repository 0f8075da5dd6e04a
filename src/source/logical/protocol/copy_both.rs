//! The CopyBoth half of the replication protocol: after START_REPLICATION, XLogData and
//! keepalives arrive on one half of the socket while standby status updates leave on the
//! other.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use postgres_protocol::message::frontend;
use tokio::io::{ReadHalf, WriteHalf};
use tokio_util::codec::{Decoder, FramedRead, FramedWrite};

use super::{server_error, unexpected, Codec, Frame, Io, ReplicationError, READ_BUFFER};
use crate::event::Lsn;

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_OFFSET_SECS: u64 = 946_684_800;

/// An open CopyBoth replication stream, split so one task can read while another
/// writes status updates.
pub struct ReplicationStream {
    pub reader: StreamReader,
    pub writer: StreamWriter,
}

impl ReplicationStream {
    /// Splits the connection's socket: `read` holds what the server sent after
    /// CopyBothResponse and was read already. Each half gets its own framing, so that the
    /// reader can take the messages already in its buffer without a future per message
    /// (one framing shared behind a lock, polled per message, cost ~300 instructions per
    /// event).
    pub(super) fn new(io: Box<dyn Io>, read: &[u8]) -> Self {
        let (read_half, write_half) = tokio::io::split(io);
        let mut frames = FramedRead::with_capacity(read_half, Codec, READ_BUFFER);
        frames.read_buffer_mut().extend_from_slice(read);
        ReplicationStream {
            reader: StreamReader { frames },
            writer: StreamWriter {
                sink: FramedWrite::new(write_half, Codec),
            },
        }
    }
}

pub struct StreamReader {
    frames: FramedRead<ReadHalf<Box<dyn Io>>, Codec>,
}

pub struct StreamWriter {
    sink: FramedWrite<WriteHalf<Box<dyn Io>>, Codec>,
}

/// What arrives on the replication stream.
#[derive(Debug)]
pub enum StreamMessage {
    /// WAL data: one pgoutput message.
    XLogData { data: Bytes },
    /// The server's current WAL end; `reply` asks for a status update now.
    Keepalive { wal_end: Lsn, reply: bool },
    /// The server ended the stream (CopyDone).
    Done,
}

impl StreamReader {
    /// The next message. Cancel-safe: a message is either returned whole or not taken.
    pub async fn next(&mut self) -> Result<StreamMessage, ReplicationError> {
        loop {
            let frame = match self.frames.next().await {
                Some(f) => f?,
                None => {
                    return Err(ReplicationError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "server closed the replication stream",
                    )))
                }
            };
            match stream_message(frame)? {
                Some(message) => return Ok(message),
                None => continue,
            }
        }
    }

    /// The next message when the bytes read already hold all of it, without reading
    /// the socket: `None` when they do not (then [`StreamReader::next`] waits for more).
    pub fn buffered(&mut self) -> Result<Option<StreamMessage>, ReplicationError> {
        loop {
            let Some(frame) = Codec.decode(self.frames.read_buffer_mut())? else {
                return Ok(None);
            };
            if let Some(message) = stream_message(frame)? {
                return Ok(Some(message));
            }
        }
    }
}

/// One backend message of the replication stream; `None` for a notice (skipped).
fn stream_message(frame: Frame) -> Result<Option<StreamMessage>, ReplicationError> {
    match frame.tag {
        b'd' => {}
        // CopyDone; CommandComplete and ReadyForQuery follow it when the server ends the
        // stream (a shutdown, say).
        b'c' | b'C' | b'Z' => return Ok(Some(StreamMessage::Done)),
        b'E' => return Err(server_error(frame.body)),
        b'N' => return Ok(None),
        other => return Err(unexpected(other, "replication stream")),
    }
    let mut body = frame.body;
    if body.is_empty() {
        return Err(ReplicationError::Protocol("empty CopyData".into()));
    }
    match body.get_u8() {
        b'w' if body.len() >= 24 => {
            // WAL start, WAL end and send time: the pgoutput messages themselves carry
            // the LSNs the relay acknowledges.
            body.advance(24);
            Ok(Some(StreamMessage::XLogData { data: body }))
        }
        b'k' if body.len() >= 17 => {
            let wal_end = Lsn(body.get_u64());
            body.advance(8);
            Ok(Some(StreamMessage::Keepalive {
                wal_end,
                reply: body.get_u8() == 1,
            }))
        }
        other => Err(ReplicationError::Protocol(format!(
            "unexpected CopyData kind {:?} or short body",
            other as char
        ))),
    }
}

/// Feeds `data` through the framing and the stream-message parser as if the server had
/// sent it, for fuzzing: every input must end in messages or errors, never a panic.
#[doc(hidden)]
pub fn fuzz_stream_bytes(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let mut codec = Codec;
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        if let Ok(Some(StreamMessage::XLogData { data })) = stream_message(frame) {
            let _ = super::super::pgoutput::Decoder::default().decode(data);
        }
    }
}

impl StreamWriter {
    /// Standby status update: everything up to `flushed` may be forgotten by the slot.
    /// `reply` asks the server to answer at once (with a keepalive): the periodic updates
    /// do, so that silence on the stream means a silent link.
    pub async fn send_status(&mut self, flushed: Lsn, reply: bool) -> Result<(), ReplicationError> {
        let mut data = BytesMut::with_capacity(34);
        data.put_u8(b'r');
        data.put_u64(flushed.0); // written
        data.put_u64(flushed.0); // flushed
        data.put_u64(flushed.0); // applied
        data.put_i64(pg_now());
        data.put_u8(u8::from(reply));
        let mut buf = BytesMut::new();
        frontend::CopyData::new(data.freeze())?.write(&mut buf);
        self.sink.send(buf.freeze()).await?;
        Ok(())
    }

    /// Ends the stream from our side (CopyDone), after a final status update.
    pub async fn finish(&mut self) -> Result<(), ReplicationError> {
        let mut buf = BytesMut::new();
        frontend::copy_done(&mut buf);
        self.sink.send(buf.freeze()).await?;
        Ok(())
    }
}

/// Microseconds since 2000-01-01 UTC, PostgreSQL's timestamp epoch.
fn pg_now() -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (now.as_micros() as i64) - (PG_EPOCH_OFFSET_SECS as i64) * 1_000_000
}

/// Unix milliseconds from a PostgreSQL timestamp (µs since 2000-01-01).
pub fn pg_ts_to_unix_ms(ts: i64) -> i64 {
    ts / 1000 + (PG_EPOCH_OFFSET_SECS as i64) * 1000
}
