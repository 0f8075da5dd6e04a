//! The task that owns a replication stream.
//!
//! It reads WAL messages as they come, decodes them, turns outbox rows and messages into
//! [`Item`]s and passes them on in chunks over a bounded channel (a full channel stops
//! the reading: backpressure down to PostgreSQL's socket), and talks back to the server:
//! a standby status update every
//! `status_interval`, at once when the server asks, and whenever the source's
//! [`Ledger`](super::ledger::Ledger) lets the flushed position move (a [`watch`] of
//! [`Feedback`]).
//!
//! The task decides nothing about acknowledgement: keepalives travel down the channel
//! in WAL order like everything else, and the ledger judges them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::ledger::Item;
use super::mapping::Mapper;
use super::pgoutput::{DecodeError, Decoder, Message};
use super::protocol::{pg_ts_to_unix_ms, ReplicationStream, StreamMessage};
use super::row_change::{Kind, RowChanges, CLEANUP_PREFIX};
use crate::event::{Lsn, Position};
use crate::metrics::Telemetry;
use crate::source::SourceError;

/// How long a clean stop waits for the server to end the stream after our CopyDone.
const FINISH_WAIT: Duration = Duration::from_secs(2);

/// What the source tells the stream task.
#[derive(Debug, Default, Clone, Copy)]
pub struct Feedback {
    /// What the slot may forget.
    pub flushed: Lsn,
    /// The source is shutting down: send a final status, end the stream.
    pub finishing: bool,
}

/// Bytes of events in the channel, bounded: the channel's item count alone would let
/// 4,096 large events pile up.
#[derive(Debug)]
pub struct Queued {
    pub bytes: AtomicUsize,
    pub budget: usize,
}

/// How often a stream held back by [`Queued`] looks again.
const BUDGET_RECHECK: Duration = Duration::from_millis(5);

/// Items per chunk, at most. Messages already read from the socket are decoded in one go
/// and handed over together: one channel hop and one wake-up per chunk rather than per
/// event (per event they cost more than decoding the event).
pub const CHUNK: usize = 256;

/// Items in flight between the stream task and the relay: chunks, each up to [`CHUNK`].
pub type Chunk = Vec<Item>;

