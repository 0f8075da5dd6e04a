//! Where the machine's CPU went during a drain: the database server's processes, the
//! brokers' (and the registry's) processes, the relay, everything else, and what was left
//! idle — from `/proc/stat` and every process's `/proc/<pid>/stat` read before and after.
//! On these 2-core machines the relay, PostgreSQL and the broker share the cores, so a
//! drain's rate is bounded by their CPU per event together, not by any one of them.

use std::collections::BTreeMap;

use outbox_relay::testkit::cpu::TICKS_PER_SECOND;
use serde::Serialize;

/// CPU seconds per event of each part of the machine during one drain, in µs.
#[derive(Serialize, Clone, Copy, Default)]
pub(crate) struct Budget {
    /// PostgreSQL's processes (backends, walsenders, background workers).
    pub(crate) server: f64,
    /// The JVMs (Apache Kafka; the schema registry, idle unless events are encoded) and
    /// tansu.
    pub(crate) brokers: f64,
    pub(crate) relay: f64,
    /// Every other process, the bench itself included.
    pub(crate) others: f64,
    /// Busy time no live process accounts for: interrupts, and processes that exited
    /// during the drain.
    pub(crate) unattributed: f64,
    /// Idle (and I/O wait) time of all cores.
    pub(crate) idle: f64,
}

/// The machine's and every process's CPU counters at one moment.
pub(crate) struct Snapshot {
    busy: f64,
    idle: f64,
    processes: BTreeMap<u32, (Part, f64)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Server,
    Brokers,
    Other,
}

pub(crate) fn snapshot() -> Snapshot {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    // "cpu  user nice system idle iowait irq softirq steal …", all cores together.
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0.0);
    let idle = at(3) + at(4);
    let busy = ticks.iter().take(8).sum::<f64>() - idle;
    let mut processes = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(line) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let comm = line
            .split_once('(')
            .and_then(|(_, rest)| rest.rsplit_once(')'))
            .map_or("", |(comm, _)| comm);
        let part = match comm {
            "postgres" => Part::Server,
            "java" | "tansu" => Part::Brokers,
            _ => Part::Other,
        };
        processes.insert(pid, (part, outbox_relay::testkit::cpu::stat_cpu(&line)));
    }
    Snapshot {
        busy: busy / TICKS_PER_SECOND,
        idle: idle / TICKS_PER_SECOND,
        processes,
    }
}

impl Snapshot {
    /// The budget of what ran between `before` and this snapshot, per event; `relay` is
    /// the relay's process (counted on its own, whatever its binary is called).
    pub(crate) fn since(&self, before: &Snapshot, relay: u32, rows: usize) -> Budget {
        let per_event = |seconds: f64| seconds / rows as f64 * 1e6;
        let mut budget = Budget::default();
        let mut attributed = 0.0;
        for (pid, &(part, cpu)) in &self.processes {
            // A process that started during the drain counts from zero.
            let spent = cpu - before.processes.get(pid).map_or(0.0, |&(_, c)| c);
            attributed += spent;
            let slot = if *pid == relay {
                &mut budget.relay
            } else {
                match part {
                    Part::Server => &mut budget.server,
                    Part::Brokers => &mut budget.brokers,
                    Part::Other => &mut budget.others,
                }
            };
            *slot += per_event(spent);
        }
        budget.unattributed = per_event((self.busy - before.busy - attributed).max(0.0));
        budget.idle = per_event(self.idle - before.idle);
        budget
    }
}
