//! Throwaway local PostgreSQL clusters for `pgrelay demo` and the integration tests.
//!
//! This module owns short-lived PostgreSQL installations: it finds the server binaries,
//! runs `initdb` in a fresh temp dir under `/tmp`, starts a primary on a free loopback
//! port, clones streaming replicas with `pg_basebackup -R`, and tears everything down
//! again. It is blocking `std::process` code on purpose (it runs before the runtime, or
//! from test threads) and must not be called from a tokio worker thread. It runs no
//! background tasks, and it never leaves servers behind: [`LocalCluster`] stops every
//! node on drop, including when [`LocalCluster::start`] fails half-way. When the process
//! runs as root, every PostgreSQL program runs as the `postgres` OS user via `runuser`,
//! because the server refuses to run as root. Servers are detached from our process
//! (`pg_ctl` uses `setsid`), so a caller killed by a signal must drop the cluster itself.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tracing::{debug, warn};

mod setup;

pub use setup::find_bindir;
use setup::*;

/// Superuser created by `initdb`; always allowed in over TCP with `trust`.
const SUPERUSER: &str = "postgres";
/// OS user PostgreSQL programs run as when we are root.
const RUN_AS_USER: &str = "postgres";
/// Start attempts on fresh ports before giving up: parallel tests race for ports.
const PORT_ATTEMPTS: usize = 5;
/// Seconds `pg_ctl` waits for start, stop and promote.
const PG_CTL_WAIT_SECS: &str = "30";
const LOG_TAIL_LINES: usize = 30;
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Programs a usable bindir must hold; `initdb` and `pg_ctl` alone are not enough,
/// because Debian links only a few of them into `/usr/local/bin`.
const REQUIRED_PROGRAMS: [&str; 5] = ["initdb", "pg_ctl", "postgres", "pg_basebackup", "psql"];

