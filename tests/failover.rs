//! Failover against real clusters: a crashed primary replaced through the
//! failover_command, a planned switchover, a replica that dies and comes back, a
//! flapping replica, and split brains (newer timeline, and a tie an operator settles).
//!
//! Health checks run fast here (every 300 ms, retries 200 ms apart), so transitions take
//! well under a second; the figures each test prints are what a run measured.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgrelay::cluster::events::Operation;
use pgrelay::cluster::hooks::{HookKind, HookOutcome};
use pgrelay::cluster::Status;
use support::writer::Seen;
use support::*;

/// Health checks every 300 ms; down after a probe and 2 retries 200 ms apart.
fn fast_checks(failover: &[String]) -> Vec<String> {
    vec![
        "[health_check]\nperiod = \"300ms\"\ntimeout = \"1s\"\nmax_retries = 2\n\
         retry_delay = \"200ms\"\nup_after = 2"
            .to_owned(),
        format!(
            "[failover]\nhold_timeout = \"30s\"\n{}",
            failover.join("\n")
        ),
    ]
}

/// Hook scripts in a scratch directory; each appends its arguments (every
/// placeholder, in Pgpool-II's order) to a log of its own.
struct Hooks {
    dir: tempfile::TempDir,
}

impl Hooks {
    fn new() -> Hooks {
        Hooks {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn script(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{name}.sh"))
    }

    fn log_path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// The command line for `<name>_command`; the script only logs (see `promote_with`).
    fn command(&self, name: &str) -> String {
        self.write(name, None);
        format!(
            "sh '{}' %d %h %p %D %m %H %M %P %r %R %N %S %%",
            self.script(name).display()
        )
    }

    /// Rewrites `name`'s script so that, when the failed node is the old primary
    /// (`%d` = `%P`), it promotes the new main node (`%R`) with `pg_ctl`, as Pgpool-II's
    /// sample failover script does.
    fn promote_with(&self, name: &str, pg_ctl: &str) {
        self.write(name, Some(pg_ctl));
    }

    fn write(&self, name: &str, pg_ctl: Option<&str>) {
        let promote = match pg_ctl {
            Some(pg_ctl) => format!(
                "if [ \"$1\" = \"$8\" ]; then {pg_ctl} promote -w -D \"${{10}}\" || exit 7; fi\n"
            ),
            None => String::new(),
        };
        let log = self.log_path(name);
        let text = format!("#!/bin/sh\necho \"$*\" >> '{}'\n{promote}", log.display());
        std::fs::write(self.script(name), text).expect("write hook script");
    }

    /// What `name`'s script logged, a line per run.
    fn log(&self, name: &str) -> Vec<String> {
        std::fs::read_to_string(self.log_path(name))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits for `name`'s script to run (hooks run on their own task, after the
    /// transition), checks it ran exactly once, and returns what it logged.
    async fn ran_once(&self, name: &str) -> String {
        wait_for(name, Duration::from_secs(10), || !self.log(name).is_empty()).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut lines = self.log(name);
        assert_eq!(lines.len(), 1, "{name} once: {lines:?}");
        lines.remove(0)
    }

    /// Fast checks, data directories for `%D`/`%R`, and `<name>_command` for each name.
    fn options(&self, replicas: usize, names: &[&str]) -> EnvOptions {
        let commands: Vec<String> = names
            .iter()
            .map(|name| format!("{name}_command = {:?}", self.command(name)))
            .collect();
        EnvOptions {
            replicas,
            data_dirs: true,
            sections: fast_checks(&commands),
            ..EnvOptions::default()
        }
    }
}

struct Load {
    stop: Arc<AtomicBool>,
    seen: Vec<Arc<Mutex<Seen>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn new() -> Load {
        Load {
            stop: Arc::default(),
            seen: Vec::new(),
            tasks: Vec::new(),
        }
    }

    /// A client that inserts keys `id * 1e6 + n` one by one (extended protocol,
    /// autocommit), as fast as it can.
    async fn writer(&mut self, env: &TestEnv, id: i64) {
        let client = env.client().await;
        let (seen, task) = writer::spawn(client, id, self.stop.clone(), Duration::ZERO);
        self.seen.push(seen);
        self.tasks.push(task);
    }

    /// `count` readers.
    async fn readers(&mut self, env: &TestEnv, count: usize) {
        for _ in 0..count {
            self.reader(env).await;
        }
    }

    /// A client that reads (simple protocol) as fast as it can.
    async fn reader(&mut self, env: &TestEnv) {
        let client = env.client().await;
        let (stop, seen) = (self.stop.clone(), Arc::new(Mutex::new(Seen::default())));
        self.seen.push(seen.clone());
        self.tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let result = client.simple_query("SELECT count(*) FROM t").await;
                let mut seen = seen.lock().expect("seen");
                match result {
                    Ok(_) => seen.oks.push(Instant::now()),
                    Err(err) => {
                        let code = sqlstate(&err).unwrap_or_else(|| err.to_string());
                        seen.errors.push((Instant::now(), code));
                    }
                }
            }
        }));
    }

    async fn finish(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("load task");
        }
        self.seen
            .into_iter()
            .map(|s| std::mem::take(&mut *s.lock().expect("seen")))
            .collect()
    }

    /// The first acknowledged write after `since`, from any writer.
    fn first_ok_after(&self, since: Instant, writers: usize) -> Option<Instant> {
        self.seen[..writers]
            .iter()
            .filter_map(|s| {
                s.lock()
                    .expect("seen")
                    .oks
                    .iter()
                    .copied()
                    .find(|&t| t > since)
            })
            .min()
    }
}

