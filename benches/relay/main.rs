//! The benchmark of docs/design.md §11 (the performance targets): `scripts/bench` (or `cargo bench --bench relay`).
//!
//! In one run it starts an ephemeral PostgreSQL and the brokers (`--broker kafka`, `tansu`
//! or `both`, the default: Apache Kafka, one KRaft node, and tansu), writes the workload
//! (200,000 outbox rows of ~200-byte JSON, 1,000 rows per transaction, 10,000 aggregate
//! ids) and measures, median of 3:
//!
//! * `pg_recvlogical` draining the backlog from a slot to /dev/null (the ceiling the
//!   server's logical decoding sets);
//! * the polling floor: the relay's own batch read and DELETE looped inside the server
//!   by a `DO` block, nothing sent out (the ceiling of polling: the database's own
//!   SELECT and DELETE rate);
//! * the relay binary in log mode draining the same backlog into the broker, timed from
//!   process start until the slot's flushed position passed the last commit (so every
//!   event was acknowledged by Kafka first);
//! * the relay in polling mode draining it, deletes included (until the table is empty);
//! * process start to first event acknowledged (one row, polling mode);
//! * a steady state: a writer at a fixed rate while the relay (log mode) runs, with
//!   end-to-end events/s and commit→ack p50/p99 from the relay's own histogram;
//! * peak RSS and CPU seconds of the relay process in each drain, and where the
//!   machine's CPU went meanwhile (PostgreSQL, the brokers, the relay, idle);
//! * the same backlog in log mode with `source.logical.shards` = 1, 2 and 4 (into the
//!   first broker), and with 1, 2 and 4 filtered `pg_recvlogical`s at once, each with
//!   the CPU of the walsenders that served it (scaling past one walsender);
//! * the log-mode drain again with the events Avro-encoded (`[[sink.kafka.schemas]]`,
//!   a schema registered in an Apicurio Registry the bench starts): its rate beside the
//!   pass-through drain of the same run (target ≥ 0.8x) and its CPU per event.
//!
//! It prints a table, the ratios to `pg_recvlogical`, and writes JSON
//! (`target/bench/relay.json`, or `--json PATH`). `--rows N`, `--runs N` and
//! `--steady-secs N` shrink it for a quick look. Every relay measurement is made once per
//! broker, in the same run, against the same `pg_recvlogical` figures.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox_relay::testkit::apache_kafka::{self, Kafka, KafkaOptions};
use outbox_relay::testkit::cpu::{producer_threads_cpu, stat_cpu};
use outbox_relay::testkit::postgres::{bin_dir, Postgres};
use outbox_relay::testkit::registry::Registry;
use outbox_relay::testkit::tansu::Tansu;
use outbox_relay::testkit::{free_port, http_get, kafka, RelayProcess};
use serde::Serialize;
use tokio_postgres::Client;

mod budget;
mod drains;
mod perf;
mod report;
mod shards;
mod steady;

use budget::Budget;
use drains::*;
use perf::*;
use report::*;
use shards::*;
use steady::*;

const PER_TXN: usize = 1000;
const AGGREGATES: usize = 10_000;
const TOPIC: &str = "outbox.bench";

struct Args {
    rows: usize,
    runs: usize,
    steady_secs: u64,
    steady_rate: usize,
    json: PathBuf,
    kafka: bool,
    tansu: bool,
    /// `batch_size` of the exactly-once runs (one transaction per batch).
    eos_batch_size: usize,
    /// Where to write `perf record` profiles of extra drains (`--perf DIR`).
    perf: Option<PathBuf>,
    /// `[sink.kafka.librdkafka]` lines for every relay run (`--librdkafka key=value`,
    /// repeatable): to compare producer settings in one command.
    librdkafka: Vec<(String, String)>,
    /// Another relay binary, drained beside this build's in every run and mode, first
    /// in every other run (`--baseline PATH`): an A/B comparison that the machine's
    /// drift between commands cannot blur.
    baseline: Option<PathBuf>,
    /// Count the relay's system calls and context switches per event in every drain
    /// (`--syscalls`, with `perf stat` on tracepoints): counts, where CPU seconds are
    /// noise on a shared machine.
    syscalls: bool,
}

