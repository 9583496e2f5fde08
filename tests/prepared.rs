//! Transaction pooling keeps what drivers rely on: named prepared statements that work
//! on whichever server a client lands on, session settings that follow the client, and
//! session state that cannot move (advisory locks, LISTEN, temp tables) pinning the
//! client to its server until it lets go. Against real PostgreSQL, with pools much
//! smaller than the number of clients.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use support::raw::{self, Message};
use support::{simple_value, sqlstate, start, EnvOptions, TestEnv, APP_DB, APP_USER};

const TEN_SECONDS: Duration = Duration::from_secs(10);

fn transaction_pool(pool_size: u32) -> EnvOptions {
    EnvOptions {
        pool_size,
        ..EnvOptions::mode("transaction")
    }
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, name);
    cstr(&mut body, sql);
    body.extend_from_slice(&0u16.to_be_bytes());
    raw::message(b'P', &body)
}

/// Bind with no parameters and text results.
fn bind(statement: &str) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, "");
    cstr(&mut body, statement);
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    raw::message(b'B', &body)
}

fn execute() -> Vec<u8> {
    raw::message(b'E', b"\0\0\0\0\0")
}

fn describe_statement(name: &str) -> Vec<u8> {
    let mut body = vec![b'S'];
    cstr(&mut body, name);
    raw::message(b'D', &body)
}

fn close_statement(name: &str) -> Vec<u8> {
    let mut body = vec![b'S'];
    cstr(&mut body, name);
    raw::message(b'C', &body)
}

fn sync() -> Vec<u8> {
    raw::message(b'S', b"")
}

/// Sends `messages` in one write and reads the answers up to ReadyForQuery.
async fn exchange(stream: &mut TcpStream, messages: &[Vec<u8>]) -> Vec<Message> {
    stream
        .write_all(&messages.concat())
        .await
        .expect("send to pgrelay");
    raw::read_until_ready(stream, TEN_SECONDS).await
}

