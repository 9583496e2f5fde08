//! TLS between clients and pgrelay (`[tls] client_*`), against real PostgreSQL and real
//! clients: psql (libpq 15), libpq 18 through psycopg (direct TLS, channel binding),
//! tokio-postgres with rustls (SCRAM-SHA-256-PLUS, both pool modes), and raw sockets for
//! what no well-behaved client sends (direct TLS without ALPN, bytes after an
//! SSLRequest, a stalled handshake, TLS 1.0). Certificates are made per test.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::certs::{Pem, Pki};
use support::{raw, EnvOptions, TestEnv, APP_DB, APP_PASSWORD, APP_USER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What pgrelay tells a plaintext client when TLS is required.
const TLS_REQUIRED: &str = "TLS is required";

/// A `[tls]` section: `mode`, the certificate pgrelay shows, and the CA it checks
/// client certificates with.
fn tls_section(mode: &str, server: &Pem, client_ca: Option<&Path>) -> String {
    let mut section = format!(
        "[tls]\nclient_mode = \"{mode}\"\nclient_cert = {:?}\nclient_key = {:?}\n",
        server.cert, server.key
    );
    if let Some(ca) = client_ca {
        section.push_str(&format!("client_ca = {ca:?}\n"));
    }
    section
}

async fn start_tls(mut options: EnvOptions, tls: String) -> TestEnv {
    options.sections.push(tls);
    support::start(options).await
}

/// A libpq connection string for `user` through pgrelay, by name for verify-full.
fn libpq_conninfo(env: &TestEnv, user: &str, extra: &str) -> String {
    format!(
        "host=localhost hostaddr=127.0.0.1 port={} user={user} dbname={APP_DB} \
         connect_timeout=10 {extra}",
        env.port()
    )
}

/// Runs psql with `conninfo` and `password` (none: no password to give);
/// returns (success, stdout, stderr).
fn psql(conninfo: &str, password: Option<&str>, sql: &str) -> (bool, String, String) {
    let mut command = Command::new(support::needs::program("psql"));
    command.env_remove("PGPASSWORD");
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    command.args(["-X", "-A", "-t", "-w", "-d", conninfo, "-c", sql]);
    let out = tokio::task::block_in_place(|| command.output().expect("run psql"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn client_cert_args(pem: &Pem) -> String {
    format!(
        "sslcert={} sslkey={}",
        pem.cert.display(),
        pem.key.display()
    )
}

fn read_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .expect("PEM file")
        .map(|cert| cert.expect("certificate"))
        .collect()
}

/// A rustls client trusting `ca`, showing `client` when given.
fn rustls_config(ca: &Path, client: Option<&Pem>) -> rustls::ClientConfig {
    rustls_config_for(ca, client, rustls::DEFAULT_VERSIONS)
}

/// [`rustls_config`] speaking only `versions`.
fn rustls_config_for(
    ca: &Path,
    client: Option<&Pem>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca) {
        roots.add(cert).expect("CA certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .with_root_certificates(roots);
    match client {
        Some(pem) => {
            let key = PrivateKeyDer::from_pem_file(&pem.key).expect("client key");
            builder
                .with_client_auth_cert(read_certs(&pem.cert), key)
                .expect("client certificate")
        }
        None => builder.with_no_client_auth(),
    }
}

/// tokio-postgres over rustls through pgrelay; `extra` adds connection parameters.
async fn connect_rustls(
    env: &TestEnv,
    config: rustls::ClientConfig,
    user: &str,
    password: &str,
    extra: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let conninfo = format!(
        "{} sslmode=require {extra}",
        env.conn_string(user, password, APP_DB)
    );
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(config);
    let (client, connection) = tokio_postgres::connect(&conninfo, tls).await?;
    tokio::spawn(connection);
    Ok(client)
}

fn assert_refused_with(err: &tokio_postgres::Error, code: &str, text: &str) {
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got: {err}"));
    assert_eq!(db.code().code(), code, "{db:?}");
    assert!(db.message().contains(text), "{db:?}");
}

/// `require`: psql with verify-full (pgrelay's name and CA checked) gets in and its
/// query runs; psql and tokio-postgres without TLS are refused with 28000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_serves_verified_tls_and_refuses_plaintext() {
    let pki = Pki::new("require");
    let env = start_tls(
        EnvOptions::default(),
        tls_section("require", &pki.server, None),
    )
    .await;
    let verify = format!("sslmode=verify-full sslrootcert={}", pki.ca.display());
    let (ok, out, err) = psql(
        &libpq_conninfo(&env, APP_USER, &verify),
        Some(APP_PASSWORD),
        "SELECT current_user || ' ' || (40 + 2)",
    );
    assert!(ok, "{err}");
    assert_eq!(out, format!("{APP_USER} 42"));
    let (ok, _, err) = psql(
        &libpq_conninfo(&env, APP_USER, "sslmode=disable"),
        Some(APP_PASSWORD),
        "SELECT 1",
    );
    assert!(!ok && err.contains(TLS_REQUIRED), "{err}");
    let plain = env.connect(APP_USER, APP_PASSWORD, APP_DB).await;
    assert_refused_with(&plain.expect_err("plaintext"), "28000", TLS_REQUIRED);
    // A CA that did not sign pgrelay's certificate: the client refuses pgrelay.
    let other = Pki::new("other");
    let wrong_ca = format!("sslmode=verify-ca sslrootcert={}", other.ca.display());
    let (ok, _, _) = psql(
        &libpq_conninfo(&env, APP_USER, &wrong_ca),
        Some(APP_PASSWORD),
        "SELECT 1",
    );
    assert!(!ok);
}

/// `prefer`: TLS for clients that ask, plaintext for those that do not; the console's
/// `SHOW CLIENTS` tells them apart in its `tls` column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_serves_both() {
    let pki = Pki::new("prefer");
    let options = EnvOptions {
        top_extra: vec![format!("admin_users = [\"{APP_USER}\"]")],
        ..EnvOptions::default()
    };
    let env = start_tls(options, tls_section("prefer", &pki.server, None)).await;
    let plain = env.client().await;
    assert_eq!(support::simple_value(&plain, "SELECT 42").await, "42");
    let tls = connect_rustls(
        &env,
        rustls_config(&pki.ca, None),
        APP_USER,
        APP_PASSWORD,
        "",
    )
    .await
    .expect("TLS client");
    assert_eq!(support::simple_value(&tls, "SELECT 42").await, "42");
    let tls12_only = rustls_config_for(&pki.ca, None, &[&rustls::version::TLS12]);
    let tls12 = connect_rustls(&env, tls12_only, APP_USER, APP_PASSWORD, "")
        .await
        .expect("TLS 1.2 client");
    assert_eq!(support::simple_value(&tls12, "SELECT 42").await, "42");
    let admin = env
        .connect(APP_USER, APP_PASSWORD, "pgrelay")
        .await
        .expect("console");
    let rows = support::simple_rows(&admin, "SHOW CLIENTS")
        .await
        .expect("SHOW CLIENTS");
    let tls_column: Vec<String> = rows
        .into_iter()
        .map(|row| row[16].clone().unwrap_or_default())
        .collect();
    assert_eq!(tls_column.len(), 4, "{tls_column:?}");
    let mut on_tls: Vec<&String> = tls_column.iter().filter(|t| !t.is_empty()).collect();
    on_tls.sort();
    assert_eq!(on_tls.len(), 2, "{tls_column:?}");
    assert!(
        on_tls[0].starts_with("TLSv1.2/TLS_ECDHE_"),
        "{tls_column:?}"
    );
    assert!(on_tls[1].starts_with("TLSv1.3/TLS13_"), "{tls_column:?}");
}

/// verify-ca and verify-full: a certificate from the CA gets in; none, another CA's,
/// an expired one are refused in the handshake; verify-full also wants CN = user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_verified() {
    let pki = Pki::new("clients");
    let other = Pki::new("stranger");
    for mode in ["verify-ca", "verify-full"] {
        let env = start_tls(
            EnvOptions::default(),
            tls_section(mode, &pki.server, Some(&pki.ca)),
        )
        .await;
        let conninfo = |cert: Option<&Pem>| {
            let certs = cert.map(client_cert_args).unwrap_or_default();
            let extra = format!(
                "sslmode=verify-full sslrootcert={} {certs}",
                pki.ca.display()
            );
            libpq_conninfo(&env, APP_USER, &extra)
        };
        let good = pki.client(APP_USER);
        let (ok, out, err) = psql(&conninfo(Some(&good)), Some(APP_PASSWORD), "SELECT 42");
        assert!(ok && out == "42", "{mode}: {err}");
        for (what, cert) in [
            ("no certificate", None),
            ("another CA's", Some(other.client(APP_USER))),
            ("expired", Some(pki.expired_client(APP_USER))),
        ] {
            let (ok, _, err) = psql(&conninfo(cert.as_ref()), Some(APP_PASSWORD), "SELECT 1");
            assert!(!ok, "{mode}: {what} got in");
            assert!(!err.contains(TLS_REQUIRED), "{mode}: {what}: {err}");
        }
        // Someone else's certificate from the right CA: fine for verify-ca, not for
        // verify-full.
        let someone = pki.client("someone-else");
        let result = connect_rustls(
            &env,
            rustls_config(&pki.ca, Some(&someone)),
            APP_USER,
            APP_PASSWORD,
            "",
        )
        .await;
        match mode {
            "verify-ca" => {
                let client = result.expect("verify-ca takes any CN");
                assert_eq!(support::simple_value(&client, "SELECT 1").await, "1");
            }
            _ => assert_refused_with(
                &result.expect_err("verify-full with CN != user"),
                "28000",
                "certificate authentication failed",
            ),
        }
    }
}

/// `auth_type = "cert"`: the certificate is the proof, no password is given; a
/// certificate with another CN, or none, is refused with 28000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_authentication_needs_no_password() {
    let pki = Pki::new("cert-auth");
    let options = EnvOptions {
        client_auth: "cert",
        ..EnvOptions::default()
    };
    let env = start_tls(options, tls_section("require", &pki.server, Some(&pki.ca))).await;
    let extra = |cert: &Pem| {
        format!(
            "sslmode=verify-full sslrootcert={} {}",
            pki.ca.display(),
            client_cert_args(cert)
        )
    };
    let mine = pki.client(APP_USER);
    let (ok, out, err) = psql(
        &libpq_conninfo(&env, APP_USER, &extra(&mine)),
        None,
        "SELECT current_user",
    );
    assert!(ok, "{err}");
    assert_eq!(out, APP_USER);
    let theirs = pki.client("intruder");
    let (ok, _, err) = psql(
        &libpq_conninfo(&env, APP_USER, &extra(&theirs)),
        None,
        "SELECT 1",
    );
    assert!(
        !ok && err.contains("certificate authentication failed"),
        "{err}"
    );
    let none = connect_rustls(&env, rustls_config(&pki.ca, None), APP_USER, "", "").await;
    assert_refused_with(
        &none.expect_err("no certificate"),
        "28000",
        "certificate authentication failed",
    );
}