/// Errors from finding, starting, driving or stopping a local cluster.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "no PostgreSQL installation found: no directory with initdb, pg_ctl, postgres, \
         pg_basebackup and psql in PATH, `pg_config --bindir` or /usr/lib/postgresql/*/bin"
    )]
    BinariesNotFound,
    #[error("running as root, but there is no `{0}` OS user to run PostgreSQL as")]
    NoRunAsUser(&'static str),
    #[error("looking up the `{user}` OS user failed")]
    UserLookup {
        user: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("could not run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error(
        "PostgreSQL in {data_dir} did not start: `{command}` failed ({status}): {stderr}\n\
         last lines of {log_file}:\n{log_tail}",
        data_dir = data_dir.display(),
        log_file = log_file.display()
    )]
    ServerStart {
        data_dir: PathBuf,
        command: String,
        status: ExitStatus,
        stderr: String,
        log_file: PathBuf,
        log_tail: String,
    },
    #[error("{action} {path} failed", path = path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not reserve a free port on 127.0.0.1")]
    FreePort(#[source] io::Error),
    #[error("no node of this cluster listens on port {0}")]
    UnknownPort(u16),
    #[error(
        "replicas not streaming after {timeout:?}: expected {expected:?}, streaming {streaming:?}"
    )]
    ReplicasNotStreaming {
        timeout: Duration,
        expected: Vec<String>,
        streaming: Vec<String>,
        /// Why the last look at `pg_stat_replication` failed, if it did.
        #[source]
        last_error: Option<Box<DemoError>>,
    },
}

impl DemoError {
    /// True when a server failed to start because its port was taken meanwhile.
    fn is_port_in_use(&self) -> bool {
        match self {
            DemoError::ServerStart { log_tail, .. } => {
                log_tail.contains("Address already in use")
                    || log_tail.contains("could not create any TCP/IP sockets")
            }
            _ => false,
        }
    }
}

/// What to build; see [`LocalCluster::start`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Streaming replicas cloned from the primary with `pg_basebackup -R`.
    pub replicas: usize,
    /// `pg_hba.conf` method for TCP connections of non-superusers from 127.0.0.1 and ::1,
    /// e.g. "trust", "md5", "scram-sha-256" or "password".
    pub host_auth: String,
    /// `(role, password)` pairs created as LOGIN roles. Passwords are hashed with the
    /// server's `password_encryption` (scram-sha-256 unless `extra_conf` changes it).
    pub users: Vec<(String, String)>,
    /// `(dbname, owner)` pairs created on the primary (replicas get them by cloning).
    pub databases: Vec<(String, String)>,
    /// Lines appended to the primary's `postgresql.conf`; replicas inherit them. A
    /// `port` setting here is overridden: the launcher owns ports.
    pub extra_conf: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            replicas: 1,
            host_auth: "trust".to_owned(),
            users: Vec::new(),
            databases: Vec::new(),
            extra_conf: Vec::new(),
        }
    }
}

#[derive(Debug)]
struct Node {
    /// Directory name under the cluster dir. Replicas also use it as their
    /// `application_name`, which is how `pg_stat_replication` rows map to nodes.
    name: String,
    port: u16,
    data_dir: PathBuf,
    /// `pg_ctl -l` target, kept outside the data dir so `pg_basebackup` skips it.
    log_file: PathBuf,
}

impl Node {
    /// Whether a postmaster owns the data dir. The pid file is the server's own record,
    /// so this stays right when a test stops or crashes a node behind our back.
    fn is_running(&self) -> bool {
        self.data_dir.join("postmaster.pid").exists()
    }

    /// Whether the node is (still) a standby: promotion removes `standby.signal`.
    fn is_standby(&self) -> bool {
        self.data_dir.join("standby.signal").exists()
    }
}

/// A primary and its streaming replicas, each on its own 127.0.0.1 port, all in one
/// temp dir. Everything is stopped and removed by [`LocalCluster::stop`] or on drop.
#[derive(Debug)]
pub struct LocalCluster {
    runner: Runner,
    /// Temp dir holding every node and the Unix sockets; `None` once `stop` removed it.
    dir: Option<TempDir>,
    /// The node created as primary first, then replicas in creation order. A node is
    /// pushed before its server starts, so a failed `start` still stops what came up.
    nodes: Vec<Node>,
}

impl LocalCluster {
    /// Creates and starts a primary plus `opts.replicas` streaming replicas, with the
    /// requested roles and databases. Takes a few seconds; leaves nothing behind on error.
    pub fn start(opts: &ClusterOptions) -> Result<LocalCluster, DemoError> {
        let began = Instant::now();
        let bindir = find_bindir()?;
        let run_as = run_as_user()?;
        // Always /tmp: short enough for Unix socket paths, traversable by `postgres`.
        let dir = tempfile::Builder::new()
            .prefix("pgrelay-pg-")
            .tempdir_in("/tmp")
            .map_err(io_error("creating a temp dir in", Path::new("/tmp")))?;
        let runner = Runner {
            bindir,
            run_as,
            cwd: dir.path().to_path_buf(),
        };
        runner.hand_over(dir.path())?;
        let mut cluster = LocalCluster {
            runner,
            dir: Some(dir),
            nodes: Vec::new(),
        };
        cluster.init_primary(opts)?;
        cluster.create_roles_and_databases(opts)?;
        for index in 1..=opts.replicas {
            cluster.add_replica(&format!("replica{index}"))?;
        }
        debug!(ports = ?cluster.ports(), elapsed = ?began.elapsed(), "local cluster started");
        Ok(cluster)
    }

    /// Port of the node created as primary (also after another node was promoted).
    pub fn primary_port(&self) -> u16 {
        self.nodes.first().map_or(0, |node| node.port)
    }

    /// Ports of the nodes created as replicas, in creation order.
    pub fn replica_ports(&self) -> Vec<u16> {
        self.nodes.iter().skip(1).map(|node| node.port).collect()
    }

    /// All ports, primary first.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|node| node.port).collect()
    }

    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    /// Runs `sql` with psql as the superuser over TCP; returns trimmed unaligned,
    /// tuples-only output (one row per line, columns separated by `|`).
    pub fn psql(&self, port: u16, db: &str, sql: &str) -> Result<String, DemoError> {
        let mut cmd = self.runner.command("psql");
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
        ]);
        cmd.args([SUPERUSER, "-p", &port.to_string(), "-d", db, "-c", sql]);
        Ok(self.runner.run(&mut cmd)?.trim().to_owned())
    }

    /// `pg_ctl stop -m <mode>` ("smart", "fast" or "immediate"), waiting for the exit.
    pub fn stop_node(&self, port: u16, mode: &str) -> Result<(), DemoError> {
        let mut cmd = self.pg_ctl("stop", self.node(port)?);
        self.runner.run(cmd.args(["-m", mode])).map(drop)
    }

    /// Starts a stopped node again on its old port. A failure carries the log's tail.
    pub fn start_node(&self, port: u16) -> Result<(), DemoError> {
        let node = self.node(port)?;
        let log_offset = fs::metadata(&node.log_file).map_or(0, |meta| meta.len());
        let mut cmd = self.pg_ctl("start", node);
        match self.runner.run(cmd.arg("-l").arg(&node.log_file)) {
            Err(DemoError::CommandFailed {
                command,
                status,
                stderr,
            }) => Err(DemoError::ServerStart {
                data_dir: node.data_dir.clone(),
                command,
                status,
                stderr,
                log_file: node.log_file.clone(),
                log_tail: log_tail(&node.log_file, log_offset),
            }),
            result => result.map(drop),
        }
    }

    /// `pg_ctl promote -w`: the replica leaves recovery and accepts writes.
    pub fn promote(&self, port: u16) -> Result<(), DemoError> {
        let mut cmd = self.pg_ctl("promote", self.node(port)?);
        self.runner.run(&mut cmd).map(drop)
    }

    /// Makes a stopped node a standby of the node at `primary_port` (a demoted primary
    /// after a switchover): `standby.signal` and a `primary_conninfo`. Start it after.
    pub fn make_standby_of(&self, port: u16, primary_port: u16) -> Result<(), DemoError> {
        let node = self.node(port)?;
        self.runner
            .write_file(&node.data_dir.join("standby.signal"), "")?;
        let auto = node.data_dir.join("postgresql.auto.conf");
        let mut conf = fs::read_to_string(&auto).map_err(io_error("reading", &auto))?;
        conf.push_str(&format!(
            "primary_conninfo = 'host=127.0.0.1 port={primary_port} user={SUPERUSER} application_name={}'\n",
            node.name
        ));
        self.runner.write_file(&auto, &conf)
    }

    /// A shell command line running `program` from PostgreSQL's bin directory as the
    /// user the servers run as, for scripts (e.g. a failover hook that promotes).
    pub fn shell_command(&self, program: &str) -> String {
        self.runner.shell_command(program)
    }

    pub fn data_dir(&self, port: u16) -> Option<PathBuf> {
        self.node(port).ok().map(|node| node.data_dir.clone())
    }

    /// Waits until `pg_stat_replication` on the primary shows every running, unpromoted
    /// replica in state `streaming`. Stopped and promoted replicas are not waited for.
    pub fn wait_replicas_streaming(&self, timeout: Duration) -> Result<(), DemoError> {
        let deadline = Instant::now() + timeout;
        let sql = "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'";
        loop {
            let expected: Vec<String> = self
                .nodes
                .iter()
                .skip(1)
                .filter(|n| n.is_running() && n.is_standby())
                .map(|n| n.name.clone())
                .collect();
            let (streaming, last_error) = match self.psql(self.primary_port(), "postgres", sql) {
                Ok(out) => (out.lines().map(str::to_owned).collect::<Vec<_>>(), None),
                Err(err) => (Vec::new(), Some(Box::new(err))),
            };
            if last_error.is_none() && expected.iter().all(|name| streaming.contains(name)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DemoError::ReplicasNotStreaming {
                    timeout,
                    expected,
                    streaming,
                    last_error,
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Stops every running node with `pg_ctl stop -m immediate`, then removes the temp
    /// dir. Idempotent; problems are logged, not returned, since this runs from `Drop`.
    pub fn stop(&mut self) {
        let Some(dir) = self.dir.take() else {
            return;
        };
        // Stop all nodes at once: each `pg_ctl -w` polls, so a serial stop adds up.
        let stopping: Vec<_> = self
            .nodes
            .iter()
            .filter(|node| node.is_running())
            .map(|node| {
                let mut cmd = self.pg_ctl("stop", node);
                cmd.args(["-m", "immediate"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
                (describe(&cmd), cmd.spawn())
            })
            .collect();
        for (command, child) in stopping {
            match child.and_then(|child| child.wait_with_output()) {
                Ok(out) if out.status.success() => debug!(%command, "stopped"),
                Ok(out) => {
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    warn!(%command, status = %out.status, %stderr, "stopping a node failed");
                }
                Err(err) => warn!(%command, error = %err, "could not run pg_ctl stop"),
            }
        }
        let path = dir.path().to_path_buf();
        if let Err(err) = dir.close() {
            warn!(path = %path.display(), error = %err, "could not remove the cluster dir");
        }
    }

    fn node(&self, port: u16) -> Result<&Node, DemoError> {
        self.nodes
            .iter()
            .find(|node| node.port == port)
            .ok_or(DemoError::UnknownPort(port))
    }

    /// Creates `<tempdir>/<name>` for a node's data dir and log file.
    fn new_node(&self, name: &str) -> Result<Node, DemoError> {
        let node_dir = self.runner.cwd.join(name);
        fs::create_dir(&node_dir).map_err(io_error("creating", &node_dir))?;
        self.runner.hand_over(&node_dir)?;
        Ok(Node {
            name: name.to_owned(),
            port: 0,
            data_dir: node_dir.join("data"),
            log_file: node_dir.join("server.log"),
        })
    }

    fn init_primary(&mut self, opts: &ClusterOptions) -> Result<(), DemoError> {
        let node = self.new_node("primary")?;
        let mut initdb = self.runner.command("initdb");
        initdb
            .arg("-D")
            .arg(&node.data_dir)
            .args(["-U", SUPERUSER, "--auth-local=trust", "--auth-host=trust"])
            .args(["--encoding=UTF8", "--no-locale", "--no-sync"]);
        self.runner.run(&mut initdb)?;
        let hba = node.data_dir.join("pg_hba.conf");
        self.runner.write_file(&hba, &hba_conf(&opts.host_auth))?;
        let conf_path = node.data_dir.join("postgresql.conf");
        let mut conf = fs::read_to_string(&conf_path).map_err(io_error("reading", &conf_path))?;
        conf.push_str(&server_conf(&self.runner.cwd, &opts.extra_conf));
        self.runner.write_file(&conf_path, &conf)?;
        self.nodes.push(node);
        self.start_on_free_port()
    }

    fn create_roles_and_databases(&self, opts: &ClusterOptions) -> Result<(), DemoError> {
        let port = self.primary_port();
        let md5 = opts.extra_conf.iter().any(|line| {
            line.replace(' ', "").contains("password_encryption='md5'")
                || line.replace(' ', "").contains("password_encryption=md5")
        });
        for (role, password) in &opts.users {
            // Hashed here so no plaintext password reaches a command line or a log.
            let stored = stored_password(role, password, md5);
            let sql = format!(
                "CREATE ROLE {} LOGIN PASSWORD {}",
                quote_ident(role),
                quote_literal(&stored)
            );
            self.psql(port, "postgres", &sql)?;
        }
        // One statement per call: CREATE DATABASE refuses to run in a multi-statement batch.
        for (db, owner) in &opts.databases {
            let sql = format!(
                "CREATE DATABASE {} OWNER {}",
                quote_ident(db),
                quote_ident(owner)
            );
            self.psql(port, "postgres", &sql)?;
        }
        Ok(())
    }

    fn add_replica(&mut self, name: &str) -> Result<(), DemoError> {
        let node = self.new_node(name)?;
        let primary_port = self.primary_port().to_string();
        // `-R` copies these connection settings, application_name included, into
        // primary_conninfo, so the replica streams from 127.0.0.1:<primary> as `name`.
        let mut cmd = self.runner.command("pg_basebackup");
        cmd.args(["-h", "127.0.0.1", "-p", &primary_port, "-U", SUPERUSER])
            .args(["-d", &format!("application_name={name}")])
            .arg("-D")
            .arg(&node.data_dir)
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
        self.runner.run(&mut cmd)?;
        self.nodes.push(node);
        self.start_on_free_port()
    }

    /// Starts the last pushed node, on a fresh free port per attempt: between freeing a
    /// probe port and the server binding it, a parallel test may grab it.
    fn start_on_free_port(&mut self) -> Result<(), DemoError> {
        let mut attempt = 1;
        loop {
            let port = free_port()?;
            let Some(node) = self.nodes.last_mut() else {
                return Ok(());
            };
            node.port = port;
            let conf_path = node.data_dir.join("postgresql.conf");
            let conf = fs::read_to_string(&conf_path).map_err(io_error("reading", &conf_path))?;
            self.runner
                .write_file(&conf_path, &with_port(&conf, port))?;
            match self.start_node(port) {
                Err(err) if err.is_port_in_use() && attempt < PORT_ATTEMPTS => {
                    debug!(port, attempt, "port taken meanwhile, retrying on another");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// `pg_ctl <action>` on `node`, waiting for the outcome.
    fn pg_ctl(&self, action: &str, node: &Node) -> Command {
        let mut cmd = self.runner.command("pg_ctl");
        cmd.args([action, "-w", "-t", PG_CTL_WAIT_SECS, "-D"])
            .arg(&node.data_dir);
        cmd
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_port_replaces_only_port_settings() {
        let conf = "#port = 5432\nport = 1234\n  port=99\nport_x = 1\nfsync = off\n";
        assert_eq!(
            with_port(conf, 7000),
            "#port = 5432\nport_x = 1\nfsync = off\nport = 7000\n"
        );
    }

    #[test]
    fn described_commands_hide_password_literals() {
        let mut cmd = Command::new("psql");
        cmd.args([
            "-c",
            "CREATE ROLE \"a\" LOGIN PASSWORD 'md5abc'",
            "-d",
            "postgres",
        ]);
        assert_eq!(
            describe(&cmd),
            "psql -c CREATE ROLE \"a\" LOGIN PASSWORD '<redacted>' -d postgres"
        );
    }

    #[test]
    fn quoting_doubles_quote_characters() {
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn port_in_use_is_detected_from_the_log() {
        let err = |log_tail: &str| DemoError::ServerStart {
            data_dir: PathBuf::new(),
            command: String::new(),
            status: ExitStatus::default(),
            stderr: String::new(),
            log_file: PathBuf::new(),
            log_tail: log_tail.to_owned(),
        };
        assert!(err("FATAL:  could not create any TCP/IP sockets").is_port_in_use());
        assert!(!err("FATAL:  invalid value for parameter").is_port_in_use());
    }

    #[test]
    fn hba_keeps_superuser_on_trust() {
        let hba = hba_conf("scram-sha-256");
        assert!(hba.contains("host all postgres 127.0.0.1/32 trust\n"));
        assert!(hba.contains("host all all 127.0.0.1/32 scram-sha-256\n"));
    }
}
