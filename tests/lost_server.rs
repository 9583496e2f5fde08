//! A server lost under a client (`pg_terminate_backend` here), in transaction mode:
//! inside a transaction block the client sees what it sees talking to PostgreSQL
//! directly (the server's FATAL, then a closed connection, so drivers and pools replace
//! it); outside one, the request in flight fails and the session goes on; between
//! transactions the client notices nothing. Other clients are never touched.

mod support;

use std::time::Duration;

use support::*;
use tokio_postgres::Client;

const SECOND: Duration = Duration::from_secs(1);

/// The real server pid behind `client` right now (inside a block, its own server).
async fn server_pid(client: &Client) -> i32 {
    simple_value(client, "SELECT pg_backend_pid()")
        .await
        .parse()
        .expect("pid")
}

/// Terminates backend `pid` and waits until PostgreSQL no longer lists it.
async fn terminate(admin: &Client, pid: i32) {
    let row = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate");
    assert!(row.get::<_, bool>(0), "no backend {pid}");
    assert!(
        backend_gone(admin, pid, 5 * SECOND).await,
        "backend {pid} survived"
    );
}

fn direct_config(env: &TestEnv) -> tokio_postgres::Config {
    format!(
        "host=127.0.0.1 port={} user={APP_USER} password={APP_PASSWORD} dbname={APP_DB}",
        env.cluster.primary_port()
    )
    .parse()
    .expect("config")
}

/// Waits for a watched connection to end; returns the SQLSTATE it ended with.
async fn ended_with(end: ConnectionEnd) -> Option<String> {
    let result = tokio::time::timeout(5 * SECOND, end)
        .await
        .expect("the connection ended")
        .expect("connection task");
    let err = result.expect_err("it ended with an error");
    sqlstate(&err)
}

/// Idle inside a transaction block when its server is terminated: the connection
/// ends with FATAL 57P01 at once, through pgrelay as directly, and stays closed.
/// A client in a transaction of its own on another server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_in_a_transaction_is_closed_with_the_servers_fatal() {
    let env = start(EnvOptions::default()).await;
    let admin = env.direct_superuser().await;
    let bystander = env.client().await;
    bystander.batch_execute("BEGIN").await.expect("BEGIN");
    let bystander_pid = server_pid(&bystander).await;
    for (how, config) in [
        ("directly", direct_config(&env)),
        ("through pgrelay", env.app_config()),
    ] {
        let (client, end) = connect_watched(&config).await.expect("connect");
        client
            .batch_execute("BEGIN; CREATE TEMP TABLE scratch (a int)")
            .await
            .expect("open a transaction");
        let pid = server_pid(&client).await;
        assert_ne!(pid, bystander_pid);
        terminate(&admin, pid).await;
        assert_eq!(ended_with(end).await.as_deref(), Some("57P01"), "{how}");
        assert!(client.is_closed(), "{how}: the connection is closed");
        let err = client
            .batch_execute("COMMIT")
            .await
            .expect_err("nothing to commit on");
        assert!(err.is_closed(), "{how}: {err:?}");
    }
    // In a failed block (ReadyForQuery `E`) too.
    let (client, end) = connect_watched(&env.app_config()).await.expect("connect");
    let err = client
        .batch_execute("BEGIN; SELECT 1/0")
        .await
        .expect_err("division by zero");
    assert_eq!(sqlstate(&err).as_deref(), Some("22012"));
    terminate(&admin, pid_idle_in_aborted(&admin).await).await;
    assert_eq!(ended_with(end).await.as_deref(), Some("57P01"));
    assert!(client.is_closed());

    assert_eq!(server_pid(&bystander).await, bystander_pid);
    bystander.batch_execute("COMMIT").await.expect("COMMIT");
    assert!(!bystander.is_closed());
    let fresh = env.client().await;
    assert_eq!(simple_value(&fresh, "SELECT 'fresh'").await, "fresh");
}

