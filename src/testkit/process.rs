//! The `outbox-relay` binary as a child process, for tests and the benchmark.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// `outbox-relay run --config FILE`, logging at `warn`; killed when dropped, so a
/// failing test leaves no relay behind.
pub struct RelayProcess {
    child: Child,
    /// The relay is the child of `child` (a PID-namespace wrapper), not `child` itself.
    wrapped: bool,
}

impl RelayProcess {
    /// `binary` is the built relay: `env!("CARGO_BIN_EXE_outbox-relay")` in tests and
    /// benches (the library cannot know it).
    pub fn spawn(binary: &str, config: &Path) -> RelayProcess {
        RelayProcess::spawn_with(Command::new(binary), config)
    }

    /// The relay as PID 1 of a PID namespace of its own, as in a container (needs
    /// root). `unshare --kill-child` takes the relay down with it.
    pub fn spawn_as_pid_1(binary: &str, config: &Path) -> RelayProcess {
        let mut unshare = Command::new("unshare");
        unshare
            .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
            .arg(binary);
        let mut relay = RelayProcess::spawn_with(unshare, config);
        relay.wrapped = true;
        relay
    }

    fn spawn_with(mut command: Command, config: &Path) -> RelayProcess {
        command
            .args(["run", "--config"])
            .arg(config)
            // OUTBOX_RELAY_TEST_RELAY_LOG raises the level when a run needs explaining.
            .env(
                "RUST_LOG",
                std::env::var("OUTBOX_RELAY_TEST_RELAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null());
        // OUTBOX_RELAY_TEST_RELAY_LOG_DIR: each relay's log in a file named after its
        // config, so the relays of one test can be told apart.
        if let Ok(dir) = std::env::var("OUTBOX_RELAY_TEST_RELAY_LOG_DIR") {
            let name = config.file_name().unwrap_or_default().to_string_lossy();
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(Path::new(&dir).join(format!("{name}.log")))
                .expect("open the relay's log file");
            command.stderr(file);
        }
        let child = command.spawn().expect("spawn outbox-relay");
        RelayProcess {
            child,
            wrapped: false,
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The relay's process id (as this machine sees it).
    pub fn id(&self) -> u32 {
        if !self.wrapped {
            return self.child.id();
        }
        // The wrapper's only child, once it has forked.
        let pid = self.child.id();
        for _ in 0..200 {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            if let Some(relay) = children
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok())
            {
                return relay;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the PID-namespace wrapper {pid} started no relay");
    }

    /// Signals the relay itself (a wrapper would not pass the signal on).
    fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(self.id() as i32), signal);
    }

    /// SIGSTOP: the process stays, frozen (a paused VM, a long stall).
    pub fn pause(&self) {
        self.signal(Signal::SIGSTOP);
    }

    /// SIGCONT after [`RelayProcess::pause`].
    pub fn resume(&self) {
        self.signal(Signal::SIGCONT);
    }

    /// The exit code once the process has exited on its own; `None` while it runs.
    pub fn exit_code(&mut self) -> Option<i32> {
        self.child
            .try_wait()
            .ok()
            .flatten()
            .map(|s| s.code().unwrap_or(-1))
    }

    pub fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM, then blocks until the process exited.
    pub fn terminate_blocking(&mut self) -> std::io::Result<ExitStatus> {
        self.signal(Signal::SIGTERM);
        self.child.wait()
    }

    /// SIGTERM, then waits for the exit (panicking after `within`); returns the exit code.
    pub async fn terminate(&mut self, within: Duration) -> Option<i32> {
        let sent = std::time::Instant::now();
        self.signal(Signal::SIGTERM);
        loop {
            // A wrapper exits with the relay's own exit code.
            if let Some(status) = self.child.try_wait().expect("wait for outbox-relay") {
                return status.code();
            }
            assert!(
                sent.elapsed() < within,
                "the relay did not exit within {within:?} of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn peak_rss(&self) -> u64 {
        super::peak_rss_bytes(self.id()).expect("relay still running")
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