/// The tags of `messages`, with SQLSTATEs of errors: `"1 2 D C E:42601 Z"`.
fn shape(messages: &[Message]) -> String {
    messages
        .iter()
        .map(|m| match m.sqlstate() {
            Some(code) if m.tag == b'E' => format!("E:{code}"),
            _ => (m.tag as char).to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every DataRow's first column.
fn values(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m.tag == b'D')
        .filter_map(|m| raw::first_value(std::slice::from_ref(m)))
        .collect()
}

/// Waits until `n` clients are pinned.
async fn pinned(env: &TestEnv, n: i64) -> bool {
    support::eventually(TEN_SECONDS, || async {
        env.relay.shared.metrics.pinned_clients.get() == n
    })
    .await
}

fn trust_env(pool_size: u32, max_prepared: u32) -> EnvOptions {
    EnvOptions {
        client_auth: "trust",
        pool_extra: vec![format!("max_prepared_statements = {max_prepared}")],
        ..transaction_pool(pool_size)
    }
}

/// One server that can hold one statement: every other statement use evicts and
/// re-prepares, and the client still sees exactly PostgreSQL's answers, including in
/// a pipeline that fails midway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_see_postgresql_answers_while_statements_move() {
    let env = start(trust_env(1, 1)).await;
    let mut c = raw::login_trust(env.addr, APP_USER, APP_DB).await;

    // Three statements, the middle one broken: the server skips the rest of the
    // segment, so "c" is never created and its Bind is not answered.
    let answers = exchange(
        &mut c,
        &[
            parse("a", "SELECT 1"),
            bind("a"),
            execute(),
            parse("b", "SELEC oops"),
            bind("b"),
            execute(),
            parse("c", "SELECT 3"),
            bind("c"),
            execute(),
            sync(),
        ],
    )
    .await;
    assert_eq!(shape(&answers), "1 2 D C E:42601 Z");
    assert_eq!(values(&answers), ["1"]);

    // "a" lives on; "b" and "c" never existed.
    let answers = exchange(&mut c, &[bind("a"), execute(), sync()]).await;
    assert_eq!(shape(&answers), "2 D C Z");
    for missing in ["b", "c"] {
        let answers = exchange(&mut c, &[bind(missing), execute(), sync()]).await;
        assert_eq!(shape(&answers), "E:26000 Z", "{missing}");
    }

    // Two statements on a server that holds one: each use prepares it again.
    let answers = exchange(
        &mut c,
        &[
            parse("d", "SELECT 4"),
            bind("d"),
            execute(),
            bind("a"),
            execute(),
            bind("d"),
            execute(),
            describe_statement("a"),
            sync(),
        ],
    )
    .await;
    assert_eq!(shape(&answers), "1 2 D C 2 D C 2 D C t T Z");
    assert_eq!(values(&answers), ["4", "1", "4"]);

    // A second Parse of a name is refused, as PostgreSQL refuses it, and what follows
    // in the segment is skipped.
    let answers = exchange(
        &mut c,
        &[parse("a", "SELECT 5"), bind("a"), execute(), sync()],
    )
    .await;
    assert_eq!(shape(&answers), "E:42P05 Z");
    let answers = exchange(&mut c, &[bind("a"), execute(), sync()]).await;
    assert_eq!(values(&answers), ["1"], "the first definition stays");

    // Close, then Parse the same name with another query.
    let answers = exchange(
        &mut c,
        &[
            close_statement("a"),
            parse("a", "SELECT 'second'"),
            bind("a"),
            execute(),
            close_statement("never-parsed"),
            sync(),
        ],
    )
    .await;
    assert_eq!(shape(&answers), "3 1 2 D C 3 Z");
    assert_eq!(values(&answers), ["second"]);

    // Statements a client parses but the server already has are answered in place.
    let mut other = raw::login_trust(env.addr, APP_USER, APP_DB).await;
    let answers = exchange(
        &mut other,
        &[
            parse("mine", "SELECT 'second'"),
            bind("mine"),
            execute(),
            sync(),
        ],
    )
    .await;
    assert_eq!(shape(&answers), "1 2 D C Z");
    assert_eq!(values(&answers), ["second"]);

    // The server never saw the clients' names.
    let names = raw::simple_query(
        &mut c,
        "SELECT string_agg(name, ',') FROM pg_prepared_statements WHERE name NOT LIKE 'pgrelay\\_%'",
    )
    .await;
    assert_eq!(raw::first_value(&names), None, "{names:?}");
}

/// `DEALLOCATE name` of a protocol statement, `DEALLOCATE ALL` and `DISCARD ALL` mean
/// what they mean without a pooler, in and out of transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_and_discard() {
    let env = start(trust_env(2, 100)).await;
    let mut c = raw::login_trust(env.addr, APP_USER, APP_DB).await;
    let prepare = |name: &str| vec![parse(name, "SELECT 42"), sync()];

    assert_eq!(shape(&exchange(&mut c, &prepare("s1")).await), "1 Z");
    let answers = raw::simple_query(&mut c, "DEALLOCATE s1").await;
    assert_eq!(shape(&answers), "C Z");
    assert_eq!(
        shape(&exchange(&mut c, &[bind("s1"), execute(), sync()]).await),
        "E:26000 Z"
    );
    // The name is free again.
    assert_eq!(shape(&exchange(&mut c, &prepare("s1")).await), "1 Z");

    // Inside a transaction, between statements of it.
    assert_eq!(shape(&raw::simple_query(&mut c, "BEGIN").await), "C Z");
    assert_eq!(shape(&exchange(&mut c, &prepare("s2")).await), "1 Z");
    let answers = raw::simple_query(&mut c, "DEALLOCATE PREPARE s2").await;
    assert_eq!(shape(&answers), "C Z");
    assert_eq!(answers.last().map(|m| m.body.clone()), Some(b"T".to_vec()));
    assert_eq!(shape(&raw::simple_query(&mut c, "COMMIT").await), "C Z");
    assert_eq!(
        shape(&exchange(&mut c, &[bind("s2"), execute(), sync()]).await),
        "E:26000 Z"
    );

    // DISCARD ALL drops statements and settings.
    assert_eq!(shape(&exchange(&mut c, &prepare("s3")).await), "1 Z");
    raw::simple_query(&mut c, "SET statement_timeout = '4321ms'").await;
    assert_eq!(
        shape(&raw::simple_query(&mut c, "DISCARD ALL").await),
        "C Z"
    );
    assert_eq!(
        shape(&exchange(&mut c, &[bind("s3"), execute(), sync()]).await),
        "E:26000 Z"
    );
    assert_eq!(
        shape(&exchange(&mut c, &[bind("s1"), execute(), sync()]).await),
        "E:26000 Z"
    );
    let timeout = raw::simple_query(&mut c, "SHOW statement_timeout").await;
    assert_eq!(raw::first_value(&timeout).as_deref(), Some("0"));

    // DEALLOCATE ALL too; the client's statements work again once parsed again.
    assert_eq!(shape(&exchange(&mut c, &prepare("s4")).await), "1 Z");
    assert_eq!(
        shape(&raw::simple_query(&mut c, "DEALLOCATE ALL").await),
        "C Z"
    );
    assert_eq!(
        shape(&exchange(&mut c, &[bind("s4"), execute(), sync()]).await),
        "E:26000 Z"
    );
    assert_eq!(shape(&exchange(&mut c, &prepare("s4")).await), "1 Z");
    let answers = exchange(&mut c, &[bind("s4"), execute(), sync()]).await;
    assert_eq!(values(&answers), ["42"]);
}

