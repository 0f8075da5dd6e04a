//! The benchmark of docs/design.md §11 (the performance targets): `scripts/bench` (or `cargo bench --bench relay`).
//!
//! In one run it starts an ephemeral PostgreSQL and the brokers (`--broker kafka`, `tansu`
//! or `both`, the default: Apache Kafka, one KRaft node, and tansu), writes the workload
//! (200,000 outbox rows of ~200-byte JSON, 1,000 rows per transaction, 10,000 aggregate
//! ids) and measures, median of 3:
//!
//! * `pg_recvlogical` draining the backlog from a slot to /dev/null (the ceiling the
//!   server's logical decoding sets);
//! * the relay binary in log mode draining the same backlog into the broker, timed from
//!   process start until the slot's flushed position passed the last commit (so every
//!   event was acknowledged by Kafka first);
//! * the relay in polling mode draining it, deletes included (until the table is empty);
//! * process start to first event acknowledged (one row, polling mode);
//! * a steady state: a writer at a fixed rate while the relay (log mode) runs, with
//!   end-to-end events/s and commit→ack p50/p99 from the relay's own histogram;
//! * peak RSS and CPU seconds of the relay process in each drain;
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
use outbox_relay::testkit::postgres::{bin_dir, Postgres};
use outbox_relay::testkit::registry::Registry;
use outbox_relay::testkit::tansu::Tansu;
use outbox_relay::testkit::{free_port, http_get, kafka, RelayProcess};
use serde::Serialize;
use tokio_postgres::Client;

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

/// One drain of the backlog by one process.
#[derive(Serialize, Clone, Copy)]
struct Drain {
    seconds: f64,
    events_per_second: f64,
    peak_rss_mb: f64,
    cpu_seconds: f64,
    /// With `--syscalls`: the relay's system calls and context switches per event.
    calls: Option<Calls>,
}

/// System calls and context switches of one relay drain, per event.
#[derive(Serialize, Clone, Copy, Default)]
struct Calls {
    recvfrom: f64,
    /// sendto and sendmsg.
    send: f64,
    epoll_wait: f64,
    /// poll (librdkafka's threads wait in it).
    poll: f64,
    futex: f64,
    context_switches: f64,
}

/// The tracepoints `--syscalls` counts, in [`Calls`]' order.
const TRACEPOINTS: [&str; 7] = [
    "syscalls:sys_enter_recvfrom",
    "syscalls:sys_enter_sendto",
    "syscalls:sys_enter_sendmsg",
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_poll",
    "syscalls:sys_enter_futex",
    "sched:sched_switch",
];

/// Whether drains count system calls (`--syscalls`), set once.
static COUNT_CALLS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// `perf stat` on a relay's tracepoints, attached right after it started (the threads it
/// creates later inherit the counters).
struct CallCounter(Child, tempfile::NamedTempFile);

