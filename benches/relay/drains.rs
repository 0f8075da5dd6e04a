//! The drains: the workload written into the outbox, then drained by `pg_recvlogical`,
//! by the relay in log mode and in polling mode (this build's and `--baseline`'s), each
//! timed and measured (peak RSS, CPU) from process start to the last acknowledgement.

use super::*;

/// A broker under test: its name in the report, its bootstrap list and a slot of its own.
pub(crate) struct Target {
    pub(crate) name: String,
    pub(crate) brokers: String,
    pub(crate) slot: String,
    /// Whether its transactions work: exactly-once delivery is measured beside.
    pub(crate) transactions: bool,
}

/// The `[sink.kafka]` lines of exactly-once delivery.
pub(crate) const EXACTLY_ONCE: &str =
    "delivery = \"exactly_once\"\ncheckpoint_topic = \"bench.checkpoints\"\n";

/// What a relay run is configured with beyond its mode: `None` at least once, or
/// exactly once with this batch size.
pub(crate) type Eos = Option<usize>;

/// The `[sink.kafka]` lines and the `batch_size` line of `eos`.
pub(crate) fn eos_lines(eos: Eos) -> (&'static str, String) {
    match eos {
        None => ("", String::new()),
        Some(n) => (EXACTLY_ONCE, format!("batch_size = {n}\n")),
    }
}

