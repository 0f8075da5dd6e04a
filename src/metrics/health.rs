//! Readiness: is this relay the leader, and can it reach both sides?

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Events in flight with no delivery report for this long make the relay not ready. A
/// normal leader election on Apache Kafka (a broker killed, its session timing out after
/// 9 s, a new leader elected) answers well within it; a partition below
/// `min.insync.replicas`, or brokers that accept connections but answer nothing, do not.
pub const UNANSWERED_NOT_READY: Duration = Duration::from_secs(15);

/// The parts `/readyz` checks. Each is set by the component that knows it.
#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<State>,
}

#[derive(Debug, Default, Clone)]
struct State {
    leader: bool,
    /// Why the relay is not the leader (standby, starting…), when it is not.
    leader_reason: Option<String>,
    postgres: Option<String>,
    kafka: Option<String>,
    /// Why the event schemas cannot be resolved (the registry), while they cannot.
    registry: Option<String>,
    /// Who paused publishing, while it is paused.
    paused: Option<String>,
    postgres_ok: bool,
    kafka_ok: bool,
    /// Partitions the last metadata listed without a leader.
    leaderless: usize,
    /// Since when events handed to Kafka have waited with no delivery report at all
    /// (`None` while nothing is in flight).
    unanswered_since: Option<Instant>,
}

/// The answer `/readyz` gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    NotReady(String),
}

impl Health {
    pub fn set_leader(&self, leader: bool, reason: Option<&str>) {
        let mut s = self.state.lock().unwrap();
        s.leader = leader;
        s.leader_reason = reason.map(str::to_owned);
    }

    pub fn set_postgres(&self, problem: Option<String>) {
        let mut s = self.state.lock().unwrap();
        s.postgres_ok = problem.is_none();
        s.postgres = problem;
    }

    pub fn set_kafka(&self, problem: Option<String>) {
        let mut s = self.state.lock().unwrap();
        s.kafka_ok = problem.is_none();
        s.kafka = problem;
    }

    pub fn set_registry(&self, problem: Option<String>) {
        self.state.lock().unwrap().registry = problem;
    }

    /// Publishing is paused (by whom, since when), or not.
    pub fn set_paused(&self, paused: Option<String>) {
        self.state.lock().unwrap().paused = paused;
    }

    /// Events were handed to Kafka: from now on an answer is awaited, unless one already is.
    pub fn note_sent(&self) {
        let mut s = self.state.lock().unwrap();
        s.unanswered_since.get_or_insert_with(Instant::now);
    }

    /// Kafka reported on a delivery (success or failure); `more_in_flight` says whether
    /// other events still await theirs.
    pub fn note_answer(&self, more_in_flight: bool) {
        self.state.lock().unwrap().unanswered_since = more_in_flight.then(Instant::now);
    }

    /// How many partitions the brokers' last metadata listed without a leader.
    pub fn set_leaderless_partitions(&self, n: usize) {
        self.state.lock().unwrap().leaderless = n;
    }

    /// A batch with no outcome means a wedged producer only when the brokers answer and
    /// every partition has a leader: a partition waiting for its election is slow, and a
    /// new producer would only send the window again.
    pub fn producer_may_be_wedged(&self) -> bool {
        let s = self.state.lock().unwrap();
        s.kafka_ok && s.leaderless == 0
    }

    pub fn readiness(&self) -> Readiness {
        self.readiness_at(Instant::now())
    }

    fn readiness_at(&self, now: Instant) -> Readiness {
        let s = self.state.lock().unwrap().clone();
        if let Some(why) = s.registry {
            return Readiness::NotReady(format!("schema registry: {why}"));
        }
        if !s.postgres_ok {
            let why = s.postgres.unwrap_or_else(|| "not connected yet".into());
            return Readiness::NotReady(format!("postgres: {why}"));
        }
        if !s.leader {
            let why = s
                .leader_reason
                .unwrap_or_else(|| "not the leader yet".into());
            return Readiness::NotReady(why);
        }
        if let Some(who) = s.paused {
            return Readiness::NotReady(format!("paused: {who} (outbox-relay resume)"));
        }
        if !s.kafka_ok {
            let why = s.kafka.unwrap_or_else(|| "not connected yet".into());
            return Readiness::NotReady(format!("kafka: {why}"));
        }
        if let Some(since) = s.unanswered_since {
            let waited = now.saturating_duration_since(since);
            if waited >= UNANSWERED_NOT_READY {
                return Readiness::NotReady(format!(
                    "kafka: no delivery report for {} s with events in flight \
                     (partitions below min.insync.replicas or without a leader?)",
                    waited.as_secs()
                ));
            }
        }
        Readiness::Ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready_leader() -> Health {
        let h = Health::default();
        h.set_postgres(None);
        h.set_kafka(None);
        h.set_leader(true, None);
        h
    }

    #[test]
    fn events_unanswered_for_long_make_the_relay_not_ready() {
        let h = ready_leader();
        h.note_sent();
        let t0 = h.state.lock().unwrap().unanswered_since.unwrap();
        assert_eq!(
            h.readiness_at(t0 + Duration::from_secs(14)),
            Readiness::Ready
        );
        let Readiness::NotReady(why) = h.readiness_at(t0 + UNANSWERED_NOT_READY) else {
            panic!("ready after 15 s without an answer");
        };
        assert!(
            why.starts_with("kafka: no delivery report for 15 s"),
            "{why}"
        );
    }

    #[test]
    fn an_answer_restarts_the_wait_and_the_last_one_ends_it() {
        let h = ready_leader();
        h.note_sent();
        h.note_answer(true);
        let t1 = h.state.lock().unwrap().unanswered_since.unwrap();
        // A second batch sent while the first waits does not reset the clock.
        h.note_sent();
        assert_eq!(h.state.lock().unwrap().unanswered_since, Some(t1));
        h.note_answer(false);
        assert_eq!(
            h.readiness_at(t1 + Duration::from_secs(3600)),
            Readiness::Ready,
            "nothing in flight: nothing awaited"
        );
    }
}
