//! The PostgreSQL protocol through pgrelay with real clients (tokio-postgres, psql and
//! hand-written bytes), in both pool modes where behaviour can differ: startup
//! settings and the ParameterStatus a client is told, protocol negotiation, pipelines,
//! COPY, notices and notifications, server errors, cancel requests, and the database
//! commands that need pgrelay's idle servers gone.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_postgres::binary_copy::{BinaryCopyInWriter, BinaryCopyOutStream};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, Config};

use support::{
    eventually, raw, running_pid, simple_value, sqlstate, start, EnvOptions, TestEnv, APP_DB,
    APP_PASSWORD, APP_USER,
};

use support::both_modes;

const SECOND: Duration = Duration::from_secs(1);

/// A superuser config straight to the primary, to learn what PostgreSQL itself does.
fn direct_config(env: &TestEnv) -> Config {
    format!(
        "host=127.0.0.1 port={} user=postgres dbname={APP_DB}",
        env.cluster.primary_port()
    )
    .parse()
    .expect("direct config")
}

// ---------------------------------------------------------------------------------
// Startup settings
// ---------------------------------------------------------------------------------

/// Startup settings of the clients in the interleaving test: `options`, and
/// `application_name`. The last client asks for nothing and must see the defaults.
const WISHES: [(Option<&str>, Option<&str>); 3] = [
    (
        Some("-c statement_timeout=1234 -c search_path=foo,public"),
        Some("client-one"),
    ),
    (
        Some("-c statement_timeout=4321 -c search_path=bar"),
        Some("client-two"),
    ),
    (None, None),
];

const SETTINGS_SIMPLE: &str = "SHOW statement_timeout; SHOW search_path; \
     SELECT current_setting('application_name'), pg_backend_pid()";
const SETTINGS_EXTENDED: &str = "SELECT current_setting('statement_timeout'), \
     current_setting('search_path'), current_setting('application_name'), pg_backend_pid()";

fn with_wish(mut config: Config, wish: (Option<&str>, Option<&str>)) -> Config {
    if let Some(options) = wish.0 {
        config.options(options);
    }
    if let Some(name) = wish.1 {
        config.application_name(name);
    }
    config
}

/// `[statement_timeout, search_path, application_name]` and the backend pid, with the
/// simple protocol.
async fn settings_simple(client: &Client) -> (Vec<String>, String) {
    support::values_and_pid(client, SETTINGS_SIMPLE).await
}

/// The same with the extended protocol (unnamed statement, one round trip).
async fn settings_extended(client: &Client) -> (Vec<String>, String) {
    let row = client
        .query_typed_one(SETTINGS_EXTENDED, &[])
        .await
        .expect("settings query");
    let values = (0..3).map(|i| row.get::<_, String>(i)).collect();
    (values, row.get::<_, i32>(3).to_string())
}

/// One transaction of one client: the settings it sees and the server it ran on.
async fn observe(client: &Client, round: usize) -> (Vec<String>, String) {
    match round % 3 {
        0 => settings_simple(client).await,
        1 => settings_extended(client).await,
        _ => {
            client.batch_execute("BEGIN").await.expect("BEGIN");
            let first = settings_extended(client).await;
            let second = settings_simple(client).await;
            client.batch_execute("COMMIT").await.expect("COMMIT");
            assert_eq!(first, second, "a transaction moved between servers");
            first
        }
    }
}

