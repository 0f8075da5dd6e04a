//! The steady run: a writer at a fixed rate while the relay runs, with end-to-end
//! events/s, commit→ack quantiles from the relay's own histogram, and RSS every second.

use super::*;

pub(crate) async fn steady(
    a: &Args,
    db: &Client,
    url: &str,
    broker: &str,
    slot: &str,
    eos: Eos,
) -> Steady {
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
        // Once a second after the warm-up, and at the last tick, so that a run of a
        // second or two has a sample too.
        if tick >= ticks / 10 && (tick % 100 == 0 || tick + 1 == ticks) {
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
pub(crate) async fn wait_acked(addr: std::net::SocketAddr, events: usize) -> String {
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
pub(crate) fn current_rss(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// A quantile of the commit→ack histogram, interpolated inside its bucket.
pub(crate) fn quantile(exposition: &str, q: f64) -> f64 {
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
