//! The pids pgrelay gives clients in transaction mode act like pids: a client's own
//! notifications carry its own pid, and `pg_terminate_backend` / `pg_cancel_backend`
//! of such a pid end that client's session (57P01) or cancel its query (57014), while
//! a real server's pid still goes to the server. Real PostgreSQL, a pool of several
//! servers, tokio-postgres, psycopg and asyncpg.

mod support;

use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedReceiver;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client};

use support::{simple_value, sqlstate, start, EnvOptions, TestEnv, APP_DB, APP_USER};

/// Pids pgrelay issues lie above Linux's largest `pid_max`.
const ISSUED_PID_MIN: i32 = 1 << 22;

type Messages = UnboundedReceiver<Result<AsyncMessage, tokio_postgres::Error>>;

fn several_servers() -> EnvOptions {
    EnvOptions {
        pool_size: 4,
        ..EnvOptions::mode("transaction")
    }
}

/// Connects through pgrelay; notifications, and the error that ends the connection,
/// arrive on the returned channel.
async fn connect_observed(env: &TestEnv) -> (Client, Messages) {
    let (client, mut connection) = env
        .app_config()
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect through pgrelay");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            let end = message.is_err();
            let _ = tx.send(message);
            if end {
                break;
            }
        }
    });
    (client, rx)
}

/// The next notification or connection error, within a few seconds.
async fn next_message(messages: &mut Messages) -> Result<AsyncMessage, tokio_postgres::Error> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), messages.recv())
            .await
            .expect("a message in time")
            .expect("the connection task is there");
        if !matches!(message, Ok(AsyncMessage::Notice(_))) {
            return message;
        }
    }
}

/// The pid the client's own notification carries (pgrelay's pid for it); the client
/// listens on `channel` afterwards, which pins it to its server.
async fn own_pid(client: &Client, messages: &mut Messages, channel: &str) -> i32 {
    client
        .batch_execute(&format!("LISTEN {channel}; NOTIFY {channel}, 'me'"))
        .await
        .expect("listen and notify");
    match next_message(messages).await {
        Ok(AsyncMessage::Notification(n)) => {
            assert_eq!((n.channel(), n.payload()), (channel, "me"));
            n.process_id()
        }
        other => panic!("expected the client's own notification, got {other:?}"),
    }
}

/// Waits for the error a query ended with; returns it and how long it took.
async fn query_error(
    query: tokio::task::JoinHandle<
        Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error>,
    >,
) -> (Option<String>, Instant) {
    let result = tokio::time::timeout(Duration::from_secs(8), query)
        .await
        .expect("the query ended in time")
        .expect("query task");
    (
        sqlstate(&result.expect_err("the query was stopped")),
        Instant::now(),
    )
}

/// tokio-postgres: notifications, then a terminate by literal and a cancel by a
/// prepared statement (binary int4), from another pgrelay client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_and_signals_through_tokio_postgres() {
    let env = start(several_servers()).await;
    let (victim, mut victim_messages) = connect_observed(&env).await;
    let pid = own_pid(&victim, &mut victim_messages, "victim").await;
    assert!(pid >= ISSUED_PID_MIN, "an issued pid: {pid}");
    let server_pid: i32 = simple_value(&victim, "SELECT pg_backend_pid()")
        .await
        .parse()
        .expect("pid");
    assert_ne!(pid, server_pid, "the server's own pid is not the client's");
    // Many at once (one read holds several): each one is the client's own.
    victim
        .batch_execute("SELECT pg_notify('victim', i::text) FROM generate_series(1, 500) AS i")
        .await
        .expect("notify many");
    for i in 1..=500 {
        match next_message(&mut victim_messages).await {
            Ok(AsyncMessage::Notification(n)) => {
                assert_eq!(n.payload(), i.to_string());
                assert_eq!(n.process_id(), pid, "notification {i}");
            }
            other => panic!("expected notification {i}, got {other:?}"),
        }
    }

    // Another client's notification keeps its sender's server pid.
    let caller = env.client().await;
    let sender: i32 = caller
        .query_one(
            "SELECT pg_backend_pid() FROM pg_notify('victim', 'you')",
            &[],
        )
        .await
        .expect("notify")
        .get(0);
    match next_message(&mut victim_messages).await {
        Ok(AsyncMessage::Notification(n)) => {
            assert_eq!(n.payload(), "you");
            assert_eq!(n.process_id(), sender, "another sender's pid");
        }
        other => panic!("expected a notification, got {other:?}"),
    }

    // Terminate, with the pid written out (simple protocol).
    let answer = simple_value(&caller, &format!("SELECT pg_terminate_backend({pid})")).await;
    assert_eq!(answer, "t");
    match next_message(&mut victim_messages).await {
        Err(err) => assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err}"),
        other => panic!("expected the connection to end with 57P01, got {other:?}"),
    }
    assert!(victim.simple_query("SELECT 1").await.is_err(), "closed");

    // Cancel, with the pid bound to a prepared statement.
    let (sleeper, mut sleeper_messages) = connect_observed(&env).await;
    let pid = own_pid(&sleeper, &mut sleeper_messages, "sleeper").await;
    sleeper.batch_execute("UNLISTEN *").await.expect("unlisten");
    let sleeper = std::sync::Arc::new(sleeper);
    let sleeping = {
        let sleeper = sleeper.clone();
        tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(10)").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = Instant::now();
    let cancelled: bool = caller
        .query_one("SELECT pg_cancel_backend($1)", &[&pid])
        .await
        .expect("pg_cancel_backend")
        .get(0);
    assert!(cancelled);
    let (code, at) = query_error(sleeping).await;
    assert_eq!(code.as_deref(), Some("57014"));
    assert!(at - asked < Duration::from_secs(3), "cancelled at once");
    assert_eq!(
        simple_value(&sleeper, "SELECT 42").await,
        "42",
        "it goes on"
    );
    assert_eq!(simple_value(&caller, "SELECT 7").await, "7");
}