fn max_gap(oks: &[Instant]) -> Duration {
    oks.windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// Creates `t` on the primary and waits until every replica has it.
async fn create_table(env: &TestEnv) {
    let primary = env.direct_superuser().await;
    primary
        .batch_execute("CREATE TABLE t (k bigint PRIMARY KEY); GRANT ALL ON t TO app")
        .await
        .expect("create t");
    for port in env.cluster.replica_ports() {
        let ok = eventually(Duration::from_secs(20), || async {
            env.cluster
                .psql(port, APP_DB, "SELECT count(*) FROM t")
                .is_ok()
        })
        .await;
        assert!(ok, "replica {port} never saw t");
    }
}

async fn wait_for(what: &str, timeout: Duration, check: impl Fn() -> bool) {
    let ok = eventually(timeout, || {
        let done = check();
        async move { done }
    })
    .await;
    assert!(ok, "timed out waiting for {what}");
}

/// The primary crashes under load; the failover_command promotes the replica that
/// has replayed the most; writes resume on it, reads never stop, no acknowledged
/// write is lost, and the other replica is told to follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_primary_is_replaced_through_the_failover_command() {
    let hooks = Hooks::new();
    let options = EnvOptions {
        // Reads only on replicas: the crash must not touch them.
        weights: vec![0.0, 1.0, 1.0],
        ..hooks.options(2, &["failover", "follow_primary"])
    };
    let env = start(options).await;
    hooks.promote_with("failover", &env.cluster.shell_command("pg_ctl"));
    create_table(&env).await;
    // Every acknowledged commit is on both replicas: whichever is promoted has it.
    let primary = env.direct_superuser().await;
    // (The harness turns synchronous_commit off for speed: on again, here.)
    for sql in [
        "ALTER SYSTEM SET synchronous_commit = 'on'",
        "ALTER SYSTEM SET synchronous_standby_names = 'ANY 2 (*)'",
        "SELECT pg_reload_conf()",
    ] {
        primary
            .batch_execute(sql)
            .await
            .expect("synchronous replication");
    }
    drop(primary);
    let old_port = env.cluster.primary_port();
    let shared = env.relay.shared.clone();
    wait_for("replica lag measured", Duration::from_secs(10), || {
        shared
            .cluster
            .load()
            .nodes
            .iter()
            .skip(1)
            .all(|n| n.readable)
    })
    .await;

    let writers = 4;
    let mut load = Load::new();
    for id in 1..=writers as i64 {
        load.writer(&env, id).await;
    }
    load.readers(&env, 2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.cluster
        .stop_node(old_port, "immediate")
        .expect("crash the primary");
    // pg_ctl waits for the server to be gone: any write acknowledged from here on
    // ran on a new primary.
    let crashed_at = Instant::now();
    let mut resumed = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while resumed.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        resumed = load.first_ok_after(crashed_at, writers);
    }
    let resumed = resumed.expect("writes resumed after the crash");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = load.finish().await;
    let recovery = resumed - crashed_at;

    // The hook ran once, with Pgpool-II's placeholders.
    let topology = shared.cluster.snapshot();
    let new_primary = topology.primary.expect("a new primary");
    assert_ne!(new_primary, 0);
    let other = 3 - new_primary;
    let dir = |node: usize| topology.nodes[node].data_directory.clone();
    let port = |node: usize| topology.nodes[node].port;
    let lines = hooks.log("failover");
    assert_eq!(
        lines,
        [format!(
            "0 127.0.0.1 {old_port} {} {new_primary} 127.0.0.1 0 0 {} {} 127.0.0.1 {old_port} %",
            dir(0),
            port(new_primary),
            dir(new_primary)
        )],
        "failover_command ran once for node 0"
    );
    // The other replica is told to follow the new primary.
    let follow = hooks.ran_once("follow_primary").await;
    assert!(
        follow.starts_with(&format!("{other} 127.0.0.1 {} ", port(other))),
        "{follow}"
    );
    let records = shared.hooks.records();
    assert!(
        records.iter().all(|r| r.outcome == HookOutcome::Exited(0)),
        "{records:?}"
    );
    assert_eq!(topology.nodes[0].status, Status::Down);
    // Nothing of the dead node is kept.
    for pool in shared.pools.all().iter().filter(|p| p.key.node == 0) {
        assert_eq!(pool.counts().1, 0, "servers kept for the dead node");
    }

    // Writes: at most the one in flight per writer failed, with a clear code, and
    // every acknowledged write is on the new primary.
    let (write_seen, read_seen) = seen.split_at(writers);
    let write_errors: Vec<&String> = write_seen
        .iter()
        .flat_map(|s| s.errors.iter().map(|(_, code)| code))
        .collect();
    assert!(write_errors.len() <= writers, "{write_errors:?}");
    for code in &write_errors {
        assert!(
            ["08006", "57P01", "57P02", "57P03"].contains(&code.as_str()),
            "unexpected write error {code}"
        );
    }
    let acked: Vec<i64> = write_seen.iter().flat_map(|s| s.acked.clone()).collect();
    let present = env
        .cluster
        .psql(port(new_primary), APP_DB, "SELECT k FROM t")
        .expect("read the new primary");
    let present: std::collections::HashSet<i64> = present
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let lost: Vec<&i64> = acked.iter().filter(|k| !present.contains(k)).collect();
    let boundaries: Vec<(i64, i64)> = write_seen
        .iter()
        .map(|s| {
            let before = s.oks.iter().filter(|&&t| t <= crashed_at).count();
            (
                s.acked.get(before.wrapping_sub(1)).copied().unwrap_or(0),
                s.acked.last().copied().unwrap_or(0),
            )
        })
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged writes lost: {} (last before the crash, last overall, per writer: \
         {boundaries:?}; new primary {new_primary}): {lost:?}",
        lost.len()
    );
    // Reads never stopped.
    let read_errors: usize = read_seen.iter().map(|s| s.errors.len()).sum();
    assert_eq!(read_errors, 0, "reads failed");
    let read_gap = read_seen
        .iter()
        .map(|s| max_gap(&s.oks))
        .max()
        .unwrap_or_default();
    assert!(
        read_gap < Duration::from_secs(2),
        "reads paused {read_gap:?}"
    );
    eprintln!(
        "failover: writes resumed {recovery:?} after the crash; {} writes acknowledged, \
         {} failed in flight, none lost; longest pause between reads {read_gap:?}; \
         failover_command took {:?}",
        acked.len(),
        write_errors.len(),
        records.first().map(|r| r.elapsed).unwrap_or_default()
    );
    assert!(
        recovery < Duration::from_secs(15),
        "recovery took {recovery:?}"
    );
}