/// libpq 18: direct TLS (ALPN `postgresql`) and channel binding required
/// (SCRAM-SHA-256-PLUS), each on a connection that really is on TLS; channel binding
/// cannot be had without TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libpq18_direct_tls_and_channel_binding() {
    let pki = Pki::new("libpq18");
    let env = start_tls(
        EnvOptions::default(),
        tls_section("prefer", &pki.server, None),
    )
    .await;
    let base = libpq_conninfo(
        &env,
        APP_USER,
        &format!("password={APP_PASSWORD} sslrootcert={}", pki.ca.display()),
    );
    let out = support::needs::run_libpq18_driver(
        "tls_libpq18.py",
        &[
            &base,
            "direct=sslmode=verify-full sslnegotiation=direct",
            "bound=sslmode=verify-full channel_binding=require",
            "direct_bound=sslmode=require sslnegotiation=direct channel_binding=require",
            "unbound_plain=sslmode=disable channel_binding=require",
        ],
    );
    let results: Vec<serde_json::Value> = out
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(results.len(), 4, "{out}");
    for result in &results[..3] {
        assert_eq!(result["ok"], true, "{result}");
        assert_eq!(result["ssl_in_use"], true, "{result}");
        assert_eq!(result["user"], APP_USER, "{result}");
        assert_eq!(result["value"], 42, "{result}");
    }
    assert_eq!(results[3]["ok"], false, "{}", results[3]);
    assert!(
        results[3]["error"]
            .as_str()
            .is_some_and(|e| e.contains("channel binding")),
        "{}",
        results[3]
    );
}

