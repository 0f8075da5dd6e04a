//! librdkafka's log lines and error reports, without the flood.
//!
//! While a broker is unreachable librdkafka reports the same thing several times a
//! second (`AllBrokersDown` after every failed connect, alternating "1/1" and "0/1
//! brokers are down"): `check` against a dead broker wrote 392 ERROR lines in 10 s.
//! Every client the relay creates (its producers, the checkpoint reader and admin
//! client) therefore logs through [`LogContext`], which goes through one process-wide
//! [`Limiter`]: the first report of a kind is written as librdkafka said it, repeats
//! are counted and summed up once per [`INTERVAL`] ("N more librdkafka errors like …
//! in the last 30 s"), and when a kind that repeated has not come again for an
//! interval, one line says so.
//!
//! A kind is an error's code, or a log line's level and facility, and the broker it is
//! about when it names one: the rest of the text varies from one report to the next
//! ("1/1 brokers are down", "0/1 brokers are down", "… (after 1ms in state CONNECT)"),
//! while a second broker going down is news. librdkafka's notices, info and debug lines
//! (only there when asked for with its `debug` property) are written as they come.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::ClientContext;
use tracing::Level;

/// How often repeats of a kind are summed up, and how long a kind must stay away to be
/// over.
pub const INTERVAL: Duration = Duration::from_secs(30);

/// How often the background thread looks for summaries that are due.
const TICK: Duration = Duration::from_secs(1);

/// The context of every librdkafka client the relay creates: log lines and error
/// reports go through the process-wide [`Limiter`].
#[derive(Clone, Copy, Debug)]
pub struct LogContext {
    /// Which client reports, in the first line of each kind.
    client: &'static str,
}

impl LogContext {
    pub const fn new(client: &'static str) -> LogContext {
        LogContext { client }
    }
}

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log(self.client, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self::error(self.client, Level::ERROR, &error, reason);
    }
}

/// A librdkafka log line from `client`, rate limited when it is a warning or worse.
pub fn log(client: &'static str, level: RDKafkaLogLevel, fac: &str, message: &str) {
    let level = match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => Level::ERROR,
        RDKafkaLogLevel::Warning => Level::WARN,
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => Level::INFO,
        RDKafkaLogLevel::Debug => Level::DEBUG,
    };
    let text = format!("librdkafka: {fac} {message}");
    // tracing orders levels by verbosity: INFO and DEBUG are above WARN.
    if level > Level::WARN {
        write(level, Some(client), &text);
    } else {
        note(client, &log_kind(level, fac, message), level, &text);
    }
}

/// A librdkafka error report from `client`, written at `level` when it is the first of
/// its kind.
pub fn error(client: &'static str, level: Level, error: &KafkaError, reason: &str) {
    let text = format!("librdkafka: {error}: {reason}");
    note(client, &error_kind(error, reason), level, &text);
}

/// Errors of one code about one broker are one kind, whatever else their reason says.
fn error_kind(error: &KafkaError, reason: &str) -> String {
    // "127.0.0.1:9092/1: Connect to … failed: …"
    let broker = reason
        .split_once(": ")
        .map(|(first, _)| first)
        .filter(|first| first.contains('/') && !first.contains(' '))
        .unwrap_or("");
    format!("error {error} {broker}")
}

/// Log lines of one level and facility from one broker's thread are one kind.
fn log_kind(level: Level, fac: &str, message: &str) -> String {
    // "[thrd:127.0.0.1:9092/bootstrap]: …"
    let thread = message
        .strip_prefix("[thrd:")
        .and_then(|m| m.split_once(']'))
        .map_or("", |(thread, _)| thread);
    format!("log {level} {fac} {thread}")
}

fn note(client: &'static str, kind: &str, level: Level, text: &str) {
    let lines = {
        let mut limiter = limiter().lock().unwrap_or_else(|e| e.into_inner());
        limiter.note(kind, level, text, Instant::now())
    };
    for line in lines {
        emit(line, client);
    }
}

/// The process-wide limiter; the first call starts the thread that writes the
/// summaries when they are due (also when librdkafka has gone quiet).
fn limiter() -> &'static Mutex<Limiter> {
    static LIMITER: OnceLock<Mutex<Limiter>> = OnceLock::new();
    LIMITER.get_or_init(|| {
        // Without the thread (it could not be started) summaries still come, with the
        // next report.
        let _ = std::thread::Builder::new()
            .name("librdkafka-log".into())
            .spawn(|| loop {
                std::thread::sleep(TICK);
                let lines = {
                    let mut limiter = limiter().lock().unwrap_or_else(|e| e.into_inner());
                    limiter.tick(Instant::now())
                };
                for line in lines {
                    emit(line, "");
                }
            });
        Mutex::new(Limiter::new(INTERVAL))
    })
}

