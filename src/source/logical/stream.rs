//! The task that owns a replication stream.
//!
//! It reads WAL messages as they come, decodes them, turns outbox rows and messages into
//! [`Item`]s on a bounded channel (a full channel stops the reading: backpressure down
//! to PostgreSQL's socket), and talks back to the server: a standby status update every
//! `status_interval`, at once when the server asks, and whenever the relay acknowledged
//! more (see [`Shared`]).
//!
//! The acknowledgement rule: the flushed position only moves to the end of a
//! transaction whose every event Kafka acknowledged, or — when nothing at all is in
//! flight — to the WAL end a keepalive announced, so an idle outbox pins no WAL.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use super::mapping::Mapper;
use super::pgoutput::{Decoder, Message};
use super::protocol::{pg_ts_to_unix_ms, ReplicationStream, StreamMessage};
use crate::event::{OutboxEvent, Position};
use crate::metrics::Telemetry;
use crate::source::SourceError;

/// What the stream hands to the source, in WAL order.
// Nearly every item is an event: boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Item {
    Event(OutboxEvent),
    /// Every event before this one belongs to a transaction that ends at `end_lsn`.
    TxnEnd {
        end_lsn: u64,
    },
}

/// State shared by the stream task and the source.
#[derive(Default)]
pub struct Shared {
    pub state: Mutex<AckState>,
    /// Wakes the task: the flushed position moved, or the source wants to finish.
    pub notify: Notify,
}

#[derive(Default, Debug)]
pub struct AckState {
    /// Inside a transaction whose Commit has not arrived yet.
    pub in_txn: bool,
    /// Transaction ends handed to the source, and how many of them it flushed.
    pub sent_ends: u64,
    pub flushed_ends: u64,
    /// What the slot may forget.
    pub flushed_lsn: u64,
    /// The source is shutting down: send a final status, end the stream.
    pub finishing: bool,
}

/// Runs the stream until it fails, the server ends it, or the source finishes.
pub async fn run(
    stream: ReplicationStream,
    mut mapper: Mapper,
    tx: mpsc::Sender<Item>,
    shared: Arc<Shared>,
    status_interval: Duration,
    telemetry: Telemetry,
) -> Result<(), SourceError> {
    let ReplicationStream {
        mut reader,
        mut writer,
    } = stream;
    let mut decoder = Decoder::default();
    let mut pending: VecDeque<Item> = VecDeque::new();
    let mut tick = tokio::time::interval(status_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The current transaction: commit LSN and time, from its Begin.
    let mut txn: Option<(u64, i64)> = None;
    let mut reported = 0u64;
    let repl = SourceError::repl;

    loop {
        tokio::select! {
            biased;
            _ = shared.notify.notified() => {
                let (flushed, finishing) = {
                    let s = shared.state.lock().unwrap();
                    (s.flushed_lsn, s.finishing)
                };
                writer.send_status(flushed, false).await.map_err(repl("sending status"))?;
                reported = flushed;
                telemetry.metrics.last_acked_lsn.set(flushed as i64);
                if finishing {
                    // The final acknowledgement is out; ending the stream is a courtesy.
                    let _ = writer.finish().await;
                    return Ok(());
                }
            }
            _ = tick.tick() => {
                let flushed = shared.state.lock().unwrap().flushed_lsn;
                writer.send_status(flushed, false).await.map_err(repl("sending status"))?;
                reported = flushed;
            }
            permit = tx.reserve(), if !pending.is_empty() => {
                let permit = permit.map_err(|_| SourceError::Setup("relay stopped reading".into()))?;
                let item = pending.pop_front().expect("guarded by the branch condition");
                if matches!(item, Item::TxnEnd { .. }) {
                    shared.state.lock().unwrap().sent_ends += 1;
                }
                permit.send(item);
            }
            msg = reader.next(), if pending.is_empty() => {
                match msg.map_err(repl("reading the replication stream"))? {
                    StreamMessage::XLogData { data, .. } => {
                        let decoded = decoder
                            .decode(data)
                            .map_err(|e| SourceError::Replication {
                                context: "decoding pgoutput",
                                source: super::ReplicationError::Protocol(e.to_string()),
                            })?;
                        handle(decoded, &mut mapper, &mut txn, &mut pending, &shared)?;
                    }
                    StreamMessage::Keepalive { wal_end, reply } => {
                        let flushed = {
                            let mut s = shared.state.lock().unwrap();
                            let idle = !s.in_txn && s.sent_ends == s.flushed_ends;
                            if idle && pending.is_empty() && wal_end > s.flushed_lsn {
                                s.flushed_lsn = wal_end;
                            }
                            s.flushed_lsn
                        };
                        if reply || flushed > reported {
                            writer.send_status(flushed, false).await.map_err(repl("sending status"))?;
                            reported = flushed;
                            telemetry.metrics.last_acked_lsn.set(flushed as i64);
                        }
                    }
                    StreamMessage::Done => {
                        return Err(SourceError::Replication {
                            context: "replication stream",
                            source: super::ReplicationError::Protocol("the server ended the stream".into()),
                        });
                    }
                }
            }
        }
    }
}

fn handle(
    msg: Message,
    mapper: &mut Mapper,
    txn: &mut Option<(u64, i64)>,
    pending: &mut VecDeque<Item>,
    shared: &Shared,
) -> Result<(), SourceError> {
    match msg {
        Message::Begin {
            final_lsn,
            commit_ts,
            ..
        } => {
            *txn = Some((final_lsn, pg_ts_to_unix_ms(commit_ts)));
            shared.state.lock().unwrap().in_txn = true;
        }
        Message::Commit { end_lsn, .. } => {
            *txn = None;
            shared.state.lock().unwrap().in_txn = false;
            pending.push_back(Item::TxnEnd { end_lsn });
        }
        Message::Relation(rel) => mapper.relation(&rel)?,
        Message::Insert {
            relation, tuple, ..
        } => {
            let (lsn, ts) = txn.ok_or_else(|| unexpected("Insert outside a transaction"))?;
            if let Some(event) = mapper.insert(relation, &tuple, Position::Lsn(lsn), ts) {
                pending.push_back(Item::Event(event));
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
                Some((commit_lsn, ts)) if transactional => (Position::Lsn(*commit_lsn), Some(*ts)),
                _ => (Position::Lsn(lsn), None),
            };
            if let Some(event) = mapper.message(&prefix, transactional, &content, position, ts) {
                pending.push_back(Item::Event(event));
                if !transactional {
                    // Decoded on its own, outside any transaction: flushable once handled.
                    pending.push_back(Item::TxnEnd { end_lsn: lsn });
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
    Ok(())
}

fn unexpected(what: &str) -> SourceError {
    SourceError::Replication {
        context: "replication stream",
        source: super::ReplicationError::Protocol(what.to_owned()),
    }
}