/// Runs the stream until it fails, the server ends it, or the source finishes (or is
/// dropped).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    stream: ReplicationStream,
    mut mapper: Mapper,
    mut changes: RowChanges,
    tx: mpsc::Sender<Chunk>,
    mut feedback: watch::Receiver<Feedback>,
    queued: Arc<Queued>,
    status_interval: Duration,
    silence: Duration,
    telemetry: Telemetry,
) -> Result<(), SourceError> {
    let ReplicationStream {
        mut reader,
        mut writer,
    } = stream;
    let mut decoder = Decoder::default();
    // Decoded, not handed over yet, and the event bytes among them.
    let mut chunk: Chunk = Vec::with_capacity(CHUNK);
    let mut chunk_bytes = 0;
    // A chunk stops growing at this many event bytes, so that the budget is overshot by
    // little when a chunk goes in whole.
    let chunk_budget = (queued.budget / 8).max(1);
    let mut tick = tokio::time::interval(status_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The current transaction, from its Begin.
    let mut txn: Option<Txn> = None;
    let repl = SourceError::repl;
    // When the server last said anything. Each periodic status update asks it for a
    // reply, so a live server speaks at least twice per `silence` (status_interval is at
    // most half of it): longer quiet while reading means a silent link (a hung proxy or
    // pooler) that the sockets' keepalives cannot see.
    let mut heard = tokio::time::Instant::now();

    loop {
        // Over budget, nothing more goes into the channel (and nothing more is read):
        // status updates still go out while the relay catches up.
        let room = queued.bytes.load(Ordering::Acquire) < queued.budget;
        let reading = chunk.len() < CHUNK && chunk_bytes < chunk_budget;
        if !reading {
            // Not reading is not hearing nothing: unread messages wait in the socket.
            heard = tokio::time::Instant::now();
        }
        tokio::select! {
            biased;
            changed = feedback.changed() => {
                if changed.is_err() {
                    // The source is gone; so is whoever would read what we decode.
                    return Ok(());
                }
                let Feedback { flushed, finishing } = *feedback.borrow_and_update();
                writer.send_status(flushed, false).await.map_err(repl("sending status"))?;
                telemetry.metrics.last_acked_lsn.set(flushed.0 as i64);
                if finishing {
                    // The final acknowledgement is out, but not yet read by the server.
                    // Closing now, with the server's last WAL unread on our side, makes
                    // the kernel reset the connection, and a reset discards what the
                    // server had not read yet: the acknowledgement could be lost and
                    // the next start would send the last transaction again (seen under
                    // load). So end the copy and wait for the server to end it too.
                    if writer.finish().await.is_ok() {
                        let drain = async {
                            while let Ok(msg) = reader.next().await {
                                if matches!(msg, StreamMessage::Done) {
                                    break;
                                }
                            }
                        };
                        let _ = tokio::time::timeout(FINISH_WAIT, drain).await;
                    }
                    return Ok(());
                }
            }
            _ = tick.tick() => {
                if heard.elapsed() > silence {
                    return Err(SourceError::Unanswered {
                        what: "streaming (no message, not even a keepalive reply)",
                        after: heard.elapsed(),
                    });
                }
                let flushed = feedback.borrow().flushed;
                tracing::debug!(%flushed, reading, room, chunk = chunk.len(), "periodic status update, reply asked");
                writer
                    .send_status(flushed, true)
                    .await
                    .map_err(repl("sending status"))?;
            }
            // Reading goes first: what the socket already holds joins the chunk, and the
            // chunk is handed over when reading would wait or the chunk is full.
            msg = reader.next(), if reading => {
                heard = tokio::time::Instant::now();
                let mut msg = msg;
                loop {
                    match msg.map_err(repl("reading the replication stream"))? {
                        StreamMessage::XLogData { data } => {
                            // An outbox row, read straight into its event; the rest (and
                            // any insert that is not an outbox row's) decoded whole.
                            let outbox_row = match (decoder.insert(&data), txn) {
                                (Some((relation, tuple)), Some(t)) => mapper
                                    .insert_tuple(relation, tuple, Position::Lsn(t.lsn), t.ts),
                                _ => None,
                            };
                            chunk_bytes += match outbox_row {
                                Some(Ok(event)) => {
                                    let bytes = event.approx_bytes();
                                    chunk.push(Item::Event(event));
                                    bytes
                                }
                                Some(Err(e)) => return Err(undecodable(e)),
                                None => {
                                    let decoded = decoder.decode(data).map_err(undecodable)?;
                                    handle(decoded, &mut mapper, &mut changes, &mut txn, &mut chunk)?
                                }
                            };
                        }
                        StreamMessage::Keepalive { wal_end, reply } => {
                            tracing::debug!(%wal_end, reply, in_transaction = txn.is_some(), "keepalive");
                            if reply {
                                let flushed = feedback.borrow().flushed;
                                writer.send_status(flushed, false).await.map_err(repl("sending status"))?;
                            }
                            // Inside a transaction the WAL end says nothing about its commit.
                            if txn.is_none() {
                                chunk.push(Item::Keepalive { wal_end });
                            }
                        }
                        StreamMessage::Done => {
                            return Err(unexpected("the server ended the stream"));
                        }
                    }
                    if chunk.len() >= CHUNK || chunk_bytes >= chunk_budget {
                        break;
                    }
                    // Only what is already read: the chunk ends where the bytes do.
                    match reader.buffered() {
                        Ok(Some(next)) => msg = Ok(next),
                        Ok(None) => break,
                        Err(e) => msg = Err(e),
                    }
                }
            }
            permit = tx.reserve(), if !chunk.is_empty() && room => {
                let permit = permit.map_err(|_| SourceError::Setup("relay stopped reading".into()))?;
                queued.bytes.fetch_add(chunk_bytes, Ordering::AcqRel);
                chunk_bytes = 0;
                permit.send(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK)));
            }
            _ = tokio::time::sleep(BUDGET_RECHECK), if !chunk.is_empty() && !room => {}
        }
    }
}