/// Fifty tokio-postgres clients over four servers, each with its own prepared
/// statements: every execution works wherever it lands, equal statements are shared
/// on the servers, and each server holds at most `max_prepared_statements`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_share_statements_on_four_servers() {
    let env = start(EnvOptions {
        pool_extra: vec!["max_prepared_statements = 8".into()],
        ..transaction_pool(4)
    })
    .await;
    let setup = env.client().await;
    setup
        .batch_execute("CREATE TABLE hits (client int, n int)")
        .await
        .expect("create table");
    let clients = join_all((0..50).map(|_| env.client())).await;
    let runs = clients.iter().enumerate().map(|(i, client)| async move {
        let add = client.prepare("SELECT $1::int + 1").await.expect("prepare");
        let insert = client
            .prepare("INSERT INTO hits VALUES ($1, $2)")
            .await
            .expect("prepare insert");
        // Statements of this client only: ten distinct texts overall, more than a
        // server holds.
        let own = client
            .prepare(&format!("SELECT $1::int * {}", i % 10))
            .await
            .expect("prepare own");
        let mut pids = HashSet::new();
        for n in 0..20i32 {
            let row = client.query_one(&add, &[&n]).await.expect("add");
            assert_eq!(row.get::<_, i32>(0), n + 1);
            client
                .execute(&insert, &[&(i as i32), &n])
                .await
                .expect("insert");
            let row = client.query_one(&own, &[&n]).await.expect("own");
            assert_eq!(row.get::<_, i32>(0), n * (i as i32 % 10));
            pids.insert(simple_value(client, "SELECT pg_backend_pid()").await);
        }
        pids.len()
    });
    let moved = join_all(runs).await;
    assert!(
        moved.iter().any(|&servers| servers > 1),
        "clients should have moved between servers: {moved:?}"
    );
    let count = simple_value(&setup, "SELECT count(*) FROM hits").await;
    assert_eq!(count, "1000");

    // Each server holds at most 8 of pgrelay's statements, under pgrelay's names.
    for client in clients.iter().take(8) {
        let held = simple_value(
            client,
            "SELECT count(*) FILTER (WHERE name LIKE 'pgrelay\\_%' AND name <> 'pgrelay_echo') \
             || '/' || count(*) FILTER (WHERE name NOT LIKE 'pgrelay\\_%') FROM pg_prepared_statements",
        )
        .await;
        let (ours, theirs) = held.split_once('/').expect("two counts");
        assert!(ours.parse::<u32>().expect("count") <= 8, "{held}");
        assert_eq!(theirs, "0", "client names reached a server: {held}");
    }
    let metrics = &env.relay.shared.metrics;
    let (hits, misses) = (metrics.prepared_hits.get(), metrics.prepared_misses.get());
    println!("prepared statement cache: {hits} hits, {misses} misses");
    assert!(hits > misses, "{hits} hits, {misses} misses");
}

