//! `outbox-relay dead-letters list|show|redrive|discard`, `pause` and `resume`: what the
//! operator runs. Reading is done here; acting only records a request, which the
//! leading relay carries out ([`crate::relay::control`]) and answers within a second or
//! so. Bad arguments are refused before anything is recorded.

use std::time::{Duration, Instant};

use base64::prelude::{Engine as _, BASE64_STANDARD};
use tokio_postgres::Client;

use super::requests::{Action, Target};
use crate::config::Config;
use crate::source::dead_letters::{ParkedAggregate, Row};
use crate::source::state::{self, State};
use crate::source::{table, SourceError};

/// The leader's control connection's `application_name`: how a command knows a relay
/// leads.
pub const LEADER_APPLICATION_NAME: &str = "outbox-relay leader";

/// How often a command looks for its request's outcome.
const POLL: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Bad arguments: nothing was recorded (exit 2).
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// A command's connection, named in `pg_stat_activity` and in the audit trail unless
/// the connection already has an `application_name`.
async fn open(config: &Config, what: &str) -> Result<(Client, State), ControlError> {
    let sql = table::connect(&config.source).await?;
    sql.execute(
        "SELECT set_config('application_name', $1, false) \
         WHERE current_setting('application_name') IN ('', 'outbox-relay')",
        &[&format!("outbox-relay {what}")],
    )
    .await
    .map_err(SourceError::pg("naming the session"))?;
    let state = state::prepare(&sql, &config.source.state_schema, true).await?;
    Ok((sql, state))
}

/// `dead-letters list`.
pub async fn list(config: &Config, json: bool) -> Result<String, ControlError> {
    let (sql, state) = open(config, "dead-letters list").await?;
    let parked = state.parked_aggregates(&sql).await?;
    let loose = state.loose_dead_letters(&sql).await?;
    let paused = state.paused(&sql).await?;
    if json {
        let loose: Vec<serde_json::Value> = loose.iter().map(summary_json).collect();
        return Ok(serde_json::json!({
            "paused": paused.as_ref().map(|p| serde_json::json!({"since": p.since, "by": p.by})),
            "parked": parked,
            "dead_letters": loose,
        })
        .to_string());
    }
    let mut out = String::new();
    if let Some(p) = &paused {
        out.push_str(&format!(
            "publishing is PAUSED since {} by {}\n",
            p.since, p.by
        ));
    }
    out.push_str(&format!("parked aggregates: {}\n", parked.len()));
    for ParkedAggregate {
        aggregate_type,
        aggregate_id,
        events,
        head_id,
        first_error,
        age_seconds,
    } in &parked
    {
        out.push_str(&format!(
            "  {aggregate_type} {aggregate_id}: {events} event(s), head id {head_id}, parked {} ago: {}\n",
            age(*age_seconds),
            first_error.as_deref().unwrap_or("(head discarded; no error)")
        ));
    }
    out.push_str(&format!(
        "dead letters (not parking anything): {}\n",
        loose.len()
    ));
    for r in &loose {
        out.push_str(&format!(
            "  id {}: event {} of {} {} at {}, {} ago: {}\n",
            r.id,
            r.event.id.as_deref().unwrap_or("?"),
            r.event.aggregate_type.as_deref().unwrap_or("?"),
            r.event.aggregate_id.as_deref().unwrap_or("?"),
            r.event.position,
            age(r.age_seconds),
            r.error.as_deref().unwrap_or("")
        ));
    }
    Ok(out.trim_end().to_owned())
}

fn age(seconds: f64) -> String {
    humantime::format_duration(Duration::from_secs(seconds.max(0.0) as u64)).to_string()
}

fn summary_json(r: &Row) -> serde_json::Value {
    let e = &r.event;
    serde_json::json!({
        "id": r.id,
        "kept_at": r.kept_at,
        "age_seconds": r.age_seconds,
        "held": r.held,
        "error": r.error,
        "reason": r.reason,
        "redrives": r.redrives,
        "source_position": e.position.to_string(),
        "event_id": e.id.as_deref(),
        "aggregate_type": e.aggregate_type.as_deref(),
        "aggregate_id": e.aggregate_id.as_deref(),
        "event_type": e.event_type.as_deref(),
    })
}

/// `dead-letters show ID`: one kept event with its body.
pub async fn show(config: &Config, id: i64, json: bool) -> Result<String, ControlError> {
    let (sql, state) = open(config, "dead-letters show").await?;
    let Some(r) = state.dead_letter(&sql, id).await? else {
        return Err(ControlError::Refused(format!(
            "no dead letter with id {id} (outbox-relay dead-letters list shows them)"
        )));
    };
    let e = &r.event;
    let body = e.payload.as_deref().unwrap_or_default();
    let text = std::str::from_utf8(body).ok();
    let mut v = summary_json(&r);
    v["headers"] = e.headers.as_deref().into();
    v["topic"] = e.topic.as_deref().into();
    match text {
        Some(t) => v["payload"] = t.into(),
        None => v["payload_base64"] = BASE64_STANDARD.encode(body).into(),
    }
    if json {
        return Ok(v.to_string());
    }
    let mut out = String::new();
    for (k, value) in v.as_object().expect("an object") {
        let shown = match value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => "-".into(),
            other => other.to_string(),
        };
        out.push_str(&format!("{k}: {shown}\n"));
    }
    Ok(out.trim_end().to_owned())
}

