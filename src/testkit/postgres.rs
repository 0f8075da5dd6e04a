//! An ephemeral PostgreSQL cluster: `initdb` in a temp dir, a free port,
//! `wal_level=logical`, durability off (it is thrown away). Dropping it stops the server
//! and deletes the directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{Pid, User};

use super::free_port;

const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Postgres {
    port: u16,
    // Behind a lock so a test can restart the server through a shared reference.
    child: std::sync::Mutex<Child>,
    data: PathBuf,
    settings: Vec<String>,
    // Declared last: removed after the server is gone.
    _dir: tempfile::TempDir,
}

impl Postgres {
    /// Starts a fresh cluster. Runs the server as the `postgres` system user when this
    /// process is root (PostgreSQL refuses to run as root).
    pub fn start() -> std::io::Result<Postgres> {
        Postgres::start_with(&[])
    }

    /// Starts a cluster with extra `name=value` server settings (later ones win over
    /// the defaults, e.g. `wal_level=replica`).
    pub fn start_with(settings: &[&str]) -> std::io::Result<Postgres> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-pg-")
            .tempdir()?;
        let data = dir.path().join("data");
        let as_user = server_user()?;
        if let Some(user) = &as_user {
            nix::unistd::chown(dir.path(), Some(user.uid), Some(user.gid))?;
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_server_user(&mut initdb, &as_user);
        let out = initdb.output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        // A free port can be taken by another test between our check and the server's
        // bind: the server then exits at once, and we try another port.
        let mut attempt = 0;
        let (child, port) = loop {
            attempt += 1;
            let port = free_port()?;
            let mut child = spawn_server(&bin, &data, port, &as_user, settings)?;
            match wait_ready(&mut child, port) {
                Ok(()) => break (child, port),
                Err(e) if attempt < 3 => {
                    tracing::debug!(error = %e, port, "postgres did not start; trying another port");
                    let _ = child.kill();
                    let _ = child.wait();
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e);
                }
            }
        };
        Ok(Postgres {
            port,
            child: std::sync::Mutex::new(child),
            data,
            settings: settings.iter().map(|s| s.to_string()).collect(),
            _dir: dir,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// What the server logged so far (see `PG_LOG_LEVEL`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.with_file_name("server.log")).unwrap_or_default()
    }

    /// A connection URL for `dbname` as the superuser `postgres`.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// Creates a database and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String, tokio_postgres::Error> {
        let admin = self.connect("postgres").await?;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await?;
        Ok(self.url(name))
    }

    /// A client on `dbname`, its connection driven by a background task.
    pub async fn connect(
        &self,
        dbname: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) =
            tokio_postgres::connect(&self.url(dbname), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Restarts the server on the same port and data, like `pg_ctl restart -m fast`
    /// (`immediate = false`: clean shutdown) or `-m immediate` (crash, then recovery).
    pub fn restart(&self, immediate: bool) -> std::io::Result<()> {
        let signal = if immediate {
            Signal::SIGQUIT
        } else {
            Signal::SIGINT
        };
        let mut child = self.child.lock().unwrap();
        stop_child(&mut child, signal);
        let bin = bin_dir()?;
        let as_user = server_user()?;
        let settings: Vec<&str> = self.settings.iter().map(String::as_str).collect();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // The old postmaster's port can take a moment to be free again.
            let mut next = spawn_server(&bin, &self.data, self.port, &as_user, &settings)?;
            match wait_ready(&mut next, self.port) {
                Ok(()) => {
                    *child = next;
                    return Ok(());
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "postgres restart: retrying");
                    let _ = next.kill();
                    let _ = next.wait();
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(std::io::Error::other(format!(
                        "{e}; server log:\n{}",
                        self.log()
                    )))
                }
            }
        }
    }
}

