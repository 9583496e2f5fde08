//! `topology = "patroni"` end to end: etcd and two Patroni nodes on loopback (Debian's
//! `etcd-server` and `patroni` packages, which `bash .ci/test` installs), pgrelay told only
//! the Patroni REST URLs, and `patronictl switchover` under load through pgrelay.

mod support;

use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgrelay::cluster::patroni::{fetch, View};
use pgrelay::cluster::{Role, Status};
use pgrelay::config::Config;
use pgrelay::config::PatroniEndpoint as Endpoint;
use pgrelay::listener::Pgrelay;
use support::*;

use support::etcd::free_port;

fn find(program: &str) -> PathBuf {
    support::needs::program(program)
}

/// The `postgres` user when running as root (PostgreSQL refuses root).
fn run_as() -> Option<(u32, u32)> {
    let user = nix::unistd::User::from_name("postgres").ok().flatten()?;
    nix::unistd::geteuid()
        .is_root()
        .then(|| (user.uid.as_raw(), user.gid.as_raw()))
}

struct Member {
    name: String,
    pg_port: u16,
    api_port: u16,
    config: PathBuf,
    data_dir: PathBuf,
    child: Option<Child>,
}

/// etcd and the Patroni members; everything is stopped on drop.
struct PatroniCluster {
    dir: tempfile::TempDir,
    /// Stopped (dropped) after the members.
    _etcd: support::etcd::Etcd,
    members: Vec<Member>,
    owner: Option<(u32, u32)>,
}

