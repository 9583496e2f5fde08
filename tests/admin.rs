//! The admin console, Prometheus metrics, the health endpoints, hot reload and
//! graceful shutdown, against real PostgreSQL, through tokio-postgres and psql.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgrelay::config::Config;
use pgrelay::listener::Pgrelay;
use support::*;
use tokio_postgres::SimpleQueryMessage;

const ADMIN: (&str, &str) = ("admin", "admin-secret");
const WATCHER: (&str, &str) = ("watcher", "watch-secret");

/// Fast health checks, an admin and a stats user.
fn console_options(replicas: usize) -> EnvOptions {
    let mut relay_users = EnvOptions::default().relay_users;
    relay_users.push((ADMIN.0.into(), ADMIN.1.into()));
    relay_users.push((WATCHER.0.into(), WATCHER.1.into()));
    EnvOptions {
        replicas,
        relay_users,
        metrics: true,
        top_extra: vec![
            "admin_users = [\"admin\"]".into(),
            "stats_users = [\"watcher\"]".into(),
        ],
        sections: vec![
            "[health_check]\nperiod = \"300ms\"\ntimeout = \"1s\"\nmax_retries = 1\n\
             retry_delay = \"200ms\""
                .into(),
            "[failover]\nhold_timeout = \"2s\"".into(),
        ],
        ..EnvOptions::default()
    }
}

async fn console(
    addr: std::net::SocketAddr,
    who: (&str, &str),
    db: &str,
) -> tokio_postgres::Client {
    connect_str(&relay_conn_string(addr, who.0, who.1, db))
        .await
        .expect("connect to the console")
}

/// A SHOW result: its column names and its rows as maps.
#[derive(Debug)]
struct Shown {
    columns: Vec<String>,
    rows: Vec<HashMap<String, Option<String>>>,
}

impl Shown {
    fn find(&self, column: &str, value: &str) -> &HashMap<String, Option<String>> {
        self.rows
            .iter()
            .find(|r| r.get(column).cloned().flatten().as_deref() == Some(value))
            .unwrap_or_else(|| panic!("no row with {column} = {value}: {:?}", self.rows))
    }
}

fn cell<'a>(row: &'a HashMap<String, Option<String>>, column: &str) -> &'a str {
    row.get(column)
        .unwrap_or_else(|| panic!("no column {column}"))
        .as_deref()
        .unwrap_or("")
}

fn number(row: &HashMap<String, Option<String>>, column: &str) -> i64 {
    cell(row, column)
        .parse()
        .unwrap_or_else(|_| panic!("{column} = {:?} is no number", cell(row, column)))
}

async fn show(client: &tokio_postgres::Client, what: &str) -> Shown {
    let messages = client
        .simple_query(&format!("SHOW {what}"))
        .await
        .unwrap_or_else(|e| panic!("SHOW {what}: {e}"));
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    for message in messages {
        match message {
            SimpleQueryMessage::RowDescription(desc) => {
                columns = desc.iter().map(|c| c.name().to_owned()).collect();
            }
            SimpleQueryMessage::Row(row) => {
                let map = (0..row.len())
                    .map(|i| {
                        (
                            row.columns()[i].name().to_owned(),
                            row.get(i).map(str::to_owned),
                        )
                    })
                    .collect();
                rows.push(map);
            }
            _ => {}
        }
    }
    Shown { columns, rows }
}