/// tokio-postgres over rustls binds the channel when it can (its default is
/// `prefer`): required here, with a query, a prepared statement reused across
/// transactions, and session mode's single server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_rustls_in_both_pool_modes() {
    let pki = Pki::new("tokio-postgres");
    for mode in ["transaction", "session"] {
        let env = start_tls(
            EnvOptions::mode(mode),
            tls_section("require", &pki.server, None),
        )
        .await;
        let config = rustls_config(&pki.ca, None);
        let client = connect_rustls(
            &env,
            config,
            APP_USER,
            APP_PASSWORD,
            "channel_binding=require",
        )
        .await
        .unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_eq!(support::simple_value(&client, "SELECT 40 + 2").await, "42");
        // Some megabytes, so that TLS records queue up behind a full socket.
        let big = "SELECT length(string_agg(repeat('x', 1000), '')) FROM generate_series(1, 4000)";
        assert_eq!(support::simple_value(&client, big).await, "4000000");
        let rows = client
            .query(
                "SELECT repeat('y', 1000) FROM generate_series(1, 5000)",
                &[],
            )
            .await
            .expect("a large result");
        assert_eq!(rows.len(), 5000);
        let long = format!("SELECT length('{}')", "z".repeat(2_000_000));
        assert_eq!(support::simple_value(&client, &long).await, "2000000");
        let statement = client.prepare("SELECT $1::int + 1").await.expect("prepare");
        for i in 0..5 {
            let row = client.query_one(&statement, &[&i]).await.expect("execute");
            assert_eq!(row.get::<_, i32>(0), i + 1);
        }
        let pid = || client.query_one("SELECT pg_backend_pid()", &[]);
        let first: i32 = pid().await.expect("pid").get(0);
        let second: i32 = pid().await.expect("pid").get(0);
        if mode == "session" {
            assert_eq!(first, second, "session mode keeps its server");
        }
    }
}