/// `options` and `application_name` are in effect on every query of every client, and
/// never leak to another client, while (in transaction mode) few servers move between
/// many clients.
async fn startup_settings(mode: &'static str) {
    const ROUNDS: usize = 30;
    let env = start(EnvOptions {
        pool_size: if mode == "transaction" { 2 } else { 3 },
        ..EnvOptions::mode(mode)
    })
    .await;
    let mut expected = Vec::new();
    for wish in WISHES {
        let direct = connect_direct(&env, wish).await;
        expected.push(settings_simple(&direct).await.0);
    }
    assert_eq!(expected[0][0], "1234ms", "the reference itself is wrong");
    let mut clients = Vec::new();
    for wish in WISHES {
        let config = with_wish(env.app_config(), wish);
        clients.push(std::sync::Arc::new(
            support::connect_watched(&config).await.expect("connect").0,
        ));
    }
    let tasks = clients
        .iter()
        .cloned()
        .zip(expected.clone())
        .enumerate()
        .map(|(index, (client, want))| async move {
            let mut pids = Vec::new();
            for round in 0..ROUNDS {
                let (seen, pid) = observe(&client, round + index).await;
                assert_eq!(seen, want, "client {index}, round {round}");
                pids.push(pid);
                tokio::task::yield_now().await;
            }
            pids
        });
    let mut pids: Vec<Vec<String>> = join_all(tasks.map(tokio::spawn))
        .await
        .into_iter()
        .map(|r| r.expect("client task"))
        .collect();
    // Then one client after another: in transaction mode each takes the server the
    // previous one just left (the idle list is last in, first out), which last ran
    // with other settings.
    for round in 0..10 {
        for (index, client) in clients.iter().enumerate() {
            let (seen, pid) = observe(client, round).await;
            assert_eq!(
                seen, expected[index],
                "client {index}, in turn, round {round}"
            );
            pids[index].push(pid);
        }
    }
    if mode == "transaction" {
        // Some server must have served clients with different settings, or this test
        // proved nothing.
        let shared = pids[0]
            .iter()
            .any(|p| pids[1].contains(p) || pids[2].contains(p));
        assert!(shared, "no server moved between clients: {pids:?}");
    }
    // statement_timeout really applies, not just reads back.
    let err = clients[0]
        .simple_query("SELECT pg_sleep(3)")
        .await
        .expect_err("statement_timeout=1234 should cancel a 3 s sleep");
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"));
    assert_eq!(settings_simple(&clients[2]).await.0, expected[2]);
}

async fn connect_direct(env: &TestEnv, wish: (Option<&str>, Option<&str>)) -> Client {
    let config = with_wish(direct_config(env), wish);
    support::connect_watched(&config).await.expect("direct").0
}

both_modes!(startup_settings);

// ---------------------------------------------------------------------------------
// The startup packet, with hand-written bytes
// ---------------------------------------------------------------------------------

fn trust_env(mode: &'static str) -> EnvOptions {
    EnvOptions {
        client_auth: "trust",
        ..EnvOptions::mode(mode)
    }
}

/// A StartupMessage for protocol `version` (`major << 16 | minor`).
fn startup_with_version(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut packet = raw::startup_message(params);
    packet[4..8].copy_from_slice(&version.to_be_bytes());
    packet
}

/// Sends a startup packet to `port` and reads the answer up to ReadyForQuery or close.
async fn raw_startup(port: u16, packet: &[u8]) -> (TcpStream, Vec<raw::Message>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream.write_all(packet).await.expect("send startup");
    let messages = raw::read_until_ready(&mut stream, 10 * SECOND).await;
    (stream, messages)
}

fn parameter_statuses(messages: &[raw::Message]) -> Vec<(String, String)> {
    messages
        .iter()
        .filter(|m| m.tag == b'S')
        .map(|m| {
            let mut parts = m.body.split(|&b| b == 0);
            let mut next =
                || String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
            (next(), next())
        })
        .collect()
}

