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

/// The console's names are reserved, PgBouncer's `pgbouncer` as well as `pgrelay`: a
/// `[[databases]]` entry with one could never be reached, so `check` refuses it.
#[test]
fn check_refuses_a_database_named_like_the_console() {
    let dir = tempfile::tempdir().expect("tempdir");
    for console in ["pgbouncer", "pgrelay"] {
        let path = dir.path().join(format!("{console}.toml"));
        std::fs::write(
            &path,
            format!(
                "[[backends]]\nhost = \"127.0.0.1\"\n[[users]]\nname = \"a\"\npassword = \"b\"\n\
                 [[databases]]\nname = \"{console}\"\n"
            ),
        )
        .expect("write");
        let out = Command::new(BIN)
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .expect("run pgrelay check");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{console}: {stderr}");
        assert!(stderr.contains("databases[0].name"), "{stderr}");
        assert!(
            stderr.contains("reserved for the admin console"),
            "{stderr}"
        );
    }
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

/// `run --help` and `check --help` describe every option, `--config` included.
#[test]
fn help_describes_every_option() {
    for command in ["run", "check", "demo"] {
        let out = Command::new(BIN)
            .args([command, "--help"])
            .output()
            .expect("run pgrelay --help");
        assert!(out.status.success(), "{command} --help");
        let help = String::from_utf8_lossy(&out.stdout);
        let options: Vec<&str> = help
            .lines()
            .skip_while(|line| *line != "Options:")
            .skip(1)
            .take_while(|line| !line.is_empty())
            .collect();
        assert!(
            !options.is_empty(),
            "{command} --help lists no options:\n{help}"
        );
        if command != "demo" {
            assert!(
                options.iter().any(|line| line.contains("-c, --config")),
                "{command} --help:\n{help}"
            );
        }
        for line in options {
            // "  -c, --config <FILE>  The configuration file ...": text after the name.
            let described = line
                .trim_start()
                .split_once("  ")
                .is_some_and(|(_, text)| !text.trim().is_empty());
            assert!(described, "{command} --help: no description in {line:?}");
        }
    }
}

/// A missing file: one line naming it once, with the OS reason, and a failing status.
#[test]
fn missing_config_file_is_one_line_with_the_os_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("absent.toml");
    let shown = path.display().to_string();
    for command in ["run", "check"] {
        let out = Command::new(BIN)
            .args([command, "-c"])
            .arg(&path)
            .output()
            .expect("run pgrelay");
        assert!(!out.status.success(), "{command}: {:?}", out.status);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{command}: {stderr}");
        assert_eq!(stderr.matches(&shown).count(), 1, "{command}: {stderr}");
        assert!(
            stderr.contains(&format!("cannot read {shown}: "))
                && stderr.contains("No such file or directory (os error 2)"),
            "{command}: {stderr}"
        );
    }
}

/// Text logs carry no ANSI colour codes when stderr is a pipe, warnings included.
#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pgrelay.toml");
    // A backend nobody listens on: the health check logs a warning too.
    std::fs::write(
        &path,
        format!(
            "listen = [\"127.0.0.1:0\"]\nmetrics_listen = \"\"\nlog_format = \"text\"\n\
             [[backends]]\nhost = \"127.0.0.1\"\nport = {}\n\
             [[users]]\nname = \"a\"\npassword = \"b\"\n",
            free_port()
        ),
    )
    .expect("write");
    let mut run = Demo(
        Command::new(BIN)
            .args(["run", "-c"])
            .arg(&path)
            .env("PGRELAY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pgrelay run"),
    );
    let stderr = run.0.stderr.take().expect("stderr");
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).split(b'\n') {
            if lines.send(line.expect("read stderr")).is_err() {
                return;
            }
        }
    });
    let mut log: Vec<Vec<u8>> = Vec::new();
    while !log.iter().any(|line| contains(line, b"listening")) {
        let line = received
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no `listening` log line; log: {log:?}"));
        log.push(line);
    }
    let pid = nix::unistd::Pid::from_raw(run.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    // The rest of the log, up to the exit (the pipe closes).
    while let Ok(line) = received.recv_timeout(Duration::from_secs(20)) {
        log.push(line);
    }
    assert!(log.len() >= 2, "{log:?}");
    assert!(
        log.iter().any(|line| contains(line, b"WARN")),
        "no warning in {log:?}"
    );
    for line in &log {
        assert!(
            !line.contains(&0x1b),
            "ANSI escape in {:?}",
            String::from_utf8_lossy(line)
        );
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `pgrelay demo --port P` with P taken fails at once, naming P and `--port`, and runs
/// no PostgreSQL program: the PATH leads to stand-ins for PostgreSQL's programs that only
/// record that they ran, so building a cluster first would leave a mark.
#[test]
fn demo_on_a_taken_port_fails_before_starting_postgres() {
    use std::os::unix::fs::PermissionsExt;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let (bin, marks) = (dir.path().join("bin"), dir.path().join("marks"));
    std::fs::create_dir(&bin).expect("bin dir");
    std::fs::create_dir(&marks).expect("marks dir");
    // The demo runs PostgreSQL's programs as `postgres` when we are root.
    let mode = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    mode(dir.path(), 0o755);
    mode(&bin, 0o755);
    mode(&marks, 0o777);
    for program in ["initdb", "pg_ctl", "postgres", "pg_basebackup", "psql"] {
        let script = bin.join(program);
        let mark = marks.join(program);
        std::fs::write(
            &script,
            format!("#!/bin/sh\ntouch '{}'\nexit 1\n", mark.display()),
        )
        .expect("write stand-in");
        mode(&script, 0o755);
    }
    let path = std::env::join_paths(std::iter::once(bin.clone()).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .expect("PATH");
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(["demo", "--port", &port])
        .env("PATH", path)
        .output()
        .expect("run pgrelay demo");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "demo succeeded on a taken port");
    assert!(
        stderr.contains(&port) && stderr.contains("--port"),
        "the error names neither the port nor --port: {stderr}"
    );
    let ran: Vec<_> = std::fs::read_dir(&marks)
        .expect("marks")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    assert!(
        ran.is_empty(),
        "the demo ran {ran:?} before checking its port"
    );
    assert!(!stdout.contains("starting"), "{stdout}");
    // A real cluster takes seconds (initdb alone about one); the check takes none.
    assert!(took < Duration::from_secs(1), "took {took:?}");
    drop(taken);
}
