//! The fence of the polling visibility rule (see the parent module's docs).

use std::time::{Duration, Instant};

use tokio_postgres::{Client, Statement};

use crate::backoff::Backoff;
use crate::source::{quote_ident, SourceError, TableName};

/// First pause while waiting for outbox writers to finish; it doubles up to the poll
/// interval.
const FIRST_WAIT: Duration = Duration::from_millis(1);
/// After this long waiting for the same writers, the relay logs their pids.
const SLOW_WRITER_WARNING: Duration = Duration::from_secs(5);

pub(super) struct Fence {
    /// Every row with `seq <= settled` is committed or gone for good.
    settled: i64,
    oid: u32,
    max_seq: Statement,
    writers: Statement,
    still_writing: Statement,
}

impl Fence {
    pub(super) async fn prepare(
        client: &Client,
        table: &TableName,
        seq_column: &str,
        oid: u32,
    ) -> Result<Fence, SourceError> {
        let prepare = |sql: String| async move {
            client
                .prepare(&sql)
                .await
                .map_err(SourceError::pg("preparing the fence queries"))
        };
        let max_seq = prepare(format!(
            "SELECT coalesce(max({}), 0)::int8 FROM {}",
            quote_ident(seq_column),
            table.quoted()
        ))
        .await?;
        // Prepared transactions hold their locks with no pid: they count as writers too.
        // A writer still waiting for the lock has drawn no seq yet, so it is not one.
        let writers = prepare(
            "SELECT coalesce(array_agg(virtualtransaction), '{}')::text[] FROM pg_locks \
             WHERE locktype = 'relation' AND relation = $1 AND mode = 'RowExclusiveLock' \
             AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND pid IS DISTINCT FROM pg_backend_pid()"
                .to_owned(),
        )
        .await?;
        let still_writing = prepare(
            "SELECT coalesce(array_agg(coalesce(pid, 0)), '{}')::int4[] FROM pg_locks \
             WHERE locktype = 'relation' AND relation = $1 \
             AND mode = 'RowExclusiveLock' AND virtualtransaction = ANY($2::text[])"
                .to_owned(),
        )
        .await?;
        Ok(Fence {
            settled: 0,
            oid,
            max_seq,
            writers,
            still_writing,
        })
    }

    pub(super) fn seq(&self) -> i64 {
        self.settled
    }

    /// Moves the fence up to the highest visible `seq`, after waiting for every outbox
    /// writer that might still hold a lower one. The order of the two reads matters.
    pub(super) async fn advance(
        &mut self,
        client: &Client,
        max_pause: Duration,
    ) -> Result<(), SourceError> {
        let high: i64 = client
            .query_one(&self.max_seq, &[])
            .await
            .map_err(SourceError::pg("reading the highest seq"))?
            .get(0);
        if high <= self.settled {
            return Ok(());
        }
        let writers: Vec<String> = client
            .query_one(&self.writers, &[&self.oid])
            .await
            .map_err(SourceError::pg("listing outbox writers"))?
            .get(0);
        let mut pause = Backoff::new(FIRST_WAIT, max_pause);
        let started = Instant::now();
        let mut warned = false;
        while !writers.is_empty() {
            let running: Vec<i32> = client
                .query_one(&self.still_writing, &[&self.oid, &writers])
                .await
                .map_err(SourceError::pg("waiting for outbox writers"))?
                .get(0);
            if running.is_empty() {
                break;
            }
            if !warned && started.elapsed() > SLOW_WRITER_WARNING {
                // Publishing waits for these: say who, or an idle-in-transaction session
                // would stop the relay without a trace (pid 0: a prepared transaction).
                tracing::warn!(
                    pids = ?running,
                    waited = ?started.elapsed(),
                    "publishing waits for transactions that wrote to the outbox and are still open"
                );
                warned = true;
            }
            tokio::time::sleep(pause.next_pause()).await;
        }
        self.settled = high;
        Ok(())
    }
}
