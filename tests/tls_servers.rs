//! pgrelay → PostgreSQL over TLS (`[tls] server_mode`, `server_ca`), against real
//! servers with `ssl = on` and, where it matters, a pg_hba.conf that takes only
//! `hostssl` (or only `hostnossl`): pool connections in both pool modes, health and lag
//! checks, routing to a replica, prepared statements, cancel requests, verification
//! failures (a clean client error and a log line naming the backend), `require`,
//! `prefer` and `allow` with their second tries, `disable`, SCRAM-SHA-256-PLUS (with a
//! password and with keys learned from a client), and RELOAD with a broken CA.
//!
//! This binary installs one global `tracing` subscriber writing into memory, so tests
//! can look for pgrelay's log lines (each looks for its own backend's port).

mod support;

use std::time::Duration;

use support::certs::Pki;
use support::logs::LogBuffer;
use support::{
    config_text, eventually, simple_value, sqlstate, start, start_relay, EnvOptions, ServerSsl,
    SslHba, TestEnv, APP_DB, APP_PASSWORD, APP_USER,
};

const WAIT: Duration = Duration::from_secs(30);
const SSL_OF_MY_BACKEND: &str = "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

/// The lines pgrelay logged so far (at DEBUG) that contain every one of `needles`.
fn logged(needles: &[&str]) -> Vec<String> {
    logs().lines_with(needles)
}

fn logs() -> &'static LogBuffer {
    support::logs::captured("pgrelay=debug")
}

fn tls_section(mode: &str, ca: &std::path::Path) -> String {
    format!(
        "[tls]\nserver_mode = \"{mode}\"\nserver_ca = \"{}\"",
        ca.display()
    )
}

/// Servers with TLS (and the logins `hba` takes), pgrelay with `mode` and `ca`.
fn options(pki: &Pki, hba: SslHba, mode: &str, ca: &std::path::Path) -> EnvOptions {
    logs();
    EnvOptions {
        server_ssl: Some(ServerSsl {
            pem: pki.server.clone(),
            hba,
        }),
        sections: vec![
            tls_section(mode, ca),
            // A node nobody can log in to leaves no primary: clients wait this long.
            "[failover]\nhold_timeout = \"1s\"".to_owned(),
        ],
        ..EnvOptions::default()
    }
}

async fn ssl_through(env: &TestEnv) -> String {
    simple_value(&env.client().await, SSL_OF_MY_BACKEND).await
}

/// Whether pgrelay sees every node up, the primary known.
async fn all_up(env: &TestEnv) -> bool {
    eventually(WAIT, || async {
        let topology = env.relay.shared.cluster.snapshot();
        topology.primary.is_some() && topology.nodes.iter().all(|n| n.is_up())
    })
    .await
}