impl Postgres {
    /// Starts a hot standby of this server, made without `pg_basebackup` (the npm builds
    /// have none): a physical slot `slot` reserving WAL, a non-exclusive base backup
    /// (`pg_backup_start`, a copy of the data directory, `pg_backup_stop` for its
    /// `backup_label`), `standby.signal` and `primary_conninfo` (with `dbname`, which slot
    /// synchronisation needs), streaming through the slot with `hot_standby_feedback`.
    /// `settings` come on top (e.g. `sync_replication_slots=on`).
    pub async fn start_standby(&self, slot: &str, settings: &[&str]) -> std::io::Result<Postgres> {
        let pg = |e: tokio_postgres::Error| std::io::Error::other(format!("standby: {e}"));
        let admin = self.connect("postgres").await.map_err(pg)?;
        let version: i32 = admin
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(pg)?
            .get(0);
        admin
            .execute(
                "SELECT pg_create_physical_replication_slot($1, true)",
                &[&slot],
            )
            .await
            .map_err(pg)?;
        // The session that starts a non-exclusive backup must be the one that stops it.
        let (start, stop) = if version >= 150000 {
            (
                "SELECT pg_backup_start('outbox-relay-standby', true)",
                "SELECT labelfile, spcmapfile FROM pg_backup_stop(true)",
            )
        } else {
            (
                "SELECT pg_start_backup('outbox-relay-standby', true, false)",
                "SELECT labelfile, spcmapfile FROM pg_stop_backup(false, true)",
            )
        };
        admin.execute(start, &[]).await.map_err(pg)?;
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-pg-standby-")
            .tempdir()?;
        let data = dir.path().join("data");
        let as_user = server_user()?;
        if let Some(user) = &as_user {
            nix::unistd::chown(dir.path(), Some(user.uid), Some(user.gid))?;
        }
        // cp -a keeps the owner and the 0700 mode the server insists on.
        let copied = Command::new("cp")
            .arg("-a")
            .arg(&self.data)
            .arg(&data)
            .status()?;
        let row = admin.query_one(stop, &[]).await.map_err(pg)?;
        if !copied.success() {
            return Err(std::io::Error::other(
                "standby: copying the data directory failed",
            ));
        }
        // Not the primary's: its pid file, its slots, its WAL (the standby streams that
        // from the backup's start, which the slot kept).
        for file in ["postmaster.pid", "postmaster.opts"] {
            let _ = std::fs::remove_file(data.join(file));
        }
        for sub in ["pg_replslot", "pg_wal", "pg_wal/archive_status"] {
            for entry in std::fs::read_dir(data.join(sub))?.flatten() {
                if entry.file_type()?.is_dir() && sub == "pg_wal" {
                    continue;
                }
                let path = entry.path();
                if entry.file_type()?.is_dir() {
                    std::fs::remove_dir_all(path)?;
                } else {
                    std::fs::remove_file(path)?;
                }
            }
        }
        let label: String = row.get(0);
        let spcmap: Option<String> = row.get(1);
        let mut files = vec![("backup_label", label), ("standby.signal", String::new())];
        if let Some(map) = spcmap.filter(|m| !m.is_empty()) {
            files.push(("tablespace_map", map));
        }
        for (name, text) in files {
            let path = data.join(name);
            std::fs::write(&path, text)?;
            if let Some(user) = &as_user {
                nix::unistd::chown(&path, Some(user.uid), Some(user.gid))?;
            }
        }
        let mut all = vec![
            format!(
                "primary_conninfo=host=127.0.0.1 port={} user=postgres dbname=postgres",
                self.port
            ),
            format!("primary_slot_name={slot}"),
            "hot_standby_feedback=on".to_owned(),
        ];
        all.extend(settings.iter().map(|s| s.to_string()));
        let all_ref: Vec<&str> = all.iter().map(String::as_str).collect();
        let bin = bin_dir()?;
        let port = free_port()?;
        let mut child = spawn_server(&bin, &data, port, &as_user, &all_ref)?;
        if let Err(e) = wait_ready(&mut child, port) {
            let _ = child.kill();
            let _ = child.wait();
            let log =
                std::fs::read_to_string(data.with_file_name("server.log")).unwrap_or_default();
            return Err(std::io::Error::other(format!(
                "standby: {e}; its log:\n{log}"
            )));
        }
        Ok(Postgres {
            port,
            child: std::sync::Mutex::new(child),
            data,
            settings: all,
            _dir: dir,
        })
    }

    /// Stops the server at once (an immediate shutdown: every backend goes, no
    /// checkpoint), as a failing machine would; the data stays until drop.
    pub fn kill(&self) {
        stop_child(&mut self.child.lock().unwrap(), Signal::SIGQUIT);
    }
}