fn emit(line: Line, client: &'static str) {
    match line {
        Line::First { level, text } => write(level, Some(client).filter(|c| !c.is_empty()), &text),
        Line::Repeated {
            level,
            count,
            like,
            over,
        } => write(
            level,
            None,
            &format!(
                "{count} more librdkafka {} like \"{like}\" in the last {} s",
                noun(level, count),
                over.as_secs()
            ),
        ),
        Line::Stopped {
            level,
            count,
            like,
            quiet,
        } => {
            let more = if count > 0 {
                format!("; {count} more before that since the last line about it")
            } else {
                String::new()
            };
            write(
                Level::INFO,
                None,
                &format!(
                    "no more librdkafka {} like \"{like}\" for {} s{more}",
                    noun(level, 2),
                    quiet.as_secs()
                ),
            );
        }
    }
}

fn noun(level: Level, count: u64) -> &'static str {
    match (level, count) {
        (Level::ERROR, 1) => "error",
        (Level::ERROR, _) => "errors",
        (Level::WARN, 1) => "warning",
        (Level::WARN, _) => "warnings",
        (_, 1) => "message",
        _ => "messages",
    }
}

fn write(level: Level, client: Option<&str>, text: &str) {
    match level {
        Level::ERROR => tracing::error!(target: "librdkafka", client, "{text}"),
        Level::WARN => tracing::warn!(target: "librdkafka", client, "{text}"),
        Level::INFO => tracing::info!(target: "librdkafka", client, "{text}"),
        Level::DEBUG => tracing::debug!(target: "librdkafka", client, "{text}"),
        Level::TRACE => tracing::trace!(target: "librdkafka", client, "{text}"),
    }
}

/// What to write about the reports seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// The first report of its kind, or the first since the kind stopped: written as is.
    First { level: Level, text: String },
    /// `count` reports of a kind within `over`, not written one by one.
    Repeated {
        level: Level,
        count: u64,
        /// The first report of the kind.
        like: String,
        over: Duration,
    },
    /// A kind that repeated has not come again for `quiet`; `count` of its reports were
    /// not summed up yet.
    Stopped {
        level: Level,
        count: u64,
        like: String,
        quiet: Duration,
    },
}

/// Decides, per kind of report, what is written: the first report, then a summary per
/// interval, then that it stopped. Time comes from the caller, so tests run on a fake
/// clock.
#[derive(Debug)]
pub struct Limiter {
    interval: Duration,
    /// By kind; ordered, so that lines due at the same tick come in a stable order.
    episodes: BTreeMap<String, Episode>,
}

/// One kind, from its first report until it has been away for an interval.
#[derive(Debug)]
struct Episode {
    level: Level,
    like: String,
    /// Since when `pending` counts.
    window: Instant,
    last_seen: Instant,
    /// Reports not written and not summed up yet.
    pending: u64,
    /// Whether any report of this episode was held back.
    repeated: bool,
}

impl Limiter {
    pub fn new(interval: Duration) -> Limiter {
        Limiter {
            interval,
            episodes: BTreeMap::new(),
        }
    }

    /// A report of `kind` at `now`; returns what to write (summaries that fell due
    /// included).
    pub fn note(&mut self, kind: &str, level: Level, text: &str, now: Instant) -> Vec<Line> {
        let mut lines = self.tick(now);
        match self.episodes.get_mut(kind) {
            Some(episode) => {
                episode.pending += 1;
                episode.repeated = true;
                episode.last_seen = now;
            }
            None => {
                self.episodes.insert(
                    kind.to_owned(),
                    Episode {
                        level,
                        like: text.to_owned(),
                        window: now,
                        last_seen: now,
                        pending: 0,
                        repeated: false,
                    },
                );
                lines.push(Line::First {
                    level,
                    text: text.to_owned(),
                });
            }
        }
        lines
    }

