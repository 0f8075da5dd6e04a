//! Real infrastructure for tests, the demo and benchmarks: an ephemeral PostgreSQL
//! cluster, Apache Kafka (one node or a three-node cluster), a tansu broker process and a
//! Schema Registry (Apicurio), each on free ports, each stopped and deleted when dropped
//! (also when a test panics).

pub mod apache_kafka;
pub mod cpu;
pub mod kafka;
pub mod netfault;
pub mod postgres;
mod process;
pub mod proxy;
pub mod registry;
pub mod tansu;

pub use process::RelayProcess;

use std::net::TcpListener;

/// A port nobody listens on right now (bind to port 0, read it, release it).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `GET path` on `addr` over HTTP/1.0; returns the status code and body. Enough for
/// probing the relay's own endpoints in tests.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, None).await
}

/// `method path` on `addr` over HTTP/1.0, with a JSON `body` if given; returns the status
/// code and body. HTTP/1.0 so the answer ends where the connection does: no chunked
/// decoding needed.
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or_default());
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Sums the samples of `name` (all label sets) in a Prometheus text exposition.
pub fn metric_value(exposition: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ')?;
        let metric = series.split('{').next().unwrap_or(series);
        if metric == name {
            *found.get_or_insert(0.0) += value.parse::<f64>().ok()?;
        }
    }
    found
}

/// Peak resident memory (VmHWM) of a running process, in bytes.
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}
