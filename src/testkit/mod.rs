//! Real infrastructure for tests, the demo and benchmarks: an ephemeral PostgreSQL
//! cluster and a tansu broker process, each on a free port, each stopped and deleted
//! when dropped (also when a test panics).

pub mod kafka;
pub mod postgres;
pub mod tansu;

use std::net::TcpListener;

/// A port nobody listens on right now (bind to port 0, read it, release it).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
