//! Smoke tests for the local PostgreSQL cluster launcher: real PostgreSQL primaries and
//! streaming replicas in temp dirs on free loopback ports.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::kill;
use nix::unistd::Pid;
use pgrelay::demo::{find_bindir, ClusterOptions, DemoError, LocalCluster};

const TIMEOUT: Duration = Duration::from_secs(20);

fn start(replicas: usize) -> LocalCluster {
    let opts = ClusterOptions {
        replicas,
        ..ClusterOptions::default()
    };
    LocalCluster::start(&opts).expect("cluster starts")
}

/// Polls `sql` on `port` until it prints `want`, or panics after `TIMEOUT`.
fn wait_for(cluster: &LocalCluster, port: u16, sql: &str, want: &str) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match cluster.psql(port, "postgres", sql) {
            Ok(out) if out == want => return,
            result if Instant::now() >= deadline => {
                panic!("port {port}: `{sql}` never returned {want:?}; last: {result:?}")
            }
            _ => thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn in_recovery(cluster: &LocalCluster, port: u16) -> String {
    cluster
        .psql(port, "postgres", "SELECT pg_is_in_recovery()")
        .expect("pg_is_in_recovery")
}

#[test]
fn finds_binaries_with_all_programs() {
    let bindir = find_bindir().expect("bindir");
    assert!(bindir.join("pg_basebackup").is_file(), "{bindir:?}");
    assert!(bindir.join("psql").is_file(), "{bindir:?}");
}

#[test]
fn primary_replicates_to_two_replicas() {
    let cluster = start(2);
    let replicas = cluster.replica_ports();
    assert_eq!(replicas.len(), 2);
    assert_eq!(cluster.ports().len(), 3);
    assert_eq!(cluster.ports()[0], cluster.primary_port());
    assert_eq!(cluster.superuser(), "postgres");
    cluster.wait_replicas_streaming(TIMEOUT).expect("streaming");

    let primary = cluster.primary_port();
    cluster
        .psql(
            primary,
            "postgres",
            "CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2)",
        )
        .expect("create table");
    for port in &replicas {
        wait_for(
            &cluster,
            *port,
            "SELECT to_regclass('t') IS NOT NULL AND (SELECT count(*) FROM t) = 2",
            "t",
        );
    }
    assert_eq!(in_recovery(&cluster, primary), "f");
    for port in &replicas {
        assert_eq!(in_recovery(&cluster, *port), "t");
    }
}

#[test]
fn scram_user_needs_the_right_password() {
    let opts = ClusterOptions {
        replicas: 0,
        host_auth: "scram-sha-256".to_owned(),
        users: vec![("alice".to_owned(), "s3cr'et".to_owned())],
        databases: vec![("appdb".to_owned(), "alice".to_owned())],
        ..ClusterOptions::default()
    };
    let cluster = LocalCluster::start(&opts).expect("cluster starts");
    let port = cluster.primary_port();
    let connect = |password: &str| {
        let conn = format!(
            "host=127.0.0.1 port={port} user=alice password='{}' dbname=appdb",
            password.replace('\'', "\\'")
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (client, connection) =
                tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            let row = client.query_one("SELECT current_user::text", &[]).await?;
            Ok::<String, tokio_postgres::Error>(row.get(0))
        })
    };
    assert_eq!(connect("s3cr'et").expect("right password"), "alice");
    let err = connect("wrong").expect_err("wrong password must fail");
    assert_eq!(
        err.as_db_error().map(|db| db.code().code()),
        Some("28P01"),
        "{err:?}"
    );
    let owner = cluster
        .psql(
            port,
            "postgres",
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'appdb'",
        )
        .expect("owner");
    assert_eq!(owner, "alice");
}

#[test]
fn replica_stops_and_starts_again() {
    let cluster = start(1);
    let replica = cluster.replica_ports()[0];
    cluster.stop_node(replica, "fast").expect("stop");
    assert!(cluster.psql(replica, "postgres", "SELECT 1").is_err());
    cluster.start_node(replica).expect("start");
    assert_eq!(
        cluster
            .psql(replica, "postgres", "SELECT 1")
            .expect("select"),
        "1"
    );
    assert_eq!(in_recovery(&cluster, replica), "t");
    cluster
        .wait_replicas_streaming(TIMEOUT)
        .expect("streaming again");
}

#[test]
fn promote_turns_a_replica_into_a_primary() {
    let cluster = start(1);
    let replica = cluster.replica_ports()[0];
    assert_eq!(in_recovery(&cluster, replica), "t");
    cluster.promote(replica).expect("promote");
    assert_eq!(in_recovery(&cluster, replica), "f");
    cluster
        .psql(replica, "postgres", "CREATE TABLE after_promote (id int)")
        .expect("writable after promote");
    // Promoted replicas are not waited for.
    cluster
        .wait_replicas_streaming(TIMEOUT)
        .expect("nothing to wait for");
}

#[test]
fn concurrent_clusters_get_different_ports() {
    let handles: Vec<_> = (0..2).map(|_| thread::spawn(|| start(0))).collect();
    let clusters: Vec<LocalCluster> = handles
        .into_iter()
        .map(|handle| handle.join().expect("thread"))
        .collect();
    assert_ne!(clusters[0].primary_port(), clusters[1].primary_port());
    for cluster in &clusters {
        let port = cluster.primary_port();
        let shown = cluster
            .psql(port, "postgres", "SHOW port")
            .expect("show port");
        assert_eq!(shown, port.to_string());
    }
}

/// Whether `pid` runs. A zombie counts as dead: the postmaster is reparented to PID 1,
/// which in some containers reaps lazily.
fn is_alive(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().next());
    !matches!(state, None | Some("Z" | "X"))
}

#[test]
fn drop_stops_servers_and_removes_data() {
    let cluster = start(1);
    let data_dirs: Vec<_> = cluster
        .ports()
        .iter()
        .map(|port| cluster.data_dir(*port).expect("data dir"))
        .collect();
    let pids: Vec<i32> = data_dirs
        .iter()
        .map(|dir| {
            let pid_file = std::fs::read_to_string(dir.join("postmaster.pid")).expect("pid file");
            pid_file
                .lines()
                .next()
                .and_then(|l| l.parse().ok())
                .expect("pid")
        })
        .collect();
    drop(cluster);
    for dir in &data_dirs {
        assert!(!dir.exists(), "{dir:?} still exists");
        let pgrep = Command::new("pgrep")
            .arg("-f")
            .arg(dir)
            .output()
            .expect("pgrep");
        assert!(
            !pgrep.status.success(),
            "processes remain for {dir:?}: {pgrep:?}"
        );
    }
    for pid in pids {
        assert!(!is_alive(pid), "postmaster {pid} still alive");
    }
}

#[test]
fn bad_config_fails_with_the_server_log() {
    let opts = ClusterOptions {
        replicas: 0,
        extra_conf: vec!["shared_buffers = 'bogus'".to_owned()],
        ..ClusterOptions::default()
    };
    let err = LocalCluster::start(&opts).expect_err("bogus setting");
    assert!(matches!(err, DemoError::ServerStart { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("pg_ctl"), "{message}");
    assert!(message.contains("shared_buffers"), "{message}");
}

#[test]
fn stop_is_idempotent() {
    let mut cluster = start(0);
    let data_dir = cluster.data_dir(cluster.primary_port()).expect("data dir");
    cluster.stop();
    cluster.stop();
    assert!(!data_dir.exists());
    assert!(cluster
        .psql(cluster.primary_port(), "postgres", "SELECT 1")
        .is_err());
}