/// A client terminated in the middle of a query: it is told 57P01 at once, and the
/// query stops on its server too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_in_the_middle_of_a_query() {
    let env = start(several_servers()).await;
    let (victim, mut victim_messages) = connect_observed(&env).await;
    let pid = own_pid(&victim, &mut victim_messages, "busy").await;
    victim.batch_execute("UNLISTEN *").await.expect("unlisten");
    let sleeping = tokio::spawn(async move {
        let result = victim.simple_query("SELECT pg_sleep(10)").await;
        drop(victim);
        result
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let caller = env.client().await;
    let asked = Instant::now();
    // Unnamed statement, bound pid (Parse, Bind, Describe, Execute, Sync at once).
    let rows = caller
        .query_typed("SELECT pg_terminate_backend($1)", &[(&pid, Type::INT4)])
        .await
        .expect("pg_terminate_backend");
    assert!(rows[0].get::<_, bool>(0));
    let (code, at) = query_error(sleeping).await;
    assert_eq!(code.as_deref(), Some("57P01"));
    assert!(at - asked < Duration::from_secs(3), "terminated at once");
    let direct = env.direct_superuser().await;
    let stopped = support::eventually(Duration::from_secs(5), || async {
        simple_value(
            &direct,
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(10)' AND state = 'active'",
        )
        .await
            == "0"
    })
    .await;
    assert!(
        stopped,
        "the terminated client's query stopped on its server"
    );
}

/// Inside a transaction and from a pinned client, a call is answered in its place, and
/// the transaction goes on on its server; in a failed transaction the server refuses
/// it, as it would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_inside_transactions_and_from_pinned_clients() {
    let env = start(several_servers()).await;
    let (victim, mut victim_messages) = connect_observed(&env).await;
    let pid = own_pid(&victim, &mut victim_messages, "victim").await;

    let mut caller = env.client().await;
    let tx = caller.transaction().await.expect("begin");
    let before: i32 = tx
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("before")
        .get(0);
    // A failed statement's transaction refuses the call (the server answers), and
    // the victim is untouched.
    tx.batch_execute("SAVEPOINT s").await.expect("savepoint");
    assert!(tx.batch_execute("SELECT 1 / 0").await.is_err());
    let refused = tx
        .simple_query(&format!("SELECT pg_terminate_backend({pid})"))
        .await
        .expect_err("a failed transaction refuses everything");
    assert_eq!(sqlstate(&refused).as_deref(), Some("25P02"));
    tx.batch_execute("ROLLBACK TO SAVEPOINT s")
        .await
        .expect("rollback to");
    assert_eq!(simple_value(&victim, "SELECT 5").await, "5", "untouched");
    let terminated: bool = tx
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("pg_terminate_backend in a transaction")
        .get(0);
    assert!(terminated);
    let after: i32 = tx
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("after")
        .get(0);
    assert_eq!(before, after, "the transaction stayed on its server");
    tx.commit().await.expect("commit");
    match next_message(&mut victim_messages).await {
        Err(err) => assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err}"),
        other => panic!("expected the connection to end with 57P01, got {other:?}"),
    }

    // A pinned caller (it listens) cancels another client's query.
    let (pinned, mut pinned_messages) = connect_observed(&env).await;
    let pinned_pid = own_pid(&pinned, &mut pinned_messages, "pinned").await;
    let (sleeper, mut sleeper_messages) = connect_observed(&env).await;
    let sleeper_pid = own_pid(&sleeper, &mut sleeper_messages, "sleeper").await;
    let sleeping = tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(10)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = Instant::now();
    let answer = simple_value(&pinned, &format!("SELECT pg_cancel_backend({sleeper_pid})")).await;
    assert_eq!(answer, "t");
    let (code, at) = query_error(sleeping).await;
    assert_eq!(code.as_deref(), Some("57014"));
    assert!(at - asked < Duration::from_secs(3));
    // Still pinned, still told its own pid.
    assert_eq!(
        own_pid(&pinned, &mut pinned_messages, "pinned").await,
        pinned_pid
    );
}

