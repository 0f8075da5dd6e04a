//! The README's demo: an ephemeral PostgreSQL and a local tansu broker, the shipped SQL,
//! the relay running `config/demo.toml`, a writer placing sample orders (business row and
//! outbox event in one transaction), and a consumer printing what arrives in Kafka.
//! Ctrl-C stops everything and deletes what it created.
//!
//! `cargo run --example demo -- --exit-after N` stops by itself after N messages.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use outbox_relay::testkit::kafka::{create_topics, Reader};
use outbox_relay::testkit::postgres::Postgres;
use outbox_relay::testkit::tansu::Tansu;
use tokio_util::sync::CancellationToken;

const TOPICS: [&str; 3] = ["outbox.order", "outbox.payment", "outbox.dlq"];

fn main() -> anyhow::Result<()> {
    let exit_after: Option<usize> = std::env::args()
        .skip_while(|a| a != "--exit-after")
        .nth(1)
        .map(|n| n.parse())
        .transpose()
        .context("--exit-after takes a number")?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "outbox_relay=info".into()),
        )
        .init();

    // Started on the main thread: the children die with it even if this is killed.
    println!("demo: starting PostgreSQL and tansu on free ports…");
    let pg = Postgres::start().context("starting PostgreSQL")?;
    let broker = Tansu::start().context("starting tansu")?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(demo(&pg, &broker, exit_after));
    drop(runtime);
    drop(broker);
    drop(pg);
    println!("demo: stopped; PostgreSQL and tansu are gone, their temp dirs deleted");
    result
}

async fn demo(pg: &Postgres, broker: &Tansu, exit_after: Option<usize>) -> anyhow::Result<()> {
    let url = pg.create_database("shop").await?;
    let db = pg.connect("shop").await?;
    for (name, sql) in outbox_relay::SETUP_SQL {
        db.batch_execute(sql).await.with_context(|| name)?;
    }
    db.batch_execute(include_str!("../sql/010_sample.sql"))
        .await?;
    println!("demo: PostgreSQL at {url}, sql/ applied (one sample order already in the outbox)");
    create_topics(&broker.brokers(), &TOPICS, 3).await?;
    println!(
        "demo: broker at {}, topics {}",
        broker.brokers(),
        TOPICS.join(", ")
    );

    // The environment overrides that point config/demo.toml at this run's servers.
    let env = HashMap::from([
        ("OUTBOX_RELAY__SOURCE__DATABASE_URL".to_owned(), url.clone()),
        (
            "OUTBOX_RELAY__SINK__KAFKA__BROKERS".to_owned(),
            broker.brokers(),
        ),
    ]);
    let config_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml");
    let config = outbox_relay::config::load_with_env(&config_path, env)?;
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(outbox_relay::run(config, shutdown.clone()));

    let writer = tokio::spawn(write_orders(db, shutdown.clone()));
    let stop_reading = Arc::new(AtomicBool::new(false));
    let reader = {
        let (brokers, stop) = (broker.brokers(), stop_reading.clone());
        tokio::task::spawn_blocking(move || print_messages(&brokers, exit_after, &stop))
    };

    tokio::select! {
        _ = tokio::signal::ctrl_c() => println!("\ndemo: Ctrl-C, stopping…"),
        r = relay_until_done(&reader) => r?,
    }
    shutdown.cancel();
    stop_reading.store(true, Ordering::Relaxed);
    writer.await??;
    relay.await??;
    reader.await??;
    Ok(())
}

async fn relay_until_done(
    reader: &tokio::task::JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    while !reader.is_finished() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Places an order and, a moment later, pays it: each time the business row and its
/// outbox event are written in one transaction.
async fn write_orders(
    mut db: tokio_postgres::Client,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let customers = ["ada", "grace", "edsger", "barbara"];
    for n in 2.. {
        let order = format!("order-{n}");
        let customer = customers[n % customers.len()];
        let total = 1000 + (n as i64 * 377) % 9000;
        let tx = db.transaction().await?;
        tx.execute(
            "INSERT INTO orders (id, customer, total_cents) VALUES ($1, $2, $3)",
            &[&order, &customer, &total],
        )
        .await?;
        tx.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ('order', $1, 'OrderPlaced', jsonb_build_object('order_id', $1::text, 'customer', $2::text, 'total_cents', $3::int8))",
            &[&order, &customer, &total],
        )
        .await?;
        tx.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) \
             VALUES ('payment', $1, 'PaymentCaptured', jsonb_build_object('order_id', $1::text, 'amount_cents', $2::int8), \
                     jsonb_build_object('traceparent', '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'))",
            &[&order, &total],
        )
        .await?;
        tx.commit().await?;
        println!("demo: wrote {order} for {customer} ({total} cents) with 2 outbox events");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    Ok(())
}

fn print_messages(
    brokers: &str,
    exit_after: Option<usize>,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let reader = Reader::new(brokers, &TOPICS)?;
    let mut count = 0;
    while !stop.load(Ordering::Relaxed) && exit_after.is_none_or(|n| count < n) {
        let Some(m) = reader.next(Duration::from_millis(200))? else {
            continue;
        };
        count += 1;
        let headers: Vec<String> = m
            .headers
            .iter()
            .map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(v)))
            .collect();
        println!(
            "kafka: topic={} partition={} offset={} key={}\n       headers: {}\n       value:   {}",
            m.topic,
            m.partition,
            m.offset,
            m.key_str(),
            headers.join(", "),
            m.value_str()
        );
    }
    Ok(())
}