/// Direct TLS as PostgreSQL 17 defines it: a ClientHello without ALPN `postgresql` is
/// refused; with it, the startup packet follows inside TLS and SCRAM-SHA-256-PLUS is
/// offered first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_needs_alpn_postgresql() {
    let pki = Pki::new("direct");
    let env = start_tls(
        EnvOptions::default(),
        tls_section("require", &pki.server, None),
    )
    .await;
    let direct = |alpn: Vec<Vec<u8>>| {
        let mut config = rustls_config(&pki.ca, None);
        config.alpn_protocols = alpn;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let addr = env.addr;
        async move {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let name = ServerName::try_from("localhost").expect("name");
            tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
                .await
                .expect("handshake ends")
        }
    };
    assert!(direct(Vec::new()).await.is_err(), "no ALPN: refused");
    assert!(
        direct(vec![b"h2".to_vec()]).await.is_err(),
        "ALPN h2: refused"
    );
    let mut tls = direct(vec![b"postgresql".to_vec()])
        .await
        .expect("ALPN postgresql: accepted");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    let startup = raw::startup_message(&[("user", APP_USER), ("database", APP_DB)]);
    tls.write_all(&startup).await.expect("startup");
    let mut header = [0u8; 9];
    tls.read_exact(&mut header).await.expect("auth request");
    assert_eq!(header[0], b'R');
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    assert_eq!(
        i32::from_be_bytes([header[5], header[6], header[7], header[8]]),
        10
    );
    let mut mechanisms = vec![0u8; len - 8];
    tls.read_exact(&mut mechanisms).await.expect("mechanisms");
    assert!(
        mechanisms.starts_with(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0"),
        "{:?}",
        String::from_utf8_lossy(&mechanisms)
    );

    // After an SSLRequest, ALPN is optional, and `postgresql` is selected when offered.
    for alpn in [Vec::new(), vec![b"postgresql".to_vec()]] {
        let mut config = rustls_config(&pki.ca, None);
        config.alpn_protocols = alpn.clone();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let mut tcp = TcpStream::connect(env.addr).await.expect("connect");
        tcp.write_all(&ssl_request()).await.expect("SSLRequest");
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.expect("answer");
        assert_eq!(&answer, b"S");
        let name = ServerName::try_from("localhost").expect("name");
        let tls = connector.connect(name, tcp).await.expect("TLS after S");
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            alpn.first().map(Vec::as_slice)
        );
    }
}

