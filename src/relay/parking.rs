//! Parking: an aggregate with a dead-lettered event holds its later events back.
//!
//! The relay promises one order per aggregate. When event 10 of aggregate K cannot be
//! published (poison: an invalid payload, a schema violation, too large for its topic),
//! K is *parked*: event 10 goes to the dead-letter topic as before, and K's later events
//! are not published but kept, in order, in PostgreSQL
//! ([`crate::source::dead_letters`]) with event 10 at the head, until an operator
//! redrives or discards them. Every other aggregate keeps flowing.
//!
//! This set is what the sinks consult per event. It has two layers:
//!
//! - *settled*: aggregates whose parked rows PostgreSQL has committed (loaded when the
//!   relay becomes the leader, so a restart or a standby taking over keeps K parked);
//! - *parked*: settled plus those parked by events sent since, whose rows are not
//!   committed yet. When the relay gives up on the batches in flight
//!   ([`crate::sink::Sink::reset`]) those events are read again, so the set goes back to
//!   the settled one and the same events park their aggregates again.
//!
//! A parked event is acknowledged to the source once its row is committed (at least
//! once: before the acknowledgement; exactly once: before the Kafka transaction whose
//! checkpoint covers it): the one exception to "acknowledged only after Kafka acked".

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::event::OutboxEvent;
use crate::source::dead_letters::{aggregate_of, Aggregate};

/// Aggregates parked by broker refusals on one topic within [`TOPIC_WINDOW`] past which
/// the cause is taken to be the topic's (an ACL revoked, the topic deleted), not the
/// events': the relay stops publishing to it instead of parking aggregate after
/// aggregate.
pub const TOPIC_THRESHOLD: usize = 5;
pub const TOPIC_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct Parking {
    sets: Mutex<Sets>,
    /// Whether any aggregate is parked: until one is, the per-event check takes no lock.
    any: AtomicBool,
    /// False where nothing can be kept (a hot standby): nothing parks.
    disabled: AtomicBool,
    /// Whether `refusing` holds a topic (checked per published event without a lock).
    any_refusing: AtomicBool,
}

#[derive(Debug, Default)]
struct Sets {
    settled: HashSet<Aggregate>,
    parked: HashSet<Aggregate>,
    /// When aggregates were parked by broker refusals, per topic.
    refusals: HashMap<String, VecDeque<Instant>>,
    /// Topics taken to refuse everything, until one of their events is published.
    refusing: HashSet<String>,
}

impl Sets {
    fn update(&self, any: &AtomicBool) {
        any.store(!self.parked.is_empty(), Ordering::Release);
    }
}

impl Parking {
    /// What PostgreSQL holds parked: the relay just became the leader.
    pub fn load(&self, parked: HashSet<Aggregate>) {
        self.disabled.store(false, Ordering::Release);
        let mut s = self.sets.lock().unwrap();
        s.parked = parked.clone();
        s.settled = parked;
        s.update(&self.any);
    }

    /// Is `event`'s aggregate parked (by a settled row or an event sent before it)?
    pub fn holds(&self, event: &OutboxEvent) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        aggregate_of(event).is_some_and(|a| self.sets.lock().unwrap().parked.contains(&a))
    }

    /// Nothing can be kept where the relay runs now: nothing parks.
    pub fn disable(&self) {
        self.load(HashSet::new());
        self.disabled.store(true, Ordering::Release);
    }

    /// `event` was dead-lettered: parks its aggregate. False when it has none (no
    /// aggregate id: nothing to hold back).
    pub fn park(&self, event: &OutboxEvent) -> bool {
        if self.disabled.load(Ordering::Acquire) {
            return false;
        }
        let Some(aggregate) = aggregate_of(event) else {
            return false;
        };
        let mut s = self.sets.lock().unwrap();
        s.parked.insert(aggregate);
        s.update(&self.any);
        true
    }

    /// PostgreSQL committed parked rows of these aggregates.
    pub fn settle<'a>(&self, events: impl IntoIterator<Item = &'a OutboxEvent>) {
        let mut s = self.sets.lock().unwrap();
        for a in events.into_iter().filter_map(aggregate_of) {
            s.parked.insert(a.clone());
            s.settled.insert(a);
        }
        s.update(&self.any);
    }

    /// The events in flight were given up: back to what PostgreSQL holds.
    pub fn reset(&self) {
        let mut s = self.sets.lock().unwrap();
        s.parked = s.settled.clone();
        s.update(&self.any);
    }

    /// The aggregate's queue is empty (redriven or discarded): its events flow again.
    pub fn unpark(&self, aggregate: &Aggregate) {
        let mut s = self.sets.lock().unwrap();
        s.parked.remove(aggregate);
        s.settled.remove(aggregate);
        s.update(&self.any);
    }

    /// A broker refused an event of `topic` for good. True when that makes too many
    /// aggregates in a short time: the topic, not the event, is the problem, and stays
    /// so until one of its events is published again ([`Parking::published`]).
    pub fn topic_refuses(&self, topic: &str) -> bool {
        let mut s = self.sets.lock().unwrap();
        if s.refusing.contains(topic) {
            return true;
        }
        let now = Instant::now();
        let times = s.refusals.entry(topic.to_owned()).or_default();
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) > TOPIC_WINDOW)
        {
            times.pop_front();
        }
        if times.len() < TOPIC_THRESHOLD {
            times.push_back(now);
            return false;
        }
        s.refusals.remove(topic);
        s.refusing.insert(topic.to_owned());
        self.any_refusing.store(true, Ordering::Release);
        true
    }

    /// An event of `topic` was published: the topic takes events again.
    pub fn published(&self, topic: &str) {
        if !self.any_refusing.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.sets.lock().unwrap();
        if s.refusing.remove(topic) {
            tracing::info!(topic, "the topic takes events again");
        }
        self.any_refusing
            .store(!s.refusing.is_empty(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Position;

    fn event(aggregate: &str) -> OutboxEvent {
        OutboxEvent {
            aggregate_type: Some("order".into()),
            aggregate_id: Some(aggregate.into()),
            ..OutboxEvent::blank(Position::Seq(1))
        }
    }

    #[test]
    fn a_parked_aggregate_holds_until_reset_unless_settled() {
        let p = Parking::default();
        assert!(!p.holds(&event("K")));
        assert!(p.park(&event("K")));
        assert!(p.park(&event("L")));
        assert!(p.holds(&event("K")) && !p.holds(&event("M")));
        p.settle([&event("K")]);
        p.reset();
        assert!(p.holds(&event("K")), "settled in PostgreSQL");
        assert!(
            !p.holds(&event("L")),
            "its events are read again and park it again"
        );
        p.unpark(&("order".into(), "K".into()));
        assert!(!p.holds(&event("K")));
        p.load([("order".to_owned(), "Z".to_owned())].into());
        assert!(p.holds(&event("Z")));
        let mut anonymous = event("K");
        anonymous.aggregate_id = None;
        assert!(!p.park(&anonymous), "no aggregate, nothing to hold back");
    }

    #[test]
    fn many_refusals_on_one_topic_blame_the_topic() {
        let p = Parking::default();
        for _ in 0..TOPIC_THRESHOLD {
            assert!(!p.topic_refuses("t"));
        }
        assert!(p.topic_refuses("t"));
        assert!(p.topic_refuses("t"), "until an event of it is published");
        assert!(!p.topic_refuses("other"));
        p.published("t");
        assert!(!p.topic_refuses("t"));
    }
}
