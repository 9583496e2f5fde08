//! Server-side faults while clients work (issue 15): a server process that stops
//! answering mid-result (SIGSTOP), one killed mid-transaction (SIGKILL, after which
//! PostgreSQL restarts every backend of that node), and a connection reset under a
//! transaction. The affected client gets a clear error within the configured timeouts,
//! never a hang; clients of other servers go on without an error.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{pin_mut, StreamExt};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::net::{TcpListener, TcpStream};

use support::*;

const SECOND: Duration = Duration::from_secs(1);

/// Clients that run `sql` in a loop until stopped, counting answers and errors.
struct Workers {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    errors: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Workers {
    async fn start(env: &TestEnv, count: usize, sql: &'static str) -> Workers {
        let mut workers = Workers {
            stop: Arc::default(),
            answered: Arc::default(),
            errors: Arc::default(),
            tasks: Vec::new(),
        };
        for _ in 0..count {
            let client = env.client().await;
            let (stop, answered, errors) = (
                workers.stop.clone(),
                workers.answered.clone(),
                workers.errors.clone(),
            );
            workers.tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match client.simple_query(sql).await {
                        Ok(_) => answered.fetch_add(1, Ordering::Relaxed),
                        Err(err) => {
                            errors.lock().expect("errors").push(format!("{err:?}"));
                            return;
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        workers
    }

    fn answered(&self) -> usize {
        self.answered.load(Ordering::Relaxed)
    }

    /// Stops them; panics if any saw an error.
    async fn finish(self, what: &str) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("worker task");
        }
        let errors = self.errors.lock().expect("errors");
        assert!(
            errors.is_empty(),
            "{what}: other clients failed: {errors:?}"
        );
        self.answered.load(Ordering::Relaxed)
    }
}

/// Waits until `workers` answered `more` requests beyond what they had: they are
/// served now.
async fn served(workers: &Workers, more: usize, what: &str) {
    let from = workers.answered();
    let ok = eventually(5 * SECOND, || async { workers.answered() >= from + more }).await;
    assert!(ok, "{what}: other clients stalled");
}

/// Servers stopped with SIGSTOP, with `query_timeout = 2s`; clients of the other
/// servers keep being answered all along, and each stopped backend goes away once
/// continued (pgrelay closed it):
/// - stopped before its answer began: its client gets FATAL 57014 about two seconds
///   after its query started, not a hang;
/// - stopped in the middle of a large result: its client's connection ends within
///   about two seconds too. Where the last bytes relayed end inside a message (a
///   DataRow cut in two), no ErrorResponse can follow them: the connection is closed,
///   and pgrelay's log says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_is_cut_by_query_timeout() {
    let logs = support::logs::captured("pgrelay=info");
    let env = start(EnvOptions {
        pool_extra: vec!["query_timeout = \"2s\"".into()],
        ..Default::default()
    })
    .await;
    let admin = env.direct_superuser().await;
    let workers = Workers::start(&env, 3, "SELECT 1").await;
    served(&workers, 10, "before").await;

    let client = env.client().await;
    let sleep = "SELECT pg_sleep(20)";
    let started = Instant::now();
    let (answer, pid) = tokio::join!(client.simple_query(sleep), async {
        let pid = running_pid(&admin, sleep).await;
        kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("SIGSTOP the backend");
        served(&workers, 20, "while a server is stopped").await;
        pid
    });
    let took = started.elapsed();
    let err = answer.expect_err("the query was cut");
    let db = err.as_db_error().unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!(
        (db.code().code(), db.severity()),
        ("57014", "FATAL"),
        "{db:?}"
    );
    assert!(took < 6 * SECOND, "the client waited {took:?}");
    kill(Pid::from_raw(pid), Signal::SIGCONT).expect("SIGCONT the backend");
    assert!(
        backend_gone(&admin, pid, 10 * SECOND).await,
        "the stopped backend was left behind"
    );

