//! One Apache Kafka broker for a whole test run: `scripts/test` starts this, reads the
//! `bootstrap=HOST:PORT` line it prints, and hands that to every test through
//! `OUTBOX_RELAY_TEST_KAFKA` (see `outbox_relay::testkit::apache_kafka`).
//!
//! The broker lives until this program's stdin closes. `scripts/test` keeps the write end
//! of that pipe open and nothing else, so however the script ends — finished, Ctrl-C,
//! killed — the pipe closes and the broker is killed and its directory deleted.

use std::io::Read;
use std::time::Instant;

use outbox_relay::testkit::apache_kafka::{Kafka, VERSION};

fn main() -> std::io::Result<()> {
    let started = Instant::now();
    // On the main thread: the JVM dies with it (PR_SET_PDEATHSIG) even if this is killed.
    let kafka = Kafka::start()?;
    eprintln!(
        "test_broker: Apache Kafka {VERSION} ready at {} in {:.1} s",
        kafka.brokers(),
        started.elapsed().as_secs_f64()
    );
    println!("bootstrap={}", kafka.brokers());
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(kafka);
    Ok(())
}