/// Session settings follow the client to every server it lands on, and never reach
/// other clients; SET LOCAL stays in its transaction; RESET goes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_follow_the_client() {
    let env = start(transaction_pool(3)).await;
    let setter = env.client().await;
    setter
        .batch_execute("SET statement_timeout = '1234ms'; SET search_path TO pg_catalog, public")
        .await
        .expect("set");
    let others = join_all((0..6).map(|_| env.client())).await;
    let mut pids = HashSet::new();
    for round in 0..15 {
        // Others keep servers busy, so the setter lands on different ones.
        let busy = join_all(others.iter().map(|c| async move {
            let value = simple_value(
                c,
                "SELECT current_setting('statement_timeout') FROM pg_sleep(0.01)",
            )
            .await;
            assert_eq!(value, "0", "a setting leaked to another client");
        }));
        let mine = async {
            let rows = support::simple_rows(
                &setter,
                "SHOW statement_timeout; SHOW search_path; SELECT pg_backend_pid()",
            )
            .await
            .expect("show");
            (rows[0][0].clone(), rows[1][0].clone(), rows[2][0].clone())
        };
        let (_, (timeout, path, pid)) = tokio::join!(busy, mine);
        assert_eq!(timeout.as_deref(), Some("1234ms"), "round {round}");
        assert_eq!(path.as_deref(), Some("pg_catalog, public"), "round {round}");
        pids.insert(pid);
    }
    assert!(pids.len() > 1, "the setter never changed servers: {pids:?}");

    // The extended protocol sees the same settings.
    let row = setter
        .query_one("SELECT current_setting('statement_timeout')", &[])
        .await
        .expect("extended");
    assert_eq!(row.get::<_, String>(0), "1234ms");

    // SET LOCAL lasts for its transaction only.
    let rows = support::simple_rows(
        &setter,
        "BEGIN; SET LOCAL work_mem = '7MB'; SHOW work_mem; COMMIT; SHOW work_mem",
    )
    .await
    .expect("set local");
    assert_eq!(rows[0][0].as_deref(), Some("7MB"));
    assert_ne!(rows[1][0].as_deref(), Some("7MB"));

    // A SET rolled back never happened.
    setter
        .batch_execute("BEGIN; SET lock_timeout = '99s'; ROLLBACK")
        .await
        .expect("rolled back set");
    assert_eq!(simple_value(&setter, "SHOW lock_timeout").await, "0");

    // RESET goes back to the default, everywhere.
    setter
        .batch_execute("RESET statement_timeout")
        .await
        .expect("reset");
    for _ in 0..6 {
        assert_eq!(simple_value(&setter, "SHOW statement_timeout").await, "0");
    }
    setter.batch_execute("RESET ALL").await.expect("reset all");
    assert_eq!(
        simple_value(&setter, "SHOW search_path").await,
        "\"$user\", public"
    );
}

/// Pins: a session advisory lock keeps the client on its server (counted in the
/// metric) until it is unlocked; then the client moves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advisory_locks_pin_until_unlocked() {
    let env = start(transaction_pool(3)).await;
    let holder = env.client().await;
    let other = env.client().await;
    let metrics = &env.relay.shared.metrics;
    simple_value(&holder, "SELECT pg_advisory_lock(42)").await;
    // The pin is taken right after the answer went out.
    assert!(pinned(&env, 1).await);
    let pinned_pid = simple_value(&holder, "SELECT pg_backend_pid()").await;
    let busy = join_all((0..4).map(|_| env.client())).await;
    for _ in 0..5 {
        let load = join_all(
            busy.iter()
                .map(|c| simple_value(c, "SELECT pg_backend_pid() FROM pg_sleep(0.01)")),
        );
        let (_, pid) = tokio::join!(load, simple_value(&holder, "SELECT pg_backend_pid()"));
        assert_eq!(pid, pinned_pid, "a pinned client moved");
    }
    assert_eq!(
        simple_value(&other, "SELECT pg_try_advisory_lock(42)").await,
        "f",
        "the lock is still held"
    );
    simple_value(&holder, "SELECT pg_advisory_unlock(42)").await;
    assert!(pinned(&env, 0).await);
    assert_eq!(
        simple_value(&other, "SELECT pg_try_advisory_lock(42)").await,
        "t"
    );
    simple_value(&other, "SELECT pg_advisory_unlock_all()").await;

    // A lock that was not taken pins nothing.
    simple_value(
        &holder,
        "SELECT pg_try_advisory_lock(7) FROM pg_advisory_lock(7) AS l",
    )
    .await;
    assert!(pinned(&env, 1).await);
    drop(holder);
    // Disconnecting releases the pin, and the server with the client's lock is closed.
    assert!(pinned(&env, 0).await);
    // The holder twice, and `other` while it held 42 itself.
    assert_eq!(metrics.pins.with_label_values(&["advisory lock"]).get(), 3);
    assert!(
        support::eventually(TEN_SECONDS, || async {
            simple_value(&other, "SELECT pg_try_advisory_lock(7)").await == "t"
        })
        .await
    );
}

