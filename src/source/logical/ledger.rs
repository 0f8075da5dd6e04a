//! The log-mode acknowledgement rule, in one pure type (no I/O, no clock).
//!
//! The slot's flushed position tells PostgreSQL which WAL it may forget, and every
//! transaction ending at or before it is never sent again. So it may move only when
//! nothing before it still needs Kafka ([design §4](../../../docs/design.md#4-log-mode-the-acknowledgement-rule)):
//!
//! * to the end LSN of a transaction once **every event taken before that end** is
//!   acknowledged — never past a transaction with an unacknowledged event;
//! * to the WAL end of a keepalive only when the relay is **idle** at that point of the
//!   stream: every event taken so far acknowledged and no transaction open. Without this
//!   an outbox that stays quiet while other tables are busy would pin WAL for ever.
//!
//! Events are numbered as they are taken (1, 2, …) and acknowledged as a prefix, so two
//! counters and a queue of transaction ends say everything. The ledger holds no copy of
//! an event the relay has: after a failed delivery the relay gives the unacknowledged
//! events back ([`Ledger::rewind`]) and the ledger hands exactly those out again, in
//! order, before anything new.

use std::collections::VecDeque;

use crate::event::{Lsn, OutboxEvent};

/// What the stream task passes on, in WAL order.
// Nearly every item is an event: boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Item<E = OutboxEvent> {
    /// An event inside the transaction being read.
    Event(E),
    /// Every event taken before this belongs to a transaction that ends at `end_lsn`.
    TxnEnd { end_lsn: Lsn },
    /// The server's WAL end, sent while no transaction was being read.
    Keepalive { wal_end: Lsn },
    /// The stream described an outbox relation (again): pgoutput does so after the
    /// publication changed, so the source checks the publication before taking anything
    /// after this (see `carriage`).
    Recheck,
}

/// The log source's bookkeeping between "taken from the stream" and "flushed".
#[derive(Debug)]
pub struct Ledger<E = OutboxEvent> {
    /// Events taken so far; the latest one is number `taken`.
    taken: u64,
    /// Events acknowledged so far: always the first `acked` taken.
    acked: u64,
    /// Events given back by a rewind, handed out again before anything new is taken.
    replay: VecDeque<E>,
    /// Transaction ends not flushed yet: (events taken before the end, end LSN).
    ends: VecDeque<(u64, Lsn)>,
    /// An event was taken after the last transaction end.
    open: bool,
    /// How far the slot may forget.
    flushable: Lsn,
}

impl<E> Default for Ledger<E> {
    fn default() -> Self {
        Ledger {
            taken: 0,
            acked: 0,
            replay: VecDeque::new(),
            ends: VecDeque::new(),
            open: false,
            flushable: Lsn(0),
        }
    }
}

impl<E> Ledger<E> {
    /// Takes the next item of the stream; an event comes back to be handed out.
    pub fn take(&mut self, item: Item<E>) -> Option<E> {
        match item {
            Item::Event(event) => {
                self.taken += 1;
                self.open = true;
                Some(event)
            }
            Item::TxnEnd { end_lsn } => {
                self.open = false;
                self.ends.push_back((self.taken, end_lsn));
                self.settle();
                None
            }
            Item::Keepalive { wal_end } => {
                if self.is_idle() {
                    self.flushable = self.flushable.max(wal_end);
                }
                None
            }
            Item::Recheck => None,
        }
    }

    /// Takes an event that belongs to no transaction of the stream (a row of the
    /// first-start snapshot): it is acknowledged like any other but never opens a
    /// transaction.
    pub fn take_unframed(&mut self, event: E) -> E {
        self.taken += 1;
        event
    }

