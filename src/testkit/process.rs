//! The `outbox-relay` binary as a child process, for tests and the benchmark.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// `outbox-relay run --config FILE`, logging at `warn`; killed when dropped, so a
/// failing test leaves no relay behind.
pub struct RelayProcess(Child);

impl RelayProcess {
    /// `binary` is the built relay: `env!("CARGO_BIN_EXE_outbox-relay")` in tests and
    /// benches (the library cannot know it).
    pub fn spawn(binary: &str, config: &Path) -> RelayProcess {
        RelayProcess(
            Command::new(binary)
                .args(["run", "--config"])
                .arg(config)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn outbox-relay"),
        )
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }

    fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(self.0.id() as i32), signal);
    }

    pub fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.0.wait();
    }

    /// SIGTERM, then blocks until the process exited.
    pub fn terminate_blocking(&mut self) -> std::io::Result<ExitStatus> {
        self.signal(Signal::SIGTERM);
        self.0.wait()
    }

    /// SIGTERM, then waits for the exit (panicking after `within`); returns the exit code.
    pub async fn terminate(&mut self, within: Duration) -> Option<i32> {
        let sent = std::time::Instant::now();
        self.signal(Signal::SIGTERM);
        loop {
            if let Some(status) = self.0.try_wait().expect("wait for outbox-relay") {
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
        super::peak_rss_bytes(self.0.id()).expect("relay still running")
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
