//! One failover decision in a fleet (issue 17): three pgrelay processes in front of one
//! cluster (a primary and two streaming replicas, `topology = "static"`), sharing a
//! failover lease in etcd (`failover.lease = "etcd"`, `lease_ttl = "3s"`). Exactly one
//! of them runs `failover_command` when the primary dies under load, and all three
//! send writes to the node it promoted; a holder killed hands the lease over within
//! the TTL; and a holder killed together with the primary still gets the failover run
//! once, by the next holder, from its deferred hooks.
//!
//! The hook is a script that appends `<instance> %d %P %r %R` to a file and promotes
//! `%R` when the failed node was the primary, as Pgpool-II's sample failover script
//! does. Health checks run every 300 ms (down after a probe and two retries 200 ms
//! apart), so a node is called down within about a second.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgrelay::demo::LocalCluster;
use support::etcd::Etcd;
use support::process::RelayProcess;
use support::writer::{self, Seen};
use support::*;

/// The tests each want both cores for three pgrelays, PostgreSQL and etcd.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TTL: Duration = Duration::from_secs(3);
/// `lease_ttl` plus the failure detection time (a period per try, the retry delays, a
/// probe's timeout): the deferral window, past which nothing more can run a hook.
const SETTLE: Duration = Duration::from_millis(3_000 + 3 * 300 + 2 * 200 + 1_000);
const ADMIN_PASSWORD: &str = "admin-secret";

/// One pgrelay process of the fleet; SIGTERM (then SIGKILL) when dropped.
struct Relay {
    instance: u16,
    process: RelayProcess,
    /// Killed (SIGKILL) by the test.
    killed: bool,
    addr: SocketAddr,
}

impl Relay {
    fn spawn(dir: &Path, instance: u16, config: &str) -> Relay {
        let path = dir.join(format!("pgrelay-{instance}.toml"));
        std::fs::write(&path, config).expect("write config");
        let log = dir.join(format!("pgrelay-{instance}.log"));
        let mut process = RelayProcess::spawn(&path, log, &[]);
        let addr = process.addr();
        Relay {
            instance,
            process,
            killed: false,
            addr,
        }
    }

    fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// SIGKILL: no lease revoked, nothing drained.
    fn kill(&mut self) {
        self.process.kill();
        self.killed = true;
    }

    fn app_conn_string(&self) -> String {
        relay_conn_string(self.addr, APP_USER, APP_PASSWORD, APP_DB)
    }

    /// `SHOW LEASE` through the admin console: (held, holder, deferred_hooks).
    async fn lease(&self) -> Option<(bool, String, String)> {
        let console = relay_conn_string(self.addr, "admin", ADMIN_PASSWORD, "pgrelay");
        let client = connect_str(&console).await.ok()?;
        let rows = simple_rows(&client, "SHOW LEASE").await.ok()?;
        let row = rows.first()?;
        let cell = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Some((cell(4) == "true", cell(2), cell(7)))
    }
}

impl Drop for Fleet {
    /// SIGTERM to every pgrelay at once (each revokes its lease and drains for up to
    /// `shutdown_timeout`), rather than one after the other as their own drops would.
    fn drop(&mut self) {
        for relay in self.relays.iter().filter(|relay| !relay.killed) {
            relay.process.send(nix::sys::signal::Signal::SIGTERM);
        }
    }
}

/// Three pgrelays, the cluster, etcd and the hook; dropped in that order.
struct Fleet {
    relays: Vec<Relay>,
    hook_log: PathBuf,
    cluster: LocalCluster,
    etcd: Etcd,
    _dir: tempfile::TempDir,
}