/// What one short session (log in, INSERT, disconnect) saw.
struct Session {
    started: Instant,
    done: Instant,
    /// The key, if its INSERT was acknowledged; else what failed (step and message).
    outcome: Result<i64, String>,
}

/// Short write sessions until `stop`, one started every `every` on its own task (so
/// held sessions do not slow the arrivals): each logs in afresh, inserts one key and
/// disconnects. Every other one sets `application_name`, so that its login needs a
/// server (the pool's defaults do not match).
fn short_sessions(
    addr: std::net::SocketAddr,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Session>> {
    tokio::spawn(async move {
        let base: tokio_postgres::Config = relay_conn_string(addr, APP_USER, APP_PASSWORD, APP_DB)
            .parse()
            .expect("config");
        let mut running = Vec::new();
        let mut key = 0i64;
        while !stop.load(Ordering::Relaxed) {
            key += 1;
            let mut config = base.clone();
            if key % 2 == 0 {
                config.application_name("short-writer");
            }
            running.push(tokio::spawn(async move {
                let started = Instant::now();
                let outcome = one_short_session(&config, key).await;
                Session {
                    started,
                    done: Instant::now(),
                    outcome,
                }
            }));
            tokio::time::sleep(every).await;
        }
        let mut sessions = Vec::new();
        for session in running {
            sessions.push(session.await.expect("session task"));
        }
        sessions
    })
}

async fn one_short_session(config: &tokio_postgres::Config, key: i64) -> Result<i64, String> {
    let describe = |step: &str, err: tokio_postgres::Error| {
        let detail = err.as_db_error().map_or_else(
            || err.to_string(),
            |db| format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        );
        format!("{step}: {detail}")
    };
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| describe("login", e))?;
    let connection = tokio::spawn(connection);
    let result = client
        .execute("INSERT INTO t (k) VALUES ($1)", &[&key])
        .await
        .map(|_| key)
        .map_err(|e| describe("insert", e));
    drop(client);
    let _ = connection.await;
    result
}

