//! Bad input and hostile or unlucky clients: unknown databases and users, too many
//! clients, an exhausted pool, an unreachable server, malformed and oversized
//! messages, garbage startup packets, clients that never log in and clients that leave
//! mid-query. Each gets a clear ErrorResponse with the right SQLSTATE or a clean close,
//! never a panic or a hang, and a separate healthy client keeps working throughout.

mod support;

use std::net::{SocketAddr, TcpListener};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use support::raw::{self, Message};
use support::{start, start_relay, EnvOptions, TestEnv, APP_DB, APP_PASSWORD, APP_USER};

/// How long pgrelay gets to close a connection it should close.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// Panics on tokio worker threads: pgrelay's tasks run there, and a panicking session
/// task would otherwise look like a clean close to the test.
static WORKER_PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn watch_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let on_worker = std::thread::current()
                .name()
                .is_some_and(|name| name.starts_with("tokio-runtime-worker"));
            if on_worker {
                let mut panics = WORKER_PANICS.lock().unwrap_or_else(|e| e.into_inner());
                panics.push(info.to_string());
            }
            default(info);
        }));
    });
}

fn assert_no_panics() {
    let panics = WORKER_PANICS.lock().unwrap_or_else(|e| e.into_inner());
    assert!(panics.is_empty(), "pgrelay tasks panicked: {panics:?}");
}

async fn start_env(options: EnvOptions) -> TestEnv {
    watch_panics();
    start(options).await
}

fn trust() -> EnvOptions {
    EnvOptions {
        client_auth: "trust",
        ..Default::default()
    }
}

/// A client that logged in before the trouble and must keep working through it.
struct Healthy(tokio_postgres::Client);

impl Healthy {
    async fn connect(env: &TestEnv) -> Healthy {
        let healthy = Healthy(env.client().await);
        healthy.check().await;
        healthy
    }

    /// Simple protocol on purpose: in transaction mode a client's named prepared
    /// statements may land on another server, which is not what these tests are about.
    async fn check(&self) {
        let query = simple_values(&self.0, "SELECT 40 + 2");
        let values = tokio::time::timeout(Duration::from_secs(10), query)
            .await
            .expect("healthy client answered in time");
        assert_eq!(values, ["42"]);
    }
}

/// The first row of a simple query, as text; panics on an error.
async fn simple_values(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    let messages = client.simple_query(sql).await.expect(sql);
    let row = messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"));
    (0..row.len())
        .map(|i| row.get(i).unwrap_or("NULL").to_owned())
        .collect()
}

/// The SQLSTATE and message of a failed connect, which must be an ErrorResponse.
fn db_error(err: &tokio_postgres::Error) -> (String, String, String) {
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got: {err}"));
    (
        db.code().code().to_owned(),
        db.severity().to_owned(),
        db.message().to_owned(),
    )
}

/// The ErrorResponses among bytes read before a close.
fn errors_in(bytes: &[u8]) -> Vec<Message> {
    raw::split_messages(bytes)
        .into_iter()
        .filter(|m| m.tag == b'E')
        .collect()
}

/// Waits for pgrelay to close `stream` and returns what it sent first.
async fn expect_close(stream: &mut TcpStream, what: &str) -> Vec<u8> {
    match raw::read_to_close(stream, CLOSE_WITHIN).await {
        Ok(bytes) => bytes,
        Err(bytes) => panic!(
            "{what}: socket still open after {CLOSE_WITHIN:?}; got {:?}",
            raw::split_messages(&bytes)
        ),
    }
}