    /// Kafka acknowledged the oldest `n` events handed out; returns how far the slot
    /// may now forget.
    ///
    /// # Panics
    ///
    /// When `n` is more than the relay holds: the relay acknowledged events it was never
    /// given, which would move the slot past events nobody published.
    pub fn ack(&mut self, n: usize) -> Lsn {
        assert!(
            n as u64 <= self.in_flight(),
            "acknowledged {n} events, but only {} are with the relay",
            self.in_flight()
        );
        self.acked += n as u64;
        self.settle();
        self.flushable
    }

    /// The relay gives back every event it holds unacknowledged (a delivery failed):
    /// they are handed out again, in the same order, before anything new.
    ///
    /// # Panics
    ///
    /// When the count is not what the relay holds: an event missing here would be lost.
    pub fn rewind(&mut self, returned: Vec<E>) {
        assert_eq!(
            returned.len() as u64,
            self.in_flight(),
            "a rewind must return exactly the events the relay holds"
        );
        // What an earlier rewind queued comes after what the relay just returned.
        let earlier = std::mem::take(&mut self.replay);
        self.replay.extend(returned);
        self.replay.extend(earlier);
    }

    /// Up to `max` events to hand out again after a rewind (empty when there are none).
    pub fn replay(&mut self, max: usize) -> Vec<E> {
        let n = max.min(self.replay.len());
        self.replay.drain(..n).collect()
    }

    pub fn has_replay(&self) -> bool {
        !self.replay.is_empty()
    }

    /// Events with the relay: handed out, not acknowledged, not given back.
    pub fn in_flight(&self) -> u64 {
        self.taken - self.acked - self.replay.len() as u64
    }

    /// Events taken and not acknowledged, wherever they are.
    pub fn unacknowledged(&self) -> u64 {
        self.taken - self.acked
    }

    /// Nothing to wait for: every event taken is acknowledged, no transaction is open.
    pub fn is_idle(&self) -> bool {
        self.acked == self.taken && !self.open
    }

    /// Events of a transaction were taken but its end was not: a graceful stop reads
    /// on until it has, or the transaction's first part would be sent again.
    pub fn mid_transaction(&self) -> bool {
        self.open
    }

    /// How far the slot may forget.
    pub fn flushable(&self) -> Lsn {
        self.flushable
    }

