//! Authentication on both sides of pgrelay, against real PostgreSQL and real clients
//! (tokio-postgres and psql): every client `auth_type`, every form a password may take
//! in pgrelay's config (plaintext, `md5<hex>`, a SCRAM secret taken from the server),
//! and every method a server may ask pgrelay for.

mod support;

use std::net::SocketAddr;

use pgrelay::config::Config;
use support::{raw, start, start_relay, EnvOptions, TestEnv, APP_DB, APP_PASSWORD, APP_USER};

/// Authentication request codes (the `R` message's first field).
const AUTH_OK: i32 = 0;
const AUTH_CLEARTEXT: i32 = 3;
const AUTH_MD5: i32 = 5;
const AUTH_SASL: i32 = 10;

const WRONG_PASSWORD: &str = "not-the-password";
const UNKNOWN_USER: &str = "ghost";

async fn connect(
    addr: SocketAddr,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    support::connect_str(&support::relay_conn_string(addr, user, password, APP_DB)).await
}

/// A query runs through the client's session, as the app user, on the app database.
/// Simple protocol: named prepared statements in transaction mode are not this file's
/// subject.
async fn assert_query_runs(client: &tokio_postgres::Client) {
    let messages = client
        .simple_query("SELECT current_user, current_database(), 40 + 2")
        .await
        .expect("query through pgrelay");
    let row = messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .expect("a row");
    let values: Vec<_> = (0..row.len()).map(|i| row.get(i)).collect();
    assert_eq!(values, [Some(APP_USER), Some(APP_DB), Some("42")]);
}

/// The error a failed password login must produce: FATAL 28P01 with PostgreSQL's text.
/// Returns the severity so callers can compare two failures.
fn assert_password_failure(err: &tokio_postgres::Error, user: &str) -> String {
    support::password_failure(err, user).severity().to_owned()
}

/// Right password, wrong password and unknown user against a relay that asks for a
/// password with request `expected_code`.
async fn check_password_logins(addr: SocketAddr, expected_code: i32) {
    assert_eq!(
        raw::first_auth_request(addr, APP_USER, APP_DB).await,
        Some(expected_code)
    );
    // An unknown user is asked exactly the same way: nothing tells it apart yet.
    assert_eq!(
        raw::first_auth_request(addr, UNKNOWN_USER, APP_DB).await,
        Some(expected_code)
    );
    let client = connect(addr, APP_USER, APP_PASSWORD)
        .await
        .expect("right password");
    assert_query_runs(&client).await;
    let wrong = connect(addr, APP_USER, WRONG_PASSWORD)
        .await
        .expect_err("wrong password must fail");
    let unknown = connect(addr, UNKNOWN_USER, APP_PASSWORD)
        .await
        .expect_err("unknown user must fail");
    let wrong_severity = assert_password_failure(&wrong, APP_USER);
    let unknown_severity = assert_password_failure(&unknown, UNKNOWN_USER);
    assert_eq!(wrong_severity, unknown_severity);
    assert_eq!(wrong_severity, "FATAL");
    // The failures did not disturb the logged-in client.
    assert_query_runs(&client).await;
}