/// A database the servers do not have: the server's 3D000 is passed on. With
/// `[[databases]]` configured, pgrelay refuses the name itself, before any server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_database_is_3d000() {
    let env = start_env(EnvOptions::default()).await;
    let healthy = Healthy::connect(&env).await;
    let err = env
        .connect(APP_USER, APP_PASSWORD, "nope")
        .await
        .expect_err("unknown database");
    let (code, severity, message) = db_error(&err);
    assert_eq!((code.as_str(), severity.as_str()), ("3D000", "FATAL"));
    assert_eq!(message, "database \"nope\" does not exist");
    healthy.check().await;

    let listed = EnvOptions {
        top_extra: vec!["[[databases]]".into(), format!("name = \"{APP_DB}\"")],
        ..Default::default()
    };
    let relay = start_relay(&listed, &env.cluster.ports()).await;
    let conn = |db: &str| support::relay_conn_string(relay.addrs[0], APP_USER, APP_PASSWORD, db);
    let err = support::connect_str(&conn("nope"))
        .await
        .expect_err("database not in [[databases]]");
    assert_eq!(db_error(&err), (code, severity, message));
    let listed_client = support::connect_str(&conn(APP_DB))
        .await
        .expect("listed database");
    listed_client.simple_query("SELECT 1").await.expect("query");
    healthy.check().await;
    assert_no_panics();
}

/// An unknown user and a wrong password fail the same way: 28P01, FATAL, and the same
/// message apart from the user name, so the answer does not reveal which users exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_user_and_wrong_password_look_alike() {
    let env = start_env(EnvOptions::default()).await;
    let healthy = Healthy::connect(&env).await;
    let wrong = env
        .connect(APP_USER, "wrong-password", APP_DB)
        .await
        .expect_err("wrong password");
    let unknown = env
        .connect("nobody", APP_PASSWORD, APP_DB)
        .await
        .expect_err("unknown user");
    let (wrong_code, wrong_severity, wrong_message) = db_error(&wrong);
    let (unknown_code, unknown_severity, unknown_message) = db_error(&unknown);
    assert_eq!(wrong_code, "28P01");
    assert_eq!(
        (unknown_code, unknown_severity),
        (wrong_code, wrong_severity)
    );
    assert_eq!(
        wrong_message,
        "password authentication failed for user \"app\""
    );
    assert_eq!(
        unknown_message.replace("\"nobody\"", "\"app\""),
        wrong_message
    );
    healthy.check().await;
    assert_no_panics();
}

/// `max_client_conn = 2`: the third client is told 53300 after its startup packet,
/// the first two keep working, and a slot freed by a client leaving is reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_clients_is_53300() {
    let env = start_env(EnvOptions {
        pool_extra: vec!["max_client_conn = 2".into()],
        ..Default::default()
    })
    .await;
    let first = Healthy::connect(&env).await;
    let second = Healthy::connect(&env).await;
    let err = env
        .connect(APP_USER, APP_PASSWORD, APP_DB)
        .await
        .expect_err("third client");
    let (code, severity, message) = db_error(&err);
    assert_eq!((code.as_str(), severity.as_str()), ("53300", "FATAL"));
    assert_eq!(message, "sorry, too many clients already");
    first.check().await;
    second.check().await;

    drop(first);
    let third = Mutex::new(None);
    let got_in = support::eventually(Duration::from_secs(5), || {
        let attempt = env.connect(APP_USER, APP_PASSWORD, APP_DB);
        let third = &third;
        async move {
            match attempt.await {
                Ok(client) => {
                    *third.lock().expect("lock") = Some(Healthy(client));
                    true
                }
                Err(err) => {
                    assert_eq!(support::sqlstate(&err).as_deref(), Some("53300"), "{err}");
                    false
                }
            }
        }
    })
    .await;
    assert!(got_in, "a freed client slot was never reused");
    let third = third.into_inner().expect("lock").expect("third client");
    third.check().await;
    second.check().await;
    assert_no_panics();
}

