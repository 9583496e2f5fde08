//! Passwords never reach the logs. This binary installs one global `tracing`
//! subscriber at TRACE level (which also takes the `log` records of tokio-postgres)
//! writing into memory, drives logins that succeed and fail on both sides of pgrelay
//! and configs with bad password fields, then searches everything logged for every
//! password, hash and key involved.

mod support;

use base64::Engine as _;
use pgrelay::config::Config;
use support::logs::LogBuffer;
use support::{start, start_relay, EnvOptions, TestEnv, APP_DB, APP_USER};

const RIGHT: &str = "Right-Pw-4ee1c9";
const WRONG: &str = "Wrong-Pw-77b2d0";
/// What pgrelay is told for a server that holds another password.
const STALE: &str = "Stale-Pw-5c8a21";
/// The health check's own login.
const PROBE_USER: &str = "probe";
const PROBE: &str = "Probe-Pw-1d9e3f";

/// Everything logged by this binary, at every level.
fn logs() -> &'static LogBuffer {
    support::logs::captured("trace")
}

/// Asserts that nothing logged so far contains any of `secrets`, in plain text or as a
/// `Debug`-printed byte list.
fn assert_not_logged(secrets: &[String]) {
    let text = logs().text();
    for secret in secrets {
        let as_bytes = format!("{:?}", secret.as_bytes());
        for form in [secret.as_str(), as_bytes.as_str()] {
            if let Some(at) = text.find(form) {
                let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
                let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
                panic!("a secret was logged: {}", &text[start..end]);
            }
        }
    }
}

fn options(client_auth: &'static str, password: &str) -> EnvOptions {
    EnvOptions {
        client_auth,
        server_users: vec![
            (APP_USER.into(), RIGHT.into()),
            (PROBE_USER.into(), PROBE.into()),
        ],
        relay_users: vec![(APP_USER.into(), password.into())],
        // The health check logs in to the servers with a password of its own.
        top_extra: vec![
            "[health_check]".into(),
            format!("user = \"{PROBE_USER}\""),
            format!("password = \"{PROBE}\""),
            format!("database = \"{APP_DB}\""),
        ],
        ..Default::default()
    }
}

/// One login through a relay, with a query when it succeeds. Returns whether it did.
async fn login(addr: std::net::SocketAddr, user: &str, password: &str) -> bool {
    let conn = support::relay_conn_string(addr, user, password, APP_DB);
    match support::connect_str(&conn).await {
        Ok(client) => {
            client.simple_query("SELECT 1").await.expect("query");
            true
        }
        Err(_) => false,
    }
}

/// A right, a wrong and an unknown-user login through a relay configured with
/// `password` for the app user and `client_auth`.
async fn logins(env: &TestEnv, client_auth: &'static str, password: &str) {
    let relay = start_relay(&options(client_auth, password), &env.cluster.ports()).await;
    let addr = relay.addrs[0];
    assert!(
        login(addr, APP_USER, RIGHT).await,
        "{client_auth}: right password"
    );
    assert!(
        !login(addr, APP_USER, WRONG).await,
        "{client_auth}: wrong password"
    );
    assert!(
        !login(addr, "nobody", RIGHT).await,
        "{client_auth}: unknown user"
    );
}

/// The parts of a SCRAM secret that are secret: StoredKey and ServerKey (base64).
fn scram_keys(secret: &str) -> Vec<String> {
    let keys = secret.rsplit('$').next().expect("keys");
    let (stored, server) = keys.split_once(':').expect("StoredKey:ServerKey");
    vec![stored.to_owned(), server.to_owned()]
}