fn status_of<'a>(statuses: &'a [(String, String)], name: &str) -> Option<&'a str> {
    statuses
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The client is told the server's normalized ParameterStatus values for what it asked
/// for; a bad setting is refused like PostgreSQL refuses it; `_pq_.` options are
/// answered with NegotiateProtocolVersion, then the login goes on.
async fn startup_packet(mode: &'static str) {
    let env = start(trust_env(mode)).await;
    let pg = env.cluster.primary_port();
    let relay = env.port();

    let asks = [
        ("client_encoding", "utf8"),
        ("DateStyle", "iso, dmy"),
        ("application_name", "raw-client"),
    ];
    let mut params = vec![("user", APP_USER), ("database", APP_DB)];
    params.extend(asks);
    let (_stream, relayed) = raw_startup(relay, &raw::startup_message(&params)).await;
    assert_eq!(relayed.last().map(|m| m.tag), Some(b'Z'), "{relayed:?}");
    params[0].1 = "postgres";
    let (_direct, direct) = raw_startup(pg, &raw::startup_message(&params)).await;
    let (relayed, direct) = (parameter_statuses(&relayed), parameter_statuses(&direct));
    for (name, want) in [
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, DMY"),
        ("application_name", "raw-client"),
    ] {
        assert_eq!(
            status_of(&direct, name),
            Some(want),
            "PostgreSQL: {direct:?}"
        );
        assert_eq!(
            status_of(&relayed, name),
            Some(want),
            "pgrelay: {relayed:?}"
        );
    }

    // A value the server refuses: the same FATAL error as from PostgreSQL.
    let bad = |user| {
        raw::startup_message(&[
            ("user", user),
            ("database", APP_DB),
            ("statement_timeout", "banana"),
        ])
    };
    let (_s, direct) = raw_startup(pg, &bad("postgres")).await;
    let (mut stream, relayed) = raw_startup(relay, &bad(APP_USER)).await;
    let direct_error = direct.last().expect("PostgreSQL answered").fields();
    let relayed_error = relayed.last().expect("pgrelay answered");
    assert_eq!(relayed_error.tag, b'E', "{relayed:?}");
    assert_eq!(relayed_error.sqlstate().as_deref(), Some("22023"));
    assert_eq!(direct_error.get(&b'C').map(String::as_str), Some("22023"));
    let relayed_error = relayed_error.fields();
    assert_eq!(relayed_error.get(&b'S').map(String::as_str), Some("FATAL"));
    assert_eq!(relayed_error.get(&b'M'), direct_error.get(&b'M'));
    assert!(relayed.iter().all(|m| m.tag != b'Z'), "{relayed:?}");
    raw::read_to_close(&mut stream, 5 * SECOND)
        .await
        .expect("pgrelay closes after a FATAL startup error");

    // Protocol 3.2 with an unknown protocol option, as libpq 18 may send.
    let negotiate = |user| {
        startup_with_version(
            0x0003_0002,
            &[
                ("user", user),
                ("database", APP_DB),
                ("_pq_.something", "on"),
            ],
        )
    };
    let (_s, direct) = raw_startup(pg, &negotiate("postgres")).await;
    let (_s, relayed) = raw_startup(relay, &negotiate(APP_USER)).await;
    let first = relayed.first().expect("pgrelay answered");
    assert_eq!(first.tag, b'v', "{relayed:?}");
    // "Newest minor version": PostgreSQL sends it as the full version number. pgrelay
    // speaks 3.2, as PostgreSQL 18 does; the PostgreSQL 15 under test speaks 3.0.
    let options = [&1i32.to_be_bytes()[..], b"_pq_.something\0"].concat();
    let want = [&0x0003_0002i32.to_be_bytes()[..], &options].concat();
    assert_eq!(first.body, want);
    let direct = &direct.first().expect("PostgreSQL answered").body;
    assert_eq!(direct[..4], 0x0003_0000i32.to_be_bytes(), "PostgreSQL 15");
    assert_eq!(direct[4..], options, "PostgreSQL");
    assert_eq!(relayed[1].auth_code(), Some(0), "{relayed:?}");
    assert_eq!(relayed.last().map(|m| m.tag), Some(b'Z'), "{relayed:?}");
}

both_modes!(startup_packet);

// ---------------------------------------------------------------------------------
// Pipelines
// ---------------------------------------------------------------------------------