/// Pool size 1 with `query_wait_timeout = "1s"`: while client A holds the only server
/// in a transaction, client B's query fails after about a second with 53400, as a
/// plain ERROR, and B's connection works again once A commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_wait_timeout_is_53400_and_recoverable() {
    let env = start_env(EnvOptions {
        pool_size: 1,
        pool_extra: vec!["query_wait_timeout = \"1s\"".into()],
        ..Default::default()
    })
    .await;
    let a = env.client().await;
    // B logs in before A takes the server, so its greeting needs no server.
    let b = env.client().await;
    a.simple_query("BEGIN").await.expect("BEGIN");
    a.simple_query("SELECT 1")
        .await
        .expect("SELECT 1 in A's transaction");

    let started = Instant::now();
    let err = b
        .simple_query("SELECT 2")
        .await
        .expect_err("B must time out");
    let waited = started.elapsed();
    let (code, severity, _) = db_error(&err);
    assert_eq!((code.as_str(), severity.as_str()), ("53400", "ERROR"));
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "B waited {waited:?} for a 1s query_wait_timeout"
    );
    assert!(!b.is_closed(), "a pool timeout must not end B's connection");

    a.simple_query("COMMIT").await.expect("COMMIT");
    assert_eq!(simple_values(&b, "SELECT 2").await, ["2"]);
    assert_eq!(simple_values(&a, "SELECT 3").await, ["3"]);
    assert_no_panics();
}

/// A port nothing listens on: bound, then released.
fn dead_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    listener.local_addr().expect("local addr").port()
}

/// A backend nobody listens on: clients (two at once, then another) wait for a primary
/// only `failover.hold_timeout` (1 s here), are then told 08006 instead of hanging, and
/// pgrelay keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_08006() {
    watch_panics();
    let port = dead_port();
    let options = EnvOptions {
        sections: vec!["[failover]\nhold_timeout = \"1s\"".to_owned()],
        ..EnvOptions::default()
    };
    let relay = start_relay(&options, &[port]).await;
    let attempt = || async {
        let conn = support::relay_conn_string(relay.addrs[0], APP_USER, APP_PASSWORD, APP_DB);
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(5), support::connect_str(&conn))
            .await
            .expect("pgrelay answered in time");
        let err = result.expect_err("no server to connect to");
        assert_eq!(
            support::sqlstate(&err).as_deref(),
            Some("08006"),
            "after {:?}: {err}",
            started.elapsed()
        );
    };
    tokio::join!(attempt(), attempt());
    attempt().await;
    assert_no_panics();
}

/// Sends `garbage` from a logged-in raw client and expects an ErrorResponse with
/// 08P01 followed by a close.
async fn garbage_after_login(addr: SocketAddr, garbage: &[u8], what: &str) {
    let mut stream = raw::login_trust(addr, APP_USER, APP_DB).await;
    stream.write_all(garbage).await.expect("send garbage");
    let seen = expect_close(&mut stream, what).await;
    let errors = errors_in(&seen);
    assert_eq!(errors.len(), 1, "{what}: {:?}", raw::split_messages(&seen));
    assert_eq!(errors[0].sqlstate().as_deref(), Some("08P01"), "{what}");
}

/// Malformed messages from a logged-in client: a length below 4, a length of
/// 0x7fffffff and an unknown message type each get 08P01 and a close; so does garbage
/// in the middle of a transaction, whose server is then discarded rather than handed,
/// mid-transaction, to the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_08p01_then_close() {
    let env = start_env(EnvOptions {
        pool_size: 1,
        ..trust()
    })
    .await;
    let healthy = Healthy::connect(&env).await;
    let cases: [(&[u8], &str); 3] = [
        (&[b'Q', 0, 0, 0, 3], "length 3"),
        (&[b'Q', 0x7f, 0xff, 0xff, 0xff], "length 0x7fffffff"),
        (&[b'z', 0, 0, 0, 4], "unknown message type"),
    ];
    for (garbage, what) in cases {
        garbage_after_login(env.addr, garbage, what).await;
        healthy.check().await;
    }

    let mut stream = raw::login_trust(env.addr, APP_USER, APP_DB).await;
    raw::simple_query(&mut stream, "BEGIN").await;
    raw::simple_query(&mut stream, "SET LOCAL application_name = 'leftover'").await;
    let answer = raw::simple_query(&mut stream, "SELECT pg_backend_pid()").await;
    let garbage_pid = raw::first_value(&answer).expect("pid");
    assert_eq!(answer.last().map(|m| m.body.as_slice()), Some(&b"T"[..]));
    stream
        .write_all(&[b'Q', 0x7f, 0xff, 0xff, 0xff])
        .await
        .expect("send garbage");
    let seen = expect_close(&mut stream, "garbage in a transaction").await;
    assert_eq!(
        errors_in(&seen)
            .first()
            .and_then(Message::sqlstate)
            .as_deref(),
        Some("08P01")
    );
    // Pool size 1: had the server gone back, this query would run on it, inside the
    // abandoned transaction (where now() is the BEGIN's time and the SET LOCAL holds).
    let sql = "SELECT pg_backend_pid(), now() = statement_timestamp(), \
               current_setting('application_name') = 'leftover'";
    let values = simple_values(&healthy.0, sql).await;
    assert_ne!(values[0], garbage_pid);
    assert_eq!(
        values[1..],
        ["t", "f"],
        "ran inside the leftover transaction"
    );
    assert_no_panics();
}