impl Fleet {
    async fn start() -> Fleet {
        let started = Instant::now();
        let dir = tempfile::tempdir().expect("tempdir");
        let etcd = Etcd::start_in(dir.path());
        let cluster = support::app_cluster(2).await;
        let hook_log = dir.path().join("failover.log");
        let script = dir.path().join("failover.sh");
        let pg_ctl = cluster.shell_command("pg_ctl");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$*\" >> '{}'\n\
                 if [ \"$2\" = \"$3\" ]; then {pg_ctl} promote -w -D \"$5\" || exit 7; fi\n",
                hook_log.display()
            ),
        )
        .expect("write the hook");
        create_table(&cluster).await;
        let ports = cluster.ports();
        let dirs: Vec<String> = ports
            .iter()
            .map(|&port| {
                let dir = cluster.data_dir(port).expect("data dir");
                dir.to_string_lossy().into_owned()
            })
            .collect();
        let mut relays = Vec::new();
        for instance in 1..=3u16 {
            let options = relay_options(instance, &script, &etcd);
            let config = config_text_with_dirs(&options, &ports, &dirs);
            let dir = dir.path().to_owned();
            let relay = tokio::task::spawn_blocking(move || Relay::spawn(&dir, instance, &config))
                .await
                .expect("spawn task");
            relays.push(relay);
        }
        println!(
            "etcd, PostgreSQL and three pgrelays up in {:?}",
            started.elapsed()
        );
        Fleet {
            relays,
            hook_log,
            cluster,
            etcd,
            _dir: dir,
        }
    }

    /// Lines of the hook's file: `<instance> %d %P %r %R`.
    fn hook_lines(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(&self.hook_log)
            .unwrap_or_default()
            .lines()
            .map(|line| line.split_whitespace().map(str::to_owned).collect())
            .collect()
    }

    /// The instances (indexes into `relays`, of those still running) that say they
    /// hold the lease.
    async fn holders(&self) -> Vec<usize> {
        let mut holders = Vec::new();
        for (i, relay) in self.relays.iter().enumerate() {
            if !relay.killed && relay.lease().await.is_some_and(|(held, ..)| held) {
                holders.push(i);
            }
        }
        holders
    }

    /// Waits until exactly one running instance holds the lease; returns it.
    async fn one_holder(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let holders = self.holders().await;
            if let [one] = holders[..] {
                return one;
            }
            assert!(
                Instant::now() < deadline,
                "no single holder (holders: {holders:?})\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn logs(&self) -> String {
        self.relays
            .iter()
            .map(|r| format!("== pgrelay {}\n{}", r.instance, tail(&r.log_text())))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn crash(&self, port: u16) {
        self.cluster
            .stop_node(port, "immediate")
            .expect("crash the primary");
    }

    /// Which instance etcd's done-record of the failover of node 0 names
    /// (`/pgrelay/failover/done/failover_command/0`, the default `lease_key`).
    async fn failover_recorded_by(&self) -> Option<u64> {
        use base64::Engine as _;
        let engine = base64::engine::general_purpose::STANDARD;
        let key = engine.encode("/pgrelay/failover/done/failover_command/0");
        let endpoint = pgrelay::config::PatroniEndpoint {
            host: "127.0.0.1".into(),
            port: self.etcd.port,
        };
        let body = format!("{{\"key\": \"{key}\"}}");
        let answer = pgrelay::cluster::http::post_json(
            &endpoint,
            "/v3/kv/range",
            body.as_bytes(),
            Duration::from_secs(5),
        )
        .await
        .expect("read etcd");
        let answer: serde_json::Value = serde_json::from_slice(&answer).expect("JSON");
        let value = engine
            .decode(answer["kvs"][0]["value"].as_str()?)
            .expect("base64");
        let record: serde_json::Value = serde_json::from_slice(&value).expect("a done-record");
        assert!(record["at_unix_ms"].as_u64().is_some(), "{record}");
        record["instance"].as_u64()
    }

    /// An INSERT through `relay` lands on the primary at `port`.
    async fn assert_writes_reach(&self, relay: &Relay, port: u16, key: i64) {
        let client = connect_str(&relay.app_conn_string())
            .await
            .expect("connect through pgrelay");
        let row = client
            .query_one(
                "INSERT INTO t (k) VALUES ($1) RETURNING inet_server_port(), pg_is_in_recovery()",
                &[&key],
            )
            .await
            .unwrap_or_else(|err| panic!("INSERT through pgrelay {}: {err}", relay.instance));
        let (landed, in_recovery): (i32, bool) = (row.get(0), row.get(1));
        assert_eq!(
            (landed, in_recovery),
            (i32::from(port), false),
            "pgrelay {} writes to the promoted node",
            relay.instance
        );
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Instance `instance` of the fleet: its id, the admin console, fast health checks,
/// the hook (told which instance runs it) and the etcd lease.
fn relay_options(instance: u16, script: &Path, etcd: &Etcd) -> EnvOptions {
    let command = format!("sh '{}' {instance} %d %P %r %R", script.display());
    EnvOptions {
        relay_users: vec![
            (APP_USER.into(), APP_PASSWORD.into()),
            ("admin".into(), ADMIN_PASSWORD.into()),
        ],
        top_extra: vec![
            format!("instance_id = {instance}"),
            "admin_users = [\"admin\"]".into(),
        ],
        pool_extra: vec!["shutdown_timeout = \"1s\"".into()],
        sections: vec![
            "[health_check]\nperiod = \"300ms\"\ntimeout = \"1s\"\nmax_retries = 2\n\
             retry_delay = \"200ms\"\nup_after = 2"
                .to_owned(),
            format!(
                "[failover]\nhold_timeout = \"30s\"\nfailover_command = {command:?}\n\
                 lease = \"etcd\"\nlease_endpoints = [{:?}]\nlease_ttl = \"{}s\"",
                etcd.url(),
                TTL.as_secs()
            ),
        ],
        ..EnvOptions::default()
    }
}

/// Creates `t` on the primary and waits until both replicas have it.
async fn create_table(cluster: &LocalCluster) {
    let primary = cluster.primary_port();
    cluster
        .psql(
            primary,
            APP_DB,
            "CREATE TABLE t (k bigint PRIMARY KEY); GRANT ALL ON t TO app",
        )
        .expect("create t");
    for port in cluster.replica_ports() {
        let ok = eventually(Duration::from_secs(20), || async {
            cluster.psql(port, APP_DB, "SELECT count(*) FROM t").is_ok()
        })
        .await;
        assert!(ok, "replica {port} never saw t");
    }
}

/// A client inserting keys `id * 1e6 + n` one by one through `relay`.
async fn writer(
    relay: &Relay,
    id: i64,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let client = connect_str(&relay.app_conn_string())
        .await
        .expect("connect through pgrelay");
    writer::spawn(client, id, stop, Duration::from_millis(50))
}

/// The primary crashes while two writers per pgrelay insert: exactly one instance
/// runs the failover_command, and every pgrelay writes to the node it promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failover_command_for_the_fleet_under_load() {
    let _one = ONE_AT_A_TIME.lock().await;
    let fleet = Fleet::start().await;
    let began = Instant::now();
    let holder = fleet.one_holder(Duration::from_secs(15)).await;
    println!("lease held by instance {}", fleet.relays[holder].instance);

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (i, relay) in fleet.relays.iter().enumerate() {
        for w in 0..2 {
            writers.push(writer(relay, (i * 2 + w + 1) as i64, stop.clone()).await);
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let old_port = fleet.cluster.primary_port();
    tokio::task::block_in_place(|| fleet.crash(old_port));
    let crashed_at = Instant::now();
    // Every writer gets a write through after the crash.
    let resumed = eventually(Duration::from_secs(30), || {
        let all = writers.iter().all(|(seen, _)| {
            let seen = seen.lock().expect("seen");
            seen.oks.last().is_some_and(|&t| t > crashed_at)
        });
        async move { all }
    })
    .await;
    assert!(
        resumed,
        "writes did not resume everywhere\n{}",
        fleet.logs()
    );
    println!(
        "writes resumed through every pgrelay {:?} after the crash",
        crashed_at.elapsed()
    );
    // Nothing may run a hook after the deferral window: count once it is over.
    tokio::time::sleep(
        (crashed_at + SETTLE + Duration::from_secs(1)).saturating_duration_since(Instant::now()),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for (kept, task) in writers {
        task.await.expect("writer");
        seen.push(std::mem::take(&mut *kept.lock().expect("seen")));
    }

    let lines = fleet.hook_lines();
    assert_eq!(
        lines.len(),
        1,
        "one failover_command in the fleet: {lines:?}\n{}",
        fleet.logs()
    );
    let line = &lines[0];
    assert_eq!(&line[1..3], ["0", "0"], "for the old primary: {line:?}");
    let new_port: u16 = line[3].parse().expect("%r");
    assert_ne!(new_port, old_port);
    println!(
        "failover_command ran once, by instance {}, promoting :{new_port}",
        line[0]
    );
    let recorded = fleet.failover_recorded_by().await;
    assert_eq!(
        recorded.map(|i| i.to_string()).as_deref(),
        Some(line[0].as_str()),
        "the runner recorded it done"
    );
    for (i, relay) in fleet.relays.iter().enumerate() {
        fleet
            .assert_writes_reach(relay, new_port, 900_000_000 + i as i64)
            .await;
    }
    // Each writer lost at most the write in flight on the crashed primary; the
    // others waited for the new primary (hold_timeout) and went through.
    for (i, writer) in seen.iter().enumerate() {
        assert!(writer.errors.len() <= 1, "writer {i}: {:?}", writer.errors);
        for (_, code) in &writer.errors {
            assert!(
                ["08006", "57P01", "57P02", "57P03"].contains(&code.as_str()),
                "writer {i}: unexpected error {code}"
            );
        }
    }
    let errors: usize = seen.iter().map(|s| s.errors.len()).sum();
    println!(
        "{errors} failed writes of {} writers; test took {:?}",
        seen.len(),
        began.elapsed()
    );
}

/// A holder killed hands the lease over within the TTL; a holder killed together with
/// the primary leaves its failover to the next holder, which runs it once from its
/// deferred hooks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_hands_over_and_its_failover_still_runs_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut fleet = Fleet::start().await;
    let began = Instant::now();
    let first = fleet.one_holder(Duration::from_secs(15)).await;
    fleet.relays[first].kill();
    let killed_at = Instant::now();
    // etcd lets the key go at most a TTL after the last keepalive (sent before the
    // kill); the others look every TTL / 3. Slack for their round trip: 1 s.
    let handover = TTL + TTL / 3 + Duration::from_secs(1);
    let second = fleet.one_holder(handover).await;
    let took = killed_at.elapsed();
    assert!(took <= handover, "handover took {took:?}");
    println!(
        "instance {} killed; instance {} holds the lease {took:?} later",
        fleet.relays[first].instance, fleet.relays[second].instance
    );
    assert!(
        fleet.hook_lines().is_empty(),
        "no hook ran: {:?}",
        fleet.hook_lines()
    );

    // Now the holder and the primary die together.
    let last = (0..3)
        .find(|&i| i != first && i != second)
        .expect("a third");
    let old_port = fleet.cluster.primary_port();
    fleet.relays[second].kill();
    tokio::task::block_in_place(|| fleet.crash(old_port));
    let crashed_at = Instant::now();
    let ran = eventually(Duration::from_secs(20), || {
        let ran = !fleet.hook_lines().is_empty();
        async move { ran }
    })
    .await;
    assert!(ran, "the failover never ran\n{}", fleet.logs());
    println!(
        "failover_command ran {:?} after the crash",
        crashed_at.elapsed()
    );
    tokio::time::sleep(
        (crashed_at + SETTLE + Duration::from_secs(1)).saturating_duration_since(Instant::now()),
    )
    .await;
    let lines = fleet.hook_lines();
    let survivor = &fleet.relays[last];
    assert_eq!(lines.len(), 1, "once: {lines:?}\n{}", fleet.logs());
    let line = &lines[0];
    assert_eq!(
        line[0],
        survivor.instance.to_string(),
        "run by the new holder: {line:?}"
    );
    assert_eq!(&line[1..3], ["0", "0"], "for the old primary: {line:?}");
    assert!(
        survivor.log_text().contains("running a deferred hook"),
        "run from the deferred hooks\n{}",
        fleet.logs()
    );
    let recorded = fleet.failover_recorded_by().await;
    assert_eq!(
        recorded,
        Some(u64::from(survivor.instance)),
        "recorded done by the survivor"
    );
    let (held, holder, _) = survivor.lease().await.expect("SHOW LEASE");
    assert!(held, "the survivor holds the lease: {holder}");
    let new_port: u16 = line[3].parse().expect("%r");
    fleet
        .assert_writes_reach(survivor, new_port, 910_000_000)
        .await;
    println!("test took {:?}", began.elapsed());
}