/// The transaction being read.
#[derive(Debug, Clone, Copy)]
struct Txn {
    /// Its commit LSN, the position of its events.
    lsn: Lsn,
    /// Its commit time, Unix milliseconds.
    ts: i64,
    /// The relay's own cleanup: its deletes are not row changes.
    cleanup: bool,
}

/// Turns one decoded message into items at the end of `chunk`; returns the event bytes
/// it added.
fn handle(
    msg: Message,
    mapper: &mut Mapper,
    changes: &mut RowChanges,
    txn: &mut Option<Txn>,
    chunk: &mut Chunk,
) -> Result<usize, SourceError> {
    let mut bytes = 0;
    match msg {
        Message::Begin {
            final_lsn,
            commit_ts,
            ..
        } => {
            *txn = Some(Txn {
                lsn: Lsn(final_lsn),
                ts: pg_ts_to_unix_ms(commit_ts),
                cleanup: false,
            });
        }
        Message::Commit { end_lsn, .. } => {
            *txn = None;
            chunk.push(Item::TxnEnd {
                end_lsn: Lsn(end_lsn),
            });
        }
        Message::Relation(rel) => {
            tracing::debug!(relation = %format!("{}.{}", rel.namespace, rel.name), id = rel.id, "relation described");
            if mapper.relation(&rel)? {
                // Sent again after the publication changed: check it before what follows.
                chunk.push(Item::Recheck);
            }
        }
        Message::Insert {
            relation, tuple, ..
        } => {
            let t = txn.ok_or_else(|| unexpected("Insert outside a transaction"))?;
            let event = mapper.insert(relation, tuple, Position::Lsn(t.lsn), t.ts)?;
            bytes += event.approx_bytes();
            chunk.push(Item::Event(event));
        }
        Message::Update { relation, new, .. } => {
            let t = txn.ok_or_else(|| unexpected("Update outside a transaction"))?;
            let position = Position::Lsn(t.lsn);
            if let Some(event) =
                changes.handle(Kind::Update, mapper, relation, new, position, t.ts)?
            {
                bytes += event.approx_bytes();
                chunk.push(Item::Event(event));
            }
        }
        Message::Delete { relation, old, .. } => {
            let t = txn.ok_or_else(|| unexpected("Delete outside a transaction"))?;
            if !t.cleanup {
                let position = Position::Lsn(t.lsn);
                if let Some(event) =
                    changes.handle(Kind::Delete, mapper, relation, old, position, t.ts)?
                {
                    bytes += event.approx_bytes();
                    chunk.push(Item::Event(event));
                }
            }
        }
        Message::Message {
            transactional: true,
            ref prefix,
            ..
        } if prefix == CLEANUP_PREFIX => {
            if let Some(t) = txn {
                t.cleanup = true;
            }
        }
        Message::Message {
            transactional,
            lsn,
            prefix,
            content,
            ..
        } => {
            let (position, ts) = match txn {
                Some(t) if transactional => (Position::Lsn(t.lsn), Some(t.ts)),
                _ => (Position::Lsn(Lsn(lsn)), None),
            };
            if let Some(event) = mapper.message(&prefix, transactional, &content, position, ts) {
                bytes += event.approx_bytes();
                chunk.push(Item::Event(event));
                if !transactional {
                    // Decoded on its own, outside any transaction: flushable once handled.
                    chunk.push(Item::TxnEnd { end_lsn: Lsn(lsn) });
                }
            }
        }
        Message::StreamStart { .. }
        | Message::StreamStop
        | Message::StreamCommit { .. }
        | Message::StreamAbort { .. } => {
            return Err(unexpected(
                "streamed transaction, but streaming was not requested",
            ));
        }
        Message::Other(_) => {}
    }
    Ok(bytes)
}

fn undecodable(e: DecodeError) -> SourceError {
    unexpected(&format!("decoding pgoutput: {e}"))
}

fn unexpected(what: &str) -> SourceError {
    SourceError::Replication {
        context: "replication stream",
        source: super::ReplicationError::Protocol(what.to_owned()),
    }
}