/// Sends a StartupMessage to `addr`, checks the Authentication request code, sends
/// `answer` and expects the socket to close; returns the ErrorResponses sent first.
async fn bad_login_answer(
    addr: SocketAddr,
    auth_code: i32,
    answer: &[u8],
    what: &str,
) -> Vec<Message> {
    let mut stream = raw::send_startup(addr, APP_USER, APP_DB).await;
    let request = tokio::time::timeout(CLOSE_WITHIN, raw::read_message(&mut stream))
        .await
        .expect("authentication request in time")
        .expect("read")
        .expect("a message");
    assert_eq!(request.auth_code(), Some(auth_code), "{what}");
    stream.write_all(answer).await.expect("send answer");
    errors_in(&expect_close(&mut stream, what).await)
}

/// Nonsense where a password message belongs: another message type, an oversized
/// password message, an unknown SASL mechanism and a malformed SCRAM message. Each
/// ends the connection at once, with 08P01 where pgrelay says anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_login_messages_close() {
    let env = start_env(EnvOptions::default()).await;
    let healthy = Healthy::connect(&env).await;
    let plain = start_relay(
        &EnvOptions {
            client_auth: "plain",
            ..Default::default()
        },
        &env.cluster.ports(),
    )
    .await;
    let cases: [(SocketAddr, i32, Vec<u8>, &str, bool); 4] = [
        (
            plain.addrs[0],
            3,
            raw::query("SELECT 1"),
            "a Query instead of a password",
            true,
        ),
        (
            plain.addrs[0],
            3,
            vec![b'p', 0x7f, 0xff, 0xff, 0xff],
            "an oversized password",
            false,
        ),
        (
            env.addr,
            10,
            raw::sasl_initial("SCRAM-SHA-1", b"n,,n=,r=abc"),
            "an unknown SASL mechanism",
            true,
        ),
        (
            env.addr,
            10,
            raw::sasl_initial("SCRAM-SHA-256", b"garbage"),
            "a malformed client-first",
            true,
        ),
    ];
    for (addr, auth_code, answer, what, error_expected) in cases {
        let errors = bad_login_answer(addr, auth_code, &answer, what).await;
        if error_expected {
            assert_eq!(errors.len(), 1, "{what}: {errors:?}");
        }
        for error in errors {
            assert_eq!(error.sqlstate().as_deref(), Some("08P01"), "{what}");
        }
        healthy.check().await;
    }
    assert_no_panics();
}

