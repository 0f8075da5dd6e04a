//! Real packet loss for tests: nftables rules on loopback addresses and ports a test owns.
//!
//! A user-space proxy cannot fake a partition (its own kernel acknowledges what the relay
//! sends and answers keepalives); a dropped packet can. A test connects the side it
//! means to cut through a second loopback address (`127.0.0.2`, which Linux routes to
//! `lo` with no setup, and on which the test's PostgreSQL also listens) and the rest
//! through `127.0.0.1`; [`Cut::link`] then drops every packet between `127.0.0.2` and
//! the server's port, in both directions, and nothing else.
//!
//! Each cut is a table of its own, `inet outbox_relay_t<pid>_<n>`, deleted when the
//! [`Cut`] is healed or dropped (a failing test too). A test process killed outright
//! skips that: [`sweep`] deletes the tables of processes that no longer exist, and the
//! test kit calls it before the first cut of a run.

use std::io;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

const PREFIX: &str = "outbox_relay_t";

static NEXT: AtomicU32 = AtomicU32::new(0);
static SWEPT: Once = Once::new();

/// A link cut by a table of drop rules; healed when dropped.
pub struct Cut {
    table: String,
}

fn nft(args: &[&str], script: Option<&str>) -> io::Result<String> {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot run nft ({e}): install nftables (scripts/install does) and run as root"
                ),
            )
        })?;
    if let Some(script) = script {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(script.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Cut {
    /// Drops every packet between `addr` and TCP port `port` on this machine, both ways.
    pub fn link(addr: Ipv4Addr, port: u16) -> io::Result<Cut> {
        Cut::install(&format!(
            "    ip daddr {addr} tcp dport {port} drop\n    ip saddr {addr} tcp sport {port} drop\n"
        ))
    }

    /// A table of its own with `rules` in an output chain.
    fn install(rules: &str) -> io::Result<Cut> {
        SWEPT.call_once(|| {
            let _ = sweep();
        });
        let table = format!(
            "{PREFIX}{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // Loopback traffic passes the output hook both ways: one chain covers it.
        let script = format!(
            "table inet {table} {{\n  chain output {{\n    type filter hook output priority 0; policy accept;\n{rules}  }}\n}}\n"
        );
        nft(&["-f", "-"], Some(&script))?;
        Ok(Cut { table })
    }

    /// Cuts a process off: drops every packet its user's sockets send (`uid` must be
    /// its own: see `KafkaOptions::own_users`) and every packet to its `ports`. On the
    /// shared loopback this is the only way to tell a node's outgoing connections from
    /// its peers'.
    pub fn process(uid: u32, ports: &[u16]) -> io::Result<Cut> {
        let ports = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        Cut::install(&format!(
            "    meta skuid {uid} drop\n    tcp dport {{ {ports} }} drop\n"
        ))
    }

    /// Lets packets through again.
    pub fn heal(self) {}
}

impl Drop for Cut {
    fn drop(&mut self) {
        if let Err(e) = nft(&["delete", "table", "inet", &self.table], None) {
            eprintln!("netfault: could not delete nft table {}: {e}", self.table);
        }
    }
}

/// Deletes the cut tables of test processes that no longer run.
pub fn sweep() -> io::Result<usize> {
    let listing = nft(&["list", "tables"], None)?;
    let mut swept = 0;
    for line in listing.lines() {
        let Some(name) = line.strip_prefix("table inet ") else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            nft(&["delete", "table", "inet", name.trim()], None)?;
            swept += 1;
        }
    }
    Ok(swept)
}
