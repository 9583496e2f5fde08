//! Read/write routing against a real primary with two streaming replicas: writes and
//! anything that may write reach the primary (a replica would refuse them with 25006),
//! reads spread over replicas by weight, transactions stay on one server, read-only
//! transactions may use a replica, clients read their own writes while replicas lag,
//! and lagging replicas leave the read set until they catch up.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use support::{
    eventually, simple_rows, simple_value, sqlstate, start, start_relay, EnvOptions, TestEnv,
};

const WAIT: Duration = Duration::from_secs(30);

fn routed(mode: &'static str, routing: &[&str], weights: &[f64]) -> EnvOptions {
    EnvOptions {
        replicas: 2,
        routing: routing.iter().map(|s| s.to_string()).collect(),
        weights: weights.to_vec(),
        ..EnvOptions::mode(mode)
    }
}

/// The primary's port and the replicas'.
fn ports(env: &TestEnv) -> (u16, HashSet<u16>) {
    (
        env.cluster.primary_port(),
        env.cluster.replica_ports().into_iter().collect(),
    )
}

/// Waits until pgrelay has measured both replicas and may read from them.
async fn wait_readable(env: &TestEnv) {
    let ready = eventually(WAIT, || async {
        let topology = env.relay.shared.cluster.snapshot();
        topology.primary.is_some() && topology.nodes.iter().all(|n| n.readable)
    })
    .await;
    assert!(ready, "replicas never joined the read set");
}

async fn port_of(client: &tokio_postgres::Client, sql: &str) -> u16 {
    simple_value(client, sql).await.parse().expect("a port")
}

/// How many of `n` reads of `inet_server_port()` each port answered.
async fn read_ports(client: &tokio_postgres::Client, n: usize) -> HashMap<u16, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        *seen
            .entry(port_of(client, "SELECT inet_server_port()").await)
            .or_default() += 1;
    }
    seen
}

/// Waits until every replica has replayed everything the primary has written. The
/// insert position, not the write position: the test clusters run with
/// `synchronous_commit = off`, so a commit may not be written yet when it returns.
async fn wait_caught_up(env: &TestEnv) {
    let target = env.psql_direct(
        env.cluster.primary_port(),
        "SELECT pg_current_wal_insert_lsn()",
    );
    for port in env.cluster.replica_ports() {
        let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{}'", target.trim());
        let caught_up = eventually(WAIT, || {
            let done = env.psql_direct(port, &sql).trim() == "t";
            async move { done }
        })
        .await;
        assert!(caught_up, "replica {port} never caught up");
    }
}