/// Signals the postmaster and waits for it. A fast shutdown can wait forever for a
/// walsender whose client stopped reading, so after 5 s it becomes an immediate one
/// (which also stops the backends); SIGKILL only as the last resort, since it would
/// leave backends holding the shared memory a restart needs.
fn stop_child(child: &mut Child, signal: Signal) {
    let exited = |child: &mut Child, within: Duration| {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    };
    if let Ok(None) = child.try_wait() {
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, signal);
        if exited(child, Duration::from_secs(5)) {
            return;
        }
        let _ = kill(pid, Signal::SIGQUIT);
        if exited(child, Duration::from_secs(10)) {
            return;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn spawn_server(
    bin: &Path,
    data: &Path,
    port: u16,
    as_user: &Option<User>,
    extra: &[&str],
) -> std::io::Result<Child> {
    let mut cmd = Command::new(bin.join("postgres"));
    cmd.arg("-D").arg(data).args(["-p", &port.to_string()]);
    for setting in [
        "listen_addresses=127.0.0.1",
        "unix_socket_directories=",
        "wal_level=logical",
        "max_wal_senders=20",
        "max_replication_slots=20",
        "max_connections=200",
        "fsync=off",
        "synchronous_commit=off",
        "full_page_writes=off",
        "log_min_messages=fatal",
    ]
    .iter()
    .chain(extra)
    {
        cmd.args(["-c", setting]);
    }
    // The server log goes next to the data directory; PG_LOG_LEVEL (e.g. `warning`) makes
    // it talkative when a test needs explaining.
    if let Ok(level) = std::env::var("PG_LOG_LEVEL") {
        cmd.args(["-c", &format!("log_min_messages={level}")]);
    }
    let log = std::fs::File::create(data.with_file_name("server.log"))?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    as_server_user(&mut cmd, as_user);
    die_with_parent(&mut cmd);
    cmd.spawn()
}

/// Waits until the server accepts connections. The child must still be running then, so
/// a ready answer from some other server on the port does not count.
/// What `pg_isready` answers, without it (the npm server builds have no client tools):
/// a startup message as `postgres`, ready when the server asks for authentication or
/// accepts (`R`) rather than refusing while it starts up (`E`).
fn accepts_connections(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let params = b"user\0postgres\0database\0postgres\0\0";
    let mut startup = Vec::with_capacity(8 + params.len());
    startup.extend_from_slice(&(8 + params.len() as i32).to_be_bytes());
    startup.extend_from_slice(&196_608i32.to_be_bytes()); // protocol 3.0
    startup.extend_from_slice(params);
    let mut tag = [0u8; 1];
    stream.write_all(&startup).is_ok() && stream.read_exact(&mut tag).is_ok() && tag[0] == b'R'
}

fn wait_ready(child: &mut Child, port: u16) -> std::io::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            return Err(std::io::Error::other(format!(
                "postgres exited at start: {status}"
            )));
        }
        if accepts_connections(port) {
            std::thread::sleep(Duration::from_millis(20));
            if let Some(status) = child.try_wait()? {
                return Err(std::io::Error::other(format!(
                    "postgres exited at start: {status}"
                )));
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(std::io::Error::other(
                "postgres did not become ready in 30 s",
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Immediate shutdown: the data is disposable, no checkpoint is worth waiting for.
        if let Ok(child) = self.child.get_mut() {
            stop_child(child, Signal::SIGQUIT);
        }
    }
}

/// `$PG_BIN`; else, with `PG_VERSION=13…18`, that major: `.tools/postgres-<major>/bin`
/// (the npm builds `scripts/install` fetches) or Debian's `/usr/lib/postgresql/<major>/bin`;
/// else the newest `/usr/lib/postgresql/*/bin`, else `pg_config --bindir`.
pub fn bin_dir() -> std::io::Result<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(major) = std::env::var("PG_VERSION").ok().filter(|v| !v.is_empty()) {
        let tools =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!(".tools/postgres-{major}/bin"));
        let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
        return [tools, debian]
            .into_iter()
            .find(|dir| dir.join("initdb").exists())
            .ok_or_else(|| {
                std::io::Error::other(format!(
                    "PG_VERSION={major}: no PostgreSQL {major} in .tools/postgres-{major} or \
                     /usr/lib/postgresql/{major}: run scripts/install (it fetches 13, 14, 16, 17, 18)"
                ))
            });
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .map_err(|_| {
            std::io::Error::other(
                "no PostgreSQL server binaries found: run scripts/install (or set PG_BIN)",
            )
        })?;
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn server_user() -> std::io::Result<Option<User>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    User::from_name("postgres")
        .map_err(std::io::Error::other)?
        .map(Some)
        .ok_or_else(|| {
            std::io::Error::other(
                "running as root, but there is no `postgres` user to run the server as",
            )
        })
}

fn as_server_user(cmd: &mut Command, user: &Option<User>) {
    use std::os::unix::process::CommandExt;
    if let Some(user) = user {
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        cmd.env("HOME", "/tmp");
    }
}

/// Kills the child if the process that started it dies first (a killed test run), so no
/// server outlives its test. Runs after the uid switch, which would otherwise clear it.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}
