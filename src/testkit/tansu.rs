//! A tansu broker process (Apache-licensed, Kafka protocol) with in-memory storage on a
//! free port. Dropping it kills the process.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;
use super::postgres::die_with_parent;

const START_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Tansu {
    port: u16,
    child: Child,
}

impl Tansu {
    pub fn start() -> std::io::Result<Tansu> {
        let bin = binary()?;
        // Retried on another port if the chosen one was taken before tansu bound it.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Tansu::start_on(&bin, free_port()?) {
                Ok(tansu) => return Ok(tansu),
                Err(e) if attempt < 3 => {
                    tracing::debug!(error = %e, "tansu did not start; retrying")
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn start_on(bin: &std::path::Path, port: u16) -> std::io::Result<Tansu> {
        let url = format!("tcp://127.0.0.1:{port}");
        let mut cmd = Command::new(bin);
        cmd.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", "memory://tansu/"])
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        die_with_parent(&mut cmd);
        // Dropping `tansu` on an error path kills the process.
        let mut tansu = Tansu {
            port,
            child: cmd.spawn()?,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = tansu.child.try_wait()? {
                return Err(std::io::Error::other(format!(
                    "tansu exited at start: {status}"
                )));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("tansu did not open its port in 15 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Someone else answering on the port does not count: ours must still be running.
        std::thread::sleep(Duration::from_millis(30));
        if let Some(status) = tansu.child.try_wait()? {
            return Err(std::io::Error::other(format!(
                "tansu exited at start: {status}"
            )));
        }
        Ok(tansu)
    }

    /// Kills the broker and starts a new one on the same port. With memory storage the
    /// new broker starts empty: topics must be created again.
    pub fn restart(&mut self) -> std::io::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match Tansu::start_on(&binary()?, self.port) {
                Ok(mut fresh) => {
                    std::mem::swap(&mut self.child, &mut fresh.child);
                    return Ok(()); // `fresh` now holds the dead child
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "tansu restart: retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Kills the broker (until [`Tansu::restart`]).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        // SIGTERM takes tansu 2–5 s; its memory storage is disposable anyway.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `$TANSU_BIN`, else `.tools/bin/tansu` in this checkout (scripts/install puts it
/// there), else `tansu` on the PATH.
pub fn binary() -> std::io::Result<PathBuf> {
    if let Ok(bin) = std::env::var("TANSU_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/tansu");
    if local.exists() {
        return Ok(local);
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("tansu"))
                .find(|p| p.exists())
        })
        .unwrap_or_default();
    on_path.ok_or_else(|| {
        std::io::Error::other("tansu broker not found: run scripts/install (or set TANSU_BIN)")
    })
}