/// `SHOW POOL_NODES`, one map per node.
async fn pool_nodes(
    console: &tokio_postgres::Client,
) -> Vec<std::collections::HashMap<String, String>> {
    let messages = console.simple_query("SHOW POOL_NODES").await.expect("SHOW");
    messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                row.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_owned(), row.get(i).unwrap_or("").to_owned()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// verify-full with the right CA, servers that refuse plaintext: pool connections,
/// health checks and lag checks all get through; reads reach the replica over TLS,
/// prepared statements work, and each server session is TLS.
#[tokio::test]
async fn verify_full_with_a_replica_transaction_mode() {
    let pki = Pki::new("servers");
    let mut relay_users = EnvOptions::default().relay_users;
    relay_users.push(("admin".into(), "admin-secret".into()));
    let env = start(EnvOptions {
        replicas: 1,
        routing: vec![
            "enabled = true".into(),
            "lag_check_period = \"200ms\"".into(),
        ],
        weights: vec![0.0, 1.0],
        relay_users,
        top_extra: vec!["admin_users = [\"admin\"]".into()],
        ..options(&pki, SslHba::TlsOnly, "verify-full", &pki.ca)
    })
    .await;
    assert!(
        all_up(&env).await,
        "health checks over TLS never saw the nodes"
    );
    let console = support::connect_str(&env.conn_string("admin", "admin-secret", "pgrelay"))
        .await
        .expect("console");
    let nodes = pool_nodes(&console).await;
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    for node in &nodes {
        assert_eq!(
            node.get("status").map(String::as_str),
            Some("up"),
            "{nodes:?}"
        );
    }
    assert_eq!(
        nodes[1].get("role").map(String::as_str),
        Some("standby"),
        "{nodes:?}"
    );
    let replica = env.cluster.replica_ports()[0];
    let readable = eventually(WAIT, || async {
        env.relay.shared.cluster.snapshot().nodes[1].readable
    })
    .await;
    assert!(readable, "the lag check never measured the replica");

    let client = env.client().await;
    // pg_backend_pid() would send the read to the primary (the classifier lists it as
    // a session function): every client session on the serving node is checked.
    let statement = client
        .prepare(
            "SELECT bool_and(ssl) AND count(*) > 0, inet_server_port() \
             FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE backend_type = 'client backend'",
        )
        .await
        .expect("prepare");
    for _ in 0..5 {
        let row = client.query_one(&statement, &[]).await.expect("read");
        assert!(row.get::<_, bool>(0), "a server session without TLS");
        assert_eq!(
            row.get::<_, i32>(1),
            i32::from(replica),
            "read not on the replica"
        );
    }
    // A write goes to the primary, over TLS too.
    client
        .batch_execute("CREATE TABLE tls_t(x int)")
        .await
        .expect("create");
    let row = client
        .query_one(
            "INSERT INTO tls_t VALUES (1) RETURNING inet_server_port(), \
             (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())",
            &[],
        )
        .await
        .expect("insert");
    assert_eq!(row.get::<_, i32>(0), i32::from(env.cluster.primary_port()));
    assert!(row.get::<_, bool>(1));
}

/// Session mode: the client's server is a TLS session; prepared statements work.
#[tokio::test]
async fn verify_full_session_mode() {
    let pki = Pki::new("session");
    let env = start(EnvOptions {
        pool_mode: "session",
        ..options(&pki, SslHba::TlsOnly, "verify-full", &pki.ca)
    })
    .await;
    let client = env.client().await;
    let statement = client
        .prepare("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND $1::int = 1")
        .await
        .expect("prepare");
    for _ in 0..3 {
        let row = client.query_one(&statement, &[&1i32]).await.expect("query");
        assert!(row.get::<_, bool>(0));
    }
}

/// verify-full by host name: `localhost` is checked against the certificate (and sent
/// as SNI).
#[tokio::test]
async fn verify_full_by_host_name() {
    let pki = Pki::new("by-name");
    let options = options(&pki, SslHba::TlsOnly, "verify-full", &pki.ca);
    let env = start(options.clone()).await;
    let text = config_text(&options, &env.cluster.ports())
        .replace("host = \"127.0.0.1\"", "host = \"localhost\"");
    let config = pgrelay::config::Config::from_toml_str(&text).expect("config");
    let relay = pgrelay::listener::Pgrelay::start(config)
        .await
        .expect("start");
    let conn = support::relay_conn_string(relay.addrs[0], APP_USER, APP_PASSWORD, APP_DB);
    let client = support::connect_str(&conn).await.expect("connect");
    assert_eq!(simple_value(&client, SSL_OF_MY_BACKEND).await, "true");
}

/// A certificate from another CA: the client is told 08006 at once (not after a
/// wait), and the log says which backend and why.
#[tokio::test]
async fn verify_full_with_the_wrong_ca_fails_cleanly() {
    let (pki, other) = (Pki::new("right"), Pki::new("other"));
    let env = start(options(&pki, SslHba::Any, "verify-full", &other.ca)).await;
    let started = std::time::Instant::now();
    let err = env
        .connect(APP_USER, APP_PASSWORD, APP_DB)
        .await
        .expect_err("no server can be verified");
    assert_eq!(sqlstate(&err).as_deref(), Some("08006"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the client waited"
    );
    let port = env.cluster.primary_port().to_string();
    let lines = logged(&["UnknownIssuer", &format!("127.0.0.1:{port}")]);
    assert!(
        !lines.is_empty(),
        "no log line names the backend and the reason"
    );
    // verify-ca checks the chain as well.
    let options = options(&pki, SslHba::Any, "verify-ca", &other.ca);
    let relay = start_relay(&options, &env.cluster.ports()).await;
    let conn = support::relay_conn_string(relay.addrs[0], APP_USER, APP_PASSWORD, APP_DB);
    let err = support::connect_str(&conn).await.expect_err("refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("08006"), "{err}");
}

/// The primary is known and up when its certificate stops verifying (here: RELOAD to
/// another CA): a client that needs a new server connection is told 08006 at once,
/// and the log names the backend and the reason.
#[tokio::test]
async fn a_server_failing_verification_under_a_client() {
    let (pki, other) = (Pki::new("before"), Pki::new("after"));
    let options = EnvOptions {
        sections: vec![tls_section("verify-full", &pki.ca)],
        ..options(&pki, SslHba::Any, "verify-full", &pki.ca)
    };
    let env = start(options.clone()).await;
    assert_eq!(ssl_through(&env).await, "true");
    let text = config_text(&options, &env.cluster.ports()).replace(
        &format!("server_ca = \"{}\"", pki.ca.display()),
        &format!("server_ca = \"{}\"", other.ca.display()),
    );
    let path = pki.dir().join("pgrelay.toml");
    std::fs::write(&path, text).expect("write config");
    env.relay.reload(&path).expect("reload");
    env.relay.shared.pools.close_idle_for_dbname(APP_DB);
    let started = std::time::Instant::now();
    let err = match env.connect(APP_USER, APP_PASSWORD, APP_DB).await {
        Err(err) => err,
        Ok(client) => client
            .simple_query("SELECT 1")
            .await
            .expect_err("no server can be verified"),
    };
    assert_eq!(sqlstate(&err).as_deref(), Some("08006"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the client waited"
    );
    let port = env.cluster.primary_port().to_string();
    let lines = logged(&[
        "no server for a client",
        "UnknownIssuer",
        &format!("127.0.0.1:{port}"),
    ]);
    assert!(
        !lines.is_empty(),
        "no log line names the backend and the reason"
    );
}

/// A `server_ca` that cannot be loaded at start: pgrelay refuses to start.
#[tokio::test]
async fn a_missing_ca_refuses_to_start() {
    let pki = Pki::new("missing");
    let missing = pki.dir().join("missing.pem");
    let text = format!(
        "listen = [\"127.0.0.1:0\"]\nmetrics_listen = \"\"\n[[backends]]\nhost = \"127.0.0.1\"\nport = 1\n{}\n",
        tls_section("verify-full", &missing)
    );
    let config = pgrelay::config::Config::from_toml_str(&text).expect("valid config");
    let Err(err) = pgrelay::listener::Pgrelay::start(config).await else {
        panic!("pgrelay started without its server_ca");
    };
    assert!(err.to_string().contains("missing.pem"), "{err}");
}

/// require checks no certificate: the wrong CA does not matter.
#[tokio::test]
async fn require_with_the_wrong_ca_connects() {
    let (pki, other) = (Pki::new("req"), Pki::new("req-other"));
    let env = start(options(&pki, SslHba::TlsOnly, "require", &other.ca)).await;
    assert_eq!(ssl_through(&env).await, "true");
}

/// prefer against a server without TLS: plaintext.
#[tokio::test]
async fn prefer_without_server_tls_is_plaintext() {
    logs();
    let env = start(EnvOptions::default()).await;
    assert_eq!(ssl_through(&env).await, "false");
}

/// prefer against a server with TLS uses it; allow logs in in plaintext where it may,
/// and over TLS where plaintext is refused.
#[tokio::test]
async fn prefer_and_allow() {
    let pki = Pki::new("prefer");
    let env = start(options(&pki, SslHba::Any, "prefer", &pki.ca)).await;
    assert_eq!(ssl_through(&env).await, "true");
    let allow = options(&pki, SslHba::Any, "allow", &pki.ca);
    let relay = start_relay(&allow, &env.cluster.ports()).await;
    let conn = support::relay_conn_string(relay.addrs[0], APP_USER, APP_PASSWORD, APP_DB);
    let client = support::connect_str(&conn).await.expect("allow");
    assert_eq!(simple_value(&client, SSL_OF_MY_BACKEND).await, "false");

    let ssl_only = start(options(&pki, SslHba::TlsOnly, "allow", &pki.ca)).await;
    assert!(
        all_up(&ssl_only).await,
        "allow's retry over TLS never reached the node"
    );
    assert_eq!(ssl_through(&ssl_only).await, "true");
}

/// prefer against a server that refuses logins over TLS (`hostnossl` only): as libpq,
/// pgrelay tries once more in plaintext, for pool connections and health checks.
/// require does not.
#[tokio::test]
async fn prefer_falls_back_to_plaintext_when_tls_logins_are_refused() {
    let pki = Pki::new("nossl");
    let env = start(options(&pki, SslHba::PlaintextOnly, "prefer", &pki.ca)).await;
    assert!(all_up(&env).await, "the health check never fell back");
    assert_eq!(ssl_through(&env).await, "false");
    let port = env.cluster.primary_port().to_string();
    assert!(
        !logged(&["trying once more", &format!("port={port}")]).is_empty(),
        "the second try was not logged"
    );
    let require = options(&pki, SslHba::PlaintextOnly, "require", &pki.ca);
    let relay = start_relay(&require, &env.cluster.ports()).await;
    let conn = support::relay_conn_string(relay.addrs[0], APP_USER, APP_PASSWORD, APP_DB);
    let err = support::connect_str(&conn).await.expect_err("refused");
    assert!(
        matches!(sqlstate(&err).as_deref(), Some("28000") | Some("08006")),
        "{err}"
    );
}

/// disable against a server that takes only hostssl: the server's own refusal
/// (28000, no pg_hba.conf entry) reaches the client, without a hang.
#[tokio::test]
async fn disable_against_a_tls_only_server_fails_cleanly() {
    let pki = Pki::new("disable");
    let env = start(options(&pki, SslHba::TlsOnly, "disable", &pki.ca)).await;
    let started = std::time::Instant::now();
    let err = env
        .connect(APP_USER, APP_PASSWORD, APP_DB)
        .await
        .expect_err("refused");
    let code = sqlstate(&err);
    assert!(
        matches!(code.as_deref(), Some("28000") | Some("08006")),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the client waited"
    );
}

/// SCRAM-SHA-256-PLUS: over TLS pgrelay picks it whenever the server offers it, with
/// a password and with the keys a client proved (a `[[users]]` SCRAM secret).
/// PostgreSQL checks the binding data of a -PLUS exchange, so these logins succeeding
/// prove the certificate hash was right; pgrelay's debug line says which mechanism.
#[tokio::test]
async fn scram_sha_256_plus_to_servers() {
    let pki = Pki::new("plus");
    let env = start(options(&pki, SslHba::TlsOnly, "verify-full", &pki.ca)).await;
    assert_eq!(ssl_through(&env).await, "true");
    let port = env.cluster.primary_port().to_string();
    let plus = || logged(&["SCRAM-SHA-256-PLUS", &format!("port={port}")]).len();
    let by_password = plus();
    assert!(by_password > 0, "no -PLUS login logged");

    // Keys learned from a client: pgrelay holds only the SCRAM secret.
    let secret = env.psql_direct(
        env.cluster.primary_port(),
        "SELECT rolpassword FROM pg_authid WHERE rolname = 'app'",
    );
    let keys = EnvOptions {
        relay_users: vec![(APP_USER.into(), secret.trim().to_owned())],
        ..options(&pki, SslHba::TlsOnly, "verify-full", &pki.ca)
    };
    let relay = start_relay(&keys, &env.cluster.ports()).await;
    let conn = support::relay_conn_string(relay.addrs[0], APP_USER, APP_PASSWORD, APP_DB);
    let client = support::connect_str(&conn)
        .await
        .expect("login with learned keys");
    assert_eq!(simple_value(&client, SSL_OF_MY_BACKEND).await, "true");
    assert!(plus() > by_password, "the login with keys was not -PLUS");

    // Cancel requests reach a hostssl-only server (PostgreSQL checks no pg_hba.conf
    // line for them, and pgrelay sends them in plaintext, as libpq before 17).
    let sleeper = env.client().await;
    let token = sleeper.cancel_token();
    let sleeping = tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(20)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel");
    let err = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("the query was not cancelled")
        .expect("task")
        .expect_err("cancelled");
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
}

/// RELOAD with a `server_ca` that cannot be read: logged, and new server connections
/// keep the previous settings (they still verify, and succeed).
#[tokio::test]
async fn reload_with_a_broken_ca_keeps_the_old_settings() {
    let pki = Pki::new("reload");
    let options = options(&pki, SslHba::TlsOnly, "verify-full", &pki.ca);
    let env = start(options.clone()).await;
    assert_eq!(ssl_through(&env).await, "true");
    let broken = pki.dir().join("gone.pem");
    let text = config_text(&options, &env.cluster.ports()).replace(
        &format!("server_ca = \"{}\"", pki.ca.display()),
        &format!("server_ca = \"{}\"", broken.display()),
    );
    let path = pki.dir().join("pgrelay.toml");
    std::fs::write(&path, text).expect("write config");
    env.relay.reload(&path).expect("the config itself is valid");
    assert!(
        !logged(&["server TLS settings not reloaded", "gone.pem"]).is_empty(),
        "the failed reload was not logged"
    );
    // New server connections: the idle ones are closed first.
    env.relay.shared.pools.close_idle_for_dbname(APP_DB);
    assert_eq!(ssl_through(&env).await, "true");
    assert!(all_up(&env).await);
}
