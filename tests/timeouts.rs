//! The session timeouts (issue 15), with PgBouncer's meanings and PostgreSQL's
//! SQLSTATEs, each ending the client with a FATAL it can read:
//! - `query_timeout`: a request its server has not finished answering (57014); the
//!   query is cancelled on the server, which is closed. A pipeline is timed from its
//!   last answer, so many short queries in a row are never cut.
//! - `idle_transaction_timeout`: idle inside a block (25P03); the block rolls back.
//! - `transaction_timeout`: a block open too long, busy or not (25P04).
//! - `client_idle_timeout`: idle between transactions (57P05); a server the client
//!   held goes back to the pool.
//!
//! Each runs in both pool modes; clients that keep working are never touched.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio_postgres::Client;

const SECOND: Duration = Duration::from_secs(1);

fn with_pool_lines(mode: &'static str, lines: &[&str]) -> EnvOptions {
    EnvOptions {
        pool_extra: lines.iter().map(|l| (*l).to_owned()).collect(),
        ..EnvOptions::mode(mode)
    }
}

/// Waits (up to `within`) for a watched connection to end with an error; returns its
/// SQLSTATE and severity.
async fn ended_with(end: ConnectionEnd, within: Duration) -> (String, String) {
    let result = tokio::time::timeout(within, end)
        .await
        .expect("the connection ended in time")
        .expect("connection task");
    let err = result.expect_err("it ended with an error");
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {err:?}"));
    (db.code().code().to_owned(), db.severity().to_owned())
}

/// The error of a request cut by a FATAL: its SQLSTATE and severity.
fn fatal_of(err: &tokio_postgres::Error) -> (String, String) {
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {err:?}"));
    (db.code().code().to_owned(), db.severity().to_owned())
}