/// tokio-postgres sends every request of futures polled together before reading any
/// answer, so these are real pipelines of Parse/Bind/Describe/Execute/Sync groups.
async fn pipelines(mode: &'static str) {
    let env = start(EnvOptions::mode(mode)).await;
    let client = env.client().await;
    let counts: Vec<i32> = (1..=60).collect();
    let client = &client;
    // Each future sends its request on its first poll, and join_all polls them all
    // before any answer is read.
    let results = join_all(counts.iter().map(|n| async move {
        client
            .query_typed(
                "SELECT g, repeat('x', g * 100) FROM generate_series(1, $1::int4) g",
                &[(n as &(dyn ToSql + Sync), Type::INT4)],
            )
            .await
    }))
    .await;
    for (n, result) in counts.iter().zip(results) {
        let rows = result.unwrap_or_else(|e| panic!("query {n}: {e}"));
        assert_eq!(rows.len(), *n as usize, "query {n}");
        for (i, row) in rows.iter().enumerate() {
            let g: i32 = row.get(0);
            assert_eq!(g, i as i32 + 1);
            assert_eq!(row.get::<_, &str>(1).len(), g as usize * 100);
        }
    }

    // A failure in the middle: its Sync ends its implicit transaction, and the
    // statements after it run normally.
    let divisors: Vec<i32> = vec![1, 2, 0, 4, 5];
    let results = join_all(divisors.iter().map(|d| async move {
        client
            .query_typed(
                "SELECT 100 / $1::int4",
                &[(d as &(dyn ToSql + Sync), Type::INT4)],
            )
            .await
    }))
    .await;
    for (d, result) in divisors.iter().zip(results) {
        match (d, result) {
            (0, Err(err)) => assert_eq!(sqlstate(&err).as_deref(), Some("22012")),
            (0, Ok(rows)) => panic!("100 / 0 returned {rows:?}"),
            (d, Ok(rows)) => assert_eq!(rows[0].get::<_, i32>(0), 100 / d),
            (d, Err(err)) => panic!("100 / {d}: {err}"),
        }
    }

    if mode == "session" {
        // Named statements stay on the session's server.
        let statement = client
            .prepare("SELECT $1::int4 * 2")
            .await
            .expect("prepare");
        let values: Vec<i32> = (0..50).collect();
        let statement = &statement;
        let results = join_all(
            values
                .iter()
                .map(|v| async move { client.query_one(statement, &[v]).await }),
        )
        .await;
        for (v, row) in values.iter().zip(results) {
            assert_eq!(row.expect("prepared").get::<_, i32>(0), v * 2);
        }
    }
    assert_eq!(
        simple_value(client, "SELECT 'still fine'").await,
        "still fine"
    );
}

both_modes!(pipelines);

// ---------------------------------------------------------------------------------
// COPY
// ---------------------------------------------------------------------------------

const COPY_ROWS: i32 = 3000;

fn copy_text() -> String {
    (1..=COPY_ROWS)
        .map(|i| format!("{i}\tname-{i}\t{}\n", f64::from(i) * 0.5))
        .collect()
}

fn copy_bytes(i: i32) -> Vec<u8> {
    (0..(i % 300)).map(|j| ((i + j) % 256) as u8).collect()
}

/// Waits until every server of every pool is idle (transaction mode: the client's
/// server went back after its statement).
async fn assert_servers_return(env: &TestEnv) {
    let all_idle = eventually(5 * SECOND, || async {
        env.relay.shared.pools.all().iter().all(|p| {
            let (idle, total, _) = p.counts();
            idle == total
        })
    })
    .await;
    let counts: Vec<_> = env
        .relay
        .shared
        .pools
        .all()
        .iter()
        .map(|p| p.counts())
        .collect();
    assert!(all_idle, "servers stuck with an idle client: {counts:?}");
}

