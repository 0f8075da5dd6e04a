//! `schemas check` and `schemas validate`: what an application's CI asks before a
//! deploy, and `check`'s schema lines. Nothing here registers a schema.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::config::Config;
use crate::sink::kafka::schema::registry::Compatibility;
use crate::sink::kafka::schema::{ContractError, Contracts, SchemaSource};

/// Exit code of a schema the registry would refuse, or a payload that does not fit.
const BREAK: u8 = 1;

/// A command line the configuration cannot answer (exit 2, like a bad configuration).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(String);

fn contracts(config: &Config) -> Result<&Arc<Contracts>, Usage> {
    config.sink.contracts.as_ref().ok_or_else(|| {
        Usage("the configuration has no [[sink.kafka.schemas]] entry: nothing to check".into())
    })
}

/// `schemas check`: would the registry take each file as its subject's next version?
pub async fn check(config: &Config) -> anyhow::Result<ExitCode> {
    let contracts = contracts(config)?;
    let mut breaks = 0;
    let mut failures = 0;
    let answers = contracts.compatibility(&config.sink).await;
    for (s, answer) in &answers {
        let e = &contracts.entries()[s.entry];
        let subject = s.subject.as_deref().unwrap_or("?");
        let what = format!("{} ({}), subject {subject}", e.origin(), e.label());
        match answer {
            Ok(Compatibility::Compatible) => println!("ok: {what}: compatible"),
            Ok(Compatibility::NewSubject) => {
                println!("ok: {what}: the subject has no version yet (this would be its first)")
            }
            Ok(Compatibility::Incompatible(reasons)) => {
                breaks += 1;
                println!("BREAK: {what}: {}", reasons.join("; "));
            }
            Err(ContractError::Registry(err)) => {
                failures += 1;
                println!("FAILED: {what}: {err}");
            }
            Err(err) => {
                breaks += 1;
                println!("BREAK: {what}: {err}");
            }
        }
    }
    skipped(contracts, config);
    if failures > 0 {
        anyhow::bail!("{failures} subject(s) could not be checked: the registry did not answer");
    }
    Ok(if breaks > 0 {
        ExitCode::from(BREAK)
    } else {
        ExitCode::SUCCESS
    })
}

/// Entries whose subject is only known from an event (the topic names the event type).
fn skipped(contracts: &Contracts, config: &Config) {
    let named: Vec<usize> = contracts
        .start_subjects(&config.sink)
        .iter()
        .map(|s| s.entry)
        .collect();
    for (i, e) in contracts.entries().iter().enumerate() {
        if !named.contains(&i) {
            println!(
                "skipped: {} ({}): its topic depends on the event type, so its subject is \
                 resolved when the first event is (add event_type to the entry to check it here)",
                e.origin(),
                e.label()
            );
        }
    }
}

/// `schemas validate`: do these sample payloads fit the schema of their events?
pub async fn validate(
    config: &Config,
    aggregate_type: &str,
    event_type: Option<&str>,
    files: &[PathBuf],
) -> anyhow::Result<ExitCode> {
    let contracts = contracts(config)?;
    let Some(entry) = contracts.entry_for(aggregate_type, event_type.unwrap_or("")) else {
        let what = match event_type {
            Some(e) => format!("{aggregate_type}/{e}"),
            None => aggregate_type.to_owned(),
        };
        anyhow::bail!(Usage(format!(
            "no [[sink.kafka.schemas]] entry applies to {what}: its events pass through \
             unencoded (check --aggregate-type and --event-type)"
        )));
    };
    let e = &contracts.entries()[entry];
    let codec = match &e.source {
        SchemaSource::File { codec, .. } => codec.clone(),
        // A registered version: the registry has the schema.
        SchemaSource::Registered { .. } => {
            let template = config
                .sink
                .topic_overrides
                .get(aggregate_type)
                .unwrap_or(&config.sink.topic);
            let topic: Arc<str> = template
                .render(aggregate_type, event_type.unwrap_or(""))
                .into();
            contracts.resolve(entry, &topic).await?.codec.clone()
        }
    };
    let mut unfit = 0;
    for file in files {
        let payload = std::fs::read(file)
            .map_err(|err| Usage(format!("cannot read {}: {err}", file.display())))?;
        let mut out = Vec::new();
        match codec.encode(&payload, &mut out) {
            Ok(()) => println!("{}: ok ({})", file.display(), e.origin()),
            Err(violations) => {
                unfit += 1;
                println!(
                    "{}: does not fit {} ({}):",
                    file.display(),
                    e.origin(),
                    e.label()
                );
                for v in violations {
                    println!("  {v}");
                }
            }
        }
    }
    Ok(if unfit > 0 {
        ExitCode::from(BREAK)
    } else {
        ExitCode::SUCCESS
    })
}

/// `check`'s lines on the schemas: registered, or what the start would do. A schema the
/// registry refuses is a configuration error, as it is for `run`.
pub async fn report(config: &Config) -> Result<bool, ContractError> {
    let Some(contracts) = &config.sink.contracts else {
        return Ok(true);
    };
    let register = contracts.registry_config().register;
    let mut healthy = true;
    for s in contracts.start_subjects(&config.sink) {
        let e = &contracts.entries()[s.entry];
        let Some(subject) = s.subject.clone() else {
            continue;
        };
        let what = format!("schemas: {} ({}), subject {subject}", e.origin(), e.label());
        let codec = match &e.source {
            SchemaSource::File { codec, .. } => codec,
            SchemaSource::Registered { version } => {
                match contracts.registry().version(&subject, *version).await {
                    Ok(Some(found)) => {
                        println!("{what}: ok (id {}, version {})", found.id, found.version)
                    }
                    Ok(None) => {
                        return Err(ContractError::NoVersion {
                            subject,
                            origin: e.origin(),
                            key: e.key.clone(),
                        })
                    }
                    Err(err) => {
                        healthy = false;
                        println!("{what}: FAILED: {err}");
                    }
                }
                continue;
            }
        };
        let registry = contracts.registry();
        let found = match registry.lookup(&subject, codec).await {
            Ok(found) => found,
            Err(err) => {
                healthy = false;
                println!("{what}: FAILED: {err}");
                continue;
            }
        };
        if let Some(found) = found {
            let version = found
                .version
                .map_or(String::new(), |v| format!(", version {v}"));
            println!("{what}: ok (registered, id {}{version})", found.id);
            continue;
        }
        let answer = contracts
            .compatibility_of(&s)
            .await
            .expect("the subject was named above");
        match answer {
            Ok(Compatibility::Incompatible(reasons)) => {
                return Err(ContractError::Incompatible {
                    subject,
                    origin: e.origin(),
                    reason: reasons.join("; "),
                })
            }
            Ok(_) if !register => {
                return Err(ContractError::NotRegistered {
                    subject,
                    origin: e.origin(),
                })
            }
            Ok(_) => println!("{what}: ok (compatible; run registers it at start)"),
            Err(err) => {
                healthy = false;
                println!("{what}: FAILED: {err}");
            }
        }
    }
    Ok(healthy)
}