/// The value of the first sample of `series` (name with labels, as printed).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_show_command_answers_with_its_columns_and_what_happened() {
    let env = start(console_options(1)).await;
    let shared = env.relay.shared.clone();
    let ok = eventually(Duration::from_secs(10), || async {
        shared.cluster.load().nodes[1].readable
    })
    .await;
    assert!(ok, "the replica takes reads");
    let app = env.client().await;
    app.batch_execute("CREATE TABLE IF NOT EXISTS t (k int)")
        .await
        .expect("create");
    for i in 0..5 {
        app.execute("INSERT INTO t VALUES ($1)", &[&i])
            .await
            .expect("insert");
    }
    for _ in 0..20 {
        app.simple_query("SELECT 1").await.expect("read");
    }
    let admin = console(env.addr, ADMIN, "pgrelay").await;

    let nodes = show(&admin, "POOL_NODES").await;
    assert_eq!(
        nodes.columns,
        [
            "node_id",
            "hostname",
            "port",
            "status",
            "pg_status",
            "lb_weight",
            "role",
            "pg_role",
            "select_cnt",
            "load_balance_node",
            "replication_delay",
            "replication_state",
            "replication_sync_state",
            "last_status_change"
        ]
    );
    assert_eq!(nodes.rows.len(), 2);
    let (primary, replica) = (nodes.find("node_id", "0"), nodes.find("node_id", "1"));
    assert_eq!(cell(primary, "role"), "primary");
    assert_eq!(cell(replica, "role"), "standby");
    assert_eq!(cell(replica, "pg_role"), "standby");
    assert_eq!(
        (cell(primary, "status"), cell(primary, "pg_status")),
        ("up", "up")
    );
    assert_eq!(
        cell(primary, "port"),
        env.cluster.primary_port().to_string()
    );
    assert_eq!(cell(primary, "lb_weight"), "0.500000");
    assert_eq!(cell(replica, "replication_state"), "streaming");
    let reads = number(primary, "select_cnt") + number(replica, "select_cnt");
    assert!(reads >= 20, "select_cnt counts the reads: {reads}");
    let before = number(replica, "select_cnt");
    // A client that never wrote: its reads need no fence, so half go to the replica.
    let reader = env.client().await;
    for _ in 0..20 {
        reader.simple_query("SELECT 2").await.expect("read");
    }
    let after = show(&admin, "POOL_NODES").await;
    assert!(
        number(after.find("node_id", "1"), "select_cnt") > before,
        "select_cnt grows on the node the reads went to"
    );

    let health = show(&admin, "POOL_HEALTH_CHECK_STATS").await;
    assert_eq!(health.columns.len(), 20);
    assert_eq!(health.columns[6], "total_count");
    let row = health.find("node_id", "0");
    assert!(number(row, "total_count") >= 1);
    assert_eq!(number(row, "fail_count"), 0);
    assert!(!cell(row, "last_successful_health_check").is_empty());

    let backend = show(&admin, "POOL_BACKEND_STATS").await;
    assert_eq!(
        backend.columns[5..9],
        ["select_cnt", "insert_cnt", "update_cnt", "delete_cnt"]
    );
    assert!(number(backend.find("node_id", "0"), "insert_cnt") >= 5);
    assert!(number(backend.find("node_id", "0"), "ddl_cnt") >= 1);

    // A client inside a transaction holds a server.
    let holder = env.client().await;
    holder
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("begin");
    let pools = show(&admin, "POOLS").await;
    assert_eq!(
        pools.columns[..4],
        ["database", "user", "cl_active", "cl_waiting"]
    );
    let row = pools.find("database", APP_DB);
    assert_eq!(cell(row, "user"), APP_USER);
    assert_eq!(number(row, "cl_active"), 1);
    assert!(number(row, "sv_active") >= 1 && number(row, "sv_idle") >= 1);
    assert_eq!(cell(row, "pool_mode"), "transaction");
    let clients = show(&admin, "CLIENTS").await;
    assert_eq!(clients.columns.len(), 19);
    let states: Vec<&str> = clients
        .rows
        .iter()
        .filter(|r| cell(r, "database") == APP_DB)
        .map(|r| cell(r, "state"))
        .collect();
    assert_eq!(
        states.iter().filter(|s| **s == "active").count(),
        1,
        "{states:?}"
    );
    assert_eq!(
        states.iter().filter(|s| **s == "idle").count(),
        2,
        "{states:?}"
    );
    assert!(clients
        .rows
        .iter()
        .any(|r| cell(r, "database") == "pgrelay"));
    let active = clients.find("state", "active");
    assert!(
        !cell(active, "link").is_empty(),
        "an active client links its server"
    );
    holder.batch_execute("COMMIT").await.expect("commit");
    let servers = show(&admin, "SERVERS").await;
    assert!(servers
        .rows
        .iter()
        .any(|r| cell(r, "state") == "idle" && cell(r, "user") == APP_USER));
    assert!(servers.rows.iter().all(|r| cell(r, "type") == "S"));

    let stats = show(&admin, "STATS").await;
    assert_eq!(stats.columns[1], "total_xact_count");
    let row = stats.find("database", APP_DB);
    assert!(number(row, "total_xact_count") >= 40, "{row:?}");
    assert!(number(row, "total_query_count") >= 40);
    assert!(number(row, "total_received") > 0 && number(row, "total_sent") > 0);

    // Percentiles per pool; a transaction of three requests is one transaction and
    // three queries.
    let latency = show(&admin, "LATENCY").await;
    assert_eq!(latency.columns[..3], ["database", "user", "xact_count"]);
    let counts = |t: &Shown| {
        let row = t.find("database", APP_DB);
        assert_eq!(cell(row, "user"), APP_USER);
        (number(row, "xact_count"), number(row, "query_count"))
    };
    let (xacts, queries) = counts(&latency);
    assert!(xacts >= 25 && queries >= xacts, "{:?}", latency.rows);
    let row = latency.find("database", APP_DB);
    for kind in ["xact", "query", "wait"] {
        let p = |q: &str| number(row, &format!("{kind}_{q}_us"));
        assert!(
            p("p50") <= p("p95") && p("p95") <= p("p99"),
            "{kind}: {row:?}"
        );
    }
    assert!(number(row, "xact_p50_us") > 0, "{row:?}");
    let mut app = app;
    let transaction = app.transaction().await.expect("BEGIN");
    transaction.simple_query("SELECT 1").await.expect("read");
    transaction.commit().await.expect("COMMIT");
    let counted = eventually(Duration::from_secs(5), || async {
        counts(&show(&admin, "LATENCY").await) == (xacts + 1, queries + 3)
    })
    .await;
    assert!(counted, "{:?}", show(&admin, "LATENCY").await.rows);

    let databases = show(&admin, "DATABASES").await;
    assert_eq!(
        cell(databases.find("name", APP_DB), "port"),
        env.cluster.primary_port().to_string()
    );
    databases.find("name", "pgrelay");
    databases.find("name", "pgbouncer");
    let users = show(&admin, "USERS").await;
    users.find("name", APP_USER);
    users.find("name", "admin");
    let config = show(&admin, "CONFIG").await;
    assert_eq!(config.columns, ["key", "value", "default", "changeable"]);
    assert_eq!(
        cell(config.find("key", "pool.default_pool_size"), "value"),
        "10"
    );
    assert_eq!(
        cell(config.find("key", "pool.default_pool_size"), "default"),
        "20"
    );
    assert_eq!(cell(config.find("key", "listen"), "changeable"), "no");
    let version = show(&admin, "VERSION").await;
    assert!(cell(&version.rows[0], "version").starts_with("pgrelay "));

    // PgBouncer's name for the console, psql, and the stats user.
    let bouncer = console(env.addr, ADMIN, "pgbouncer").await;
    assert_eq!(show(&bouncer, "POOLS").await.columns[0], "database");
    let out = std::process::Command::new("psql")
        .env("PGPASSWORD", ADMIN.1)
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &env.port().to_string(),
            "-U",
            "admin",
            "-d",
            "pgrelay",
        ])
        .args(["-c", "SHOW POOL_NODES"])
        .output()
        .expect("psql");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("select_cnt") && text.contains("primary"),
        "{text}"
    );
    let watcher = console(env.addr, WATCHER, "pgrelay").await;
    show(&watcher, "STATS").await;
    let err = watcher
        .simple_query("RELOAD")
        .await
        .expect_err("stats user");
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"));
    let err = admin.simple_query("SHOW FDS").await.expect_err("unknown");
    assert_eq!(sqlstate(&err).as_deref(), Some("42601"));
    let err = admin.simple_query("SELECT 1").await.expect_err("unknown");
    assert_eq!(sqlstate(&err).as_deref(), Some("42601"));
    let refused = env.connect(APP_USER, APP_PASSWORD, "pgrelay").await;
    assert_eq!(
        sqlstate(&refused.expect_err("app user")).as_deref(),
        Some("28000")
    );

    // WAIT_CLOSE waits for a server of a detached node that a transaction still uses.
    let on_replica = env.client().await;
    let mut on_replica_node = None;
    for _ in 0..50 {
        on_replica
            .batch_execute("BEGIN READ ONLY")
            .await
            .expect("begin");
        let port = simple_value(&on_replica, "SELECT current_setting('port')").await;
        if port == env.cluster.replica_ports()[0].to_string() {
            on_replica_node = Some(1);
            break;
        }
        on_replica.batch_execute("COMMIT").await.expect("commit");
    }
    assert_eq!(
        on_replica_node,
        Some(1),
        "a read-only transaction lands on the replica"
    );
    admin.simple_query("DETACH NODE 1").await.expect("detach");
    let waiter = console(env.addr, ADMIN, "pgrelay").await;
    let wait_close = tokio::spawn(async move { waiter.simple_query("WAIT_CLOSE").await.map(drop) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !wait_close.is_finished(),
        "WAIT_CLOSE waits for the server in use"
    );
    on_replica.batch_execute("COMMIT").await.expect("commit");
    tokio::time::timeout(Duration::from_secs(5), wait_close)
        .await
        .expect("WAIT_CLOSE returns once the server is closed")
        .expect("task")
        .expect("wait_close");
    admin.simple_query("ATTACH NODE 1").await.expect("attach");

    // The node operations, and a node that stops.
    admin.simple_query("DETACH NODE 1").await.expect("detach");
    assert_eq!(
        cell(
            show(&admin, "POOL_NODES").await.find("node_id", "1"),
            "status"
        ),
        "down"
    );
    admin.simple_query("ATTACH NODE 1").await.expect("attach");
    assert_eq!(
        cell(
            show(&admin, "POOL_NODES").await.find("node_id", "1"),
            "status"
        ),
        "up"
    );
    let err = admin
        .simple_query("ATTACH NODE 9")
        .await
        .expect_err("no node 9");
    assert_eq!(sqlstate(&err).as_deref(), Some("55000"));
    env.cluster
        .stop_node(env.cluster.replica_ports()[0], "immediate")
        .expect("stop the replica");
    let down = eventually(Duration::from_secs(10), || async {
        let nodes = show(&admin, "POOL_NODES").await;
        let row = nodes.find("node_id", "1");
        cell(row, "status") == "down" && cell(row, "pg_status") == "down"
    })
    .await;
    assert!(down, "status turns down after the node is stopped");
}

