//! pgrelay as a process of its own (the binary cargo built for the tests), its output
//! in a log file: for tests that signal it, kill it, measure it or run two at once.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

pub const BIN: &str = env!("CARGO_BIN_EXE_pgrelay");

/// A running `pgrelay run -c CONFIG`; SIGTERM (then SIGKILL after 5 s) when dropped.
pub struct RelayProcess {
    child: Option<Child>,
    pub log: PathBuf,
}

impl RelayProcess {
    /// Starts `pgrelay run -c config` with `extra` arguments, logging to `log`.
    pub fn spawn(config: &Path, log: PathBuf, extra: &[&str]) -> RelayProcess {
        RelayProcess::spawn_env(config, log, extra, &[])
    }

    /// [`RelayProcess::spawn`] with `env` added to its environment.
    pub fn spawn_env(
        config: &Path,
        log: PathBuf,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> RelayProcess {
        let out = File::create(&log).expect("create the log");
        let child = Command::new(BIN)
            .args(["run", "-c"])
            .arg(config)
            .args(extra)
            .envs(env.iter().copied())
            .env("PGRELAY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .expect("start pgrelay");
        RelayProcess {
            child: Some(child),
            log,
        }
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("pgrelay was stopped")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("pgrelay was stopped").id()
    }

    /// Whether the process is still there (it was not stopped and has not exited).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Waits until the log has a line containing `what` and returns it; panics if
    /// pgrelay exits first or `within` passes.
    pub fn wait_log(&mut self, what: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let text = self.log_text();
            if let Some(line) = text.lines().find(|l| l.contains(what)) {
                return line.to_owned();
            }
            if let Ok(Some(status)) = self.child().try_wait() {
                panic!("pgrelay exited ({status}) before logging {what:?}:\n{text}");
            }
            assert!(Instant::now() < deadline, "no {what:?} in the log:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The address the first log line containing `before` names right after it.
    pub fn logged_addr(&mut self, before: &str) -> SocketAddr {
        let line = self.wait_log(before, Duration::from_secs(30));
        let (_, rest) = line.split_once(before).expect("addr");
        let addr = rest.split_whitespace().next().expect("an address");
        addr.parse().expect("an address")
    }

    /// The (first) TCP address it listens on for clients.
    pub fn addr(&mut self) -> SocketAddr {
        self.logged_addr(": listening addr=")
    }

    /// Where `/metrics` and the probes answer.
    pub fn metrics_addr(&mut self) -> SocketAddr {
        self.logged_addr("metrics and health endpoints listening addr=")
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child().try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "pgrelay did not exit:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` without waiting.
    pub fn send(&self, signal: Signal) {
        if let Some(child) = &self.child {
            let _ = signal::kill(Pid::from_raw(child.id() as i32), signal);
        }
    }

    /// Sends `signal`, waits up to `wait` for the exit, then kills what is left.
    pub fn stop(&mut self, signal: Signal, wait: Duration) {
        self.send(signal);
        let Some(mut child) = self.child.take() else {
            return;
        };
        let deadline = Instant::now() + wait;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGKILL: nothing drained, nothing released.
    pub fn kill(&mut self) {
        self.stop(Signal::SIGKILL, Duration::ZERO);
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.stop(Signal::SIGTERM, Duration::from_secs(5));
    }
}