fn ssl_request() -> Vec<u8> {
    let mut packet = 8u32.to_be_bytes().to_vec();
    packet.extend_from_slice(&80_877_103u32.to_be_bytes());
    packet
}

/// A ClientHello that offers TLS 1.0 only (no supported_versions extension).
fn tls10_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x01]; // client_version TLS 1.0
    hello.extend_from_slice(&[7; 32]); // random
    hello.push(0); // no session id
    hello.extend_from_slice(&[0x00, 0x02, 0x00, 0x2f]); // TLS_RSA_WITH_AES_128_CBC_SHA
    hello.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut handshake = vec![0x01, 0x00];
    handshake.extend_from_slice(&(hello.len() as u16).to_be_bytes());
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// What no client should send ends that connection alone, quickly: bytes after an
/// SSLRequest (08P01 in plaintext), a TLS 1.0-only hello, an SSLRequest and then
/// silence, a lone TLS record byte. A TLS session opened before them still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_openings_end_only_themselves() {
    let pki = Pki::new("bad");
    let options = EnvOptions {
        pool_extra: vec!["client_login_timeout = \"1s\"".into()],
        ..EnvOptions::default()
    };
    let env = start_tls(options, tls_section("require", &pki.server, None)).await;
    let bystander = connect_rustls(
        &env,
        rustls_config(&pki.ca, None),
        APP_USER,
        APP_PASSWORD,
        "",
    )
    .await
    .expect("bystander");

    let mut garbage = TcpStream::connect(env.addr).await.expect("connect");
    let mut packet = ssl_request();
    packet.extend_from_slice(b"not TLS at all");
    garbage.write_all(&packet).await.expect("send");
    let seen = raw::read_to_close(&mut garbage, Duration::from_secs(5))
        .await
        .expect("closed");
    let messages = raw::split_messages(&seen);
    assert_eq!(
        messages.first().and_then(|m| m.sqlstate()).as_deref(),
        Some("08P01")
    );

    let mut old = TcpStream::connect(env.addr).await.expect("connect");
    old.write_all(&tls10_client_hello()).await.expect("send");
    let seen = raw::read_to_close(&mut old, Duration::from_secs(5))
        .await
        .expect("closed");
    // An alert record, or nothing at all.
    assert!(seen.is_empty() || seen[0] == 0x15, "{seen:?}");

    let mut stalled = TcpStream::connect(env.addr).await.expect("connect");
    stalled.write_all(&ssl_request()).await.expect("send");
    let mut answer = [0u8; 1];
    stalled.read_exact(&mut answer).await.expect("answer");
    assert_eq!(&answer, b"S");
    let mut half = TcpStream::connect(env.addr).await.expect("connect");
    half.write_all(&[0x16]).await.expect("send");
    let started = Instant::now();
    for (what, stream) in [("after S", &mut stalled), ("one byte", &mut half)] {
        let closed = raw::read_to_close(stream, Duration::from_secs(4)).await;
        assert!(
            closed.is_ok(),
            "{what}: still open 4s into a 1s login timeout"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(4));

    assert_eq!(support::simple_value(&bystander, "SELECT 42").await, "42");
}

