//! `source.logical.shards = N`: one outbox over N slots, so N walsenders decode it.
//!
//! One slot is decoded by one walsender process, which caps a relay at that process's
//! speed. With N shards the outbox has N publications, each with a row filter on a hash of
//! the aggregate id ([`super::setup::shard_filter`]), and N slots streamed by one relay.
//! An aggregate always hashes to the same shard, so its events travel one stream in
//! commit order; different shards' streams are independent, as different aggregates'
//! events may be.
//!
//! Each shard is a whole [`LogicalSource`] (its slot memory, carriage check, first-start
//! snapshot through its filter, repair, cleanup, lost-slot policy); this file only
//! multiplexes them:
//! - **leading** is all or nothing: the shards' slots are taken in order, and a relay that
//!   gets some and not all lets go of them and waits as a standby, so no two relays ever
//!   publish one outbox;
//! - **batches** take events from every shard in turn, and remember which shard each run
//!   of events came from, so an acknowledgement (or a rewind), which covers the oldest
//!   events handed out, is split back to the shards they belong to.

use std::collections::VecDeque;
use std::time::Duration;

use tokio_postgres::Client;

use super::config::LogicalConfig;
use super::LogicalSource;
use crate::event::OutboxEvent;
use crate::metrics::Telemetry;
use crate::source::standby::{Attempt, Lead};
use crate::source::{Source, SourceConfig, SourceError};

/// How long `next_batch` waits for any shard before returning an empty batch.
const IDLE_WAIT: Duration = Duration::from_millis(100);

pub struct ShardedSource {
    config: SourceConfig,
    telemetry: Telemetry,
    shards: Vec<LogicalSource>,
    /// Runs of events handed out and not acknowledged, oldest first: (shard, events).
    runs: VecDeque<(usize, usize)>,
    /// The shard the next batch starts with, so a busy shard does not starve the others.
    next: usize,
}

/// Each shard's source configuration: its slot, publication and filter, and its share of
/// `source.max_batch_bytes`. A batch takes from every shard in turn and each shard's
/// stream queues up to its own share, so the shares together keep the bound the option
/// promises (on a batch, and on the events waiting for the relay) as one slot does.
pub fn shard_configs(config: &SourceConfig) -> Vec<SourceConfig> {
    let shards = config.logical.shards();
    let share = (config.max_batch_bytes / shards.len()).max(1);
    shards
        .into_iter()
        .map(|logical| SourceConfig {
            logical,
            max_batch_bytes: share,
            ..config.clone()
        })
        .collect()
}

impl ShardedSource {
    pub(crate) fn client(&self) -> &Client {
        self.shards[0].client()
    }

    /// The shards' slots, for the log and the outbox's identity.
    pub(crate) fn slots(&self) -> String {
        let names: Vec<String> = self
            .config
            .logical
            .shards()
            .into_iter()
            .map(|l| l.slot)
            .collect();
        names.join(", ")
    }

    pub async fn connect(
        config: &SourceConfig,
        telemetry: Telemetry,
    ) -> Result<ShardedSource, SourceError> {
        Ok(ShardedSource {
            config: config.clone(),
            shards: connect_all(config, &telemetry).await?,
            telemetry,
            runs: VecDeque::new(),
            next: 0,
        })
    }

    /// Splits `events` (the oldest handed out, in order) into the shards' runs, in order,
    /// and forgets the runs they cover.
    fn split<'e>(&mut self, events: &'e [OutboxEvent]) -> Vec<(usize, &'e [OutboxEvent])> {
        let mut parts = Vec::new();
        let mut rest = events;
        while !rest.is_empty() {
            let Some((shard, len)) = self.runs.front_mut() else {
                // More than was handed out: a bug. Acknowledging less than Kafka has is
                // safe (they come again), guessing a shard is not.
                tracing::error!(
                    extra = rest.len(),
                    "acknowledged more events than the shards handed out; not acknowledging \
                     the rest"
                );
                break;
            };
            let take = (*len).min(rest.len());
            parts.push((*shard, &rest[..take]));
            rest = &rest[take..];
            *len -= take;
            if *len == 0 {
                self.runs.pop_front();
            }
        }
        parts
    }
}

async fn connect_all(
    config: &SourceConfig,
    telemetry: &Telemetry,
) -> Result<Vec<LogicalSource>, SourceError> {
    let mut shards = Vec::new();
    for shard in shard_configs(config) {
        shards.push(LogicalSource::connect(&shard, telemetry.clone()).await?);
    }
    Ok(shards)
}

impl Lead for ShardedSource {
    /// Takes every shard's slot in order, or none: the first slot is the leader lock, and
    /// one taken while another relay still holds a later one (it is letting go) is given
    /// back by reconnecting every shard.
    async fn try_take(&mut self) -> Result<Attempt, SourceError> {
        for (i, shard) in self.shards.iter_mut().enumerate() {
            match shard.try_take().await? {
                Attempt::Led(_) => {}
                Attempt::Busy(why) => {
                    if i > 0 {
                        tracing::info!(
                            %why,
                            taken = i,
                            "another relay still holds a later shard: letting go of the \
                             shards taken"
                        );
                        self.shards = connect_all(&self.config, &self.telemetry).await?;
                    }
                    return Ok(Attempt::Busy(why));
                }
            }
        }
        Ok(Attempt::Led(format!("replication slots {}", self.slots())))
    }
}

