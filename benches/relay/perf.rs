//! Where the CPU goes: system-call counts (`--syscalls`), `perf record` profiles
//! (`--perf DIR`), and librdkafka alone, the floor under the relay's CPU per event.

use super::*;

/// The tracepoints `--syscalls` counts, in [`Calls`]' order.
pub(crate) const TRACEPOINTS: [&str; 7] = [
    "syscalls:sys_enter_recvfrom",
    "syscalls:sys_enter_sendto",
    "syscalls:sys_enter_sendmsg",
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_poll",
    "syscalls:sys_enter_futex",
    "sched:sched_switch",
];

/// Whether drains count system calls (`--syscalls`), set once.
pub(crate) static COUNT_CALLS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// `perf stat` on a relay's tracepoints, attached right after it started (the threads it
/// creates later inherit the counters).
pub(crate) struct CallCounter(pub(crate) Child, pub(crate) tempfile::NamedTempFile);

impl CallCounter {
    pub(crate) fn attach(pid: u32) -> Option<CallCounter> {
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

    pub(crate) fn finish(mut self, rows: usize) -> Calls {
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

/// One more log-mode and polling drain per broker, at least once, each with `perf record`
/// attached to the relay (not counted in the figures: the sampling costs CPU).
pub(crate) async fn profile_drains(
    a: &Args,
    db: &Client,
    url: &str,
    targets: &[Target],
    dir: &Path,
) {
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
pub(crate) fn librdkafka_floor(brokers: &str, rows: usize) -> f64 {
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

/// `perf record` attached to a running relay (`--perf`): where its CPU goes, with call
/// stacks (DWARF unwinding: release builds keep no frame pointers).
pub(crate) struct Profile(pub(crate) Child);

impl Profile {
    pub(crate) fn attach(pid: u32, out: &Path) -> Profile {
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

    pub(crate) fn finish(mut self) {
        stop_perf(&mut self.0);
    }
}

/// Stops a `perf` child as Ctrl-C would (it writes its output on SIGINT) and waits.
pub(crate) fn stop_perf(perf: &mut Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(perf.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = perf.wait();
}