/// Creates `schema` through pgrelay, then waits until both replicas have it and
/// pgrelay reads from them.
async fn with_schema(env: &TestEnv, client: &tokio_postgres::Client, schema: &str) {
    client.batch_execute(schema).await.expect("schema");
    wait_caught_up(env).await;
    wait_readable(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_the_primary_and_reads_spread_by_weight() {
    let env = start(routed(
        "transaction",
        &["read_after_write = \"off\""],
        &[0.0, 1.0, 3.0],
    ))
    .await;
    let (primary, replicas) = ports(&env);
    let client = env.client().await;
    with_schema(&env, &client, "CREATE TABLE t (id int); CREATE SEQUENCE s; \
             CREATE FUNCTION bump() RETURNS int LANGUAGE sql AS 'INSERT INTO t VALUES (7) RETURNING 1'; \
             CREATE FUNCTION quiet() RETURNS int LANGUAGE sql STABLE AS 'SELECT 1'").await;

    // Each would fail with 25006 (read-only transaction) on a replica.
    let writes = [
        "INSERT INTO t VALUES (1)",
        "UPDATE t SET id = id",
        "SELECT * FROM t FOR UPDATE",
        "SELECT * FROM t FOR NO KEY UPDATE",
        "SELECT * FROM t FOR KEY SHARE",
        "WITH x AS (INSERT INTO t VALUES (2) RETURNING id) SELECT * FROM x",
        "SELECT nextval('s')",
        "SELECT bump()",
        "SELECT pg_advisory_xact_lock(1)",
        "DO $$BEGIN INSERT INTO t VALUES (3); END$$",
        "SELECT 1; INSERT INTO t VALUES (4)",
        "SELECT * INTO t2 FROM t; DROP TABLE t2",
        "NOTIFY chan",
        "CREATE TEMP TABLE IF NOT EXISTS tmp (x int); DROP TABLE tmp",
        "/* comment */ delete FROM t WHERE id = 99",
    ];
    for sql in writes {
        for _ in 0..6 {
            client
                .simple_query(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }
    // Reads, answered by a replica.
    for sql in [
        "SELECT inet_server_port()",
        "select inet_server_port() -- FOR UPDATE",
        "SELECT inet_server_port() FROM (SELECT 'INSERT INTO t' AS q) AS x",
        "WITH a AS (SELECT 1) SELECT inet_server_port() FROM a",
        "SELECT inet_server_port() WHERE quiet() = 1",
        "SELECT inet_server_port(); SELECT 2",
    ] {
        for _ in 0..4 {
            let port = port_of(&client, sql).await;
            assert!(replicas.contains(&port), "{sql} ran on {port}");
        }
    }
    // Hints force the primary.
    for sql in [
        "/* pgrelay:primary */ SELECT inet_server_port()",
        "/*NO LOAD BALANCE*/ SELECT inet_server_port()",
    ] {
        assert_eq!(port_of(&client, sql).await, primary, "{sql}");
    }
    // Extended protocol, unnamed statement: routed by its text.
    let row = client
        .query_typed_one("SELECT inet_server_port()::int", &[])
        .await
        .expect("extended read");
    assert!(replicas.contains(&(row.get::<_, i32>(0) as u16)));
    client
        .query_typed("INSERT INTO t VALUES (5)", &[])
        .await
        .expect("extended write");

    // A write pipelined behind a read that went to a replica is routed on its own.
    for _ in 0..20 {
        let (read, write) = tokio::join!(
            client.simple_query("SELECT pg_sleep(0.01), inet_server_port()"),
            client.query_typed("INSERT INTO t VALUES (6)", &[]),
        );
        read.expect("pipelined read");
        write.expect("pipelined write reached the primary");
    }

    // Weights 0 : 1 : 3.
    let seen = read_ports(&client, 800).await;
    assert_eq!(
        seen.get(&primary),
        None,
        "weight 0 takes no reads: {seen:?}"
    );
    let ports = env.cluster.replica_ports();
    let heavy = *seen.get(&ports[1]).unwrap_or(&0) as f64 / 800.0;
    assert!(
        (heavy - 0.75).abs() < 0.07,
        "weight 3 of 4 got {heavy}: {seen:?}"
    );

    // Per-node counters: the primary counted writes, the replicas the reads.
    let topology = env.relay.shared.cluster.snapshot();
    let stats = |i: usize| {
        let s = &topology.nodes[i].stats;
        (
            s.selects.load(std::sync::atomic::Ordering::Relaxed),
            s.writes.load(std::sync::atomic::Ordering::Relaxed),
        )
    };
    assert!(stats(0).1 >= (writes.len() * 6) as u64, "{:?}", stats(0));
    assert!(
        stats(1).0 + stats(2).0 >= 800,
        "{:?} {:?}",
        stats(1),
        stats(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_stay_on_one_server() {
    let env = start(routed(
        "transaction",
        &["read_after_write = \"off\""],
        &[0.0, 1.0, 1.0],
    ))
    .await;
    let (primary, replicas) = ports(&env);
    let client = env.client().await;
    with_schema(&env, &client, "CREATE TABLE t (id int)").await;

    for _ in 0..10 {
        // A transaction of unknown intent runs on the primary, every statement of it.
        client.simple_query("BEGIN").await.expect("begin");
        for _ in 0..3 {
            assert_eq!(port_of(&client, "SELECT inet_server_port()").await, primary);
        }
        client.simple_query("COMMIT").await.expect("commit");

        // A read-only transaction runs on one replica, and writes there fail as they would.
        client.simple_query("BEGIN READ ONLY").await.expect("begin");
        let first = port_of(&client, "SELECT inet_server_port()").await;
        assert!(replicas.contains(&first));
        assert_eq!(port_of(&client, "SELECT inet_server_port()").await, first);
        let err = client
            .simple_query("INSERT INTO t VALUES (1)")
            .await
            .expect_err("write in a read-only transaction");
        assert_eq!(sqlstate(&err).as_deref(), Some("25006"));
        client.simple_query("ROLLBACK").await.expect("rollback");

        let port = port_of(
            &client,
            "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; SELECT inet_server_port()",
        )
        .await;
        assert!(replicas.contains(&port));
        client.simple_query("COMMIT").await.expect("commit");
        let port = port_of(
            &client,
            "BEGIN; SET TRANSACTION READ ONLY; SELECT inet_server_port()",
        )
        .await;
        assert!(replicas.contains(&port));
        client.simple_query("COMMIT").await.expect("commit");
    }
    // tokio-postgres' read-only transaction builder.
    let mut client = client;
    let txn = client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .expect("read-only transaction");
    let port: i32 = txn
        .query_one("SELECT inet_server_port()::int", &[])
        .await
        .expect("read")
        .get(0);
    assert!(replicas.contains(&(port as u16)));
    txn.commit().await.expect("commit");
}

/// 1,000 write-then-read cycles against replicas that apply WAL 300 ms late: with
/// `read_after_write = "lsn"` no read is stale; with "off" (a second pgrelay on the
/// same cluster) reads are stale, which shows the replicas really lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_read_their_own_writes_from_lagging_replicas() {
    let mut options = routed(
        "transaction",
        &["read_after_write = \"lsn\"", "lag_check_period = \"100ms\""],
        &[0.0, 1.0, 1.0],
    );
    options.server_conf = vec!["recovery_min_apply_delay = '300ms'".into()];
    let env = start(options.clone()).await;
    let (_, replicas) = ports(&env);
    let client = env.client().await;
    with_schema(&env, &client, "CREATE TABLE rw (n int)").await;

    let mut stale = 0;
    for i in 1..=1000 {
        client
            .simple_query(&format!("INSERT INTO rw VALUES ({i})"))
            .await
            .expect("write");
        let seen = simple_value(&client, "SELECT COALESCE(max(n), 0) FROM rw").await;
        if seen != i.to_string() {
            stale += 1;
        }
    }
    assert_eq!(stale, 0, "stale reads with read_after_write = lsn");

    // The same cycles without read-your-writes do read stale data.
    options.routing = vec![
        "read_after_write = \"off\"".into(),
        "lag_check_period = \"100ms\"".into(),
    ];
    let careless = start_relay(&options, &env.cluster.ports()).await;
    let other = support::connect_str(&support::relay_conn_string(
        careless.addrs[0],
        support::APP_USER,
        support::APP_PASSWORD,
        support::APP_DB,
    ))
    .await
    .expect("connect");
    let ready = eventually(WAIT, || async {
        careless
            .shared
            .cluster
            .snapshot()
            .nodes
            .iter()
            .all(|n| n.readable)
    })
    .await;
    assert!(ready);
    let mut careless_stale = 0;
    for i in 1001..=1020 {
        other
            .simple_query(&format!("INSERT INTO rw VALUES ({i})"))
            .await
            .expect("write");
        if simple_value(&other, "SELECT COALESCE(max(n), 0) FROM rw").await != i.to_string() {
            careless_stale += 1;
        }
    }
    assert!(
        careless_stale > 10,
        "only {careless_stale} stale reads without lsn"
    );

    // Once the replicas have caught up, this client's reads spread over them again.
    wait_caught_up(&env).await;
    let spread = eventually(WAIT, || async {
        let seen = read_ports(&client, 40).await;
        replicas.iter().all(|p| seen.contains_key(p))
    })
    .await;
    assert!(spread, "reads did not return to the replicas");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_replicas_leave_the_read_set_until_they_catch_up() {
    let env = start(routed(
        "transaction",
        &[
            "read_after_write = \"off\"",
            "lag_check_period = \"100ms\"",
            "max_lag_bytes = 65536",
            "max_lag_seconds = 0",
        ],
        &[1.0, 1.0, 1.0],
    ))
    .await;
    let paused = env.cluster.replica_ports()[0];
    let client = env.client().await;
    wait_readable(&env).await;
    assert!(read_ports(&client, 60).await.contains_key(&paused));

    env.psql_direct(paused, "SELECT pg_wal_replay_pause()");
    client
        .batch_execute("CREATE TABLE big AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 20000) g")
        .await
        .expect("write 2+ MB");
    // The paused replica leaves; the other one replays the write and stays (or returns).
    let left = eventually(WAIT, || async {
        let topology = env.relay.shared.cluster.snapshot();
        !topology.nodes[1].readable && topology.nodes[2].readable
    })
    .await;
    assert!(left, "paused replica stayed in the read set");
    let seen = read_ports(&client, 200).await;
    assert_eq!(
        seen.get(&paused),
        None,
        "read from a paused replica: {seen:?}"
    );
    assert_eq!(seen.len(), 2, "{seen:?}");

    env.psql_direct(paused, "SELECT pg_wal_replay_resume()");
    let back = eventually(WAIT, || async {
        read_ports(&client, 30).await.contains_key(&paused)
    })
    .await;
    assert!(back, "replica never returned to the read set");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_routes_per_statement_and_pins_session_state() {
    let env = start(routed(
        "session",
        &["read_after_write = \"session\""],
        &[0.0, 1.0, 1.0],
    ))
    .await;
    let (primary, replicas) = ports(&env);
    wait_readable(&env).await;

    let client = env.client().await;
    let seen = read_ports(&client, 40).await;
    assert!(seen.keys().all(|p| replicas.contains(p)), "{seen:?}");
    assert_eq!(
        seen.len(),
        2,
        "one server per node, both replicas used: {seen:?}"
    );
    // A named prepared statement runs where it was prepared.
    for _ in 0..10 {
        let statement = client
            .prepare("SELECT inet_server_port()::int")
            .await
            .expect("prepare");
        for _ in 0..3 {
            let port: i32 = client.query_one(&statement, &[]).await.expect("run").get(0);
            assert!(replicas.contains(&(port as u16)));
        }
    }
    // read_after_write = session: after a write, reads stay on the primary.
    client
        .batch_execute("CREATE TABLE s (x int); INSERT INTO s VALUES (1)")
        .await
        .expect("write");
    assert_eq!(
        read_ports(&client, 10).await.keys().collect::<Vec<_>>(),
        [&primary]
    );

    // Session state pins a fresh client to its primary server for good.
    let pinned = env.client().await;
    assert!(replicas.contains(&port_of(&pinned, "SELECT inet_server_port()").await));
    pinned
        .simple_query("SET search_path = public")
        .await
        .expect("set");
    assert_eq!(
        read_ports(&pinned, 10).await.keys().collect::<Vec<_>>(),
        [&primary]
    );
    let rows = simple_rows(&pinned, "SHOW search_path")
        .await
        .expect("show");
    assert_eq!(rows[0][0].as_deref(), Some("public"));
}

/// Requests that end with Flush, pipelined simple queries and COPY TO on a replica,
/// written byte by byte: nothing stalls, and a write pipelined behind a replica read
/// still reaches the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_pipelines_and_copy_on_replicas() {
    use support::raw::{self, message, query, read_message, read_until_ready};
    use tokio::io::AsyncWriteExt;

    let mut options = routed(
        "transaction",
        &["read_after_write = \"off\""],
        &[0.0, 1.0, 1.0],
    );
    options.client_auth = "trust";
    let env = start(options).await;
    let (_, replicas) = ports(&env);
    let client = env.client().await;
    with_schema(&env, &client, "CREATE TABLE t (id int)").await;
    let second = Duration::from_secs(10);

    let mut stream = raw::login_trust(env.addr, support::APP_USER, support::APP_DB).await;
    for _ in 0..10 {
        // Parse + Describe + Flush: answered without ReadyForQuery; Bind + Execute + Sync
        // later run the statement on the same server.
        let mut request = message(b'P', b"\0SELECT inet_server_port()\0\0\0");
        request.extend(message(b'D', b"S\0"));
        request.extend(message(b'H', b""));
        stream.write_all(&request).await.expect("send");
        let mut tags = Vec::new();
        while tags.len() < 3 {
            let m = tokio::time::timeout(second, read_message(&mut stream))
                .await
                .expect("answer to Flush in time")
                .expect("read")
                .expect("open");
            tags.push(m.tag);
        }
        assert_eq!(tags, b"1tT");
        let mut request = message(b'B', b"\0\0\0\0\0\0\0\0");
        request.extend(message(b'E', b"\0\0\0\0\0"));
        request.extend(message(b'S', b""));
        stream.write_all(&request).await.expect("send");
        let answer = read_until_ready(&mut stream, second).await;
        let port: u16 = raw::first_value(&answer)
            .expect("row")
            .parse()
            .expect("port");
        assert!(replicas.contains(&port), "ran on {port}");

        // A read and a write in one write(): the write must not follow the read to a
        // replica (it would fail with 25006).
        let mut both = query("SELECT inet_server_port()");
        both.extend(query("INSERT INTO t VALUES (1)"));
        stream.write_all(&both).await.expect("send");
        let first = read_until_ready(&mut stream, second).await;
        let second_answer = read_until_ready(&mut stream, second).await;
        assert!(first.iter().all(|m| m.tag != b'E'), "{first:?}");
        assert!(
            second_answer.iter().all(|m| m.tag != b'E'),
            "write failed: {second_answer:?}"
        );
    }
    // COPY ... TO STDOUT of a query is a read.
    let out = client
        .copy_out("COPY (SELECT inet_server_port()) TO STDOUT")
        .await
        .expect("copy out");
    futures_util::pin_mut!(out);
    let mut text = Vec::new();
    while let Some(chunk) = futures_util::StreamExt::next(&mut out).await {
        text.extend_from_slice(&chunk.expect("copy data"));
    }
    let port: u16 = String::from_utf8_lossy(&text).trim().parse().expect("port");
    assert!(replicas.contains(&port));
    assert_eq!(
        simple_value(&client, "/* pgrelay:primary */ SELECT count(*) FROM t").await,
        "10"
    );
}

/// Round robin takes the nodes in turn; a reload that turns routing off sends new
/// sessions to the primary, and one that turns it back on spreads them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_and_reloaded_routing() {
    let mut options = routed(
        "transaction",
        &[
            "read_after_write = \"off\"",
            "load_balance = \"round_robin\"",
        ],
        &[1.0, 1.0, 1.0],
    );
    let env = start(options.clone()).await;
    let (primary, _) = ports(&env);
    wait_readable(&env).await;
    let client = env.client().await;
    let seen = read_ports(&client, 90).await;
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.values().all(|&n| n == 30), "{seen:?}");

    let file = tempfile::NamedTempFile::new().expect("temp file");
    let reload = |options: &EnvOptions| {
        std::fs::write(
            file.path(),
            support::config_text(options, &env.cluster.ports()),
        )
        .expect("write config");
        env.relay.reload(file.path()).expect("reload");
    };
    options.routing.push("enabled = false".into());
    reload(&options);
    let off = env.client().await;
    assert_eq!(
        read_ports(&off, 30).await.keys().collect::<Vec<_>>(),
        [&primary]
    );
    options.routing.pop();
    reload(&options);
    let on = env.client().await;
    assert_eq!(read_ports(&on, 30).await.len(), 3);
}
