//! Operator commands: what `outbox-relay slot …`, `dead-letters …`, `pause` and `resume`
//! do, through PostgreSQL with the configuration's connection (its role and grants are
//! the authorisation; no new network surface).

pub mod dead_letters;
pub mod requests;

use crate::config::Config;
use crate::source::{logical, state, table, SourceError};

/// `outbox-relay slot forget`: the operator dropped the slot on purpose, so the next start
/// is a first start rather than a lost slot. Refused while the slot exists. With shards,
/// every shard's slot: one shard's own first start is what `on_slot_lost` is for.
pub async fn forget_slot(config: &Config) -> Result<String, SourceError> {
    let source = &config.source;
    let sql = table::connect(source).await?;
    let mut said = Vec::new();
    let state = state::prepare(&sql, &source.state_schema, true).await?;
    let shards = source.logical.shards();
    for shard in &shards {
        let slot = &shard.slot;
        if logical::slot_exists(&sql, slot).await? {
            return Err(SourceError::Setup(format!(
                "replication slot {slot} exists: the relay streams from it, there is nothing to \
                 forget. To start over on purpose, stop every relay, drop {} (SELECT \
                 pg_drop_replication_slot('{slot}')) and run this again",
                if shards.len() > 1 {
                    "every shard's slot"
                } else {
                    "it"
                }
            )));
        }
    }
    for shard in &shards {
        let slot = &shard.slot;
        said.push(if state.forget(&sql, slot).await? {
            format!(
                "forgot replication slot {slot}: the next start is a first start (the rows still \
                 in the outbox are published again; logical decoding messages written since the \
                 slot was dropped are gone)"
            )
        } else {
            format!(
                "the relay has no memory of replication slot {slot}: the next start is a first \
                 start"
            )
        });
    }
    Ok(said.join("\n"))
}
