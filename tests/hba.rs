//! `[[hba]]` access rules and the Unix-socket listener, against real PostgreSQL and real
//! clients (psql, tokio-postgres, raw sockets): `reject` and no matching rule refuse
//! with PostgreSQL's words (28000), the first matching rule's method replaces
//! `auth_type`, `hostssl`/`hostnossl` follow the client's TLS, IPv6 ranges, `local`
//! rules for Unix-socket clients (which are answered `N` to an SSLRequest), and RELOAD
//! changing the rules for new logins only.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pgrelay::config::Config;
use pgrelay::listener::Pgrelay;
use support::certs::Pki;
use support::{raw, EnvOptions, TestEnv, APP_DB, APP_PASSWORD, APP_USER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OTHER_USER: &str = "other";
const OTHER_PASSWORD: &str = "other-secret";
const WRONG_PASSWORD: &str = "not-the-password";

/// Authentication request codes (the `R` message's first field).
const AUTH_OK: i32 = 0;
const AUTH_CLEARTEXT: i32 = 3;
const AUTH_SASL: i32 = 10;

/// The port in the Unix socket's file name (`.s.PGSQL.<port>`): psql `-p` picks it.
const SOCKET_PORT: u16 = 6543;

/// A `[[hba]]` entry; an empty `address` leaves the key out (for `local`).
fn rule(kind: &str, database: &str, user: &str, address: &str, method: &str) -> String {
    let address = if address.is_empty() {
        String::new()
    } else {
        format!("address = \"{address}\"\n")
    };
    format!(
        "[[hba]]\ntype = \"{kind}\"\ndatabase = \"{database}\"\nuser = \"{user}\"\n\
         {address}method = \"{method}\""
    )
}

/// Two users on the servers and in pgrelay, and `rules`.
fn options(rules: Vec<String>) -> EnvOptions {
    let users = vec![
        (APP_USER.to_owned(), APP_PASSWORD.to_owned()),
        (OTHER_USER.to_owned(), OTHER_PASSWORD.to_owned()),
    ];
    EnvOptions {
        server_users: users.clone(),
        relay_users: users,
        sections: rules,
        ..Default::default()
    }
}

/// Runs psql with `conninfo`, `password` and `sql`; returns (success, stdout, stderr).
fn psql(conninfo: &str, password: &str, sql: &str) -> (bool, String, String) {
    let mut command = Command::new(support::needs::program("psql"));
    command
        .env("PGPASSWORD", password)
        .args(["-X", "-A", "-t", "-w", "-d", conninfo, "-c", sql]);
    let out = tokio::task::block_in_place(|| command.output().expect("run psql"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A TCP conninfo for `user` through pgrelay at `addr`.
fn tcp(addr: SocketAddr, user: &str, extra: &str) -> String {
    format!(
        "host={} port={} user={user} dbname={APP_DB} connect_timeout=10 {extra}",
        addr.ip(),
        addr.port()
    )
}

/// A conninfo over the Unix socket in `dir`.
fn unix(dir: &Path, user: &str, db: &str, extra: &str) -> String {
    format!(
        "host={} port={SOCKET_PORT} user={user} dbname={db} connect_timeout=10 {extra}",
        dir.display()
    )
}

/// psql succeeds and `SELECT current_user` answers `user`.
fn assert_logs_in(conninfo: &str, password: &str, user: &str) {
    let (ok, out, err) = psql(conninfo, password, "SELECT current_user");
    assert!(ok, "{conninfo}: {err}");
    assert_eq!(out, user);
}

/// psql fails with `message` (a FATAL from pgrelay).
fn assert_refused(conninfo: &str, password: &str, message: &str) {
    let (ok, _, err) = psql(conninfo, password, "SELECT 1");
    assert!(!ok, "{conninfo} got in");
    assert!(
        err.contains(&format!("FATAL:  {message}")),
        "{conninfo}: {err}"
    );
}

/// The harness's config text for `env`, with `listen` replaced and `rules` instead of
/// the env's own.
fn config_text(env: &TestEnv, listen: &str, rules: &[String]) -> String {
    let options = EnvOptions {
        sections: rules.to_vec(),
        ..env.options.clone()
    };
    support::config_text(&options, &env.cluster.ports()).replacen(
        "listen = [\"127.0.0.1:0\"]",
        &format!("listen = [{listen}]"),
        1,
    )
}

/// Another pgrelay in front of `env`'s servers, listening on `listen`, with `rules`.
async fn start_relay(env: &TestEnv, listen: &str, rules: &[String]) -> Pgrelay {
    let config = Config::from_toml_str(&config_text(env, listen, rules)).expect("config");
    Pgrelay::start(config).await.expect("start pgrelay")
}

/// A temp dir for a Unix socket, and the `listen` entry for its socket file.
fn socket_dir() -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::Builder::new()
        .prefix("pgrelay-sock-")
        .tempdir()
        .expect("temp dir");
    let path = dir.path().join(format!(".s.PGSQL.{SOCKET_PORT}"));
    let listen = format!("\"unix:{}\"", path.display());
    (dir, path, listen)
}

#[tokio::test(flavor = "multi_thread")]
async fn reject_and_no_entry_are_refused_with_postgres_words() {
    let env = support::start(options(vec![
        rule("host", "all", OTHER_USER, "127.0.0.1/32", "reject"),
        rule("host", "all", APP_USER, "10.0.0.0/8", "trust"),
    ]))
    .await;
    assert_refused(
        &tcp(env.addr, OTHER_USER, ""),
        OTHER_PASSWORD,
        "pg_hba.conf rejects connection for host \"127.0.0.1\", user \"other\", \
         database \"app\", no encryption",
    );
    assert_refused(
        &tcp(env.addr, APP_USER, ""),
        APP_PASSWORD,
        "no pg_hba.conf entry for host \"127.0.0.1\", user \"app\", database \"app\", \
         no encryption",
    );
    let err = env
        .connect(APP_USER, APP_PASSWORD, APP_DB)
        .await
        .expect_err("no rule matches");
    assert_eq!(support::sqlstate(&err).as_deref(), Some("28000"), "{err}");
    // The admin console's database is under the rules too (as in PgBouncer).
    let err = env
        .connect(OTHER_USER, OTHER_PASSWORD, "pgrelay")
        .await
        .expect_err("rejected");
    assert_eq!(support::sqlstate(&err).as_deref(), Some("28000"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_matching_rule_chooses_the_method() {
    let env = support::start(options(vec![
        rule("host", APP_DB, APP_USER, "127.0.0.1/32", "trust"),
        rule("host", "all", OTHER_USER, "127.0.0.1", "scram-sha-256"),
        rule("host", "all", "all", "all", "reject"),
        rule("host", "all", OTHER_USER, "all", "trust"),
    ]))
    .await;
    // trust: any password, or none, gets app in.
    assert_eq!(
        raw::first_auth_request(env.addr, APP_USER, APP_DB).await,
        Some(AUTH_OK)
    );
    assert_logs_in(&tcp(env.addr, APP_USER, ""), WRONG_PASSWORD, APP_USER);
    // SCRAM for the other user, whatever auth_type says; the later trust never applies.
    assert_eq!(
        raw::first_auth_request(env.addr, OTHER_USER, APP_DB).await,
        Some(AUTH_SASL)
    );
    assert_logs_in(&tcp(env.addr, OTHER_USER, ""), OTHER_PASSWORD, OTHER_USER);
    let (ok, _, err) = psql(&tcp(env.addr, OTHER_USER, ""), WRONG_PASSWORD, "SELECT 1");
    assert!(!ok && err.contains("password authentication failed for user \"other\""));
    // app on another database falls through to reject.
    let conninfo = tcp(env.addr, APP_USER, "").replace("dbname=app", "dbname=postgres");
    assert_refused(
        &conninfo,
        APP_PASSWORD,
        "pg_hba.conf rejects connection for host \"127.0.0.1\", user \"app\", \
         database \"postgres\", no encryption",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_changes_the_rules_for_new_logins_only() {
    let env = support::start(options(vec![
        rule("host", "all", APP_USER, "127.0.0.1/32", "trust"),
        rule("host", "all", "all", "127.0.0.1/32", "password"),
    ]))
    .await;
    let kept = env
        .connect(APP_USER, WRONG_PASSWORD, APP_DB)
        .await
        .expect("trusted");
    assert_eq!(
        raw::first_auth_request(env.addr, OTHER_USER, APP_DB).await,
        Some(AUTH_CLEARTEXT)
    );
    // The same rules in the other order: reject comes first for app now.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pgrelay.toml");
    let reordered = [
        rule("host", "all", "other", "all", "md5"),
        rule("host", "all", "all", "127.0.0.1/32", "reject"),
        rule("host", "all", APP_USER, "127.0.0.1/32", "trust"),
    ];
    let text = config_text(&env, "\"127.0.0.1:0\"", &reordered);
    std::fs::write(&path, text).expect("write config");
    env.relay.reload(&path).expect("reload");
    assert_refused(
        &tcp(env.addr, APP_USER, ""),
        APP_PASSWORD,
        "pg_hba.conf rejects connection for host \"127.0.0.1\", user \"app\", \
         database \"app\", no encryption",
    );
    assert_eq!(
        raw::first_auth_request(env.addr, OTHER_USER, APP_DB).await,
        Some(5),
        "md5"
    );
    assert_logs_in(&tcp(env.addr, OTHER_USER, ""), OTHER_PASSWORD, OTHER_USER);
    // The session that logged in under the old rules goes on.
    assert_eq!(support::simple_value(&kept, "SELECT 40 + 2").await, "42");
    // An invalid rule is refused by RELOAD, and the running rules stay.
    let bad = [rule("host", "all", "all", "10.0.0.0/33", "trust")];
    std::fs::write(&path, config_text(&env, "\"127.0.0.1:0\"", &bad)).expect("write");
    let err = env.relay.reload(&path).expect_err("bad CIDR");
    assert_eq!(err.key(), Some("hba[0].address"), "{err}");
    assert!(psql(&tcp(env.addr, APP_USER, ""), APP_PASSWORD, "SELECT 1")
        .2
        .contains("rejects"));
}

#[tokio::test(flavor = "multi_thread")]
async fn hostssl_and_hostnossl_follow_the_clients_tls() {
    let pki = Pki::new("hba");
    let tls = format!(
        "[tls]\nclient_mode = \"prefer\"\nclient_cert = {:?}\nclient_key = {:?}\n\
         client_ca = {:?}\n",
        pki.server.cert, pki.server.key, pki.ca
    );
    let env = support::start(options(vec![
        tls,
        rule("hostssl", "all", APP_USER, "127.0.0.1/32", "scram-sha-256"),
        rule("hostnossl", "all", OTHER_USER, "127.0.0.1/32", "password"),
        rule("hostssl", "all", OTHER_USER, "all", "cert"),
    ]))
    .await;
    let (tls, plain) = ("sslmode=require", "sslmode=disable");
    assert_logs_in(&tcp(env.addr, APP_USER, tls), APP_PASSWORD, APP_USER);
    assert_refused(
        &tcp(env.addr, APP_USER, plain),
        APP_PASSWORD,
        "no pg_hba.conf entry for host \"127.0.0.1\", user \"app\", database \"app\", \
         no encryption",
    );
    assert_refused(
        &tcp(env.addr, "ghost", tls),
        APP_PASSWORD,
        "no pg_hba.conf entry for host \"127.0.0.1\", user \"ghost\", database \"app\", \
         SSL encryption",
    );
    // other: a password in plaintext, a certificate over TLS.
    assert_logs_in(
        &tcp(env.addr, OTHER_USER, plain),
        OTHER_PASSWORD,
        OTHER_USER,
    );
    let cert = pki.client(OTHER_USER);
    let certified = format!(
        "{tls} sslcert={} sslkey={}",
        cert.cert.display(),
        cert.key.display()
    );
    assert_logs_in(&tcp(env.addr, OTHER_USER, &certified), "", OTHER_USER);
    assert_refused(
        &tcp(env.addr, OTHER_USER, tls),
        OTHER_PASSWORD,
        "certificate authentication failed for user \"other\"",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_rules_match_ipv6_clients() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: this machine has no IPv6 loopback");
        return;
    }
    let env = support::start(options(Vec::new())).await;
    let relay = start_relay(
        &env,
        "\"127.0.0.1:0\", \"[::1]:0\"",
        &[
            rule("host", "all", "all", "::1/128", "trust"),
            rule("host", "all", "all", "127.0.0.1/32", "reject"),
        ],
    )
    .await;
    let (v4, v6) = (relay.addrs[0], relay.addrs[1]);
    assert!(v6.is_ipv6(), "{v6}");
    assert_logs_in(&tcp(v6, APP_USER, ""), WRONG_PASSWORD, APP_USER);
    assert_refused(
        &tcp(v4, APP_USER, ""),
        APP_PASSWORD,
        "pg_hba.conf rejects connection for host \"127.0.0.1\", user \"app\", \
         database \"app\", no encryption",
    );
    let no_v6 = start_relay(
        &env,
        "\"[::1]:0\"",
        &[rule("host", "all", "all", "127.0.0.0/8", "trust")],
    )
    .await;
    assert_refused(
        &tcp(no_v6.addrs[0], APP_USER, ""),
        APP_PASSWORD,
        "no pg_hba.conf entry for host \"::1\", user \"app\", database \"app\", no encryption",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unix_socket_clients_meet_local_rules() {
    let env = support::start(EnvOptions {
        top_extra: vec![format!("admin_users = [\"{APP_USER}\"]")],
        ..options(Vec::new())
    })
    .await;
    let (dir, path, socket) = socket_dir();
    // A socket file left by an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
    assert!(path.exists());
    let listen = format!("\"127.0.0.1:0\", {socket}");
    let relay = start_relay(
        &env,
        &listen,
        &[
            rule("local", "all", "all", "", "scram-sha-256"),
            rule("host", "all", "all", "all", "reject"),
        ],
    )
    .await;
    let dir = dir.path();
    assert_logs_in(&unix(dir, APP_USER, APP_DB, ""), APP_PASSWORD, APP_USER);
    let (ok, _, err) = psql(&unix(dir, APP_USER, APP_DB, ""), WRONG_PASSWORD, "SELECT 1");
    assert!(
        !ok && err.contains("password authentication failed"),
        "{err}"
    );
    // libpq ignores sslmode on Unix sockets (it never asks for TLS there).
    for mode in ["prefer", "require"] {
        let conninfo = unix(dir, APP_USER, APP_DB, &format!("sslmode={mode}"));
        assert_logs_in(&conninfo, APP_PASSWORD, APP_USER);
    }
    // TCP meets the host rule.
    assert_refused(
        &tcp(relay.addrs[0], APP_USER, ""),
        APP_PASSWORD,
        "pg_hba.conf rejects connection for host \"127.0.0.1\", user \"app\", \
         database \"app\", no encryption",
    );
    // SHOW CLIENTS names a Unix-socket client's address `unix`.
    let console = unix(dir, APP_USER, "pgrelay", "");
    let (ok, out, err) = psql(&console, APP_PASSWORD, "SHOW CLIENTS");
    assert!(ok, "{err}");
    assert!(
        out.lines()
            .any(|line| line.contains(&format!("|unix|{SOCKET_PORT}|unix|{SOCKET_PORT}|"))),
        "{out}"
    );
    relay.shutdown(Duration::from_secs(1)).await;
    assert!(!path.exists(), "the socket file is removed at shutdown");
}

#[tokio::test(flavor = "multi_thread")]
async fn local_rules_reject_and_host_rules_do_not_match_sockets() {
    let env = support::start(options(Vec::new())).await;
    let (dir, _path, socket) = socket_dir();
    let dir_path = dir.path().to_owned();
    let rejecting = start_relay(
        &env,
        &socket,
        &[
            rule("local", "all", APP_USER, "", "reject"),
            rule("local", "all", "all", "", "trust"),
        ],
    )
    .await;
    assert_refused(
        &unix(&dir_path, APP_USER, APP_DB, ""),
        APP_PASSWORD,
        "pg_hba.conf rejects connection for host \"[local]\", user \"app\", \
         database \"app\", no encryption",
    );
    assert_logs_in(&unix(&dir_path, OTHER_USER, APP_DB, ""), "", OTHER_USER);
    rejecting.shutdown(Duration::from_secs(1)).await;
    let host_only = start_relay(&env, &socket, &[rule("host", "all", "all", "all", "trust")]).await;
    assert_refused(
        &unix(&dir_path, APP_USER, APP_DB, ""),
        APP_PASSWORD,
        "no pg_hba.conf entry for host \"[local]\", user \"app\", database \"app\", \
         no encryption",
    );
    drop(host_only);
    // Something that is not a socket in the way is left alone, and pgrelay says why.
    let blocked = dir_path.join(".s.PGSQL.1");
    std::fs::write(&blocked, "data").expect("write file");
    let text = config_text(&env, &format!("\"unix:{}\"", blocked.display()), &[]);
    let config = Config::from_toml_str(&text).expect("config");
    let err = Pgrelay::start(config).await.err().expect("refused");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&blocked).expect("kept"), "data");
}

/// With `tls.client_mode = "require"`, a Unix-socket client is answered `N` to an
/// SSLRequest and logs in without TLS, as PostgreSQL lets local clients do.
#[tokio::test(flavor = "multi_thread")]
async fn unix_sockets_answer_ssl_requests_with_n() {
    let pki = Pki::new("hba-unix");
    let tls = format!(
        "[tls]\nclient_mode = \"require\"\nclient_cert = {:?}\nclient_key = {:?}\n",
        pki.server.cert, pki.server.key
    );
    let env = support::start(options(Vec::new())).await;
    let (dir, path, socket) = socket_dir();
    let relay = start_relay(&env, &socket, &[tls]).await;
    let mut stream = tokio::net::UnixStream::connect(&path)
        .await
        .expect("connect");
    stream
        .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .expect("SSLRequest");
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await.expect("answer");
    assert_eq!(&answer, b"N");
    let startup = raw::startup_message(&[("user", APP_USER), ("database", APP_DB)]);
    stream.write_all(&startup).await.expect("startup");
    let mut first = [0u8; 9];
    stream.read_exact(&mut first).await.expect("auth request");
    assert_eq!(first[0], b'R', "{first:?}");
    assert_eq!(
        i32::from_be_bytes([first[5], first[6], first[7], first[8]]),
        AUTH_SASL
    );
    drop(stream);
    assert_logs_in(
        &unix(dir.path(), APP_USER, APP_DB, ""),
        APP_PASSWORD,
        APP_USER,
    );
    drop(relay);
}

/// `md5` for a user stored with a SCRAM secret runs SCRAM instead, as PostgreSQL does;
/// `password` checks the cleartext against the secret.
#[tokio::test(flavor = "multi_thread")]
async fn md5_rules_fall_back_to_scram_for_scram_secrets() {
    let env = support::start(options(Vec::new())).await;
    let secret = support::stored_secret(&env.direct_superuser().await, OTHER_USER).await;
    assert!(secret.starts_with("SCRAM-SHA-256$"), "{secret}");
    let options = EnvOptions {
        relay_users: vec![
            (APP_USER.to_owned(), APP_PASSWORD.to_owned()),
            (OTHER_USER.to_owned(), secret),
        ],
        sections: vec![
            rule("host", "all", APP_USER, "all", "password"),
            rule("host", "all", OTHER_USER, "all", "md5"),
        ],
        ..env.options.clone()
    };
    let relay = support::start_relay(&options, &env.cluster.ports()).await;
    let addr = relay.addrs[0];
    assert_eq!(
        raw::first_auth_request(addr, OTHER_USER, APP_DB).await,
        Some(AUTH_SASL)
    );
    assert_logs_in(&tcp(addr, OTHER_USER, ""), OTHER_PASSWORD, OTHER_USER);
    assert_eq!(
        raw::first_auth_request(addr, APP_USER, APP_DB).await,
        Some(AUTH_CLEARTEXT)
    );
    assert_logs_in(&tcp(addr, APP_USER, ""), APP_PASSWORD, APP_USER);
}