/// The primary crashes (`pg_ctl stop -m immediate`) under a stream of short write
/// sessions, with health checks every second and one retry. Logins and writes that
/// arrive meanwhile are held until the failover_command has promoted the replica and
/// then run there: no session that starts after the crash fails, only what was in
/// flight may, no client is shown an internal address, and every acknowledged write
/// is on the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_start_after_a_crash_do_not_fail() {
    crash_under_short_sessions("transaction").await;
}

/// The same in session mode, where every login takes a server on the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_start_after_a_crash_do_not_fail_session_mode() {
    crash_under_short_sessions("session").await;
}

async fn crash_under_short_sessions(pool_mode: &'static str) {
    let hooks = Hooks::new();
    let failover = hooks.command("failover");
    let options = EnvOptions {
        pool_mode,
        replicas: 1,
        data_dirs: true,
        sections: vec![
            "[health_check]\nperiod = \"1s\"\ntimeout = \"1s\"\nmax_retries = 1\n\
             retry_delay = \"1s\""
                .to_owned(),
            format!("[failover]\nhold_timeout = \"30s\"\nfailover_command = {failover:?}"),
        ],
        ..EnvOptions::default()
    };
    let env = start(options).await;
    hooks.promote_with("failover", &env.cluster.shell_command("pg_ctl"));
    create_table(&env).await;
    let primary = env.direct_superuser().await;
    // Acknowledged commits are on the replica too: the promoted node has them all.
    for sql in [
        "ALTER SYSTEM SET synchronous_commit = 'on'",
        "ALTER SYSTEM SET synchronous_standby_names = '*'",
        "SELECT pg_reload_conf()",
    ] {
        primary
            .batch_execute(sql)
            .await
            .expect("synchronous replication");
    }
    drop(primary);
    let (old_port, new_port) = (env.cluster.primary_port(), env.cluster.replica_ports()[0]);
    let shared = env.relay.shared.clone();
    wait_for("replica readable", Duration::from_secs(10), || {
        shared.cluster.load().nodes[1].readable
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let arrivals = short_sessions(env.addr, Duration::from_millis(40), stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let crash_began = Instant::now();
    env.cluster
        .stop_node(old_port, "immediate")
        .expect("crash the primary");
    // pg_ctl returns once the server is gone: sessions from here on start after it.
    let crashed_at = Instant::now();
    wait_for("a new primary", Duration::from_secs(30), || {
        shared.cluster.load().primary == Some(1)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let sessions = arrivals.await.expect("sessions");

    let (before, after): (Vec<&Session>, Vec<&Session>) =
        sessions.iter().partition(|s| s.started < crashed_at);
    let failed = |list: &[&Session]| -> Vec<String> {
        list.iter()
            .filter_map(|s| s.outcome.as_ref().err().cloned())
            .collect()
    };
    let (failed_before, failed_after) = (failed(&before), failed(&after));
    // Writes resumed: the first write of a session that started after the crash was
    // acknowledged (by the new primary).
    let recovery = after
        .iter()
        .filter(|s| s.outcome.is_ok())
        .map(|s| s.done - crashed_at)
        .min();
    let longest_login = after
        .iter()
        .map(|s| s.done - s.started)
        .max()
        .unwrap_or_default();
    // Sessions that arrived while there was no primary to write to: they were held.
    let during = after
        .iter()
        .filter(|s| recovery.is_some_and(|r| s.started < crashed_at + r))
        .count();
    let acked: Vec<i64> = sessions
        .iter()
        .filter_map(|s| s.outcome.as_ref().ok().copied())
        .collect();
    eprintln!(
        "crash under short sessions ({pool_mode} mode): writes resumed {recovery:?} after the \
         crash; {} sessions \
         started before it ({} failed in flight: {failed_before:?}), {} after it ({} failed: \
         {failed_after:?}), {during} of them before writes resumed; the longest session \
         after it took {longest_login:?}; {} writes acknowledged",
        before.len(),
        failed_before.len(),
        after.len(),
        failed_after.len(),
        acked.len()
    );
    for message in failed_after.iter().chain(&failed_before) {
        assert!(
            !message.contains("127.0.0.1") && !message.contains("os error"),
            "a client was shown an internal detail: {message}"
        );
    }
    assert!(
        failed_after.is_empty(),
        "{} of {} sessions that started after the crash failed",
        failed_after.len(),
        after.len()
    );
    // Only sessions in flight at the crash may have failed: none that had ended.
    let ended_before_failed = before
        .iter()
        .filter(|s| s.outcome.is_err() && s.done < crash_began)
        .count();
    assert_eq!(ended_before_failed, 0, "{failed_before:?}");
    assert!(
        during >= 10,
        "only {during} sessions arrived during the outage"
    );
    let recovery = recovery.expect("writes resumed");
    assert!(
        recovery < Duration::from_secs(10),
        "recovery took {recovery:?}"
    );
    hooks.ran_once("failover").await;
    let present: std::collections::HashSet<i64> = env
        .cluster
        .psql(new_port, APP_DB, "SELECT k FROM t")
        .expect("read the new primary")
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let lost: Vec<&i64> = acked.iter().filter(|k| !present.contains(k)).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
}

/// A planned switchover: the primary stops (fast), the replica is promoted, the old
/// primary comes back as its replica. Clients between transactions see no error:
/// their writes wait for the new primary. A client inside a transaction on the old
/// primary has lost it: its connection ends with the server's FATAL 57P01.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_switchover_costs_clients_between_transactions_nothing() {
    let hooks = Hooks::new();
    let options = EnvOptions {
        weights: vec![0.0, 1.0],
        ..hooks.options(1, &["failback"])
    };
    let env = start(options).await;
    create_table(&env).await;
    let shared = env.relay.shared.clone();
    let (old_port, new_port) = (env.cluster.primary_port(), env.cluster.replica_ports()[0]);

    let mut idle = Vec::new();
    for i in 0..6i64 {
        let client = env.client().await;
        client
            .execute("INSERT INTO t (k) VALUES ($1)", &[&i])
            .await
            .expect("first write");
        idle.push(client);
    }
    let (in_transaction, in_transaction_end) =
        connect_watched(&env.app_config()).await.expect("connect");
    in_transaction
        .batch_execute("BEGIN; INSERT INTO t (k) VALUES (100)")
        .await
        .expect("open a transaction");
    let mut load = Load::new();
    load.readers(&env, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    env.cluster
        .stop_node(old_port, "fast")
        .expect("stop the primary");
    let stopped_at = Instant::now();
    // Clients between transactions write now: there is no primary, so they wait.
    let writes: Vec<_> = idle
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            tokio::spawn(async move {
                let key = 1_000 + i as i64;
                let result = client
                    .execute("INSERT INTO t (k) VALUES ($1)", &[&key])
                    .await;
                (result.map_err(|e| e.to_string()), Instant::now(), client)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let promoting_at = Instant::now();
    blocking({
        let cluster_port = new_port;
        let shell = env.cluster.shell_command("pg_ctl");
        let dir = env.cluster.data_dir(cluster_port).expect("dir");
        move || {
            let status = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("{shell} promote -w -D '{}'", dir.display()))
                .status()
                .expect("pg_ctl promote");
            assert!(status.success());
        }
    })
    .await;
    let mut held = Duration::ZERO;
    let mut clients = Vec::new();
    for write in writes {
        let (result, done_at, client) = write.await.expect("write task");
        assert!(
            result.is_ok(),
            "a client between transactions saw {result:?}"
        );
        assert!(
            done_at >= promoting_at,
            "the write waited for the new primary"
        );
        held = held.max(done_at - stopped_at);
        clients.push(client);
    }
    assert_eq!(
        shared.cluster.load().primary,
        Some(1),
        "the promoted replica is the primary"
    );

    // The client that was inside a transaction lost it: as directly, its connection
    // ended with the server's FATAL 57P01, and its COMMIT cannot run anywhere.
    let end = tokio::time::timeout(Duration::from_secs(5), in_transaction_end)
        .await
        .expect("the connection ended")
        .expect("connection task");
    let err = end.expect_err("it ended with the server's FATAL");
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err:?}");
    assert!(in_transaction.is_closed());
    let err = in_transaction
        .batch_execute("COMMIT")
        .await
        .expect_err("its transaction is gone");
    assert!(err.is_closed(), "{err:?}");
    // A new connection works, and only the write after the switchover exists.
    let reconnected = env.client().await;
    reconnected
        .batch_execute("INSERT INTO t (k) VALUES (101)")
        .await
        .expect("a new connection writes");
    let committed =
        simple_value(&reconnected, "SELECT count(*) FROM t WHERE k IN (100, 101)").await;
    assert_eq!(committed, "1", "only the write after the switchover exists");

    // The old primary comes back as a replica of the new one: it fails back.
    env.cluster
        .make_standby_of(old_port, new_port)
        .expect("demote");
    env.cluster
        .start_node(old_port)
        .expect("restart as a replica");
    wait_for(
        "the old primary back in service",
        Duration::from_secs(20),
        || {
            let t = shared.cluster.load();
            t.nodes[0].status == Status::Up && t.nodes[0].upstream.is_some()
        },
    )
    .await;
    let failback = hooks.ran_once("failback").await;
    assert!(
        failback.starts_with(&format!("0 127.0.0.1 {old_port} ")),
        "{failback}"
    );
    let seen = load.finish().await;
    let read_errors: usize = seen.iter().map(|s| s.errors.len()).sum();
    assert_eq!(read_errors, 0, "reads failed during the switchover");
    for client in &clients {
        client
            .execute("INSERT INTO t (k) SELECT max(k) + 1 FROM t", &[])
            .await
            .expect("writes after the switchover");
    }
    eprintln!(
        "switchover: writes held at most {held:?} (promotion began {:?} after the stop)",
        promoting_at - stopped_at
    );
}

/// A replica dies (failover_command runs once, reads move to the primary without
/// errors) and comes back (failback_command once, reads return to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_dies_and_comes_back_fails_over_and_back_once() {
    let hooks = Hooks::new();
    let env = start(hooks.options(1, &["failover", "failback"])).await;
    create_table(&env).await;
    let shared = env.relay.shared.clone();
    let replica_port = env.cluster.replica_ports()[0];
    let primary_port = env.cluster.primary_port();
    wait_for("replica readable", Duration::from_secs(10), || {
        shared.cluster.load().nodes[1].readable
    })
    .await;
    let mut load = Load::new();
    load.readers(&env, 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.cluster
        .stop_node(replica_port, "immediate")
        .expect("kill the replica");
    wait_for("replica down", Duration::from_secs(10), || {
        shared.cluster.load().nodes[1].status == Status::Down
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dir = |node: usize| shared.cluster.load().nodes[node].data_directory.clone();
    assert_eq!(
        hooks.log("failover"),
        [format!(
            "1 127.0.0.1 {replica_port} {} 0 127.0.0.1 0 0 {primary_port} {} 127.0.0.1 {primary_port} %",
            dir(1),
            dir(0)
        )],
        "failover_command once, for node 1, the primary staying main"
    );
    let reads_before = shared.cluster.load().nodes[1]
        .stats
        .selects
        .load(Ordering::Relaxed);
    env.cluster
        .start_node(replica_port)
        .expect("restart the replica");
    wait_for("replica back", Duration::from_secs(20), || {
        let t = shared.cluster.load();
        t.nodes[1].status == Status::Up && t.nodes[1].readable
    })
    .await;
    wait_for(
        "reads on the replica again",
        Duration::from_secs(10),
        || {
            shared.cluster.load().nodes[1]
                .stats
                .selects
                .load(Ordering::Relaxed)
                > reads_before + 10
        },
    )
    .await;
    let seen = load.finish().await;
    let errors: Vec<&String> = seen
        .iter()
        .flat_map(|s| s.errors.iter().map(|(_, c)| c))
        .collect();
    // A read in flight on the replica when it was killed may fail; nothing else.
    assert!(errors.len() <= 3, "{errors:?}");
    let failback = hooks.ran_once("failback").await;
    assert!(
        failback.starts_with(&format!("1 127.0.0.1 {replica_port} ")),
        "{failback}"
    );
    assert_eq!(hooks.log("failover").len(), 1, "no second failover");
}

/// A replica restarted quickly, again and again, never stays down long enough to be
/// declared down: no hook runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_replica_runs_no_hooks() {
    let hooks = Hooks::new();
    let (failover, failback) = (hooks.command("failover"), hooks.command("failback"));
    let options = EnvOptions {
        replicas: 1,
        sections: vec![
            // Down only after 10 retries 300 ms apart: a restart is far quicker.
            "[health_check]\nperiod = \"200ms\"\ntimeout = \"1s\"\nmax_retries = 10\n\
             retry_delay = \"300ms\""
                .to_owned(),
            format!("[failover]\nfailover_command = {failover:?}\nfailback_command = {failback:?}"),
        ],
        ..EnvOptions::default()
    };
    let env = start(options).await;
    let shared = env.relay.shared.clone();
    let replica_port = env.cluster.replica_ports()[0];
    for _ in 0..4 {
        env.cluster
            .stop_node(replica_port, "immediate")
            .expect("stop");
        tokio::time::sleep(Duration::from_millis(300)).await;
        env.cluster.start_node(replica_port).expect("start");
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(shared.cluster.load().nodes[1].status, Status::Up);
    assert!(hooks.log("failover").is_empty());
    assert!(hooks.log("failback").is_empty());
    assert!(shared.hooks.records().is_empty());
}

/// A replica promoted behind pgrelay's back: two primaries. The newer timeline wins,
/// the old primary is detached as a false primary, and writes go to the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_the_newest_timeline_wins() {
    let hooks = Hooks::new();
    let env = start(hooks.options(1, &["failover"])).await;
    create_table(&env).await;
    let shared = env.relay.shared.clone();
    let (old_port, new_port) = (env.cluster.primary_port(), env.cluster.replica_ports()[0]);
    let client = env.client().await;
    env.cluster
        .promote(new_port)
        .expect("promote behind pgrelay's back");
    wait_for("the new primary", Duration::from_secs(10), || {
        shared.cluster.load().primary == Some(1)
    })
    .await;
    let t = shared.cluster.snapshot();
    assert_eq!(
        t.nodes[0].status,
        Status::Down,
        "the false primary is detached"
    );
    assert!(t.nodes[0].pg_up, "though it still answers");
    assert_eq!(t.nodes[1].timeline, Some(2));
    client
        .execute("INSERT INTO t (k) VALUES (7)", &[])
        .await
        .expect("write after the split brain");
    let on_new = env
        .cluster
        .psql(new_port, APP_DB, "SELECT count(*) FROM t")
        .expect("new");
    let on_old = env
        .cluster
        .psql(old_port, APP_DB, "SELECT count(*) FROM t")
        .expect("old");
    assert_eq!((on_new.as_str(), on_old.as_str()), ("1", "0"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lines = hooks.log("failover");
    assert_eq!(
        lines.len(),
        1,
        "one failover_command, for the false primary: {lines:?}"
    );
    assert!(lines[0].starts_with(&format!("0 127.0.0.1 {old_port} ")));
}

/// Two primaries on the same timeline (two unrelated servers): writes go to neither,
/// wait out `hold_timeout` and fail; an operator's PROMOTE NODE settles it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_on_one_timeline_waits_for_an_operator() {
    let env = start(EnvOptions::default()).await;
    let second = blocking(|| {
        pgrelay::demo::LocalCluster::start(&pgrelay::demo::ClusterOptions {
            replicas: 0,
            host_auth: "scram-sha-256".into(),
            users: vec![(APP_USER.into(), APP_PASSWORD.into())],
            databases: vec![(APP_DB.into(), APP_USER.into())],
            extra_conf: Vec::new(),
        })
        .expect("second cluster")
    })
    .await;
    let options = EnvOptions {
        sections: vec![
            "[health_check]\nperiod = \"300ms\"\nretry_delay = \"200ms\"".to_owned(),
            "[failover]\nhold_timeout = \"1s\"".to_owned(),
        ],
        ..EnvOptions::default()
    };
    let relay = start_relay(
        &options,
        &[env.cluster.primary_port(), second.primary_port()],
    )
    .await;
    assert_eq!(relay.shared.cluster.load().primary, None, "no authority");
    let conn = relay_conn_string(relay.addrs[0], APP_USER, APP_PASSWORD, APP_DB);
    let started = Instant::now();
    let refused = connect_str(&conn).await.map(drop);
    let err = refused.expect_err("no primary, nothing readable: the login waits, then fails");
    assert_eq!(sqlstate(&err).as_deref(), Some("08006"), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    relay
        .shared
        .operate(Operation::Promote {
            node: 1,
            switchover: false,
        })
        .expect("promote node 1");
    let client = connect_str(&conn)
        .await
        .expect("connect after the operator chose");
    let port = simple_value(&client, "SELECT current_setting('port')").await;
    assert_eq!(port, second.primary_port().to_string());
    assert!(relay
        .shared
        .hooks
        .records()
        .iter()
        .all(|r| r.kind != HookKind::Failover));
}

/// An operator's PROMOTE NODE ... SWITCHOVER: the primary is detached, the
/// failover_command promotes the chosen node, writes wait and then land there, and
/// the other replica is told to follow it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_switchover_promotes_through_the_failover_command() {
    let hooks = Hooks::new();
    let env = start(hooks.options(2, &["failover", "follow_primary"])).await;
    hooks.promote_with("failover", &env.cluster.shell_command("pg_ctl"));
    create_table(&env).await;
    let shared = env.relay.shared.clone();
    let client = env.client().await;
    client
        .execute("INSERT INTO t (k) VALUES (1)", &[])
        .await
        .expect("write before");
    let target = 2;
    // A planned switchover waits for the target to have everything (the harness
    // replicates asynchronously).
    let port = env.cluster.ports()[target];
    let caught_up = eventually(Duration::from_secs(10), || async {
        env.cluster
            .psql(port, APP_DB, "SELECT count(*) FROM t")
            .is_ok_and(|n| n == "1")
    })
    .await;
    assert!(caught_up, "node {target} replays the first write");
    shared
        .operate(Operation::Promote {
            node: target,
            switchover: true,
        })
        .expect("promote");
    let began = Instant::now();
    client
        .execute("INSERT INTO t (k) VALUES (2)", &[])
        .await
        .expect("the write waits for the promotion, then runs");
    let waited = began.elapsed();
    assert_eq!(shared.cluster.load().primary, Some(target));
    let on_target = env
        .cluster
        .psql(
            port,
            APP_DB,
            "SELECT string_agg(k::text, ',' ORDER BY k) FROM t",
        )
        .expect("target");
    assert_eq!(on_target, "1,2");
    let lines = hooks.log("failover");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!("0 127.0.0.1 {} ", env.cluster.primary_port())),
        "{lines:?}"
    );
    assert!(
        lines[0].contains(&format!(" {target} 127.0.0.1 0 0 {port} ")),
        "%m is the node to promote: {lines:?}"
    );
    let follow = hooks.ran_once("follow_primary").await;
    assert!(follow.starts_with("1 127.0.0.1 "), "{follow}");
    // The detached old primary stays out, though it still answers.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = shared.cluster.load();
    assert_eq!(t.nodes[0].status, Status::Down);
    assert!(t.nodes[0].pg_up);
    eprintln!("operator switchover: the write waited {waited:?}");
}

/// `recheck_on_backend_error`: with health checks an hour apart, a client that cannot
/// reach the primary has it checked at once (down within a second); with the setting
/// off, the node stays up until its next period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_error_has_the_node_checked_at_once() {
    let checks = |recheck: bool| EnvOptions {
        sections: vec![
            format!(
                "[health_check]\nperiod = \"1h\"\nretry_delay = \"200ms\"\nmax_retries = 2\n\
                 recheck_on_backend_error = {recheck}"
            ),
            "[failover]\nhold_timeout = \"1s\"".to_owned(),
        ],
        ..EnvOptions::default()
    };
    let env = start(checks(true)).await;
    let port = env.cluster.primary_port();
    let quiet = start_relay(&checks(false), &[port]).await;
    let loud_client = env.client().await;
    let quiet_conn = relay_conn_string(quiet.addrs[0], APP_USER, APP_PASSWORD, APP_DB);
    let quiet_client = connect_str(&quiet_conn).await.expect("connect");
    env.cluster.stop_node(port, "immediate").expect("stop");
    let stopped = Instant::now();
    let queries: Vec<_> = [loud_client, quiet_client]
        .into_iter()
        .map(|client| tokio::spawn(async move { client.simple_query("SELECT 1").await.map(drop) }))
        .collect();
    let loud = env.relay.shared.clone();
    wait_for("the node checked and down", Duration::from_secs(3), || {
        loud.cluster.load().nodes[0].status == Status::Down
    })
    .await;
    let down_after = stopped.elapsed();
    for query in queries {
        let err = query.await.expect("query task").expect_err("no server");
        assert_eq!(sqlstate(&err).as_deref(), Some("08006"), "{err:?}");
        assert_clean(&err, port);
    }
    // A login that needs a server (application_name differs from the pool's) is held
    // as long, then refused as cleanly.
    let mut config = env.app_config();
    config.application_name("needs-a-server");
    let started = Instant::now();
    let err = connect_watched(&config)
        .await
        .map(drop)
        .expect_err("no primary to log in to");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "held for the hold_timeout"
    );
    let db = err.as_db_error().expect("a server error");
    assert_eq!(
        (db.severity(), db.code().code()),
        ("FATAL", "08006"),
        "{err:?}"
    );
    assert_clean(&err, port);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        quiet.shared.cluster.load().nodes[0].status,
        Status::Up,
        "without the setting nothing checks before the period"
    );
    eprintln!("recheck_on_backend_error: down {down_after:?} after the stop (period 1h)");
}

/// A client is told the primary is not available, and nothing of how pgrelay reaches it.
fn assert_clean(err: &tokio_postgres::Error, port: u16) {
    let message = err.as_db_error().map(|db| db.message()).unwrap_or_default();
    assert!(
        message.starts_with("the primary server is not available"),
        "{message}"
    );
    for detail in ["127.0.0.1", &port.to_string(), "os error"] {
        assert!(!message.contains(detail), "{message}");
    }
}