fn args() -> Args {
    let mut a = Args {
        rows: 200_000,
        runs: 3,
        steady_secs: 10,
        steady_rate: 20_000,
        json: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench/relay.json"),
        kafka: true,
        tansu: true,
        eos_batch_size: 10_000,
        perf: None,
        librdkafka: Vec::new(),
        baseline: None,
        syscalls: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--rows" => a.rows = value().parse().expect("--rows N"),
            "--runs" => a.runs = value().parse().expect("--runs N"),
            "--steady-secs" => a.steady_secs = value().parse().expect("--steady-secs N"),
            "--steady-rate" => a.steady_rate = value().parse().expect("--steady-rate N"),
                        "--json" => a.json = PathBuf::from(value()),
            "--eos-batch-size" => a.eos_batch_size = value().parse().expect("--eos-batch-size N"),
            "--perf" => a.perf = Some(PathBuf::from(value())),
            "--baseline" => a.baseline = Some(PathBuf::from(value())),
            "--syscalls" => a.syscalls = true,
            "--librdkafka" => {
                let kv = value();
                let (k, v) = kv.split_once('=').expect("--librdkafka key=value");
                a.librdkafka.push((k.to_owned(), v.to_owned()));
            }
            "--broker" => {
                (a.kafka, a.tansu) = match value().as_str() {
                    "kafka" => (true, false),
                    "tansu" => (false, true),
                    "both" => (true, true),
                    other => panic!("--broker {other}: use kafka, tansu or both"),
                }
            }
            "--bench" => {} // passed by `cargo bench`
            other => panic!("unknown argument {other}: use --rows, --runs, --steady-secs, --steady-rate, --json, --broker, --eos-batch-size, --perf, --librdkafka, --baseline, --syscalls"),
        }
    }
    a
}