/// RELOAD swaps the certificate for new connections: a session on the old one goes on,
/// new clients see the new one. A certificate that cannot be read rejects the reload,
/// and the running one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_the_certificate_and_keeps_it_on_failure() {
    let a = Pki::new("cert-a");
    let b = Pki::new("cert-b");
    let options = EnvOptions {
        top_extra: vec![format!("admin_users = [\"{APP_USER}\"]")],
        ..EnvOptions::default()
    };
    let env = start_tls(options.clone(), tls_section("require", &a.server, None)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pgrelay.toml");
    let write = |server: &Pem| {
        let mut options = options.clone();
        options.sections.push(tls_section("require", server, None));
        let text = support::config_text(&options, &env.cluster.ports());
        std::fs::write(&path, text).expect("write config");
    };
    write(&a.server);
    env.relay.reload(&path).expect("same config, remembered");

    let old = connect_rustls(&env, rustls_config(&a.ca, None), APP_USER, APP_PASSWORD, "")
        .await
        .expect("on certificate A");
    let console = |ca: &Path| {
        let config = rustls_config(ca, None);
        let conninfo = format!(
            "{} sslmode=require",
            env.conn_string(APP_USER, APP_PASSWORD, "pgrelay")
        );
        async move {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(config);
            let (client, connection) = tokio_postgres::connect(&conninfo, tls).await?;
            tokio::spawn(connection);
            Ok::<_, tokio_postgres::Error>(client)
        }
    };
    let admin = console(&a.ca).await.expect("console over TLS");
    write(&b.server);
    admin.simple_query("RELOAD").await.expect("RELOAD");

    assert_eq!(support::simple_value(&old, "SELECT 42").await, "42");
    let trusting_a = connect_rustls(&env, rustls_config(&a.ca, None), APP_USER, APP_PASSWORD, "");
    assert!(
        trusting_a.await.is_err(),
        "a new connection sees certificate B"
    );
    let new = connect_rustls(&env, rustls_config(&b.ca, None), APP_USER, APP_PASSWORD, "")
        .await
        .expect("on certificate B");
    assert_eq!(support::simple_value(&new, "SELECT 42").await, "42");

    let broken = Pem {
        cert: dir.path().join("missing.pem"),
        key: b.server.key.clone(),
    };
    write(&broken);
    let err = env.relay.reload(&path).expect_err("a missing certificate");
    assert!(err.to_string().starts_with("tls.client_cert"), "{err}");
    let err = admin.simple_query("RELOAD").await.expect_err("RELOAD too");
    let message = err.as_db_error().map(|db| db.message().to_owned());
    assert!(
        message.is_some_and(|m| m.contains("missing.pem")),
        "{err:?}"
    );
    let still_b = connect_rustls(&env, rustls_config(&b.ca, None), APP_USER, APP_PASSWORD, "")
        .await
        .expect("certificate B stays");
    assert_eq!(support::simple_value(&still_b, "SELECT 42").await, "42");
    assert_eq!(support::simple_value(&old, "SELECT 42").await, "42");
}

/// Reads one backend message from any stream.
async fn read_message<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> raw::Message {
    let mut header = [0u8; 5];
    stream
        .read_exact(&mut header)
        .await
        .expect("message header");
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).await.expect("message body");
    raw::Message {
        tag: header[0],
        body,
    }
}

/// Sends the startup packet and the client-first-message with `mechanism` and
/// `client_first`; returns pgrelay's answer to it.
async fn first_scram_answer<S>(stream: &mut S, mechanism: &str, client_first: &[u8]) -> raw::Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let startup = raw::startup_message(&[("user", APP_USER), ("database", APP_DB)]);
    stream.write_all(&startup).await.expect("startup");
    assert_eq!(read_message(stream).await.auth_code(), Some(10));
    stream
        .write_all(&raw::sasl_initial(mechanism, client_first))
        .await
        .expect("client-first");
    read_message(stream).await
}