/// LISTEN pins the listener to its server, so notifications reach it; a temp table is
/// there for every statement until it is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_and_temp_tables_pin() {
    let env = start(transaction_pool(2)).await;
    let (listener, mut messages) = support::connect_with_messages(&env.app_config())
        .await
        .expect("listener");
    listener.batch_execute("LISTEN jobs").await.expect("listen");
    let senders = join_all((0..5).map(|_| env.client())).await;
    for (i, sender) in senders.iter().enumerate() {
        sender
            .batch_execute(&format!("NOTIFY jobs, 'job {i}'"))
            .await
            .expect("notify");
    }
    let mut payloads = Vec::new();
    while payloads.len() < senders.len() {
        match tokio::time::timeout(TEN_SECONDS, messages.recv()).await {
            Ok(Some(tokio_postgres::AsyncMessage::Notification(n))) => {
                assert_eq!(n.channel(), "jobs");
                payloads.push(n.payload().to_owned());
            }
            Ok(Some(_)) => {}
            other => panic!("notifications stopped after {payloads:?}: {other:?}"),
        }
    }
    payloads.sort();
    assert_eq!(payloads, ["job 0", "job 1", "job 2", "job 3", "job 4"]);
    listener
        .batch_execute("UNLISTEN *")
        .await
        .expect("unlisten");
    assert!(pinned(&env, 0).await);

    // Temp tables.
    let client = env.client().await;
    client
        .batch_execute("CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (1)")
        .await
        .expect("temp table");
    for _ in 0..10 {
        let load = join_all(
            senders
                .iter()
                .map(|c| c.batch_execute("SELECT pg_sleep(0.005)")),
        );
        let (_, count) = tokio::join!(load, simple_value(&client, "SELECT count(*) FROM scratch"));
        assert_eq!(count, "1");
    }
    assert!(pinned(&env, 1).await);
    client
        .batch_execute("DROP TABLE scratch")
        .await
        .expect("drop");
    assert!(pinned(&env, 0).await);

    // SQL PREPARE pins as well, until DEALLOCATE.
    client
        .batch_execute("PREPARE q AS SELECT pg_backend_pid()")
        .await
        .expect("prepare");
    assert!(pinned(&env, 1).await);
    let first = simple_value(&client, "EXECUTE q").await;
    for _ in 0..5 {
        let load = join_all(
            senders
                .iter()
                .map(|c| c.batch_execute("SELECT pg_sleep(0.005)")),
        );
        let (_, pid) = tokio::join!(load, simple_value(&client, "EXECUTE q"));
        assert_eq!(pid, first);
    }
    client
        .batch_execute("DEALLOCATE q")
        .await
        .expect("deallocate");
    assert!(pinned(&env, 0).await);
    let err = client
        .batch_execute("SELECT * FROM scratch")
        .await
        .expect_err("dropped");
    assert_eq!(sqlstate(&err).as_deref(), Some("42P01"));
}

/// With routing on, a prepared read runs on the replica and a prepared write on the
/// primary, from any server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_are_routed() {
    let env = start(EnvOptions {
        replicas: 1,
        routing: vec!["read_after_write = \"off\"".into()],
        weights: vec![0.0, 1.0],
        ..transaction_pool(2)
    })
    .await;
    let client = env.client().await;
    client
        .batch_execute("CREATE TABLE routed (x int)")
        .await
        .expect("create");
    let insert = client
        .prepare("INSERT INTO routed VALUES ($1)")
        .await
        .expect("prepare insert");
    let recovery = client
        .prepare("SELECT pg_is_in_recovery()")
        .await
        .expect("prepare read");
    let mut on_replica = 0;
    for i in 0..20 {
        client.execute(&insert, &[&i]).await.expect("insert");
        if client
            .query_one(&recovery, &[])
            .await
            .expect("read")
            .get::<_, bool>(0)
        {
            on_replica += 1;
        }
    }
    assert_eq!(
        on_replica, 20,
        "reads should all go to the replica (weight 0 primary)"
    );

    // A pinned client's reads go to its pinned server.
    simple_value(&client, "SELECT pg_advisory_lock(1)").await;
    for _ in 0..5 {
        let row = client.query_one(&recovery, &[]).await.expect("pinned read");
        assert!(
            !row.get::<_, bool>(0),
            "a pinned client read from a replica"
        );
    }
    simple_value(&client, "SELECT pg_advisory_unlock(1)").await;
    assert!(pinned(&env, 0).await);
    let row = client.query_one(&recovery, &[]).await.expect("read");
    assert!(
        row.get::<_, bool>(0),
        "unpinned reads go to the replica again"
    );
    let direct = env.direct_superuser().await;
    let count: i64 = direct
        .query_one("SELECT count(*) FROM routed", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 20);
}