/// COPY FROM STDIN and TO STDOUT, text and binary, thousands of rows; the data comes
/// back exactly. Text COPY runs outside a transaction block, binary inside one.
async fn copy(mode: &'static str) {
    let env = start(EnvOptions::mode(mode)).await;
    let mut client = env.client().await;
    client
        .batch_execute(
            "CREATE TABLE copy_text (id int4 PRIMARY KEY, name text, score float8);
             CREATE TABLE copy_bin (id int4 PRIMARY KEY, name text, data bytea)",
        )
        .await
        .expect("create tables");

    let text = copy_text();
    let sink = client
        .copy_in::<_, Bytes>("COPY copy_text FROM STDIN")
        .await
        .expect("COPY FROM STDIN");
    futures_util::pin_mut!(sink);
    for chunk in text.as_bytes().chunks(7000) {
        sink.send(Bytes::copy_from_slice(chunk))
            .await
            .expect("CopyData");
    }
    assert_eq!(sink.finish().await.expect("CopyDone"), COPY_ROWS as u64);
    if mode == "transaction" {
        assert_servers_return(&env).await;
    }
    let out: Vec<Bytes> = client
        .copy_out("COPY (SELECT * FROM copy_text ORDER BY id) TO STDOUT")
        .await
        .expect("COPY TO STDOUT")
        .try_collect()
        .await
        .expect("CopyData");
    assert_eq!(String::from_utf8(out.concat()).expect("utf8"), text);

    let transaction = client.transaction().await.expect("BEGIN");
    let sink = transaction
        .copy_in("COPY copy_bin FROM STDIN (FORMAT binary)")
        .await
        .expect("binary COPY FROM STDIN");
    let writer = BinaryCopyInWriter::new(sink, &[Type::INT4, Type::TEXT, Type::BYTEA]);
    futures_util::pin_mut!(writer);
    for i in 1..=COPY_ROWS {
        let name = format!("név-{i}");
        writer
            .as_mut()
            .write(&[&i, &name, &copy_bytes(i)])
            .await
            .expect("binary row");
    }
    assert_eq!(
        writer.finish().await.expect("binary CopyDone"),
        COPY_ROWS as u64
    );
    transaction.commit().await.expect("COMMIT");

    let stream = client
        .copy_out("COPY (SELECT * FROM copy_bin ORDER BY id) TO STDOUT (FORMAT binary)")
        .await
        .expect("binary COPY TO STDOUT");
    let rows: Vec<_> = BinaryCopyOutStream::new(stream, &[Type::INT4, Type::TEXT, Type::BYTEA])
        .collect()
        .await;
    assert_eq!(rows.len(), COPY_ROWS as usize);
    for (i, row) in (1..).zip(rows) {
        let row = row.expect("binary row");
        assert_eq!(row.get::<i32>(0), i);
        assert_eq!(row.get::<&str>(1), format!("név-{i}"));
        assert_eq!(row.get::<&[u8]>(2), copy_bytes(i).as_slice());
    }
    if mode == "transaction" {
        assert_servers_return(&env).await;
    }
}

both_modes!(copy);

// ---------------------------------------------------------------------------------
// Notices and notifications
// ---------------------------------------------------------------------------------

const RAISE_NOTICE: &str = "DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$";

async fn notices(mode: &'static str) {
    let env = start(EnvOptions::mode(mode)).await;
    let (ok, _stdout, stderr) = tokio::task::block_in_place(|| env.psql(&["-c", RAISE_NOTICE]));
    assert!(ok, "psql failed: {stderr}");
    assert!(
        stderr.contains("NOTICE:  hello from plpgsql"),
        "psql stderr: {stderr}"
    );
    let (client, mut messages) = support::connect_with_messages(&env.app_config())
        .await
        .expect("connect");
    client.batch_execute(RAISE_NOTICE).await.expect("DO");
    match tokio::time::timeout(5 * SECOND, messages.recv()).await {
        Ok(Some(AsyncMessage::Notice(notice))) => {
            assert_eq!(notice.message(), "hello from plpgsql");
            assert_eq!(notice.severity(), "NOTICE");
        }
        other => panic!("expected a notice, got {other:?}"),
    }
}

both_modes!(notices);