/// Channel binding misused, answered as PostgreSQL answers it: `p=` on plaintext and
/// -PLUS without TLS are 08P01; `y` (a downgrade) on TLS is 28000; binding data for
/// another certificate fails the check (08P01).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_misuse_is_refused() {
    let pki = Pki::new("binding");
    let env = start_tls(
        EnvOptions::default(),
        tls_section("prefer", &pki.server, None),
    )
    .await;
    let bound: &[u8] = b"p=tls-server-end-point,,n=,r=clientnonce";
    let plaintext = [("SCRAM-SHA-256", bound), ("SCRAM-SHA-256-PLUS", bound)];
    for (mechanism, first) in plaintext {
        let mut tcp = TcpStream::connect(env.addr).await.expect("connect");
        let answer = first_scram_answer(&mut tcp, mechanism, first).await;
        assert_eq!(
            answer.sqlstate().as_deref(),
            Some("08P01"),
            "{mechanism}: {answer:?}"
        );
    }
    let tls_client = || {
        let mut config = rustls_config(&pki.ca, None);
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let addr = env.addr;
        async move {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let name = ServerName::try_from("localhost").expect("name");
            connector.connect(name, tcp).await.expect("direct TLS")
        }
    };
    let mut tls = tls_client().await;
    let answer = first_scram_answer(&mut tls, "SCRAM-SHA-256", b"y,,n=,r=clientnonce").await;
    assert_eq!(answer.sqlstate().as_deref(), Some("28000"), "{answer:?}");
    let mut tls = tls_client().await;
    let answer = first_scram_answer(&mut tls, "SCRAM-SHA-256-PLUS", b"n,,n=,r=clientnonce").await;
    assert_eq!(answer.sqlstate().as_deref(), Some("08P01"), "{answer:?}");

    let mut tls = tls_client().await;
    let server_first = first_scram_answer(&mut tls, "SCRAM-SHA-256-PLUS", bound).await;
    assert_eq!(server_first.auth_code(), Some(11), "{server_first:?}");
    let text = String::from_utf8_lossy(&server_first.body[4..]).into_owned();
    let nonce = text
        .split(',')
        .find_map(|part| part.strip_prefix("r="))
        .expect("nonce");
    let b64 = base64::engine::general_purpose::STANDARD;
    let wrong = b64.encode(b"p=tls-server-end-point,,hash of another certificate");
    let client_final = format!("c={wrong},r={nonce},p={}", b64.encode([0u8; 32]));
    tls.write_all(&raw::message(b'p', client_final.as_bytes()))
        .await
        .expect("client-final");
    let answer = read_message(&mut tls).await;
    assert_eq!(answer.sqlstate().as_deref(), Some("08P01"), "{answer:?}");
    assert!(answer.fields()[&b'M'].contains("channel binding check failed"));
}

/// RELOAD swapping the certificate back and forth while pgbench runs over TLS: 4
/// clients that keep their connection and 4 that reconnect for every transaction (so
/// they log in under both certificates) fail no transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_reloads_under_pgbench_fail_no_transaction() {
    let a = Pki::new("under-load-a");
    let b = Pki::new("under-load-b");
    let options = EnvOptions::default();
    let env = start_tls(options.clone(), tls_section("require", &a.server, None)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pgrelay.toml");
    let script = dir.path().join("select.sql");
    std::fs::write(&script, "SELECT 1;\n").expect("write script");
    let write = |server: &Pem| {
        let mut options = options.clone();
        options.sections.push(tls_section("require", server, None));
        let text = support::config_text(&options, &env.cluster.ports());
        std::fs::write(&path, text).expect("write config");
    };
    let pgbench = |reconnect: bool| {
        let mut command = Command::new(support::needs::program("pgbench"));
        command
            .env("PGPASSWORD", APP_PASSWORD)
            .env("PGSSLMODE", "require")
            .args(["-n", "-c", "4", "-j", "2", "-T", "4", "-f"])
            .arg(&script)
            .args(["-h", "127.0.0.1", "-p", &env.port().to_string()])
            .args(["-U", APP_USER, APP_DB]);
        if reconnect {
            command.arg("-C");
        }
        std::thread::spawn(move || command.output().expect("run pgbench"))
    };
    let runs = [pgbench(false), pgbench(true)];
    let mut reloads = 0;
    let until = Instant::now() + Duration::from_millis(3500);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        write(if reloads % 2 == 0 {
            &b.server
        } else {
            &a.server
        });
        env.relay.reload(&path).expect("reload");
        reloads += 1;
    }
    for run in runs {
        let out = run.join().expect("pgbench thread");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "pgbench failed:\n{stdout}\n{stderr}");
        let processed = stdout
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|n| n.split('/').next()?.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no transaction count in:\n{stdout}"));
        assert!(processed > 0, "{stdout}");
        assert!(
            stdout.contains("number of failed transactions: 0 "),
            "{stdout}\n{stderr}"
        );
    }
    assert!(reloads >= 4, "{reloads} reloads");
}