impl PatroniCluster {
    fn start(names: &[&str]) -> PatroniCluster {
        let dir = tempfile::Builder::new()
            .prefix("pgrelay-patroni-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let owner = run_as();
        if let Some((uid, gid)) = owner {
            chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        }
        let etcd = support::etcd::Etcd::start_in(dir.path());
        let client = etcd.port;
        let mut cluster = PatroniCluster {
            dir,
            _etcd: etcd,
            members: Vec::new(),
            owner,
        };
        let scope = format!("pgrelay{}", std::process::id());
        for name in names {
            let member = cluster.member(name, &scope, client);
            cluster.members.push(member);
        }
        cluster
    }

    fn member(&self, name: &str, scope: &str, etcd: u16) -> Member {
        let (pg_port, api_port) = (free_port(), free_port());
        let base = self.dir.path();
        let data_dir = base.join(name);
        let bindir = pgrelay::demo::find_bindir().expect("PostgreSQL binaries");
        let yaml = format!(
            "scope: {scope}\n\
             namespace: /pgrelay-test/\n\
             name: {name}\n\
             restapi:\n  listen: 127.0.0.1:{api_port}\n  connect_address: 127.0.0.1:{api_port}\n\
             etcd3:\n  hosts: 127.0.0.1:{etcd}\n\
             bootstrap:\n  dcs:\n    ttl: 10\n    loop_wait: 1\n    retry_timeout: 5\n\
             \x20   maximum_lag_on_failover: 10485760\n\
             \x20   postgresql:\n      use_pg_rewind: false\n      parameters:\n\
             \x20       wal_level: replica\n        hot_standby: 'on'\n        max_wal_senders: 10\n\
             \x20       max_replication_slots: 10\n        wal_keep_size: 64MB\n\
             \x20 initdb:\n  - encoding: UTF8\n  - auth: trust\n\
             \x20 pg_hba:\n  - local all all trust\n  - host all all 127.0.0.1/32 trust\n\
             \x20 - host replication all 127.0.0.1/32 trust\n\
             postgresql:\n  listen: 127.0.0.1:{pg_port}\n  connect_address: 127.0.0.1:{pg_port}\n\
             \x20 data_dir: {data}\n  bin_dir: {bin}\n  pgpass: {base}/{name}.pgpass\n\
             \x20 authentication:\n    replication:\n      username: postgres\n\
             \x20   superuser:\n      username: postgres\n\
             \x20 parameters:\n    unix_socket_directories: '{base}'\n    fsync: 'off'\n\
             \x20   max_connections: 100\n",
            data = data_dir.display(),
            bin = bindir.display(),
            base = base.display(),
        );
        let config = base.join(format!("{name}.yml"));
        std::fs::write(&config, yaml).expect("patroni config");
        self.hand_over(&config);
        Member {
            name: name.to_owned(),
            pg_port,
            api_port,
            config,
            data_dir,
            child: None,
        }
    }

    fn hand_over(&self, path: &Path) {
        if let Some((uid, gid)) = self.owner {
            chown(path, Some(uid), Some(gid)).expect("chown");
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(find(program));
        cmd.env("HOME", self.dir.path())
            .current_dir(self.dir.path());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        if let Some((uid, gid)) = self.owner {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    fn start_member(&mut self, index: usize) {
        let log_path = self
            .dir
            .path()
            .join(format!("{}.log", self.members[index].name));
        let log = std::fs::File::create(&log_path).expect("patroni log");
        let child = self
            .command("patroni")
            .arg(&self.members[index].config)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start patroni");
        self.members[index].child = Some(child);
    }

    fn wait(&self, what: &str, timeout: Duration, check: impl Fn() -> bool) {
        let deadline = Instant::now() + timeout;
        while !check() {
            if Instant::now() > deadline {
                let logs: Vec<String> = std::fs::read_dir(self.dir.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                    .map(|e| {
                        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                        let tail: String = text
                            .chars()
                            .rev()
                            .take(2000)
                            .collect::<Vec<_>>()
                            .into_iter()
                            .rev()
                            .collect();
                        format!("== {}\n{tail}", e.path().display())
                    })
                    .collect();
                panic!("timed out waiting for {what}\n{}", logs.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn view(&self) -> Option<View> {
        let endpoint = Endpoint {
            host: "127.0.0.1".into(),
            port: self.members[0].api_port,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        runtime
            .block_on(fetch(&endpoint, Duration::from_secs(2)))
            .ok()
    }

    /// Waits until `leader` leads and every other member streams from it.
    fn wait_settled(&self, leader: &str) {
        let expected = self.members.len();
        self.wait(
            &format!("{leader} leading {expected} members"),
            Duration::from_secs(90),
            || {
                self.view().is_some_and(|v| {
                    v.members.len() == expected
                        && v.members.iter().all(|m| m.serves())
                        && v.members
                            .iter()
                            .any(|m| m.name == leader && m.role == "leader")
                }) && self
                    .psql(
                        self.member_named(leader).pg_port,
                        "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                    )
                    .is_some_and(|n| n == (expected - 1).to_string())
            },
        );
    }

    fn member_named(&self, name: &str) -> &Member {
        self.members
            .iter()
            .find(|m| m.name == name)
            .expect("member")
    }

    fn psql(&self, port: u16, sql: &str) -> Option<String> {
        let out = Command::new(find("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-p", &port.to_string(), "-c", sql])
            .stdin(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    fn switchover(&self, from: &str, to: &str) {
        let out = self
            .command("patronictl")
            .arg("-c")
            .arg(&self.members[0].config)
            .args(["switchover", "--leader", from, "--candidate", to, "--force"])
            .output()
            .expect("patronictl");
        assert!(
            out.status.success(),
            "patronictl switchover failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(child) = member.child.as_mut() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                let deadline = Instant::now() + Duration::from_secs(15);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            if member.data_dir.join("postmaster.pid").exists() {
                let bindir = pgrelay::demo::find_bindir().ok();
                if let Some(bindir) = bindir {
                    let mut stop = Command::new(bindir.join("pg_ctl"));
                    stop.args(["stop", "-m", "immediate", "-D"])
                        .arg(&member.data_dir);
                    if let Some((uid, gid)) = self.owner {
                        use std::os::unix::process::CommandExt;
                        stop.uid(uid).gid(gid);
                    }
                    let _ = stop.stdout(Stdio::null()).stderr(Stdio::null()).status();
                }
            }
        }
    }
}

/// One short session (log in, INSERT, disconnect) started while the cluster changes.
struct Fresh {
    started: Instant,
    done: Instant,
    outcome: Result<(), String>,
}

/// Starts a short write session every `every` until `stop`, each on its own task, so
/// held sessions do not slow the arrivals. Every other one sets `application_name`,
/// so its login needs a server (the pool's defaults do not match).
fn fresh_sessions(
    conn: String,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Fresh>> {
    tokio::spawn(async move {
        let mut running = Vec::new();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let mut config: tokio_postgres::Config = conn.parse().expect("config");
            if n.is_multiple_of(2) {
                config.application_name("fresh");
            }
            running.push(tokio::spawn(async move {
                let started = Instant::now();
                let outcome = fresh_session(&config).await;
                Fresh {
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

async fn fresh_session(config: &tokio_postgres::Config) -> Result<(), String> {
    let describe = |step: &str, err: tokio_postgres::Error| match err.as_db_error() {
        Some(db) => format!(
            "{step}: {} {}: {}",
            db.severity(),
            db.code().code(),
            db.message()
        ),
        None => format!("{step}: {err}"),
    };
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| describe("login", e))?;
    let connection = tokio::spawn(connection);
    let result = client
        .execute("INSERT INTO t DEFAULT VALUES", &[])
        .await
        .map(drop)
        .map_err(|e| describe("insert", e));
    drop(client);
    let _ = connection.await;
    result
}

/// pgbench through pgrelay: every transaction a fresh login (`-C`) and one autocommit
/// UPDATE, `clients` at once for `seconds`, each transaction logged (`-l`) in `dir`.
/// Returns whether it succeeded and what it printed.
fn pgbench(relay: std::net::SocketAddr, dir: &Path, clients: u32, seconds: u32) -> (bool, String) {
    let script = dir.join("update.sql");
    std::fs::write(
        &script,
        "\\set aid random(1, 100000 * :scale)\n\
         UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n",
    )
    .expect("pgbench script");
    let out = Command::new(find("pgbench"))
        .env("PGPASSWORD", APP_PASSWORD)
        .args(["-n", "-C", "-j", "2", "-l", "-f"])
        .arg(&script)
        .arg(format!("--log-prefix={}", dir.join("pgbench").display()))
        .args(["-c", &clients.to_string(), "-T", &seconds.to_string()])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &relay.port().to_string(),
            "-U",
            APP_USER,
            APP_DB,
        ])
        .output()
        .expect("run pgbench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// When pgbench's logged transactions ended (`-l`: `... time_epoch time_us`).
fn pgbench_ends(dir: &Path) -> Vec<std::time::SystemTime> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pgbench."))
        .flat_map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            text.lines()
                .filter_map(|line| {
                    let fields: Vec<u64> = line
                        .split_whitespace()
                        .filter_map(|f| f.parse().ok())
                        .collect();
                    let (&us, &secs) = (fields.get(5)?, fields.get(4)?);
                    Some(
                        std::time::UNIX_EPOCH
                            + Duration::from_secs(secs)
                            + Duration::from_micros(us),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[derive(Default)]
struct Seen {
    oks: Vec<Instant>,
    errors: Vec<(Instant, String)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patronictl_switchover_under_load_through_pgrelay() {
    let mut cluster = tokio::task::spawn_blocking(|| {
        let mut cluster = PatroniCluster::start(&["pg1", "pg2"]);
        cluster.start_member(0);
        cluster.wait("pg1 leading", Duration::from_secs(60), || {
            cluster.view().is_some_and(|v| {
                v.members
                    .iter()
                    .any(|m| m.name == "pg1" && m.role == "leader" && m.serves())
            })
        });
        cluster
    })
    .await
    .expect("start");
    cluster.start_member(1);
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_settled("pg1");
        let leader = cluster.members[0].pg_port;
        for sql in [
            "CREATE ROLE app LOGIN PASSWORD 'app-secret'",
            "CREATE DATABASE app OWNER app",
        ] {
            assert!(cluster.psql(leader, sql).is_some(), "{sql}");
        }
        cluster
    })
    .await
    .expect("settle");
    let create = Command::new(find("psql"))
        .args(["-X", "-q", "-h", "127.0.0.1", "-U", "postgres", "-d", "app", "-p"])
        .arg(cluster.members[0].pg_port.to_string())
        .args(["-c", "CREATE TABLE t (k bigserial PRIMARY KEY, at timestamptz DEFAULT now()); ALTER TABLE t OWNER TO app"])
        .status()
        .expect("psql");
    assert!(create.success());

    // pgrelay knows only the Patroni URLs: both members come from /cluster.
    let urls: Vec<String> = cluster
        .members
        .iter()
        .map(|m| format!("\"http://127.0.0.1:{}\"", m.api_port))
        .collect();
    let options = EnvOptions {
        server_auth: "trust",
        sections: vec![
            "[health_check]\nperiod = \"300ms\"\ntimeout = \"1s\"\nmax_retries = 2\n\
             retry_delay = \"200ms\""
                .to_owned(),
            format!(
                "[failover]\ntopology = \"patroni\"\npatroni_urls = [{}]\npatroni_period = \"300ms\"\n\
                 hold_timeout = \"60s\"",
                urls.join(", ")
            ),
        ],
        ..EnvOptions::default()
    };
    let config = Config::from_toml_str(&config_text(&options, &[])).expect("config");
    assert!(config.backends.is_empty());
    let relay = Pgrelay::start(config).await.expect("pgrelay");
    let shared = relay.shared.clone();
    let node_of = |port: u16| shared.cluster.load().find("127.0.0.1", port);
    let (pg1, pg2) = (cluster.members[0].pg_port, cluster.members[1].pg_port);
    assert_eq!(shared.cluster.load().nodes.len(), 2, "members discovered");
    assert_eq!(shared.cluster.load().primary, node_of(pg1));
    let conn = relay_conn_string(relay.addrs[0], APP_USER, APP_PASSWORD, APP_DB);
    let bench_dir = tempfile::tempdir().expect("tempdir");
    let relay_addr = relay.addrs[0];
    let bench_path = bench_dir.path().to_owned();
    let init = tokio::task::spawn_blocking(move || {
        Command::new(find("pgbench"))
            .env("PGPASSWORD", APP_PASSWORD)
            .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1"])
            .args(["-p", &relay_addr.port().to_string(), "-U", APP_USER, APP_DB])
            .output()
            .expect("pgbench -i")
    })
    .await
    .expect("pgbench -i");
    assert!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let mut seen = Vec::new();
    for i in 0..6 {
        let client = connect_str(&conn).await.expect("connect");
        let (stop, log) = (stop.clone(), Arc::new(Mutex::new(Seen::default())));
        seen.push(log.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let result = if i < 4 {
                    client
                        .execute("INSERT INTO t DEFAULT VALUES", &[])
                        .await
                        .map(drop)
                } else {
                    client
                        .simple_query("SELECT count(*) FROM t")
                        .await
                        .map(drop)
                };
                {
                    let mut log = log.lock().expect("log");
                    match result {
                        Ok(()) => log.oks.push(Instant::now()),
                        Err(err) => {
                            let code = sqlstate(&err).unwrap_or_else(|| err.to_string());
                            log.errors.push((Instant::now(), code));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    // Fresh write sessions, about 18 a second, and pgbench logging in afresh for
    // every transaction, across the switchover.
    let fresh = fresh_sessions(conn.clone(), Duration::from_millis(55), stop.clone());
    let bench = tokio::task::spawn_blocking(move || pgbench(relay_addr, &bench_path, 4, 10));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let began = Instant::now();
    let began_wall = std::time::SystemTime::now();
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.switchover("pg1", "pg2");
        cluster
    })
    .await
    .expect("switchover");
    let returned = began.elapsed();
    let ok = eventually(Duration::from_secs(60), || async {
        let t = shared.cluster.load();
        t.primary.is_some() && t.primary == node_of(pg2)
    })
    .await;
    assert!(ok, "pgrelay follows Patroni's new leader");
    // Kept to the end: dropping it stops Patroni and etcd.
    let _cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_settled("pg2");
        cluster
    })
    .await
    .expect("settle");
    let ok = eventually(Duration::from_secs(30), || async {
        let t = shared.cluster.load();
        node_of(pg1)
            .is_some_and(|n| t.nodes[n].status == Status::Up && t.nodes[n].role == Role::Replica)
    })
    .await;
    assert!(ok, "the old leader serves again, as a replica");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (bench_ok, bench_out) = bench.await.expect("pgbench");
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("load");
    }
    let fresh = fresh.await.expect("fresh sessions");
    let seen: Vec<Seen> = seen
        .into_iter()
        .map(|s| std::mem::take(&mut *s.lock().expect("seen")))
        .collect();
    let errors: Vec<&String> = seen
        .iter()
        .flat_map(|s| s.errors.iter().map(|(_, c)| c))
        .collect();
    // At most the request each client had in flight when the old leader stopped.
    assert!(errors.len() <= seen.len(), "{errors:?}");
    for code in &errors {
        assert!(
            ["57P01", "08006", "57P03"].contains(&code.as_str()),
            "unexpected {code}"
        );
    }
    let writes_after: usize = seen[..4]
        .iter()
        .map(|s| s.oks.iter().filter(|&&t| t > began + returned).count())
        .sum();
    assert!(writes_after > 0, "writes went on after the switchover");
    let pause = seen[..4]
        .iter()
        .flat_map(|s| s.oks.windows(2).map(|w| w[1] - w[0]))
        .max()
        .unwrap_or_default();
    let rows = Command::new(find("psql"))
        .args([
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "app",
            "-p",
        ])
        .arg(pg2.to_string())
        .args(["-c", "SELECT count(*) FROM t"])
        .output()
        .expect("psql");
    eprintln!(
        "patroni: switchover took {returned:?} (patronictl); longest pause between a writer's \
         writes {pause:?}; {} errors in flight ({errors:?}); {} rows on the new leader",
        errors.len(),
        String::from_utf8_lossy(&rows.stdout).trim()
    );
    check_fresh_sessions(&fresh, &seen, began, (pg1, pg2));
    check_pgbench(
        bench_ok,
        &bench_out,
        bench_dir.path(),
        began_wall,
        (pg1, pg2),
    );
    relay.shutdown(Duration::from_secs(5)).await;
}

/// Nothing a client is told names a server's address or an io error.
fn assert_no_internal_detail(text: &str, (pg1, pg2): (u16, u16)) {
    for detail in [pg1.to_string(), pg2.to_string(), "os error".to_owned()] {
        assert!(
            !text.contains(&detail),
            "a client was shown {detail:?}: {text}"
        );
    }
}

/// Fresh sessions across the switchover: none failed at login; a session failed only
/// if its INSERT was in flight when the old leader went away (it started before the
/// first failure any client saw, which is that moment); none that started after that
/// failed.
fn check_fresh_sessions(fresh: &[Fresh], seen: &[Seen], began: Instant, ports: (u16, u16)) {
    let failed: Vec<(&Fresh, &String)> = fresh
        .iter()
        .filter_map(|s| s.outcome.as_ref().err().map(|e| (s, e)))
        .collect();
    for (_, message) in &failed {
        assert_no_internal_detail(message, ports);
        assert!(!message.starts_with("login"), "a login failed: {message}");
    }
    let died_at = seen
        .iter()
        .flat_map(|s| s.errors.iter().map(|(at, _)| *at))
        .chain(failed.iter().map(|(s, _)| s.done))
        .min();
    let after: Vec<&Fresh> = fresh.iter().filter(|s| s.started >= began).collect();
    let failed_after: Vec<&String> = failed
        .iter()
        .filter(|(s, _)| s.started >= began)
        .map(|(_, m)| *m)
        .collect();
    for (session, message) in &failed {
        let in_flight = died_at.is_some_and(|died| session.started <= died);
        assert!(
            in_flight,
            "a session that started after the old leader went away failed: {message}"
        );
    }
    eprintln!(
        "patroni: {} fresh sessions, {} of them started after the switchover began; {} failed \
         ({} of those that started after it began, with a request in flight on the old \
         leader: {failed_after:?})",
        fresh.len(),
        after.len(),
        failed.len(),
        failed_after.len()
    );
    assert!(after.len() > 20, "too few sessions during the switchover");
}

/// pgbench across the switchover: no login refused, nothing internal shown, and
/// transactions logged in and ran after the switchover began.
fn check_pgbench(ok: bool, out: &str, dir: &Path, began: std::time::SystemTime, ports: (u16, u16)) {
    assert_no_internal_detail(out, ports);
    assert!(
        !out.contains("while establishing connection") && !out.contains("connection to database"),
        "a pgbench login failed: {out}"
    );
    for line in out.lines().filter(|l| l.contains("aborted in command")) {
        assert!(
            line.contains("terminating connection") || line.contains("server closed"),
            "only a statement in flight on the old leader may fail: {line}"
        );
    }
    let ends = pgbench_ends(dir);
    let after = ends.iter().filter(|&&t| t > began).count();
    eprintln!(
        "patroni: pgbench {} ({} transactions, {after} of them after the switchover began)",
        if ok {
            "succeeded"
        } else {
            "had a client abort"
        },
        ends.len()
    );
    assert!(
        after > 0,
        "pgbench ran nothing after the switchover began: {out}"
    );
}

/// A machine without etcd is told which package to install and the README's command.
#[test]
#[should_panic(
    expected = "`etcd` is not installed (Debian package `etcd-server`); the README's test \
                command, `bash .ci/test`"
)]
fn a_missing_program_names_its_package_and_the_readme_command() {
    support::needs::program_in("etcd", &[]);
}