/// `/metrics` moves with the traffic; `/healthz` answers; `/readyz` follows the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_probes_follow_what_happens() {
    let env = start(console_options(0)).await;
    let addr = env.relay.metrics_addr.expect("metrics listener");
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(http_get(addr, "/nothing").await.0, 404);
    let app = env.client().await;
    for _ in 0..10 {
        app.simple_query("SELECT 1").await.expect("query");
    }
    let writes = "pgrelay_transactions_total{node=\"0\",route=\"write\"}";
    // A transaction is counted as its server goes back, just after the client has
    // its answer: wait for the count to settle.
    let settled = |want: f64| async move {
        eventually(Duration::from_secs(5), || async {
            sample(&http_get(addr, "/metrics").await.1, writes) == want
        })
        .await
    };
    assert!(settled(10.0).await, "ten transactions counted");
    let (status, first) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let before = sample(&first, writes);
    assert!(sample(&first, "pgrelay_client_connections{state=\"idle\"}") >= 1.0);
    assert_eq!(sample(&first, "pgrelay_node_up{node=\"0\"}"), 1.0);
    assert_eq!(sample(&first, "pgrelay_node_primary{node=\"0\"}"), 1.0);
    assert!(sample(&first, "pgrelay_bytes_total{direction=\"sent\"}") > 0.0);
    let pool = "{database=\"app\",user=\"app\"}";
    for histogram in ["transaction_duration", "query_duration", "pool_wait"] {
        let count = format!("pgrelay_{histogram}_seconds_count{pool}");
        assert!(sample(&first, &count) >= 10.0, "{count}");
    }
    assert!(first.contains("pgrelay_pinned_clients 0"));
    for _ in 0..5 {
        app.simple_query("SELECT 1").await.expect("query");
    }
    let _ = app
        .simple_query("SELECT 1/0")
        .await
        .expect_err("division by zero");
    assert!(settled(before + 6.0).await, "six more, the failed one too");
    let (_, second) = http_get(addr, "/metrics").await;
    assert_eq!(
        sample(
            &second,
            "pgrelay_server_connections{node=\"0\",state=\"idle\"}"
        ),
        1.0
    );
    // The primary goes: not ready.
    env.cluster
        .stop_node(env.cluster.primary_port(), "immediate")
        .expect("stop");
    let unready = eventually(Duration::from_secs(10), || async {
        http_get(addr, "/readyz").await.0 == 503
    })
    .await;
    assert!(unready, "/readyz turns 503 without a primary");
    let (_, third) = http_get(addr, "/metrics").await;
    assert_eq!(sample(&third, "pgrelay_node_up{node=\"0\"}"), 0.0);
    assert!(sample(&third, "pgrelay_failovers_total") >= 1.0);
    assert_eq!(http_get(addr, "/healthz").await.0, 200, "still alive");
}

