//! Delivery reports gathered per batch rather than per message.
//!
//! librdkafka reports every message on its polling thread. A future per message (what
//! rdkafka's `FutureProducer` gives) costs two allocations, a channel and a task wake-up
//! each: more than the rest of the relay's work on the event. The relay never needs a
//! single report on its own, only the batch's: so every message carries a number
//! (its batch's first number plus its index), the polling thread counts the reports
//! into the batch's entry in a shared [`Ledger`], keeps the rare failures with their
//! index, and wakes the batch's collector once, when the last report is in.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::ClientContext;
use tokio::sync::Notify;

/// The producer's context: routes each delivery report to its batch.
pub struct BatchContext {
    ledger: Arc<Ledger>,
}

impl BatchContext {
    pub fn new(ledger: Arc<Ledger>) -> BatchContext {
        BatchContext { ledger }
    }
}

impl ClientContext for BatchContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        super::log::log("producer", level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        super::log::error("producer", tracing::Level::ERROR, &error, reason);
    }
}

impl ProducerContext for BatchContext {
    /// The message's number ([`Ledger::open`]).
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, number: usize) {
        let error = result.as_ref().err().map(|(e, _)| e.clone());
        self.ledger.report(number as u64, error);
    }
}

/// The batches whose reports are awaited.
#[derive(Default)]
pub struct Ledger {
    next: AtomicU64,
    batches: Mutex<VecDeque<Entry>>,
}

struct Entry {
    first: u64,
    len: u64,
    /// How many messages went to the producer: known once the batch is handed over.
    expected: Option<usize>,
    answered: usize,
    /// Failed messages by index in the batch, in report order.
    failed: Vec<(usize, KafkaError)>,
    done: Arc<Notify>,
}

impl Entry {
    fn complete(&self) -> bool {
        self.expected == Some(self.answered)
    }
}

/// One batch's place in the [`Ledger`]; dropping it stops listening (reports that still
/// arrive are ignored).
pub struct Batch {
    ledger: Arc<Ledger>,
    first: u64,
    done: Arc<Notify>,
}

/// What a batch's reports came to.
pub struct Reports {
    /// Failed messages by index in the batch, ascending.
    pub failed: Vec<(usize, KafkaError)>,
}

impl Ledger {
    /// Opens a batch of up to `len` messages: message `i` is numbered
    /// [`Batch::number`]`(i)`.
    pub fn open(self: &Arc<Self>, len: usize) -> Batch {
        let first = self.next.fetch_add(len as u64, Ordering::Relaxed);
        let done = Arc::new(Notify::new());
        self.batches.lock().unwrap().push_back(Entry {
            first,
            len: len as u64,
            expected: None,
            answered: 0,
            failed: Vec::new(),
            done: done.clone(),
        });
        Batch {
            ledger: self.clone(),
            first,
            done,
        }
    }

    fn report(&self, number: u64, error: Option<KafkaError>) {
        let mut batches = self.batches.lock().unwrap();
        let Some(entry) = batches
            .iter_mut()
            .find(|e| (e.first..e.first + e.len).contains(&number))
        else {
            // Its batch was given up on.
            return;
        };
        entry.answered += 1;
        if let Some(e) = error {
            entry.failed.push(((number - entry.first) as usize, e));
        }
        if entry.complete() {
            entry.done.notify_one();
        }
    }

    fn with<T>(&self, first: u64, f: impl FnOnce(&mut Entry) -> T) -> Option<T> {
        let mut batches = self.batches.lock().unwrap();
        batches.iter_mut().find(|e| e.first == first).map(f)
    }
}

impl Batch {
    /// The number message `index` of this batch carries.
    pub fn number(&self, index: usize) -> usize {
        (self.first + index as u64) as usize
    }

    /// Every message is handed over: `sent` of them went to the producer.
    pub fn sealed(&self, sent: usize) {
        self.ledger.with(self.first, |e| {
            e.expected = Some(sent);
            if e.complete() {
                e.done.notify_one();
            }
        });
    }

    /// Waits until every message handed over has its report. `progress` is called when
    /// reports came in while waiting (every `check`), for readiness.
    pub async fn reports(&self, check: std::time::Duration, mut progress: impl FnMut()) -> Reports {
        let mut seen = 0;
        loop {
            let state = self.ledger.with(self.first, |e| {
                if e.complete() {
                    Ok(std::mem::take(&mut e.failed))
                } else {
                    Err(e.answered)
                }
            });
            match state {
                Some(Ok(mut failed)) => {
                    failed.sort_by_key(|(i, _)| *i);
                    return Reports { failed };
                }
                Some(Err(answered)) => {
                    if answered > seen {
                        seen = answered;
                        progress();
                    }
                }
                // Not in the ledger: nothing is awaited (not while the batch lives).
                None => return Reports { failed: Vec::new() },
            }
            // A report that completes the batch between the look above and this wait
            // leaves a permit: the wait then ends at once.
            let _ = tokio::time::timeout(check, self.done.notified()).await;
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        let mut batches = self.ledger.batches.lock().unwrap();
        batches.retain(|e| e.first != self.first);
    }
}
