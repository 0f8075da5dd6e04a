//! CPU seconds read from `/proc`, for the benchmark and the examples that measure.

/// Ticks of the kernel's clock per second: `/proc` counts CPU time in them.
pub const TICKS_PER_SECOND: f64 = 100.0;

/// utime + stime of a `/proc/…/stat` line, in seconds.
pub fn stat_cpu(stat: &str) -> f64 {
    // The command name (field 2) may hold spaces and parentheses: count from its end.
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
    (ticks(11) + ticks(12)) / TICKS_PER_SECOND
}

/// CPU seconds of the calling thread and of librdkafka's and rdkafka's threads in this
/// process: not of its other threads (a proxy's, the brokers' log readers).
pub fn producer_threads_cpu() -> f64 {
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