    let client = env.client().await;
    let big = "SELECT g, repeat('x', 200) FROM generate_series(1, 2000000) g";
    let started = Instant::now();
    let rows = client
        .query_raw(big, std::iter::empty::<i32>())
        .await
        .expect("the result starts");
    pin_mut!(rows);
    rows.next()
        .await
        .expect("a first row")
        .expect("the first row");
    let pid = running_pid(&admin, big).await;
    kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("SIGSTOP the backend");
    let (end, ()) = tokio::join!(
        async {
            while let Some(row) = rows.next().await {
                if let Err(err) = row {
                    return err;
                }
            }
            panic!("the whole result arrived from a stopped server");
        },
        served(&workers, 20, "while a server is stopped"),
    );
    let took = started.elapsed();
    assert!(took < 6 * SECOND, "the client waited {took:?}");
    match end.as_db_error() {
        Some(db) => assert_eq!((db.code().code(), db.severity()), ("57014", "FATAL")),
        None => assert!(end.is_closed(), "{end:?}"),
    }
    let logged = logs.lines_with(&["client closed by a timeout", "query_timeout"]);
    assert_eq!(logged.len(), 2, "{logged:?}");
    kill(Pid::from_raw(pid), Signal::SIGCONT).expect("SIGCONT the backend");
    assert!(
        backend_gone(&admin, pid, 10 * SECOND).await,
        "the stopped backend was left behind"
    );

    workers.finish("SIGSTOP").await;
    let fresh = env.client().await;
    assert_eq!(simple_value(&fresh, "SELECT 'fresh'").await, "fresh");
}

/// A primary backend killed (SIGKILL) mid-transaction: its client's connection ends
/// with an error within seconds, while readers on the replica (primary weight 0) go on
/// without one, through PostgreSQL's crash restart of the primary. Writes work again
/// once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_transaction_ends_only_its_client() {
    let env = start(EnvOptions {
        replicas: 1,
        weights: vec![0.0, 1.0],
        ..Default::default()
    })
    .await;
    let admin = env.direct_superuser().await;
    admin
        .batch_execute("CREATE TABLE killed (a int); GRANT ALL ON killed TO app")
        .await
        .expect("create table");
    let replica_port = env.cluster.replica_ports()[0];
    let readers = Workers::start(&env, 3, "SELECT pg_is_in_recovery()").await;
    served(&readers, 10, "before").await;
    // The readers are answered by the replica.
    let reader = env.client().await;
    assert_eq!(
        simple_value(&reader, "SELECT current_setting('port')").await,
        replica_port.to_string()
    );

    let (client, end) = connect_watched(&env.app_config()).await.expect("connect");
    client
        .batch_execute("BEGIN; INSERT INTO killed VALUES (1)")
        .await
        .expect("open a transaction");
    let pid: i32 = simple_value(&client, "SELECT pg_backend_pid()")
        .await
        .parse()
        .expect("pid");
    let started = Instant::now();
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("SIGKILL the backend");
    let ended = tokio::time::timeout(10 * SECOND, end).await;
    let took = started.elapsed();
    let result = ended
        .expect("the connection ended")
        .expect("connection task");
    assert!(result.is_err(), "it ended with an error");
    assert!(took < 5 * SECOND, "the client waited {took:?}");
    let err = client
        .batch_execute("COMMIT")
        .await
        .expect_err("nothing to commit on");
    assert!(err.is_closed(), "{err:?}");

    // Through the primary's restart and after it, the replica's readers go on.
    served(&readers, 50, "during the primary's restart").await;
    let writer = env.client().await;
    let wrote = eventually(30 * SECOND, || async {
        writer
            .batch_execute("INSERT INTO killed VALUES (2)")
            .await
            .is_ok()
    })
    .await;
    assert!(wrote, "no write after the primary's restart");
    readers.finish("SIGKILL").await;
    assert_eq!(
        simple_value(&writer, "SELECT string_agg(a::text, ',') FROM killed").await,
        "2",
        "the killed transaction rolled back"
    );
}

/// A TCP forwarder between pgrelay and PostgreSQL that can reset one forwarded
/// connection (an RST both ways), found by the port PostgreSQL sees it from.
struct Forwarder {
    addr: SocketAddr,
    /// By the local port of the connection to PostgreSQL: the resetter of each.
    links: Arc<Mutex<HashMap<u16, tokio::sync::oneshot::Sender<()>>>>,
}

