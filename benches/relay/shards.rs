//! Scaling past one walsender: the same backlog drained in log mode with
//! `source.logical.shards` = 1, 2 and 4, into the first broker, beside `pg_recvlogical`
//! on one slot. Each drain also reads the CPU of the walsenders that served it, so the
//! report can say what a server with more cores would give.

use super::*;

/// The shard counts measured.
pub(crate) const SHARD_COUNTS: [u32; 3] = [1, 2, 4];

/// `n` filtered `pg_recvlogical`s at once, one per shard, and what the server spent:
/// the scaling the server gives with nothing else on the machine.
#[derive(Serialize, Clone, Copy)]
pub(crate) struct RecvDrain {
    pub(crate) shards: u32,
    pub(crate) events_per_second: f64,
    /// CPU seconds of the `pg_recvlogical` processes, together.
    pub(crate) client_cpu_seconds: f64,
    pub(crate) walsender_cpu_seconds: f64,
}

/// The slots of the `n` filtered `pg_recvlogical`s.
pub(crate) fn recv_slots(n: u32) -> Vec<String> {
    (0..n).map(|i| format!("bench_recvs{n}_{i}")).collect()
}

/// The publication shard `i` of `n` reads through (one shard: the outbox's own).
fn publication(i: u32, n: u32) -> String {
    if n == 1 {
        "outbox_relay".to_owned()
    } else {
        format!("outbox_relay_{i}_of_{n}")
    }
}

