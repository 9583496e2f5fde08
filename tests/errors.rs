//! What a client is told when pgrelay's side of a session fails: a server nothing
//! answers on, a server that refuses pgrelay's login, a reset that fails. The client
//! gets one of pgrelay's own messages (or the server's own words about the login),
//! never an address, a port or an io error; those are for the log.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// `message` says nothing of how pgrelay reaches its servers.
fn assert_no_internals(message: &str, port: u16) {
    for detail in [
        "127.0.0.1",
        &port.to_string(),
        "os error",
        "Connection refused",
    ] {
        assert!(!message.contains(detail), "{detail:?} in {message:?}");
    }
}

/// A port on loopback that nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// The one backend's port has nothing behind it: the login that needs a server is held
/// for `failover.hold_timeout`, then refused with FATAL 08006 in pgrelay's words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_reported_without_its_address() {
    let port = closed_port();
    let options = EnvOptions {
        sections: vec!["[failover]\nhold_timeout = \"1s\"".to_owned()],
        ..EnvOptions::default()
    };
    let relay = start_relay(&options, &[port]).await;
    let conn = relay_conn_string(relay.addrs[0], APP_USER, APP_PASSWORD, APP_DB);
    let started = Instant::now();
    let err = connect_str(&conn).await.map(drop).expect_err("no server");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "held first"
    );
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!((db.severity(), db.code().code()), ("FATAL", "08006"));
    assert!(
        db.message()
            .starts_with("the primary server is not available"),
        "{}",
        db.message()
    );
    assert_no_internals(db.message(), port);
}

/// pgrelay logs in to the server with a password the server does not accept: the
/// client hears the server's refusal (FATAL 28P01), and nothing of where it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_refusing_the_login_is_reported_without_its_address() {
    let options = EnvOptions {
        relay_users: vec![(APP_USER.into(), "not-the-server-password".into())],
        ..EnvOptions::default()
    };
    let env = start(options).await;
    let conn = relay_conn_string(env.addr, APP_USER, "not-the-server-password", APP_DB);
    let err = connect_str(&conn)
        .await
        .map(drop)
        .expect_err("server refuses");
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!((db.severity(), db.code().code()), ("FATAL", "28P01"));
    assert_eq!(
        db.message(),
        format!("password authentication failed for user \"{APP_USER}\"")
    );
    assert_no_internals(db.message(), env.cluster.primary_port());
    // pgrelay still serves a user whose password the server takes.
    let relay = start_relay(&EnvOptions::default(), &env.cluster.ports()).await;
    let conn = relay_conn_string(relay.addrs[0], APP_USER, APP_PASSWORD, APP_DB);
    let client = connect_str(&conn).await.expect("connect");
    assert_eq!(simple_value(&client, "SELECT 1").await, "1");
}

/// Session mode with a `server_reset_query` that fails: the leaving client hears
/// nothing of it, the server is closed rather than handed on, and the next client
/// gets a fresh server and no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_reset_closes_the_server_quietly() {
    let options = EnvOptions {
        pool_extra: vec![
            "server_reset_query = \"SELECT pg_catalog.pgrelay_no_such_function()\"".into(),
        ],
        ..EnvOptions::session()
    };
    let env = start(options).await;
    let first = env.client().await;
    let first_pid = simple_value(&first, "SELECT pg_backend_pid()").await;
    drop(first);
    let superuser = env.direct_superuser().await;
    let gone = eventually(Duration::from_secs(5), || async {
        let rows = superuser
            .query(
                "SELECT 1 FROM pg_stat_activity WHERE pid = $1::text::int",
                &[&first_pid],
            )
            .await
            .expect("pg_stat_activity");
        rows.is_empty()
    })
    .await;
    assert!(gone, "the server whose reset failed is closed");
    let second = env.client().await;
    let second_pid = simple_value(&second, "SELECT pg_backend_pid()").await;
    assert_ne!(first_pid, second_pid, "a fresh server");
    assert_eq!(simple_value(&second, "SELECT 2").await, "2");
}