impl CallCounter {
    fn attach(pid: u32) -> Option<CallCounter> {
        if !COUNT_CALLS.get().copied().unwrap_or(false) {
            return None;
        }
        let out = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new("perf")
            .args(["stat", "-x", ",", "-e", &TRACEPOINTS.join(","), "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(out.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("perf (Debian's linux-perf) for --syscalls");
        Some(CallCounter(child, out))
    }

    fn finish(mut self, rows: usize) -> Calls {
        stop_perf(&mut self.0);
        let text = std::fs::read_to_string(self.1.path()).unwrap_or_default();
        // CSV lines: count,unit,event,…
        let count = |event: &str| {
            text.lines()
                .find(|l| l.split(',').nth(2) == Some(event))
                .and_then(|l| l.split(',').next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
                / rows as f64
        };
        Calls {
            recvfrom: count(TRACEPOINTS[0]),
            send: count(TRACEPOINTS[1]) + count(TRACEPOINTS[2]),
            epoll_wait: count(TRACEPOINTS[3]),
            poll: count(TRACEPOINTS[4]),
            futex: count(TRACEPOINTS[5]),
            context_switches: count(TRACEPOINTS[6]),
        }
    }
}

#[derive(Serialize)]
struct Report {
    machine: String,
    rows: usize,
    runs: usize,
    pg_recvlogical: Vec<Drain>,
    /// One per broker, measured in this run.
    brokers: Vec<BrokerReport>,
}

/// The relay's figures into one broker.
#[derive(Serialize)]
struct BrokerReport {
    broker: String,
    relay_log: Vec<Drain>,
    relay_polling: Vec<Drain>,
    /// Log mode with every event Avro-encoded through the schema registry.
    avro_log: Vec<Drain>,
    first_event_ms: Vec<f64>,
    /// The steady run with the median p99, and every run's (one per `--runs`).
    steady: Steady,
    steady_runs: Vec<Steady>,
    median: Medians,
    /// librdkafka alone, in this process: the same messages through a producer with the
    /// relay's settings, CPU per event (µs) of each run. The floor under the relay's CPU.
    librdkafka_cpu_us_per_event: Vec<f64>,
    /// `--baseline`'s drains, each beside this build's of the same run (after it in even
    /// runs, before it in odd ones).
    baseline_log: Vec<Drain>,
    baseline_polling: Vec<Drain>,
    /// The same, with `sink.kafka.delivery = "exactly_once"` (brokers whose
    /// transactions work).
    exactly_once: Option<ExactlyOnce>,
}

#[derive(Serialize, Default)]
struct ExactlyOnce {
    batch_size: usize,
    relay_log: Vec<Drain>,
    relay_polling: Vec<Drain>,
    steady: Steady,
    log_events_per_second: f64,
    polling_events_per_second: f64,
    log_cpu_us_per_event: f64,
    polling_cpu_us_per_event: f64,
}

#[derive(Serialize, Default, Clone)]
struct Steady {
    target_events_per_second: usize,
    seconds: u64,
    events: usize,
    events_per_second: f64,
    commit_to_ack_p50_ms: f64,
    commit_to_ack_p99_ms: f64,
    peak_rss_mb: f64,
    /// Resident memory sampled every second after the first tenth of the run.
    rss_min_mb: f64,
    rss_max_mb: f64,
    /// Resident memory every second from the start, for drift and jitter.
    rss_mb_per_second: Vec<f64>,
    /// Mean RSS of the last window minus that of the first (after warm-up), in percent
    /// of the first: growth, if the relay leaks or a buffer creeps.
    rss_drift_percent: f64,
    /// Max minus min within the last window, in percent of its mean: noise.
    rss_jitter_percent: f64,
    /// The window: a minute, or a quarter of a shorter run.
    rss_window_seconds: usize,
}

/// Drift (first window after warm-up vs last window) and jitter (spread inside the last
/// window) of a per-second RSS series, in percent; and the window length.
fn drift_and_jitter(per_second: &[f64]) -> (f64, f64, usize) {
    let window = (per_second.len() / 4).clamp(1, 60);
    // The first tenth is start-up (buffers filling), not drift.
    let start = per_second.len() / 10;
    if per_second.len() < start + 2 * window {
        return (0.0, 0.0, window);
    }
    let mean = |w: &[f64]| w.iter().sum::<f64>() / w.len() as f64;
    let first = mean(&per_second[start..start + window]);
    let last_w = &per_second[per_second.len() - window..];
    let last = mean(last_w);
    let (lo, hi) = last_w
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    (
        (last / first - 1.0) * 100.0,
        (hi - lo) / last * 100.0,
        window,
    )
}

#[derive(Serialize, Default)]
struct Medians {
    pg_recvlogical_events_per_second: f64,
    log_events_per_second: f64,
    polling_events_per_second: f64,
    log_ratio_to_pg_recvlogical: f64,
    polling_ratio_to_pg_recvlogical: f64,
    peak_rss_mb: f64,
    first_event_ms: f64,
    log_cpu_us_per_event: f64,
    polling_cpu_us_per_event: f64,
    avro_log_events_per_second: f64,
    /// Avro-encoded log mode against pass-through log mode (the target: ≥ 0.8).
    avro_ratio_to_log: f64,
    avro_log_cpu_us_per_event: f64,
}

/// A broker under test: its name in the report, its bootstrap list and a slot of its own.
struct Target {
    name: String,
    brokers: String,
    slot: String,
    /// Whether its transactions work: exactly-once delivery is measured beside.
    transactions: bool,
}

/// The `[sink.kafka]` lines of exactly-once delivery.
const EXACTLY_ONCE: &str =
    "delivery = \"exactly_once\"\ncheckpoint_topic = \"bench.checkpoints\"\n";

/// What a relay run is configured with beyond its mode: `None` at least once, or
/// exactly once with this batch size.
type Eos = Option<usize>;

/// The `[sink.kafka]` lines and the `batch_size` line of `eos`.
fn eos_lines(eos: Eos) -> (&'static str, String) {
    match eos {
        None => ("", String::new()),
        Some(n) => (EXACTLY_ONCE, format!("batch_size = {n}\n")),
    }
}

/// A log-mode drain by the `--baseline` binary, from its own slot.
async fn baseline_log(
    bin: &Path,
    db: &Client,
    url: &str,
    t: &Target,
    end: &str,
    rows: usize,
) -> Drain {
    let slot = baseline_slot(t);
    let d = with_binary(
        bin,
        relay_log(db, url, &t.brokers, &slot, end, rows, None, None),
    )
    .await;
    eprintln!(
        "  {}: baseline log mode {:.0}/s",
        t.name, d.events_per_second
    );
    d
}

/// A polling drain by the `--baseline` binary, of a fresh backlog.
async fn baseline_polling(bin: &Path, db: &Client, url: &str, t: &Target, rows: usize) -> Drain {
    reset(db).await;
    load(db, rows).await;
    let d = with_binary(bin, relay_polling(db, url, &t.brokers, rows, None, None)).await;
    eprintln!(
        "  {}: baseline polling {:.0}/s",
        t.name, d.events_per_second
    );
    d
}

/// The `--baseline` binary's slot of a target.
fn baseline_slot(t: &Target) -> String {
    format!("{}_baseline", t.slot)
}

/// The exactly-once slot of a target.
fn avro_slot(t: &Target) -> String {
    format!("{}_avro", t.slot)
}

fn eos_slot(t: &Target) -> String {
    format!("{}_eos", t.slot)
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
    let mut report = Report {
        machine: machine(),
        rows: a.rows,
        runs: a.runs,
        pg_recvlogical: Vec::new(),
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
        let slots = std::iter::once("bench_recv".to_owned()).chain(targets.iter().flat_map(|t| {
            std::iter::once(t.slot.clone())
                .chain(t.transactions.then(|| eos_slot(t)))
                .chain(std::iter::once(avro_slot(t)))
                .chain(a.baseline.is_some().then(|| baseline_slot(t)))
        }));
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

/// One more log-mode and polling drain per broker, at least once, each with `perf record`
/// attached to the relay (not counted in the figures: the sampling costs CPU).
async fn profile_drains(a: &Args, db: &Client, url: &str, targets: &[Target], dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for t in targets {
        let name: String = t
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        reset(db).await;
        db.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&t.slot],
        )
        .await
        .unwrap();
        let end = load(db, a.rows).await;
        let out = dir.join(format!("{name}.log.data"));
        let d = relay_log(db, url, &t.brokers, &t.slot, &end, a.rows, None, Some(&out)).await;
        eprintln!(
            "  profiled log mode into {}: {:.2} CPU-s",
            out.display(),
            d.cpu_seconds
        );
        reset(db).await;
        load(db, a.rows).await;
        let out = dir.join(format!("{name}.polling.data"));
        let d = relay_polling(db, url, &t.brokers, a.rows, None, Some(&out)).await;
        eprintln!(
            "  profiled polling into {}: {:.2} CPU-s",
            out.display(),
            d.cpu_seconds
        );
    }
}

/// The CPU librdkafka alone spends per event on the benchmark's messages (same size,
/// keys, three headers, the relay's producer settings: idempotent, acks=all, lz4), sent
/// in the relay's rhythm, in µs: everything the relay adds comes on top of this.
fn librdkafka_floor(brokers: &str, rows: usize) -> f64 {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

    let config = outbox_relay::config::from_value(serde_json::json!({
        "source": {"mode": "logical", "database_url": "postgres://u@h/db"},
        "sink": {"kafka": {"brokers": brokers}},
    }))
    .unwrap_or_else(|p| panic!("{p}"));
    let producer: ThreadedProducer<DefaultProducerContext> =
        outbox_relay::sink::kafka::producer_config(&config.sink)
            .create()
            .expect("producer");
    let messages: Vec<(String, String, String)> = (0..rows)
        .map(|n| {
            (
                format!("00000000-0000-0000-0000-{n:012}"),
                format!("agg-{}", n % AGGREGATES),
                format!(
                    r#"{{"n": {n}, "agg": {}, "pad": "{}"}}"#,
                    n % AGGREGATES,
                    "x".repeat(150)
                ),
            )
        })
        .collect();
    let send = |(id, key, payload): &(String, String, String)| {
        let headers = OwnedHeaders::new_with_capacity(3)
            .insert(Header {
                key: "id",
                value: Some(id),
            })
            .insert(Header {
                key: "event_type",
                value: Some("BenchEvent"),
            })
            .insert(Header {
                key: "aggregate_type",
                value: Some("bench"),
            });
        let mut record = BaseRecord::to(TOPIC)
            .key(key)
            .payload(payload)
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => return,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    };
    // The producer's start (metadata, producer id) is not per-event work.
    send(&messages[0]);
    producer.flush(Duration::from_secs(30)).expect("flush");
    let before = producer_threads_cpu();
    // Paced as the relay does: batches of 1,000, at most two of them unacknowledged.
    // Flooding the queue instead costs librdkafka about twice as much per message.
    for batch in messages.chunks(PER_TXN) {
        while producer.in_flight_count() as usize > PER_TXN {
            std::thread::sleep(Duration::from_micros(500));
        }
        for m in batch {
            send(m);
        }
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
    let after = producer_threads_cpu();
    (after - before) / rows as f64 * 1e6
}

/// CPU seconds of this thread and of librdkafka's and rdkafka's threads: not of the
/// benchmark's other threads (the brokers' log readers, say).
fn producer_threads_cpu() -> f64 {
    let me = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let mut total = stat_cpu(&me);
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("rdk:") || comm.starts_with("producer pollin") {
            total +=
                stat_cpu(&std::fs::read_to_string(task.path().join("stat")).unwrap_or_default());
        }
    }
    total
}

/// utime + stime of a `/proc/…/stat` line, in seconds.
fn stat_cpu(stat: &str) -> f64 {
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// `perf record` attached to a running relay (`--perf`): where its CPU goes, with call
/// stacks (DWARF unwinding: release builds keep no frame pointers).
struct Profile(Child);

impl Profile {
    fn attach(pid: u32, out: &Path) -> Profile {
        let child = Command::new("perf")
            .args([
                "record",
                "-q",
                "-F",
                "1999",
                "--call-graph",
                "dwarf,16384",
                "-p",
            ])
            .arg(pid.to_string())
            .arg("-o")
            .arg(out)
            .stdout(Stdio::null())
            .spawn()
            .expect("perf (Debian's linux-perf) for --perf");
        Profile(child)
    }

    fn finish(mut self) {
        stop_perf(&mut self.0);
    }
}

/// Stops a `perf` child as Ctrl-C would (it writes its output on SIGINT) and waits.
fn stop_perf(perf: &mut Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(perf.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = perf.wait();
}

/// Empties the outbox and drops (and forgets) the benchmark's slots.
async fn reset(db: &Client) {
    // One statement each: VACUUM refuses to run inside the implicit transaction of a
    // multi-statement string.
    for sql in [
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
           WHERE slot_name LIKE 'bench%' AND NOT active",
        // Dropped on purpose, so forgotten too (as `outbox-relay slot forget` says for
        // one): the relay would otherwise take the next run's missing slot for a lost one.
        "DO $$ BEGIN IF to_regclass('public.outbox_relay_slots') IS NOT NULL THEN \
           DELETE FROM public.outbox_relay_slots WHERE slot_name LIKE 'bench%'; END IF; END $$",
        "TRUNCATE outbox",
        "VACUUM outbox",
        "CHECKPOINT",
    ] {
        db.batch_execute(sql).await.unwrap();
    }
}

/// Writes the workload; returns the WAL position after its last commit.
async fn load(db: &Client, rows: usize) -> String {
    let started = Instant::now();
    for start in (0..rows).step_by(PER_TXN) {
        let end = (start + PER_TXN).min(rows) as i64 - 1;
        db.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'bench', 'agg-' || (g % $3), 'BenchEvent', \
                    jsonb_build_object('n', g, 'agg', g % $3, 'pad', repeat('x', 150)) \
             FROM generate_series($1::int8, $2::int8) g",
            &[&(start as i64), &end, &(AGGREGATES as i64)],
        )
        .await
        .unwrap();
    }
    let lsn: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    eprintln!("  loaded {rows} rows in {:.1?}", started.elapsed());
    lsn
}

fn recvlogical(pg: &Postgres, slot: &str, end: &str, rows: usize) -> Drain {
    let started = Instant::now();
    let child = Command::new(bin_dir().unwrap().join("pg_recvlogical"))
        .args([
            "-d",
            &pg.url("bench"),
            "--slot",
            slot,
            "--start",
            "--no-loop",
            "-f",
            "/dev/null",
        ])
        .args([
            "--endpos",
            end,
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=outbox_relay",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("pg_recvlogical");
    let (rss, cpu) = wait_measured(child);
    drain(started.elapsed(), rows, rss, cpu)
}

// The drain's whole setup, spelled out at each call: a struct would only rename it.
#[allow(clippy::too_many_arguments)]
async fn relay_log(
    db: &Client,
    url: &str,
    brokers: &str,
    slot: &str,
    end: &str,
    rows: usize,
    eos: Eos,
    perf: Option<&Path>,
) -> Drain {
    let (sink, batch) = eos_lines(eos);
    let config = config_file(
        url,
        brokers,
        "logical",
        &format!("[source.logical]\nslot = \"{slot}\"\ncreate_if_missing = false\n{batch}"),
        sink,
    );
    drain_log(&config, db, slot, end, rows, perf).await
}

/// A log-mode drain with every event Avro-encoded ([`AVRO`]'s schema and registry).
async fn relay_log_avro(
    db: &Client,
    url: &str,
    brokers: &str,
    slot: &str,
    end: &str,
    rows: usize,
) -> Drain {
    let config = config_file(
        url,
        brokers,
        "logical",
        &format!("[source.logical]\nslot = \"{slot}\"\ncreate_if_missing = false\n"),
        AVRO.get().expect("the registry started"),
    );
    drain_log(&config, db, slot, end, rows, None).await
}

/// Runs the relay with `config` until `slot` flushed past `end`.
async fn drain_log(
    config: &ConfigFile,
    db: &Client,
    slot: &str,
    end: &str,
    rows: usize,
    perf: Option<&Path>,
) -> Drain {
    let started = Instant::now();
    let relay = spawn_relay(config.path());
    let profile = perf.map(|out| Profile::attach(relay.id(), out));
    let counter = CallCounter::attach(relay.id());
    loop {
        let done: bool = db
            .query_one(
                "SELECT coalesce(confirmed_flush_lsn >= $1::text::pg_lsn, false) FROM pg_replication_slots \
                 WHERE slot_name = $2",
                &[&end, &slot],
            )
            .await
            .unwrap()
            .get(0);
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    if let Some(p) = profile {
        p.finish();
    }
    let calls = counter.map(|c| c.finish(rows));
    let (rss, cpu) = stop_measured(relay);
    Drain {
        calls,
        ..drain(elapsed, rows, rss, cpu)
    }
}

async fn relay_polling(
    db: &Client,
    url: &str,
    broker: &str,
    rows: usize,
    eos: Eos,
    perf: Option<&Path>,
) -> Drain {
    let (sink, batch) = eos_lines(eos);
    let config = config_file(
        url,
        broker,
        "polling",
        &format!("[source.polling]\n{batch}"),
        sink,
    );
    let started = Instant::now();
    let relay = spawn_relay(config.path());
    let profile = perf.map(|out| Profile::attach(relay.id(), out));
    let counter = CallCounter::attach(relay.id());
    wait_empty(db, Duration::from_millis(10)).await;
    let elapsed = started.elapsed();
    if let Some(p) = profile {
        p.finish();
    }
    let calls = counter.map(|c| c.finish(rows));
    let (rss, cpu) = stop_measured(relay);
    Drain {
        calls,
        ..drain(elapsed, rows, rss, cpu)
    }
}

/// Process start to the first event acknowledged (its row deleted), polling mode.
async fn first_event(db: &Client, url: &str, broker: &str) -> f64 {
    db.batch_execute(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('bench', 'first', 'First', '{}')",
    )
    .await
    .unwrap();
    let config = config_file(url, broker, "polling", "", "");
    let started = Instant::now();
    let relay = spawn_relay(config.path());
    wait_empty(db, Duration::from_millis(1)).await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    stop_measured(relay);
    ms
}

async fn steady(a: &Args, db: &Client, url: &str, broker: &str, slot: &str, eos: Eos) -> Steady {
    let port = free_port().unwrap();
    let (sink, batch) = eos_lines(eos);
    let config = config_file(
        url,
        broker,
        "logical",
        &format!("[source.logical]\nslot = \"{slot}\"\n{batch}"),
        sink,
    )
    .with_listen(port);
    let relay = spawn_relay(config.path());
    // Wait for the slot before writing, so every event is streamed.
    loop {
        let ok = db
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&slot],
            )
            .await
            .unwrap()
            .is_some();
        if ok {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // One event through first, so that the timed phase measures the steady state, not
    // the producer's start (metadata, producer id) that `first_event` measures.
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    db.batch_execute(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('bench', 'warm-up', 'WarmUp', '{}')",
    )
    .await
    .unwrap();
    wait_acked(addr, 1).await;
    let per_tick = (a.steady_rate / 100).max(1); // a transaction every 10 ms
    let ticks = a.steady_secs * 100;
    let started = Instant::now();
    let mut n = 0i64;
    let (mut rss_min, mut rss_max) = (f64::MAX, 0.0f64);
    let mut per_second = Vec::new();
    for tick in 0..ticks {
        if tick % 100 == 0 {
            per_second.push(current_rss(relay.id()));
        }
        if tick >= ticks / 10 && tick % 100 == 0 {
            let rss = current_rss(relay.id());
            rss_min = rss_min.min(rss);
            rss_max = rss_max.max(rss);
        }
        let due = started + Duration::from_millis(tick * 10);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        db.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'bench', 'agg-' || (g % $3), 'Steady', \
                    jsonb_build_object('n', g, 'pad', repeat('x', 150)) \
             FROM generate_series($1::int8, $2::int8) g",
            &[&n, &(n + per_tick as i64 - 1), &(AGGREGATES as i64)],
        )
        .await
        .unwrap();
        n += per_tick as i64;
    }
    let events = n as usize;
    let metrics = wait_acked(addr, events + 1).await;
    let (p50, p99) = (quantile(&metrics, 0.5), quantile(&metrics, 0.99));
    let elapsed = started.elapsed();
    let (rss, _) = stop_measured(relay);
    let (drift, jitter, window) = drift_and_jitter(&per_second);
    Steady {
        target_events_per_second: a.steady_rate,
        seconds: a.steady_secs,
        events,
        events_per_second: events as f64 / elapsed.as_secs_f64(),
        commit_to_ack_p50_ms: p50 * 1000.0,
        commit_to_ack_p99_ms: p99 * 1000.0,
        peak_rss_mb: rss,
        rss_min_mb: rss_min,
        rss_max_mb: rss_max,
        rss_drift_percent: drift,
        rss_jitter_percent: jitter,
        rss_window_seconds: window,
        rss_mb_per_second: per_second,
    }
}

/// Waits until the relay at `addr` has acknowledged `events` events; returns its metrics.
async fn wait_acked(addr: std::net::SocketAddr, events: usize) -> String {
    loop {
        if let Ok((_, metrics)) = http_get(addr, "/metrics").await {
            let count = outbox_relay::testkit::metric_value(
                &metrics,
                "outbox_relay_commit_to_ack_seconds_count",
            )
            .unwrap_or(0.0);
            if count as usize >= events {
                return metrics;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Resident memory (VmRSS) now, in MB.
fn current_rss(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// A quantile of the commit→ack histogram, interpolated inside its bucket.
fn quantile(exposition: &str, q: f64) -> f64 {
    let mut buckets: Vec<(f64, f64)> = exposition
        .lines()
        .filter(|l| l.starts_with("outbox_relay_commit_to_ack_seconds_bucket{"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return prev.0;
            }
            let within = if count > prev.1 {
                (rank - prev.1) / (count - prev.1)
            } else {
                1.0
            };
            return prev.0 + (le - prev.0) * within;
        }
        prev = (le, count);
    }
    prev.0
}

async fn wait_empty(db: &Client, every: Duration) {
    loop {
        let empty: bool = db
            .query_one("SELECT NOT EXISTS (SELECT 1 FROM outbox)", &[])
            .await
            .unwrap()
            .get(0);
        if empty {
            return;
        }
        tokio::time::sleep(every).await;
    }
}

struct ConfigFile(tempfile::NamedTempFile, String);

impl ConfigFile {
    fn path(&self) -> &Path {
        self.0.path()
    }

    fn with_listen(self, port: u16) -> ConfigFile {
        let text = self.1.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        );
        write_config(text)
    }
}

/// The schema registry and schema entry of the Avro drain (`[sink.kafka.schema_registry]`
/// and `[[sink.kafka.schemas]]` for the workload's aggregate type), set once.
static AVRO: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The workload's payload (`load`) as an Avro record.
const BENCH_AVSC: &str = r#"{"type": "record", "name": "BenchEvent", "namespace": "bench",
  "fields": [{"name": "n", "type": "long"}, {"name": "agg", "type": "long"},
             {"name": "pad", "type": "string"}]}"#;

/// The `[sink.kafka.librdkafka]` table of every relay run (`--librdkafka`), set once.
static LIBRDKAFKA: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn config_file(url: &str, broker: &str, mode: &str, extra: &str, sink: &str) -> ConfigFile {
    let librdkafka = LIBRDKAFKA.get().map_or("", String::as_str);
    write_config(format!(
        "[source]\nmode = \"{mode}\"\ndatabase_url = \"{url}\"\n{extra}\n\
         [sink.kafka]\nbrokers = \"{broker}\"\n{sink}[http]\nlisten = \"127.0.0.1:0\"\n\
         {librdkafka}"
    ))
}

/// Relay CPU per event of the median drain, in µs.
fn cpu_us_per_event(drains: &[Drain], rows: usize) -> f64 {
    median(drains.iter().map(|d| d.cpu_seconds).collect()) / rows as f64 * 1e6
}

fn write_config(text: String) -> ConfigFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    ConfigFile(f, text)
}

fn spawn_relay(config: &Path) -> RelayProcess {
    let baseline = BINARY.with(|b| b.borrow().clone());
    match baseline {
        Some(bin) => RelayProcess::spawn(bin.to_str().expect("a UTF-8 path"), config),
        None => RelayProcess::spawn(env!("CARGO_BIN_EXE_outbox-relay"), config),
    }
}

thread_local! {
    /// The binary `spawn_relay` starts instead of this build's, while [`with_binary`]
    /// runs (the drains run on the benchmark's one runtime thread).
    static BINARY: std::cell::RefCell<Option<PathBuf>> = const { std::cell::RefCell::new(None) };
}

/// Runs `drain` with `bin` as the relay binary.
async fn with_binary<T>(bin: &Path, drain: impl std::future::Future<Output = T>) -> T {
    BINARY.with(|b| *b.borrow_mut() = Some(bin.to_owned()));
    let out = drain.await;
    BINARY.with(|b| *b.borrow_mut() = None);
    out
}

/// Peak RSS (MB) and CPU seconds of a running relay, then SIGTERM and wait.
fn stop_measured(mut relay: RelayProcess) -> (f64, f64) {
    let measured = measure(relay.id());
    let _ = relay.terminate_blocking();
    measured
}

/// Waits for a process to exit by itself, measuring it just before (polling /proc).
fn wait_measured(mut child: Child) -> (f64, f64) {
    let mut last = (0.0, 0.0);
    loop {
        if child.try_wait().unwrap().is_some() {
            return last;
        }
        // A process exiting between two looks has no figures left: keep the last ones.
        let now = measure(child.id());
        if now.0 > 0.0 {
            last = now;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn measure(pid: u32) -> (f64, f64) {
    let rss = outbox_relay::testkit::peak_rss_bytes(pid).unwrap_or(0) as f64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    (rss / (1024.0 * 1024.0), stat_cpu(&stat))
}

fn drain(elapsed: Duration, rows: usize, rss: f64, cpu: f64) -> Drain {
    Drain {
        seconds: elapsed.as_secs_f64(),
        events_per_second: rows as f64 / elapsed.as_secs_f64(),
        peak_rss_mb: rss,
        cpu_seconds: cpu,
        calls: None,
    }
}

/// The smallest and largest of a series (the spread printed beside a median).
fn spread(v: impl Iterator<Item = f64>) -> (f64, f64) {
    v.fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    format!("{cpus} cores, {model}")
}

fn print_table(r: &Report) {
    println!(
        "\noutbox-relay benchmark — {} rows, median of {} ({})",
        r.rows, r.runs, r.machine
    );
    println!(
        "{:<52} {:>12} {:>17} {:>10} {:>10} {:>9} {:>11}",
        "", "events/s", "(min–max)", "seconds", "RSS MB", "CPU s", "(min–max)"
    );
    let row = |name: &str, d: &[Drain]| {
        let mid = median(d.iter().map(|x| x.events_per_second).collect());
        let x = d
            .iter()
            .find(|x| x.events_per_second == mid)
            .copied()
            .unwrap();
        let (lo, hi) = spread(d.iter().map(|x| x.events_per_second));
        let (clo, chi) = spread(d.iter().map(|x| x.cpu_seconds));
        println!(
            "{name:<52} {:>12.0} {:>17} {:>10.2} {:>10.1} {:>9.2} {:>11}",
            x.events_per_second,
            format!("({lo:.0}–{hi:.0})"),
            x.seconds,
            x.peak_rss_mb,
            x.cpu_seconds,
            format!("({clo:.2}–{chi:.2})")
        );
    };
    row("pg_recvlogical → /dev/null", &r.pg_recvlogical);
    for b in &r.brokers {
        row(
            &format!("relay, log mode → {} (acked)", b.broker),
            &b.relay_log,
        );
        row(
            &format!("relay, polling mode → {} (with deletes)", b.broker),
            &b.relay_polling,
        );
        row(
            &format!("relay, log mode, Avro-encoded → {}", b.broker),
            &b.avro_log,
        );
    }
    for b in &r.brokers {
        let m = &b.median;
        println!("\n{}:", b.broker);
        // Each run's relay drain against that run's pg_recvlogical drain.
        let ratios = |d: &[Drain]| {
            spread(
                d.iter()
                    .zip(&r.pg_recvlogical)
                    .map(|(x, p)| x.events_per_second / p.events_per_second),
            )
        };
        let ((llo, lhi), (plo, phi)) = (ratios(&b.relay_log), ratios(&b.relay_polling));
        println!(
            "  ratio to pg_recvlogical (of the medians): log mode {:.2}x, polling mode {:.2}x; \
             run by run: log {llo:.2}–{lhi:.2}x, polling {plo:.2}–{phi:.2}x",
            m.log_ratio_to_pg_recvlogical, m.polling_ratio_to_pg_recvlogical
        );
        let avro_ratios = spread(
            b.avro_log
                .iter()
                .zip(&b.relay_log)
                .map(|(x, p)| x.events_per_second / p.events_per_second),
        );
        println!(
            "  Avro-encoded log mode vs pass-through (of the medians): {:.2}x (target ≥ 0.8x); \
             run by run {:.2}–{:.2}x; CPU per event {:.2} µs (pass-through {:.2} µs)",
            m.avro_ratio_to_log,
            avro_ratios.0,
            avro_ratios.1,
            m.avro_log_cpu_us_per_event,
            m.log_cpu_us_per_event
        );
        let (lo, hi) = spread(b.first_event_ms.iter().copied());
        println!(
            "  process start → first event acked: {:.0} ms ({lo:.0}–{hi:.0})",
            m.first_event_ms
        );
        let (plo, phi) = spread(b.steady_runs.iter().map(|s| s.commit_to_ack_p99_ms));
        println!(
            "  steady commit→ack p99 over {} runs: median {:.1} ms ({plo:.1}–{phi:.1})",
            b.steady_runs.len(),
            b.steady.commit_to_ack_p99_ms
        );
        let s = &b.steady;
        println!(
            "  steady state ({} events/s offered for {} s): {:.0} events/s end to end, commit→ack p50 {:.1} ms, p99 {:.1} ms, RSS {:.1} MB",
            s.target_events_per_second, s.seconds, s.events_per_second, s.commit_to_ack_p50_ms, s.commit_to_ack_p99_ms, s.peak_rss_mb
        );
        println!(
            "  steady-state memory after warm-up: {:.1}–{:.1} MB ({:+.1}% spread)",
            s.rss_min_mb,
            s.rss_max_mb,
            (s.rss_max_mb / s.rss_min_mb - 1.0) * 100.0
        );
        println!(
            "  steady-state memory drift: {:+.1}% (mean of the last {w} s vs the first {w} s \
             after warm-up); jitter {:.1}% (spread within the last {w} s)",
            s.rss_drift_percent,
            s.rss_jitter_percent,
            w = s.rss_window_seconds
        );
        println!("  peak RSS over all relay runs: {:.1} MB", m.peak_rss_mb);
        let floor = &b.librdkafka_cpu_us_per_event;
        let (flo, fhi) = spread(floor.iter().copied());
        println!(
            "  librdkafka alone (same messages, the relay's producer settings): {:.2} µs CPU \
             per event ({flo:.2}–{fhi:.2})",
            median(floor.clone())
        );
        let us = |d: &[Drain]| spread(d.iter().map(|x| x.cpu_seconds / r.rows as f64 * 1e6));
        let ((llo, lhi), (plo, phi)) = (us(&b.relay_log), us(&b.relay_polling));
        println!(
            "  relay CPU per event: log mode {:.2} µs ({llo:.2}–{lhi:.2}), polling {:.2} µs \
             ({plo:.2}–{phi:.2})",
            m.log_cpu_us_per_event, m.polling_cpu_us_per_event
        );
        if !b.baseline_log.is_empty() {
            let cpu = |d: &[Drain]| median(d.iter().map(|x| x.cpu_seconds).collect());
            // Run by run, this build's CPU over the baseline's beside it.
            let pairs = |mine: &[Drain], base: &[Drain]| {
                let r: Vec<f64> = mine
                    .iter()
                    .zip(base)
                    .map(|(m, b)| m.cpu_seconds / b.cpu_seconds)
                    .collect();
                let (lo, hi) = spread(r.iter().copied());
                (median(r), lo, hi)
            };
            let (l, llo, lhi) = pairs(&b.relay_log, &b.baseline_log);
            let (p, plo, phi) = pairs(&b.relay_polling, &b.baseline_polling);
            println!(
                "  baseline binary: CPU per event log mode {:.2} µs, polling {:.2} µs; this \
                 build's CPU / the baseline's, run by run: log {l:.2}x ({llo:.2}–{lhi:.2}), \
                 polling {p:.2}x ({plo:.2}–{phi:.2})",
                cpu(&b.baseline_log) / r.rows as f64 * 1e6,
                cpu(&b.baseline_polling) / r.rows as f64 * 1e6,
            );
        }
        let calls = |what: &str, d: &[Drain]| {
            let c: Vec<Calls> = d.iter().filter_map(|x| x.calls).collect();
            if c.is_empty() {
                return;
            }
            let m = |f: fn(&Calls) -> f64| median(c.iter().map(f).collect());
            println!(
                "  {what}, per event (medians): recvfrom {:.3}, send {:.3}, epoll_wait {:.3}, \
                 poll {:.3}, futex {:.3}, context switches {:.3}",
                m(|c| c.recvfrom),
                m(|c| c.send),
                m(|c| c.epoll_wait),
                m(|c| c.poll),
                m(|c| c.futex),
                m(|c| c.context_switches),
            );
        };
        calls("system calls, log mode", &b.relay_log);
        calls("system calls, polling", &b.relay_polling);
        calls("system calls, baseline log mode", &b.baseline_log);
        calls("system calls, baseline polling", &b.baseline_polling);
        if let Some(e) = &b.exactly_once {
            let s = &e.steady;
            println!(
                "  exactly once (batch_size {}): log mode {:.0} events/s ({:.2} µs CPU per event), polling {:.0} events/s ({:.2} µs); steady commit→ack p50 {:.1} ms, p99 {:.1} ms, RSS {:.1} MB",
                e.batch_size,
                e.log_events_per_second,
                e.log_cpu_us_per_event,
                e.polling_events_per_second,
                e.polling_cpu_us_per_event,
                s.commit_to_ack_p50_ms,
                s.commit_to_ack_p99_ms,
                s.peak_rss_mb
            );
        }
    }
}