/// A query running inside a block (opened earlier, or by the same request) when its
/// server is terminated: the query fails with 57P01 and the connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_in_a_transaction_fails_with_the_servers_fatal() {
    let env = start(EnvOptions::default()).await;
    let admin = env.direct_superuser().await;
    let bystander = env.client().await;
    // (setup, the statement that runs when the server is terminated)
    let cases = [
        ("BEGIN", "SELECT pg_sleep(10)"),
        ("", "BEGIN; SELECT pg_sleep(11)"),
    ];
    for (setup, sql) in cases {
        let (client, _end) = connect_watched(&env.app_config()).await.expect("connect");
        if !setup.is_empty() {
            let _ = client.batch_execute(setup).await;
        }
        let running = tokio::spawn(async move {
            let result = client.simple_query(sql).await.map(drop);
            (result, client)
        });
        let pid = running_pid(&admin, sql).await;
        terminate(&admin, pid).await;
        let (result, client) = tokio::time::timeout(5 * SECOND, running)
            .await
            .expect("the client heard in time")
            .expect("task");
        let err = result.expect_err("the query fails");
        assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{sql}: {err:?}");
        let closed = eventually(5 * SECOND, || async { client.is_closed() }).await;
        assert!(closed, "{sql}: the connection is closed");
    }
    assert_eq!(simple_value(&bystander, "SELECT 'alive'").await, "alive");
}

/// The app backend idle in an aborted transaction block, once PostgreSQL shows it so
/// (a backend's state reaches pg_stat_activity a moment after its client has the
/// error).
async fn pid_idle_in_aborted(admin: &Client) -> i32 {
    let deadline = tokio::time::Instant::now() + 5 * SECOND;
    loop {
        let rows = admin
            .query(
                "SELECT pid FROM pg_stat_activity \
                 WHERE usename = 'app' AND state = 'idle in transaction (aborted)'",
                &[],
            )
            .await
            .expect("pg_stat_activity");
        if let [row] = rows.as_slice() {
            return row.get(0);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not one backend in an aborted block: {}",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Outside a transaction block, the request in flight fails with the server's code
/// (an ERROR) and the session goes on on another server; between transactions, the
/// termination of the server the client used last goes unnoticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_a_transaction_the_session_goes_on() {
    let env = start(EnvOptions::default()).await;
    let admin = env.direct_superuser().await;
    let (client, end) = connect_watched(&env.app_config()).await.expect("connect");
    let client = std::sync::Arc::new(client);
    let running = {
        let client = client.clone();
        tokio::spawn(async move { client.simple_query("SELECT pg_sleep(10)").await })
    };
    let pid = running_pid(&admin, "SELECT pg_sleep(10)").await;
    terminate(&admin, pid).await;
    let err = running
        .await
        .expect("task")
        .expect_err("the request in flight fails");
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err:?}");
    assert_eq!(simple_value(&client, "SELECT 'goes on'").await, "goes on");

    // Between transactions: the server it used last is back in the pool when killed.
    for _ in 0..3 {
        let last = server_pid(&client).await;
        terminate(&admin, last).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        for _ in 0..5 {
            let now = server_pid(&client).await;
            assert_ne!(now, last, "a dead server was handed out");
        }
        client
            .batch_execute("BEGIN; SELECT 1; COMMIT")
            .await
            .expect("a transaction after the termination");
    }
    assert!(!client.is_closed());
    assert!(!end.is_finished(), "the connection is still open");
}

/// psycopg: a connection whose server is terminated inside a transaction is
/// `broken` (so psycopg_pool replaces it); an autocommit connection between
/// statements notices nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_sees_a_broken_connection_inside_a_transaction() {
    let env = start(EnvOptions::default()).await;
    let relayed = format!(
        "postgresql://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{}/{APP_DB}",
        env.port()
    );
    let direct = format!(
        "postgresql://postgres@127.0.0.1:{}/{APP_DB}",
        env.cluster.primary_port()
    );
    let text = support::needs::run_driver("lost_server.py", &[&relayed, &direct]);
    assert!(text.contains("psycopg lost server ok"), "{text}");
}