/// A log-mode drain by the `--baseline` binary, from its own slot.
pub(crate) async fn baseline_log(
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
pub(crate) async fn baseline_polling(
    bin: &Path,
    db: &Client,
    url: &str,
    t: &Target,
    rows: usize,
) -> Drain {
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
pub(crate) fn baseline_slot(t: &Target) -> String {
    format!("{}_baseline", t.slot)
}

/// The exactly-once slot of a target.
pub(crate) fn avro_slot(t: &Target) -> String {
    format!("{}_avro", t.slot)
}

pub(crate) fn eos_slot(t: &Target) -> String {
    format!("{}_eos", t.slot)
}

/// Empties the outbox and drops (and forgets) the benchmark's slots.
pub(crate) async fn reset(db: &Client) {
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
pub(crate) async fn load(db: &Client, rows: usize) -> String {
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

pub(crate) fn recvlogical(pg: &Postgres, slot: &str, end: &str, rows: usize) -> Drain {
    let started = Instant::now();
    let child = spawn_recvlogical(pg, slot, "outbox_relay", end);
    let (rss, cpu) = wait_measured(child);
    drain(started.elapsed(), rows, rss, cpu)
}

/// `pg_recvlogical` streaming `slot` through `publication` up to `end`, into /dev/null.
pub(crate) fn spawn_recvlogical(pg: &Postgres, slot: &str, publication: &str, end: &str) -> Child {
    Command::new(bin_dir().unwrap().join("pg_recvlogical"))
        .args([
            "-d",
            &pg.url("bench"),
            "--slot",
            slot,
            "--start",
            "--no-loop",
        ])
        .args(["-f", "/dev/null", "--endpos", end, "-o", "proto_version=1"])
        .args(["-o", &format!("publication_names={publication}")])
        .stdout(Stdio::null())
        .spawn()
        .expect("pg_recvlogical")
}

// The drain's whole setup, spelled out at each call: a struct would only rename it.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn relay_log(
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
pub(crate) async fn relay_log_avro(
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
pub(crate) async fn drain_log(
    config: &ConfigFile,
    db: &Client,
    slot: &str,
    end: &str,
    rows: usize,
    perf: Option<&Path>,
) -> Drain {
    drain_log_slots(config, db, &[slot.to_owned()], end, rows, perf)
        .await
        .0
}

/// Runs the relay with `config` until every one of `slots` flushed past `end`; also
/// returns the CPU seconds of the walsenders that served them.
pub(crate) async fn drain_log_slots(
    config: &ConfigFile,
    db: &Client,
    slots: &[String],
    end: &str,
    rows: usize,
    perf: Option<&Path>,
) -> (Drain, f64) {
    let machine = budget::snapshot();
    let started = Instant::now();
    let relay = spawn_relay(config.path());
    let profile = perf.map(|out| Profile::attach(relay.id(), out));
    let counter = CallCounter::attach(relay.id());
    let mut walsenders = std::collections::BTreeSet::new();
    loop {
        let row = db
            .query_one(
                "SELECT coalesce(bool_and(confirmed_flush_lsn >= $1::text::pg_lsn), false) \
                   AND count(*) = cardinality($2::text[]), \
                   array_remove(array_agg(active_pid), NULL) \
                 FROM pg_replication_slots WHERE slot_name = ANY($2::text[])",
                &[&end, &slots],
            )
            .await
            .unwrap();
        walsenders.extend(row.get::<_, Vec<i32>>(1));
        if row.get::<_, bool>(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let budget = budget::snapshot().since(&machine, relay.id(), rows);
    if let Some(p) = profile {
        p.finish();
    }
    let calls = counter.map(|c| c.finish(rows));
    // Read while the relay still streams: a walsender's figures go when it exits.
    let walsender_cpu = walsenders.iter().map(|&pid| measure(pid as u32).1).sum();
    let (rss, cpu) = stop_measured(relay);
    (
        Drain {
            calls,
            budget: Some(budget),
            ..drain(elapsed, rows, rss, cpu)
        },
        walsender_cpu,
    )
}

pub(crate) async fn relay_polling(
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
    let machine = budget::snapshot();
    let started = Instant::now();
    let relay = spawn_relay(config.path());
    let profile = perf.map(|out| Profile::attach(relay.id(), out));
    let counter = CallCounter::attach(relay.id());
    wait_empty(db, Duration::from_millis(10)).await;
    let elapsed = started.elapsed();
    let budget = budget::snapshot().since(&machine, relay.id(), rows);
    if let Some(p) = profile {
        p.finish();
    }
    let calls = counter.map(|c| c.finish(rows));
    let (rss, cpu) = stop_measured(relay);
    Drain {
        calls,
        budget: Some(budget),
        ..drain(elapsed, rows, rss, cpu)
    }
}

/// The polling floor: the relay's own batch read (`seq` order, its batch size and byte
/// budget) and DELETE, as the library builds them, looped inside the server by a `DO`
/// block with one commit per batch as the relay makes them — nothing sent out, no
/// visibility fence: what the database alone allows, an upper bound no client beats.
/// Its CPU is the server backend's.
///
/// The statements go in as static SQL, their parameters as PL/pgSQL variables, so the
/// server caches their plans as it does the relay's prepared statements. Run through
/// `EXECUTE … USING` instead, every batch was planned afresh with its own bounds and,
/// on this workload's estimates, JIT-compiled: 24k events/s, a third of what the relay
/// itself drained, which measured the JIT compiler rather than the SQL.
pub(crate) async fn polling_floor(db: &Client, url: &str, rows: usize) -> Drain {
    let config = config_file(url, "127.0.0.1:1", "polling", "", "");
    let config = outbox_relay::config::load(config.path()).expect("the floor's config");
    let (batch, delete) = outbox_relay::source::polling::batch_and_delete_sql(&config.source)
        .await
        .expect("the polling statements");
    let with_variables = |sql: &str, names: &[&str]| {
        names
            .iter()
            .enumerate()
            .fold(sql.to_owned(), |sql, (i, name)| {
                let placeholder = format!("${}", i + 1);
                assert!(sql.contains(&placeholder), "{placeholder} in {sql}");
                sql.replace(&placeholder, name)
            })
    };
    // Its columns are named c1, c2, …: c1 is the seq.
    let batch = with_variables(&batch, &["lo", "hi", "lim", "budget"]);
    let delete = with_variables(&delete, &["seqs"]);
    let floor = format!(
        "DO $floor$
         DECLARE lo int8 := 0; hi int8; lim int8 := {size}; budget int8 := {bytes};
                 seqs int8[]; r record;
         BEGIN
           SELECT coalesce(max(seq), 0) INTO hi FROM outbox;
           LOOP
             seqs := '{{}}';
             FOR r IN {batch} LOOP
               seqs := seqs || r.c1;
             END LOOP;
             EXIT WHEN cardinality(seqs) = 0;
             {delete};
             lo := seqs[cardinality(seqs)];
             COMMIT;
           END LOOP;
         END $floor$",
        size = config.source.polling.batch_size,
        bytes = config.source.max_batch_bytes,
    );
    let pid: i32 = db
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let backend_cpu = || stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap());
    let cpu_before = backend_cpu();
    let started = Instant::now();
    db.batch_execute(&floor).await.expect("the polling floor");
    let elapsed = started.elapsed();
    let cpu = backend_cpu() - cpu_before;
    let left: i64 = db
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the floor left rows behind");
    drain(elapsed, rows, 0.0, cpu)
}

/// Process start to the first event acknowledged (its row deleted), polling mode.
pub(crate) async fn first_event(db: &Client, url: &str, broker: &str) -> f64 {
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

pub(crate) async fn wait_empty(db: &Client, every: Duration) {
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

pub(crate) struct ConfigFile(pub(crate) tempfile::NamedTempFile, pub(crate) String);

impl ConfigFile {
    pub(crate) fn path(&self) -> &Path {
        self.0.path()
    }

    pub(crate) fn with_listen(self, port: u16) -> ConfigFile {
        let text = self.1.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        );
        write_config(text)
    }
}

/// The schema registry and schema entry of the Avro drain (`[sink.kafka.schema_registry]`
/// and `[[sink.kafka.schemas]]` for the workload's aggregate type), set once.
pub(crate) static AVRO: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The workload's payload (`load`) as an Avro record.
pub(crate) const BENCH_AVSC: &str = r#"{"type": "record", "name": "BenchEvent", "namespace": "bench",
  "fields": [{"name": "n", "type": "long"}, {"name": "agg", "type": "long"},
             {"name": "pad", "type": "string"}]}"#;

/// The `[sink.kafka.librdkafka]` table of every relay run (`--librdkafka`), set once.
pub(crate) static LIBRDKAFKA: std::sync::OnceLock<String> = std::sync::OnceLock::new();

pub(crate) fn config_file(
    url: &str,
    broker: &str,
    mode: &str,
    extra: &str,
    sink: &str,
) -> ConfigFile {
    let librdkafka = LIBRDKAFKA.get().map_or("", String::as_str);
    write_config(format!(
        "[source]\nmode = \"{mode}\"\ndatabase_url = \"{url}\"\n{extra}\n\
         [sink.kafka]\nbrokers = \"{broker}\"\n{sink}[http]\nlisten = \"127.0.0.1:0\"\n\
         {librdkafka}"
    ))
}

pub(crate) fn write_config(text: String) -> ConfigFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    ConfigFile(f, text)
}

pub(crate) fn spawn_relay(config: &Path) -> RelayProcess {
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
pub(crate) async fn with_binary<T>(bin: &Path, drain: impl std::future::Future<Output = T>) -> T {
    BINARY.with(|b| *b.borrow_mut() = Some(bin.to_owned()));
    let out = drain.await;
    BINARY.with(|b| *b.borrow_mut() = None);
    out
}

/// Peak RSS (MB) and CPU seconds of a running relay, then SIGTERM and wait.
pub(crate) fn stop_measured(mut relay: RelayProcess) -> (f64, f64) {
    let measured = measure(relay.id());
    let _ = relay.terminate_blocking();
    measured
}

/// Waits for a process to exit by itself, measuring it just before (polling /proc).
pub(crate) fn wait_measured(mut child: Child) -> (f64, f64) {
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

pub(crate) fn measure(pid: u32) -> (f64, f64) {
    let rss = outbox_relay::testkit::peak_rss_bytes(pid).unwrap_or(0) as f64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    (rss / (1024.0 * 1024.0), stat_cpu(&stat))
}

pub(crate) fn drain(elapsed: Duration, rows: usize, rss: f64, cpu: f64) -> Drain {
    Drain {
        seconds: elapsed.as_secs_f64(),
        events_per_second: rows as f64 / elapsed.as_secs_f64(),
        peak_rss_mb: rss,
        cpu_seconds: cpu,
        calls: None,
        budget: None,
    }
}
