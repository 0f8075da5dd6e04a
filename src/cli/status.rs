//! `status`: what an operator (or an exec probe) wants at a glance, read from PostgreSQL
//! itself: who leads, how much is waiting, how old the oldest waiting event is; and, from
//! the relay beside it (`/readyz` at `http.listen`), which of its links is down.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Config;
use crate::source::polling::LOCK_CLASS;
use crate::source::table;
use crate::source::{quote_ident, Mode};

/// Prints the status and returns whether the relay is healthy.
pub async fn run(config: &Config, max_lag: Duration) -> anyhow::Result<bool> {
    let src = &config.source;
    let relay = ask_relay(config.http.listen).await;
    // A probe must answer even when the server does not (a hung pooler accepts and
    // says nothing): the same deadline the relay gives its round trips.
    let connected = tokio::time::timeout(src.query_timeout, table::connect(src))
        .await
        .unwrap_or_else(|_| {
            Err(crate::source::SourceError::Unanswered {
                what: "connecting",
                after: src.query_timeout,
            })
        });
    let client = match connected {
        Ok(client) => client,
        Err(e) => {
            // The database is what status reads; without it, the relay's own view is all
            // there is to say.
            // On stderr too, as an ERROR line: with `--log-format json` that is where a
            // probe's reader looks for the reason.
            tracing::error!(error = %e, "status: PostgreSQL unreachable");
            println!("postgres: unreachable from here: {e}");
            print_relay(&relay, &mut Vec::new());
            println!("status:   UNHEALTHY: PostgreSQL unreachable");
            return Ok(false);
        }
    };
    println!(
        "mode:     {}",
        match src.mode {
            Mode::Polling => "polling",
            Mode::Logical => "logical",
        }
    );
    println!("table:    {}", src.table_label());
    let mut problems = Vec::new();

    match src.mode {
        Mode::Polling => {
            let leader = client
                .query_opt(
                    "SELECT l.pid, coalesce(a.application_name, ''), coalesce(a.client_addr::text, 'local'), \
                       extract(epoch FROM now() - a.state_change)::float8 \
                     FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
                     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
                       AND l.classid = $1::int4::oid AND l.objid = to_regclass($2)::oid",
                    &[&LOCK_CLASS, &src.outbox_table()?.quoted()],
                )
                .await?;
            match leader {
                Some(row) => {
                    let (pid, app, addr): (i32, String, String) =
                        (row.get(0), row.get(1), row.get(2));
                    let idle: Option<f64> = row.get(3);
                    let activity = idle.map_or("unknown".to_owned(), |s| format!("{s:.1} s ago"));
                    println!("leader:   pid {pid} ({app} from {addr}), last activity {activity}");
                }
                None => {
                    println!("leader:   none");
                    problems.push("no relay holds the leader lock".to_owned());
                }
            }
            let age = match &src.columns.created_at {
                Some(col) => format!(
                    "extract(epoch FROM now() - min({}))::float8",
                    quote_ident(col)
                ),
                None => "NULL::float8".to_owned(),
            };
            let row = client
                .query_one(
                    &format!(
                        "SELECT count(*), {age} FROM (SELECT * FROM {} ORDER BY {} LIMIT 1000000) backlog",
                        src.outbox_table()?.quoted(),
                        quote_ident(&src.columns.seq)
                    ),
                    &[],
                )
                .await?;
            let (rows, oldest): (i64, Option<f64>) = (row.get(0), row.get(1));
            match oldest {
                Some(age) => println!("backlog:  {rows} rows, oldest {age:.1} s old"),
                None => println!("backlog:  {rows} rows"),
            }
            if let Some(age) = oldest.filter(|a| *a > max_lag.as_secs_f64()) {
                problems.push(format!("oldest event waits {age:.0} s (limit {max_lag:?})"));
            }
        }
        Mode::Logical => {
            let sharded = src.logical.shards > 1;
            for shard in src.logical.shards() {
                let name = &shard.slot;
                // Unsharded, the lines stay as scripts know them.
                let of = if sharded {
                    format!(" (slot {name})")
                } else {
                    String::new()
                };
                let slot = client
                    .query_opt(
                        "SELECT active, active_pid, \
                           pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 \
                         FROM pg_replication_slots WHERE slot_name = $1",
                        &[name],
                    )
                    .await?;
                match slot {
                    Some(row) => {
                        let (active, pid, lag): (bool, Option<i32>, Option<i64>) =
                            (row.get(0), row.get(1), row.get(2));
                        let holder = pid.map_or("none".to_owned(), |p| format!("pid {p}"));
                        println!("leader:   {holder}{of}");
                        println!("slot lag: {} bytes{of}", lag.unwrap_or(0));
                        if !active {
                            problems.push(format!("slot {name} is not in use by any relay"));
                        }
                    }
                    None => {
                        println!("leader:   none{of}");
                        problems.push(format!("slot {name} does not exist"));
                    }
                }
            }
        }
    }
    // The relay's own tables, when they exist: the pause and what is parked.
    if let Some((state, version)) = crate::source::state::peek(&client, &src.state_schema).await? {
        if version >= 2 {
            match state.paused(&client).await? {
                Some(p) => {
                    println!(
                        "paused:   yes, since {} by {} (outbox-relay resume)",
                        p.since, p.by
                    );
                    problems.push("publishing is paused".to_owned());
                }
                None => println!("paused:   no"),
            }
            let parked = state.parked_aggregates(&client).await?;
            let events: i64 = parked.iter().map(|p| p.events).sum();
            println!(
                "parked:   {} aggregate(s), {events} event(s) (outbox-relay dead-letters list)",
                parked.len()
            );
        }
    }
    print_relay(&relay, &mut problems);
    if problems.is_empty() {
        println!("status:   healthy");
    } else {
        println!("status:   UNHEALTHY: {}", problems.join("; "));
    }
    Ok(problems.is_empty())
}