impl Source for ShardedSource {
    async fn next_batch(
        &mut self,
        max: usize,
        wait: bool,
    ) -> Result<Vec<OutboxEvent>, SourceError> {
        let n = self.shards.len();
        for pass in 0..2 {
            let mut batch = Vec::new();
            let start = self.next;
            self.next = (self.next + 1) % n;
            for k in 0..n {
                if batch.len() >= max {
                    break;
                }
                let i = (start + k) % n;
                let events = self.shards[i].next_batch(max - batch.len(), false).await?;
                if !events.is_empty() {
                    self.runs.push_back((i, events.len()));
                    batch.extend(events);
                }
            }
            if !batch.is_empty() || !wait || pass == 1 {
                return Ok(batch);
            }
            // Nothing anywhere: wait for whichever shard gets something first.
            let waits = self.shards.iter_mut().map(|s| Box::pin(s.wait_for_items()));
            let _ = tokio::time::timeout(IDLE_WAIT, futures::future::select_all(waits)).await;
        }
        Ok(Vec::new())
    }

    async fn ack(&mut self, events: &[OutboxEvent]) -> Result<(), SourceError> {
        for (shard, events) in self.split(events) {
            self.shards[shard].ack(events).await?;
        }
        Ok(())
    }

    async fn keep_dead_letters(
        &mut self,
        events: &[(&OutboxEvent, &str)],
    ) -> Result<(), SourceError> {
        // One database: the first shard's connection serves them all.
        self.shards[0].keep_dead_letters(events).await
    }

    fn rewind(&mut self, unacknowledged: Vec<OutboxEvent>) {
        let mut per_shard: Vec<Vec<OutboxEvent>> = vec![Vec::new(); self.shards.len()];
        let mut events = unacknowledged.into_iter();
        for (shard, len) in std::mem::take(&mut self.runs) {
            per_shard[shard].extend(events.by_ref().take(len));
        }
        let strays = events.count();
        if strays > 0 {
            // More than was handed out: a bug. Handing them to a guessed shard could
            // reorder an aggregate; say so loudly instead.
            tracing::error!(
                strays,
                "rewound more events than the shards handed out; they are not replayed"
            );
        }
        for (shard, events) in self.shards.iter_mut().zip(per_shard) {
            shard.rewind(events);
        }
    }

    fn mid_transaction(&self) -> bool {
        self.shards.iter().any(|s| s.mid_transaction())
    }

    async fn finish(&mut self) -> Result<(), SourceError> {
        for shard in &mut self.shards {
            shard.finish().await?;
        }
        Ok(())
    }
}

/// The slots of this outbox under any shard count: `<slot>` and `<slot>_<i>_of_<n>`.
///
/// A relay refuses to start (and `check` fails) when it finds one the configuration does
/// not name: slots of another shard count hold WAL and positions this configuration
/// would never read, so starting anew beside them would skip or repeat what they hold.
pub async fn require_matching_slots(
    sql: &Client,
    logical: &LogicalConfig,
) -> Result<(), SourceError> {
    let expected = logical.all_slots();
    let others = strays(sql, Catalog::Slots, logical.base_slot(), &expected).await?;
    if others.is_empty() {
        return Ok(());
    }
    Err(SourceError::Setup(format!(
        "source.logical.shards = {} (slots {}), but this outbox has replication slot(s) {} of \
         another shard count: changing the number of shards is a procedure (stop the relay \
         gracefully, drop the old slots and publications, start; see the guide's \
         \"Shards\" section), or set shards back to what those slots were made for",
        expected.len(),
        expected.join(", "),
        others.join(", ")
    )))
}

/// Publications named for shards of another count (`<publication>_<i>_of_<m>`, m not
/// the configured count): `check` fails naming them. They carry nothing to this
/// configuration, so the relay itself starts beside them, but one left from a change of
/// `shards` is a change half done.
pub async fn other_shard_publications(
    sql: &Client,
    logical: &LogicalConfig,
) -> Result<Vec<String>, SourceError> {
    let expected: Vec<String> = logical
        .shards()
        .into_iter()
        .map(|l| l.publication)
        .collect();
    strays(sql, Catalog::Publications, &logical.publication, &expected).await
}

/// Where [`strays`] looks.
enum Catalog {
    /// Replication slots; the unsharded name counts too (a slot of `shards = 1`).
    Slots,
    /// Publications; the unsharded one is left alone (it may serve other readers).
    Publications,
}

/// The names in `catalog` made for some shard count of `base` (`<base>_<i>_of_<n>`,
/// and for slots `base` itself) that are not `expected`, in order. The base is matched
/// as text, not as a pattern, so no character of it (`_` in a LIKE, say) can match others.
async fn strays(
    sql: &Client,
    catalog: Catalog,
    base: &str,
    expected: &[String],
) -> Result<Vec<String>, SourceError> {
    let (names, with_base, what) = match catalog {
        Catalog::Slots => (
            "SELECT slot_name::text AS name FROM pg_replication_slots",
            true,
            "listing the outbox's replication slots",
        ),
        Catalog::Publications => (
            "SELECT pubname::text AS name FROM pg_publication",
            false,
            "listing the outbox's publications",
        ),
    };
    let rows = sql
        .query(
            &format!(
                "SELECT name FROM ({names}) n \
                 WHERE ($2 AND name = $1) \
                    OR (starts_with(name, $1 || '_') \
                        AND substr(name, length($1) + 2) ~ '^[0-9]+_of_[0-9]+$') \
                 ORDER BY 1"
            ),
            &[&base, &with_base],
        )
        .await
        .map_err(SourceError::pg(what))?;
    Ok(rows
        .iter()
        .map(|r| r.get::<_, String>(0))
        .filter(|name| !expected.contains(name))
        .collect())
}