/// Writers that count their errors (there must be none) until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(conn: &str, clients: usize) -> Load {
        let load = Load {
            stop: Arc::default(),
            done: Arc::default(),
            errors: Arc::default(),
            tasks: Vec::new(),
        };
        let mut load = load;
        for _ in 0..clients {
            let client = connect_str(conn).await.expect("connect");
            let (stop, done, errors) = (load.stop.clone(), load.done.clone(), load.errors.clone());
            load.tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match client
                        .batch_execute("BEGIN; SELECT pg_sleep(0.002); COMMIT")
                        .await
                    {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(err) => errors.lock().expect("errors").push(err.to_string()),
                    }
                }
            }));
        }
        load
    }

    async fn progress(&self, at_least: usize, within: Duration) {
        let target = self.done.load(Ordering::Relaxed) + at_least;
        let ok = eventually(within, || async {
            self.done.load(Ordering::Relaxed) >= target
        })
        .await;
        assert!(ok, "the load stalled");
    }

    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("load task");
        }
        let errors = self.errors.lock().expect("errors").clone();
        errors
    }
}

/// PAUSE waits for running transactions and holds new ones; RESUME lets them go; KILL
/// drops a database's clients; all under load, and nothing but KILL causes an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_kill_under_load() {
    let env = start(console_options(0)).await;
    let conn = env.conn_string(APP_USER, APP_PASSWORD, APP_DB);
    let admin = console(env.addr, ADMIN, "pgrelay").await;
    let load = Load::start(&conn, 6).await;
    load.progress(50, Duration::from_secs(10)).await;
    let started = Instant::now();
    admin.simple_query("PAUSE").await.expect("pause");
    let paused_in = started.elapsed();
    let servers_busy = show(&admin, "POOLS").await;
    assert_eq!(
        number(servers_busy.find("database", APP_DB), "sv_active"),
        0,
        "nothing runs"
    );
    let count = load.done.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        load.done.load(Ordering::Relaxed),
        count,
        "no transaction runs while paused"
    );
    let waiting = show(&admin, "POOLS").await;
    assert_eq!(number(waiting.find("database", APP_DB), "cl_waiting"), 6);
    assert_eq!(
        cell(
            show(&admin, "DATABASES").await.find("name", APP_DB),
            "paused"
        ),
        "1"
    );
    admin.simple_query("RESUME").await.expect("resume");
    load.progress(50, Duration::from_secs(10)).await;
    let errors = load.finish().await;
    assert!(errors.is_empty(), "{errors:?}");
    let err = admin
        .simple_query("RESUME")
        .await
        .expect_err("nothing paused");
    assert_eq!(sqlstate(&err).as_deref(), Some("55000"));

    // KILL: the database's clients go, told so as PostgreSQL tells a terminated
    // session (57P01); new ones wait for RESUME.
    let (victim, victim_end) = connect_watched(&env.app_config()).await.expect("connect");
    admin
        .simple_query(&format!("KILL {APP_DB}"))
        .await
        .expect("kill");
    let gone = eventually(Duration::from_secs(5), || async {
        victim.simple_query("SELECT 1").await.is_err()
    })
    .await;
    assert!(gone, "a killed client's connection is closed");
    let end = tokio::time::timeout(Duration::from_secs(5), victim_end)
        .await
        .expect("the killed connection ended")
        .expect("connection task");
    let err = end.expect_err("the killed connection ended with an error");
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err}");
    let newcomer = env.client().await;
    let waited = tokio::time::timeout(
        Duration::from_millis(500),
        newcomer.simple_query("SELECT 1"),
    )
    .await;
    assert!(
        waited.is_err(),
        "a request for a killed database waits for RESUME"
    );
    admin
        .simple_query(&format!("RESUME {APP_DB}"))
        .await
        .expect("resume");
    newcomer
        .simple_query("SELECT 1")
        .await
        .expect("after RESUME");
    admin.simple_query("WAIT_CLOSE").await.expect("wait_close");
    eprintln!("PAUSE returned after {paused_in:?} under 6 busy clients");
}

