//! Server pooling through pgrelay against real PostgreSQL: what goes back to the pool
//! and when, what a server carries from one client to the next, waiting for a full
//! pool, replacing servers that died, and opening servers concurrently.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres::Client;

use support::{
    connect_str, eventually, relay_conn_string, simple_rows, simple_value, sqlstate, start,
    start_relay, EnvOptions, TestEnv, APP_DB, APP_PASSWORD, APP_USER,
};

const SECOND: Duration = Duration::from_secs(1);

fn options(mode: &'static str, pool_size: u32) -> EnvOptions {
    EnvOptions {
        pool_size,
        ..EnvOptions::mode(mode)
    }
}

/// The app pool's `(idle, total, waiting)`, once it exists.
fn app_counts(env: &TestEnv) -> Option<(usize, usize, usize)> {
    env.pool_for(APP_DB).map(|p| p.counts())
}

async fn backend_pid(client: &Client) -> String {
    simple_value(client, "SELECT pg_backend_pid()").await
}

/// Backends of the app user that PostgreSQL knows of.
async fn app_backends(admin: &Client) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

// ---------------------------------------------------------------------------------
// What a server carries between clients
// ---------------------------------------------------------------------------------

/// Session mode: `server_reset_query` (DISCARD ALL) wipes a session's settings,
/// prepared statements and temp tables before the server serves the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_does_not_leak_session_mode() {
    let env = start(options("session", 1)).await;
    let admin = env.direct_superuser().await;
    let default_work_mem = simple_value(&admin, "SHOW work_mem").await;
    assert_ne!(default_work_mem, "7MB");

    let first = env.client().await;
    let first_pid = backend_pid(&first).await;
    first
        .batch_execute(
            "SET work_mem = '7MB'; PREPARE leak AS SELECT 42; CREATE TEMP TABLE leak_tmp (x int4)",
        )
        .await
        .expect("session state");
    assert_eq!(simple_value(&first, "SHOW work_mem").await, "7MB");
    assert_eq!(simple_value(&first, "EXECUTE leak").await, "42");
    drop(first);

    // Pool size 1: this client waits for, and gets, the first client's server.
    let second = env.client().await;
    assert_eq!(backend_pid(&second).await, first_pid, "not the same server");
    assert_eq!(
        simple_value(&second, "SHOW work_mem").await,
        default_work_mem
    );
    let err = second
        .simple_query("EXECUTE leak")
        .await
        .expect_err("the prepared statement must be gone");
    assert_eq!(sqlstate(&err).as_deref(), Some("26000"), "{err}");
    let temp = simple_rows(&second, "SELECT to_regclass('leak_tmp')::text")
        .await
        .expect("to_regclass");
    assert_eq!(temp, [[None]], "the temp table must be gone");
}

/// Transaction mode: a server goes back at ReadyForQuery `I`, so two clients share one
/// server, taking turns, without either waiting for the other to disconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_returns_at_idle_transaction_mode() {
    let env = start(options("transaction", 1)).await;
    let a = env.client().await;
    let b = env.client().await;
    let mut pids = HashSet::new();
    for round in 0..10 {
        for (name, client) in [("A", &a), ("B", &b)] {
            // query_wait_timeout is 20 s: a client stuck behind the other one would
            // blow this 2 s limit.
            let pid = tokio::time::timeout(2 * SECOND, backend_pid(client))
                .await
                .unwrap_or_else(|_| panic!("round {round}: {name} waited for the server"));
            pids.insert(pid);
            let back =
                eventually(2 * SECOND, || async { app_counts(&env) == Some((1, 1, 0)) }).await;
            assert!(
                back,
                "round {round}: server not back: {:?}",
                app_counts(&env)
            );
        }
    }
    assert_eq!(pids.len(), 1, "one server for both clients: {pids:?}");
}

/// Transaction mode: inside BEGIN a client keeps its server for every statement; a
/// second client waits for it and proceeds after COMMIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_keeps_its_server_transaction_mode() {
    let env = start(options("transaction", 1)).await;
    let a = env.client().await;
    let b = env.client().await;
    a.batch_execute("BEGIN").await.expect("BEGIN");
    let pid = backend_pid(&a).await;
    let waiter = tokio::spawn(async move { backend_pid(&b).await });
    let waiting = eventually(5 * SECOND, || async {
        app_counts(&env).is_some_and(|(_, _, waiting)| waiting == 1)
    })
    .await;
    assert!(waiting, "B is not waiting: {:?}", app_counts(&env));
    for _ in 0..5 {
        assert_eq!(backend_pid(&a).await, pid, "the transaction moved");
        a.query_typed("SELECT 1", &[]).await.expect("extended");
    }
    assert!(!waiter.is_finished(), "B ran inside A's transaction");
    a.batch_execute("COMMIT").await.expect("COMMIT");
    let b_pid = tokio::time::timeout(5 * SECOND, waiter)
        .await
        .expect("B proceeds after COMMIT")
        .expect("task");
    assert_eq!(b_pid, pid);
}