/// Garbage instead of a startup packet: a length of 3 (below the minimum of 8) or of
/// 100000 (over PostgreSQL's 10000), with or without more bytes behind it, and an
/// unknown protocol version. pgrelay closes the socket at once. A well-formed packet
/// without a user gets 28000 first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_startup_packets_close() {
    let env = start_env(trust()).await;
    let healthy = Healthy::connect(&env).await;
    // CancelRequests whose secret is longer than protocol 3.2's 256 bytes, or shorter
    // than 4.
    let cancel = |key_len: usize| {
        let mut packet = (12 + key_len as u32).to_be_bytes().to_vec();
        packet.extend(80_877_102u32.to_be_bytes());
        packet.extend(4_194_305i32.to_be_bytes());
        packet.resize(12 + key_len, 7);
        packet
    };
    let (long_key, short_key) = (cancel(300), cancel(1));
    let cases: [(&[u8], &str); 7] = [
        (&long_key, "CancelRequest with a 300-byte key"),
        (&short_key, "CancelRequest of 13 bytes"),
        (&[0, 0, 0, 3], "length 3 alone"),
        (
            &[0, 0, 0, 3, 0, 3, 0, 0, 1, 2, 3, 4],
            "length 3 with more bytes",
        ),
        (&[0, 1, 0x86, 0xa0], "length 100000 alone"),
        (
            &[0, 1, 0x86, 0xa0, 0, 3, 0, 0, b'u'],
            "length 100000 with more",
        ),
        (&[0, 0, 0, 8, 0, 9, 0, 0], "protocol 9.0"),
    ];
    for (garbage, what) in cases {
        let mut stream = TcpStream::connect(env.addr).await.expect("connect");
        stream.write_all(garbage).await.expect("send garbage");
        let started = Instant::now();
        let seen = expect_close(&mut stream, what).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{what}: closed only after {:?} (a timeout, not the check)",
            started.elapsed()
        );
        for error in errors_in(&seen) {
            let code = error.sqlstate().unwrap_or_default();
            assert!(code == "08P01" || code == "0A000", "{what}: {code}");
        }
        healthy.check().await;
    }
    let mut stream = TcpStream::connect(env.addr).await.expect("connect");
    let no_user = raw::startup_message(&[("database", APP_DB)]);
    stream.write_all(&no_user).await.expect("send startup");
    let errors = errors_in(&expect_close(&mut stream, "no user").await);
    assert_eq!(
        errors.first().and_then(Message::sqlstate).as_deref(),
        Some("28000")
    );
    assert_no_panics();
}

/// `client_login_timeout = "1s"`: a client that sends nothing, and one that sends half
/// a startup packet, are closed after about a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_login_timeout_closes_silent_clients() {
    let env = start_env(EnvOptions {
        pool_extra: vec!["client_login_timeout = \"1s\"".into()],
        ..trust()
    })
    .await;
    let healthy = Healthy::connect(&env).await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(env.addr).await.expect("connect");
    let mut half = TcpStream::connect(env.addr).await.expect("connect");
    let startup = raw::startup_message(&[("user", APP_USER), ("database", APP_DB)]);
    half.write_all(&startup[..startup.len() / 2])
        .await
        .expect("send half a packet");
    // Logins in progress do not hold anyone else up.
    healthy.check().await;
    for (stream, what) in [(&mut silent, "silent client"), (&mut half, "half packet")] {
        let seen = match raw::read_to_close(stream, Duration::from_secs(3)).await {
            Ok(seen) => seen,
            Err(_) => panic!("{what}: still open after 3s with a 1s client_login_timeout"),
        };
        for error in errors_in(&seen) {
            assert_eq!(error.sqlstate().as_deref(), Some("08P01"), "{what}");
        }
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before the timeout",
        started.elapsed()
    );
    // A client that does log in in time is not affected by the short timeout.
    let late = Healthy::connect(&env).await;
    late.check().await;
    healthy.check().await;
    assert_no_panics();
}

/// Opens a transaction and returns the pid of the server it runs on.
async fn pid_in_transaction(client: &tokio_postgres::Client) -> i32 {
    let messages = client
        .simple_query("BEGIN; SELECT pg_backend_pid()")
        .await
        .expect("transaction");
    let pid = messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    });
    pid.expect("pid").parse().expect("numeric pid")
}