/// RELOAD under load: a smaller pool, a new replica, and a broken file, with no client
/// error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_pool_size_new_backends_and_keeps_a_broken_file_out() {
    let mut cluster_options = console_options(1);
    cluster_options
        .server_users
        .push(("late".into(), "late-secret".into()));
    let cluster_env = start(cluster_options).await;
    let ports = cluster_env.cluster.ports();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pgrelay.toml");
    let mut options = console_options(1);
    options.pool_size = 8;
    options.metrics = false;
    // Only the primary at first.
    std::fs::write(&path, config_text(&options, &ports[..1])).expect("write config");
    let relay = Pgrelay::start(Config::load(&path).expect("config"))
        .await
        .expect("start");
    relay.reload(&path).expect("remember the path");
    let shared = relay.shared.clone();
    assert_eq!(shared.cluster.load().nodes.len(), 1);
    let conn = relay_conn_string(relay.addrs[0], APP_USER, APP_PASSWORD, APP_DB);
    let admin = console(relay.addrs[0], ADMIN, "pgrelay").await;
    let load = Load::start(&conn, 8).await;
    load.progress(50, Duration::from_secs(10)).await;
    let pool = shared
        .pools
        .all()
        .into_iter()
        .find(|p| p.key.database == APP_DB)
        .expect("pool");
    let opened = pool.counts().1;

    // A smaller pool and the replica, in one reload.
    options.pool_size = 3;
    std::fs::write(&path, config_text(&options, &ports)).expect("write config");
    admin.simple_query("RELOAD").await.expect("reload");
    assert_eq!(shared.config.load().pool.default_pool_size, 3);
    assert_eq!(pool.settings.load().size, 3);
    let shrunk = eventually(Duration::from_secs(10), || async { pool.counts().1 <= 3 }).await;
    assert!(shrunk, "the pool shrinks to 3 servers (had {opened})");
    assert_eq!(
        shared.cluster.load().nodes.len(),
        2,
        "the replica is a node"
    );
    // A client that connects now routes its reads across both nodes.
    let reader = connect_str(&conn).await.expect("connect");
    let reads = eventually(Duration::from_secs(15), || async {
        reader.simple_query("SELECT 1").await.expect("read");
        shared.cluster.load().nodes[1]
            .stats
            .selects
            .load(Ordering::Relaxed)
            > 0
    })
    .await;
    assert!(
        reads,
        "reads reach the replica added by the reload: {:?}",
        shared.cluster.load()
    );
    load.progress(50, Duration::from_secs(10)).await;

    // A user added by a reload logs in; the pools it did not change keep their
    // servers (no server opened after the reload that was not there before).
    let servers = || async {
        let mut pids = std::collections::BTreeSet::new();
        for _ in 0..10 {
            let listed = show(&admin, "SERVERS").await;
            pids.extend(
                listed
                    .rows
                    .iter()
                    .filter(|r| {
                        cell(r, "user") == APP_USER && cell(r, "port") == ports[0].to_string()
                    })
                    .map(|r| cell(r, "remote_pid").to_owned()),
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pids
    };
    let before_reload = servers().await;
    assert!(!before_reload.is_empty());
    let late = relay_conn_string(relay.addrs[0], "late", "late-secret", APP_DB);
    assert!(connect_str(&late).await.is_err(), "not a user yet");
    options
        .relay_users
        .push(("late".into(), "late-secret".into()));
    std::fs::write(&path, config_text(&options, &ports)).expect("write config");
    admin.simple_query("RELOAD").await.expect("reload");
    let after_reload = servers().await;
    assert!(
        after_reload.is_subset(&before_reload),
        "the app pool kept its servers: {before_reload:?} then {after_reload:?}"
    );
    let late = connect_str(&late)
        .await
        .expect("a user added by RELOAD logs in");
    late.simple_query("SELECT 1")
        .await
        .expect("and runs queries");

    // A broken file: refused with its reason, the running config stays.
    std::fs::write(&path, "[pool]\ndefault_pool_size = \"many\"\n").expect("write config");
    let err = admin.simple_query("RELOAD").await.expect_err("broken file");
    assert_eq!(sqlstate(&err).as_deref(), Some("55000"));
    let reason = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(reason.contains("default_pool_size"), "{reason}");
    assert_eq!(shared.config.load().pool.default_pool_size, 3);
    load.progress(50, Duration::from_secs(10)).await;

    // The replica removed again: it takes nothing, its pools close.
    std::fs::write(&path, config_text(&options, &ports[..1])).expect("write config");
    admin.simple_query("RELOAD").await.expect("reload");
    let before = shared.cluster.load().nodes[1]
        .stats
        .selects
        .load(Ordering::Relaxed);
    for _ in 0..20 {
        reader
            .simple_query("SELECT 1")
            .await
            .expect("read after removal");
    }
    load.progress(50, Duration::from_secs(10)).await;
    assert!(!shared.cluster.load().nodes[1].readable);
    assert_eq!(
        shared.cluster.load().nodes[1]
            .stats
            .selects
            .load(Ordering::Relaxed),
        before
    );
    let errors = load.finish().await;
    assert!(errors.is_empty(), "{errors:?}");
    relay.shutdown(Duration::from_secs(5)).await;
}

/// SIGTERM-style shutdown: idle clients are told 57P01 at once, a transaction in
/// progress finishes, then everything closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_transactions_finish_and_closes_idle_clients() {
    let env = start(EnvOptions {
        metrics: true,
        ..console_options(0)
    })
    .await;
    let probes = env.relay.metrics_addr.expect("metrics listener");
    let conn = env.conn_string(APP_USER, APP_PASSWORD, APP_DB);
    let busy = connect_str(&conn).await.expect("connect");
    busy.batch_execute("BEGIN; SELECT 1").await.expect("begin");
    let config: tokio_postgres::Config = conn.parse().expect("config");
    let (idle, idle_end) = connect_watched(&config).await.expect("connect");
    idle.simple_query("SELECT 1")
        .await
        .expect("idle client works");
    let TestEnv { relay, cluster, .. } = env;
    let started = Instant::now();
    let shutdown = tokio::spawn(relay.shutdown(Duration::from_secs(10)));
    let told = tokio::time::timeout(Duration::from_secs(5), idle_end)
        .await
        .expect("the idle client is closed at once")
        .expect("connection task");
    let err = told.expect_err("closed with an error");
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err:?}");
    // Draining: alive (a liveness probe must not kill the pod), not ready.
    assert_eq!(http_get(probes, "/healthz").await.0, 200);
    let (status, body) = http_get(probes, "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "not ready: shutting down\n"));
    busy.batch_execute("INSERT INTO pg_temp.x SELECT 1")
        .await
        .expect_err("no such table: the transaction fails but runs");
    busy.batch_execute("ROLLBACK")
        .await
        .expect("its transaction ends normally");
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("shutdown ends once the transaction is over")
        .expect("shutdown task");
    assert!(started.elapsed() < Duration::from_secs(5));
    let closed = eventually(Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(probes).await.is_err()
    })
    .await;
    assert!(closed, "the probes' listener closes once the drain is over");
    drop(cluster);
}