async fn next_notification(
    messages: &mut tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>,
) -> tokio_postgres::Notification {
    loop {
        match tokio::time::timeout(5 * SECOND, messages.recv()).await {
            Ok(Some(AsyncMessage::Notification(n))) => return n,
            Ok(Some(_)) => continue,
            other => panic!("expected a notification, got {other:?}"),
        }
    }
}

/// Session mode: LISTEN/NOTIFY works across clients, and a client's notifications
/// carry the pid its own `pg_backend_pid()` shows (it was given its server's real key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_session_mode() {
    let env = start(EnvOptions {
        client_auth: "trust",
        ..EnvOptions::session()
    })
    .await;
    let (listener, mut messages) = support::connect_with_messages(&env.app_config())
        .await
        .expect("connect");
    listener
        .batch_execute("LISTEN relay_news")
        .await
        .expect("LISTEN");
    let notifier = env.client().await;
    let notifier_pid = simple_value(&notifier, "SELECT pg_backend_pid()").await;
    notifier
        .batch_execute("NOTIFY relay_news, 'from another client'")
        .await
        .expect("NOTIFY");
    let n = next_notification(&mut messages).await;
    assert_eq!(n.channel(), "relay_news");
    assert_eq!(n.payload(), "from another client");
    assert_eq!(n.process_id().to_string(), notifier_pid);

    let own_pid = simple_value(&listener, "SELECT pg_backend_pid()").await;
    listener
        .batch_execute("NOTIFY relay_news, 'to myself'")
        .await
        .expect("NOTIFY");
    let n = next_notification(&mut messages).await;
    assert_eq!(n.payload(), "to myself");
    assert_eq!(n.process_id().to_string(), own_pid);

    // The BackendKeyData pgrelay sends in session mode is the server's.
    let mut stream = raw::send_startup(env.addr, APP_USER, APP_DB).await;
    let greeting = raw::read_until_ready(&mut stream, 10 * SECOND).await;
    let key = greeting
        .iter()
        .find(|m| m.tag == b'K')
        .expect("BackendKeyData");
    let key_pid = i32::from_be_bytes([key.body[0], key.body[1], key.body[2], key.body[3]]);
    stream
        .write_all(&raw::query("SELECT pg_backend_pid()"))
        .await
        .expect("send query");
    let answer = raw::read_until_ready(&mut stream, 10 * SECOND).await;
    let row = answer.iter().find(|m| m.tag == b'D').expect("DataRow");
    let value = String::from_utf8_lossy(&row.body[6..]).into_owned();
    assert_eq!(value, key_pid.to_string());
}

// ---------------------------------------------------------------------------------
// Server errors and cancels
// ---------------------------------------------------------------------------------

/// A backend terminated by an administrator mid-query: the client gets PostgreSQL's
/// FATAL 57P01 as it was sent, and pgrelay goes on serving new clients.
async fn terminated_backend(mode: &'static str) {
    let env = start(EnvOptions::mode(mode)).await;
    let admin = env.direct_superuser().await;
    let client = env.client().await;
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(10)").await });
    let pid = running_pid(&admin, "SELECT pg_sleep(10)").await;
    let row = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate");
    assert!(row.get::<_, bool>(0));
    let err = tokio::time::timeout(5 * SECOND, sleeper)
        .await
        .expect("the client heard of the termination in time")
        .expect("task")
        .expect_err("the query must fail");
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err}");
    let fresh = env.client().await;
    assert_eq!(simple_value(&fresh, "SELECT 'alive'").await, "alive");
}

both_modes!(terminated_backend);

/// A cancel request through pgrelay reaches the server running the client's query.
async fn cancel(mode: &'static str) {
    let env = start(EnvOptions::mode(mode)).await;
    let admin = env.direct_superuser().await;
    let client = std::sync::Arc::new(env.client().await);
    let token = client.cancel_token();
    let sleeper = {
        let client = client.clone();
        tokio::spawn(async move { client.simple_query("SELECT pg_sleep(20)").await })
    };
    running_pid(&admin, "SELECT pg_sleep(20)").await;
    let began = Instant::now();
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("send cancel");
    let err = tokio::time::timeout(5 * SECOND, sleeper)
        .await
        .expect("cancelled in time")
        .expect("task")
        .expect_err("the sleep must be cancelled");
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    assert!(began.elapsed() < 5 * SECOND);
    assert_eq!(simple_value(&client, "SELECT 'after'").await, "after");
}

