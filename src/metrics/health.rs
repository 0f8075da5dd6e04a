//! Readiness: is this relay the leader, and can it reach both sides?

use std::sync::Mutex;

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
    postgres_ok: bool,
    kafka_ok: bool,
    /// Partitions the last metadata listed without a leader.
    leaderless: usize,
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
        let s = self.state.lock().unwrap().clone();
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
        if !s.kafka_ok {
            let why = s.kafka.unwrap_or_else(|| "not connected yet".into());
            return Readiness::NotReady(format!("kafka: {why}"));
        }
        Readiness::Ready
    }
}