/// pgbench's prepared mode, which PgBouncer 1.18 fails in transaction mode: 32 clients
/// over 8 servers, no errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_mode() {
    let env = start(transaction_pool(8)).await;
    let port = env.port().to_string();
    let pgbench = |args: &[&str]| {
        let out = std::process::Command::new("pgbench")
            .env("PGPASSWORD", support::APP_PASSWORD)
            .args(args)
            .args(["-h", "127.0.0.1", "-p", &port, "-U", APP_USER, APP_DB])
            .output()
            .expect("run pgbench");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "pgbench {args:?}: {text}");
        text
    };
    tokio::task::block_in_place(|| {
        pgbench(&["-i", "-s", "1", "-q"]);
        let out = pgbench(&["-M", "prepared", "-c", "32", "-j", "2", "-t", "100"]);
        assert!(
            out.contains("number of transactions actually processed: 3200/3200"),
            "{out}"
        );
        assert!(out.contains("number of failed transactions: 0"), "{out}");
    });
}

/// The Python drivers people use, in their prepared modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_drivers() {
    let env = start(transaction_pool(3)).await;
    let url = format!(
        "postgresql://{APP_USER}:{}@127.0.0.1:{}/{APP_DB}",
        support::APP_PASSWORD,
        env.port()
    );
    let text = support::needs::run_driver("prepared.py", &[&url]);
    assert!(
        text.contains("psycopg ok") && text.contains("asyncpg ok"),
        "{text}"
    );
}

fn describe_portal() -> Vec<u8> {
    raw::message(b'D', b"P\0")
}

/// node-postgres' way with a named statement: parsed once per connection, then Bind,
/// Describe of the portal, Execute, Sync for every use.
fn use_named(name: &str) -> Vec<Vec<u8>> {
    vec![bind(name), describe_portal(), execute(), sync()]
}