both_modes!(cancel);

/// Transaction mode, one server: a client whose transaction is over cannot cancel the
/// query another client now runs on the same server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_cancel_hits_nobody_transaction_mode() {
    let env = start(EnvOptions {
        pool_size: 1,
        ..EnvOptions::mode("transaction")
    })
    .await;
    let admin = env.direct_superuser().await;
    let a = env.client().await;
    let b = env.client().await;
    let a_pid = simple_value(&a, "SELECT pg_backend_pid()").await;
    let a_token = a.cancel_token();
    let sleeper = tokio::spawn(async move {
        let pid = simple_value(&b, "SELECT pg_backend_pid()").await;
        (pid, b.simple_query("SELECT pg_sleep(2)").await)
    });
    let sleeping = running_pid(&admin, "SELECT pg_sleep(2)").await;
    assert_eq!(
        sleeping.to_string(),
        a_pid,
        "B must run on A's former server"
    );
    a_token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("send cancel");
    let (b_pid, result) = sleeper.await.expect("task");
    assert_eq!(b_pid, a_pid);
    result.expect("A's cancel must not reach B's query");
}

// ---------------------------------------------------------------------------------
// Database commands that need pgrelay's idle servers closed
// ---------------------------------------------------------------------------------

/// Connects to `db` through pgrelay, runs a query, leaves, and waits until the server
/// sits idle in pgrelay's pool (and so still connected to `db` in PostgreSQL).
async fn leave_idle_server_on(env: &TestEnv, admin: &Client, db: &str) {
    let client = env
        .connect(APP_USER, APP_PASSWORD, db)
        .await
        .expect("connect to the new database");
    assert_eq!(simple_value(&client, "SELECT current_database()").await, db);
    drop(client);
    let idle = eventually(5 * SECOND, || async {
        env.pool_for(db).is_some_and(|p| p.counts() == (1, 1, 0))
    })
    .await;
    assert!(idle, "no idle server for {db}");
    let connected: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
            &[&db],
        )
        .await
        .expect("pg_stat_activity")
        .get(0);
    assert_eq!(connected, 1, "pgrelay's idle server is connected to {db}");
}

/// `DROP DATABASE x` and `ALTER DATABASE y RENAME` succeed although pgrelay holds idle
/// servers connected to them: pgrelay closes those first.
async fn database_commands(mode: &'static str) {
    let env = start(EnvOptions::mode(mode)).await;
    let admin = env.direct_superuser().await;
    admin
        .batch_execute("ALTER ROLE app CREATEDB")
        .await
        .expect("CREATEDB");
    for db in ["doomed", "old_name"] {
        admin
            .batch_execute(&format!("CREATE DATABASE {db} OWNER app"))
            .await
            .expect("CREATE DATABASE");
        leave_idle_server_on(&env, &admin, db).await;
    }
    let client = env.client().await;
    client
        .simple_query("DROP DATABASE doomed")
        .await
        .expect("DROP DATABASE with an idle pooled server");
    client
        .simple_query("ALTER DATABASE old_name RENAME TO new_name")
        .await
        .expect("ALTER DATABASE RENAME with an idle pooled server");
    let names: Vec<String> = admin
        .query(
            "SELECT datname::text FROM pg_database WHERE datname IN ('doomed', 'old_name', 'new_name')",
            &[],
        )
        .await
        .expect("pg_database")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, ["new_name"]);
    let moved = env
        .connect(APP_USER, APP_PASSWORD, "new_name")
        .await
        .expect("connect to the renamed database");
    assert_eq!(
        simple_value(&moved, "SELECT current_database()").await,
        "new_name"
    );
}

both_modes!(database_commands);
