//! `pgrelay run --takeover`: a second pgrelay process takes the running one's
//! listening sockets (TCP and Unix) and, between transactions, its clients with their
//! session state; the first exits when it has none left. pgbench's persistent
//! clients run through it with prepared statements and no failed transaction; a
//! client keeps its settings, statements and cancel key, one in a transaction
//! finishes it on the old process and goes on on the new one.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use pgrelay::demo::LocalCluster;
use support::process::{RelayProcess, BIN};
use support::{config_text, connect_str, simple_value, EnvOptions, APP_DB, APP_PASSWORD, APP_USER};

/// Both tests run pgbench or several processes: one at a time on 2 cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A primary, and a config for pgrelay in front of it listening on a TCP port and a
/// Unix socket, with a takeover socket; the app user may use the console.
struct Setup {
    cluster: LocalCluster,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    /// With `top` lines at the config's top level and `sections` appended.
    async fn start_with(top: &[&str], sections: Vec<String>) -> Setup {
        let cluster = support::app_cluster(0).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let options = EnvOptions {
            pool_size: 12,
            pool_extra: vec!["shutdown_timeout = \"20s\"".into()],
            metrics: true,
            sections,
            top_extra: [
                "admin_users = [\"app\"]".to_owned(),
                format!(
                    "takeover_socket = {:?}",
                    dir.path().join("takeover.sock").display().to_string()
                ),
            ]
            .into_iter()
            .chain(top.iter().map(|line| line.to_string()))
            .collect(),
            ..EnvOptions::default()
        };
        let unix = dir.path().join(".s.PGSQL.6432");
        let text = config_text(&options, &cluster.ports()).replacen(
            "listen = [\"127.0.0.1:0\"]",
            &format!("listen = [\"127.0.0.1:0\", \"unix:{}\"]", unix.display()),
            1,
        );
        let config = dir.path().join("pgrelay.toml");
        std::fs::write(&config, text).expect("write config");
        Setup {
            cluster,
            dir,
            config,
        }
    }

    /// Started, with a first pgrelay running on it (logging to `old.log`), and
    /// the address it listens on.
    async fn running(top: &[&str], sections: Vec<String>) -> (Setup, RelayProcess, SocketAddr) {
        let setup = Setup::start_with(top, sections).await;
        let mut old = setup.relay("old.log");
        let addr = old.addr();
        (setup, old, addr)
    }

    fn relay(&self, name: &str) -> RelayProcess {
        RelayProcess::spawn(&self.config, self.dir.path().join(name), &[])
    }

    /// A process taking over from the running one, once it serves the sockets.
    fn take_over(&self, name: &str) -> RelayProcess {
        let log = self.dir.path().join(name);
        let mut relay = RelayProcess::spawn(&self.config, log, &["--takeover"]);
        relay.wait_log(
            "took over the running pgrelay's sockets",
            Duration::from_secs(30),
        );
        relay
    }
}

/// Waits for the process taken over from to exit, and checks it handed over
/// `handed` clients and left none behind.
fn handed_over(old: &mut RelayProcess, handed: usize) {
    let status = tokio::task::block_in_place(|| old.wait_exit(Duration::from_secs(15)));
    assert!(
        status.success(),
        "the old process: {status}\n{}",
        old.log_text()
    );
    let done = old.wait_log("takeover done", Duration::from_secs(1));
    assert!(
        done.contains(&format!("handed_over={handed} ")) && done.contains("left=0"),
        "{done}"
    );
}

fn conn_string(addr: SocketAddr, db: &str) -> String {
    support::relay_conn_string(addr, APP_USER, APP_PASSWORD, db)
}

/// Rows of the console's `SHOW CLIENTS` whose `column` is `value`.
async fn clients_with(addr: SocketAddr, column: &str, value: &str) -> usize {
    let console = connect_str(&conn_string(addr, "pgrelay"))
        .await
        .expect("console");
    let rows = console
        .simple_query("SHOW CLIENTS")
        .await
        .expect("SHOW CLIENTS");
    rows.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .filter(|row| row.get(column) == Some(value))
        .count()
}