/// Runs psql through a relay; returns (success, stdout, stderr).
fn psql(addr: SocketAddr, user: &str, password: &str, sql: &str) -> (bool, String, String) {
    let out = std::process::Command::new("psql")
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .args(["-X", "-tA", "-h", "127.0.0.1", "-p"])
        .arg(addr.port().to_string())
        .args(["-U", user, "-d", APP_DB, "-c", sql])
        .output()
        .expect("run psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// libpq (psql) logs in with the right password and is refused with the wrong one.
fn check_psql_logins(addr: SocketAddr) {
    let (ok, out, err) =
        tokio::task::block_in_place(|| psql(addr, APP_USER, APP_PASSWORD, "SELECT current_user"));
    assert!(ok, "psql with the right password failed: {err}");
    assert_eq!(out.trim(), APP_USER);
    let (ok, _, err) =
        tokio::task::block_in_place(|| psql(addr, APP_USER, WRONG_PASSWORD, "SELECT current_user"));
    assert!(!ok, "psql with a wrong password succeeded");
    assert!(
        err.contains("password authentication failed for user \"app\""),
        "{err}"
    );
}

async fn env_with_client_auth(client_auth: &'static str) -> TestEnv {
    start(EnvOptions {
        client_auth,
        ..Default::default()
    })
    .await
}

/// The SCRAM secret PostgreSQL stores for the app user.
async fn server_secret(env: &TestEnv) -> String {
    support::stored_secret(&env.direct_superuser().await, APP_USER).await
}

/// `auth_type = "trust"`: no password is asked (a client without one gets in), any
/// password is ignored, and a user missing from `[[users]]` is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_auth_trust() {
    let env = env_with_client_auth("trust").await;
    assert_eq!(
        raw::first_auth_request(env.addr, APP_USER, APP_DB).await,
        Some(AUTH_OK)
    );
    let no_password = format!(
        "host=127.0.0.1 port={} user={APP_USER} dbname={APP_DB} connect_timeout=10",
        env.port()
    );
    let client = support::connect_str(&no_password)
        .await
        .expect("trust needs no password");
    assert_query_runs(&client).await;
    let other = connect(env.addr, APP_USER, WRONG_PASSWORD)
        .await
        .expect("trust ignores the password");
    assert_query_runs(&other).await;
    let err = connect(env.addr, UNKNOWN_USER, APP_PASSWORD)
        .await
        .expect_err("a user pgrelay does not know is refused even with trust");
    assert_eq!(support::sqlstate(&err).as_deref(), Some("28000"), "{err}");
    assert_query_runs(&client).await;
}

/// `auth_type = "plain"`: a cleartext password request, answered by tokio-postgres and
/// psql.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_auth_plain() {
    let env = env_with_client_auth("plain").await;
    check_password_logins(env.addr, AUTH_CLEARTEXT).await;
    check_psql_logins(env.addr);
}

/// `auth_type = "md5"` with a plaintext password in the config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_auth_md5() {
    let env = env_with_client_auth("md5").await;
    check_password_logins(env.addr, AUTH_MD5).await;
    check_psql_logins(env.addr);
}

/// `auth_type = "scram-sha-256"` with a plaintext password in the config (pgrelay
/// derives the secret).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_auth_scram() {
    let env = env_with_client_auth("scram-sha-256").await;
    check_password_logins(env.addr, AUTH_SASL).await;
    check_psql_logins(env.addr);
}

/// An `md5<hex>` hash in pgrelay's config, in front of a server that stores md5 and
/// asks for md5: clients log in with md5 (and with cleartext, checked against the
/// hash), pgrelay logs in to the server with the hash alone. The hash cannot serve
/// SCRAM clients, which the config check says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_hash_in_config_with_md5_server() {
    let hash = postgres_protocol::password::md5(APP_PASSWORD.as_bytes(), APP_USER);
    let options = EnvOptions {
        client_auth: "md5",
        server_auth: "md5",
        server_conf: vec!["password_encryption = 'md5'".into()],
        relay_users: vec![(APP_USER.into(), hash.clone())],
        ..Default::default()
    };
    let env = start(options.clone()).await;
    // The hash in pgrelay's config is exactly what PostgreSQL stores: md5(password||user).
    assert_eq!(server_secret(&env).await, hash);
    check_password_logins(env.addr, AUTH_MD5).await;

    let plain = start_relay(
        &EnvOptions {
            client_auth: "plain",
            ..options.clone()
        },
        &env.cluster.ports(),
    )
    .await;
    check_password_logins(plain.addrs[0], AUTH_CLEARTEXT).await;

    let scram = support::config_text(
        &EnvOptions {
            client_auth: "scram-sha-256",
            ..options
        },
        &env.cluster.ports(),
    );
    let err = Config::from_toml_str(&scram).expect_err("md5 hash with scram auth_type");
    assert_eq!(err.key(), Some("users[0].password"), "{err}");
}

