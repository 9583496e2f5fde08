//! `topology = "patroni"` end to end: etcd and two Patroni nodes on loopback (Debian's
//! `etcd-server` and `patroni` packages, which `bash .ci/test` installs), pgrelay told only
//! the Patroni REST URLs, and `patronictl switchover` under load through pgrelay.

mod support;

use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgrelay::cluster::patroni::{fetch, Endpoint, View};
use pgrelay::cluster::{Role, Status};
use pgrelay::config::Config;
use pgrelay::listener::Pgrelay;
use support::*;

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

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
    etcd: Child,
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
        let (client, peer) = (free_port(), free_port());
        let etcd_log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let etcd = Command::new(find("etcd"))
            .args(["--name", "e1", "--data-dir"])
            .arg(dir.path().join("etcd"))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=e1=http://127.0.0.1:{peer}"))
            .stdout(Stdio::null())
            .stderr(etcd_log)
            .spawn()
            .expect("start etcd");
        let mut cluster = PatroniCluster {
            dir,
            etcd,
            members: Vec::new(),
            owner,
        };
        cluster.wait("etcd", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", client)).is_ok()
        });
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
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
    }
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
    tokio::time::sleep(Duration::from_secs(2)).await;
    let began = Instant::now();
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
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("load");
    }
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
    relay.shutdown(Duration::from_secs(5)).await;
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