    /// The summaries due at `now`, and the kinds that stopped.
    pub fn tick(&mut self, now: Instant) -> Vec<Line> {
        let mut lines = Vec::new();
        let interval = self.interval;
        self.episodes.retain(|_, e| {
            let quiet = now.saturating_duration_since(e.last_seen);
            if quiet >= interval {
                if e.repeated {
                    lines.push(Line::Stopped {
                        level: e.level,
                        count: e.pending,
                        like: std::mem::take(&mut e.like),
                        quiet,
                    });
                }
                return false;
            }
            let over = now.saturating_duration_since(e.window);
            if e.pending > 0 && over >= interval {
                lines.push(Line::Repeated {
                    level: e.level,
                    count: e.pending,
                    like: e.like.clone(),
                    over,
                });
                e.pending = 0;
                e.window = now;
            }
            true
        });
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaErrorCode;

    const DOWN: &str = "error Global error: AllBrokersDown";

    /// Feeds `kind` every `every` from `start` for `for_`, ticking each second as the
    /// background thread does; returns every line and the number of reports.
    fn flood(
        limiter: &mut Limiter,
        kind: &str,
        start: Instant,
        every: Duration,
        for_: Duration,
    ) -> (Vec<Line>, u64) {
        let mut lines = Vec::new();
        let (mut t, mut next_tick, mut reports) = (Duration::ZERO, TICK, 0);
        while t < for_ {
            while next_tick <= t {
                lines.extend(limiter.tick(start + next_tick));
                next_tick += TICK;
            }
            // The text varies within a kind, as AllBrokersDown's does.
            let text = format!("{}/1 brokers are down", reports % 2);
            lines.extend(limiter.note(kind, Level::ERROR, &text, start + t));
            reports += 1;
            t += every;
        }
        (lines, reports)
    }

    fn counted(lines: &[Line]) -> u64 {
        lines
            .iter()
            .map(|l| match l {
                Line::First { .. } => 1,
                Line::Repeated { count, .. } | Line::Stopped { count, .. } => *count,
            })
            .sum()
    }

    #[test]
    fn a_flood_of_one_kind_is_its_first_report_then_one_summary_per_interval() {
        let mut limiter = Limiter::new(INTERVAL);
        let start = Instant::now();
        // 48 a second for 95 s: what a dead broker gave.
        let (lines, reports) = flood(
            &mut limiter,
            DOWN,
            start,
            Duration::from_micros(20_833),
            Duration::from_secs(95),
        );
        assert!(reports >= 4560, "{reports}");
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert_eq!(
            lines[0],
            Line::First {
                level: Level::ERROR,
                text: "0/1 brokers are down".into()
            }
        );
        for line in &lines[1..] {
            match line {
                Line::Repeated {
                    level, like, over, ..
                } => {
                    assert_eq!(*level, Level::ERROR);
                    assert_eq!(like, "0/1 brokers are down", "the first report's text");
                    assert_eq!(*over, INTERVAL, "summed up once per interval");
                }
                other => panic!("not a summary: {other:?}"),
            }
        }
        // Nothing is lost: the first line plus the summaries account for every report
        // but those of the interval still running.
        let pending = reports - counted(&lines);
        assert!(pending > 0 && pending <= 48 * 5 + 1, "{pending} pending");
    }

    #[test]
    fn ten_seconds_of_a_dead_broker_are_one_line() {
        let mut limiter = Limiter::new(INTERVAL);
        let (lines, reports) = flood(
            &mut limiter,
            DOWN,
            Instant::now(),
            Duration::from_micros(20_833),
            Duration::from_secs(10),
        );
        assert!(reports >= 480, "{reports}");
        assert_eq!(lines.len(), 1, "{lines:#?}");
    }

    #[test]
    fn a_kind_that_stops_says_so_once_and_can_start_again() {
        let mut limiter = Limiter::new(INTERVAL);
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        assert!(matches!(
            limiter.note(DOWN, Level::ERROR, "down", at(0))[..],
            [Line::First { .. }]
        ));
        for s in 1..=10 {
            assert_eq!(limiter.note(DOWN, Level::ERROR, "down", at(s)), []);
        }
        let mut lines = Vec::new();
        for s in 11..=45 {
            lines.extend(limiter.tick(at(s)).into_iter().map(|l| (s, l)));
        }
        assert_eq!(
            lines,
            [
                (
                    30,
                    Line::Repeated {
                        level: Level::ERROR,
                        count: 10,
                        like: "down".into(),
                        over: INTERVAL,
                    }
                ),
                // An interval after the last report, once.
                (
                    40,
                    Line::Stopped {
                        level: Level::ERROR,
                        count: 0,
                        like: "down".into(),
                        quiet: INTERVAL,
                    }
                ),
            ]
        );
        // It comes back: a first line again.
        assert_eq!(
            limiter.note(DOWN, Level::ERROR, "down again", at(50)),
            [Line::First {
                level: Level::ERROR,
                text: "down again".into()
            }]
        );
    }

    #[test]
    fn a_kind_that_stops_before_its_summary_is_due_counts_what_was_held_back() {
        let mut limiter = Limiter::new(Duration::from_secs(30));
        let start = Instant::now();
        limiter.note(DOWN, Level::WARN, "down", start);
        limiter.note(DOWN, Level::WARN, "down", start);
        // No tick ran in between (the thread could not start): both are due at once.
        assert_eq!(
            limiter.tick(start + Duration::from_secs(31)),
            [Line::Stopped {
                level: Level::WARN,
                count: 1,
                like: "down".into(),
                quiet: Duration::from_secs(31),
            }]
        );
    }

    #[test]
    fn a_one_off_report_is_one_line_and_no_stop_line() {
        let mut limiter = Limiter::new(INTERVAL);
        let start = Instant::now();
        assert_eq!(limiter.note("k", Level::WARN, "once", start).len(), 1);
        for s in 1..200 {
            assert_eq!(limiter.tick(start + Duration::from_secs(s)), []);
        }
    }

    #[test]
    fn each_kind_has_its_own_first_line_and_summary() {
        let mut limiter = Limiter::new(INTERVAL);
        let start = Instant::now();
        let mut lines = Vec::new();
        for i in 0..60u64 {
            let now = start + Duration::from_millis(500 * i);
            lines.extend(limiter.note("a", Level::ERROR, "a", now));
            lines.extend(limiter.note("b", Level::WARN, "b", now));
        }
        lines.extend(limiter.tick(start + INTERVAL));
        assert_eq!(
            lines,
            [
                Line::First {
                    level: Level::ERROR,
                    text: "a".into()
                },
                Line::First {
                    level: Level::WARN,
                    text: "b".into()
                },
                Line::Repeated {
                    level: Level::ERROR,
                    count: 59,
                    like: "a".into(),
                    over: INTERVAL
                },
                Line::Repeated {
                    level: Level::WARN,
                    count: 59,
                    like: "b".into(),
                    over: INTERVAL
                },
            ]
        );
    }

    #[test]
    fn a_kind_is_the_code_or_facility_and_the_broker_whatever_else_the_text_says() {
        let down = KafkaError::Global(RDKafkaErrorCode::AllBrokersDown);
        let transport = KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure);
        assert_eq!(
            error_kind(&down, "1/1 brokers are down"),
            error_kind(&down, "0/1 brokers are down")
        );
        assert_ne!(
            error_kind(&down, "1/1 brokers are down"),
            error_kind(&transport, "1/1 brokers are down")
        );
        let refused = |broker: &str, ms: u32| {
            format!(
                "{broker}: Connect to ipv4#127.0.0.1:1 failed: Connection refused \
                 (after {ms}ms in state CONNECT)"
            )
        };
        let (a, b) = ("127.0.0.1:1/bootstrap", "127.0.0.1:2/2");
        assert_eq!(
            error_kind(&transport, &refused(a, 0)),
            error_kind(&transport, &refused(a, 3))
        );
        assert_ne!(
            error_kind(&transport, &refused(a, 0)),
            error_kind(&transport, &refused(b, 0))
        );

        let fail = |thread: &str, text: &str| format!("[thrd:{thread}]: {thread}: {text}");
        assert_eq!(
            log_kind(Level::ERROR, "FAIL", &fail(a, "Connect failed (after 0ms)")),
            log_kind(Level::ERROR, "FAIL", &fail(a, "Connect failed (after 5ms)"))
        );
        assert_ne!(
            log_kind(Level::ERROR, "FAIL", &fail(a, "x")),
            log_kind(Level::ERROR, "FAIL", &fail(b, "x"))
        );
        assert_ne!(
            log_kind(Level::ERROR, "FAIL", "x"),
            log_kind(Level::WARN, "FAIL", "x")
        );
        assert_ne!(
            log_kind(Level::ERROR, "FAIL", "x"),
            log_kind(Level::ERROR, "REQTMOUT", "x")
        );
    }
}