fn main() {
    let a = args();
    if !a.librdkafka.is_empty() {
        let lines: String = a
            .librdkafka
            .iter()
            .map(|(k, v)| format!("\"{k}\" = \"{v}\"\n"))
            .collect();
        LIBRDKAFKA
            .set(format!("[sink.kafka.librdkafka]\n{lines}"))
            .unwrap();
    }
    COUNT_CALLS.set(a.syscalls).unwrap();
    eprintln!("bench: starting PostgreSQL and the brokers…");
    // synchronous_commit=on: the walsender only sends flushed WAL, so the testkit's "off"
    // would add up to wal_writer_delay to every commit→ack latency.
    let pg = Postgres::start_with(&[
        "shared_buffers=256MB",
        "max_wal_size=4GB",
        "checkpoint_timeout=30min",
        "synchronous_commit=on",
    ])
    .expect("PostgreSQL");
    // Kept alive for the whole run; on the main thread, so they die with it.
    let kafka = a.kafka.then(|| {
        let started = Instant::now();
        // Full JIT and a production-sized heap: the broker is measured, not just run.
        let kafka = Kafka::start_with(KafkaOptions {
            heap_mib: 1024,
            quick_jit: false,
            ..KafkaOptions::default()
        })
        .expect("Apache Kafka");
        eprintln!("bench: Apache Kafka ready in {:.1?}", started.elapsed());
        kafka
    });
    let tansu = a.tansu.then(|| Tansu::start().expect("tansu"));
    let started = Instant::now();
    let registry = Registry::start().expect("the schema registry (run scripts/install)");
    eprintln!("bench: schema registry ready in {:.1?}", started.elapsed());
    let schemas = tempfile::tempdir().unwrap();
    let avsc = schemas.path().join("bench.avsc");
    std::fs::write(&avsc, BENCH_AVSC).unwrap();
    AVRO.set(format!(
        "[sink.kafka.schema_registry]\nurl = \"{}\"\n\
         [[sink.kafka.schemas]]\naggregate_type = \"bench\"\nformat = \"avro\"\nfile = \"{}\"\n",
        registry.url(),
        avsc.display()
    ))
    .unwrap();
    let mut targets = Vec::new();
    if let Some(k) = &kafka {
        targets.push(Target {
            name: format!("Apache Kafka {}", apache_kafka::VERSION),
            brokers: k.brokers(),
            slot: "bench_relay_kafka".into(),
            // `--eos-batch-size 0` leaves exactly once out (a long steady run, say).
            transactions: a.eos_batch_size > 0,
        });
    }
    if let Some(t) = &tansu {
        targets.push(Target {
            name: "tansu 0.6.0".into(),
            brokers: t.brokers(),
            slot: "bench_relay_tansu".into(),
            // tansu 0.6.0 has no working transactions.
            transactions: false,
        });
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(run(&a, &pg, &targets));
    print_table(&report);
    std::fs::create_dir_all(a.json.parent().unwrap()).unwrap();
    std::fs::write(&a.json, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    eprintln!("bench: JSON written to {}", a.json.display());
}

async fn run(a: &Args, pg: &Postgres, targets: &[Target]) -> Report {
    for t in targets {
        kafka::create_topics(&t.brokers, &[TOPIC, "outbox.dlq"], 4)
            .await
            .expect("topics");
    }
    let url = pg.create_database("bench").await.expect("database");
    let db = pg.connect("bench").await.unwrap();
    for (name, sql) in outbox_relay::SETUP_SQL {
        db.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    create_shard_publications(&db).await;
    let mut report = Report {
        machine: machine(),
        rows: a.rows,
        runs: a.runs,
        pg_recvlogical: Vec::new(),
        polling_floor: Vec::new(),
        recv_shards: Vec::new(),
        brokers: targets
            .iter()
            .map(|t| BrokerReport {
                broker: t.name.clone(),
                relay_log: Vec::new(),
                relay_polling: Vec::new(),
                avro_log: Vec::new(),
                first_event_ms: Vec::new(),
                steady: Steady::default(),
                steady_runs: Vec::new(),
                librdkafka_cpu_us_per_event: Vec::new(),
                baseline_log: Vec::new(),
                baseline_polling: Vec::new(),
                shards: Vec::new(),
                median: Medians::default(),
                exactly_once: t.transactions.then(|| ExactlyOnce {
                    batch_size: a.eos_batch_size,
                    ..ExactlyOnce::default()
                }),
            })
            .collect(),
    };
    for run in 0..a.runs {
        eprintln!("bench: run {}/{}", run + 1, a.runs);
        // One backlog, read by pg_recvlogical and by the relay (once per broker) through
        // slots created before it was written.
        reset(&db).await;
        let slots = std::iter::once("bench_recv".to_owned())
            .chain(targets.iter().flat_map(|t| {
                std::iter::once(t.slot.clone())
                    .chain(t.transactions.then(|| eos_slot(t)))
                    .chain(std::iter::once(avro_slot(t)))
                    .chain(a.baseline.is_some().then(|| baseline_slot(t)))
            }))
            .chain(SHARD_COUNTS.into_iter().flat_map(shard_slots))
            .chain(SHARD_COUNTS.into_iter().flat_map(recv_slots));
        for slot in slots {
            db.execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .unwrap();
        }
        let end = load(&db, a.rows).await;
        report
            .pg_recvlogical
            .push(recvlogical(pg, "bench_recv", &end, a.rows));
        eprintln!(
            "  pg_recvlogical {:.0}/s",
            report.pg_recvlogical[run].events_per_second
        );
        for n in SHARD_COUNTS {
            let d = recvlogical_sharded(pg, &db, n, &end, a.rows).await;
            eprintln!(
                "  {n} filtered pg_recvlogical(s) {:.0}/s",
                d.events_per_second
            );
            report.recv_shards.push(d);
        }
        // The baseline goes first in every other run: neither build always gets the
        // second, warmer drain.
        let baseline_first = run % 2 == 1;
        for (t, b) in targets.iter().zip(&mut report.brokers) {
            if let (Some(bin), true) = (&a.baseline, baseline_first) {
                b.baseline_log
                    .push(baseline_log(bin, &db, &url, t, &end, a.rows).await);
            }
            b.relay_log
                .push(relay_log(&db, &url, &t.brokers, &t.slot, &end, a.rows, None, None).await);
            eprintln!(
                "  {}: relay log mode {:.0}/s",
                t.name, b.relay_log[run].events_per_second
            );
            if let (Some(bin), false) = (&a.baseline, baseline_first) {
                b.baseline_log
                    .push(baseline_log(bin, &db, &url, t, &end, a.rows).await);
            }
            b.avro_log
                .push(relay_log_avro(&db, &url, &t.brokers, &avro_slot(t), &end, a.rows).await);
            eprintln!(
                "  {}: relay log mode, Avro-encoded {:.0}/s",
                t.name, b.avro_log[run].events_per_second
            );
            if let Some(eos) = &mut b.exactly_once {
                let slot = eos_slot(t);
                eos.relay_log.push(
                    relay_log(
                        &db,
                        &url,
                        &t.brokers,
                        &slot,
                        &end,
                        a.rows,
                        Some(a.eos_batch_size),
                        None,
                    )
                    .await,
                );
                eprintln!(
                    "  {}: relay log mode, exactly once {:.0}/s",
                    t.name, eos.relay_log[run].events_per_second
                );
            }
        }
        // Scaling past one walsender, into the first broker (the same backlog).
        if let (Some(t), Some(b)) = (targets.first(), report.brokers.first_mut()) {
            for n in SHARD_COUNTS {
                let d = relay_log_sharded(&db, &url, &t.brokers, n, &end, a.rows).await;
                eprintln!(
                    "  {}: relay log mode, {n} shard(s) {:.0}/s",
                    t.name, d.drain.events_per_second
                );
                b.shards.push(d);
            }
        }
        reset(&db).await;
        load(&db, a.rows).await;
        report
            .polling_floor
            .push(polling_floor(&db, &url, a.rows).await);
        eprintln!(
            "  polling SQL alone {:.0}/s",
            report.polling_floor[run].events_per_second
        );
        for (t, b) in targets.iter().zip(&mut report.brokers) {
            if let (Some(bin), true) = (&a.baseline, baseline_first) {
                b.baseline_polling
                    .push(baseline_polling(bin, &db, &url, t, a.rows).await);
            }
            reset(&db).await;
            load(&db, a.rows).await;
            b.relay_polling
                .push(relay_polling(&db, &url, &t.brokers, a.rows, None, None).await);
            eprintln!(
                "  {}: relay polling {:.0}/s",
                t.name, b.relay_polling[run].events_per_second
            );
            if let (Some(bin), false) = (&a.baseline, baseline_first) {
                b.baseline_polling
                    .push(baseline_polling(bin, &db, &url, t, a.rows).await);
            }
            if let Some(eos) = &mut b.exactly_once {
                reset(&db).await;
                load(&db, a.rows).await;
                eos.relay_polling.push(
                    relay_polling(&db, &url, &t.brokers, a.rows, Some(a.eos_batch_size), None)
                        .await,
                );
                eprintln!(
                    "  {}: relay polling, exactly once {:.0}/s",
                    t.name, eos.relay_polling[run].events_per_second
                );
            }
            reset(&db).await;
            b.first_event_ms
                .push(first_event(&db, &url, &t.brokers).await);
        }
    }
    if let Some(dir) = &a.perf {
        profile_drains(a, &db, &url, targets, dir).await;
    }
    for (t, b) in targets.iter().zip(&mut report.brokers) {
        for _ in 0..a.runs {
            let us = librdkafka_floor(&t.brokers, a.rows);
            eprintln!("  {}: librdkafka alone {us:.2} µs CPU per event", t.name);
            b.librdkafka_cpu_us_per_event.push(us);
        }
    }
    let recv = median(
        report
            .pg_recvlogical
            .iter()
            .map(|d| d.events_per_second)
            .collect(),
    );
    let floor = median(
        report
            .polling_floor
            .iter()
            .map(|d| d.events_per_second)
            .collect(),
    );
    for (t, b) in targets.iter().zip(&mut report.brokers) {
        reset(&db).await;
        for run in 0..a.runs {
            reset(&db).await;
            let s = steady(a, &db, &url, &t.brokers, "bench_steady", None).await;
            eprintln!(
                "  {}: steady run {}: p99 {:.1} ms",
                t.name,
                run + 1,
                s.commit_to_ack_p99_ms
            );
            b.steady_runs.push(s);
        }
        let p99 = median(
            b.steady_runs
                .iter()
                .map(|s| s.commit_to_ack_p99_ms)
                .collect(),
        );
        let mid = b
            .steady_runs
            .iter()
            .position(|s| s.commit_to_ack_p99_ms == p99)
            .unwrap_or(0);
        b.steady = std::mem::take(&mut b.steady_runs[mid]);
        b.steady_runs[mid] = b.steady.clone();
        if let Some(eos) = &mut b.exactly_once {
            reset(&db).await;
            eos.steady = steady(
                a,
                &db,
                &url,
                &t.brokers,
                "bench_steady_eos",
                Some(a.eos_batch_size),
            )
            .await;
            eos.log_events_per_second =
                median(eos.relay_log.iter().map(|d| d.events_per_second).collect());
            eos.polling_events_per_second = median(
                eos.relay_polling
                    .iter()
                    .map(|d| d.events_per_second)
                    .collect(),
            );
            eos.log_cpu_us_per_event = cpu_us_per_event(&eos.relay_log, a.rows);
            eos.polling_cpu_us_per_event = cpu_us_per_event(&eos.relay_polling, a.rows);
        }
        let log = median(b.relay_log.iter().map(|d| d.events_per_second).collect());
        let polling = median(
            b.relay_polling
                .iter()
                .map(|d| d.events_per_second)
                .collect(),
        );
        let avro = median(b.avro_log.iter().map(|d| d.events_per_second).collect());
        b.median = Medians {
            avro_log_events_per_second: avro,
            avro_ratio_to_log: avro / log,
            avro_log_cpu_us_per_event: cpu_us_per_event(&b.avro_log, a.rows),
            pg_recvlogical_events_per_second: recv,
            log_events_per_second: log,
            polling_events_per_second: polling,
            log_ratio_to_pg_recvlogical: log / recv,
            polling_ratio_to_pg_recvlogical: polling / recv,
            polling_floor_events_per_second: floor,
            polling_ratio_to_floor: polling / floor,
            peak_rss_mb: b
                .relay_log
                .iter()
                .chain(&b.relay_polling)
                .map(|d| d.peak_rss_mb)
                .fold(b.steady.peak_rss_mb, f64::max),
            first_event_ms: median(b.first_event_ms.clone()),
            log_cpu_us_per_event: cpu_us_per_event(&b.relay_log, a.rows),
            polling_cpu_us_per_event: cpu_us_per_event(&b.relay_polling, a.rows),
        };
    }
    report
}