/// A SCRAM secret in pgrelay's config, copied from the server: pgrelay knows no
/// password, so it can log in to the SCRAM server only with the ClientKey a client
/// proved to it (PgBouncer's approach). Cleartext clients work too: pgrelay checks the
/// password against the secret and then uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_secret_in_config() {
    let env = start(EnvOptions::default()).await;
    let secret = server_secret(&env).await;
    assert!(secret.starts_with("SCRAM-SHA-256$"), "{secret}");
    let options = EnvOptions {
        relay_users: vec![(APP_USER.into(), secret)],
        ..Default::default()
    };
    let relay = start_relay(&options, &env.cluster.ports()).await;
    // Wrong password and unknown user first: neither may teach pgrelay a usable key.
    check_password_logins(relay.addrs[0], AUTH_SASL).await;
    check_psql_logins(relay.addrs[0]);

    let plain = start_relay(
        &EnvOptions {
            client_auth: "plain",
            ..options
        },
        &env.cluster.ports(),
    )
    .await;
    check_password_logins(plain.addrs[0], AUTH_CLEARTEXT).await;
}

/// `auth_type = "md5"` for a user whose config password is a SCRAM secret: md5 cannot
/// be checked against it, so the client is asked for SCRAM instead, succeeds, and its
/// proven key gets pgrelay into the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_auth_type_falls_back_to_scram_for_scram_secret() {
    let env = start(EnvOptions::default()).await;
    let secret = server_secret(&env).await;
    let options = EnvOptions {
        client_auth: "md5",
        relay_users: vec![(APP_USER.into(), secret)],
        ..Default::default()
    };
    let relay = start_relay(&options, &env.cluster.ports()).await;
    let addr = relay.addrs[0];
    assert_eq!(
        raw::first_auth_request(addr, APP_USER, APP_DB).await,
        Some(AUTH_SASL)
    );
    let client = connect(addr, APP_USER, APP_PASSWORD)
        .await
        .expect("SCRAM instead of md5");
    assert_query_runs(&client).await;
    let err = connect(addr, APP_USER, WRONG_PASSWORD)
        .await
        .expect_err("wrong password");
    assert_password_failure(&err, APP_USER);
    check_psql_logins(addr);
}

/// pgrelay (holding the plaintext password) logs in to a server using `server_auth`,
/// and with a wrong password configured the server's refusal reaches the client
/// (except under trust, where the server checks nothing).
async fn server_method(server_auth: &'static str, server_conf: Vec<String>) {
    let env = start(EnvOptions {
        server_auth,
        server_conf,
        ..Default::default()
    })
    .await;
    let client = env.client().await;
    assert_query_runs(&client).await;

    let wrong = EnvOptions {
        relay_users: vec![(APP_USER.into(), WRONG_PASSWORD.into())],
        ..Default::default()
    };
    let relay = start_relay(&wrong, &env.cluster.ports()).await;
    let result = connect(relay.addrs[0], APP_USER, WRONG_PASSWORD).await;
    match (server_auth, result) {
        ("trust", Ok(other)) => assert_query_runs(&other).await,
        ("trust", Err(err)) => panic!("a trust server refused pgrelay: {err}"),
        (_, Ok(_)) => panic!("{server_auth} server accepted a wrong password"),
        (_, Err(err)) => {
            assert_password_failure(&err, APP_USER);
        }
    }
    assert_query_runs(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_asks_nothing_trust() {
    server_method("trust", Vec::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_asks_cleartext_password() {
    server_method("password", Vec::new()).await;
}

/// With md5-stored passwords the server really asks for md5 (with SCRAM-stored ones an
/// `md5` pg_hba line would run SCRAM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_asks_md5() {
    server_method("md5", vec!["password_encryption = 'md5'".into()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_asks_scram() {
    server_method("scram-sha-256", Vec::new()).await;
}
