//! Apache Kafka in KRaft mode: one combined controller + broker, or a cluster of three
//! such nodes (replication factor 3, `min.insync.replicas=2`), on free ports, with its log
//! dirs in a temp dir. Each node can be killed, paused (SIGSTOP) and restarted with its
//! data. Dropping the value kills every node and deletes the directory, also when a test
//! panics.
//!
//! The broker is the jars `scripts/install` copies from Maven Central into
//! `.tools/kafka-<version>/libs` (see `scripts/kafka/pom.xml`), run by the machine's Java.
//! A JVM takes seconds to start, so the test suite shares one broker across tests where
//! it can (see [`shared_bootstrap`]); tests that kill or reconfigure a broker start their
//! own.

use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::free_port;
use super::postgres::die_with_parent;

/// The Apache Kafka version the tests, the benchmark and docker-compose.yml use. Kept in
/// step with `scripts/kafka/pom.xml`.
pub const VERSION: &str = "4.4.0";

/// JVM start, storage format and the first metadata answer, on a loaded 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// The environment variable through which `scripts/test` hands every test one running
/// broker (`host:port`). Unset, each test that asks for a shared broker starts its own.
pub const SHARED_ENV: &str = "OUTBOX_RELAY_TEST_KAFKA";

/// The shared broker's bootstrap address, when the test run has one.
pub fn shared_bootstrap() -> Option<String> {
    std::env::var(SHARED_ENV).ok().filter(|s| !s.is_empty())
}

/// What to start.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// 1 or 3 combined controller + broker nodes.
    pub nodes: usize,
    /// Extra `server.properties` lines, `key=value`, for every node.
    pub properties: Vec<String>,
    /// Maximum JVM heap per node, in MiB.
    pub heap_mib: u32,
    /// Quick start (C1 compiler only) over peak throughput: right for tests, wrong for
    /// the benchmark.
    pub quick_jit: bool,
    /// Proxy ports, one per node: each node gets a second listener, `PROXIED` (its port
    /// is [`Kafka::proxied_port`]), that advertises the given port instead of its own, so
    /// a client bootstrapping there (the relay) goes through a [`super::proxy::Proxy`]
    /// for every request. [`Kafka::brokers`] and the brokers' own traffic stay direct: a
    /// test's consumer sees what was published while the proxy black-holes the relay.
    pub advertised_ports: Vec<u16>,
    /// Each node runs as a user of its own ([`Kafka::node_uid`]), so that nftables can
    /// tell its packets from its peers' on the shared loopback
    /// ([`super::netfault::Cut::process`]): a partition of one node. Needs root.
    pub own_users: bool,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        KafkaOptions {
            nodes: 1,
            properties: Vec::new(),
            heap_mib: 512,
            quick_jit: true,
            advertised_ports: Vec::new(),
            own_users: false,
        }
    }
}

struct Node {
    id: u32,
    port: u16,
    controller: u16,
    /// The user the node runs as, when not this process's.
    uid: Option<u32>,
    proxied_port: Option<u16>,
    dir: PathBuf,
    child: Option<Child>,
}

pub struct Kafka {
    nodes: Vec<Node>,
    heap_mib: u32,
    quick_jit: bool,
    // Declared last: removed after the nodes are gone.
    _dir: tempfile::TempDir,
}

impl Kafka {
    /// One combined node with the defaults.
    pub fn start() -> std::io::Result<Kafka> {
        Kafka::start_with(KafkaOptions::default())
    }

    /// Three combined nodes, replication factor 3, `min.insync.replicas=2`.
    pub fn cluster() -> std::io::Result<Kafka> {
        Kafka::start_with(KafkaOptions {
            nodes: 3,
            ..KafkaOptions::default()
        })
    }