/// The answers' shape, with the column count of each RowDescription: `"2 T3 D C Z"`.
fn shape_with_columns(messages: &[Message]) -> String {
    messages
        .iter()
        .map(|m| match m.tag {
            b'T' => format!("T{}", u16::from_be_bytes([m.body[0], m.body[1]])),
            b'E' => format!("E:{}", m.sqlstate().unwrap_or_default()),
            tag => (tag as char).to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Each request on every client through pgrelay, and on a connection straight to
/// PostgreSQL: all must answer alike.
async fn same_everywhere(
    direct: &mut TcpStream,
    clients: &mut [TcpStream],
    request: &[Vec<u8>],
    expected: &str,
) {
    let answers = exchange(direct, request).await;
    assert_eq!(shape_with_columns(&answers), expected, "PostgreSQL itself");
    for (i, client) in clients.iter_mut().enumerate() {
        let answers = exchange(client, request).await;
        assert_eq!(shape_with_columns(&answers), expected, "client {i}");
    }
}

/// Statements prepared before a schema change answer as PostgreSQL answers them, on
/// whichever server the client lands: refused as stale (0A000), on a server that has
/// the old preparation and on one that never had it, until the client prepares them
/// again; then they return the new shape everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_statements_across_schema_changes_answer_as_postgresql() {
    // Three servers that keep one statement each: other statements push it out.
    let env = start(trust_env(3, 1)).await;
    let admin = env.client().await;
    admin
        .batch_execute("CREATE TABLE nt (a int); INSERT INTO nt VALUES (1)")
        .await
        .expect("create table");
    let primary = std::net::SocketAddr::from(([127, 0, 0, 1], env.cluster.primary_port()));
    let mut direct = raw::login_trust(primary, "postgres", APP_DB).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(raw::login_trust(env.addr, APP_USER, APP_DB).await);
    }
    // Inside open transactions, the three clients hold the three servers: each
    // prepares the statement on its own.
    let begin = [raw::query("BEGIN")];
    let prepare = [parse("s1", "SELECT * FROM nt"), sync()];
    for client in clients.iter_mut() {
        assert_eq!(shape(&exchange(client, &begin).await), "C Z");
        assert_eq!(shape(&exchange(client, &prepare).await), "1 Z");
        let answers = exchange(client, &use_named("s1")).await;
        assert_eq!(shape_with_columns(&answers), "2 T1 D C Z");
    }
    for client in clients.iter_mut() {
        assert_eq!(
            shape(&exchange(client, &[raw::query("COMMIT")]).await),
            "C Z"
        );
    }
    assert_eq!(shape(&exchange(&mut direct, &prepare).await), "1 Z");

    admin
        .batch_execute("ALTER TABLE nt ADD COLUMN b int DEFAULT 2")
        .await
        .expect("alter table");
    // The first refusal comes from a server that prepared it before the change.
    same_everywhere(
        &mut direct,
        &mut clients[..1],
        &use_named("s1"),
        "E:0A000 Z",
    )
    .await;
    // Other statements push it out of every server; where it is prepared no more,
    // pgrelay refuses it as PostgreSQL would, rather than preparing the old text anew.
    let other = [parse("other", "SELECT 2"), bind("other"), execute(), sync()];
    for client in clients.iter_mut() {
        assert_eq!(shape(&exchange(client, &begin).await), "C Z");
        assert_eq!(shape(&exchange(client, &other).await), "1 2 D C Z");
    }
    for client in clients.iter_mut() {
        assert_eq!(
            shape(&exchange(client, &[raw::query("COMMIT")]).await),
            "C Z"
        );
    }
    for _ in 0..2 {
        same_everywhere(&mut direct, &mut clients, &use_named("s1"), "E:0A000 Z").await;
    }
    // Prepared again, it returns the new shape on every server.
    let mut again = vec![close_statement("s1"), parse("s1", "SELECT * FROM nt")];
    again.extend(use_named("s1"));
    same_everywhere(&mut direct, &mut clients, &again, "3 1 2 T2 D C Z").await;
    for _ in 0..2 {
        same_everywhere(&mut direct, &mut clients, &use_named("s1"), "2 T2 D C Z").await;
    }

    // Dropped and created again with other column types.
    admin
        .batch_execute(
            "DROP TABLE nt; CREATE TABLE nt (a text, b int, c int); INSERT INTO nt VALUES ('x', 1, 2)",
        )
        .await
        .expect("re-create table");
    for _ in 0..2 {
        same_everywhere(&mut direct, &mut clients, &use_named("s1"), "E:0A000 Z").await;
    }
    same_everywhere(&mut direct, &mut clients, &again, "3 1 2 T3 D C Z").await;
    let answers = exchange(&mut clients[2], &use_named("s1")).await;
    assert_eq!(values(&answers), ["x"]);
}

/// asyncpg with its statement cache on, through schema changes (ADD COLUMN, ALTER
/// COLUMN TYPE, DROP and CREATE with other types, ALTER TYPE of a composite, an
/// unrelated index): every read of every client returns what it returns straight
/// from PostgreSQL, errors included. asyncpg re-prepares and retries a statement
/// PostgreSQL refuses as stale, so the application sees none of those refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_reads_through_schema_changes_as_from_postgresql() {
    let env = start(transaction_pool(3)).await;
    let run = |port: u16, suffix: &str| {
        let url = format!(
            "postgresql://{APP_USER}:{}@127.0.0.1:{port}/{APP_DB}",
            support::APP_PASSWORD
        );
        support::needs::run_driver("schema_change.py", &[&url, suffix])
    };
    let direct = run(env.cluster.primary_port(), "direct");
    let relayed = run(env.port(), "relayed");
    let direct = direct
        .replace("sc_t_direct", "T")
        .replace("sc_u_direct", "U");
    let relayed = relayed
        .replace("sc_t_relayed", "T")
        .replace("sc_u_relayed", "U");
    assert_eq!(relayed, direct);
    // The only errors the application sees are asyncpg's own outdated type cache after
    // the composite change, as straight from PostgreSQL: no refused statement.
    let log: Vec<serde_json::Value> = serde_json::from_str(&relayed).expect("JSON log");
    assert_eq!(log.len(), 6 * 6 * 2 * 2, "{relayed}");
    for entry in &log {
        let (step, outcome) = (&entry[0], &entry[4]);
        if outcome[0] == "error" {
            assert_eq!(step, "composite", "{entry}");
            assert_eq!(outcome[1], "OutdatedSchemaCacheError", "{entry}");
        }
    }
}