/// Drains the backlog up to `end` with `n` filtered `pg_recvlogical`s at once.
pub(crate) async fn recvlogical_sharded(
    pg: &Postgres,
    db: &Client,
    n: u32,
    end: &str,
    rows: usize,
) -> RecvDrain {
    let started = Instant::now();
    let mut children: Vec<Child> = recv_slots(n)
        .iter()
        .enumerate()
        .map(|(i, slot)| spawn_recvlogical(pg, slot, &publication(i as u32, n), end))
        .collect();
    // The last figures of every process seen, kept as they exit.
    let mut cpu = std::collections::BTreeMap::new();
    let mut walsenders = std::collections::BTreeMap::new();
    let slots = recv_slots(n);
    while children.iter_mut().any(|c| c.try_wait().unwrap().is_none()) {
        for c in &children {
            let now = measure(c.id()).1;
            if now > 0.0 {
                cpu.insert(c.id(), now);
            }
        }
        let pids: Vec<i32> = db
            .query_one(
                "SELECT array_remove(array_agg(active_pid), NULL) FROM pg_replication_slots \
                 WHERE slot_name = ANY($1::text[])",
                &[&slots],
            )
            .await
            .unwrap()
            .get(0);
        for pid in pids {
            let now = measure(pid as u32).1;
            if now > 0.0 {
                walsenders.insert(pid, now);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    RecvDrain {
        shards: n,
        events_per_second: rows as f64 / started.elapsed().as_secs_f64(),
        client_cpu_seconds: cpu.values().sum(),
        walsender_cpu_seconds: walsenders.values().sum(),
    }
}

/// One sharded drain and what the server spent on it.
#[derive(Serialize, Clone, Copy)]
pub(crate) struct ShardDrain {
    pub(crate) shards: u32,
    pub(crate) drain: Drain,
    /// CPU seconds of every walsender that served the drain, together.
    pub(crate) walsender_cpu_seconds: f64,
}

/// The configured slot name of the `n`-shard drain.
fn base_slot(n: u32) -> String {
    format!("bench_shards{n}")
}

/// Every slot of the `n`-shard drain, named as the relay names them.
pub(crate) fn shard_slots(n: u32) -> Vec<String> {
    if n == 1 {
        return vec![base_slot(1)];
    }
    (0..n)
        .map(|i| format!("{}_{i}_of_{n}", base_slot(n)))
        .collect()
}

/// The shards' publications, made before any backlog is written (a slot decodes a
/// change only through a publication that existed when it was written). The filter is
/// the one the relay makes: `outbox_relay::source::logical::shard_filter`.
pub(crate) async fn create_shard_publications(db: &Client) {
    for n in SHARD_COUNTS.into_iter().filter(|&n| n > 1) {
        for i in 0..n {
            let name = format!("outbox_relay_{i}_of_{n}");
            db.batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {name}; \
                 CREATE PUBLICATION {name} FOR TABLE outbox \
                 WHERE ((COALESCE(hashtext(aggregate_id), 0) & 2147483647) % {n} = {i}) \
                 WITH (publish = 'insert')"
            ))
            .await
            .unwrap();
        }
    }
}

/// Drains the backlog up to `end` with `n` shards.
pub(crate) async fn relay_log_sharded(
    db: &Client,
    url: &str,
    brokers: &str,
    n: u32,
    end: &str,
    rows: usize,
) -> ShardDrain {
    let config = config_file(
        url,
        brokers,
        "logical",
        &format!(
            "[source.logical]\nslot = \"{}\"\nshards = {n}\nmessage_prefix = \"\"\n\
             create_if_missing = false\n",
            base_slot(n)
        ),
        "",
    );
    let (drain, walsender_cpu_seconds) =
        drain_log_slots(&config, db, &shard_slots(n), end, rows, None).await;
    ShardDrain {
        shards: n,
        drain,
        walsender_cpu_seconds,
    }
}

/// The scaling lines of the report: per shard count, the median drain against one
/// shard's and `pg_recvlogical`'s, and CPU per event of the relay and the walsenders.
pub(crate) fn print_scaling(r: &Report, b: &BrokerReport) {
    if b.shards.is_empty() {
        return;
    }
    let recv = median(
        r.pg_recvlogical
            .iter()
            .map(|d| d.events_per_second)
            .collect(),
    );
    let rate = |n: u32| {
        median(
            b.shards
                .iter()
                .filter(|s| s.shards == n)
                .map(|s| s.drain.events_per_second)
                .collect(),
        )
    };
    let one = rate(1);
    let recv_rate = |n: u32| {
        median(
            r.recv_shards
                .iter()
                .filter(|s| s.shards == n)
                .map(|s| s.events_per_second)
                .collect(),
        )
    };
    println!("  filtered pg_recvlogical, one per shard, nothing else running (medians):");
    for n in SHARD_COUNTS {
        let runs: Vec<&RecvDrain> = r.recv_shards.iter().filter(|s| s.shards == n).collect();
        let (lo, hi) = spread(runs.iter().map(|s| s.events_per_second));
        let per_event = |f: fn(&RecvDrain) -> f64| {
            median(runs.iter().map(|s| f(s) / r.rows as f64 * 1e6).collect())
        };
        println!(
            "    {n} slot(s): {:.0} events/s ({lo:.0}–{hi:.0}), {:.2}x one; CPU per event: \
             walsenders {:.2} µs together, pg_recvlogical {:.2} µs",
            recv_rate(n),
            recv_rate(n) / recv_rate(1),
            per_event(|s| s.walsender_cpu_seconds),
            per_event(|s| s.client_cpu_seconds),
        );
    }
    println!(
        "  sharded log mode (same backlog, medians of {} runs):",
        r.runs
    );
    for n in SHARD_COUNTS {
        let runs: Vec<&ShardDrain> = b.shards.iter().filter(|s| s.shards == n).collect();
        let (lo, hi) = spread(runs.iter().map(|s| s.drain.events_per_second));
        let per_event = |f: fn(&ShardDrain) -> f64| {
            median(runs.iter().map(|s| f(s) / r.rows as f64 * 1e6).collect())
        };
        println!(
            "    shards = {n}: {:.0} events/s ({lo:.0}–{hi:.0}), {:.2}x one shard, {:.2}x \
             pg_recvlogical; CPU per event: relay {:.2} µs, walsenders {:.2} µs together",
            rate(n),
            rate(n) / one,
            rate(n) / recv,
            per_event(|s| s.drain.cpu_seconds),
            per_event(|s| s.walsender_cpu_seconds),
        );
        if let Some(c) = runs.iter().find_map(|s| s.drain.calls) {
            println!(
                "      relay per event: recvfrom {:.3}, send {:.3}, epoll_wait {:.3}, poll \
                 {:.3}, futex {:.3}, context switches {:.3}",
                c.recvfrom, c.send, c.epoll_wait, c.poll, c.futex, c.context_switches
            );
        }
    }
}