/// Logins of every kind against a SCRAM server and a server asking for cleartext
/// passwords: client auth plain, md5 and SCRAM; config passwords in plaintext and as
/// the server's SCRAM secret; the health check logging in with a password; and a
/// relay whose password the server rejects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_never_log_passwords() {
    logs();
    let (scram_server, cleartext_server) = tokio::join!(
        start(options("scram-sha-256", RIGHT)),
        start(EnvOptions {
            server_auth: "password",
            ..options("plain", RIGHT)
        })
    );
    let secret = support::stored_secret(&scram_server.direct_superuser().await, APP_USER).await;

    for client_auth in ["plain", "md5", "scram-sha-256"] {
        logins(&scram_server, client_auth, RIGHT).await;
    }
    for client_auth in ["plain", "scram-sha-256"] {
        logins(&scram_server, client_auth, &secret).await;
    }
    logins(&cleartext_server, "plain", RIGHT).await;
    logins(&cleartext_server, "scram-sha-256", RIGHT).await;

    // pgrelay holds a password the server no longer accepts.
    let stale = start_relay(&options("plain", STALE), &cleartext_server.cluster.ports()).await;
    assert!(!login(stale.addrs[0], APP_USER, STALE).await);

    let text = logs().text();
    assert!(
        text.contains("client login refused"),
        "pgrelay's refusals were not captured; the test would prove nothing:\n{text}"
    );
    assert!(text.contains("listening"), "{text}");
    let md5_hash = postgres_protocol::password::md5(RIGHT.as_bytes(), APP_USER);
    let mut secrets: Vec<String> = [RIGHT, WRONG, STALE, PROBE, &md5_hash[3..]]
        .iter()
        .map(|s| s.to_string())
        .collect();
    secrets.extend(scram_keys(&secret));
    secrets.push(base64::engine::general_purpose::STANDARD.encode(RIGHT));
    assert_not_logged(&secrets);
}

/// Config files with bad password fields, rejected as `pgrelay check` and a reload
/// would reject them and logged as pgrelay logs such errors: no error text, `Display`
/// or `Debug`, quotes the password. A valid config's `Debug` is logged too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_never_log_passwords() {
    logs();
    let backend = "[[backends]]\nhost = \"127.0.0.1\"\nport = 5432\n";
    let md5_like = "md50123456789abcdef0123456789abcde";
    let cases = [
        (
            "users[0].password",
            format!("{backend}[[users]]\nname = \"a\"\npassword = [\"Array-Pw-31f0aa\"]\n"),
            "Array-Pw-31f0aa",
        ),
        (
            "users[0].password",
            format!("{backend}[[users]]\nname = \"a\"\npassword = \"{md5_like}\"\n"),
            md5_like,
        ),
        (
            "users[0].password",
            format!(
                "{backend}[[users]]\nname = \"a\"\n\
                 password = \"SCRAM-SHA-256$4096:c2FsdA==$Scram-Stored-Pw:Scram-Server-Pw\"\n"
            ),
            "Scram-Stored-Pw",
        ),
        (
            "health_check.password",
            format!("[health_check]\npassword = 8675309112358\n{backend}"),
            "8675309112358",
        ),
        (
            "line 6",
            format!("{backend}[[users]]\nname = \"a\"\npassword = \"Unterminated-Pw-8e2\n"),
            "Unterminated-Pw-8e2",
        ),
    ];
    let mut secrets = Vec::new();
    for (key, text, secret) in &cases {
        let err = Config::from_toml_str(text).expect_err(secret);
        assert_eq!(err.key(), Some(*key), "{err}");
        // What `pgrelay check` prints, and what a rejected reload logs.
        let check_line = format!("pgrelay.toml: {err}");
        tracing::error!(%err, "{check_line}");
        tracing::error!(?err, "reload rejected; keeping the running configuration");
        secrets.push(secret.to_string());
    }

    let valid = format!(
        "[health_check]\npassword = \"Probe-Debug-Pw\"\n{backend}\
         [[users]]\nname = \"a\"\npassword = \"User-Debug-Pw\"\n"
    );
    let config = Config::from_toml_str(&valid).expect("valid config");
    tracing::debug!(?config, "loaded configuration");
    secrets.extend(["Probe-Debug-Pw".to_owned(), "User-Debug-Pw".to_owned()]);

    let text = logs().text();
    assert!(
        text.contains("users[0].password") && text.contains("health_check.password"),
        "the errors were not captured; the test would prove nothing:\n{text}"
    );
    assert!(text.contains("Secret::Plain(<redacted>)"), "{text}");
    assert_not_logged(&secrets);
}