const PARAMS_PROBE: &str = "SHOW TimeZone; SHOW DateStyle; \
     SELECT '2024-03-01 12:00+00'::timestamptz::text, pg_backend_pid()";

/// `[TimeZone, DateStyle, a formatted timestamp]` and the backend pid.
async fn observe_params(client: &Client) -> (Vec<String>, String) {
    support::values_and_pid(client, PARAMS_PROBE).await
}

/// Transaction mode, two servers: a client's `SET TimeZone` / `SET DateStyle` (both
/// reported with ParameterStatus) follow it from server to server, and never reach a
/// client that set nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_parameters_follow_clients_transaction_mode() {
    const SETS: &str = "SET TimeZone = 'Asia/Tokyo'; SET DateStyle = 'SQL, DMY'";
    let env = start(options("transaction", 2)).await;
    let admin = env.direct_superuser().await;
    let default = observe_params(&admin).await.0;
    admin.batch_execute(SETS).await.expect("SET");
    let tokyo = observe_params(&admin).await.0;
    assert_eq!(tokyo[0], "Asia/Tokyo");
    assert_eq!(tokyo[1], "SQL, DMY");
    assert_ne!(default[2], tokyo[2]);

    let a = env.client().await;
    let b = env.client().await;
    a.batch_execute(SETS).await.expect("SET");
    let (mut a_pids, mut b_pids) = (HashSet::new(), HashSet::new());
    for round in 0..50 {
        let ((a_seen, a_pid), (b_seen, b_pid)) = if round % 2 == 0 {
            // One after the other: the idle list hands B the server A just left.
            let a_result = observe_params(&a).await;
            (a_result, observe_params(&b).await)
        } else {
            tokio::join!(observe_params(&a), observe_params(&b))
        };
        assert_eq!(a_seen, tokyo, "A, round {round}");
        assert_eq!(b_seen, default, "B, round {round}");
        a_pids.insert(a_pid);
        b_pids.insert(b_pid);
    }
    assert!(
        a_pids.intersection(&b_pids).next().is_some(),
        "no server served both clients: {a_pids:?} {b_pids:?}"
    );
}

// ---------------------------------------------------------------------------------
// A full pool
// ---------------------------------------------------------------------------------

