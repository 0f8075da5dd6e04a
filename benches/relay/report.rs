//! What the benchmark reports: the figures of each drain and run, their medians and
//! spreads, the printed table (the JSON is these structs, serialised).

use super::*;

/// One drain of the backlog by one process.
#[derive(Serialize, Clone, Copy)]
pub(crate) struct Drain {
    pub(crate) seconds: f64,
    pub(crate) events_per_second: f64,
    pub(crate) peak_rss_mb: f64,
    pub(crate) cpu_seconds: f64,
    /// With `--syscalls`: the relay's system calls and context switches per event.
    pub(crate) calls: Option<Calls>,
    /// Where the machine's CPU went meanwhile, per event.
    pub(crate) budget: Option<Budget>,
}

/// System calls and context switches of one relay drain, per event.
#[derive(Serialize, Clone, Copy, Default)]
pub(crate) struct Calls {
    pub(crate) recvfrom: f64,
    /// sendto and sendmsg.
    pub(crate) send: f64,
    pub(crate) epoll_wait: f64,
    /// poll (librdkafka's threads wait in it).
    pub(crate) poll: f64,
    pub(crate) futex: f64,
    pub(crate) context_switches: f64,
}

#[derive(Serialize)]
pub(crate) struct Report {
    pub(crate) machine: String,
    pub(crate) rows: usize,
    pub(crate) runs: usize,
    pub(crate) pg_recvlogical: Vec<Drain>,
    /// The relay's polling statements looped inside the server (no client): the
    /// polling mode's own limit, as `pg_recvlogical` is log mode's.
    pub(crate) polling_floor: Vec<Drain>,
    /// Filtered `pg_recvlogical`s, one per shard, for 1, 2 and 4 shards, every run.
    pub(crate) recv_shards: Vec<super::shards::RecvDrain>,
    /// One per broker, measured in this run.
    pub(crate) brokers: Vec<BrokerReport>,
}

/// The relay's figures into one broker.
#[derive(Serialize)]
pub(crate) struct BrokerReport {
    pub(crate) broker: String,
    /// Log mode with 1, 2 and 4 shards (the first broker only), every run.
    pub(crate) shards: Vec<super::shards::ShardDrain>,
    pub(crate) relay_log: Vec<Drain>,
    pub(crate) relay_polling: Vec<Drain>,
    /// Log mode with every event Avro-encoded through the schema registry.
    pub(crate) avro_log: Vec<Drain>,
    pub(crate) first_event_ms: Vec<f64>,
    /// The steady run with the median p99, and every run's (one per `--runs`).
    pub(crate) steady: Steady,
    pub(crate) steady_runs: Vec<Steady>,
    pub(crate) median: Medians,
    /// librdkafka alone, in this process: the same messages through a producer with the
    /// relay's settings, CPU per event (µs) of each run. The floor under the relay's CPU.
    pub(crate) librdkafka_cpu_us_per_event: Vec<f64>,
    /// `--baseline`'s drains, each beside this build's of the same run (after it in even
    /// runs, before it in odd ones).
    pub(crate) baseline_log: Vec<Drain>,
    pub(crate) baseline_polling: Vec<Drain>,
    /// The same, with `sink.kafka.delivery = "exactly_once"` (brokers whose
    /// transactions work).
    pub(crate) exactly_once: Option<ExactlyOnce>,
}

#[derive(Serialize, Default)]
pub(crate) struct ExactlyOnce {
    pub(crate) batch_size: usize,
    pub(crate) relay_log: Vec<Drain>,
    pub(crate) relay_polling: Vec<Drain>,
    pub(crate) steady: Steady,
    pub(crate) log_events_per_second: f64,
    pub(crate) polling_events_per_second: f64,
    pub(crate) log_cpu_us_per_event: f64,
    pub(crate) polling_cpu_us_per_event: f64,
}

#[derive(Serialize, Default, Clone)]
pub(crate) struct Steady {
    pub(crate) target_events_per_second: usize,
    pub(crate) seconds: u64,
    pub(crate) events: usize,
    pub(crate) events_per_second: f64,
    pub(crate) commit_to_ack_p50_ms: f64,
    pub(crate) commit_to_ack_p99_ms: f64,
    pub(crate) peak_rss_mb: f64,
    /// Resident memory sampled every second after the first tenth of the run.
    pub(crate) rss_min_mb: f64,
    pub(crate) rss_max_mb: f64,
    /// Resident memory every second from the start, for drift and jitter.
    pub(crate) rss_mb_per_second: Vec<f64>,
    /// Mean RSS of the last window minus that of the first (after warm-up), in percent
    /// of the first: growth, if the relay leaks or a buffer creeps.
    pub(crate) rss_drift_percent: f64,
    /// Max minus min within the last window, in percent of its mean: noise.
    pub(crate) rss_jitter_percent: f64,
    /// The window: a minute, or a quarter of a shorter run.
    pub(crate) rss_window_seconds: usize,
}