fn pgbench(addr: SocketAddr, args: &[&str]) -> Command {
    let mut command = Command::new("pgbench");
    command
        .env("PGPASSWORD", APP_PASSWORD)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &addr.port().to_string(),
            "-U",
            APP_USER,
        ])
        .args(args)
        .arg(APP_DB);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_through_a_takeover_without_a_failed_transaction() {
    pgbench_through_a_takeover(&[]).await;
}

/// The same with sessions on two threads (a multi-thread runtime on both sides).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_through_a_takeover_with_worker_threads() {
    pgbench_through_a_takeover(&["worker_threads = 2"]).await;
}

async fn pgbench_through_a_takeover(top: &[&str]) {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (setup, mut old, addr) = Setup::running(top, Vec::new()).await;
    let init = pgbench(addr, &["-i", "-s", "1", "-q"])
        .output()
        .expect("pgbench -i");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );

    // Persistent clients, prepared statements, transaction mode: 8 clients for 12 s.
    let bench = pgbench(
        addr,
        &["-n", "-M", "prepared", "-c", "8", "-j", "2", "-T", "12"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start pgbench");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let new = setup.take_over("new.log");
    handed_over(&mut old, 8);

    // The old process is gone and pgbench still runs: its 8 clients are the new one's.
    assert!(
        support::eventually(Duration::from_secs(5), || async {
            clients_with(addr, "application_name", "pgbench").await == 8
        })
        .await,
        "the new process does not serve pgbench's 8 clients:\n{}",
        new.log_text()
    );
    let out = tokio::task::block_in_place(|| bench.wait_with_output()).expect("pgbench");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "pgbench failed:\n{stdout}\n{stderr}");
    assert!(!stderr.contains("aborted"), "{stderr}");
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{stdout}"
    );
    let processed: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split('/').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no transaction count:\n{stdout}"));
    // Every transaction pgbench counted committed exactly once.
    let client = connect_str(&conn_string(addr, APP_DB))
        .await
        .expect("connect");
    let history: u64 = simple_value(&client, "SELECT count(*) FROM pgbench_history")
        .await
        .parse()
        .expect("count");
    assert_eq!(history, processed, "{stdout}");
    assert!(
        new.log_text()
            .contains("handed over its clients and is done"),
        "{}",
        new.log_text()
    );
    assert!(!new.log_text().contains("panicked") && !old.log_text().contains("panicked"));
    drop(setup.cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_keep_their_session_through_a_takeover() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (setup, mut old, addr) = Setup::running(&[], Vec::new()).await;
    let metrics = old.metrics_addr();
    let url = conn_string(addr, APP_DB);

    // A client with settings, a prepared statement and a cancel key.
    let settled = connect_str(&url).await.expect("connect");
    settled
        .batch_execute("SET statement_timeout = '12345ms'; SET application_name = 'mover'")
        .await
        .expect("SET");
    let statement = settled
        .prepare("SELECT $1::int + 1")
        .await
        .expect("prepare");
    let row = settled.query_one(&statement, &[&41i32]).await.expect("run");
    assert_eq!(row.get::<_, i32>(0), 42);
    let cancel = settled.cancel_token();
    // A client on the Unix socket.
    let socket_dir = setup.dir.path().display().to_string();
    let unix = connect_str(&format!(
        "host={socket_dir} port=6432 user={APP_USER} password={APP_PASSWORD} dbname={APP_DB}"
    ))
    .await
    .expect("connect over the Unix socket");
    let unix_statement = unix
        .prepare("SELECT $1::text || '!'")
        .await
        .expect("prepare");
    // A client in the middle of a transaction when the takeover begins.
    let busy = connect_str(&url).await.expect("connect");
    busy.batch_execute("CREATE TABLE moved (n int); BEGIN; INSERT INTO moved VALUES (1)")
        .await
        .expect("begin");

    // A client in a transaction whose query is cancelled during the takeover.
    let sleeper = connect_str(&url).await.expect("connect");
    sleeper.batch_execute("BEGIN").await.expect("begin");
    // An idle console on the old process is told to go rather than kept.
    let console = connect_str(&conn_string(addr, "pgrelay"))
        .await
        .expect("console");

    let mut new = setup.take_over("new.log");
    // The old process waits for the transaction: it is still running.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(old.running(), "{}", old.log_text());
    busy.batch_execute("INSERT INTO moved VALUES (2); COMMIT")
        .await
        .expect("the transaction ends on the old process");
    // The new process accepts the CancelRequest for a query still running on the old
    // one: it is passed there.
    let sleeper_cancel = sleeper.cancel_token();
    let sleeping = tokio::spawn(async move {
        let slept = sleeper
            .simple_query("SELECT pg_sleep(20)")
            .await
            .map(|_| ());
        (sleeper, slept)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    sleeper_cancel
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel");
    let (sleeper, slept) = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("the cancel reaches the old process")
        .expect("task");
    let err = slept.expect_err("cancelled");
    assert_eq!(support::sqlstate(&err).as_deref(), Some("57014"), "{err}");
    sleeper.batch_execute("ROLLBACK").await.expect("rollback");
    handed_over(&mut old, 4);

    let err = console
        .simple_query("SHOW CLIENTS")
        .await
        .expect_err("the console was closed");
    assert!(
        err.is_closed() || support::sqlstate(&err).as_deref() == Some("57P01"),
        "{err}"
    );

    // Everything below is the new process's work: the old one is gone.
    assert_eq!(
        simple_value(&settled, "SHOW statement_timeout").await,
        "12345ms"
    );
    assert_eq!(
        simple_value(&settled, "SHOW application_name").await,
        "mover"
    );
    let row = settled.query_one(&statement, &[&1i32]).await.expect("run");
    assert_eq!(row.get::<_, i32>(0), 2);
    let row = unix
        .query_one(&unix_statement, &[&"moved"])
        .await
        .expect("run");
    assert_eq!(row.get::<_, String>(0), "moved!");
    assert_eq!(simple_value(&busy, "SELECT count(*) FROM moved").await, "2");
    // The four clients, and nobody else in the app database.
    assert_eq!(clients_with(addr, "database", APP_DB).await, 4);
    assert_eq!(
        simple_value(&sleeper, "SELECT 'still here'").await,
        "still here"
    );

    // Its cancel key still cancels its query.
    let sleeping = tokio::spawn(async move {
        settled
            .simple_query("SELECT pg_sleep(20)")
            .await
            .map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel");
    let err = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("the cancel ends the query")
        .expect("task")
        .expect_err("cancelled");
    assert_eq!(support::sqlstate(&err).as_deref(), Some("57014"), "{err}");
    // The probes and metrics are the new process's, on the same port.
    let (status, body) = support::http_get(metrics, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = support::http_get(metrics, "/metrics").await;
    assert!(body.contains("pgrelay_"), "{body}");

    // And the new process can be taken over in its turn.
    let third = setup.take_over("third.log");
    handed_over(&mut new, 3);
    let row = unix
        .query_one(&unix_statement, &[&"again"])
        .await
        .expect("run");
    assert_eq!(row.get::<_, String>(0), "again!");
    assert_eq!(
        simple_value(&busy, "SHOW statement_timeout").await,
        "0",
        "a setting of another client leaked"
    );
    let (status, _) = support::http_get(metrics, "/readyz").await;
    assert_eq!(status, 200);
    for relay in [&new, &third] {
        assert!(
            !relay.log_text().contains("panicked"),
            "{}",
            relay.log_text()
        );
    }
    drop(setup.cluster);
}

/// `--takeover` with nobody to take over from fails at once and says where it looked.
#[test]
fn a_takeover_with_no_running_pgrelay_fails_and_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("takeover.sock");
    let config = dir.path().join("pgrelay.toml");
    let base = "listen = [\"127.0.0.1:0\"]\nmetrics_listen = \"\"\n";
    let backend = "[[backends]]\nhost = \"127.0.0.1\"\nport = 1\n";
    // `run --takeover` with `text` as its config: its stderr, once it failed.
    let fails = |text: String| {
        std::fs::write(&config, text).expect("write config");
        let out = Command::new(BIN)
            .args(["run", "--takeover", "-c"])
            .arg(&config)
            .output()
            .expect("run pgrelay");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        stderr
    };
    let socket = format!("takeover_socket = {:?}\n", socket.display().to_string());
    let stderr = fails(format!("{base}{socket}{backend}"));
    assert!(
        stderr.contains("no pgrelay to take over at") && stderr.contains("takeover.sock"),
        "{stderr}"
    );
    // Without takeover_socket, --takeover says what it needs.
    let stderr = fails(format!("{base}{backend}"));
    assert!(
        stderr.contains("--takeover needs takeover_socket"),
        "{stderr}"
    );
}

/// A TLS client cannot move (its connection's keys live in the old process): it is
/// told 57P01 between transactions, as in a shutdown, and its reconnection (TLS too)
/// is the new process's. The old process does not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_is_told_to_reconnect_and_gets_the_new_process() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let _serial = ONE_AT_A_TIME.lock().await;
    let pki = support::certs::Pki::new("takeover");
    let tls = format!(
        "[tls]\nclient_mode = \"allow\"\nclient_cert = {:?}\nclient_key = {:?}",
        pki.server.cert.display().to_string(),
        pki.server.key.display().to_string()
    );
    let (setup, mut old, addr) = Setup::running(&[], vec![tls]).await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&pki.ca).expect("CA file") {
        roots.add(cert.expect("CA certificate")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connect_tls = || async {
        let conninfo = format!("{} sslmode=require", conn_string(addr, APP_DB));
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(config.clone());
        let (client, connection) = tokio_postgres::connect(&conninfo, tls)
            .await
            .expect("TLS connect");
        tokio::spawn(connection);
        client
    };
    let secure = connect_tls().await;
    assert_eq!(simple_value(&secure, "SELECT 1").await, "1");
    let plain = connect_str(&conn_string(addr, APP_DB))
        .await
        .expect("connect");

    let new = setup.take_over("new.log");
    handed_over(&mut old, 1);
    let err = secure
        .simple_query("SELECT 2")
        .await
        .expect_err("the TLS client was closed");
    assert!(
        support::sqlstate(&err).as_deref() == Some("57P01") || err.is_closed(),
        "{err}"
    );
    assert!(
        old.log_text()
            .contains("terminating connection because pgrelay is shutting down")
            || secure.is_closed(),
        "{}",
        old.log_text()
    );
    let again = connect_tls().await;
    assert_eq!(simple_value(&again, "SELECT 3").await, "3");
    assert_eq!(simple_value(&plain, "SELECT 4").await, "4");
    // The plain client handed over and the TLS client's new connection.
    assert_eq!(clients_with(addr, "database", APP_DB).await, 2);
    assert!(!new.log_text().contains("panicked"), "{}", new.log_text());
    drop(setup.cluster);
}

/// A new process that dies after it took the sockets: the old one notices, stops
/// handing over, and its remaining clients end as in a shutdown (57P01 between
/// transactions) instead of being handed to nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_dies_leaves_the_old_process_ending_as_in_a_shutdown() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (setup, mut old, addr) = Setup::running(&[], Vec::new()).await;
    let busy = connect_str(&conn_string(addr, APP_DB))
        .await
        .expect("connect");
    busy.batch_execute("CREATE TABLE kept (n int); BEGIN; INSERT INTO kept VALUES (1)")
        .await
        .expect("begin");
    let mut new = setup.take_over("new.log");
    new.kill();
    old.wait_log("the new process is gone", Duration::from_secs(5));
    busy.batch_execute("INSERT INTO kept VALUES (2); COMMIT")
        .await
        .expect("the transaction ends on the old process");
    let err = busy.simple_query("SELECT 1").await.expect_err("told to go");
    assert!(
        support::sqlstate(&err).as_deref() == Some("57P01") || err.is_closed(),
        "{err}"
    );
    handed_over(&mut old, 0);
    // The committed transaction is there (checked on the primary directly).
    let port = setup.cluster.ports()[0];
    let count = setup
        .cluster
        .psql(port, APP_DB, "SELECT count(*) FROM kept")
        .expect("psql");
    assert_eq!(count.trim(), "2");
}

/// Under a service manager (`Type=notify`, conf/systemd/pgrelay.service): pgrelay
/// reports itself ready with its pid; SIGUSR2 makes it start its own successor,
/// which takes over and reports that it is the main process now; the old process
/// exits and the client goes on with the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_starts_a_successor_that_tells_the_service_manager() {
    use std::os::unix::net::UnixDatagram;

    /// The successor is not this test's child: it is stopped by pid.
    struct Successor(Option<i32>);
    impl Drop for Successor {
        fn drop(&mut self) {
            if let Some(pid) = self.0 {
                let pid = nix::unistd::Pid::from_raw(pid);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    let _serial = ONE_AT_A_TIME.lock().await;
    let setup = Setup::start_with(&[], Vec::new()).await;
    let notify_path = setup.dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let next_message = || {
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).expect("a notify message in 30 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let env = [("NOTIFY_SOCKET", notify_path.to_str().expect("utf-8 path"))];
    let log = setup.dir.path().join("old.log");
    let mut old = RelayProcess::spawn_env(&setup.config, log, &[], &env);
    let addr = old.addr();
    let ready = tokio::task::block_in_place(next_message);
    assert_eq!(ready, format!("MAINPID={}\nREADY=1", old.pid()));

    let client = connect_str(&conn_string(addr, APP_DB))
        .await
        .expect("connect");
    let statement = client.prepare("SELECT $1::int * 2").await.expect("prepare");
    old.send(nix::sys::signal::Signal::SIGUSR2);
    let announced = tokio::task::block_in_place(next_message);
    let pid: i32 = announced
        .strip_prefix("MAINPID=")
        .and_then(|rest| rest.strip_suffix("\nREADY=1"))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("{announced:?}"));
    let _successor = Successor(Some(pid));
    assert_ne!(pid, old.pid() as i32);
    handed_over(&mut old, 1);
    let row = client.query_one(&statement, &[&21i32]).await.expect("run");
    assert_eq!(row.get::<_, i32>(0), 42);
    // The old process's output has the successor's lines too (it inherited it).
    let text = old.log_text();
    assert!(
        text.contains("SIGUSR2: started a successor to take over"),
        "{text}"
    );
    assert!(
        text.contains("took over the running pgrelay's sockets"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
}

/// The old process's idle server connections move too: the new one serves the
/// clients on the same PostgreSQL backends, and opens none of its own for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_servers_move_with_the_takeover() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (setup, mut old, addr) = Setup::running(&[], Vec::new()).await;
    let port = setup.cluster.ports()[0];
    let backends = || {
        setup
            .cluster
            .psql(
                port,
                "postgres",
                "SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity \
                 WHERE usename = 'app' AND backend_type = 'client backend'",
            )
            .expect("psql")
            .trim()
            .to_owned()
    };
    // Three clients at once in a transaction: three servers, idle once they commit.
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(
            connect_str(&conn_string(addr, APP_DB))
                .await
                .expect("connect"),
        );
    }
    for client in &clients {
        client
            .batch_execute("BEGIN; SELECT 1")
            .await
            .expect("begin");
    }
    for client in &clients {
        client.batch_execute("COMMIT").await.expect("commit");
    }
    let before = tokio::task::block_in_place(backends);
    assert_eq!(before.split(',').count(), 3, "{before}");

    let new = setup.take_over("new.log");
    handed_over(&mut old, 3);
    for client in &clients {
        client
            .batch_execute("BEGIN; SELECT 2")
            .await
            .expect("begin");
    }
    for client in &clients {
        client.batch_execute("COMMIT").await.expect("commit");
    }
    let after = tokio::task::block_in_place(backends);
    assert_eq!(after, before, "the new process opened servers of its own");
    let done = new
        .log_text()
        .lines()
        .find(|l| l.contains("handed over its clients and is done"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(done.contains("servers=3"), "{}", new.log_text());
}