impl Forwarder {
    async fn start(upstream: SocketAddr) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let links: Arc<Mutex<HashMap<u16, _>>> = Arc::default();
        let registry = links.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let port = outbound.local_addr().expect("local addr").port();
                let (reset, on_reset) = tokio::sync::oneshot::channel();
                registry.lock().expect("links").insert(port, reset);
                tokio::spawn(forward(inbound, outbound, on_reset));
            }
        });
        Forwarder { addr, links }
    }

    /// Resets the forwarded connection PostgreSQL sees coming from `port`.
    fn reset(&self, port: u16) {
        let reset = self.links.lock().expect("links").remove(&port);
        reset
            .expect("a forwarded connection from that port")
            .send(())
            .expect("reset");
    }
}

/// Copies both ways until either side closes or a reset is asked for: then both
/// sockets are closed with SO_LINGER 0, which sends an RST.
async fn forward(
    mut inbound: TcpStream,
    mut outbound: TcpStream,
    on_reset: tokio::sync::oneshot::Receiver<()>,
) {
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        Ok(()) = on_reset => {
            for socket in [&inbound, &outbound] {
                // An RST is exactly what a linger of zero is for; it does not block.
                #[allow(deprecated)]
                let _ = socket.set_linger(Some(Duration::ZERO));
            }
        }
    }
}

/// A server connection reset (RST) under a client's transaction: that client gets an
/// error within seconds; a client in a transaction on another server connection
/// commits, and a client between transactions notices nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_server_connection_ends_only_its_client() {
    let env = start(EnvOptions::default()).await;
    let forwarder = Forwarder::start(SocketAddr::from((
        [127, 0, 0, 1],
        env.cluster.primary_port(),
    )))
    .await;
    let relay = start_relay(&env.options, &[forwarder.addr.port()]).await;
    let config: tokio_postgres::Config =
        relay_conn_string(relay.addrs[0], APP_USER, APP_PASSWORD, APP_DB)
            .parse()
            .expect("config");
    let admin = env.direct_superuser().await;
    admin
        .batch_execute("CREATE TABLE reset_t (a int); GRANT ALL ON reset_t TO app")
        .await
        .expect("create table");
    let (other, _) = connect_watched(&config).await.expect("connect");
    let (between, _) = connect_watched(&config).await.expect("connect");
    assert_eq!(simple_value(&between, "SELECT 1").await, "1");
    other
        .batch_execute("BEGIN; INSERT INTO reset_t VALUES (1)")
        .await
        .expect("another transaction");

    let (client, end) = connect_watched(&config).await.expect("connect");
    client
        .batch_execute("BEGIN; INSERT INTO reset_t VALUES (2)")
        .await
        .expect("open a transaction");
    let pid = simple_value(&client, "SELECT pg_backend_pid()").await;
    let port: i32 = admin
        .query_one(
            "SELECT client_port FROM pg_stat_activity WHERE pid = $1::text::int",
            &[&pid],
        )
        .await
        .expect("pg_stat_activity")
        .get(0);
    let started = Instant::now();
    forwarder.reset(u16::try_from(port).expect("port"));
    let failed = tokio::time::timeout(10 * SECOND, client.batch_execute("SELECT 1")).await;
    let took = started.elapsed();
    let err = failed
        .expect("the client got an answer in time")
        .expect_err("its server is gone");
    assert!(took < 5 * SECOND, "the client waited {took:?}");
    let ended = tokio::time::timeout(5 * SECOND, end)
        .await
        .expect("the connection ended")
        .expect("connection task");
    assert!(ended.is_err() || err.is_closed(), "{err:?} / {ended:?}");

    other
        .batch_execute("COMMIT")
        .await
        .expect("the other commits");
    assert_eq!(simple_value(&between, "SELECT 2").await, "2");
    assert_eq!(
        simple_value(&between, "SELECT string_agg(a::text, ',') FROM reset_t").await,
        "1",
        "the reset transaction rolled back, the other committed"
    );
}
