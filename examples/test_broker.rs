//! One Apache Kafka broker and one Schema Registry for a whole test run: `scripts/test`
//! starts this, reads the `bootstrap=HOST:PORT` and `registry=URL` lines it prints, and
//! hands them to every test through `OUTBOX_RELAY_TEST_KAFKA` and
//! `OUTBOX_RELAY_TEST_REGISTRY` (see `outbox_relay::testkit::{apache_kafka, registry}`).
//!
//! Both live until this program's stdin closes. `scripts/test` keeps the write end
//! of that pipe open and nothing else, so however the script ends — finished, Ctrl-C,
//! killed — the pipe closes and the broker is killed and its directory deleted.

use std::io::Read;
use std::time::Instant;

use outbox_relay::testkit::apache_kafka::{Kafka, VERSION};
use outbox_relay::testkit::registry::Registry;

fn main() -> std::io::Result<()> {
    let started = Instant::now();
    // Both on the main thread: the JVMs die with it (PR_SET_PDEATHSIG) even if this is
    // killed. Started one after the other: two JVMs warming up at once on two cores
    // would not be faster.
    let kafka = Kafka::start()?;
    eprintln!(
        "test_broker: Apache Kafka {VERSION} ready at {} in {:.1} s",
        kafka.brokers(),
        started.elapsed().as_secs_f64()
    );
    println!("bootstrap={}", kafka.brokers());
    let started = Instant::now();
    let registry = Registry::start()?;
    eprintln!(
        "test_broker: schema registry ready at {} in {:.1} s",
        registry.url(),
        started.elapsed().as_secs_f64()
    );
    println!("registry={}", registry.url());
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(registry);
    drop(kafka);
    Ok(())
}