/// A client that leaves while its query runs: other clients keep working, and the
/// server it was using (still busy with `pg_sleep`) is discarded, not handed out again
/// with a query in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_query_discards_its_server() {
    let env = start_env(EnvOptions {
        pool_size: 2,
        ..trust()
    })
    .await;
    let healthy = Healthy::connect(&env).await;
    let other = Healthy::connect(&env).await;
    let superuser = env.direct_superuser().await;
    let mut leaver = raw::login_trust(env.addr, APP_USER, APP_DB).await;
    leaver
        .write_all(&raw::query("SELECT pg_sleep(5)"))
        .await
        .expect("send query");
    let sleeping_pid = || async {
        superuser
            .query_opt(
                "SELECT pid FROM pg_stat_activity \
                 WHERE query = 'SELECT pg_sleep(5)' AND state = 'active'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .map(|row| row.get::<_, i32>(0))
    };
    let running = support::eventually(Duration::from_secs(5), || async {
        sleeping_pid().await.is_some()
    })
    .await;
    assert!(running, "the query never started on a server");
    let busy_pid = sleeping_pid().await.expect("busy server");
    // During: the other server of the pool serves the healthy client.
    healthy.check().await;
    let left = Instant::now();
    drop(leaver);

    // Both pool slots at once: had the busy server gone back to the pool, one of these
    // transactions would get it (and wait out the sleep, or read its result).
    let (a, b) = (&healthy.0, &other.0);
    let (pid_a, pid_b) = tokio::join!(pid_in_transaction(a), pid_in_transaction(b));
    assert!(
        left.elapsed() < Duration::from_secs(3),
        "clients waited {:?}, as if for the busy server",
        left.elapsed()
    );
    assert_ne!(pid_a, pid_b);
    assert!(
        pid_a != busy_pid && pid_b != busy_pid,
        "the busy server {busy_pid} was handed out again"
    );
    a.simple_query("COMMIT").await.expect("COMMIT a");
    b.simple_query("COMMIT").await.expect("COMMIT b");
    healthy.check().await;
    other.check().await;
    assert_no_panics();
}

/// An extended request that ends with Flush and cannot get a server: the error comes at
/// once, then everything up to the client's Sync is skipped and one ReadyForQuery
/// answers that Sync, as PostgreSQL does after an error in a pipeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_wait_timeout_on_a_flushed_request_skips_to_sync() {
    let env = start_env(EnvOptions {
        pool_size: 1,
        client_auth: "trust",
        pool_extra: vec!["query_wait_timeout = \"1s\"".into()],
        ..Default::default()
    })
    .await;
    let mut b = raw::login_trust(env.addr, APP_USER, APP_DB).await;
    let a = env.client().await;
    a.simple_query("BEGIN").await.expect("BEGIN");

    let mut parse = b"\0SELECT 1\0".to_vec();
    parse.extend_from_slice(&0u16.to_be_bytes());
    let mut request = raw::message(b'P', &parse);
    request.extend(raw::message(b'H', b""));
    b.write_all(&request).await.expect("send Parse+Flush");
    let error = raw::read_message(&mut b)
        .await
        .expect("read")
        .expect("a message");
    assert_eq!(
        (error.tag, error.sqlstate().as_deref()),
        (b'E', Some("53400"))
    );
    // No ReadyForQuery yet: the client has not sent its Sync.
    let early = tokio::time::timeout(Duration::from_millis(300), raw::read_message(&mut b)).await;
    assert!(
        early.is_err(),
        "a message arrived before the Sync: {early:?}"
    );

    // The rest of the pipeline, then Sync: only ReadyForQuery comes back.
    let mut rest = raw::message(b'B', b"\0\0\0\0\0\0\0\0");
    rest.extend(raw::message(b'E', b"\0\0\0\0\0"));
    rest.extend(raw::message(b'S', b""));
    b.write_all(&rest).await.expect("send Bind+Execute+Sync");
    let answers = raw::read_until_ready(&mut b, Duration::from_secs(5)).await;
    let tags: Vec<u8> = answers.iter().map(|m| m.tag).collect();
    assert_eq!(
        tags,
        vec![b'Z'],
        "expected only ReadyForQuery after the skipped messages"
    );
    // The skipped Bind/Execute did not become a request of their own (which would wait
    // for the pool and fail again).
    let late = tokio::time::timeout(Duration::from_millis(1500), raw::read_message(&mut b)).await;
    assert!(late.is_err(), "unexpected message after the Sync: {late:?}");

    // And B's next request runs normally once A is done.
    a.simple_query("COMMIT").await.expect("COMMIT");
    let rows = raw::simple_query(&mut b, "SELECT 42").await;
    assert_eq!(raw::first_value(&rows).as_deref(), Some("42"));
}