/// Runs `SELECT 1` every 300 ms for `span`: a client that keeps working.
async fn keep_busy(client: &Client, span: Duration) {
    let until = Instant::now() + span;
    while Instant::now() < until {
        assert_eq!(simple_value(client, "SELECT 1").await, "1");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Backends of the app user running `sql` right now.
async fn running(admin: &Client, sql: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE usename = 'app' AND state = 'active' AND query = $1",
            &[&sql],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// `query_timeout = 1s`: `pg_sleep(30)` fails with FATAL 57014 after about a second,
/// not 30, and stops running on the server. A pipeline of four 400 ms queries (1.6 s in
/// all) passes: each answer restarts the clock. Another client works meanwhile.
async fn query_timeout(mode: &'static str) {
    let env = start(with_pool_lines(mode, &["query_timeout = \"1s\""])).await;
    let admin = env.direct_superuser().await;

    let piped = env.client().await;
    let sleeps = (0..4).map(|_| piped.simple_query("SELECT pg_sleep(0.4)"));
    let started = Instant::now();
    for answer in futures_util::future::join_all(sleeps).await {
        answer.expect("a pipelined query answered in time");
    }
    assert!(started.elapsed() > 1200 * Duration::from_millis(1));

    let bystander = env.client().await;
    let (client, end) = connect_watched(&env.app_config()).await.expect("connect");
    let started = Instant::now();
    let slow = "SELECT pg_sleep(30)";
    let (answer, ()) = tokio::join!(client.simple_query(slow), keep_busy(&bystander, SECOND));
    let err = answer.expect_err("the query was cut");
    let took = started.elapsed();
    assert_eq!(fatal_of(&err), ("57014".into(), "FATAL".into()), "{err:?}");
    assert!(took < 5 * SECOND, "cut after {took:?}");
    assert!(took >= SECOND, "cut early, after {took:?}");
    let _ = end.await;
    assert!(client.is_closed());
    let stopped = eventually(5 * SECOND, || async { running(&admin, slow).await == 0 }).await;
    assert!(stopped, "{slow} still runs on the server");
    let fresh = env.client().await;
    assert_eq!(simple_value(&fresh, "SELECT 'fresh'").await, "fresh");
}
both_modes!(query_timeout);

/// `idle_transaction_timeout = 1s`: a client silent inside a block is closed with
/// FATAL 25P03 and its insert rolls back; one that keeps working inside its block, and
/// one idle outside any block, stay.
async fn idle_transaction_timeout(mode: &'static str) {
    let env = start(with_pool_lines(
        mode,
        &["idle_transaction_timeout = \"1s\""],
    ))
    .await;
    let setup = env.client().await;
    setup
        .batch_execute("CREATE TABLE idle_tx (a int)")
        .await
        .expect("create table");
    let outside = env.client().await;
    let busy = env.client().await;
    busy.batch_execute("BEGIN").await.expect("BEGIN");

    let (client, end) = connect_watched(&env.app_config()).await.expect("connect");
    client
        .batch_execute("BEGIN; INSERT INTO idle_tx VALUES (1)")
        .await
        .expect("open a block");
    let started = Instant::now();
    let (ended, ()) = tokio::join!(ended_with(end, 5 * SECOND), keep_busy(&busy, 2 * SECOND));
    assert_eq!(ended, ("25P03".into(), "FATAL".into()));
    assert!(started.elapsed() >= SECOND);
    busy.batch_execute("COMMIT")
        .await
        .expect("the busy block goes on");
    assert_eq!(
        simple_value(&outside, "SELECT 'still here'").await,
        "still here"
    );
    assert_eq!(
        simple_value(&setup, "SELECT count(*) FROM idle_tx").await,
        "0",
        "the idle block rolled back"
    );
}
both_modes!(idle_transaction_timeout);

/// `transaction_timeout = 2s`: a block busy with a query every 300 ms is still ended,
/// with FATAL 25P04, about 2 s after it began; a single statement longer than that
/// outside a block is not (`query_timeout` is for those).
async fn transaction_timeout(mode: &'static str) {
    let env = start(with_pool_lines(mode, &["transaction_timeout = \"2s\""])).await;
    let single = env.client().await;
    let answer = single.simple_query("SELECT pg_sleep(2.5)").await;
    answer.expect("a single statement is no block");

    let (client, end) = connect_watched(&env.app_config()).await.expect("connect");
    client.batch_execute("BEGIN").await.expect("BEGIN");
    let started = Instant::now();
    let cut = loop {
        match client.simple_query("SELECT 1").await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            Err(err) => break err,
        }
        assert!(started.elapsed() < 6 * SECOND, "the block was never ended");
    };
    let took = started.elapsed();
    assert!(took >= 2 * SECOND, "ended early, after {took:?}");
    // The FATAL reaches the connection whether or not a query was in flight.
    let ended = match cut.as_db_error() {
        Some(_) => fatal_of(&cut),
        None => ended_with(end, 5 * SECOND).await,
    };
    assert_eq!(ended, ("25P04".into(), "FATAL".into()), "{cut:?}");
}
both_modes!(transaction_timeout);

/// `client_idle_timeout = 1s`: a client silent between transactions is closed with
/// FATAL 57P05; one that keeps working, and one idle inside a block, stay. In session
/// mode the closed client's server goes back to the pool: the next client gets it.
async fn client_idle_timeout(mode: &'static str) {
    let env = start(with_pool_lines(mode, &["client_idle_timeout = \"1s\""])).await;
    let busy = env.client().await;
    let in_block = env.client().await;
    in_block.batch_execute("BEGIN").await.expect("BEGIN");

    let (client, end) = connect_watched(&env.app_config()).await.expect("connect");
    let pid = simple_value(&client, "SELECT pg_backend_pid()").await;
    let started = Instant::now();
    let (ended, ()) = tokio::join!(ended_with(end, 5 * SECOND), keep_busy(&busy, 2 * SECOND));
    assert_eq!(ended, ("57P05".into(), "FATAL".into()));
    assert!(started.elapsed() >= SECOND);
    in_block
        .batch_execute("COMMIT")
        .await
        .expect("idle in a block is not idle between transactions");
    if mode == "session" {
        let next = env.client().await;
        assert_eq!(
            simple_value(&next, "SELECT pg_backend_pid()").await,
            pid,
            "the closed client's server went back to the pool"
        );
    }
}
both_modes!(client_idle_timeout);