    /// Moves past every transaction end whose events are all acknowledged.
    fn settle(&mut self) {
        while let Some(&(before, end)) = self.ends.front() {
            if before > self.acked {
                break;
            }
            self.ends.pop_front();
            self.flushable = self.flushable.max(end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(n: u32) -> Item<u32> {
        Item::Event(n)
    }
    fn end(lsn: u64) -> Item<u32> {
        Item::TxnEnd { end_lsn: Lsn(lsn) }
    }
    fn keepalive(lsn: u64) -> Item<u32> {
        Item::Keepalive { wal_end: Lsn(lsn) }
    }
    /// Takes items, returning the events handed out.
    fn take(l: &mut Ledger<u32>, items: impl IntoIterator<Item = Item<u32>>) -> Vec<u32> {
        items.into_iter().filter_map(|i| l.take(i)).collect()
    }

    #[test]
    fn never_flushes_past_a_transaction_with_an_unacknowledged_event() {
        let mut l = Ledger::default();
        take(&mut l, [ev(1), ev(2), end(100), ev(3), end(200)]);
        assert_eq!(l.flushable(), Lsn(0), "nothing acknowledged yet");
        assert_eq!(
            l.ack(1),
            Lsn(0),
            "event 2 of the first transaction is missing"
        );
        assert_eq!(l.ack(1), Lsn(100), "first transaction whole");
        assert_eq!(l.ack(1), Lsn(200));
    }

    #[test]
    fn acknowledging_several_transactions_at_once_flushes_to_the_last_whole_one() {
        let mut l = Ledger::default();
        take(&mut l, [ev(1), end(100), ev(2), end(200), ev(3), ev(4)]);
        assert_eq!(l.ack(3), Lsn(200), "event 4 keeps its transaction open");
        assert!(l.mid_transaction());
        take(&mut l, [end(300)]);
        assert!(!l.mid_transaction());
        assert_eq!(l.flushable(), Lsn(200));
        assert_eq!(l.ack(1), Lsn(300));
    }

    #[test]
    fn a_transaction_without_events_is_flushed_once_everything_before_it_is() {
        let mut l = Ledger::default();
        take(&mut l, [end(50)]);
        assert_eq!(
            l.flushable(),
            Lsn(50),
            "another table's transaction, nothing in flight"
        );
        take(&mut l, [ev(1), end(100), end(150)]);
        assert_eq!(l.flushable(), Lsn(50), "event 1 is before both ends");
        assert_eq!(l.ack(1), Lsn(150));
    }

    #[test]
    fn keepalive_wal_end_counts_only_when_idle() {
        let mut l = Ledger::default();
        take(&mut l, [keepalive(10)]);
        assert_eq!(l.flushable(), Lsn(10), "idle: an idle outbox pins no WAL");

        take(&mut l, [ev(1), keepalive(20)]);
        assert_eq!(l.flushable(), Lsn(10), "a transaction is open");
        take(&mut l, [end(30), keepalive(40)]);
        assert_eq!(l.flushable(), Lsn(10), "event 1 is not acknowledged");
        assert_eq!(l.ack(1), Lsn(30));
        take(&mut l, [keepalive(40)]);
        assert_eq!(l.flushable(), Lsn(40));
        take(&mut l, [keepalive(35)]);
        assert_eq!(l.flushable(), Lsn(40), "never backwards");
    }

    #[test]
    fn acknowledged_but_open_transaction_is_not_idle() {
        let mut l = Ledger::default();
        take(&mut l, [ev(1)]);
        l.ack(1);
        take(&mut l, [keepalive(99)]);
        assert_eq!(
            l.flushable(),
            Lsn(0),
            "the transaction's commit is still to come"
        );
        assert!(l.mid_transaction());
    }

    #[test]
    fn rewind_replays_exactly_the_unacknowledged_suffix_in_order() {
        let mut l = Ledger::default();
        let out = take(
            &mut l,
            [ev(1), ev(2), ev(3), end(100), ev(4), ev(5), end(200)],
        );
        assert_eq!(out, [1, 2, 3, 4, 5]);
        assert_eq!(l.ack(2), Lsn(0));
        // The relay holds 3, 4, 5 and gives them back.
        l.rewind(vec![3, 4, 5]);
        assert_eq!(l.in_flight(), 0);
        assert_eq!(l.unacknowledged(), 3);
        assert_eq!(l.replay(2), [3, 4]);
        assert_eq!(l.in_flight(), 2);
        // A second failure while 5 is still queued: 3, 4 come back ahead of it.
        l.rewind(vec![3, 4]);
        assert_eq!(l.replay(10), [3, 4, 5]);
        assert!(!l.has_replay());
        assert_eq!(
            l.ack(1),
            Lsn(100),
            "event 3 completes the first transaction"
        );
        assert_eq!(l.ack(2), Lsn(200));
        assert!(l.is_idle());
    }

    #[test]
    fn snapshot_rows_are_counted_but_open_no_transaction() {
        let mut l = Ledger::default();
        assert_eq!(l.take_unframed(7), 7);
        assert!(!l.mid_transaction());
        assert!(!l.is_idle());
        l.ack(1);
        assert!(l.is_idle());
    }

    #[test]
    #[should_panic(expected = "only 1 are with the relay")]
    fn acknowledging_more_than_was_handed_out_is_a_bug() {
        let mut l = Ledger::default();
        take(&mut l, [ev(1)]);
        l.ack(2);
    }

    #[test]
    #[should_panic(expected = "exactly the events the relay holds")]
    fn a_rewind_that_would_lose_an_event_is_a_bug() {
        let mut l = Ledger::default();
        take(&mut l, [ev(1), ev(2)]);
        l.rewind(vec![2]);
    }
}