/// What `redrive` and `discard` name.
pub struct Selection {
    pub aggregate: Option<String>,
    pub aggregate_type: Option<String>,
    pub id: Option<i64>,
    pub all: bool,
}

/// Checks what a redrive or discard names against what is kept, so a bad argument is
/// refused here rather than by the leader.
async fn target(sql: &Client, state: &State, s: &Selection) -> Result<Target, ControlError> {
    if let Some(id) = s.id {
        return match state.dead_letter(sql, id).await? {
            Some(_) => Ok(Target::Id(id)),
            None => Err(ControlError::Refused(format!(
                "no dead letter with id {id} (outbox-relay dead-letters list shows them)"
            ))),
        };
    }
    if s.all {
        return Ok(Target::All);
    }
    let Some(aggregate) = &s.aggregate else {
        return Err(ControlError::Refused(
            "name what to act on: --aggregate ID, --id N or --all".into(),
        ));
    };
    let parked: Vec<ParkedAggregate> = state
        .parked_aggregates(sql)
        .await?
        .into_iter()
        .filter(|p| {
            &p.aggregate_id == aggregate
                && s.aggregate_type
                    .as_ref()
                    .is_none_or(|t| t == &p.aggregate_type)
        })
        .collect();
    match parked.as_slice() {
        [p] => Ok(Target::Aggregate((
            p.aggregate_type.clone(),
            p.aggregate_id.clone(),
        ))),
        [] => Err(ControlError::Refused(format!(
            "aggregate {aggregate}{} is not parked (outbox-relay dead-letters list shows what is)",
            s.aggregate_type
                .as_ref()
                .map_or(String::new(), |t| format!(" of type {t}"))
        ))),
        several => Err(ControlError::Refused(format!(
            "aggregate id {aggregate} is parked under several types ({}): name one with \
             --aggregate-type",
            several
                .iter()
                .map(|p| p.aggregate_type.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// `dead-letters redrive` and `dead-letters discard`.
pub async fn act(
    config: &Config,
    action: Action,
    selection: &Selection,
    wait: Duration,
) -> Result<String, ControlError> {
    let (sql, state) = open(config, &format!("dead-letters {}", action.name())).await?;
    let target = target(&sql, &state, selection).await?;
    if action == Action::Redrive
        && (state.paused(&sql).await?.is_some() || pause_pending(&sql, &state).await?)
    {
        return Err(ControlError::Refused(
            "publishing is paused: a redrive would publish while paused. Run \
             `outbox-relay resume` first"
                .into(),
        ));
    }
    request(&sql, &state, action, &target, wait).await
}

async fn pause_pending(sql: &Client, state: &State) -> Result<bool, ControlError> {
    Ok(state
        .pending(sql)
        .await?
        .iter()
        .any(|r| r.action == Action::Pause))
}

/// `pause` and `resume`.
pub async fn pause(config: &Config, pause: bool, wait: Duration) -> Result<String, ControlError> {
    let action = if pause { Action::Pause } else { Action::Resume };
    let (sql, state) = open(config, action.name()).await?;
    let paused = state.paused(&sql).await?;
    match (&paused, pause) {
        (Some(p), true) => return Ok(format!("already paused (since {} by {})", p.since, p.by)),
        (None, false) if !pause_pending(&sql, &state).await? => {
            return Ok("not paused: nothing to resume".into())
        }
        _ => {}
    }
    request(&sql, &state, action, &Target::Nothing, wait).await
}

/// Records the request and waits up to `wait` for the leader's answer.
async fn request(
    sql: &Client,
    state: &State,
    action: Action,
    target: &Target,
    wait: Duration,
) -> Result<String, ControlError> {
    let id = state.request(sql, action, target).await?;
    let leaders: i64 = sql
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
               AND datname = current_database()",
            &[&LEADER_APPLICATION_NAME],
        )
        .await
        .map_err(SourceError::pg("looking for the leading relay"))?
        .get(0);
    if leaders == 0 {
        return Ok(format!(
            "request {id} ({}) recorded, but no relay leads this outbox now: it is carried out \
             when one does",
            action.name()
        ));
    }
    let deadline = Instant::now() + wait;
    loop {
        if let Some(outcome) = state.outcome(sql, id).await? {
            if let Some(refused) = outcome.text.strip_prefix("refused: ") {
                return Err(ControlError::Refused(format!("request {id}: {refused}")));
            }
            return Ok(format!(
                "request {id} ({}): {}",
                action.name(),
                outcome.text
            ));
        }
        if Instant::now() >= deadline {
            return Ok(format!(
                "request {id} ({}) recorded; the leader has not answered within {} (busy \
                 draining a batch?): `outbox-relay dead-letters list` shows its effect",
                action.name(),
                humantime::format_duration(wait)
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}