/// Twenty clients on two servers: everyone is served, in turn; pgrelay never has more
/// than two servers, and clients really waited.
async fn clients_beyond_the_pool_wait(mode: &'static str) {
    const CLIENTS: usize = 20;
    let env = Arc::new(start(options(mode, 2)).await);
    let admin = env.direct_superuser().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (max_total, max_waiting) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let monitor = {
        let (env, stop) = (env.clone(), stop.clone());
        let (max_total, max_waiting) = (max_total.clone(), max_waiting.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Some((_, total, waiting)) = app_counts(&env) {
                    max_total.fetch_max(total, Ordering::Relaxed);
                    max_waiting.fetch_max(waiting, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let began = Instant::now();
    let clients = (0..CLIENTS).map(|i| {
        let env = env.clone();
        tokio::spawn(async move {
            // Session mode: the wait happens here, for a server to greet with.
            let client = env.client().await;
            for _ in 0..3 {
                let sum =
                    simple_value(&client, &format!("SELECT pg_sleep(0.05)::text || {i}")).await;
                assert_eq!(sum, i.to_string());
            }
        })
    });
    for result in join_all(clients).await {
        result.expect("every client is served");
    }
    stop.store(true, Ordering::Relaxed);
    monitor.await.expect("monitor");
    let (max_total, max_waiting) = (
        max_total.load(Ordering::Relaxed),
        max_waiting.load(Ordering::Relaxed),
    );
    assert!(max_total <= 2, "pgrelay had {max_total} servers");
    assert!(max_waiting >= 1, "no client ever waited");
    assert!(app_backends(&admin).await <= 2);
    // 60 sleeps of 50 ms on 2 servers take at least 1.5 s: they did not all run at once.
    assert!(began.elapsed() >= Duration::from_millis(1500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_the_pool_wait_transaction_mode() {
    clients_beyond_the_pool_wait("transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_the_pool_wait_session_mode() {
    clients_beyond_the_pool_wait("session").await;
}

// ---------------------------------------------------------------------------------
// Broken servers
// ---------------------------------------------------------------------------------

/// Terminates every backend of the app user and waits until PostgreSQL has none.
async fn terminate_app_backends(admin: &Client) -> i64 {
    let killed: i64 = admin
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE usename = 'app') t",
            &[],
        )
        .await
        .expect("terminate")
        .get(0);
    let gone = eventually(5 * SECOND, || async { app_backends(admin).await == 0 }).await;
    assert!(gone, "backends survived pg_terminate_backend");
    killed
}

/// Transaction mode: idle pooled servers that died are noticed at checkout and replaced;
/// the clients never see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_idle_servers_are_replaced_transaction_mode() {
    let env = start(options("transaction", 4)).await;
    let admin = env.direct_superuser().await;
    let clients = [env.client().await, env.client().await, env.client().await];
    // Three transactions at once: three servers, then all idle.
    for client in &clients {
        client.batch_execute("BEGIN").await.expect("BEGIN");
    }
    let mut old_pids = HashSet::new();
    for client in &clients {
        old_pids.insert(backend_pid(client).await);
        client.batch_execute("COMMIT").await.expect("COMMIT");
    }
    assert_eq!(old_pids.len(), 3);
    let idle = eventually(5 * SECOND, || async { app_counts(&env) == Some((3, 3, 0)) }).await;
    assert!(idle, "{:?}", app_counts(&env));

    assert_eq!(terminate_app_backends(&admin).await, 3);
    for round in 0..3 {
        let pids = join_all(clients.iter().map(backend_pid)).await;
        for pid in pids {
            assert!(
                !old_pids.contains(&pid),
                "round {round}: a dead server was used"
            );
        }
    }
    let fresh = env.client().await;
    assert_eq!(simple_value(&fresh, "SELECT 'fresh'").await, "fresh");
    let (_, total, _) = app_counts(&env).expect("pool");
    assert!(total <= 4, "{total} servers");
}

/// Session mode: a client whose own server dies is told so (57P01) and disconnected;
/// a dead idle server in the pool is replaced for the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_servers_are_replaced_session_mode() {
    let env = start(options("session", 4)).await;
    let admin = env.direct_superuser().await;
    let (victim, victim_end) = support::connect_watched(&env.app_config())
        .await
        .expect("connect");
    let victim_pid = backend_pid(&victim).await;
    let earlier = env.client().await;
    let idle_pid = backend_pid(&earlier).await;
    drop(earlier);
    let idle = eventually(5 * SECOND, || async { app_counts(&env) == Some((1, 2, 0)) }).await;
    assert!(idle, "{:?}", app_counts(&env));

    assert_eq!(terminate_app_backends(&admin).await, 2);
    let end = tokio::time::timeout(5 * SECOND, victim_end)
        .await
        .expect("the client heard of its server's death")
        .expect("connection task");
    let err = end.expect_err("the connection must end with an error");
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err}");
    assert!(victim.simple_query("SELECT 1").await.is_err());

    let fresh = env.client().await;
    let fresh_pid = backend_pid(&fresh).await;
    assert_ne!(fresh_pid, idle_pid, "the dead idle server was handed out");
    assert_ne!(fresh_pid, victim_pid);
    assert_eq!(simple_value(&fresh, "SELECT 'fresh'").await, "fresh");
}

// ---------------------------------------------------------------------------------
// Opening servers concurrently
// ---------------------------------------------------------------------------------

/// A TCP forwarder to `target` that waits `delay` before connecting each accepted
/// connection, so every login through it costs at least `delay`. (PostgreSQL's own
/// `post_auth_delay` cannot be set per role, and globally it would slow the harness's
/// psql, the health checks and the direct connections too.)
async fn slow_proxy(target: u16, delay: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let port = listener.local_addr().expect("proxy address").port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    port
}

/// Eight clients whose first transactions each need a new server: pgrelay logs in to
/// them concurrently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_open_concurrently_transaction_mode() {
    const CLIENTS: usize = 8;
    // Trust on both sides: SCRAM's key stretching, unoptimized in test builds, would
    // add CPU time on two cores that has nothing to do with opening servers.
    let env = start(EnvOptions {
        server_auth: "trust",
        client_auth: "trust",
        ..options("transaction", CLIENTS as u32)
    })
    .await;
    let proxy = slow_proxy(env.cluster.primary_port(), SECOND).await;
    let relay = start_relay(&env.options, &[proxy]).await;
    let url = relay_conn_string(relay.addrs[0], APP_USER, APP_PASSWORD, APP_DB);
    let all_in = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let began = Instant::now();
    let clients = (0..CLIENTS).map(|_| {
        let (url, all_in) = (url.clone(), all_in.clone());
        tokio::spawn(async move {
            let client = connect_str(&url).await.expect("connect");
            client.batch_execute("BEGIN").await.expect("BEGIN");
            let pid = backend_pid(&client).await;
            // Everyone holds a server at once, so there are eight of them.
            all_in.wait().await;
            let elapsed = began.elapsed();
            client.batch_execute("COMMIT").await.expect("COMMIT");
            (pid, elapsed)
        })
    });
    let results: Vec<(String, Duration)> = join_all(clients)
        .await
        .into_iter()
        .map(|r| r.expect("client"))
        .collect();
    let pids: HashSet<&String> = results.iter().map(|(pid, _)| pid).collect();
    assert_eq!(pids.len(), CLIENTS, "eight servers were needed");
    let elapsed = results.iter().map(|(_, e)| *e).max().unwrap_or_default();
    // Every login waits 1 s in the proxy. With at most k logins at a time, eight
    // logins take at least ceil(8 / k) s: 8 s one at a time, 4 s two at a time,
    // 3 s three at a time. Under 3 s proves at least four logins overlapped.
    assert!(
        elapsed >= SECOND,
        "the proxy delay did not apply: {elapsed:?}"
    );
    assert!(
        elapsed < 3 * SECOND,
        "eight server logins took {elapsed:?}: not concurrent"
    );
}

/// Waiting clients are served in the order they started waiting: with one server held
/// in a transaction, three clients queue one after another; when it commits they run in
/// that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_clients_are_served_in_fifo_order_transaction_mode() {
    let env = Arc::new(start(options("transaction", 1)).await);
    let holder = env.client().await;
    holder
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("begin");
    let mut queued = Vec::new();
    for i in 0..3usize {
        let client = env.client().await;
        // The server's clock says when each one ran (they share the one server).
        queued.push(tokio::spawn(async move {
            let micros = simple_value(
                &client,
                "SELECT (extract(epoch FROM clock_timestamp()) * 1e6)::int8",
            )
            .await;
            micros.parse::<i64>().expect("microseconds")
        }));
        // The next client queues only once this one is in line.
        let env = env.clone();
        assert!(
            eventually(Duration::from_secs(5), || {
                let env = env.clone();
                async move { app_counts(&env).is_some_and(|(_, _, waiting)| waiting == i + 1) }
            })
            .await,
            "client {i} never queued"
        );
    }
    holder.batch_execute("COMMIT").await.expect("commit");
    let mut ran_at = Vec::new();
    for handle in queued {
        ran_at.push(handle.await.expect("queued client"));
    }
    let mut sorted = ran_at.clone();
    sorted.sort();
    assert_eq!(ran_at, sorted, "served out of order");
}

/// Parse of the unnamed statement with Sync, then Bind + Execute in a later request
/// (asyncpg with its statement cache off, `PQprepare` with an empty name): the client
/// keeps its server until the statement has run, so another client's query cannot
/// destroy it in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_statement_survives_a_sync_transaction_mode() {
    use support::raw::{first_value, login_trust, message, read_until_ready};
    use tokio::io::AsyncWriteExt;

    let mut opts = options("transaction", 1);
    opts.client_auth = "trust";
    let env = start(opts).await;
    let mut raw = login_trust(env.addr, APP_USER, APP_DB).await;
    let wait = Duration::from_secs(10);
    for round in 0..3 {
        let mut prepare = message(b'P', b"\0SELECT $1::int + 1\0\0\0");
        prepare.extend(message(b'D', b"S\0"));
        prepare.extend(message(b'S', b""));
        raw.write_all(&prepare).await.expect("send");
        let answer = read_until_ready(&mut raw, wait).await;
        assert!(answer.iter().all(|m| m.tag != b'E'), "{answer:?}");

        // Another client wants the only server meanwhile (a simple query would
        // destroy the unnamed statement on it).
        let other = env.client().await;
        let query = tokio::spawn(async move { simple_value(&other, "SELECT 1").await });
        tokio::time::sleep(Duration::from_millis(300)).await;

        // Bind (one text parameter "41") + Execute + Sync.
        let mut run = message(b'B', b"\0\0\0\0\0\x01\0\0\0\x0241\0\0");
        run.extend(message(b'E', b"\0\0\0\0\0"));
        run.extend(message(b'S', b""));
        raw.write_all(&run).await.expect("send");
        let answer = read_until_ready(&mut raw, wait).await;
        assert_eq!(
            first_value(&answer).as_deref(),
            Some("42"),
            "round {round}: {answer:?}"
        );
        let other = tokio::time::timeout(wait, query)
            .await
            .expect("the other client ran once the statement had")
            .expect("task");
        assert_eq!(other, "1");
    }
}