    pub fn start_with(options: KafkaOptions) -> std::io::Result<Kafka> {
        // A chosen port can be taken by someone else before the JVM binds it: try again on
        // fresh ports.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Kafka::try_start(&options) {
                Ok(kafka) => return Ok(kafka),
                Err(e) if attempt < 3 => {
                    tracing::warn!(error = %e, "Apache Kafka did not start; retrying")
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_start(options: &KafkaOptions) -> std::io::Result<Kafka> {
        let libs = libs_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-kafka-")
            .tempdir()?;
        let n = options.nodes;
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<std::io::Result<_>>()?;
        let proxied: Vec<(u16, u16)> = options
            .advertised_ports
            .iter()
            .map(|&advertised| Ok((free_port()?, advertised)))
            .collect::<std::io::Result<_>>()?;
        let voters = ports
            .iter()
            .enumerate()
            .map(|(i, (_, controller))| format!("{}@127.0.0.1:{controller}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let replicas = if n >= 3 { 3 } else { 1 };
        let min_isr = if n >= 3 { 2 } else { 1 };
        let cluster_id = cluster_id();
        let mut nodes = Vec::with_capacity(n);
        for (i, (port, controller)) in ports.iter().enumerate() {
            let id = i as u32 + 1;
            let node_dir = dir.path().join(format!("node-{id}"));
            fs::create_dir_all(node_dir.join("data"))?;
            let mut props = fs::File::create(node_dir.join("server.properties"))?;
            let (listeners, advertised, protocols) = match proxied.get(i) {
                Some((own, advertised)) => (
                    format!(",PROXIED://127.0.0.1:{own}"),
                    format!(",PROXIED://127.0.0.1:{advertised}"),
                    ",PROXIED:PLAINTEXT",
                ),
                None => Default::default(),
            };
            writeln!(
                props,
                "process.roles=broker,controller\n\
                 node.id={id}\n\
                 controller.quorum.voters={voters}\n\
                 listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}{listeners}\n\
                 advertised.listeners=PLAINTEXT://127.0.0.1:{port}{advertised}\n\
                 controller.listener.names=CONTROLLER\n\
                 listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT{protocols}\n\
                 inter.broker.listener.name=PLAINTEXT\n\
                 log.dirs={data}\n\
                 num.partitions=1\n\
                 default.replication.factor={replicas}\n\
                 min.insync.replicas={min_isr}\n\
                 offsets.topic.replication.factor={replicas}\n\
                 offsets.topic.num.partitions=4\n\
                 transaction.state.log.replication.factor={replicas}\n\
                 transaction.state.log.min.isr={min_isr}\n\
                 transaction.state.log.num.partitions=4\n\
                 group.initial.rebalance.delay.ms=0\n\
                 num.network.threads=2\n\
                 num.io.threads=2\n\
                 background.threads=2\n\
                 num.recovery.threads.per.data.dir=1\n\
                 log.cleaner.threads=1",
                data = node_dir.join("data").display(),
            )?;
            for line in &options.properties {
                writeln!(props, "{line}")?;
            }
            drop(props);
            format_storage(&libs, &node_dir, &cluster_id)?;
            // A user per node, unique while its port is taken (so tests running at once
            // never share one).
            let uid = options.own_users.then(|| 100_000 + u32::from(*port));
            if let Some(uid) = uid {
                chown_tree(&node_dir, uid)?;
            }
            nodes.push(Node {
                id,
                port: *port,
                controller: *controller,
                uid,
                proxied_port: proxied.get(i).map(|(own, _)| *own),
                dir: node_dir,
                child: None,
            });
        }
        if options.own_users {
            // tempfile makes the directory private to this process's user.
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        }
        let mut kafka = Kafka {
            nodes,
            heap_mib: options.heap_mib,
            quick_jit: options.quick_jit,
            _dir: dir,
        };
        for i in 0..n {
            kafka.spawn(i)?;
        }
        kafka.wait_ready(START_TIMEOUT)?;
        Ok(kafka)
    }

    fn spawn(&mut self, node: usize) -> std::io::Result<()> {
        let libs = libs_dir()?;
        let (heap, quick_jit) = (self.heap_mib, self.quick_jit);
        let n = &mut self.nodes[node];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.dir.join("broker.log"))?;
        let mut cmd = Command::new(java());
        cmd.args(jvm_args(heap, quick_jit))
            .arg("-cp")
            .arg(libs.join("*"))
            .arg("kafka.Kafka")
            .arg(n.dir.join("server.properties"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(uid) = n.uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid);
        }
        die_with_parent(&mut cmd);
        n.child = Some(cmd.spawn()?);
        Ok(())
    }

    /// Waits until every running node has its port open and the cluster's metadata lists
    /// all of them.
    fn wait_ready(&mut self, timeout: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + timeout;
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_none() {
                continue;
            }
            while TcpStream::connect(("127.0.0.1", self.nodes[i].port)).is_err() {
                self.check_alive(i)?;
                if Instant::now() > deadline {
                    return Err(self.start_error(i, "did not open its port"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let want = self.nodes.iter().filter(|n| n.child.is_some()).count();
        loop {
            let seen =
                super::kafka::broker_count(&self.brokers(), Duration::from_secs(2)).unwrap_or(0);
            if seen >= want {
                return Ok(());
            }
            for i in 0..self.nodes.len() {
                self.check_alive(i)?;
            }
            if Instant::now() > deadline {
                return Err(self.start_error(0, "did not register all brokers"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn check_alive(&mut self, i: usize) -> std::io::Result<()> {
        if let Some(child) = self.nodes[i].child.as_mut() {
            if let Some(status) = child.try_wait()? {
                self.nodes[i].child = None;
                return Err(self.start_error(i, &format!("exited at start ({status})")));
            }
        }
        Ok(())
    }

    fn start_error(&self, i: usize, what: &str) -> std::io::Error {
        let log = self.log(i);
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        std::io::Error::other(format!(
            "Apache Kafka node {} {what} within {START_TIMEOUT:?}; its log ends:\n{}",
            self.nodes[i].id,
            tail.join("\n")
        ))
    }

    /// The bootstrap list, `127.0.0.1:P1,127.0.0.1:P2,…`, for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The port of node `node`'s `PROXIED` listener (see
    /// [`KafkaOptions::advertised_ports`]): where its proxy forwards to.
    pub fn proxied_port(&self, node: usize) -> Option<u16> {
        self.nodes[node].proxied_port
    }

    /// The user node `node` runs as ([`KafkaOptions::own_users`]).
    pub fn node_uid(&self, node: usize) -> Option<u32> {
        self.nodes[node].uid
    }

    /// Every port node `node` listens on: clients', the controller's, the proxied one.
    pub fn node_ports(&self, node: usize) -> Vec<u16> {
        let n = &self.nodes[node];
        [Some(n.port), Some(n.controller), n.proxied_port]
            .into_iter()
            .flatten()
            .collect()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The index (0-based) of the node whose `node.id` is `id`.
    pub fn index_of(&self, id: i32) -> Option<usize> {
        self.nodes.iter().position(|n| n.id as i32 == id)
    }

    /// The node's broker log (JVM stdout and stderr).
    pub fn log(&self, node: usize) -> String {
        fs::read_to_string(self.nodes[node].dir.join("broker.log")).unwrap_or_default()
    }

    /// SIGKILL: the node is gone at once, its data stays for [`Kafka::restart`].
    pub fn kill(&mut self, node: usize) {
        if let Some(mut child) = self.nodes[node].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the node keeps its sockets but answers nothing, like a paused VM.
    pub fn pause(&self, node: usize) {
        self.signal(node, Signal::SIGSTOP);
    }

    /// SIGCONT after [`Kafka::pause`].
    pub fn resume(&self, node: usize) {
        self.signal(node, Signal::SIGCONT);
    }

    fn signal(&self, node: usize, signal: Signal) {
        if let Some(child) = &self.nodes[node].child {
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
        }
    }

    /// Starts a killed node again on its ports and data, without waiting for it.
    /// Call from a thread that outlives the broker: the node dies with the thread that
    /// started it.
    pub fn restart(&mut self, node: usize) -> std::io::Result<()> {
        self.kill(node);
        self.spawn(node)
    }

    /// Waits until every node that runs is back in the cluster's metadata.
    pub fn wait_all_ready(&mut self) -> std::io::Result<()> {
        self.wait_ready(START_TIMEOUT)
    }

    /// Runs one of Kafka's command-line tools (a main class on the broker's classpath,
    /// e.g. `org.apache.kafka.tools.AclCommand`) against this cluster's first node, with
    /// `--bootstrap-server` added. Returns its output; a failure is an error.
    pub fn run_tool(&self, class: &str, args: &[&str]) -> std::io::Result<String> {
        let out = Command::new(java())
            .args(["-Xmx256m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"])
            .arg("-cp")
            .arg(libs_dir()?.join("*"))
            .arg(class)
            .args([
                "--bootstrap-server",
                &format!("127.0.0.1:{}", self.nodes[0].port),
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "{class} failed ({}): {text}",
                out.status
            )));
        }
        Ok(text)
    }

    pub fn is_running(&self, node: usize) -> bool {
        self.nodes[node].child.is_some()
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        // SIGKILL also ends a paused node; the data is thrown away anyway.
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// The JVM for a test broker: bounded heap, a small collector and, with `quick_jit`, C1
/// only — a test broker moves little data, and C2's compile threads would compete for
/// the two cores.
fn jvm_args(heap_mib: u32, quick_jit: bool) -> Vec<String> {
    let mut args = vec![
        format!("-Xmx{heap_mib}m"),
        "-Xms128m".into(),
        "-XX:+UseSerialGC".into(),
        "-XX:-UsePerfData".into(),
        "-Djava.awt.headless=true".into(),
        "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn".into(),
    ];
    if quick_jit {
        args.push("-XX:TieredStopAtLevel=1".into());
    }
    args
}

fn format_storage(libs: &Path, node_dir: &Path, cluster_id: &str) -> std::io::Result<()> {
    let out = Command::new(java())
        .args([
            "-Xmx256m",
            "-XX:TieredStopAtLevel=1",
            "-XX:+UseSerialGC",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
        ])
        .arg("-cp")
        .arg(libs.join("*"))
        .args([
            "kafka.tools.StorageTool",
            "format",
            "--ignore-formatted",
            "-t",
        ])
        .arg(cluster_id)
        .arg("-c")
        .arg(node_dir.join("server.properties"))
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "kafka-storage format failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// A fresh cluster id: 16 random bytes, URL-safe base64 without padding (Kafka's `Uuid`).
fn cluster_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut bytes);
    }
    let mut bits: u32 = 0;
    let mut n = 0;
    let mut out = String::new();
    for b in bytes {
        bits = (bits << 8) | u32::from(b);
        n += 8;
        while n >= 6 {
            n -= 6;
            out.push(ALPHABET[((bits >> n) & 63) as usize] as char);
        }
    }
    if n > 0 {
        out.push(ALPHABET[((bits << (6 - n)) & 63) as usize] as char);
    }
    out
}

/// `$JAVA_HOME/bin/java`, else `java` on the PATH.
fn java() -> PathBuf {
    std::env::var_os("JAVA_HOME")
        .map(|home| PathBuf::from(home).join("bin/java"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("java"))
}

/// `$KAFKA_LIBS`, else `.tools/kafka-<VERSION>/libs` in this checkout.
pub fn libs_dir() -> std::io::Result<PathBuf> {
    if let Ok(dir) = std::env::var("KAFKA_LIBS") {
        return Ok(PathBuf::from(dir));
    }
    let local =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!(".tools/kafka-{VERSION}/libs"));
    if local.join(format!("kafka_2.13-{VERSION}.jar")).exists() {
        return Ok(local);
    }
    Err(std::io::Error::other(format!(
        "Apache Kafka {VERSION} not found in {}: run scripts/install (or set KAFKA_LIBS)",
        local.display()
    )))
}

/// Gives `path` and everything under it to user and group `uid`.
fn chown_tree(path: &Path, uid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))?;
    if path.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid)?;
        }
    }
    Ok(())
}