/// A client that terminates itself is told 57P01 at once; a client of another user
/// cannot terminate it (the server answers, as for a pid it does not know).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_oneself_and_other_users() {
    let env = start(EnvOptions {
        server_users: vec![
            (APP_USER.into(), support::APP_PASSWORD.into()),
            ("other".into(), "other-secret".into()),
        ],
        relay_users: vec![
            (APP_USER.into(), support::APP_PASSWORD.into()),
            ("other".into(), "other-secret".into()),
        ],
        ..several_servers()
    })
    .await;
    let (victim, mut victim_messages) = connect_observed(&env).await;
    let pid = own_pid(&victim, &mut victim_messages, "victim").await;
    let other = env
        .connect("other", "other-secret", APP_DB)
        .await
        .expect("connect as another user");
    let answer = simple_value(&other, &format!("SELECT pg_terminate_backend({pid})")).await;
    assert_eq!(answer, "f", "not pgrelay's to do for another user");
    assert_eq!(simple_value(&victim, "SELECT 1").await, "1", "untouched");

    let err = victim
        .simple_query(&format!("SELECT pg_terminate_backend({pid})"))
        .await
        .expect_err("terminated itself");
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err}");
    assert!(victim.simple_query("SELECT 1").await.is_err(), "closed");
}

/// A real server's pid, and a pid nobody has, go to the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_pids_pass_through() {
    let env = start(several_servers()).await;
    let direct = support::connect_str(&format!(
        "host=127.0.0.1 port={} user={APP_USER} password={} dbname={APP_DB}",
        env.cluster.primary_port(),
        support::APP_PASSWORD
    ))
    .await
    .expect("direct connection");
    let direct_pid = simple_value(&direct, "SELECT pg_backend_pid()").await;
    let sleeping = tokio::spawn(async move { direct.simple_query("SELECT pg_sleep(10)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let caller = env.client().await;
    let asked = Instant::now();
    let answer = simple_value(&caller, &format!("SELECT pg_cancel_backend({direct_pid})")).await;
    assert_eq!(answer, "t");
    let (code, at) = query_error(sleeping).await;
    assert_eq!(code.as_deref(), Some("57014"));
    assert!(at - asked < Duration::from_secs(3));
    // Nobody's pid: the server answers, false (with a warning).
    let unknown = ISSUED_PID_MIN + 12345;
    let answer = simple_value(&caller, &format!("SELECT pg_terminate_backend({unknown})")).await;
    assert_eq!(answer, "f");
}

/// psycopg and asyncpg: `Notify.pid` / the listener's pid against the client's own
/// `BackendKeyData` pid, terminate (`conn.broken`) and cancel of another client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_drivers() {
    let env = start(several_servers()).await;
    let url = format!(
        "postgresql://{APP_USER}:{}@127.0.0.1:{}/{APP_DB}",
        support::APP_PASSWORD,
        env.port()
    );
    let text = support::needs::run_driver("pids.py", &[&url]);
    assert!(
        text.contains("psycopg ok") && text.contains("asyncpg ok"),
        "{text}"
    );
}
