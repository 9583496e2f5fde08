//! The `pgrelay` command itself: `check` accepts the config contract and names the key
//! of a bad setting; `demo` (the README's first command) starts a cluster with pgrelay
//! in front, serves psql, and cleans everything up on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_pgrelay");

fn contract() -> String {
    format!(
        "{}/../shared/contract/pgrelay.toml",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn check_accepts_the_contract_and_the_shipped_files() {
    let conf = format!("{}/conf", env!("CARGO_MANIFEST_DIR"));
    for file in [
        contract(),
        format!("{conf}/pgrelay.toml"),
        format!("{conf}/minimal.toml"),
    ] {
        if !std::path::Path::new(&file).exists() {
            continue; // the contract lives beside the repository, not in it
        }
        let out = Command::new(BIN)
            .args(["check", "-c", &file])
            .output()
            .expect("run pgrelay check");
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
    }
}

#[test]
fn check_names_the_bad_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[pool]\nquery_wait_timeout = \"soon\"\n[[backends]]\nhost = \"127.0.0.1\"\n[[users]]\nname = \"a\"\npassword = \"b\"\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .expect("run pgrelay check");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pool.query_wait_timeout"), "{stderr}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Stops the demo (and so its cluster) even when an assertion fails first.
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[test]
fn demo_serves_psql_and_cleans_up_on_sigterm() {
    let port = free_port().to_string();
    let mut demo = Demo(
        Command::new(BIN)
            .args(["demo", "--port", &port])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgrelay demo"),
    );
    let stdout = demo.0.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let started = Instant::now();
    let mut data_ports = String::new();
    for line in lines.by_ref() {
        let line = line.expect("demo output");
        if line.contains("in front of a primary") {
            data_ports = line.clone();
        }
        if line.contains("Press Ctrl-C") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "demo did not start"
        );
    }
    assert!(!data_ports.is_empty(), "demo never said where it listens");
    let out = Command::new("psql")
        .env("PGPASSWORD", "app-secret")
        .args([
            "-X",
            "-At",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "app",
            "-d",
            "app",
        ])
        .args(["-c", "/* pgrelay:primary */ SELECT pg_is_in_recovery()"])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "f",
        "psql did not reach the primary"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(demo.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = demo.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "demo did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "demo exited with {status}");
    // The cluster is gone: nothing listens on pgrelay's port nor on the PostgreSQL ports
    // the demo announced.
    let ports: Vec<u16> = data_ports
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| w.len() >= 4)
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(
        ports.len(),
        3,
        "expected pgrelay's, the primary's and the replica's port in {data_ports:?}"
    );
    for p in ports {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", p)).is_err(),
            "something still listens on {p}"
        );
    }
}

/// `pgrelay run`: SIGHUP re-reads the file (a broken one is refused and logged, the
/// running config stays), the console's SHUTDOWN ends the process, and the log is JSON
/// when `log_format = "json"`.
#[test]
fn run_reloads_on_sighup_and_shuts_down_from_the_console() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pgrelay.toml");
    let port = free_port();
    let config = |pool_size: u32| {
        format!(
            "listen = [\"127.0.0.1:{port}\"]\nmetrics_listen = \"\"\nlog_format = \"json\"\n\
             admin_users = [\"admin\"]\nauth_type = \"md5\"\n\
             [pool]\ndefault_pool_size = {pool_size}\n\
             [[backends]]\nhost = \"127.0.0.1\"\nport = {}\n\
             [[users]]\nname = \"admin\"\npassword = \"admin-secret\"\n",
            free_port()
        )
    };
    std::fs::write(&path, config(20)).expect("write");
    let log = dir.path().join("log");
    let mut run = Demo(
        Command::new(BIN)
            .args(["run", "-c"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start pgrelay run"),
    );
    let console = |sql: &str| {
        Command::new("psql")
            .env("PGPASSWORD", "admin-secret")
            .args(["-X", "-At", "-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-U", "admin", "-d", "pgrelay", "-c", sql])
            .output()
            .expect("run psql")
    };
    let pool_size = || {
        let out = console("SHOW CONFIG");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with("pool.default_pool_size|"))
            .map(|l| l.split('|').nth(1).unwrap_or("").to_owned())
    };
    let wait_for = |what: &str, check: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !check() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for("the console", &|| pool_size().as_deref() == Some("20"));
    let pid = nix::unistd::Pid::from_raw(run.0.id() as i32);
    std::fs::write(&path, config(7)).expect("write");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    wait_for("the reload", &|| pool_size().as_deref() == Some("7"));
    std::fs::write(&path, "[pool]\ndefault_pool_size = -1\n").expect("write");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    wait_for("the refusal in the log", &|| {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("reload rejected"))
    });
    assert_eq!(
        pool_size().as_deref(),
        Some("7"),
        "the running config stays"
    );
    let out = console("SHUTDOWN");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = run.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "pgrelay did not exit after SHUTDOWN"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "exit status {status}");
    let log = std::fs::read_to_string(&log).expect("log");
    for line in log.lines() {
        let parsed: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(parsed.get("level").is_some(), "{line}");
    }
    assert!(log.contains("configuration reloaded"));
}
