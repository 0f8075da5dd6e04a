//! Apicurio Registry (Apache-2.0), serving the Confluent Schema Registry API at
//! `/apis/ccompat/v7`, with in-memory storage on loopback free ports. Dropping it kills
//! the process.
//!
//! `scripts/install` fetches it and writes `.tools/apicurio/env`: the Java (21+ for
//! Apicurio 3.3.3, or 17 with the 3.0.9 fallback) and the jar to start.

use std::io::Read as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;
use super::postgres::die_with_parent;

/// Tests that need no registry of their own share this one (`scripts/test` starts it).
pub const SHARED_ENV: &str = "OUTBOX_RELAY_TEST_REGISTRY";

/// A JVM on two busy cores: ~3 s alone, much more beside a test run.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// The shared registry's URL, when the test run has one.
pub fn shared_url() -> Option<String> {
    std::env::var(SHARED_ENV).ok().filter(|s| !s.is_empty())
}

/// The run's shared registry, or a private one when there is none (a test run without
/// `scripts/test`); the private one lives as long as this value.
pub struct TestRegistry {
    pub url: String,
    _own: Option<Registry>,
}

/// [`TestRegistry`]: tests that register their own subjects (under their own prefix)
/// need no registry of their own. A test that stops the registry starts a private one
/// with [`Registry::start`] instead.
pub fn shared_or_start() -> std::io::Result<TestRegistry> {
    match shared_url() {
        Some(url) => Ok(TestRegistry { url, _own: None }),
        None => {
            let own = Registry::start()?;
            Ok(TestRegistry {
                url: own.url(),
                _own: Some(own),
            })
        }
    }
}

/// `PUT /config` (`subject` `None`) or `PUT /config/{subject}`: the compatibility level
/// (`BACKWARD`, `FULL_TRANSITIVE`, `NONE`, …) the registry enforces on new versions.
pub async fn set_compatibility(
    url: &str,
    subject: Option<&str>,
    level: &str,
) -> std::io::Result<()> {
    let (addr, base) = split_url(url)?;
    let path = match subject {
        Some(subject) => format!("{base}/config/{subject}"),
        None => format!("{base}/config"),
    };
    let body = format!(r#"{{"compatibility":"{level}"}}"#);
    let (status, answer) = super::http_request(addr, "PUT", &path, Some(&body)).await?;
    if status != 200 {
        return Err(std::io::Error::other(format!(
            "PUT {path} answered {status}: {answer}"
        )));
    }
    Ok(())
}

/// `http://HOST:PORT/PATH` into the socket address and the path, for the raw HTTP/1.0
/// helpers (the test kit has no HTTP client of its own).
fn split_url(url: &str) -> std::io::Result<(std::net::SocketAddr, String)> {
    use std::net::ToSocketAddrs as _;
    let bad = || std::io::Error::other(format!("not an http://host:port/path URL: {url}"));
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let addr = authority.to_socket_addrs()?.next().ok_or_else(bad)?;
    Ok((addr, format!("/{}", path.trim_end_matches('/'))))
}

/// The Confluent API's URL on a loopback port.
pub fn url_on(port: u16) -> String {
    format!("http://127.0.0.1:{port}/apis/ccompat/v7")
}

pub struct Registry {
    port: u16,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry on a free port.
    pub fn start() -> std::io::Result<Registry> {
        // A chosen port (HTTP or management) can be taken by someone else before the JVM
        // binds it: try again on fresh ones.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Registry::start_on(free_port()?) {
                Ok(registry) => return Ok(registry),
                Err(e) if attempt < 3 => {
                    tracing::warn!(error = %e, "the schema registry did not start; retrying")
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts a registry on `port` (a test that needs the URL before the registry).
    pub fn start_on(port: u16) -> std::io::Result<Registry> {
        let (java, jar) = installed()?;
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("registry.log");
        let management = free_port()?;
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new(&java);
        cmd.args(["-Xmx192m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"])
            .arg("-Dquarkus.http.host=127.0.0.1")
            .arg(format!("-Dquarkus.http.port={port}"))
            .arg("-Dquarkus.management.host=127.0.0.1")
            .arg(format!("-Dquarkus.management.port={management}"))
            .arg(format!("-Djava.io.tmpdir={}", dir.path().display()))
            .arg("-jar")
            .arg(&jar)
            .current_dir(jar.parent().unwrap_or(Path::new(".")))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            // The JVM's own refusals (a class file too new for this Java, a bad flag)
            // come on stderr: the start error quotes them from the log.
            .stderr(out);
        die_with_parent(&mut cmd);
        let mut registry = Registry {
            port,
            child: cmd.spawn()?,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if registry.answers() {
                return Ok(registry);
            }
            if let Some(status) = registry.child.try_wait()? {
                return Err(std::io::Error::other(format!(
                    "the schema registry exited at start ({status}): {}",
                    registry.log_tail()
                )));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "the schema registry did not answer within {START_TIMEOUT:?}: {}",
                    registry.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `http://127.0.0.1:PORT/apis/ccompat/v7`
    pub fn url(&self) -> String {
        url_on(self.port)
    }

    /// SIGKILL: the registry is gone at once, with everything registered (in-memory
    /// storage), and its port refuses connections.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its log (the JVM's stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether `GET /subjects` answers 200.
    fn answers(&self) -> bool {
        use std::io::Write as _;
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let request = "GET /apis/ccompat/v7/subjects HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
        if s.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200")
    }

    fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The Java and the jar `scripts/install` chose, from `.tools/apicurio/env`.
fn installed() -> std::io::Result<(PathBuf, PathBuf)> {
    let env = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/apicurio/env");
    let text = std::fs::read_to_string(&env).map_err(|e| {
        std::io::Error::other(format!(
            "the schema registry is not installed ({}: {e}): run scripts/install",
            env.display()
        ))
    })?;
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(PathBuf::from)
            .ok_or_else(|| std::io::Error::other(format!("{} has no {key}", env.display())))
    };
    Ok((get("APICURIO_JAVA")?, get("APICURIO_JAR")?))
}