/// Drift (first window after warm-up vs last window) and jitter (spread inside the last
/// window) of a per-second RSS series, in percent; and the window length.
pub(crate) fn drift_and_jitter(per_second: &[f64]) -> (f64, f64, usize) {
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
pub(crate) struct Medians {
    pub(crate) pg_recvlogical_events_per_second: f64,
    pub(crate) log_events_per_second: f64,
    pub(crate) polling_events_per_second: f64,
    pub(crate) log_ratio_to_pg_recvlogical: f64,
    pub(crate) polling_ratio_to_pg_recvlogical: f64,
    pub(crate) polling_floor_events_per_second: f64,
    /// Polling against its SQL alone (the target: ≥ 0.9).
    pub(crate) polling_ratio_to_floor: f64,
    pub(crate) peak_rss_mb: f64,
    pub(crate) first_event_ms: f64,
    pub(crate) log_cpu_us_per_event: f64,
    pub(crate) polling_cpu_us_per_event: f64,
    pub(crate) avro_log_events_per_second: f64,
    /// Avro-encoded log mode against pass-through log mode (the target: ≥ 0.8).
    pub(crate) avro_ratio_to_log: f64,
    pub(crate) avro_log_cpu_us_per_event: f64,
}

/// Relay CPU per event of the median drain, in µs.
pub(crate) fn cpu_us_per_event(drains: &[Drain], rows: usize) -> f64 {
    median(drains.iter().map(|d| d.cpu_seconds).collect()) / rows as f64 * 1e6
}

/// The smallest and largest of a series (the spread printed beside a median).
pub(crate) fn spread(v: impl Iterator<Item = f64>) -> (f64, f64) {
    v.fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)))
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub(crate) fn machine() -> String {
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

pub(crate) fn print_table(r: &Report) {
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
    row(
        "polling SQL alone, looped in the server (backend CPU)",
        &r.polling_floor,
    );
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
        let floor_ratios = spread(
            b.relay_polling
                .iter()
                .zip(&r.polling_floor)
                .map(|(x, p)| x.events_per_second / p.events_per_second),
        );
        println!(
            "  polling vs its SQL alone (of the medians): {:.2}x (target ≥ 0.9x); run by run \
             {:.2}–{:.2}x",
            m.polling_ratio_to_floor, floor_ratios.0, floor_ratios.1
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
        super::shards::print_scaling(r, b);
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
        let budget = |what: &str, d: &[Drain]| {
            let fields: [Field<Budget>; 6] = [
                ("PostgreSQL", |c| c.server),
                ("brokers and registry", |c| c.brokers),
                ("relay", |c| c.relay),
                ("other processes", |c| c.others),
                ("unattributed", |c| c.unattributed),
                ("idle", |c| c.idle),
            ];
            if let Some(line) = medians(d, |x| x.budget, &fields, 2) {
                println!("  {what}, the machine's CPU per event (medians, µs): {line}");
            }
        };
        let calls = |what: &str, d: &[Drain]| {
            let fields: [Field<Calls>; 6] = [
                ("recvfrom", |c| c.recvfrom),
                ("send", |c| c.send),
                ("epoll_wait", |c| c.epoll_wait),
                ("poll", |c| c.poll),
                ("futex", |c| c.futex),
                ("context switches", |c| c.context_switches),
            ];
            if let Some(line) = medians(d, |x| x.calls, &fields, 3) {
                println!("  {what}, per event (medians): {line}");
            }
        };
        budget("log mode", &b.relay_log);
        budget("polling", &b.relay_polling);
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

/// A figure's name in a printed line, and how to read it from a measurement.
type Field<T> = (&'static str, fn(&T) -> f64);

/// "name value, name value, …": the median of each field over the drains that measured
/// `T` (`None` when none did).
fn medians<T>(
    drains: &[Drain],
    measured: impl Fn(&Drain) -> Option<T>,
    fields: &[Field<T>],
    decimals: usize,
) -> Option<String> {
    let all: Vec<T> = drains.iter().filter_map(measured).collect();
    if all.is_empty() {
        return None;
    }
    let parts: Vec<String> = fields
        .iter()
        .map(|(name, field)| {
            let value = median(all.iter().map(field).collect());
            format!("{name} {value:.decimals$}")
        })
        .collect();
    Some(parts.join(", "))
}