/// What the relay beside this command says on `/readyz`.
enum RelayView {
    Ready,
    NotReady(String),
    /// Nothing answered at the address (no relay there, or another host's).
    Unreachable(SocketAddr, String),
    /// `http.listen` names port 0: the relay's port is chosen when it starts.
    Unknown,
}

/// Asks `/readyz` on the relay's monitoring address (loopback for a wildcard address),
/// within two seconds.
async fn ask_relay(listen: SocketAddr) -> RelayView {
    if listen.port() == 0 {
        return RelayView::Unknown;
    }
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let asked = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET /readyz HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(Duration::from_secs(2), asked).await {
        Ok(Ok(answer)) => {
            let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").trim();
            if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
                RelayView::Ready
            } else {
                let why = body.strip_prefix("not ready: ").unwrap_or(body);
                RelayView::NotReady(why.to_owned())
            }
        }
        Ok(Err(e)) => RelayView::Unreachable(addr, e.to_string()),
        Err(_) => RelayView::Unreachable(addr, "no answer within 2 s".into()),
    }
}

/// Prints the relay's view, naming the link that is down, and adds it to `problems`.
fn print_relay(view: &RelayView, problems: &mut Vec<String>) {
    match view {
        RelayView::Ready => println!("relay:    ready (postgres and kafka reachable)"),
        RelayView::NotReady(why) => {
            println!("relay:    not ready: {why}");
            let link = ["postgres", "kafka", "schema registry"]
                .into_iter()
                .find(|link| why.starts_with(&format!("{link}:")));
            if let Some(link) = link {
                println!("down:     the relay's link to {link}");
                problems.push(format!("the relay's link to {link} is down"));
            }
        }
        RelayView::Unreachable(addr, e) => {
            println!("relay:    no answer on {addr} ({e}): not on this host, or not running")
        }
        RelayView::Unknown => {
            println!("relay:    not asked (http.listen port 0: chosen when the relay starts)")
        }
    }
}
